"""Fault injection (issue 4): each fault against a real supervisor, under load.

Every test starts a real ``hotsup start``, injects one fault into a bundle (a
code fragment through ``counter_source``, a signal, a file on disk) and checks
what the issue promises: the requests that should not fail did not, the state
carried (nothing lost beyond the last checkpoint), ``hotsup status --json``
and the log say what happened, and nothing of the supervisor's session is left
once it stopped.

A fault that must strike at a moment the test chooses is armed: the bundle
serves a second socket, "admin", whose connection handler faults when a client
sends it a line. A restarted generation is armed again, but nobody pokes it.
"""

from __future__ import annotations

import collections
import contextlib
import os
import pickle
import re
import signal
import socket
import textwrap
import time
from collections.abc import Callable
from typing import Any

import pytest
from harness import (
    Hotsup,
    Load,
    Reply,
    counter_source,
    free_port,
    idle_client,
    port_open,
    request,
    save,
    session_pids,
    wait_for,
    write_bundle,
)
from hotsup.supervisor.checkpoint import CheckpointStore
from hotsup.supervisor.swap import Timings

STOP_GRACE = Timings().grace

pytestmark = pytest.mark.timeout(120)

MakeHotsup = Callable[..., Hotsup]

CHECKPOINT_WRITTEN = r"{tag}: checkpoint of \d+ bytes written"


# -- helpers ----------------------------------------------------------------------

def armed(tag: str, fault: str) -> str:
    """A counter module that also serves the socket "admin", whose connection
    handler runs ``fault`` (one line) once it read a line."""
    tail = textwrap.dedent("""
        import ctypes, os, sys, time


        async def fault(reader, writer):
            await reader.readline()
            {fault}
        """).format(fault=fault)
    return counter_source(tag, start="await self.ctx.serve('admin', fault)", tail=tail)


def admin_socket(port: int) -> str:
    """bundle.toml lines for the "admin" socket of an ``armed`` bundle."""
    return f'[sockets.admin]\nbind = "127.0.0.1:{port}"\n'


def strike(port: int) -> None:
    """Make an ``armed`` bundle listening on ``port`` fault."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"go\n")


def with_stop(source: str, body: str) -> str:
    """A counter module with a ``stop()`` hook running ``body`` (one line)."""
    hook = f"\n    async def stop(self):\n        {body}\n"
    return source.replace("\n    async def start(self):", hook + "\n    async def start(self):")


def start_bundle(sup: Hotsup, name: str, source: str, port: int | None = None,
                 extra: str = "") -> int:
    port = port or free_port()
    write_bundle(sup.bundles / name, source, port, module=name, extra=extra)
    return port



def wait_checkpoint(sup: Hotsup, tag: str) -> None:
    """Wait for a checkpoint certainly taken after everything done so far: the
    one being written when we look may hold an older snapshot, the next cannot."""
    pattern = CHECKPOINT_WRITTEN.format(tag=re.escape(tag))
    seen = len(re.findall(pattern, sup.log()))
    sup.wait_log(pattern, count=seen + 2)


def alive(sup: Hotsup, pid: int) -> bool:
    return pid in session_pids(sup.pid)


def finish(sup: Hotsup, code: int = 0) -> None:
    """SIGTERM: exit ``code`` (0: clean), and not one process of the session left."""
    assert sup.stop() == code
    assert sup.leftovers() == []


def again(hotsup: MakeHotsup, sup: Hotsup, name: str, config_extra: str = "") -> Hotsup:
    """Another supervisor over the same directory and run_dir, logging to its own file."""
    following = hotsup(config_extra)
    following.log_path = sup.root / f"{name}.log"
    return following.start()


def counts(replies: list[Reply]) -> list[int]:
    return sorted(r.count for r in replies)


# -- 1. crashes while serving -----------------------------------------------------------

CRASHES: dict[str, tuple[str | None, str]] = {
    # fault (None: SIGKILL from outside) -> how the log describes the exit
    "sys.exit() in a handler": ("sys.exit(3)", r"exited with code \d+"),
    "os._exit": ("os._exit(1)", r"exited with code 1"),
    "SIGKILL from outside": (None, r"was killed by SIGKILL"),
    "segfault": ("ctypes.string_at(0)", r"was killed by SIGSEGV"),
}


@pytest.mark.parametrize("crash", list(CRASHES))
def test_a_crash_restarts_from_the_last_checkpoint(hotsup: MakeHotsup, crash: str) -> None:
    fault, how = CRASHES[crash]
    sup = hotsup("[defaults]\ncheckpoint_interval = 0.2\n")
    admin = free_port()
    port = start_bundle(sup, "counter", armed("v0", fault or "pass"),
                        extra=admin_socket(admin))
    sup.start_serving("counter")
    with Load(port, clients=3) as load:
        load.wait_reply(lambda r: r.count >= 30)
    load.assert_consistent()
    served = len(load.replies)
    wait_checkpoint(sup, "counter@1")
    pid = sup.status()["counter"]["pid"]

    if fault is None:
        os.kill(pid, signal.SIGKILL)
    else:
        strike(admin)
    line = sup.wait_log(r"counter: counter@1 (.*) while serving; restarting in [\d.]+s")
    assert re.fullmatch(how, line), line
    sup.wait_log(r"counter@2: serving")
    # Nothing lost beyond the last checkpoint, which came after the last request.
    assert request(port, "get") == f"count={served} generation=2 tag=v0"
    assert request(port) == f"count={served + 1} generation=2 tag=v0"
    wait_for(lambda: not alive(sup, pid), what="the crashed worker to be gone")

    now = sup.status()["counter"]
    assert (now["state"], now["generation"], now["restarts"]) == ("running", 2, 1)
    assert now["pid"] != pid
    assert re.search(f"counter@1 {how} while serving", now["last_error"]), now["last_error"]
    finish(sup)


def test_sys_exit_in_a_bundle_is_reported_with_its_own_code(hotsup: MakeHotsup) -> None:
    sup = hotsup()
    admin = free_port()
    start_bundle(sup, "counter", armed("v0", "sys.exit(3)"),
                 extra=admin_socket(admin))
    sup.start_serving("counter")
    strike(admin)
    line = sup.wait_log(r"counter: (counter@1 .*) while serving")
    sup.wait_log(r"counter@2: serving")
    finish(sup)
    assert line == "counter@1 exited with code 3", line


# -- 2. restart intensity ---------------------------------------------------------------

def test_a_crash_loop_gives_up_and_the_other_bundles_serve_on(hotsup: MakeHotsup) -> None:
    sup = hotsup("[defaults]\nmax_restarts = 2\nrestart_window = 60\n")
    poison = sup.root / "poison"
    # While the poison file exists, every start-up of "flaky" crashes.
    crash_if_poisoned = (f"__import__('os').path.exists({str(poison)!r}) "
                         f"and __import__('os')._exit(1)")
    steady = start_bundle(sup, "steady", counter_source("s0"))
    flaky = start_bundle(sup, "flaky", counter_source("f0", start=crash_if_poisoned))
    sup.start_serving("steady", "flaky")

    with Load(steady, clients=3) as load:
        load.wait_reply(lambda r: True)
        for round_ in (1, 2):
            poison.touch()
            os.kill(sup.status()["flaky"]["pid"], signal.SIGKILL)
            line = sup.wait_log(r"flaky: (.*3 failures within 60s, giving up until the files "
                                r"change or `hotsup run flaky`)", count=round_)
            assert "did not start" in line and "exited with code 1" in line, line
            gave_up = time.monotonic()
            now = sup.status()["flaky"]
            assert (now["state"], now["pid"]) == ("failed", None), now
            assert now["last_error"] == line
            assert not port_open(flaky), "a failed bundle refuses clients rather than queue them"
            load.wait_reply(lambda r: True, after=gave_up)  # steady never noticed
            poison.unlink()
            if round_ == 1:  # the fault is gone: the operator brings it back
                done = sup.cli("run", "flaky")
                assert done.returncode == 0, done.stdout + done.stderr
            else:  # or a file change does
                save(sup.bundles / "flaky" / "flaky.py", counter_source("f1"))
            wait_for(lambda: port_open(flaky), what="flaky to serve again")
            assert request(flaky, "get").endswith(f"tag=f{round_ - 1}")
            assert sup.status()["flaky"]["state"] == "running"
            load.wait_reply(lambda r: True, after=time.monotonic())
    load.assert_consistent()
    assert {r.tag for r in load.replies} == {"s0"}
    finish(sup)


# -- 3. checkpoints on disk -------------------------------------------------------------

def test_the_shutdown_checkpoint_is_resumed_and_a_tampered_one_refused(
    hotsup: MakeHotsup,
) -> None:
    sup = hotsup()
    port = start_bundle(sup, "counter", counter_source("v0"))
    sup.start_serving("counter")
    with Load(port, clients=3) as load:
        load.wait_reply(lambda r: r.count >= 20)
    load.assert_consistent()
    served = len(load.replies)
    finish(sup)

    directory = sup.root / ".hotsup" / "checkpoints"
    checkpoint = directory / "counter.ckpt"
    assert directory.stat().st_mode & 0o777 == 0o700
    assert checkpoint.stat().st_mode & 0o777 == 0o600
    assert (directory / "key").stat().st_mode & 0o777 == 0o600

    second = again(hotsup, sup, "second")
    second.wait_log(r"counter: resuming from the checkpoint of generation 1 ")
    second.wait_log(r"counter@2: serving")  # numbers go on across runs
    assert request(port, "get") == f"count={served} generation=2 tag=v0"
    finish(second)

    data = bytearray(checkpoint.read_bytes())
    data[-33] ^= 0x01  # the payload's last byte, just before the 32-byte MAC
    checkpoint.write_bytes(bytes(data))
    third = again(hotsup, sup, "third")
    line = third.wait_log(r"counter: (checkpoint .*); starting without it")
    assert str(checkpoint) in line and "authentication failed" in line, line
    third.wait_log(r"counter@3: serving")
    assert request(port, "get") == "count=0 generation=3 tag=v0"
    assert third.status()["counter"]["state"] == "running"
    finish(third)


# -- 4. the supervisor's death ---------------------------------------------------------

def test_after_a_sigkill_of_the_supervisor_the_next_one_resumes_the_checkpoint(
    hotsup: MakeHotsup,
) -> None:
    """tests/test_lifecycle.py proves nothing is left; this one, that no state is
    lost beyond the last periodic checkpoint."""
    sup = hotsup("[defaults]\ncheckpoint_interval = 0.2\n")
    port = start_bundle(sup, "counter", counter_source("v0"))
    sup.start_serving("counter")
    with Load(port, clients=3, timeout=5.0) as load:
        load.wait_reply(lambda r: r.count >= 30)
        wait_checkpoint(sup, "counter@1")
        sup.signal(signal.SIGKILL)  # under load
        assert sup.proc is not None and sup.proc.wait(10) == -signal.SIGKILL
        wait_for(lambda: sup.leftovers() == [], 2.0, "the zygote and workers to exit")
    served = max(r.count for r in load.replies)

    found = CheckpointStore(sup.root / ".hotsup").load("counter")
    assert found is not None
    kept = pickle.loads(found.payload)["count"]
    assert 30 <= kept <= served

    second = again(hotsup, sup, "second")
    second.wait_log(r"counter: resuming from the checkpoint of generation 1 ")
    second.wait_log(r"counter@2: serving")
    assert request(port, "get") == f"count={kept} generation=2 tag=v0"
    finish(second)


# -- 5. stubborn workers ---------------------------------------------------------------

IGNORE_SIGTERM = "import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN)"

STUBBORN: dict[str, dict[str, Any]] = {
    "stop() hangs": dict(
        old=with_stop(counter_source("v0"), "await asyncio.sleep(3600)"),
        new=counter_source("v1"),
        says=[r"counter@1: still running after retiring; killing it"]),
    "SIGTERM ignored": dict(
        old=counter_source("v0", start=IGNORE_SIGTERM),
        new=counter_source("v1", start=IGNORE_SIGTERM),
        says=[]),
    "a connection never drains": dict(
        old=counter_source("v0", hooks=False),
        new=counter_source("v1", hooks=False),
        hold=True,
        says=[r"drain_timeout \(0.5s\) passed: cut 1 connection\(s\)"]),
}


@pytest.mark.parametrize("stubborn", list(STUBBORN))
def test_a_stubborn_old_generation_is_gone_by_its_deadline(hotsup: MakeHotsup,
                                                           stubborn: str) -> None:
    case = STUBBORN[stubborn]
    drain = 0.5
    sup = hotsup(f"[defaults]\ndrain_timeout = {drain}\nprobation = 0\n")
    port = start_bundle(sup, "counter", case["old"])
    sup.start_serving("counter")
    old = sup.status()["counter"]["pid"]
    holding = case.get("hold", False)
    with Load(port, clients=3) as load, contextlib.ExitStack() as stack:
        held = stack.enter_context(idle_client(port)) if holding else None
        load.wait_reply(lambda r: r.tag == "v0")
        save(sup.bundles / "counter" / "counter.py", case["new"])
        swapped = time.monotonic()
        load.wait_reply(lambda r: r.tag == "v1", after=swapped)
        # Its deadline: drain_timeout for its connections, STOP_GRACE for stop(),
        # STOP_GRACE to exit; then SIGKILL. A loose bound: a busy machine is slow.
        wait_for(lambda: not alive(sup, old), drain + 2 * STOP_GRACE + 10,
                 "the old generation to be gone")
        sup.wait_log(r"counter@1: retired")
        load.wait_reply(lambda r: r.tag == "v1", after=time.monotonic())
        if held is not None:
            held.settimeout(10)
            assert held.recv(100) == b"", "the held connection was cut, not left hanging"
    assert not load.failures, load.failures[:5]
    if not holding:  # overlap mode (no state hooks) carries no count
        load.assert_consistent()
    for pattern in case["says"]:
        sup.wait_log(pattern)
    finish(sup)


# -- 6. bad inputs at run time ---------------------------------------------------------

def test_a_bundle_copied_file_by_file_starts_once_complete(hotsup: MakeHotsup) -> None:
    sup = hotsup()
    steady = start_bundle(sup, "steady", counter_source("s0"))
    sup.start_serving("steady")
    late = sup.bundles / "late"
    port = free_port()
    staged = write_bundle(sup.root / "staging" / "late", counter_source("l0"), port, "late")
    source = (staged / "late.py").read_text()
    with Load(steady, clients=3) as load:
        load.wait_reply(lambda r: True)
        late.mkdir()
        (late / "bundle.toml").write_bytes((staged / "bundle.toml").read_bytes())
        line = sup.wait_log(r"late: (cannot load the bundle: .*)")
        assert "late/bundle.toml" in line and "'late' not found" in line, line
        with (late / "late.py").open("w") as module:  # half a file, then the rest
            module.write(source[:len(source) // 2])
            module.flush()
            sup.wait_log(r"late: late@\d+ did not start: .*")
            module.write(source[len(source) // 2:])
        sup.wait_log(r"late@\d+: serving")
        assert request(port).startswith("count=1 generation=")
        load.wait_reply(lambda r: True, after=time.monotonic())
    load.assert_consistent()
    assert sup.status()["late"]["state"] == "running"
    finish(sup)


def test_a_garbage_manifest_is_refused_and_the_old_generation_serves(
    hotsup: MakeHotsup,
) -> None:
    sup = hotsup()
    port = start_bundle(sup, "counter", counter_source("v0"))
    manifest = sup.bundles / "counter" / "bundle.toml"
    good = manifest.read_text()
    sup.start_serving("counter")
    with Load(port, clients=3) as load:
        load.wait_reply(lambda r: True)
        save(manifest, "entry = [this is not toml\n\x00\xff")
        line = sup.wait_log(r"counter: (cannot load the bundle: .*)")
        assert "counter/bundle.toml" in line and "not valid TOML" in line, line
        load.wait_reply(lambda r: r.generation == 1, after=time.monotonic())
        now = sup.status()["counter"]
        assert (now["state"], now["generation"]) == ("running", 1)
        assert "bundle.toml" in now["last_error"], now["last_error"]
        save(manifest, good.replace('version = "1.0"', 'version = "1.1"'))
        load.wait_reply(lambda r: r.generation == 2, after=time.monotonic())
    load.assert_consistent()
    assert sup.status()["counter"]["version"] == "1.1"
    finish(sup)


BAD_SNAPSHOTS: dict[str, tuple[str, str]] = {
    # tail redefining snapshot() -> what last_error says
    "a lambda": ("Counter.snapshot = lambda self: {'count': self.count, 'f': lambda: 0}",
                 "cannot be pickled"),
    "a socket": ("import socket\nCounter.snapshot = lambda self: socket.socket()",
                 "cannot be pickled"),
    "too large": ("Counter.snapshot = lambda self: {'count': self.count, 'pad': b'x' * 4096}",
                  "more than max_snapshot_bytes (1024)"),
}


@pytest.mark.parametrize("bad", list(BAD_SNAPSHOTS))
def test_a_snapshot_that_cannot_be_handed_over_rolls_the_swap_back(hotsup: MakeHotsup,
                                                                   bad: str) -> None:
    tail, says = BAD_SNAPSHOTS[bad]
    sup = hotsup("[defaults]\nmax_snapshot_bytes = 1024\n")
    port = start_bundle(sup, "counter", counter_source("v0", tail="\n" + tail + "\n"))
    sup.start_serving("counter")
    pid = sup.status()["counter"]["pid"]
    with Load(port, clients=3) as load:
        load.wait_reply(lambda r: True)
        save(sup.bundles / "counter" / "counter.py", counter_source("v1"))
        line = sup.wait_log(r"swap to counter@2 rolled back, counter@1 keeps serving: (.*)")
        assert says in line, line
        load.wait_reply(lambda r: True, after=time.monotonic())
    load.assert_consistent()
    assert {(r.tag, r.generation) for r in load.replies} == {("v0", 1)}
    now = sup.status()["counter"]
    assert (now["state"], now["generation"], now["pid"]) == ("running", 1, pid)
    assert says in now["last_error"], now["last_error"]
    # Its shut-down snapshot fails the same way: the state is lost, and said.
    finish(sup, code=1)
    assert "the final snapshot of counter@1 was not taken" in sup.log()


def test_a_blocked_event_loop_is_killed_and_restarted(hotsup: MakeHotsup) -> None:
    sup = hotsup("[defaults]\nping_interval = 0.2\nping_timeout = 1.0\n")
    admin = free_port()
    port = start_bundle(sup, "counter", armed("v0", "time.sleep(60)"),
                        extra=admin_socket(admin))
    sup.start_serving("counter")
    pid = sup.status()["counter"]["pid"]
    assert request(port) == "count=1 generation=1 tag=v0"
    strike(admin)  # a handler that blocks the loop
    sup.wait_log(r"counter@1: did not answer a ping within 1s \(its event loop is blocked\) "
                 r"and was killed")
    sup.wait_log(r"counter@1 did not answer a ping .* while serving; restarting in")
    sup.wait_log(r"counter@2: serving")
    assert request(port).endswith("generation=2 tag=v0")
    wait_for(lambda: not alive(sup, pid), what="the hung worker to be gone")
    now = sup.status()["counter"]
    assert (now["state"], now["generation"], now["restarts"]) == ("running", 2, 1)
    assert "did not answer a ping" in now["last_error"], now["last_error"]
    finish(sup)


# -- 7. probation -------------------------------------------------------------------

CRASH_SOON = "import os; asyncio.get_running_loop().call_later(0.5, os._exit, 1)"


def test_a_generation_dying_on_probation_hands_back_to_the_old_one(hotsup: MakeHotsup) -> None:
    sup = hotsup("[defaults]\nprobation = 3\n")
    port = start_bundle(sup, "counter", counter_source("v0"))
    other = start_bundle(sup, "other", counter_source("o0"))
    sup.start_serving("counter", "other")
    old = sup.status()["counter"]["pid"]
    bad = counter_source("v1", start=CRASH_SOON)
    with Load(port, clients=3) as load:
        load.wait_reply(lambda r: True)
        save(sup.bundles / "counter" / "counter.py", bad)
        sup.wait_log(r"counter@2: swapped from counter@1")
        line = sup.wait_log(r"counter: (counter@2 exited with code 1 while serving, on "
                            r"probation: swap rolled back, counter@1 serves again.*)")
        load.wait_reply(lambda r: r.generation == 1, after=time.monotonic())
    # A process that dies takes the connections it had accepted with it: at
    # most the one request each client had in flight. Nothing queued is lost.
    per_client = collections.Counter(f.split(":")[0] for f in load.failures)
    assert all(n == 1 for n in per_client.values()), load.failures
    # The reset shows as ECONNRESET, as an empty reply, or (when it came
    # before the client's shutdown(SHUT_WR)) as ENOTCONN.
    assert all(re.search(r"Connection reset|bad reply ''|Transport endpoint is not connected",
                         f) for f in load.failures), load.failures
    # The old generation went on from its own state (the new one's increments
    # were never checkpointed): each generation counted on from the hand-over.
    first = [r for r in load.replies if r.generation == 1]
    second = [r for r in load.replies if r.generation == 2]
    assert counts(first) == list(range(1, len(first) + 1))
    handed = min(r.count for r in second) - 1 if second else 0
    assert counts(second) == list(range(handed + 1, handed + len(second) + 1))
    assert {r.tag for r in first} == {"v0"} and {r.tag for r in second} <= {"v1"}

    now = sup.status()["counter"]
    assert (now["state"], now["generation"], now["pid"]) == ("running", 1, old)
    assert "on probation: swap rolled back" in now["last_error"], now["last_error"]
    assert now["last_error"] == line

    # The same content is not tried again: not on an event for the same bytes,
    # and not by itself while the watcher handles another bundle's change.
    save(sup.bundles / "counter" / "counter.py", bad)
    save(sup.bundles / "other" / "other.py", counter_source("o1"))
    sup.wait_log(r"other@2: swapped from other@1")
    assert request(other).endswith("generation=2 tag=o1")
    assert "counter@3" not in sup.log()
    assert sup.status()["counter"]["generation"] == 1
    assert request(port).endswith("generation=1 tag=v0")
    finish(sup)


def test_without_probation_the_old_generation_retires_at_once(hotsup: MakeHotsup) -> None:
    """probation = 0: nothing is held, so a new generation that dies 0.5 s after
    the swap is a plain crash, restarted from the state handed over."""
    sup = hotsup("[defaults]\nprobation = 0\n")
    port = start_bundle(sup, "counter", counter_source("v0"))
    sup.start_serving("counter")
    old = sup.status()["counter"]["pid"]
    for _ in range(5):
        request(port)
    once = sup.root / "crashed-once"
    crash_once = (f"import os; os.path.exists({str(once)!r}) or asyncio.get_running_loop()"
                  f".call_later(0.5, lambda: (open({str(once)!r}, 'w').close(), os._exit(1)))")
    save(sup.bundles / "counter" / "counter.py", counter_source("v1", start=crash_once))
    sup.wait_log(r"counter@2: swapped from counter@1")
    line = sup.wait_log(r"counter: (counter@2 exited with code 1 while serving.*)")
    assert "restarting in" in line and "probation" not in line, line
    sup.wait_log(r"counter@1: retired")
    sup.wait_log(r"counter@3: serving")
    assert not alive(sup, old)
    # restarted from the state handed over at the swap, the last checkpoint
    assert request(port, "get") == "count=5 generation=3 tag=v1"
    now = sup.status()["counter"]
    assert (now["state"], now["generation"], now["restarts"]) == ("running", 3, 1)
    assert "on probation" not in now["last_error"]
    finish(sup)
