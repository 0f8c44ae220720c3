"""One generation of a bundle: its states, its legal moves, and the requests
that make them.

A generation moves through ``GenState`` along the ``MOVES`` table, only through
``Generation.move``, which checks and logs every move. Its runner
(``swap.BundleRunner``) decides which move comes next; the methods here carry
one out on the worker process and either make the move or raise
``SwapAborted`` (the runner's swap rolls back on it)::

    SPAWNING --load--> LOADED --begin--> READY --pause--> PAUSED --hold--> HELD
                                           \\                 \\--resume--> READY
                                            \\--let_go (overlap mode)--> PAUSED
                                             \\--hold (overlap mode)--> HELD
    READY / PAUSED / HELD --(retirement)--> RETIRING --> EXITED
    any state but EXITED --(killed, died, discarded)--> FAILED

HELD is probation: the generation a swap replaced, paused and still loaded,
the way back if its successor dies. ``retire`` only talks to the process
(drain, stop(), exit, then kill and reap): it runs in a task of its own, and
the runner records its end.

Connections move with the generation that serves: ``pause`` (a hand-over's)
and ``let_go`` (overlap mode, once the successor serves) return a ``Handover``
holding the connections the worker parked; ``begin`` or ``take_over`` gives
them to the successor, then ``handed`` makes the old one drop its side, or a
``resume`` (the swap rolled back) serves them there again.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from hotsup.worker import channel, protocol

from .config import BundleSpec
from .process import LOAD_FAILED, Data, WorkerError, WorkerReply

log = logging.getLogger("hotsup")


class GenState(enum.Enum):
    SPAWNING = "spawning"
    LOADED = "loaded"
    READY = "ready"
    PAUSED = "paused"
    HELD = "held"
    RETIRING = "retiring"
    EXITED = "exited"
    FAILED = "failed"


_S = GenState
MOVES: dict[GenState, frozenset[GenState]] = {
    _S.SPAWNING: frozenset({_S.LOADED, _S.FAILED}),
    _S.LOADED: frozenset({_S.READY, _S.FAILED}),
    _S.READY: frozenset({_S.PAUSED, _S.HELD, _S.RETIRING, _S.FAILED}),
    _S.PAUSED: frozenset({_S.READY, _S.HELD, _S.RETIRING, _S.FAILED}),
    _S.HELD: frozenset({_S.READY, _S.RETIRING, _S.FAILED}),
    _S.RETIRING: frozenset({_S.EXITED, _S.FAILED}),
    _S.EXITED: frozenset(),
    _S.FAILED: frozenset(),
}

#: The states of a generation that is still a process worth keeping.
LIVE = frozenset({_S.SPAWNING, _S.LOADED, _S.READY, _S.PAUSED, _S.HELD, _S.RETIRING})


#: Seconds an overlap-mode generation letting go of its connections waits for
#: its handlers to park them (``ctx.hand_over``); what is busy then stays.
_SETTLE = 0.1

#: A snapshot as the supervisor relays and keeps it (``process.Data``).
State = Data


class IllegalMove(RuntimeError):
    pass


class SwapAborted(Exception):
    """The swap could not complete; the old generation (if any) keeps serving.

    ``transient``: nothing was wrong with the new code (the old generation had
    connections in flight), so the same content is worth another try.
    ``in_code``: the bundle's own code failed to load (the worker said so):
    the same content fails the same way.
    """

    def __init__(self, message: str, transient: bool = False, in_code: bool = False) -> None:
        super().__init__(message)
        self.transient = transient
        self.in_code = in_code


class Worker(Protocol):
    """What a generation needs of its worker process (``process.WorkerProcess``).

    Every coroutine raises ``WorkerError`` on an error reply, a timeout, or the
    process's exit; ``exited`` resolves when the process is gone.
    """

    pid: int | None
    exited: asyncio.Future[None]

    @property
    def log_dropped(self) -> int: ...  # log lines dropped for flooding
    @property
    def pss_kib(self) -> int | None: ...  # its proportional set size, None if unknown

    async def wait_loaded(self, timeout: float) -> dict[str, Any]: ...
    async def call(self, op: str, timeout: float, payload: State | None = None,
                   **fields: Any) -> tuple[dict[str, Any], State | None]: ...
    async def request(self, op: str, timeout: float, payload: State | None = None,
                      fds: Sequence[int] = (), **fields: Any) -> WorkerReply: ...
    def kill(self) -> None: ...
    async def wait_exit(self, timeout: float) -> bool: ...
    async def describe_exit(self) -> str: ...
    async def close(self) -> None: ...


#: Forks generation ``number`` of a bundle with these sockets; WorkerError if it cannot.
Spawner = Callable[[BundleSpec, int, dict[str, socket.socket]], Awaitable[Worker]]


@dataclass(frozen=True)
class Hooks:
    """Which optional hooks the bundle's code has (its ``loaded`` report)."""

    snapshot: bool = False
    restore: bool = False
    stop: bool = False

    @classmethod
    def of(cls, loaded: dict[str, Any]) -> Hooks:
        hooks = loaded.get("hooks", {})
        return cls(**{name: bool(hooks.get(name)) for name in ("snapshot", "restore", "stop")})


@dataclass
class Handover:
    """What a paused generation hands its successor: its snapshot (none in
    overlap mode), and the connections it parked, in batches as the worker gave
    them (a pickled manifest, opaque here, and one fd per connection). The fds
    are the supervisor's copies: ``close()`` once the successor has its own (or
    the swap rolled back, and the old generation serves them again)."""

    snapshot: State | None
    batches: list[tuple[State | None, tuple[int, ...]]] = field(default_factory=list)

    @property
    def connections(self) -> int:
        return sum(len(fds) for _, fds in self.batches)

    def close(self) -> None:
        for _, fds in self.batches:
            channel.close_fds(fds)
        self.batches = []


class Generation:
    """One worker process of a bundle, and where it is in its life."""

    def __init__(self, number: int, spec: BundleSpec, process: Worker, grace: float) -> None:
        self.number = number
        self.spec = spec
        self.process = process
        self.state = GenState.SPAWNING
        self.hooks = Hooks()
        self.serving_since: float | None = None  # time.monotonic() when it became current
        self.hung: str | None = None  # why it was killed for not answering a ping
        self.answered_at = 0.0  # loop time of its last answer to a long request
        self.retire_error: str | None = None  # why its retirement did not go as asked
        self._grace = grace  # extra seconds a request gets beyond its own deadline
        #: Its records also go to the bundle's ring, for ``hotsup logs NAME``.
        self.log = logging.LoggerAdapter(log, {"bundle": spec.name})

    def __repr__(self) -> str:
        return f"<Generation {self.tag} {self.state.value}>"

    @property
    def tag(self) -> str:
        return f"{self.spec.name}@{self.number}"

    def hands_over_to(self, successor: Generation) -> bool:
        return self.hooks.snapshot and successor.hooks.restore

    def move(self, to: GenState) -> None:
        if to not in MOVES[self.state]:
            raise IllegalMove(f"{self.tag}: {self.state.value} -> {to.value} is not a legal move")
        self.log.debug("%s: %s -> %s", self.tag, self.state.value, to.value)
        self.state = to

    # -- the moves ---------------------------------------------------------------

    async def load(self) -> None:
        """SPAWNING -> LOADED: the entry imported and constructed."""
        try:
            loaded = await self.process.wait_loaded(self.spec.timing.start_timeout)
        except WorkerError as exc:
            raise SwapAborted(f"loading: {exc}", in_code=exc.kind == LOAD_FAILED) from None
        self.hooks = Hooks.of(loaded)
        self.move(GenState.LOADED)

    async def begin(self, snapshot: State | None, carried: Handover | None = None) -> None:
        """LOADED -> READY: restore(snapshot) if any, then start(), then take up
        the ``carried`` connections.

        The worker accepts nothing until start() returned, so a generation
        that fails here has no connection to lose when it is killed (carried
        ones are duplicates: their originals stay with the old generation).
        """
        try:
            if carried is not None:
                await self._adopt(carried)
            await self.process.call(protocol.OP_START, self.spec.timing.start_timeout, snapshot)
        except WorkerError as exc:
            raise SwapAborted(str(exc)) from None
        self.move(GenState.READY)

    async def take_over(self, carried: Handover) -> bool:
        """A READY generation takes up the connections its predecessor let go
        (overlap mode). False, logged, if it could not."""
        try:
            await self._adopt(carried)
        except WorkerError as exc:
            self.log.warning("%s: could not take over %d connection(s): %s", self.tag,
                             carried.connections, exc)
            return False
        return True

    async def _adopt(self, carried: Handover) -> None:
        for manifest, fds in carried.batches:
            reply = await self.process.request(protocol.OP_ADOPT, self._grace, manifest, fds)
            channel.close_fds(reply.fds)

    async def pause(self) -> Handover:
        """READY -> PAUSED: stop accepting, let in-flight connections finish or
        park for the successor, take the snapshot, collect the parked ones."""
        self.move(GenState.PAUSED)
        timing = self.spec.timing
        try:
            reply = await self.process.request(
                protocol.OP_PAUSE, timing.quiesce_timeout + self._grace,
                quiesce_timeout=timing.quiesce_timeout, snapshot=True, carry=True,
                max_bytes=timing.max_snapshot_bytes)
        except WorkerError as exc:
            raise SwapAborted(f"{self.tag} could not hand over its state: {exc}",
                              transient=exc.kind == "Busy") from None
        channel.close_fds(reply.fds)
        if reply.payload is None:
            raise SwapAborted(f"{self.tag} sent no snapshot")
        try:
            return await self._collect(Handover(reply.payload), reply.header)
        except WorkerError as exc:
            raise SwapAborted(f"{self.tag} could not hand over its connections: {exc}") from None

    async def let_go(self) -> Handover | None:
        """READY -> PAUSED, in overlap mode once the successor serves: stop
        accepting and park the connections that are idle right now, for the
        successor to take over; the rest finish here. None, logged, if the
        worker could not (it then drains as it would have)."""
        self.move(GenState.PAUSED)
        try:
            reply = await self.process.request(protocol.OP_PAUSE, self._grace, wait=False,
                                               carry=True, settle=_SETTLE)
            channel.close_fds(reply.fds)
            return await self._collect(Handover(None), reply.header)
        except WorkerError as exc:
            self.log.warning("%s: could not let its idle connections go: %s", self.tag, exc)
            return None

    async def _collect(self, handover: Handover, header: dict[str, Any]) -> Handover:
        """Fetch the connections a pause parked (``header["parked"]``) into
        ``handover``; WorkerError (and nothing held) if the worker fails."""
        parked = int(header.get("parked", 0))
        try:
            while handover.connections < parked:
                batch = await self.process.request(protocol.OP_PARKED, self._grace)
                handover.batches.append((batch.payload, batch.fds))
                if not batch.fds:
                    break  # it has no more to give than it said: carry what came
        except BaseException:
            handover.close()
            raise
        return handover

    async def handed(self) -> None:
        """The successor serves the connections this (paused) generation parked:
        it drops its side of them. Logged if it cannot (its copies then close
        when it exits)."""
        try:
            await self.process.call(protocol.OP_HANDED, self._grace)
        except WorkerError as exc:
            self.log.warning("%s: could not release the connections it handed over: %s",
                             self.tag, exc)

    async def resume(self, state: State | None = None) -> bool:
        """PAUSED or HELD -> READY (restoring ``state`` first, if given). False if
        it could not: it is killed, and its exit brings the runner's restart."""
        timing = self.spec.timing
        # The worker answers in order: a resume waits behind a pause whose
        # snapshot() is still running (slower than quiesce_timeout), so it
        # gets that long again and start_timeout on top before we give up.
        deadline = timing.quiesce_timeout + self._grace + timing.start_timeout
        try:
            await self.process.call(protocol.OP_RESUME, deadline, state)
        except WorkerError as exc:
            self.log.error("%s: could not resume (%s); restarting it", self.tag, exc)
            self.process.kill()
            return False
        self.move(GenState.READY)
        return True

    async def hold(self) -> bool:
        """READY or PAUSED -> HELD, for probation. A READY one (overlap mode) is
        paused without waiting: its in-flight connections just finish. False if
        it cannot be held (the caller retires it)."""
        if self.state is GenState.READY:
            try:
                await self.process.call(protocol.OP_PAUSE, self._grace, wait=False)
            except WorkerError as exc:
                self.log.warning("%s: could not be held for probation: %s", self.tag, exc)
                return False
        self.move(GenState.HELD)
        return True

    async def snapshot(self) -> State | None:
        """The state of a READY generation, without pausing it (a checkpoint);
        None, logged, if it could not be taken."""
        timing = self.spec.timing
        try:
            _, data = await self.process.call(protocol.OP_SNAPSHOT,
                                              timing.quiesce_timeout + self._grace,
                                              max_bytes=timing.max_snapshot_bytes)
        except WorkerError as exc:
            self.log.error("%s: checkpoint failed: %s", self.tag, exc)
            return None
        self.answered_at = asyncio.get_running_loop().time()
        return data

    async def ping(self) -> str | None:
        """None if the worker's loop answered within ping_timeout, else why it is hung."""
        timeout = self.spec.timing.ping_timeout
        try:
            await self.process.call(protocol.OP_PING, timeout)
        except WorkerError:
            return (f"did not answer a ping within {timeout:g}s (its event loop is blocked) "
                    f"and was killed")
        return None

    async def retire(self, keep: bool) -> State | None:
        """Ask (retire: drain, stop(), exit), wait until the deadline, kill, reap.

        Runs in a task of its own once the runner moved it to RETIRING; it
        changes nothing but the process. ``keep``: take its snapshot once
        drained (nothing changes it after that) and return it.
        """
        timing = self.spec.timing
        drain = timing.drain_timeout
        state: State | None = None
        try:
            reply, state = await self.process.call(protocol.OP_RETIRE, drain + self._grace,
                                                   drain_timeout=drain, snapshot=keep,
                                                   max_bytes=timing.max_snapshot_bytes)
            if keep and state is None:  # the worker logged why, and says it here
                self.retire_error = str(reply.get("snapshot_error") or
                                        f"the worker sent none: `hotsup logs {self.spec.name}` "
                                        f"says why")
        except WorkerError as exc:
            self.retire_error = str(exc)
            self.log.warning("%s: retire: %s", self.tag, exc)
        if not await self.process.wait_exit(self._grace):
            self.log.warning("%s: still running after retiring; killing it", self.tag)
        self.process.kill()  # the whole group: helpers it left behind too
        await self.process.wait_exit(self._grace)
        await self.process.close()
        return state if keep else None

    async def discard(self, why: str) -> None:
        """Kill a generation that will never serve (or whose discard was cut
        short), and reap it: -> FAILED."""
        if self.state is not GenState.FAILED:
            self.move(GenState.FAILED)
        self.process.kill()
        if not await self.process.wait_exit(self._grace):
            self.log.error("%s: did not exit after SIGKILL", self.tag)
        await self.process.close()
        self.log.debug("%s: discarded: %s", self.tag, why)
