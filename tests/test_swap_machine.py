"""The swap state machine (supervisor/swap.py) driven with fake workers.

No process, no socket, no real waiting: each fake generation follows a script,
and the tests read the order of requests each generation received.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hotsup.supervisor import generation
from hotsup.supervisor.checkpoint import CheckpointError, CheckpointStore
from hotsup.supervisor.config import BundleSource, BundleSpec, load_config
from hotsup.supervisor.generation import GenState, IllegalMove
from hotsup.supervisor.process import WorkerError, WorkerReply
from hotsup.supervisor.sockets import SocketRegistry
from hotsup.supervisor.swap import BundleRunner, BundleState, Services, Timings

pytestmark = pytest.mark.timeout(10)


@dataclass
class Script:
    """How one fake generation behaves."""

    hooks: bool = True
    load_error: str | None = None
    fail: dict[str, str] = field(default_factory=dict)  # op -> error message
    hang: set[str] = field(default_factory=set)  # ops that never answer
    exit_after: set[str] = field(default_factory=set)  # ops answered, then the process dies
    hold_close: bool = False  # close() waits for `released` (its log pipe still draining)
    busy: int = 0  # this many pauses find connections still in flight
    swallow: set[str] = field(default_factory=set)  # ops that swallow one cancellation


class FakeWorker:
    def __init__(self, number: int, script: Script,
                 journal: list[tuple[int, str]] | None = None) -> None:
        self.number = number
        self.script = script
        self.journal = journal if journal is not None else []  # every worker's calls, in order
        self.pid: int | None = 10_000 + number
        self.log_dropped = 0
        self.pss_kib: int | None = None
        self.exited: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.calls: list[str] = []
        self.restored: bytes | None = None
        self.killed = False
        self.closing = False
        self.released = asyncio.Event()

    async def wait_loaded(self, timeout: float) -> dict[str, Any]:
        if self.script.load_error:
            raise WorkerError(self.script.load_error)
        hooks = self.script.hooks
        return {"hooks": {"snapshot": hooks, "restore": hooks, "stop": False}}

    async def call(self, op: str, timeout: float, payload: bytes | None = None,
                   **fields: Any) -> tuple[dict[str, Any], bytes | None]:
        self.calls.append(op)
        self.journal.append((self.number, op))
        await asyncio.sleep(0)  # as a real request does: other tasks run meanwhile
        if op in self.script.hang:  # what the real call says once its deadline passed
            await asyncio.sleep(0)
            raise WorkerError(f"{op}: no answer within {timeout:g}s")
        if op in self.script.fail:
            raise WorkerError(f"{op}: {self.script.fail[op]}")
        if op in self.script.swallow:
            # As Python 3.11's wait_for may, when what it waits for ends as
            # the cancellation comes: the caller goes on, and waits again.
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(30)
            await asyncio.sleep(30)
        if op == "pause" and self.script.busy > 0:
            self.script.busy -= 1
            raise WorkerError("pause: Busy: 1 connection(s) still in flight", kind="Busy")
        if op == "start":
            self.restored = payload
        if op == "retire" or op in self.script.exit_after:
            self.crash()
        if op == "resume":
            self.restored = payload or self.restored
        snapshots = op in ("pause", "snapshot") or (op == "retire" and fields.get("snapshot"))
        data = f"state of {self.number}".encode() if snapshots else None
        return {"ok": True}, data

    async def request(self, op: str, timeout: float, payload: bytes | None = None,
                      fds: Sequence[int] = (), **fields: Any) -> WorkerReply:
        header, data = await self.call(op, timeout, payload, **fields)
        return WorkerReply(header, data, ())

    def crash(self) -> None:
        if not self.exited.done():
            self.exited.set_result(None)

    def kill(self) -> None:
        self.killed = True
        self.crash()

    async def wait_exit(self, timeout: float) -> bool:
        return self.exited.done()

    async def describe_exit(self) -> str:
        return "was killed by SIGKILL" if self.killed else "exited with code 1"

    async def close(self) -> None:
        self.closing = True
        if self.script.hold_close:
            await self.released.wait()


class World:
    """A runner over a real (tiny) config, with fake workers and a fake digest."""

    def __init__(self, tmp_path: Path, defaults: str = "",
                 store: CheckpointStore | None = None, timings: Timings | None = None) -> None:
        bundle = tmp_path / "bundles" / "b"
        bundle.mkdir(parents=True)
        (bundle / "bundle.toml").write_text(
            'entry = "app:App"\n[sockets.main]\nbind = "127.0.0.1:0"\n')
        (bundle / "app.py").write_text("class App: pass\n")
        if "start_timeout" not in defaults:
            defaults += "start_timeout = 0.2\n"
        for key in ("probation", "ping_interval"):  # off unless a test is about them
            if key not in defaults:
                defaults += f"{key} = 0\n"
        (tmp_path / "config.toml").write_text(f"[defaults]\n{defaults}")
        self.config = load_config(tmp_path / "config.toml")
        self.content = "v1"
        self.digests = 0  # passes that looked at the content
        self.scripts: dict[int, Script] = {}
        self.workers: dict[int, FakeWorker] = {}
        self.journal: list[tuple[int, str]] = []  # (generation, op) of every call, in order
        self.gate: asyncio.Event | None = None  # holds every spawn while set to an Event
        self.sockets = SocketRegistry()
        services = Services(self.config, self.sockets, self._spawn, self._digest, store,
                            timings or Timings())
        self.runner = BundleRunner(BundleSource("b", bundle), services)

    async def _spawn(self, spec: BundleSpec, number: int,
                     sockets: dict[str, socket.socket]) -> FakeWorker:
        if self.gate is not None:
            await self.gate.wait()
        worker = FakeWorker(number, self.scripts.get(number, Script()), self.journal)
        self.workers[number] = worker
        return worker

    async def _digest(self, source: BundleSource) -> str | None:
        self.digests += 1
        return self.content

    def change(self, content: str, script: Script | None = None) -> None:
        """The files now hold ``content``; the next generation follows ``script``."""
        self.content = content
        if script is not None:
            self.scripts[len(self.workers) + 1] = script
        self.runner.request()


@pytest.fixture
def store(tmp_path: Path) -> CheckpointStore:
    """A checkpoint store in tmp_path/run, as the supervisor makes one."""
    (tmp_path / "run").mkdir()
    return CheckpointStore(tmp_path / "run")


async def until(condition: Callable[[], object], what: str = "") -> None:
    """Let the runner's task run until ``condition`` holds (a deadline, not a sleep)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5.0
    while not condition():
        assert loop.time() < deadline, f"never happened: {what}"
        await asyncio.sleep(0.001)


#: Crash restarts without a backoff, busy hand-overs retried at once.
QUICK = Timings(backoff_first=0.0, busy_retry_first=0.01)


def run(test: Callable[[World], Coroutine[Any, Any, None]], tmp_path: Path,
        defaults: str = "", store: CheckpointStore | None = None,
        timings: Timings | None = None) -> None:
    async def main() -> None:
        world = World(tmp_path, defaults, store, timings)
        world.runner.start()
        try:
            await test(world)
        finally:
            await world.runner.close()

    errors = _SwapLoopErrors()
    logging.getLogger("hotsup").addHandler(errors)
    try:
        asyncio.run(main())
    finally:
        logging.getLogger("hotsup").removeHandler(errors)
    assert not errors.seen, f"the swap loop met a bug: {errors.seen}"


class _SwapLoopErrors(logging.Handler):
    """Records of 'internal error in the swap loop': an illegal move, say."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "internal error in the swap loop" in record.getMessage():
            self.seen.append(self.format(record))


def kept_of(world: World) -> int | None:
    """The generation whose state the runner holds as the newest."""
    kept = world.runner._kept
    return kept.generation if kept is not None else None


def serving(world: World, number: int) -> Callable[[], bool]:
    runner = world.runner
    return lambda: (runner.current is not None and runner.current.number == number
                    and runner.state is BundleState.RUNNING)


def test_first_start_then_hand_over(tmp_path: Path) -> None:
    async def test(world: World) -> None:
        await until(serving(world, 1), "generation 1 serving")
        first = world.workers[1]
        assert first.calls == ["start"] and first.restored is None
        world.change("v2")
        await until(serving(world, 2), "generation 2 serving")
        await until(lambda: first.exited.done(), "generation 1 retired")
        assert first.calls == ["start", "pause", "retire"]
        assert world.workers[2].restored == b"state of 1"
        status = world.runner.status()
        assert {k: status[k] for k in ("name", "state", "generation", "pid", "restarts",
                                       "version", "last_error", "swaps")} == {
            "name": "b", "state": "running", "generation": 2, "pid": 10_002, "restarts": 0,
            "version": "", "last_error": None, "swaps": 1}
        assert status["last_pause_ms"] is not None and status["last_swap_ms"] is not None
        assert len(status["sockets"]) == 1
    run(test, tmp_path)


def test_overlap_mode_takes_no_snapshot_and_waits_for_nothing(tmp_path: Path) -> None:
    async def test(world: World) -> None:
        world.scripts[1] = Script(hooks=False)
        await until(serving(world, 1))
        world.change("v2", Script(hooks=False))
        await until(serving(world, 2))
        await until(lambda: world.workers[1].exited.done())
        # Its one pause comes once its successor serves: it lets go of its
        # idle connections, without waiting for the rest.
        assert world.workers[1].calls == ["start", "pause", "retire"]
        assert world.workers[2].restored is None
        assert world.runner.last_pause_ms == 0.0
    run(test, tmp_path)


@pytest.mark.parametrize(("script", "old_calls"), [
    (Script(load_error="SyntaxError: invalid syntax"), ["start"]),
    (Script(fail={"start": "RuntimeError: boom"}), ["start", "pause", "resume"]),
    (Script(hang={"start"}), ["start", "pause", "resume"]),
])
def test_a_failed_successor_is_killed_and_the_old_one_resumes(
    tmp_path: Path, script: Script, old_calls: list[str]
) -> None:
    async def test(world: World) -> None:
        await until(serving(world, 1))
        world.change("v2", script)
        await until(lambda: world.runner.last_error is not None, "the failure reported")
        assert world.workers[2].killed
        assert world.workers[1].calls == old_calls
        assert world.runner.current is not None and world.runner.current.number == 1
        assert world.runner.current.state is GenState.READY
        assert world.runner.state is BundleState.RUNNING
        assert "rolled back, b@1 keeps serving" in (world.runner.last_error or "")
    run(test, tmp_path)


def test_a_failing_snapshot_aborts_the_swap(tmp_path: Path) -> None:
    async def test(world: World) -> None:
        world.scripts[1] = Script(fail={"pause": "TypeError: cannot pickle"})
        await until(serving(world, 1))
        world.change("v2")
        await until(lambda: world.runner.last_error is not None)
        assert world.workers[2].killed and world.workers[2].calls == []
        assert world.workers[1].calls == ["start", "pause", "resume"]
        assert "cannot pickle" in (world.runner.last_error or "")
    run(test, tmp_path)


def test_a_hand_over_blocked_by_busy_connections_is_tried_again(
    tmp_path: Path
) -> None:

    async def test(world: World) -> None:
        world.scripts[1] = Script(busy=2)
        await until(serving(world, 1))
        world.change("v2")
        await until(serving(world, 4), "the third try, once the connections went")
        await until(lambda: world.workers[1].exited.done(), "generation 1 retired")
        assert world.workers[1].calls == ["start", "pause", "resume", "pause", "resume",
                                          "pause", "retire"]
        assert world.workers[4].restored == b"state of 1"
    run(test, tmp_path, timings=QUICK)


def test_a_busy_retry_is_dropped_once_a_later_pass_swaps(
    tmp_path: Path
) -> None:

    async def test(world: World) -> None:
        world.scripts[1] = Script(busy=1)
        await until(serving(world, 1))
        world.change("v2")
        await until(lambda: world.runner._timers.armed("retry"), "a retry scheduled")
        world.change("v3")
        await until(serving(world, 3))
        assert not world.runner._timers.armed("retry"), "no forced swap of unchanged content later"
    run(test, tmp_path, timings=Timings(busy_retry_first=30.0))


def test_new_content_starts_with_a_clean_restart_history(
    tmp_path: Path
) -> None:

    async def test(world: World) -> None:
        await until(serving(world, 1))
        world.workers[1].crash()
        await until(serving(world, 2))
        world.workers[2].crash()
        await until(lambda: world.runner.state is BundleState.FAILED, "giving up")
        world.change("fixed")
        await until(serving(world, 3))
        world.workers[3].crash()  # one crash of the new code: restarted, not given up
        await until(serving(world, 4), "a restart of the new code")
    run(test, tmp_path, "max_restarts = 1\n", timings=QUICK)


def test_failed_content_is_not_retried_until_it_changes(tmp_path: Path) -> None:
    async def test(world: World) -> None:
        await until(serving(world, 1))
        world.change("broken", Script(load_error="ImportError"))
        await until(lambda: world.runner.last_error is not None)
        looked = world.digests
        world.runner.request()  # same content: looked at, and nothing happens
        await until(lambda: world.digests > looked, "a pass over the same content")
        # (a pass that went on would have spawned in the same step: no await between)
        assert sorted(world.workers) == [1, 2]
        world.scripts[3] = Script(load_error="ImportError")
        world.runner.request(force=True)  # but a forced reload tries again
        await until(lambda: 3 in world.workers and world.workers[3].killed, "a forced retry")
        world.change("fixed")
        await until(serving(world, 4), "the fixed content swapped in")
        assert world.workers[4].restored == b"state of 1"
    run(test, tmp_path)


def test_requests_during_a_swap_coalesce_into_one_more(tmp_path: Path) -> None:
    async def test(world: World) -> None:
        await until(serving(world, 1))
        world.gate = asyncio.Event()
        world.change("v2")
        await until(lambda: world.runner.state is BundleState.SWAPPING)
        for n in range(3, 8):
            world.change(f"v{n}")
        world.gate.set()
        await until(serving(world, 3), "one more swap, to the last content")
        assert sorted(world.workers) == [1, 2, 3]
        assert world.workers[3].restored == b"state of 2"
    run(test, tmp_path)


def test_a_crash_restarts_from_the_last_snapshot(tmp_path: Path) -> None:

    async def test(world: World) -> None:
        await until(serving(world, 1))
        world.change("v2")
        await until(serving(world, 2))
        world.workers[2].crash()
        await until(serving(world, 3), "a restart")
        assert world.workers[3].restored == b"state of 1"
        assert world.runner.restarts == 1
    run(test, tmp_path, timings=QUICK)


def test_restart_intensity_marks_the_bundle_failed(tmp_path: Path) -> None:

    async def test(world: World) -> None:
        await until(serving(world, 1))
        world.workers[1].crash()
        await until(serving(world, 2))
        world.workers[2].crash()
        await until(lambda: world.runner.state is BundleState.FAILED, "giving up")
        assert "2 failures within 60s" in (world.runner.last_error or "")
        assert world.runner.current is None and 3 not in world.workers
        world.change("v2")  # new content: try again
        await until(serving(world, 3))
    run(test, tmp_path, "max_restarts = 1\n", timings=QUICK)


def test_sockets_are_held_through_a_crash_backoff(tmp_path: Path) -> None:

    async def test(world: World) -> None:
        await until(serving(world, 1))
        address = world.sockets.addresses(world.runner)
        assert len(address) == 1
        world.workers[1].crash()
        await until(lambda: world.runner.state is BundleState.STARTING, "the backoff")
        # the port stays open: clients queue in its backlog
        assert world.sockets.addresses(world.runner) == address
        started = asyncio.get_running_loop().time()
        await world.runner.close()  # cuts the 30 s backoff short
        assert asyncio.get_running_loop().time() - started < 2.0
        assert world.sockets.addresses(world.runner) == []
    run(test, tmp_path, timings=Timings(backoff_first=30.0))


def test_a_failed_restart_backs_off_and_tries_again(tmp_path: Path) -> None:

    async def test(world: World) -> None:
        await until(serving(world, 1))
        world.scripts[2] = Script(fail={"start": "RuntimeError: database not up yet"})
        world.workers[1].crash()
        await until(serving(world, 3), "a second restart after the first failed")
        assert world.runner.restarts == 2
        assert world.sockets.addresses(world.runner), "sockets held throughout"
    run(test, tmp_path, timings=QUICK)


def test_an_old_generation_that_cannot_resume_is_restarted_from_its_snapshot(
    tmp_path: Path
) -> None:

    async def test(world: World) -> None:
        world.scripts[1] = Script(fail={"resume": "no answer within 5s"})
        await until(serving(world, 1))
        world.change("v2", Script(fail={"start": "RuntimeError: boom"}))
        await until(lambda: 3 in world.workers and world.runner.current is not None
                    and world.runner.current.number == 3, "a restart of the bundle")
        assert world.workers[1].killed and world.workers[2].killed
        assert world.workers[3].restored == b"state of 1"
    run(test, tmp_path, timings=QUICK)


def test_a_generation_that_dies_as_it_becomes_current_is_restarted(
    tmp_path: Path
) -> None:

    async def test(world: World) -> None:
        await until(serving(world, 1))
        world.change("v2", Script(exit_after={"start"}))
        await until(serving(world, 3), "the dead generation 2 replaced")
        assert world.runner.restarts == 1
    run(test, tmp_path, timings=QUICK)


def test_close_during_a_swap_cleans_up_every_generation(tmp_path: Path) -> None:
    async def test(world: World) -> None:
        await until(serving(world, 1))
        world.change("v2", Script(hang={"start"}))
        await until(lambda: "start" in world.workers.get(2, FakeWorker(0, Script())).calls)
        await world.runner.close()
        assert world.workers[2].killed
        assert world.workers[1].calls[-1] == "retire"
        assert world.runner.state is BundleState.STOPPED
    run(test, tmp_path, "start_timeout = 5.0\n")


def test_close_ends_the_loop_even_if_a_cancellation_is_swallowed(tmp_path: Path) -> None:
    async def test(world: World) -> None:
        await until(serving(world, 1))
        world.change("v2", Script(swallow={"start"}))
        await until(lambda: "start" in world.workers.get(2, FakeWorker(0, Script())).calls)
        async with asyncio.timeout(5):
            await world.runner.close()
        assert world.workers[2].killed
        assert world.runner.state is BundleState.STOPPED and not world.runner._gens
    run(test, tmp_path, "start_timeout = 60.0\n")


def test_close_while_a_retired_generation_is_being_forgotten(tmp_path: Path) -> None:
    async def test(world: World) -> None:
        world.scripts[1] = Script(hold_close=True)
        await until(serving(world, 1))
        world.change("v2")
        await until(lambda: world.workers[1].closing, "generation 1 exited, being forgotten")
        assert world.runner._gens[1].state is GenState.RETIRING, "until its log pipe drained"
        closing = asyncio.ensure_future(world.runner.close())
        await until(lambda: world.workers[2].calls[-1:] == ["retire"], "generation 2 retiring")
        world.workers[1].released.set()
        await closing
        assert world.runner.state is BundleState.STOPPED and not world.runner._gens
    run(test, tmp_path)


def test_illegal_moves_are_refused(tmp_path: Path) -> None:
    async def test(world: World) -> None:
        await until(serving(world, 1))
        current = world.runner.current
        assert current is not None
        with pytest.raises(IllegalMove, match="ready -> loaded"):
            current.move(GenState.LOADED)
    run(test, tmp_path)


def test_every_state_can_reach_an_end() -> None:
    ends = {GenState.EXITED, GenState.FAILED}
    for state in GenState:
        seen, frontier = {state}, [state]
        while frontier:
            for nxt in generation.MOVES[frontier.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    frontier.append(nxt)
        assert seen & ends, f"{state} can never end"
    assert all(not generation.MOVES[end] for end in ends)




# -- probation, pings, checkpoints --------------------------------------------------

def test_probation_holds_the_old_generation_then_retires_it(tmp_path: Path) -> None:
    async def test(world: World) -> None:
        await until(serving(world, 1))
        world.change("v2")
        await until(serving(world, 2))
        first = world.workers[1]
        assert not first.exited.done(), "held, paused and loaded, during probation"
        assert first.calls == ["start", "pause"]
        await until(lambda: first.exited.done(), "retired once probation ended")
        assert first.calls == ["start", "pause", "retire"]
    run(test, tmp_path, "probation = 0.2\n")


def test_a_swap_retires_the_held_generation_once_it_switched_or_failed(
        tmp_path: Path) -> None:
    """The generation held for the one a swap replaces is retired after the
    swap's pause and start, not beside them: swapped or rolled back."""
    async def test(world: World) -> None:
        await until(serving(world, 1))
        world.change("v2")
        await until(serving(world, 2))
        world.change("v3")
        await until(serving(world, 3))
        await until(lambda: world.workers[1].exited.done(), "generation 1 retired")
        journal = world.journal
        assert journal.index((1, "retire")) > journal.index((3, "start")), journal
        world.change("v4", Script(fail={"start": "boom"}))
        await until(lambda: 4 in world.workers and world.workers[4].killed, "4 discarded")
        await until(lambda: world.workers[2].exited.done(), "generation 2 retired")
        assert journal.index((2, "retire")) > journal.index((4, "start")), journal
        assert world.runner.current is world.runner._gens[3]
    run(test, tmp_path, "probation = 30\n")


def test_probation_pauses_an_overlap_generation_without_waiting(tmp_path: Path) -> None:
    async def test(world: World) -> None:
        world.scripts[1] = Script(hooks=False)
        await until(serving(world, 1))
        world.change("v2", Script(hooks=False))
        await until(serving(world, 2))
        await until(lambda: world.workers[1].calls == ["start", "pause"], "paused, held")
        await until(lambda: world.workers[1].exited.done())
    run(test, tmp_path, "probation = 0.2\n")


def test_a_crash_on_probation_brings_the_held_generation_back(tmp_path: Path) -> None:
    async def test(world: World) -> None:
        await until(serving(world, 1))
        world.change("v2")
        await until(serving(world, 2))
        world.workers[2].crash()
        await until(serving(world, 1), "generation 1 serves again")
        first = world.workers[1]
        assert first.calls == ["start", "pause", "resume"] and not first.exited.done()
        assert "on probation: swap rolled back, b@1 serves again" in str(world.runner.last_error)
        # the same content is not tried again, however often it is looked at
        looked = world.digests
        world.runner.request()
        await until(lambda: world.digests > looked, "another pass over the same content")
        assert sorted(world.workers) == [1, 2]
        world.change("v3")
        await until(serving(world, 3), "new content is tried")
    run(test, tmp_path, "probation = 30\n")


def test_the_held_generation_resumes_from_a_newer_checkpoint(tmp_path: Path) -> None:
    async def test(world: World) -> None:
        await until(serving(world, 1))
        world.change("v2")
        await until(serving(world, 2))
        await until(lambda: "snapshot" in world.workers[2].calls, "a checkpoint of b@2")
        await until(lambda: kept_of(world) == 2, "the checkpoint kept")
        world.workers[2].crash()
        await until(serving(world, 1))
        assert world.workers[1].restored == b"state of 2", "resumed with the newer state"
    run(test, tmp_path, "probation = 30\ncheckpoint_interval = 0.05\n")


def test_a_generation_that_does_not_answer_pings_is_killed_and_restarted(
        tmp_path: Path) -> None:
    async def test(world: World) -> None:
        world.scripts[1] = Script(hang={"ping"})
        await until(serving(world, 1))
        await until(serving(world, 2), "restarted")
        assert world.workers[1].killed
        assert "b@1 did not answer a ping within 0.1s" in str(world.runner.last_error)
    run(test, tmp_path, "ping_interval = 0.05\nping_timeout = 0.1\n")


def test_pings_are_due_on_a_tick_every_bundle_shares(tmp_path: Path) -> None:
    """Idle bundles wake the supervisor once per ping_interval for all their
    pings: each is due on a multiple of the interval (the loop's clock), not
    ``interval`` after that bundle's own last ping."""
    async def test(world: World) -> None:
        await until(serving(world, 1))
        for pings in range(1, 4):  # the first, and after the answers came back
            await until(lambda n=pings: world.workers[1].calls.count("ping") >= n, "pinged")
            await until(lambda: world.runner._timers.armed("ping"), "the next ping armed")
            due = world.runner._timers._armed["ping"].when()
            assert abs(due - round(due / 0.25) * 0.25) < 0.002, due  # µs of arming
    run(test, tmp_path, "ping_interval = 0.25\n")


def test_checkpoints_go_to_disk_and_a_new_runner_resumes_from_them(
        tmp_path: Path, store: CheckpointStore) -> None:

    async def test(world: World) -> None:
        await until(serving(world, 1))
        await until(lambda: store.load("b") is not None, "a checkpoint on disk")
    run(test, tmp_path, "checkpoint_interval = 0.05\n", store)
    saved = store.load("b")
    assert saved is not None and saved.payload == b"state of 1"

    async def again(world: World) -> None:
        await until(serving(world, 2), "numbers go on from the last run's")
        assert world.workers[2].restored == b"state of 1"
    run(again, tmp_path / "second", "", store)
    assert store.numbers("b") == (2, 2)


def test_a_checkpoint_the_code_cannot_restore_says_how_to_start_without_it(
        tmp_path: Path, store: CheckpointStore) -> None:
    store.save("b", 7, b"old state")

    async def test(world: World) -> None:
        world.scripts[8] = Script(fail={"start": "ValueError: unknown field"})
        await until(lambda: world.runner.state is BundleState.FAILED, "the start failed")
        assert world.workers[8].calls == ["start"], "numbers go on from the checkpoint's"
        assert str(world.runner.last_error).endswith(
            f"(if the saved state does not suit this code, fix restore() or delete "
            f"{store.path('b')} to start without it)")
    run(test, tmp_path, "", store)


# -- found in review: shut-down, stop and fall-back corners -----------------------------

def test_a_shut_down_during_stop_still_reaps_the_retiring_generation(tmp_path: Path) -> None:
    async def test(world: World) -> None:
        world.scripts[1] = Script(hang={"retire"})
        await until(serving(world, 1))
        world.runner.stop()
        await until(lambda: "retire" in world.workers[1].calls, "retiring")
        await world.runner.close()
        assert world.workers[1].killed and not world.runner._gens
    run(test, tmp_path, "drain_timeout = 0.1\n")


def test_a_held_generation_that_cannot_resume_is_reaped(
        tmp_path: Path) -> None:

    async def test(world: World) -> None:
        world.scripts[1] = Script(fail={"resume": "RuntimeError: restore failed"})
        await until(serving(world, 1))
        world.change("v2")
        await until(serving(world, 2))
        world.workers[2].crash()
        await until(serving(world, 3), "restarted instead")
        await until(lambda: 1 not in world.runner._gens, "generation 1 reaped")
        assert world.workers[1].killed and world.workers[1].closing
    run(test, tmp_path, "probation = 30\n", timings=QUICK)


def test_stop_right_after_a_failed_resume(tmp_path: Path) -> None:
    async def test(world: World) -> None:
        world.scripts[1] = Script(fail={"resume": "timeout"})
        await until(serving(world, 1))
        first = world.workers[1]
        loop = asyncio.get_running_loop()

        def slow_kill() -> None:  # a real kill is seen a moment later (pidfd, zygote)
            first.killed = True
            loop.call_later(0.05, first.crash)
        first.kill = slow_kill  # type: ignore[method-assign]
        world.gate = asyncio.Event()
        world.change("v2", Script(fail={"start": "boom"}))
        await until(lambda: world.runner.state is BundleState.SWAPPING)
        stopped = world.runner.stop()  # arrives during the swap
        world.gate.set()
        assert (await stopped)["result"] == "stopped"
        await until(lambda: not world.runner._gens, "every generation reaped")
    run(test, tmp_path)


def test_a_shut_down_during_a_hand_over_keeps_the_paused_state(
        tmp_path: Path, store: CheckpointStore) -> None:

    async def test(world: World) -> None:
        await until(serving(world, 1))
        world.change("v2", Script(hang={"start"}))
        await until(lambda: 2 in world.workers and "start" in world.workers[2].calls)
    run(test, tmp_path, "start_timeout = 5.0\n", store)
    saved = store.load("b")
    assert saved is not None and saved.payload == b"state of 1"


def test_the_shut_down_checkpoint_is_taken_even_with_a_connection_open(
        tmp_path: Path, store: CheckpointStore) -> None:

    async def test(world: World) -> None:
        world.scripts[1] = Script(busy=1)
        await until(serving(world, 1))
    run(test, tmp_path, "", store)
    saved = store.load("b")
    assert saved is not None and saved.payload == b"state of 1"


def test_after_a_fall_back_its_own_state_is_the_newest(tmp_path: Path) -> None:
    async def test(world: World) -> None:
        world.scripts[1] = Script(fail={"snapshot": "slow"})  # its checkpoint is not due yet
        await until(serving(world, 1))
        world.change("v2")
        await until(serving(world, 2))
        await until(lambda: kept_of(world) == 2)
        world.workers[2].crash()
        await until(serving(world, 1))
        world.workers[1].restored = None
        world.change("v3", Script(hooks=False))
        await until(serving(world, 3))
        world.workers[3].crash()
        await until(serving(world, 1))
        assert world.workers[1].restored is None, "not generation 2's old checkpoint"
    run(test, tmp_path, "probation = 30\ncheckpoint_interval = 0.05\n")


def test_deleting_the_checkpoint_the_hint_names_lets_run_start_fresh(
        tmp_path: Path, store: CheckpointStore) -> None:
    store.save("b", 7, b"old state")

    async def test(world: World) -> None:
        world.scripts[8] = Script(fail={"start": "ValueError: unknown field"})
        await until(lambda: world.runner.state is BundleState.FAILED, "the start failed")
        store.discard("b")  # as the hint says
        report = await world.runner.run_again()
        assert report["result"] == "started" and world.workers[9].restored is None
    run(test, tmp_path, "", store)


# -- the mailbox: timers only enqueue, one task decides ------------------------------

def test_a_reload_during_a_crash_backoff_is_answered_at_once(tmp_path: Path) -> None:
    async def test(world: World) -> None:
        await until(serving(world, 1))
        world.workers[1].crash()
        await until(lambda: world.runner._timers.armed("restart"), "a 30 s backoff")
        assert world.runner.state is BundleState.STARTING
        report = await asyncio.wait_for(world.runner.reload(), 2.0)
        assert report["result"] == "started" and report["generation"] == 2
        assert not world.runner._timers.armed("restart"), "the restart it replaced is gone"
    run(test, tmp_path, timings=Timings(backoff_first=30.0))


def test_a_stop_during_a_crash_backoff_is_answered_at_once(tmp_path: Path) -> None:
    async def test(world: World) -> None:
        await until(serving(world, 1))
        world.workers[1].crash()
        await until(lambda: world.runner._timers.armed("restart"), "a 30 s backoff")
        report = await asyncio.wait_for(world.runner.stop(), 2.0)
        assert report["result"] == "stopped"
        assert world.runner.state is BundleState.STOPPED and 2 not in world.workers
        assert world.sockets.addresses(world.runner) == [], "its ports closed"
    run(test, tmp_path, timings=Timings(backoff_first=30.0))


def test_the_first_checkpoint_comes_after_one_interval(tmp_path: Path) -> None:
    async def test(world: World) -> None:
        loop = asyncio.get_running_loop()
        await until(serving(world, 1))
        serving_at = loop.time()
        await until(lambda: "snapshot" in world.workers[1].calls, "a checkpoint")
        assert loop.time() - serving_at < 0.9, "checkpoint_interval holds from the start"
    run(test, tmp_path, "checkpoint_interval = 0.3\n")


def test_nothing_wakes_while_nothing_is_due(tmp_path: Path) -> None:
    async def test(world: World) -> None:
        await until(serving(world, 1))
        await until(lambda: world.runner._mailbox.drain() == [], "the first pass over")
        mine = asyncio.current_task()
        others = [t for t in asyncio.all_tasks() if t is not mine]
        assert others == [world.runner._task], "one task per bundle, waiting on its mailbox"
        assert not world.runner._timers._armed, "no timer with pings and checkpoints off"
    run(test, tmp_path)


def test_a_held_generation_is_in_the_held_state(tmp_path: Path) -> None:
    async def test(world: World) -> None:
        await until(serving(world, 1))
        world.change("v2")
        await until(serving(world, 2))
        assert world.runner._gens[1].state is GenState.HELD
        assert world.runner.state is BundleState.RUNNING
    run(test, tmp_path, "probation = 30\n")


def test_a_generation_that_dies_on_probation_is_reaped_and_the_new_one_serves_on(
        tmp_path: Path) -> None:
    async def test(world: World) -> None:
        await until(serving(world, 1))
        world.change("v2")
        await until(serving(world, 2))
        world.workers[1].crash()
        await until(lambda: 1 not in world.runner._gens, "the held generation reaped")
        assert world.runner.current is not None and world.runner.current.number == 2
        assert not world.runner._timers.armed("probation")
    run(test, tmp_path, "probation = 30\n")


# -- state that could not be kept is said -----------------------------------------------

class _FullDisk(CheckpointStore):
    """A store whose writes fail as on a full disk."""

    def save(self, bundle: str, generation: int, payload: bytes) -> Any:
        raise CheckpointError(f"checkpoint {self.path(bundle)}: cannot write: No space "
                                   f"left on device (ENOSPC); the previous checkpoint is kept")


def test_a_checkpoint_that_cannot_be_written_shows_in_status_and_the_report(
        tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    store = _FullDisk(tmp_path / "run")

    async def test(world: World) -> None:
        await until(serving(world, 1))
        world.content = "v2"
        report = await world.runner.reload()
        assert report["result"] == "swapped"
        assert report["warnings"] and "No space left on device" in report["warnings"][0]
        status = world.runner.status()
        assert "No space left on device" in status["checkpoint"]["error"]
    run(test, tmp_path, "", store)


def test_discard_state_swaps_without_it_and_forgets_it(tmp_path: Path,
                                                       store: CheckpointStore) -> None:
    async def test(world: World) -> None:
        world.scripts[1] = Script(fail={"pause": "SnapshotError: cannot pickle a socket"})
        await until(serving(world, 1))
        world.content = "v2"
        refused = await world.runner.reload()
        assert refused["result"] == "rolled back"
        assert "`hotsup reload b --discard-state` swaps to the new code" in refused["message"]
        swapped = await world.runner.reload(discard_state=True)
        assert swapped["result"] == "swapped" and "without state" in swapped["message"]
        assert world.workers[3].restored is None
        assert world.workers[1].calls == ["start", "pause", "resume", "pause", "retire"]
        assert world.runner._kept is None and store.load("b") is None
    run(test, tmp_path, "", store)
