"""Memory and work bounds of the supervisor (issue 11, finding 5): what a bundle
writes to its log, what a control client asks for and never reads, how many
followers wait, cost the supervisor a bounded amount. Real supervisors; the
figures come from /proc."""

from __future__ import annotations

import json
import os
import textwrap
import time
from collections.abc import Callable

import pytest
import zmq
from harness import FIND_CHANNEL, Hotsup, free_port, request, wait_for, write_bundle
from hotsup.supervisor import logs

pytestmark = pytest.mark.timeout(120)

MakeHotsup = Callable[..., Hotsup]

MiB = 1024 * 1024


def rss(pid: int, field: str = "VmRSS") -> int:
    """Resident bytes of ``pid`` (VmRSS; VmHWM: the peak so far)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} for {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time ``pid`` used so far."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


#: A bundle that, asked with ``dump MB``, writes MB MiB to stdout without a
#: newline, then ends the line and says it is done.
DUMP_BUNDLE = textwrap.dedent("""\
    import sys

    class Counter:
        def __init__(self, ctx):
            self.ctx = ctx

        async def start(self):
            await self.ctx.serve("main", self.handle)

        async def handle(self, reader, writer):
            line = (await reader.readline()).split()
            if line[:1] == [b"dump"]:
                chunk = b"x" * (1 << 20)
                for _ in range(int(line[1])):
                    sys.stdout.buffer.write(chunk)
                sys.stdout.buffer.write(b"\\n")
                sys.stdout.flush()
                print("dump done", flush=True)
            writer.write(b"ok\\n")
            await writer.drain()
    """)


def _records(sup: Hotsup, name: str, lines: int) -> list[dict[str, object]]:
    done = sup.cli("logs", name, "--json", "-n", str(lines))
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def test_a_huge_line_is_cut_and_the_rings_stay_bounded(hotsup: MakeHotsup) -> None:
    """96 MiB with no newline: pieces of at most MAX_LINE bytes, each but the
    last marked; the supervisor keeps a few MiB of them, not the 96."""
    sup = hotsup()
    port = free_port()
    write_bundle(sup.bundles / "dump", DUMP_BUNDLE, port)
    sup.start_serving("dump")
    before = rss(sup.pid)
    assert request(port, "dump 96", timeout=60) == "ok"
    wait_for(lambda: any(r["msg"] == "dump done" for r in _records(sup, "dump", 5)), 60,
             "the dump to reach the log")
    after = rss(sup.pid)
    records = _records(sup, "dump", 400)
    pieces = [str(r["msg"]) for r in records if str(r["msg"]).startswith("xxx")]
    assert pieces, records[-3:]
    for piece in pieces[:-1]:
        assert piece.endswith(logs.CUT_MARK), piece[-100:]
        assert len(piece) == logs.MAX_LINE + len(logs.CUT_MARK)
    assert not pieces[-1].endswith(logs.CUT_MARK) and len(pieces[-1]) <= logs.MAX_LINE
    kept = sum(len(p) for p in pieces)
    assert kept <= logs.RING_BYTES, f"the bundle's ring kept {kept} bytes"
    grew = (after - before) / MiB
    print(f"supervisor RSS {before / MiB:.1f} MiB -> {after / MiB:.1f} MiB after a 96 MiB line")
    assert grew < 40, f"the supervisor grew by {grew:.0f} MiB for a 96 MiB line"
    assert sup.stop() == 0


# -- the control socket -------------------------------------------------------------

#: A bundle that logs ``lines`` records of about 1 KiB at start, then serves.
CHATTY = textwrap.dedent("""\
    class Counter:
        def __init__(self, ctx):
            self.ctx = ctx

        async def start(self):
            for i in range(3000):
                self.ctx.log.info("line %d %s", i, "y" * 1000)
            self.ctx.log.info("chatter done")
            await self.ctx.serve("main", self.handle)

        async def handle(self, reader, writer):
            writer.close()
    """)


def _endpoint_pid(sup: Hotsup) -> int:
    """The control endpoint process the supervisor started."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                cmdline = handle.read()
            with open(f"/proc/{entry}/stat") as handle:
                ppid = int(handle.read().rpartition(")")[2].split()[1])
        except OSError:
            continue
        if ppid == sup.pid and b"control_endpoint" in cmdline:
            return int(entry)
    raise AssertionError("no control endpoint process")


def _dealer(zctx: zmq.Context[zmq.Socket[bytes]], sup: Hotsup) -> zmq.Socket[bytes]:
    sock = zctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, 1)  # so that what is not read stays with the sender
    sock.setsockopt(zmq.RCVBUF, 4096)
    sock.connect(f"ipc://{sup.root / '.hotsup' / 'control'}")
    return sock


def _ask(sock: zmq.Socket[bytes], cmd: str, request_id: int, **args: object) -> None:
    sock.send(json.dumps({"v": 1, "id": request_id, "cmd": cmd, "args": args}).encode())


def test_clients_that_never_read_cannot_grow_the_supervisor(hotsup: MakeHotsup) -> None:
    """10 connections each ask for the whole log 20 times and never read a
    reply: the supervisor and its endpoint process stay within bounds, and
    status still answers."""
    sup = hotsup()
    write_bundle(sup.bundles / "chatty", CHATTY, free_port())
    sup.start_serving("chatty")
    sup.wait_log(r"chatty@1: chatter done")
    endpoint = _endpoint_pid(sup)
    before = rss(sup.pid), rss(endpoint)
    zctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    peak = [0, 0]
    try:
        socks = [_dealer(zctx, sup) for _ in range(10)]
        for i in range(20):
            for sock in socks:
                _ask(sock, "logs", i, limit=2000)
                if sup.proc is not None and sup.proc.poll() is not None:
                    break
            peak = [max(peak[0], rss(sup.pid)), max(peak[1], rss(_endpoint_pid(sup)))]
        done = wait_for(lambda: (lambda d: d if d.returncode == 0 else None)(
            sup.cli("status", "--json")), what="status answered")
        assert '"chatty"' in str(getattr(done, "stdout", ""))
        peak = [max(peak[0], rss(sup.pid)), max(peak[1], rss(_endpoint_pid(sup)))]
    finally:
        zctx.destroy(linger=0)
    print(f"supervisor RSS {before[0] / MiB:.0f} -> peak {peak[0] / MiB:.0f} MiB, control "
          f"endpoint {before[1] / MiB:.0f} -> peak {peak[1] / MiB:.0f} MiB, after 200 logs "
          f"requests never read")
    assert peak[0] - before[0] < 48 * MiB
    assert peak[1] < 90 * MiB
    assert sup.stop() == 0


def test_many_followers_do_not_lock_out_status(hotsup: MakeHotsup) -> None:
    """200 ``logs --follow`` long polls at once: ``status`` is answered at
    once all the same, and the polls beyond the bound are answered early, the
    oldest first, with nothing new (their clients ask again)."""
    sup = hotsup()
    write_bundle(sup.bundles / "counter", DUMP_BUNDLE, free_port())
    sup.start_serving("counter")
    last = json.loads(sup.cli("logs", "--json", "-n", "1").stdout.splitlines()[-1])["seq"]
    zctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        socks = [_dealer(zctx, sup) for _ in range(200)]
        for i, sock in enumerate(socks):
            _ask(sock, "logs", i, name="counter", after=last + 10_000, wait=5.0)
        started = time.monotonic()
        done = sup.cli("status", "--json")
        took = time.monotonic() - started
        assert done.returncode == 0, done.stderr
        print(f"status answered in {took:.2f}s beside 200 long polls")
        assert took < 4.0
        first = socks[0]
        assert first.poll(3000), "the oldest poll was answered early"
        reply = json.loads(first.recv())
        assert reply["ok"] and reply["result"]["records"] == [], reply
        assert reply["result"]["last"] == last + 10_000
    finally:
        zctx.destroy(linger=0)
    assert sup.stop() == 0


# -- the worker channel ---------------------------------------------------------------

#: A bundle that, asked with ``flood N``, sends N malformed packets and eight
#: announced 250 MB payloads (sparse memfds: they cost the worker nothing) on
#: its own channel to the supervisor.
CHANNEL_FLOOD = FIND_CHANNEL + textwrap.dedent("""\

    class Counter:
        def __init__(self, ctx):
            self.ctx = ctx

        async def start(self):
            await self.ctx.serve("main", self.handle)

        async def handle(self, reader, writer):
            count = int((await reader.readline()).split()[1])
            sock = channel()
            sock.setblocking(True)
            big = os.memfd_create("big", os.MFD_ALLOW_SEALING)
            os.ftruncate(big, 250 << 20)
            fcntl.fcntl(big, fcntl.F_ADD_SEALS,
                        fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK)
            for _ in range(8):
                socket.send_fds(sock, [b'{"v":1,"op":"reply","id":1,"ok":true,"payload":%d}'
                                       % (250 << 20)], [big])
            for i in range(count):
                sock.send(b"garbage %d" % i)
            sock.setblocking(False)  # the runtime's own channel shares the flag
            writer.write(b"flooded\\n")
            await writer.drain()
    """)


PACKETS = 50_000


def test_a_flood_on_a_worker_channel_costs_bounded_cpu_memory_and_log(hotsup: MakeHotsup) -> None:
    sup = hotsup()
    port = free_port()
    write_bundle(sup.bundles / "flood", CHANNEL_FLOOD, port)
    sup.start_serving("flood")
    before_cpu, before_rss = cpu_seconds(sup.pid), rss(sup.pid, "VmHWM")
    started = time.monotonic()
    assert request(port, f"flood {PACKETS}", timeout=60) == "flooded"
    took = time.monotonic() - started
    done = sup.cli("status", "--json")
    assert done.returncode == 0, done.stderr
    cpu = cpu_seconds(sup.pid) - before_cpu
    grew = (rss(sup.pid, "VmHWM") - before_rss) / MiB
    warnings = sup.log().count("WARNING hotsup: ")
    print(f"{PACKETS} malformed packets and 8 x 250 MB payloads in {took:.1f}s: supervisor "
          f"CPU {cpu:.2f}s ({cpu / PACKETS * 1e6:.0f} us a packet), peak RSS +{grew:.1f} MiB, "
          f"{warnings} warning line(s)")
    assert warnings <= 10, "rate-limited: 5 per 10 s"
    assert grew < 16, "nothing of it is buffered"
    assert cpu / PACKETS < 100e-6, "a bounded cost per packet, whatever is in it"
    assert sup.stop() == 0
