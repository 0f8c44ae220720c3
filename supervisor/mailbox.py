"""A bundle runner's mailbox: every event that may change a bundle, in order.

Timers, process exits, pings and the supervisor's commands only put events
here; the runner's one task takes them one at a time and is the only writer
of the bundle's state (OTP's gen_server, or the supervisor's own command
queue). ``Timers`` arms the runner's timers, each of which, when due, only
puts its event in the mailbox.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import BundleSource
    from .generation import Generation, State

Waiter = asyncio.Future[dict[str, Any]]


@dataclass(frozen=True)
class Event:
    """The base of every event; ``waiters`` get the report of how it was handled."""

    @property
    def waiters(self) -> tuple[Waiter, ...]:
        return ()


@dataclass(frozen=True)
class Pass(Event):
    """Look at the bundle's files: start or swap if they changed (always, if ``force``).

    Passes waiting together are taken as one (``Mailbox.merged``), so changes
    made during a swap make one more swap, not one each.
    """

    force: bool = False
    asked: tuple[Waiter, ...] = ()
    discard_state: bool = False  # `hotsup reload NAME --discard-state`

    @property
    def waiters(self) -> tuple[Waiter, ...]:
        return self.asked


@dataclass(frozen=True)
class LoadAhead(Event):
    """Files of the bundle are changing: spawn and load (not start) the next
    generation while the current one serves, dropping any loaded before; the
    pass after the quiet period swaps to it if the content is still what it
    loaded. Several waiting together are one (the newest)."""


@dataclass(frozen=True)
class StopAsked(Event):
    """``hotsup stop``: retire the bundle, close its ports, until ``RunAsked``."""

    asked: Waiter

    @property
    def waiters(self) -> tuple[Waiter, ...]:
        return (self.asked,)


@dataclass(frozen=True)
class RunAsked(Event):
    """``hotsup run``: bring a stopped or failed bundle back, as if its files were new."""

    asked: Waiter

    @property
    def waiters(self) -> tuple[Waiter, ...]:
        return (self.asked,)


@dataclass(frozen=True)
class Renamed(Event):
    """The bundle's directory was renamed (same content, a new name): the
    runner carries on under the new name, and swaps to the code there."""

    source: BundleSource


@dataclass(frozen=True)
class Exited(Event):
    """A generation's process is gone."""

    gen: Generation


@dataclass(frozen=True)
class RestartDue(Event):
    """A crash restart's backoff is over."""


@dataclass(frozen=True)
class RetryDue(Event):
    """Try a hand-over again that connections in flight blocked."""


@dataclass(frozen=True)
class CheckpointDue(Event):
    gen: Generation


@dataclass(frozen=True)
class PingDue(Event):
    gen: Generation


@dataclass(frozen=True)
class PingDone(Event):
    """A ping sent at ``sent_at`` (loop time) came back, or not: ``hung`` says why."""

    gen: Generation
    sent_at: float
    hung: str | None


@dataclass(frozen=True)
class ProbationOver(Event):
    gen: Generation


@dataclass(frozen=True)
class Retired(Event):
    """A generation's retirement is over; ``state`` its final snapshot, if kept."""

    gen: Generation
    state: State | None


class Mailbox:
    """A queue of events whose waiting passes can be taken together."""

    def __init__(self) -> None:
        self._events: deque[Event] = deque()
        self._ready = asyncio.Event()

    def put(self, event: Event) -> None:
        self._events.append(event)
        self._ready.set()

    async def get(self) -> Event:
        while not self._events:
            self._ready.clear()
            await self._ready.wait()
        return self._events.popleft()

    def merged(self, first: Pass) -> Pass:
        """``first`` with every other pass waiting now, which leave the queue."""
        others = [event for event in self._events if isinstance(event, Pass)]
        if not others:
            return first
        self._events = deque(event for event in self._events if not isinstance(event, Pass))
        return Pass(force=first.force or any(p.force for p in others),
                    asked=first.asked + tuple(w for p in others for w in p.asked),
                    discard_state=first.discard_state or any(p.discard_state for p in others))

    def waiting(self, kind: type[Event]) -> bool:
        """Whether an event of ``kind`` is in the queue."""
        return any(isinstance(event, kind) for event in self._events)

    def drain(self) -> list[Event]:
        """Every event still waiting (at close)."""
        events, self._events = list(self._events), deque()
        return events


class Timers:
    """The runner's timers, by purpose: at most one of each is armed. When one
    is due it only puts its event in the mailbox."""

    def __init__(self, mailbox: Mailbox) -> None:
        self._mailbox = mailbox
        self._armed: dict[str, asyncio.TimerHandle] = {}

    def arm(self, purpose: str, delay: float, event: Event) -> None:
        self.cancel(purpose)
        self._armed[purpose] = asyncio.get_running_loop().call_later(
            delay, self._due, purpose, event)

    def armed(self, purpose: str) -> bool:
        return purpose in self._armed

    def cancel(self, purpose: str) -> None:
        handle = self._armed.pop(purpose, None)
        if handle is not None:
            handle.cancel()

    def cancel_all(self) -> None:
        for purpose in list(self._armed):
            self.cancel(purpose)

    def _due(self, purpose: str, event: Event) -> None:
        del self._armed[purpose]
        self._mailbox.put(event)
