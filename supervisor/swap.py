"""The swap: every generation of one bundle, from first start to retirement.

The whole state machine lives here. A generation moves through ``GenState``
along the ``MOVES`` table, and only through ``BundleRunner._move``, which
checks and logs every move. One task per bundle (``BundleRunner.run``) does
everything for that bundle in order, so there is never more than one swap at a
time; triggers that arrive during a swap coalesce into one more pass.

A swap (DESIGN.md, "A generation swap"), as ``_swap`` reads:

    spawn N+1 ............................ SPAWNING   (N serves)
    N+1 imports and constructs ........... LOADED     (N serves)
    hand-over mode (N has snapshot(), N+1 has restore()):
        pause N, wait in-flight, snapshot  N: PAUSED  (nobody accepts;
        N+1.restore(state); N+1.start() .. READY       the backlog holds)
    overlap mode:
        N+1.start() ...................... READY      (both accept)
    retire N: drain, stop(), exit ........ N: RETIRING -> EXITED

Any failure before N+1 is READY kills N+1 and resumes N if it was paused:
the old generation keeps serving with its state, and the error is reported.

After the swap N is not retired at once but held, paused and still loaded,
for ``probation`` seconds: if N+1 dies in that time, N resumes (from a newer
checkpoint of N+1's, if one was taken) and the swap counts as rolled back.

Around the swaps: the serving generation is pinged (no answer within
``ping_timeout``: its loop is blocked, it is killed and restarted); its state
is checkpointed every ``checkpoint_interval``, at every swap and at shut-down
(``checkpoint.CheckpointStore``); a crashed generation is restarted from the
newest state, with backoff and OTP-style restart intensity.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import enum
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from hotsup.worker import protocol as P

from .checkpoint import CheckpointError, CheckpointStore
from .config import BundleSource, BundleSpec, Config, ConfigError, load_bundle
from .process import WorkerError
from .sockets import SocketError, SocketRegistry

log = logging.getLogger("hotsup")

#: Extra seconds a retiring worker gets beyond drain_timeout for its stop().
STOP_GRACE = 5.0
#: Crash restarts back off from this delay, doubling, up to BACKOFF_MAX.
BACKOFF_FIRST = 0.1
BACKOFF_MAX = 10.0
#: A hand-over that found connections still in flight is tried again after
#: BUSY_RETRY_FIRST seconds, doubling, BUSY_RETRIES times at most.
BUSY_RETRY_FIRST = 2.0
BUSY_RETRIES = 3


class GenState(enum.Enum):
    SPAWNING = "spawning"
    LOADED = "loaded"
    READY = "ready"
    PAUSED = "paused"
    RETIRING = "retiring"
    EXITED = "exited"
    FAILED = "failed"


S = GenState
MOVES: dict[GenState, frozenset[GenState]] = {
    S.SPAWNING: frozenset({S.LOADED, S.FAILED}),
    S.LOADED: frozenset({S.READY, S.FAILED}),
    S.READY: frozenset({S.PAUSED, S.RETIRING, S.FAILED}),
    S.PAUSED: frozenset({S.READY, S.RETIRING, S.FAILED}),
    S.RETIRING: frozenset({S.EXITED, S.FAILED}),
    S.EXITED: frozenset(),
    S.FAILED: frozenset(),
}


class BundleState(enum.Enum):
    """What ``hotsup status`` shows for a bundle."""

    STARTING = "starting"
    RUNNING = "running"
    SWAPPING = "swapping"
    FAILED = "failed"
    STOPPED = "stopped"


class Result(enum.Enum):
    """What one pass of a bundle's loop did (``hotsup reload`` reports it)."""

    SWAPPED = "swapped"
    STARTED = "started"
    RESTARTED = "restarted"
    UNCHANGED = "unchanged"
    ROLLED_BACK = "rolled back"
    FAILED = "failed"
    STOPPED = "stopped"


@dataclass(frozen=True)
class Outcome:
    result: Result
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.result not in (Result.ROLLED_BACK, Result.FAILED)


class IllegalMove(RuntimeError):
    pass


class SwapAborted(Exception):
    """The swap could not complete; the old generation (if any) keeps serving.

    ``transient``: nothing was wrong with the new code (the old generation had
    connections in flight), so the same content is worth another try.
    """

    def __init__(self, message: str, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


class Worker(Protocol):
    """What the state machine needs of a worker process (``process.WorkerProcess``).

    Every coroutine raises ``WorkerError`` on an error reply, a timeout, or the
    process's exit; ``exited`` resolves when the process is gone.
    """

    pid: int | None
    exited: asyncio.Future[None]

    @property
    def log_dropped(self) -> int: ...  # log lines dropped for flooding

    async def wait_loaded(self, timeout: float) -> dict[str, Any]: ...
    async def call(self, op: str, timeout: float, payload: bytes | None = None,
                   **fields: Any) -> tuple[dict[str, Any], bytes | None]: ...
    def kill(self) -> None: ...
    async def wait_exit(self, timeout: float) -> bool: ...
    async def describe_exit(self) -> str: ...
    async def close(self) -> None: ...


#: Forks generation ``number`` of a bundle with these sockets; WorkerError if it cannot.
Spawner = Callable[[BundleSpec, int, dict[str, socket.socket]], Awaitable[Worker]]


@dataclass
class Generation:
    number: int
    spec: BundleSpec
    process: Worker
    state: GenState = GenState.SPAWNING
    hooks: dict[str, bool] = field(default_factory=dict)
    serving_since: float | None = None  # time.monotonic() when it became current
    hung: str | None = None  # why it was killed for not answering a ping

    @property
    def tag(self) -> str:
        return f"{self.spec.name}@{self.number}"

    def hands_over_to(self, successor: Generation) -> bool:
        return bool(self.hooks.get("snapshot")) and bool(successor.hooks.get("restore"))


@dataclass
class Services:
    """What a runner needs from the supervisor; one instance shared by all bundles."""

    config: Config
    sockets: SocketRegistry
    spawn: Spawner
    digest: Callable[[BundleSource], Awaitable[str | None]]
    checkpoints: CheckpointStore | None = None


class BundleRunner:
    """Owns one bundle: its generations, its swaps, its crash restarts."""

    def __init__(self, source: BundleSource, services: Services) -> None:
        self.source = source
        self.name = source.name
        self.svc = services
        #: Its records also go to the bundle's ring, for ``hotsup logs NAME``.
        self.log = logging.LoggerAdapter(log, {"bundle": self.name})
        self.state = BundleState.STARTING
        self.current: Generation | None = None
        self.restarts = 0
        self.last_error: str | None = None
        self.last_swap_ms: float | None = None
        self.last_pause_ms: float | None = None
        self.last_swap_at: float | None = None  # unix time
        self.swaps = 0
        self._number = 0
        self._tried: str | None = None  # the content digest last tried
        self._last_state: bytes | None = None  # the newest snapshot we hold
        self._state_of = 0  # the generation that snapshot was taken of
        self._disk_read = False  # whether the checkpoint on disk was looked for
        self._pending = False  # a request (file change, reload, ...) waits for a pass
        self._checkpoint_due = False
        self._checkpointing = False  # a checkpoint's snapshot() is running
        self._timers: list[asyncio.Task[None]] = []
        # The previous generation, paused and loaded, while the new one is on probation.
        self._held: Generation | None = None
        self._held_until: asyncio.TimerHandle | None = None
        self._crashes: list[float] = []
        # The sockets to hold even while no generation does (a crash backoff,
        # a spawn in progress): those of the spec last served and of the one
        # being spawned. None once the bundle gave up or closed.
        self._serving: BundleSpec | None = None
        self._spawning: BundleSpec | None = None
        self._wake = asyncio.Event()
        self._closed = False
        self._force = False
        self._gens: dict[int, Generation] = {}  # every generation not yet reaped
        self._retiring: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None
        self._busy_retries = 0
        self._retry: asyncio.TimerHandle | None = None
        # Who waits for the next pass's outcome (reload, stop, run), and
        # whether the operator took the bundle down (``hotsup stop``).
        self._waiters: list[asyncio.Future[dict[str, Any]]] = []
        self._down = False
        self._down_asked = asyncio.Event()
        # -- kept for supervisor/metrics.py, which reads them through status() --
        self.outcomes: collections.Counter[str] = collections.Counter()  # results of passes
        self.swap_times = SwapTimes()  # durations of the swaps that served
        self.checkpoint: tuple[int, float] | None = None  # (bytes, unix time) last written

    def start(self) -> None:
        """Start the bundle's loop; its first pass starts generation 1."""
        self.request(force=True)
        self._task = asyncio.ensure_future(self.run())
        self._timers = [asyncio.ensure_future(self._ping_loop()),
                        asyncio.ensure_future(self._checkpoint_loop())]

    # -- triggers -------------------------------------------------------------

    def request(self, force: bool = False) -> None:
        """Ask for a pass: a swap if the content changed (or always, if ``force``).

        Requests made while a swap runs coalesce into one more pass after it.
        """
        self._force = self._force or force
        self._pending = True
        self._wake.set()

    def reload(self) -> asyncio.Future[dict[str, Any]]:
        """Swap now, even if nothing changed; the future gets the pass's report."""
        return self._ask(force=True)

    def stop(self) -> asyncio.Future[dict[str, Any]]:
        """Take the bundle down (``hotsup stop``): retire its generation, close its
        ports, ignore file changes until ``run()``."""
        self._down = True
        self._down_asked.set()  # cuts a crash backoff short
        self._cancel_retry()
        return self._ask(force=False)

    def run_again(self) -> asyncio.Future[dict[str, Any]]:
        """Bring a stopped or failed bundle back (``hotsup run``), as if its
        files were new: crash history and retries start afresh."""
        self._down = False
        self._down_asked.clear()
        self._tried = None
        return self._ask(force=True)

    @property
    def stopped(self) -> bool:
        return self._down

    def _ask(self, force: bool) -> asyncio.Future[dict[str, Any]]:
        waiter: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self.request(force)
        return waiter

    # -- the loop ---------------------------------------------------------------

    async def run(self) -> None:
        while not self._closed:
            await self._wake.wait()
            self._wake.clear()
            if self._closed:
                return
            force, self._force = self._force, False
            pending, self._pending = self._pending, False
            waiters, self._waiters = self._waiters, []
            started = time.monotonic()
            outcome = Outcome(Result.FAILED, "the supervisor is shutting down")
            try:
                outcome = await self._pass(force, pending)
                self.outcomes[outcome.result.value] += 1
            except Exception:
                self.log.exception("%s: internal error in the swap loop", self.name)
                outcome = Outcome(Result.FAILED, "internal error (see the supervisor's log)")
            finally:  # also when close() cancels the pass: nobody waits for ever
                self._answer(waiters, outcome, started)

    async def _pass(self, force: bool, pending: bool) -> Outcome:
        if self._down:
            if self.state is BundleState.STOPPED:
                return Outcome(Result.STOPPED, "already stopped")
            return await self._take_down()
        current = self.current
        if current is not None and current.process.exited.done():
            return await self._recover(current)
        if self._checkpoint_due:
            self._checkpoint_due = False
            await self._checkpoint()
        if not pending:
            return Outcome(Result.UNCHANGED, "nothing asked")
        return await self._advance(force)

    def report(self, outcome: Outcome, duration_ms: float) -> dict[str, Any]:
        """What ``hotsup reload/stop/run`` print for ``outcome`` (control.py's "report")."""
        return {"name": self.name, "result": outcome.result.value, "ok": outcome.ok,
                "message": outcome.message,
                "generation": self.current.number if self.current else None,
                "duration_ms": _round(duration_ms)}

    def _answer(self, waiters: list[asyncio.Future[dict[str, Any]]], outcome: Outcome,
                started: float) -> None:
        report = self.report(outcome, (time.monotonic() - started) * 1000)
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(report)

    async def close(self) -> None:
        """Stop the loop (cutting short a swap or a backoff), retire every serving
        generation (drain, stop(), exit), kill the others, release the sockets."""
        self._closed = True
        self._cancel_retry()
        for task in [self._task, *self._timers]:
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._release_held(retire=False)  # retired below with the others
        # The shut-down checkpoint, what a restarted supervisor resumes from:
        # the serving generation's state once it has drained.
        keep = self.current if self.current and self.current.hooks.get("snapshot") else None
        self.current = None
        self._serving = None
        for gen in list(self._gens.values()):
            if gen.state in (S.READY, S.PAUSED):
                self._retire_later(gen, keep=gen is keep)
            elif gen.state in (S.SPAWNING, S.LOADED, S.FAILED):  # FAILED: a discard cut short
                await self._discard(gen, "shutting down")
            # RETIRING and EXITED: their retire task, awaited below, finishes them
        while self._retiring:
            await asyncio.gather(*self._retiring, return_exceptions=True)
        self.svc.sockets.release_unused(self, [])
        self.state = BundleState.STOPPED
        self._answer(self._waiters, Outcome(Result.FAILED, "the supervisor is shutting down"),
                     time.monotonic())
        self._waiters = []

    def status(self) -> dict[str, Any]:
        gen = self.current
        return {
            "name": self.name,
            "state": self.state.value,
            "generation": gen.number if gen else None,
            "pid": gen.process.pid if gen else None,
            "restarts": self.restarts,
            "version": gen.spec.version if gen else None,
            "last_swap_ms": _round(self.last_swap_ms),
            "last_pause_ms": _round(self.last_pause_ms),
            "last_error": self.last_error,
            "uptime": _round(time.monotonic() - gen.serving_since)
            if gen and gen.serving_since is not None else None,
            "last_swap_at": self.last_swap_at,
            "log_dropped": gen.process.log_dropped if gen else 0,
            "swaps": self.swaps,
            "sockets": self.svc.sockets.addresses(self),
            "outcomes": dict(self.outcomes),
            "swap_ms": self.swap_times.as_dict(),
            "checkpoint_bytes": self.checkpoint[0] if self.checkpoint else None,
            "checkpoint_at": self.checkpoint[1] if self.checkpoint else None,
        }

    # -- the steps --------------------------------------------------------------

    async def _advance(self, force: bool) -> Outcome:
        """Start the bundle, or swap it, if its content changed since the last try."""
        started = time.monotonic()
        digest = await self.svc.digest(self.source)
        if digest is None:  # the supervisor removes us
            return Outcome(Result.UNCHANGED, "the bundle directory is gone")
        if not force and digest == self._tried:
            return Outcome(Result.UNCHANGED, "no change")
        if digest != self._tried:  # new content: a fresh start for its tries and restarts
            self._busy_retries = 0
            self._crashes.clear()
        self._tried = digest
        self._cancel_retry()  # this pass is the try it was waiting for
        try:
            spec = load_bundle(self.source, self.svc.config)
        except ConfigError as exc:
            message = "cannot load the bundle: " + "; ".join(exc.problems)
            if self.current is not None:
                return self._report(message, BundleState.RUNNING, Result.ROLLED_BACK)
            return self._report(message, BundleState.FAILED)
        if self.current is None:
            if not self._disk_read:
                self._disk_read = True
                self._last_state = await self._read_checkpoint() or self._last_state
            return await self._start(spec, self._last_state)
        return await self._swap(spec, started)

    async def _start(self, spec: BundleSpec, state: bytes | None) -> Outcome:
        """Bring up a generation when none is serving (first start, restart)."""
        self.state = BundleState.STARTING
        try:
            new = await self._spawn(spec)
        except SwapAborted as exc:
            return self._report(str(exc), BundleState.FAILED)
        given: bytes | None = None
        try:
            await self._load(new)
            given = state if new.hooks.get("restore") else None
            await self._begin(new, given)
        except SwapAborted as exc:
            await self._discard(new, str(exc))
            hint = ""
            if given is not None and self.svc.checkpoints is not None:
                hint = (f" (if the saved state does not suit this code, fix restore() or "
                        f"delete {self.svc.checkpoints.path(self.name)} to start without it)")
                self._last_state, self._disk_read = None, False  # the next start reads it anew
            return self._report(f"{new.tag} did not start: {exc}{hint}", BundleState.FAILED)
        self._make_current(new, spec)
        self.log.info("%s: serving (pid %s)", new.tag, new.process.pid)
        return Outcome(Result.STARTED, f"{new.tag} serving")

    async def _swap(self, spec: BundleSpec, started: float) -> Outcome:
        old = self.current
        assert old is not None
        self._release_held()  # newer code serves: the one held before it is obsolete
        self.state = BundleState.SWAPPING
        try:
            new = await self._spawn(spec)
        except SwapAborted as exc:
            return self._report(f"swap aborted, {old.tag} keeps serving: {exc}",
                                BundleState.RUNNING, Result.ROLLED_BACK)
        paused_at: float | None = None
        snapshot: bytes | None = None
        try:
            await self._load(new)
            if old.hands_over_to(new):
                paused_at = time.monotonic()
                snapshot = await self._pause(old)
                await self._begin(new, snapshot)
                self._last_state = snapshot
            else:
                await self._begin(new, None)
        except Exception as exc:
            await self._discard(new, str(exc))
            resumed = old.state is not S.PAUSED or await self._resume(old, snapshot)
            if not isinstance(exc, SwapAborted):
                raise  # a bug: run() logs it; the old generation is serving again
            if resumed:
                again = self._retry_later() if exc.transient else ""
                return self._report(f"swap to {new.tag} rolled back, {old.tag} keeps serving: "
                                    f"{exc}{again}", BundleState.RUNNING, Result.ROLLED_BACK)
            return self._report(f"swap to {new.tag} rolled back: {exc}; {old.tag} could not "
                                f"resume and is restarted", BundleState.STARTING,
                                Result.ROLLED_BACK)
        ready_at = time.monotonic()
        self._make_current(new, spec)
        self.last_error = None
        self._busy_retries = 0
        self.swaps += 1
        self.last_swap_at = time.time()
        self.last_swap_ms = (ready_at - started) * 1000
        self.last_pause_ms = (ready_at - paused_at) * 1000 if paused_at is not None else 0.0
        self.swap_times.add(self.last_swap_ms)
        mode = "hand-over" if paused_at is not None else "overlap"
        self.log.info("%s: swapped from %s in %.1f ms (%s, paused %.1f ms)", new.tag, old.tag,
                      self.last_swap_ms, mode, self.last_pause_ms)
        await self._hold(old, new.spec.timing.probation)
        if snapshot is not None:
            await self._keep_state(snapshot, old)
        return Outcome(Result.SWAPPED, f"{old.tag} -> {new.tag} ({mode}, paused "
                                       f"{self.last_pause_ms:.1f} ms)")

    async def _take_down(self) -> Outcome:
        """``hotsup stop``: retire the serving generation and close the ports."""
        self._release_held()
        gen, self.current = self.current, None
        self._serving = None
        if gen is not None:
            # Drain, keep its final state (`hotsup run` starts from it), stop(),
            # exit; shielded: a shut-down meanwhile waits for it, not cuts it.
            await asyncio.shield(self._retire_later(gen, keep=bool(gen.hooks.get("snapshot"))))
        self._release_sockets()
        self.state = BundleState.STOPPED
        self.log.info("%s: stopped", self.name)
        return Outcome(Result.STOPPED, f"{gen.tag} retired" if gen else "nothing was running")

    async def _recover(self, crashed: Generation) -> Outcome:
        """The serving generation died: restart it with backoff, within the
        restart intensity (more than max_restarts in restart_window: give up)."""
        how = crashed.hung or await crashed.process.describe_exit()
        self._move(crashed, S.FAILED)
        await self._forget(crashed)
        self.current = None
        error = f"{crashed.tag} {how} while serving"
        held = self._release_held(retire=False)
        if held is not None:
            outcome = await self._fall_back(held, crashed, error)
            if outcome is not None:
                return outcome
        timing = crashed.spec.timing
        while self.current is None:
            now = time.monotonic()
            self._crashes = [t for t in self._crashes if now - t < timing.restart_window]
            self._crashes.append(now)
            if len(self._crashes) > timing.max_restarts:
                failures, self._crashes = len(self._crashes), []  # new content: a clean slate
                self._serving = None
                self._release_sockets()  # refuse clients rather than leave them queued
                return self._report(f"{error}; {failures} failures within "
                                    f"{timing.restart_window:g}s, giving up until the files "
                                    f"change or `hotsup run {self.name}`", BundleState.FAILED)
            delay = min(BACKOFF_FIRST * 2 ** (len(self._crashes) - 1), BACKOFF_MAX)
            self._report(f"{error}; restarting in {delay:.1f}s", BundleState.STARTING)
            self.restarts += 1
            # A backoff: close() cancels it, stop() cuts it short.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._down_asked.wait(), delay)
            if self._down:
                return Outcome(Result.STOPPED, f"{error}; stopped before the restart")
            await self._advance(force=True)
            error = self.last_error or "the restart failed"
        return Outcome(Result.RESTARTED, f"{crashed.tag} crashed; {self.current.tag} serving")

    # -- one generation's moves ------------------------------------------------

    async def _spawn(self, spec: BundleSpec) -> Generation:
        self._spawning = spec
        try:
            sockets = self.svc.sockets.acquire(spec, self)
            self._number += 1
            process = await self.svc.spawn(spec, self._number, sockets)
        except (SocketError, WorkerError) as exc:
            self._spawning = None
            self._release_sockets()
            raise SwapAborted(str(exc)) from None
        finally:
            self._spawning = None
        gen = Generation(self._number, spec, process)
        self._gens[gen.number] = gen
        process.exited.add_done_callback(lambda _: self._on_exit(gen))
        self.log.debug("%s: spawned pid %d", gen.tag, process.pid)
        return gen

    async def _load(self, gen: Generation) -> None:
        try:
            loaded = await gen.process.wait_loaded(gen.spec.timing.start_timeout)
        except WorkerError as exc:
            raise SwapAborted(f"loading: {exc}") from None
        gen.hooks = dict(loaded.get("hooks", {}))
        self._move(gen, S.LOADED)

    async def _begin(self, gen: Generation, snapshot: bytes | None) -> None:
        """restore(snapshot) if any, then start(): LOADED -> READY.

        The worker accepts nothing until start() returned, so a generation
        that fails here has no connection to lose when it is killed.
        """
        try:
            await gen.process.call(P.OP_START, gen.spec.timing.start_timeout, snapshot)
        except WorkerError as exc:
            raise SwapAborted(str(exc)) from None
        self._move(gen, S.READY)

    async def _pause(self, gen: Generation) -> bytes:
        """Stop accepting, let in-flight connections finish, take the snapshot."""
        self._move(gen, S.PAUSED)
        timing = gen.spec.timing
        try:
            _, snapshot = await gen.process.call(
                P.OP_PAUSE, timing.quiesce_timeout + STOP_GRACE,
                quiesce_timeout=timing.quiesce_timeout, snapshot=True,
                max_bytes=timing.max_snapshot_bytes)
        except WorkerError as exc:
            raise SwapAborted(f"{gen.tag} could not hand over its state: {exc}",
                              transient=exc.kind == "Busy") from None
        if snapshot is None:
            raise SwapAborted(f"{gen.tag} sent no snapshot")
        return snapshot

    async def _resume(self, gen: Generation, snapshot: bytes | None,
                      state: bytes | None = None) -> bool:
        """PAUSED -> READY (restoring ``state`` first, if given); False if it
        could not, and is being restarted instead."""
        timing = gen.spec.timing
        # The worker answers in order: a resume waits behind a pause whose
        # snapshot() is still running (slower than quiesce_timeout), so it
        # gets that long again and start_timeout on top before we give up.
        deadline = timing.quiesce_timeout + STOP_GRACE + timing.start_timeout
        try:
            await gen.process.call(P.OP_RESUME, deadline, state)
        except WorkerError as exc:
            # Frozen, or still inside snapshot(). Kill it: its exit wakes the
            # loop, which restarts the bundle, from this snapshot if we have
            # one (it holds everything: nothing was accepted since).
            self.log.error("%s: could not resume (%s); restarting it", gen.tag, exc)
            if snapshot is not None:
                self._last_state = snapshot
            gen.process.kill()
            return False
        self._move(gen, S.READY)
        return True

    async def _hold(self, old: Generation, probation: float) -> None:
        """Keep the replaced generation paused and loaded for ``probation`` seconds
        (retire it at once if 0): the way back if its successor dies."""
        if probation <= 0 or old.process.exited.done():
            self._retire_later(old)
            return
        if old.state is S.READY:  # overlap mode: it still accepts; in-flight ones finish
            self._move(old, S.PAUSED)
            try:
                await old.process.call(P.OP_PAUSE, STOP_GRACE, wait=False)
            except WorkerError as exc:
                self.log.warning("%s: could not be held for probation: %s", old.tag, exc)
                self._retire_later(old)
                return
        self._held = old
        self._held_until = asyncio.get_running_loop().call_later(probation, self._release_held)

    def _release_held(self, retire: bool = True) -> Generation | None:
        """End the probation: retire the held generation (or just hand it back)."""
        held, self._held = self._held, None
        if self._held_until is not None:
            self._held_until.cancel()
            self._held_until = None
        if held is not None and retire and held.state is S.PAUSED:
            self._retire_later(held)
        return held

    async def _fall_back(self, held: Generation, crashed: Generation,
                         error: str) -> Outcome | None:
        """The new generation died on probation: the held one serves again, with
        the newest checkpoint if one was taken of its successor. None if it
        cannot (the caller restarts the bundle instead)."""
        if held.state is not S.PAUSED:
            return None
        if held.process.exited.done():
            self._retire_later(held)  # reaps it
            return None
        newer = self._last_state if self._state_of > held.number \
            and held.hooks.get("restore") else None
        if not await self._resume(held, None, newer):
            self._retire_later(held)  # killed by _resume: reap it
            return None
        self._make_current(held, held.spec)
        self._state_of = held.number  # its own state is the newest from here on
        self._release_sockets()  # addresses only the dead one had
        return self._report(f"{error}, on probation: swap rolled back, {held.tag} serves again"
                            f"{' from the newest checkpoint' if newer else ''} (the same files "
                            f"are not tried again until they change)", BundleState.RUNNING,
                            Result.ROLLED_BACK)

    async def _ping_loop(self) -> None:
        """Ping the serving generation: a loop blocked past ping_timeout is hung."""
        while True:
            timing = self._serving.timing if self._serving is not None else None
            interval = timing.ping_interval if timing is not None else 0.0
            await asyncio.sleep(interval or 1.0)
            gen = self.current
            if not interval or gen is None or gen.state is not S.READY:
                continue
            timeout = gen.spec.timing.ping_timeout
            try:
                await gen.process.call(P.OP_PING, timeout)
            except WorkerError:
                # A long snapshot() blocks the loop too, with its own deadline.
                if gen is self.current and gen.state is S.READY and not self._checkpointing \
                        and not gen.process.exited.done():
                    gen.hung = (f"did not answer a ping within {timeout:g}s (its event loop "
                                f"is blocked) and was killed")
                    self.log.error("%s: %s", gen.tag, gen.hung)
                    gen.process.kill()  # its exit wakes the loop, which restarts it

    async def _checkpoint_loop(self) -> None:
        """Ask the loop for a checkpoint every checkpoint_interval."""
        while True:
            timing = self._serving.timing if self._serving is not None else None
            interval = timing.checkpoint_interval if timing is not None else 0.0
            await asyncio.sleep(interval or 1.0)
            if interval and self.current is not None and self.current.hooks.get("snapshot"):
                self._checkpoint_due = True
                self._wake.set()

    async def _checkpoint(self) -> None:
        """Snapshot the serving generation without pausing it, and keep that."""
        gen = self.current
        if gen is None or gen.state is not S.READY:
            return
        timing = gen.spec.timing
        self._checkpointing = True
        try:
            _, data = await gen.process.call(P.OP_SNAPSHOT, timing.quiesce_timeout + STOP_GRACE,
                                             max_bytes=timing.max_snapshot_bytes)
        except WorkerError as exc:
            self.log.error("%s: checkpoint failed: %s", gen.tag, exc)
            return
        finally:
            self._checkpointing = False
        if data is not None:
            await self._keep_state(data, gen)

    async def _keep_state(self, data: bytes, gen: Generation) -> None:
        """The newest state, in memory and (atomically) on disk."""
        self._last_state = data
        self._state_of = gen.number
        store = self.svc.checkpoints
        if store is None:
            return
        try:
            saved = await asyncio.to_thread(store.save, self.name, gen.number, data)
        except CheckpointError as exc:  # kept in memory: a crash restart still has it
            self.log.error("%s: checkpoint not written: %s", gen.tag, exc)
            return
        self.checkpoint = (saved.size, time.time())
        self.log.debug("%s: checkpoint of %d bytes written in %.1f ms", gen.tag, saved.size,
                       saved.duration * 1000)

    async def _read_checkpoint(self) -> bytes | None:
        """The state a previous supervisor left on disk, if it is sound."""
        store = self.svc.checkpoints
        if store is None:
            return None
        try:
            found = await asyncio.to_thread(store.load, self.name)
        except CheckpointError as exc:
            self.log.error("%s: %s; starting without it", self.name, exc)
            return None
        if found is not None:
            self.log.info("%s: resuming from the checkpoint of generation %d (%d bytes, %s)",
                          self.name, found.generation, found.size,
                          time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(found.created)))
            return found.payload
        return None

    def _retire_later(self, gen: Generation, keep: bool = False) -> asyncio.Task[None]:
        """Retire ``gen`` in a task of its own (close() waits for every one)."""
        task = asyncio.ensure_future(self._retire(gen, keep))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)
        return task

    async def _retire(self, gen: Generation, keep: bool = False) -> None:
        """Ask (retire: drain, stop(), exit), wait until the deadline, kill, reap.

        ``keep``: take its snapshot once drained (nothing changes it after
        that) and keep it as the newest state, on disk too.
        """
        self._move(gen, S.RETIRING)
        timing = gen.spec.timing
        drain = timing.drain_timeout
        try:
            _, state = await gen.process.call(P.OP_RETIRE, drain + STOP_GRACE,
                                              drain_timeout=drain, snapshot=keep,
                                              max_bytes=timing.max_snapshot_bytes)
            if keep and state is not None:
                await self._keep_state(state, gen)
        except WorkerError as exc:
            self.log.warning("%s: retire: %s", gen.tag, exc)
        if not await gen.process.wait_exit(STOP_GRACE):
            self.log.warning("%s: still running after retiring; killing it", gen.tag)
        gen.process.kill()  # the whole group: helpers it left behind too
        await gen.process.wait_exit(STOP_GRACE)
        self._move(gen, S.EXITED)
        await self._forget(gen)
        self._release_sockets()
        self.log.info("%s: retired", gen.tag)

    async def _discard(self, gen: Generation, why: str) -> None:
        """Kill a generation that will never serve (or a discard cut short), and reap it."""
        if gen.state is not S.FAILED:
            self._move(gen, S.FAILED)
        gen.process.kill()
        if not await gen.process.wait_exit(STOP_GRACE):
            self.log.error("%s: did not exit after SIGKILL", gen.tag)
        await self._forget(gen)
        self._release_sockets()
        self.log.debug("%s: discarded: %s", gen.tag, why)

    async def _forget(self, gen: Generation) -> None:
        await gen.process.close()
        self._gens.pop(gen.number, None)

    def _move(self, gen: Generation, to: GenState) -> None:
        if to not in MOVES[gen.state]:
            raise IllegalMove(f"{gen.tag}: {gen.state.value} -> {to.value} is not a legal move")
        self.log.debug("%s: %s -> %s", gen.tag, gen.state.value, to.value)
        gen.state = to

    # -- helpers ------------------------------------------------------------------

    def _on_exit(self, gen: Generation) -> None:
        # Only the serving generation's death needs the loop (the others are
        # awaited by the step that owns them). A pass at any other moment
        # could read a file in mid-write.
        if gen is self.current and not self._closed:
            self._wake.set()

    def _retry_later(self) -> str:
        """Schedule another try of the same content; what to add to the report."""
        self._cancel_retry()
        if self._busy_retries >= BUSY_RETRIES:
            return f"; gave up after {BUSY_RETRIES} tries (SIGHUP or an edit tries again)"
        delay = BUSY_RETRY_FIRST * 2 ** self._busy_retries
        self._busy_retries += 1
        self._retry = asyncio.get_running_loop().call_later(delay, self.request, True)
        return f"; trying again in {delay:g}s"

    def _cancel_retry(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None

    def _make_current(self, gen: Generation, spec: BundleSpec) -> None:
        self.current = gen
        gen.serving_since = time.monotonic()
        self._serving = spec
        self.state = BundleState.RUNNING
        if gen.process.exited.done():  # it died while we made it current
            self._wake.set()

    def _release_sockets(self) -> None:
        """Close the sockets that neither a live generation nor the bundle still needs."""
        keep = [g.spec for g in self._gens.values()]
        keep += [spec for spec in (self._serving, self._spawning) if spec is not None]
        self.svc.sockets.release_unused(self, keep)

    def _report(self, message: str, state: BundleState,
                result: Result = Result.FAILED) -> Outcome:
        """An error for the log and status; the bundle is now in ``state``."""
        self.last_error = message
        self.state = state
        self.log.error("%s: %s", self.name, message)
        return Outcome(result, message)


class SwapTimes:
    """A histogram of swap durations for metrics: cumulative counts per bucket.

    ``SWAP_MS_BUCKETS`` are the upper bounds in ms; a last count (+Inf) is
    every swap. Constant size, whatever the number of swaps.
    """

    def __init__(self) -> None:
        self.counts = [0] * (len(SWAP_MS_BUCKETS) + 1)
        self.sum_ms = 0.0

    def add(self, ms: float) -> None:
        self.sum_ms += ms
        for i in range(bisect.bisect_left(SWAP_MS_BUCKETS, ms), len(self.counts)):
            self.counts[i] += 1

    def as_dict(self) -> dict[str, Any]:
        return {"le": list(SWAP_MS_BUCKETS), "counts": list(self.counts),
                "sum": round(self.sum_ms, 3)}


#: Upper bounds (ms) of the swap-duration buckets status() carries.
SWAP_MS_BUCKETS = (5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0,
                   10000.0)


def _round(value: float | None) -> float | None:
    return round(value, 1) if value is not None else None
