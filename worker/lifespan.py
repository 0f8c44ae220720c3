"""The ASGI lifespan protocol of one app: startup before serving, shutdown after.

An asgi bundle runs ``startup()`` while it loads, before the worker reports
``loaded``: in a swap that is step 1, while the old generation still serves, so
the app's slow set-up costs no pause. ``shutdown()`` runs at retirement, once
the connections drained.

Apps without lifespan support work, as with uvicorn's ``lifespan = "auto"``,
with one refinement that lets a real startup failure stop a swap:

* The app raises or returns *before it called* ``receive()`` (``assert
  scope["type"] == "http"`` and the like): it does not speak lifespan. Logged
  at info, and the app is served without lifespan events.
* The app received ``lifespan.startup`` and then sent
  ``lifespan.startup.failed`` or raised: the startup failed, and so does the
  load (the old generation keeps serving).
* The app received ``lifespan.startup`` and returned without answering: taken
  as "no lifespan" too, as uvicorn does.
"""

from __future__ import annotations

import asyncio
import logging
import traceback
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Message = MutableMapping[str, Any]
AsgiApp = Callable[
    [MutableMapping[str, Any], Callable[[], Awaitable[Message]],
     Callable[[Message], Awaitable[None]]],
    Awaitable[None],
]


class LifespanFailed(Exception):
    """The app answered ``lifespan.startup.failed`` (the message is the app's)."""


class Lifespan:
    """Runs ``app``'s lifespan task; ``state`` is the scope's ``state`` dict, which
    every request scope gets a shallow copy of (ASGI lifespan state)."""

    def __init__(self, app: AsgiApp, log: logging.Logger) -> None:
        self.app = app
        self.log = log
        self.state: dict[str, Any] = {}
        #: Whether the app completed its lifespan startup (known after startup()).
        self.supported = False
        self._events: asyncio.Queue[Message] = asyncio.Queue()
        self._received = False
        self._error: BaseException | None = None
        self._task: asyncio.Task[None] | None = None
        self._started: asyncio.Future[None] | None = None
        self._stopped: asyncio.Future[None] | None = None

    async def startup(self) -> None:
        """Return once the app completed its startup (or does not speak lifespan).

        Raises the app's exception, or LifespanFailed, if its startup failed.
        A startup that hangs is bounded by the caller (the supervisor's
        start_timeout kills the worker).
        """
        loop = asyncio.get_running_loop()
        self._started = loop.create_future()
        self._stopped = loop.create_future()
        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"},
                 "state": self.state}
        self._events.put_nowait({"type": "lifespan.startup"})
        self._task = task = loop.create_task(self._run(scope))
        try:
            await asyncio.wait({task, self._started}, return_when=asyncio.FIRST_COMPLETED)
            if self._started.done():
                self._started.result()  # raises LifespanFailed for startup.failed
                self.supported = True
                return
            if self._received and self._error is not None:
                raise self._error
        except BaseException:
            task.cancel()  # an app that reported its failure may still wait in receive()
            await asyncio.gather(task, return_exceptions=True)
            raise
        why = f" ({_where(self._error)}, before its first receive())" if self._error else ""
        self.log.info("the app does not use ASGI lifespan events%s; serving it without", why)

    async def shutdown(self, timeout: float) -> None:
        """Send ``lifespan.shutdown`` and wait up to ``timeout`` for the app to finish.

        A failure is logged, not raised: the generation is retiring either way.
        """
        task, stopped = self._task, self._stopped
        if task is None or stopped is None:
            return
        try:
            if not self.supported or task.done():
                return
            self._events.put_nowait({"type": "lifespan.shutdown"})
            await asyncio.wait({task, stopped}, timeout=timeout,
                               return_when=asyncio.FIRST_COMPLETED)
            if stopped.done():
                if stopped.exception() is not None:
                    self.log.error("lifespan shutdown failed: %s", stopped.exception())
            elif task.done():
                if self._error is not None:
                    self.log.error("lifespan shutdown failed", exc_info=self._error)
            else:
                self.log.warning("lifespan shutdown did not finish within %gs; cancelled",
                                 timeout)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _run(self, scope: dict[str, Any]) -> None:
        try:
            await self.app(scope, self._receive, self._send)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # the app's, kept for startup() to judge
            self._error = exc

    async def _receive(self) -> Message:
        self._received = True
        return await self._events.get()

    async def _send(self, message: Message) -> None:
        kind = message.get("type")
        if kind == "lifespan.startup.complete":
            _settle(self._started)
        elif kind == "lifespan.startup.failed":
            _settle(self._started, self._failed(message.get("message"), "startup"))
        elif kind == "lifespan.shutdown.complete":
            _settle(self._stopped)
        elif kind == "lifespan.shutdown.failed":
            _settle(self._stopped, self._failed(message.get("message"), "shutdown"))
        else:
            raise RuntimeError(f"unexpected ASGI message {kind!r} in the lifespan scope")

    def _failed(self, message: object, phase: str) -> LifespanFailed:
        """The error for a ``lifespan.PHASE.failed`` message: its cause in one line.

        Frameworks (Starlette, FastAPI) send the whole traceback as the message;
        its first line ("Traceback (most recent call last):") says nothing, so
        the error keeps the last one (the exception) and the log gets it all.
        """
        text = str(message).strip() if message else ""
        if not text:
            return LifespanFailed(f"{phase} failed")
        lines = text.splitlines()
        if len(lines) > 1:
            self.log.error("lifespan %s failed:\n%s", phase, text)
        return LifespanFailed(lines[-1].strip())


def _where(exc: BaseException) -> str:
    """``Type: message at FILE:LINE`` of an app's exception (no message: no colon),
    the line being where it was raised: a bare ``assert`` has nothing else to say."""
    what = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    frames = traceback.extract_tb(exc.__traceback__)
    if frames:
        what += f" at {frames[-1].filename}:{frames[-1].lineno}"
    return what


def _settle(future: asyncio.Future[None] | None, error: BaseException | None = None) -> None:
    if future is None or future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
