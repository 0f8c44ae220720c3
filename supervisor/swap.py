"""The swap: every generation of one bundle, from first start to retirement.

``BundleRunner`` owns one bundle. Its one task takes the events of its
``mailbox`` (files changed, reload, stop, run, a generation exited, a
checkpoint or a ping due, probation over, a backoff over, a retirement
over) one at a time, in order, and is the only writer of the bundle's
state: timers, callbacks and the supervisor only put events in the mailbox.
So there is never more than one swap at a time, and passes asked for during
a swap are taken together as one more. A generation's own moves and states
are in ``generation``; what ``hotsup status`` shows is derived from them.

A swap (DESIGN.md, "A generation swap"), as ``_swap`` reads:

    spawn N+1 ............................ SPAWNING   (N serves)
    N+1 imports and constructs ........... LOADED     (N serves)
    hand-over mode (N has snapshot(), N+1 has restore()):
        pause N, wait in-flight, snapshot  N: PAUSED  (nobody accepts;
          (idle connections parked)                    the backlog holds)
        N+1 adopts them; restore(state);
        N+1.start() ...................... READY
    overlap mode:
        N+1.start() ...................... READY      (both accept)
        N lets go of its idle connections  N: PAUSED  (N+1 takes them up)
    N drops what it handed over .......... (handed)
    hold N for probation ................. N: HELD    (paused, still loaded)
    probation over: drain, stop(), exit .. N: RETIRING -> EXITED

A change seen by the watcher (``LoadAhead``, before its quiet period ends)
spawns and loads N+1 at once, while N serves; more changes drop it and load
again. The pass after the quiet period then starts from LOADED if the content
is still what N+1 loaded (``Ahead``): the quiet period hides spawn and import.

Any failure before N+1 is READY kills N+1 and resumes N if it was paused:
the old generation keeps serving with its state and its connections (those it
parked are served there again), and the error is reported.
If N+1 dies while N is held, N resumes (from a newer checkpoint of N+1's,
if one was taken) and the swap counts as rolled back.

Around the swaps, timers armed when a generation becomes current: it is
pinged every ``ping_interval`` (no answer within ``ping_timeout``: its loop
is blocked, it is killed and restarted) and checkpointed every
``checkpoint_interval`` (``checkpoint.CheckpointStore``; at every swap and
at shut-down too). A generation that dies while serving is restarted from
the newest state after a backoff (``intensity``), a timer too, so a ``stop``
or ``reload`` is answered during it.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import enum
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from .checkpoint import CheckpointError, CheckpointStore
from .config import BundleSource, BundleSpec, Config, ConfigError, load_bundle
from .generation import LIVE, Generation, GenState, Handover, State, SwapAborted, Worker
from .generation import Spawner as Spawner
from .intensity import GiveUp, RestartIntensity
from .mailbox import (
    CheckpointDue,
    Event,
    Exited,
    LoadAhead,
    Mailbox,
    Pass,
    PingDone,
    PingDue,
    ProbationOver,
    Renamed,
    RestartDue,
    Retired,
    RetryDue,
    RunAsked,
    StopAsked,
    Timers,
    Waiter,
)
from .process import WorkerError
from .sockets import SocketError, SocketRegistry
from .watcher import DigestError

log = logging.getLogger("hotsup")

_S = GenState


class BundleState(enum.Enum):
    """What ``hotsup status`` shows for a bundle (``BundleRunner.state``)."""

    STARTING = "starting"
    RUNNING = "running"
    SWAPPING = "swapping"
    FAILED = "failed"
    STOPPED = "stopped"


class Result(enum.Enum):
    """How the runner handled an event (``hotsup reload`` reports it)."""

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


@dataclass(frozen=True)
class Kept:
    """The newest state the runner holds, and the generation it was taken of."""

    generation: int
    data: State


@dataclass(frozen=True)
class Ahead:
    """A generation loaded ahead of its pass (``LoadAhead``), and the content
    digest taken just before it was spawned: any later change is a newer event."""

    digest: str
    spec: BundleSpec
    gen: Generation


class Phases:
    """Where one swap's time went, step by step (``last_swap_phases`` in
    status): milliseconds since the step before, in the order they ran."""

    def __init__(self) -> None:
        self._last = time.monotonic()
        self.ms: dict[str, float] = {}

    def mark(self, step: str) -> None:
        now = time.monotonic()
        self.ms[step] = round((now - self._last) * 1000, 2)
        self._last = now


#: The events that leave a generation loaded ahead in place: any other (a stop,
#: a rename, a crash, a restart) drops it first (see ``BundleRunner._loop``).
_KEEP_AHEAD = (LoadAhead, Pass, PingDue, PingDone, CheckpointDue, ProbationOver, Retired)


@dataclass(frozen=True)
class Timings:
    """The runner's own deadlines and policies (the bundle's are in its spec)."""

    #: Extra seconds a request gets beyond its own deadline (a retiring
    #: worker's stop(), a snapshot's pickling, an exit after SIGKILL).
    grace: float = 5.0
    #: Crash restarts back off from this delay, doubling, up to backoff_max.
    backoff_first: float = 0.1
    backoff_max: float = 10.0
    #: A hand-over that found connections still in flight is tried again after
    #: busy_retry_first seconds, doubling, busy_retries times at most.
    busy_retry_first: float = 2.0
    busy_retries: int = 3


@dataclass
class Services:
    """What a runner needs from the supervisor; one instance shared by all bundles."""

    config: Config
    sockets: SocketRegistry
    spawn: Spawner
    digest: Callable[[BundleSource], Awaitable[str | None]]
    checkpoints: CheckpointStore | None = None
    timings: Timings = Timings()


#: Messages for the events a runner may still hold when it is closed.
_CLOSING = Outcome(Result.FAILED, "the supervisor is shutting down")
#: Seconds close() waits for the loop to end before it cancels it again.
_CANCEL_AGAIN = 0.5


class BundleRunner:
    """Owns one bundle: its generations, its swaps, its crash restarts."""

    def __init__(self, source: BundleSource, services: Services) -> None:
        self.source = source
        self.name = source.name
        self.svc = services
        #: Its records also go to the bundle's ring, for ``hotsup logs NAME``.
        self.log = logging.LoggerAdapter(log, {"bundle": self.name})
        self.current: Generation | None = None
        # What status shows beside the state.
        self.restarts = 0
        self.swaps = 0
        self.last_error: str | None = None
        self.last_swap_ms: float | None = None
        self.last_pause_ms: float | None = None
        self.last_swap_at: float | None = None  # unix time
        self.last_swap_phases: dict[str, float] = {}  # the last swap's Phases
        self._phases = Phases()  # the pass being made's
        self._gens: dict[int, Generation] = {}  # every generation not yet reaped
        self._number = 0  # the last generation number given
        self._kept: Kept | None = None  # the newest state
        self._disk_read = False  # whether the checkpoint on disk was looked for
        self._tried: str | None = None  # the content digest last tried
        self._passes = 0  # passes done: until the first is, the bundle is starting
        self._down = False  # the operator took it down (`hotsup stop`)
        self._closed = False
        timings = services.timings
        self._intensity = RestartIntensity(0, 0.0, timings.backoff_first, timings.backoff_max)
        self._busy_retries = 0
        # The sockets to hold even while no generation does (a crash backoff,
        # a spawn in progress): those of the spec last served and of the one
        # being spawned. None once the bundle gave up or closed.
        self._serving: BundleSpec | None = None
        self._spawning: BundleSpec | None = None
        self._mailbox = Mailbox()
        self._timers = Timers(self._mailbox)
        self._task: asyncio.Task[None] | None = None
        self._retiring: dict[asyncio.Task[State | None], Generation] = {}
        self._ahead: Ahead | None = None  # N+1 loaded during the quiet period
        #: (digest, spec, error) of content whose load ahead failed in its code:
        #: the pass after the quiet period reports it, without loading it again.
        self._ahead_failed: tuple[str, BundleSpec, str] | None = None
        self._loading_ahead = False  # ... being spawned and loaded now
        self._final: set[int] = set()  # generations retiring with their final snapshot
        self._lost: str | None = None  # what `run` starts from, when that snapshot failed
        self._pings: set[asyncio.Task[None]] = set()
        self._checkpointed = 0  # the generation of the newest checkpoint written
        self._checkpoint: dict[str, Any] | None = None  # what status says of it
        self._warnings: list[str] = []  # what the event being handled could not keep
        # -- kept for supervisor/metrics.py, which reads them through status() --
        self.outcomes: collections.Counter[str] = collections.Counter()  # results of passes
        self.swap_times = SwapTimes()  # durations of the swaps that served
        self._handlers: dict[type[Event], Callable[[Any], Coroutine[Any, Any, Outcome | None]]] = {
            Pass: self._on_pass,
            LoadAhead: self._on_load_ahead,
            StopAsked: self._on_stop,
            RunAsked: self._on_run,
            Renamed: self._on_renamed,
            Exited: self._on_exited,
            RestartDue: self._on_restart_due,
            RetryDue: self._on_retry_due,
            CheckpointDue: self._on_checkpoint_due,
            PingDue: self._on_ping_due,
            PingDone: self._on_ping_done,
            ProbationOver: self._on_probation_over,
            Retired: self._on_retired,
        }

    def start(self) -> None:
        """Start the bundle's loop; its first pass starts generation 1."""
        self._mailbox.put(Pass(force=True))
        self._task = asyncio.ensure_future(self._loop())

    # -- what the supervisor asks ----------------------------------------------------

    def load_ahead(self) -> None:
        """Files are changing: load the next generation now, swap at the pass."""
        self._mailbox.put(LoadAhead())

    def request(self, force: bool = False) -> None:
        """Ask for a pass: a swap if the content changed (or always, if ``force``)."""
        self._mailbox.put(Pass(force))

    def reload(self, discard_state: bool = False) -> Waiter:
        """Swap now, even if nothing changed; the future gets the pass's report.
        ``discard_state``: without the old generation's state (it is lost)."""
        waiter = self._waiter()
        self._mailbox.put(Pass(True, (waiter,), discard_state))
        return waiter

    def stop(self) -> Waiter:
        """Take the bundle down (``hotsup stop``): retire its generation, close its
        ports, ignore file changes until ``run_again()``."""
        waiter = self._waiter()
        self._mailbox.put(StopAsked(waiter))
        return waiter

    def run_again(self) -> Waiter:
        """Bring a stopped or failed bundle back (``hotsup run``), as if its
        files were new: crash history and retries start afresh."""
        waiter = self._waiter()
        self._mailbox.put(RunAsked(waiter))
        return waiter

    def rename(self, source: BundleSource) -> None:
        """Carry on as ``source`` (its directory was renamed): generation, state
        and sockets carry over; the code there is swapped in."""
        self._mailbox.put(Renamed(source))

    @property
    def content(self) -> str | None:
        """The digest of the content last tried (a renamed directory keeps it)."""
        return self._tried

    @property
    def stopped(self) -> bool:
        return self._down

    @property
    def state(self) -> BundleState:
        """Derived from the generations, never assigned."""
        if self._closed or self._down:
            return BundleState.STOPPED
        # A generation loaded ahead is not a swap yet: the pass decides.
        ahead = self._ahead.gen if self._ahead is not None else None
        bringing_up = (self._spawning is not None and not self._loading_ahead) or any(
            gen.state in (_S.SPAWNING, _S.LOADED) and gen is not ahead
            for gen in self._gens.values())
        if self.current is not None:
            return BundleState.SWAPPING if bringing_up else BundleState.RUNNING
        if bringing_up or self._timers.armed("restart") or self._passes == 0:
            return BundleState.STARTING
        return BundleState.FAILED

    def report(self, outcome: Outcome, duration_ms: float) -> dict[str, Any]:
        """What ``hotsup reload/stop/run`` print for ``outcome`` (control.py's "report").
        ``warnings``: what the pass could not keep (a checkpoint not written)."""
        return {"name": self.name, "result": outcome.result.value, "ok": outcome.ok,
                "message": outcome.message,
                "generation": self.current.number if self.current else None,
                "duration_ms": _round(duration_ms), "warnings": list(self._warnings)}

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
            "last_swap_phases": self.last_swap_phases,
            "log_dropped": gen.process.log_dropped if gen else 0,
            "pss_kib": gen.process.pss_kib if gen else None,
            # Every live worker, the serving one too: a held or retiring
            # generation costs memory until it has gone.
            "workers": [{"generation": g.number, "state": g.state.value, "pid": g.process.pid,
                         "pss_kib": g.process.pss_kib}
                        for g in self._gens.values() if g.state in LIVE],
            "swaps": self.swaps,
            "sockets": self.svc.sockets.addresses(self),
            "checkpoint": self._checkpoint,
            "outcomes": dict(self.outcomes),
            "swap_ms": self.swap_times.as_dict(),
            "checkpoint_bytes": (self._checkpoint or {}).get("bytes"),
            "checkpoint_at": (self._checkpoint or {}).get("at"),
        }

    async def close(self) -> list[str]:
        """Stop the loop (cutting short a swap), retire every serving generation
        (drain, stop(), exit), kill the others, release the sockets. What state
        could not be kept (the final snapshot not taken, or not written), one
        line each for a person; each is logged too.

        Once the loop's task has ended, this is the runner's only writer.
        """
        self._closed = True
        while self._task is not None and not self._task.done():
            # Again if a cancellation was swallowed on the way (Python 3.11's
            # wait_for does, when what it waits for ends at the same moment):
            # the loop also ends once it sees _closed.
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=_CANCEL_AGAIN)
        self._ahead = None  # LOADED: discarded below with the others
        self._warnings = []  # from here on: what the shut-down could not keep
        self._timers.cancel_all()
        for ping in list(self._pings):
            ping.cancel()
        await asyncio.gather(*self._pings, return_exceptions=True)
        # The shut-down checkpoint, what a restarted supervisor resumes from:
        # the serving generation's state once it has drained.
        keep = self.current if self.current and self.current.hooks.snapshot else None
        self.current = None
        self._serving = None
        for gen in list(self._gens.values()):
            if gen.state in (_S.READY, _S.PAUSED, _S.HELD):
                self._retire_later(gen, keep=gen is keep)
            elif gen.state in (_S.SPAWNING, _S.LOADED, _S.FAILED):  # FAILED: a discard cut short
                await gen.discard("shutting down")
                self._forget(gen)
            # RETIRING: its retire task, awaited below, finishes it
        while True:  # every retirement recorded, every waiter answered
            await asyncio.gather(*self._retiring, return_exceptions=True)
            for event in self._mailbox.drain():
                if isinstance(event, Retired):
                    await self._on_retired(event)
                else:
                    self._answer(event.waiters, _CLOSING, time.monotonic())
            if not self._retiring:
                break
        self.svc.sockets.release_unused(self, [])
        store = self.svc.checkpoints
        if store is not None and self._number:  # numbers go on in the next run
            try:
                await asyncio.to_thread(store.record, self.name, self._number, self._checkpointed)
            except CheckpointError as exc:
                self.log.error("%s: %s", self.name, exc)
        return list(self._warnings)

    # -- the loop --------------------------------------------------------------------

    async def _loop(self) -> None:
        while not self._closed:
            event = await self._mailbox.get()
            if isinstance(event, Pass):
                event = self._mailbox.merged(event)
            started = time.monotonic()
            outcome: Outcome | None = _CLOSING
            self._warnings = []
            try:
                if self._ahead is not None and self._drops_ahead(event):
                    await self._drop_ahead(f"{type(event).__name__} came first")
                outcome = await self._handlers[type(event)](event)
            except Exception:
                self.log.exception("%s: internal error in the swap loop", self.name)
                outcome = Outcome(Result.FAILED, "internal error (see the supervisor's log)")
            finally:  # also when close() cancels the loop: nobody waits for ever
                if isinstance(event, Pass | RunAsked):
                    self._passes += 1
                # A death that only arms a restart is counted when the restart is made.
                armed = isinstance(event, Exited) and outcome is not None \
                    and outcome.result is Result.RESTARTED
                if outcome is not None and outcome is not _CLOSING and not armed:
                    self.outcomes[outcome.result.value] += 1
                self._answer(event.waiters, outcome or Outcome(Result.UNCHANGED), started)

    def _answer(self, waiters: tuple[Waiter, ...], outcome: Outcome, started: float) -> None:
        if not waiters:
            return
        report = self.report(outcome, (time.monotonic() - started) * 1000)
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(report)

    # -- the handlers: each returns how it went (None: nothing to say) ---------------------

    async def _on_pass(self, event: Pass) -> Outcome:
        try:
            if self._down:
                return Outcome(Result.STOPPED,
                               f"stopped (`hotsup run {self.name}` brings it back)")
            if self.current is not None and self.current.process.exited.done():
                return await self._recover(self.current)  # its Exited event is still queued
            return await self._advance(event.force, restarting=False,
                                       discard_state=event.discard_state)
        finally:
            if self._ahead is not None:  # the pass did not want it (no change, a restart)
                await self._drop_ahead("the pass did not use it")

    async def _on_load_ahead(self, event: LoadAhead) -> None:
        """Spawn and load (not start) the next generation while the current one
        serves: what the pass after the quiet period would do first. Nothing is
        reported: a failure here is the pass's to find again and report."""
        if self._ahead is not None:
            await self._drop_ahead("newer changes")
        self._ahead_failed = None
        current = self.current
        if self._mailbox.waiting(LoadAhead) or self._down or current is None \
                or current.state is not _S.READY:
            return None  # a newer one follows, or there is nothing to swap from
        try:
            digest = await self.svc.digest(self.source)
        except DigestError:
            return None  # a name not UTF-8, a tree over the limits: the pass says which
        if digest is None or digest == self._tried:
            return None  # a touch, or back to what serves: no swap will come
        try:
            spec = load_bundle(self.source, self.svc.config)
        except ConfigError:
            return None
        self._loading_ahead = True
        try:
            new = await self._spawn(spec)
        except SwapAborted:
            return None
        finally:
            self._loading_ahead = False
        self._ahead = Ahead(digest, spec, new)
        self._loading_ahead = True
        try:
            await new.load()
        except SwapAborted as exc:
            await self._drop_ahead(str(exc))
            if exc.in_code:
                self._ahead_failed = (digest, spec, str(exc))
            return None
        finally:
            self._loading_ahead = False
        self.log.debug("%s: loaded ahead of the pass", new.tag)
        return None

    def _drops_ahead(self, event: Event) -> bool:
        if isinstance(event, Exited):  # its own death, or the one it would replace
            return self._ahead is not None and event.gen in (self._ahead.gen, self.current)
        return not isinstance(event, _KEEP_AHEAD)

    def _take_ahead(self, digest: str, spec: BundleSpec) -> Generation | None:
        """The generation loaded ahead, if it loaded this very content and spec."""
        ahead, self._ahead = self._ahead, None
        if ahead is None:
            return None
        if ahead.digest == digest and ahead.spec == spec and ahead.gen.state is _S.LOADED \
                and not ahead.gen.process.exited.done():
            return ahead.gen
        self._ahead = ahead  # the pass's finally drops it
        return None

    async def _drop_ahead(self, why: str) -> None:
        """Kill the generation loaded ahead. It never served: its number goes
        to the next generation, so numbers count the generations passes made."""
        ahead, self._ahead = self._ahead, None
        if ahead is None:
            return
        await ahead.gen.discard(f"loaded ahead, dropped: {why}")
        self._forget(ahead.gen)
        if self._number == ahead.gen.number:
            self._number -= 1

    async def _on_stop(self, event: StopAsked) -> Outcome:
        if self._down and not any(gen.state in LIVE for gen in self._gens.values()):
            return Outcome(Result.STOPPED, "already stopped")
        self._down = True
        self._timers.cancel("restart")
        self._timers.cancel("retry")
        self._end_probation()
        gen, self.current = self.current, None
        self._serving = None
        self._disarm()
        if gen is not None:
            # Drain, keep its final state (`hotsup run` starts from it), stop(),
            # exit; shielded: a shut-down meanwhile waits for it, not cuts it.
            self._retire_later(gen, keep=gen.hooks.snapshot)
        # Answered once every generation is gone and the ports with them.
        retiring = dict(self._retiring)
        for task, done in zip(retiring, await asyncio.shield(
                asyncio.gather(*retiring, return_exceptions=True)), strict=True):
            await self._on_retired(Retired(retiring[task],
                                           None if isinstance(done, BaseException) else done))
        self._release_sockets()
        self.log.info("%s: stopped", self.name)
        return Outcome(Result.STOPPED, f"{gen.tag} retired" if gen else "nothing was running")

    async def _on_run(self, event: RunAsked) -> Outcome:
        if self.current is not None and not self._down:
            return Outcome(Result.UNCHANGED, f"already {self.state.value}")
        self._down = False
        self._tried = None
        outcome = await self._advance(force=True, restarting=False)
        lost, self._lost = self._lost, None
        if lost is not None and outcome.ok:  # said at the stop; said again here
            outcome = Outcome(outcome.result, f"{outcome.message} ({lost})")
        return outcome

    async def _on_renamed(self, event: Renamed) -> Outcome | None:
        old, self.source, self.name = self.name, event.source, event.source.name
        self.log = logging.LoggerAdapter(log, {"bundle": self.name})
        self.log.info("%s: renamed from %s; its generation, state and sockets carry over",
                      self.name, old)
        store = self.svc.checkpoints
        if store is not None:  # its state is on disk under the new name, never the old
            if self._kept is not None:
                await self._write(self._kept)
            try:
                await asyncio.to_thread(store.discard, old)
            except CheckpointError as exc:
                self.log.error("%s: %s (remove it by hand: a bundle named %s would resume "
                               "from it)", self.name, exc, old)
        if self._down:
            return None
        return await self._advance(force=True, restarting=False)

    async def _on_exited(self, event: Exited) -> Outcome | None:
        gen = event.gen
        if gen is self.current:
            return await self._recover(gen)
        if gen.state is _S.HELD:  # died on probation: there is no way back any more
            self._timers.cancel("probation")
            gen.move(_S.FAILED)
            await gen.process.close()
            self._forget(gen)
        # Any other generation's exit is seen by the step that owns it.
        return None

    async def _on_restart_due(self, event: RestartDue) -> Outcome | None:
        if self._down or self.current is not None:
            return None
        return await self._advance(force=True, restarting=True)

    async def _on_retry_due(self, event: RetryDue) -> Outcome | None:
        if self._down or self.current is None:
            return None
        return await self._advance(force=True, restarting=False)

    async def _on_checkpoint_due(self, event: CheckpointDue) -> None:
        gen = event.gen
        if gen is not self.current or gen.state is not _S.READY:
            return
        data = await gen.snapshot()
        if data is not None:
            await self._keep(data, gen)
        if gen is self.current:
            self._arm_checkpoint(gen)

    async def _on_ping_due(self, event: PingDue) -> None:
        gen = event.gen
        if gen is not self.current or gen.state is not _S.READY:
            return
        sent_at = asyncio.get_running_loop().time()

        async def ping() -> None:
            self._mailbox.put(PingDone(gen, sent_at, await gen.ping()))

        task = asyncio.ensure_future(ping())
        self._pings.add(task)
        task.add_done_callback(self._pings.discard)

    async def _on_ping_done(self, event: PingDone) -> None:
        gen = event.gen
        if gen is not self.current or gen.state is not _S.READY or gen.process.exited.done():
            return
        # A long request (a checkpoint's snapshot()) blocks the worker's loop
        # too, with its own deadline: an answer to it since the ping was sent
        # says the loop is alive.
        if event.hung is not None and gen.answered_at < event.sent_at:
            gen.hung = event.hung
            self.log.error("%s: %s", gen.tag, gen.hung)
            gen.process.kill()  # its exit comes as an event, and restarts it
            return
        self._arm_ping(gen)

    async def _on_probation_over(self, event: ProbationOver) -> None:
        if event.gen.state is _S.HELD:
            self._retire_later(event.gen)

    async def _on_retired(self, event: Retired) -> None:
        gen = event.gen
        if self._gens.get(gen.number) is not gen:  # recorded already (a stop waited for it)
            return
        gen.move(_S.EXITED)
        final = gen.number in self._final
        self._final.discard(gen.number)
        if event.state is not None:
            await self._keep(event.state, gen)
        elif final:
            self._state_lost(gen)
        self._forget(gen)
        self.log.info("%s: retired", gen.tag)

    # -- the steps ----------------------------------------------------------------------

    async def _advance(self, force: bool, restarting: bool,
                       discard_state: bool = False) -> Outcome:
        """Start the bundle, or swap it, if its content changed since the last try."""
        started = time.monotonic()
        self._phases = phases = Phases()
        try:
            digest = await self.svc.digest(self.source)
        except DigestError as exc:  # a symlink loop, a tree over the limits: say which
            self._tried = None  # the next change looks again
            return self._record_error(f"cannot load the bundle: {exc}",
                                      Result.FAILED if self.current is None
                                      else Result.ROLLED_BACK)
        phases.mark("digest")
        if digest is None:  # the supervisor removes us
            return Outcome(Result.UNCHANGED, "the bundle directory is gone")
        if not force and digest == self._tried:
            return Outcome(Result.UNCHANGED, "no change")
        if digest != self._tried:  # new content: a fresh start for its tries and restarts
            self._busy_retries = 0
            self._intensity.reset()
        self._tried = digest
        self._timers.cancel("retry")  # this pass is the try it was waiting for
        self._timers.cancel("restart")  # ... and so is this one: start now
        try:
            spec = load_bundle(self.source, self.svc.config)
        except ConfigError as exc:
            message = "cannot load the bundle: " + "; ".join(exc.problems)
            if self.current is not None:
                return self._record_error(message, Result.ROLLED_BACK)
            if restarting and self._serving is not None:
                return self._crashed(message, self._serving)
            return self._record_error(message, Result.FAILED)
        if discard_state:
            await self._drop_state()
        phases.mark("manifest")
        if self.current is None:
            if not self._disk_read:
                self._disk_read = True
                kept = await self._read_checkpoint()
                self._kept = kept or self._kept
            return await self._start(spec, restarting)
        failed, self._ahead_failed = self._ahead_failed, None
        if failed is not None and not force and failed[:2] == (digest, spec):
            return self._failed_ahead(failed[2])
        return await self._swap(spec, started, discard_state, self._take_ahead(digest, spec))

    def _failed_ahead(self, error: str) -> Outcome:
        """The generation loaded ahead of this pass could not load this very
        content (its code failed): say it as the swap would have, without
        importing the same broken code a second time."""
        assert self.current is not None
        self._number += 1  # the attempt it was: generation numbers count attempts
        return self._rolled_back(f"{self.name}@{self._number}", self.current, error)

    def _rolled_back(self, tag: str, old: Generation, why: str) -> Outcome:
        """Report a swap to ``tag`` that did not happen: ``old`` serves on."""
        return self._record_error(f"swap to {tag} rolled back, {old.tag} keeps serving: {why}",
                                  Result.ROLLED_BACK)

    async def _start(self, spec: BundleSpec, restarting: bool) -> Outcome:
        """Bring up a generation when none is serving (first start, restart)."""
        try:
            new = await self._spawn(spec)
        except SwapAborted as exc:
            return self._crashed(str(exc), spec) if restarting \
                else self._record_error(str(exc), Result.FAILED)
        given: State | None = None
        try:
            await new.load()
            given = self._kept.data if self._kept is not None and new.hooks.restore else None
            await new.begin(given)
        except SwapAborted as exc:
            await new.discard(str(exc))
            self._forget(new)
            hint = ""
            if given is not None and self.svc.checkpoints is not None:
                hint = (f" (if the saved state does not suit this code, fix restore() or "
                        f"delete {self.svc.checkpoints.path(self.name)} to start without it)")
                self._kept, self._disk_read = None, False  # the next start reads it anew
            message = f"{new.tag} did not start: {exc}{hint}"
            return self._crashed(message, spec) if restarting \
                else self._record_error(message, Result.FAILED)
        self._make_current(new, spec)
        self.log.info("%s: serving (pid %s)", new.tag, new.process.pid)
        if restarting:  # last_error still says why it had to be
            return Outcome(Result.RESTARTED, f"{new.tag} serving")
        self.last_error = None  # a start of new content, or `hotsup run`: the old error is past
        return Outcome(Result.STARTED, f"{new.tag} serving")

    async def _swap(self, spec: BundleSpec, started: float, discard_state: bool,
                    ahead: Generation | None = None) -> Outcome:
        """Swap to ``spec``: from ``ahead`` if a generation of it was loaded
        ahead (LOADED already), else from a new spawn."""
        old = self.current
        assert old is not None
        # Newer code serves: the one held before it is obsolete. Its retirement
        # (a request, an exit, a reaping) waits until this swap has switched
        # or failed, rather than compete with the pause for the CPU.
        switched = asyncio.Event()
        self._end_probation(after=switched)
        try:
            return await self._switch(old, spec, started, discard_state, ahead)
        finally:
            switched.set()

    async def _switch(self, old: Generation, spec: BundleSpec, started: float,
                      discard_state: bool, ahead: Generation | None) -> Outcome:
        phases = self._phases
        if ahead is not None:
            new = ahead
            phases.ms["loaded_ahead"] = 1.0
        else:
            try:
                new = await self._spawn(spec)
            except SwapAborted as exc:
                return self._record_error(f"swap aborted, {old.tag} keeps serving: {exc}",
                                          Result.ROLLED_BACK)
        paused_at: float | None = None
        snapshot: State | None = None
        handover: Handover | None = None
        phases.mark("spawn")
        try:
            if new.state is _S.SPAWNING:
                await new.load()
            phases.mark("load")
            if old.hands_over_to(new) and not discard_state:
                paused_at = time.monotonic()
                handover = await old.pause()
                snapshot = handover.snapshot
                phases.mark("pause_snapshot")
                await new.begin(snapshot, handover)
            else:
                await new.begin(None)
            phases.mark("restore_start")
        except Exception as exc:
            if handover is not None:
                handover.close()
            await new.discard(str(exc))
            self._forget(new)
            # Resuming serves the connections it parked again, where they stopped.
            resumed = old.state is not _S.PAUSED or await old.resume()
            if not resumed and snapshot is not None:
                # It is being killed; its exit restarts the bundle, from this
                # snapshot: it holds everything, nothing was accepted since.
                self._kept = Kept(old.number, snapshot)
            if not isinstance(exc, SwapAborted):
                raise  # a bug: the loop logs it; the old generation is serving again
            if resumed:
                again = self._retry_later() if exc.transient else ""
                if paused_at is not None and snapshot is None and not exc.transient:
                    again = (f" (`hotsup reload {self.name} --discard-state` swaps to the new "
                             f"code without the state)")
                return self._rolled_back(new.tag, old, f"{exc}{again}")
            return self._record_error(f"swap to {new.tag} rolled back: {exc}; {old.tag} could "
                                      f"not resume and is restarted", Result.ROLLED_BACK)
        ready_at = time.monotonic()
        await self._carried(old, new, handover)
        phases.mark("carry")
        self._make_current(new, spec)
        self.last_error = None
        self._busy_retries = 0
        self.swaps += 1
        self.last_swap_at = time.time()
        self.last_swap_ms = (ready_at - started) * 1000
        self.last_pause_ms = (ready_at - paused_at) * 1000 if paused_at is not None else 0.0
        self.swap_times.add(self.last_swap_ms)
        mode = "hand-over" if paused_at is not None else \
            "without state" if discard_state else "overlap"
        self.log.info("%s: swapped from %s in %.1f ms (%s, paused %.1f ms)", new.tag, old.tag,
                      self.last_swap_ms, mode, self.last_pause_ms)
        phases.mark("log")
        await self._hold(old, new.spec.timing.probation)
        phases.mark("hold")
        if snapshot is not None:
            await self._keep(snapshot, old)
            phases.mark("keep_state")
        self.last_swap_phases = phases.ms
        return Outcome(Result.SWAPPED, f"{old.tag} -> {new.tag} ({mode}, paused "
                                       f"{self.last_pause_ms:.1f} ms)")

    async def _carried(self, old: Generation, new: Generation,
                       handover: Handover | None) -> None:
        """``new`` serves: the connections ``old`` parked are its now (a
        hand-over's), or (overlap mode) ``old`` lets its idle ones go to it."""
        if handover is None and old.state is _S.READY:
            handover = await old.let_go()
            if handover is not None and handover.connections and \
                    not await new.take_over(handover):
                handover.close()
                return  # they stay parked with the old one until its drain ends
        if handover is None:
            return
        carried = handover.connections
        handover.close()  # the successor holds its own copies now
        if carried:
            await old.handed()
            self.log.info("%s: %d connection(s) carried from %s", new.tag, carried, old.tag)

    async def _recover(self, crashed: Generation) -> Outcome:
        """The serving generation died: the held one serves again if there is
        one, else a restart after a backoff."""
        how = crashed.hung or await crashed.process.describe_exit()
        crashed.move(_S.FAILED)
        await crashed.process.close()
        self._forget(crashed)
        self.current = None
        self._disarm()
        error = f"{crashed.tag} {how} while serving"
        held = self._held()
        if held is not None:
            self._timers.cancel("probation")
            outcome = await self._fall_back(held, error)
            if outcome is not None:
                return outcome
        return self._crashed(error, crashed.spec)

    def _crashed(self, error: str, spec: BundleSpec) -> Outcome:
        """Nothing serves after ``error``: arm the restart, within the restart
        intensity of ``spec`` (more than max_restarts in restart_window: give up)."""
        self._intensity.max_restarts = spec.timing.max_restarts
        self._intensity.window = spec.timing.restart_window
        verdict = self._intensity.record(time.monotonic())
        if isinstance(verdict, GiveUp):
            self._serving = None
            self._release_sockets()  # refuse clients rather than leave them queued
            return self._record_error(f"{error}; {verdict.failures} failures within "
                                      f"{verdict.window:g}s, giving up until the files "
                                      f"change or `hotsup run {self.name}`", Result.FAILED)
        self.restarts += 1
        self._timers.arm("restart", verdict, RestartDue())
        return self._record_error(f"{error}; restarting in {verdict:.1f}s", Result.RESTARTED)

    async def _fall_back(self, held: Generation, error: str) -> Outcome | None:
        """The new generation died on probation: the held one serves again, with
        the newest checkpoint if one was taken of its successor. None if it
        cannot (the caller restarts the bundle instead)."""
        if held.process.exited.done():
            self._retire_later(held)  # reaps it
            return None
        kept = self._kept
        newer = kept.data if kept is not None and kept.generation > held.number \
            and held.hooks.restore else None
        if not await held.resume(newer):
            self._retire_later(held)  # killed by resume(): reap it
            return None
        self._make_current(held, held.spec)
        if kept is not None:  # its own state is the newest from here on
            self._kept = Kept(held.number, kept.data)
        self._release_sockets()  # addresses only the dead one had
        return self._record_error(
            f"{error}, on probation: swap rolled back, {held.tag} serves again"
            f"{' from the newest checkpoint' if newer else ''} (the same files are not tried "
            f"again until they change)", Result.ROLLED_BACK)

    async def _hold(self, old: Generation, probation: float) -> None:
        """Keep the replaced generation paused and loaded for ``probation`` seconds
        (retire it at once if 0): the way back if its successor dies."""
        if probation <= 0 or old.process.exited.done() or not await old.hold():
            self._retire_later(old)
            return
        self._timers.arm("probation", probation, ProbationOver(old))

    def _end_probation(self, after: asyncio.Event | None = None) -> None:
        held = self._held()
        self._timers.cancel("probation")
        if held is not None:
            self._retire_later(held, after=after)

    # -- generations and their resources ------------------------------------------------

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
        gen = Generation(self._number, spec, process, self.svc.timings.grace)
        self._gens[gen.number] = gen
        process.exited.add_done_callback(lambda _: self._mailbox.put(Exited(gen)))
        self.log.debug("%s: spawned pid %d", gen.tag, process.pid)
        return gen

    def _make_current(self, gen: Generation, spec: BundleSpec) -> None:
        self.current = gen
        gen.serving_since = time.monotonic()
        self._serving = spec
        self._arm_ping(gen)
        self._arm_checkpoint(gen)

    def _arm_ping(self, gen: Generation) -> None:
        interval = gen.spec.timing.ping_interval
        if interval > 0:
            # Due on a tick common to every bundle with this interval (a
            # multiple of it on the loop's clock), not ``interval`` after this
            # bundle's last one: 50 idle bundles wake the supervisor once per
            # interval for all their pings, not 50 times.
            now = asyncio.get_running_loop().time()
            self._timers.arm("ping", interval - now % interval, PingDue(gen))

    def _arm_checkpoint(self, gen: Generation) -> None:
        interval = gen.spec.timing.checkpoint_interval
        if interval > 0 and gen.hooks.snapshot:
            self._timers.arm("checkpoint", interval, CheckpointDue(gen))

    def _disarm(self) -> None:
        """No generation is current: its timers go."""
        self._timers.cancel("ping")
        self._timers.cancel("checkpoint")

    def _held(self) -> Generation | None:
        return next((gen for gen in self._gens.values() if gen.state is _S.HELD), None)

    def _retire_later(self, gen: Generation, keep: bool = False,
                      after: asyncio.Event | None = None) -> asyncio.Task[State | None]:
        """Retire ``gen`` in a task of its own, once ``after`` is set if given;
        its end comes as a ``Retired`` event (close() waits for every one)."""
        gen.move(_S.RETIRING)
        if keep:
            self._final.add(gen.number)

        async def retire() -> State | None:
            if after is not None:
                await after.wait()
            return await gen.retire(keep)

        task = asyncio.ensure_future(retire())
        self._retiring[task] = gen

        def done(task: asyncio.Task[State | None]) -> None:
            del self._retiring[task]
            state = None if task.cancelled() or task.exception() else task.result()
            self._mailbox.put(Retired(gen, state))

        task.add_done_callback(done)
        return task

    def _forget(self, gen: Generation) -> None:
        self._gens.pop(gen.number, None)
        self._release_sockets()

    def _release_sockets(self) -> None:
        """Close the sockets that neither a live generation nor the bundle still needs."""
        keep = [g.spec for g in self._gens.values()]
        keep += [spec for spec in (self._serving, self._spawning) if spec is not None]
        self.svc.sockets.release_unused(self, keep)

    # -- state kept --------------------------------------------------------------------

    async def _keep(self, data: State, gen: Generation) -> None:
        """The newest state, in memory and (atomically) on disk."""
        self._kept = Kept(gen.number, data)
        await self._write(self._kept)

    async def _write(self, kept: Kept) -> None:
        """``kept`` to disk, and the ledger beside it; a failure is logged, shown in
        status and in the report of the event being handled."""
        store = self.svc.checkpoints
        if store is None:
            return
        tag = f"{self.name}@{kept.generation}"

        def save() -> float:
            saved = store.save(self.name, kept.generation, kept.data)
            store.record(self.name, self._number, kept.generation)
            return saved.duration

        try:
            duration = await asyncio.to_thread(save)
        except CheckpointError as exc:  # kept in memory: a crash restart still has it
            error = f"checkpoint not written: {exc}"
            self.log.error("%s: %s", tag, error)
            self._warnings.append(error)
            self._checkpoint = {**(self._checkpoint or {}), "error": error}
            return
        self._checkpointed = kept.generation
        self._checkpoint = {"generation": kept.generation, "bytes": len(kept.data),
                            "at": time.time(), "error": None}
        self.log.debug("%s: checkpoint of %d bytes written in %.1f ms", tag, len(kept.data),
                       duration * 1000)

    def _state_lost(self, gen: Generation) -> None:
        """``gen`` retired (a stop, a shut-down) without the final snapshot it
        was asked for: said in the log, status and the report, never silently."""
        why = gen.retire_error or "it exited without one"
        kept = self._kept
        since = (f"the checkpoint of generation {kept.generation}" if kept is not None
                 else "no state at all")
        message = (f"the final snapshot of {gen.tag} was not taken ({why}): its state since "
                   f"{since.replace('no state at all', 'it started')} is lost; the next "
                   f"start begins from {since}")
        self.log.error("%s: %s", self.name, message)
        self._warnings.append(message)
        self.last_error = message
        self._lost = (f"from {since}: the final snapshot of {gen.tag} was not taken"
                      if kept is not None else f"without state: the final snapshot of "
                      f"{gen.tag} was not taken")

    async def _drop_state(self) -> None:
        """``--discard-state``: forget the state, in memory and on disk."""
        self.log.warning("%s: swapping without state (--discard-state): the state of %s is "
                         "dropped", self.name, self.current.tag if self.current else "it")
        self._kept = None
        store = self.svc.checkpoints
        if store is not None:
            try:
                await asyncio.to_thread(store.discard, self.name)
            except CheckpointError as exc:
                self._warnings.append(str(exc))
                self.log.error("%s: %s", self.name, exc)

    async def _read_checkpoint(self) -> Kept | None:
        """The state a previous supervisor left on disk, if it is sound; the
        generation numbers go on from where it left them."""
        store = self.svc.checkpoints
        if store is None:
            return None
        try:
            last, checkpointed = await asyncio.to_thread(store.numbers, self.name)
        except CheckpointError as exc:
            self.log.error("%s: %s; generation numbers start again", self.name, exc)
            last, checkpointed = 0, 0
        try:
            found = await asyncio.to_thread(store.load, self.name)
        except CheckpointError as exc:
            self.log.error("%s: %s; starting without it", self.name, exc)
            found = None
        self._number = max(self._number, last, found.generation if found else 0)
        self._checkpointed = checkpointed
        if found is None:
            return None
        older = ""
        if found.generation < checkpointed:
            older = (f"; older than the newest checkpoint this installation wrote (generation "
                     f"{checkpointed}): a copy put back?")
        log_at = self.log.warning if older else self.log.info
        log_at("%s: resuming from the checkpoint of generation %d (%d bytes, %s)%s",
               self.name, found.generation, found.size,
               time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(found.created)), older)
        self._checkpoint = {"generation": found.generation, "bytes": found.size,
                            "at": found.created, "error": None}
        return Kept(found.generation, found.payload)

    # -- helpers --------------------------------------------------------------------------

    def _retry_later(self) -> str:
        """Schedule another try of the same content; what to add to the report."""
        timings = self.svc.timings
        if self._busy_retries >= timings.busy_retries:
            return f"; gave up after {timings.busy_retries} tries (SIGHUP or an edit tries again)"
        delay = timings.busy_retry_first * 2 ** self._busy_retries
        self._busy_retries += 1
        self._timers.arm("retry", delay, RetryDue())
        return f"; trying again in {delay:g}s"

    def _waiter(self) -> Waiter:
        return asyncio.get_running_loop().create_future()

    def _record_error(self, message: str, result: Result) -> Outcome:
        """Set ``message`` as the bundle's last_error and log it at ERROR."""
        self.last_error = message
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


__all__ = ["BundleRunner", "BundleState", "Kept", "Outcome", "Result", "Services", "Spawner",
           "Timings", "Worker"]
