"""Restart intensity, OTP-style: how long to wait before restarting a bundle
whose serving generation died, and when to give up.

A pure policy (no clock of its own, no waiting): the runner passes the time
of each death to ``record`` and arms a timer for the delay it returns, so a
backoff never blocks anything (a ``stop`` or ``reload`` during it is answered
at once).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class GiveUp:
    """More than ``max_restarts`` deaths within ``window`` seconds."""

    failures: int
    window: float


@dataclass
class RestartIntensity:
    """At most ``max_restarts`` restarts within ``window`` seconds; the n-th
    death in the window waits ``first * 2**(n-1)`` seconds, at most ``most``."""

    max_restarts: int
    window: float
    first: float = 0.1
    most: float = 10.0
    _deaths: list[float] = field(default_factory=list)

    def record(self, now: float) -> float | GiveUp:
        """A death at ``now``: the delay before the restart, or GiveUp (which
        also clears the history: whatever comes next starts afresh)."""
        self._deaths = [t for t in self._deaths if now - t < self.window]
        self._deaths.append(now)
        if len(self._deaths) > self.max_restarts:
            failures = len(self._deaths)
            self._deaths = []
            return GiveUp(failures, self.window)
        return float(min(self.first * 2 ** (len(self._deaths) - 1), self.most))

    def reset(self) -> None:
        """New content: its deaths are its own."""
        self._deaths = []
