"""sd_notify: telling systemd (or anything listening on NOTIFY_SOCKET) how we are.

The protocol is one datagram per message, ``KEY=VALUE`` lines, sent to the
Unix datagram socket named by NOTIFY_SOCKET (a path, or ``@name`` for an
abstract socket); no libsystemd is needed. What hotsup sends
(sd_notify(3); the reload sequence is the one systemd.service(5) describes for
``Type=notify-reload``, which ``Type=notify`` with ``ExecReload=kill -HUP``
accepts as well):

* ``READY=1`` once every bundle serves or has failed (none is still starting),
  with ``STATUS=`` a one-line summary;
* ``RELOADING=1`` with ``MONOTONIC_USEC=`` (CLOCK_MONOTONIC, as systemd
  requires) when a reload of every bundle (SIGHUP, ``hotsup reload --all``)
  begins, and ``READY=1`` again when it ended;
* ``STOPPING=1`` when the shut-down begins;
* ``STATUS=`` again whenever the summary changes;
* ``WATCHDOG=1`` every WATCHDOG_USEC/2 when WATCHDOG_USEC is set for our pid
  (WATCHDOG_PID): sent from the supervisor's event loop, so a loop that is
  stuck stops feeding it and systemd restarts the service. It is fed through
  the shut-down's drain too, which may take drain_timeout.

Without NOTIFY_SOCKET every call is a no-op. The variables are unset once
read, so no worker (or its children) can speak for the supervisor. A failed
send is logged once and never raised: telling systemd must not take the
supervisor down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable, MutableMapping

log = logging.getLogger("hotsup")

#: How often the summary is looked at while the bundles start (READY waits on it).
STARTING_TICK = 0.05
#: ... and once they are up (STATUS updates, and the watchdog's finest grain).
SERVING_TICK = 1.0


class Notifier:
    """One NOTIFY_SOCKET, held open for the supervisor's life.

    ``summary`` returns ``(settled, text)``: whether no bundle is starting any
    more, and the one-line STATUS. ``run()`` is the task that sends READY once
    settled, keeps STATUS current and feeds the watchdog.
    """

    def __init__(self, summary: Callable[[], tuple[bool, str]],
                 environ: MutableMapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self._summary = summary
        self._sock: socket.socket | None = None
        self._address: str | bytes = ""
        self._failed = False
        self._ready = False
        self._reloading = False
        self._stopping = False
        self._status = ""
        self._wake = asyncio.Event()
        address = env.pop("NOTIFY_SOCKET", "")
        usec, pid = env.pop("WATCHDOG_USEC", ""), env.pop("WATCHDOG_PID", "")
        #: Seconds between WATCHDOG=1, or None: not asked (or asked of another pid).
        self.watchdog: float | None = None
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog = int(usec) / 2_000_000
        if address:
            # A leading @ names an abstract socket: its first byte is NUL.
            self._address = b"\0" + address[1:].encode() if address.startswith("@") else address
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.setblocking(False)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, **fields: str | int) -> None:
        """One datagram of ``KEY=VALUE`` lines; never raises."""
        if self._sock is None:
            return
        message = "".join(f"{key}={value}\n" for key, value in fields.items())
        try:
            self._sock.sendto(message.encode(), self._address)
        except OSError as exc:
            if not self._failed:  # once: systemd gone, or the socket full
                self._failed = True
                log.warning("sd_notify to %s failed: %s (further failures are not logged)",
                            self._address, exc.strerror or exc)

    def reloading(self) -> None:
        """A reload of every bundle begins: RELOADING=1 (READY=1 follows at ``reloaded``)."""
        self._reloading = True
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send(RELOADING=1, MONOTONIC_USEC=usec, STATUS="reloading every bundle")

    def reloaded(self) -> None:
        """The reload ended (whatever its outcome): READY=1 with the new summary."""
        self._reloading = False
        if self._stopping:  # cut short by the shut-down: STOPPING=1 was the last word
            return
        self._status = self._summary()[1]
        self.send(READY=1, STATUS=self._status)

    def stopping(self) -> None:
        self._stopping = True
        self.send(STOPPING=1, STATUS="draining every bundle")
        self._wake.set()

    async def run(self) -> None:
        """READY once settled, then STATUS as it changes and WATCHDOG=1 on time."""
        if self._sock is None:
            return
        loop = asyncio.get_running_loop()
        fed = loop.time()
        if self.watchdog is not None:
            self.send(WATCHDOG=1)
        while not self._stopping or self.watchdog is not None:
            tick = SERVING_TICK if self._ready else STARTING_TICK
            if self.watchdog is not None:
                tick = min(tick, max(0.0, fed + self.watchdog - loop.time()))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(tick):
                    await self._wake.wait()
            self._wake.clear()
            if self.watchdog is not None and loop.time() >= fed + self.watchdog:
                fed = loop.time()
                self.send(WATCHDOG=1)
            if not self._stopping:
                self._update()

    def _update(self) -> None:
        settled, text = self._summary()
        if not self._ready and settled:
            self._ready = True
            self._status = text
            self.send(READY=1, STATUS=text)
        elif self._ready and not self._reloading and text != self._status:
            self._status = text
            self.send(STATUS=text)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def summarize(states: dict[str, str]) -> tuple[bool, str]:
    """``(settled, STATUS line)`` from each bundle's state: settled once none is
    starting; the line counts bundles by state and names the failed ones."""
    settled = all(state != "starting" for state in states.values())
    counts: dict[str, int] = {}
    for state in states.values():
        counts[state] = counts.get(state, 0) + 1
    text = ", ".join(f"{n} {state}" for state, n in sorted(counts.items())) or "no bundle"
    failed = sorted(name for name, state in states.items() if state == "failed")
    if failed:
        text += f" (failed: {', '.join(failed)})"
    return settled, f"{len(states)} bundle(s): {text}" if states else text
