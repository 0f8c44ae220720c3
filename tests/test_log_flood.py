"""A bundle that floods its log pipe, and a supervisor whose own stderr nobody
reads: the supervisor keeps up or drops (and counts), it never stalls."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator

import pytest
from harness import (
    DEADLINE,
    Hotsup,
    counter_source,
    free_port,
    request,
    save,
    wait_for,
    write_bundle,
)
from hotsup.supervisor import logs
from hotsup.supervisor.logs import LogSink, RateLimit, WorkerLog

pytestmark = pytest.mark.timeout(120)

MakeHotsup = Callable[..., Hotsup]

#: A bundle whose start() launches a task that writes as fast as it can, half
#: print() and half logging records, and whose socket answers how many lines
#: it has written so far.
FLOOD_BUNDLE = textwrap.dedent("""\
    import asyncio

    class Counter:
        def __init__(self, ctx):
            self.ctx = ctx
            self.written = 0
            self.task = None

        async def start(self):
            await self.ctx.serve("main", self.handle)
            self.task = asyncio.get_running_loop().create_task(self.flood())

        async def flood(self):
            while True:
                for _ in range(200):
                    self.written += 1
                    if self.written % 2:
                        print("flood line", self.written)
                    else:
                        self.ctx.log.info("flood record %d", self.written)
                await asyncio.sleep(0)  # let the runtime answer the supervisor

        async def handle(self, reader, writer):
            await reader.readline()
            writer.write(f"written={self.written}\\n".encode())
            await writer.drain()
            writer.close()
    """)

DROPPED_LINES = r"flood@1: dropped (\d+) log line\(s\) in [\d.]+s \(more than \d+ lines/s\)"


def written(port: int) -> int:
    reply = request(port, "get")
    assert reply.startswith("written="), reply
    return int(reply.removeprefix("written="))



def last_seq(sup: Hotsup) -> int:
    done = sup.cli("logs", "--json", "-n", "1", timeout=30)
    assert done.returncode == 0, f"hotsup logs failed: {done.stderr}"
    return int(json.loads(done.stdout.splitlines()[-1])["seq"])


def add_bundles(sup: Hotsup) -> tuple[int, int]:
    flood_port, counter_port = free_port(), free_port()
    write_bundle(sup.bundles / "flood", FLOOD_BUNDLE, flood_port, module="flood")
    write_bundle(sup.bundles / "counter", counter_source("v0"), counter_port)
    return flood_port, counter_port


def swap_counter(sup: Hotsup, port: int, generation: int) -> None:
    tag = f"v{generation - 1}"
    save(sup.bundles / "counter" / "counter.py", counter_source(tag))
    wait_for(lambda: request(port, "get").endswith(f"generation={generation} tag={tag}"),
             what=f"the counter bundle's generation {generation} answering")


# -- the rate limit, with a fake clock -----------------------------------------------

class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_rate_limit_grants_the_burst_then_the_rate() -> None:
    clock = FakeClock()  # steps of 1/8 s and 1/128 s: exact in binary
    limit = RateLimit(rate=64.0, burst=50, clock=clock)
    assert limit.take(80) == 50, "the whole burst, no more"
    assert limit.take(1) == 0, "nothing left while time stands still"
    clock.now += 0.125  # 8 tokens
    assert limit.take(3) == 3
    assert limit.take(100) == 5
    assert limit.take(1) == 0
    clock.now += 60.0  # a long quiet spell saves up no more than the burst
    assert limit.take(1000) == 50
    clock.now += 1 / 128  # half a token: granted only once whole
    assert limit.take(1) == 0
    clock.now += 1 / 128
    assert limit.take(1) == 1


def test_worker_log_drops_beyond_the_limit_and_reports_the_count() -> None:
    """Frozen clock: exactly the burst is passed on; the rest is counted and
    reported once, tagged with the worker, when the pipe closes."""
    total = logs.LINE_BURST * 3
    stream = io.StringIO()
    sink = LogSink(stream)

    async def main() -> WorkerLog:
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        reader = WorkerLog(read_fd, "noisy", 3, sink, clock=FakeClock())
        data = b"".join(b"%d\n" % i for i in range(total))

        def feed() -> None:  # a pipe holds 64 KiB: the writer blocks until we read
            os.write(write_fd, data)
            os.close(write_fd)

        feeder = threading.Thread(target=feed)
        feeder.start()
        await asyncio.wait_for(reader.closed, DEADLINE)
        await asyncio.to_thread(feeder.join, DEADLINE)
        return reader

    try:
        reader = asyncio.run(main())
        records = sink.after(0, "noisy")
    finally:
        sink.close()
    lines = re.findall(r"OUTPUT  noisy@3: (\d+)", stream.getvalue())  # more than a ring
    assert lines == [str(i) for i in range(logs.LINE_BURST)], "the first lines, in order"
    assert reader.dropped == total - logs.LINE_BURST
    warnings = [r for r in records if r.level == "WARNING"]
    assert [(r.tag, r.bundle, r.generation) for r in warnings] == [("noisy@3", "noisy", 3)]
    assert re.fullmatch(rf"dropped {reader.dropped} log line\(s\) in 0\.0s "
                        rf"\(more than {logs.LINES_PER_SECOND:g} lines/s\)", warnings[0].msg)


# -- the supervisor's own stream ------------------------------------------------------

@pytest.fixture
def unread_pipe() -> Iterator[tuple[int, io.TextIOWrapper]]:
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    stream = os.fdopen(write_fd, "w")
    yield read_fd, stream
    stream.close()
    os.close(read_fd)


def drain(fd: int, into: list[bytes]) -> threading.Thread:
    def run() -> None:
        while chunk := os.read(fd, 65536):
            into.append(chunk)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_sink_never_blocks_on_a_stream_nobody_reads(
        unread_pipe: tuple[int, io.TextIOWrapper]) -> None:
    read_fd, stream = unread_pipe
    sink = LogSink(stream)
    records = 20000  # 2.6 MB: far more than the pipe and the backlog hold
    writer = threading.Thread(target=lambda: [sink.write("hotsup", "INFO", f"{i:0100d}")
                                              for i in range(records)])
    writer.start()
    writer.join(DEADLINE)
    stuck = writer.is_alive()
    received: list[bytes] = []
    reader = drain(read_fd, received)  # now unblock whatever waits on the pipe
    writer.join(DEADLINE)
    sink.close(DEADLINE)
    stream.close()
    reader.join(DEADLINE)
    assert not stuck, "LogSink.write blocked on a stream nobody read"
    assert 0 < sink.dropped_output < records
    text = b"".join(received).decode()
    numbers = [int(n) for n in re.findall(r"INFO    hotsup: (\d+)", text)]
    assert numbers == sorted(numbers), "what was written arrived in order"
    assert len(numbers) == records - sink.dropped_output
    counts = re.findall(r"WARNING hotsup: dropped (\d+) log record\(s\) from this output", text)
    assert counts and sum(map(int, counts)) == sink.dropped_output, \
        "every dropped record is counted in a summary"
    assert len(sink.after(0)) == logs.RING, "the ring still has the newest, dropped or not"


# -- real supervisors -----------------------------------------------------------------

def test_a_flooding_bundle_does_not_stall_the_supervisor(hotsup: MakeHotsup) -> None:
    sup = hotsup()
    flood_port, counter_port = add_bundles(sup)
    sup.start_serving("flood", "counter")
    # Well past the burst and a few seconds of the rate, so that an unlimited
    # pipe shows in the comparison below.
    wait_for(lambda: written(flood_port) > 300_000, 60, "the flood to get going")

    assert request(counter_port, "incr", timeout=DEADLINE).startswith("count=1 generation=1")
    swap_counter(sup, counter_port, 2)
    sup.wait_log(r"counter@2: swapped from counter@1")
    assert request(counter_port, "incr", timeout=DEADLINE).startswith("count=2 generation=2")
    states = sup.status()
    assert states["flood"]["state"] == "running" and states["counter"]["state"] == "running"
    reported = int(sup.wait_log(DROPPED_LINES))
    assert reported > 0

    total = written(flood_port)
    logged = len(re.findall(r"flood@1: flood (?:line|record) \d+", sup.log()))
    assert logged > 0
    assert logged < total / 4, f"the log kept {logged} of the {total} lines written"
    assert sup.stop() == 0
    assert not sup.leftovers()


def test_a_supervisor_whose_stderr_nobody_reads_keeps_working(
        hotsup: MakeHotsup, unread_pipe: tuple[int, io.TextIOWrapper]) -> None:
    """stderr is a pipe nobody reads while a bundle floods: the supervisor's
    loop (control requests, a swap) goes on; the stream gets what fits."""
    read_fd, stream = unread_pipe
    sup = hotsup()
    _, counter_port = add_bundles(sup)
    sup.proc = subprocess.Popen(
        [sys.executable, "-m", "hotsup.supervisor.cli", "start", str(sup.config)],
        cwd=sup.root, stdin=subprocess.DEVNULL, stdout=stream, stderr=stream,
        start_new_session=True)
    stream.close()  # the supervisor and the zygote hold it now
    wait_for(lambda: sup.cli("status", "--json", timeout=30).returncode == 0, 30,
             "the control socket")
    wait_for(lambda: {b["state"] for b in sup.status().values()} == {"running"},
             what="both bundles running")
    # Records the supervisor wrote in all: 10000 are 500 kB or more, more than
    # the pipe and the output backlog hold together, so it is dropping now.
    wait_for(lambda: last_seq(sup) > 10_000, 60, "10000 records")

    for generation in (2, 3, 4):  # each logs records that meet a full pipe
        swap_counter(sup, counter_port, generation)
        assert sup.status()["counter"]["generation"] == generation

    received: list[bytes] = []
    reader = drain(read_fd, received)
    assert sup.stop() == 0
    reader.join(DEADLINE)
    text = b"".join(received).decode(errors="replace")
    assert re.search(r"WARNING hotsup: dropped \d+ log record\(s\) from this output", text)
    assert not sup.leftovers()


@pytest.fixture(autouse=True)
def _no_leaked_threads() -> Iterator[None]:
    before = set(threading.enumerate())
    yield
    extra = [t for t in threading.enumerate() if t not in before and t.is_alive()]
    assert not extra, f"threads left running: {extra}"
