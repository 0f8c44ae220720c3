"""asgi bundles: an ASGI application served by uvicorn's HTTP protocol.

``AsgiBundle`` adapts an ASGI app to the bundle contract that ``runtime.Worker``
drives (``start``, ``stop``, ``snapshot``, ``restore``), so the swap protocol
and the supervisor do not tell the two kinds apart:

* loading (step 1 of a swap, before the worker reports ``loaded``): import the
  entry from source, call it if ``factory``, let uvicorn's ``Config`` wrap it
  (ASGI 2/3 detection, proxy headers), run the lifespan startup. Any failure is
  a load failure, and the old generation keeps serving.
* ``snapshot``/``restore`` are the entry module's ``hotsup_snapshot()`` and
  ``hotsup_restore(state)`` when it defines them (hand-over mode), else absent
  (overlap mode).
* ``start()`` serves the socket named ``http`` (or the only one) through an
  ``HttpListener``; the runtime makes it accept once ``start()`` returned.
* ``stop()`` (at retirement, after the drain) runs the lifespan shutdown.

uvicorn's ``Server`` is not used: the worker owns the loop, the signals and the
logging (uvicorn's ``uvicorn.error`` and ``uvicorn.access`` records propagate to
the worker's handler, tagged ``bundle@generation``). Each accepted socket is
handed straight to uvicorn's protocol: between the client and the app there is
nothing of hotsup, except on a connection that is being closed for a swap.

What happens to each connection at a swap is ``HttpListener``'s to decide (its
docstring has the table); WebSockets are ``websocket.WebSocketConnection``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import socket
import sys
import time
from collections.abc import Awaitable, Iterable
from email.utils import formatdate
from typing import Any, cast

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
from uvicorn.server import ServerState

from . import importer
from .context import BundleContext
from .lifespan import AsgiApp, Lifespan, Message
from .listener import Carried, Listener
from .protocol import BACKLOG
from .websocket import CLOSE_WAIT, WebSocketConnection

#: ``websockets`` in bundle.toml: what a hand-over does to an open WebSocket.
WEBSOCKET_MODES = ("close", "resume")

#: How long a keep-alive connection that is idle when a swap starts may take to
#: send one more request (answered with ``Connection: close``) before it is
#: closed. See ``HttpConnection.close_gracefully``.
LAST_REQUEST_GRACE = 0.5

#: How often a closing connection whose response was already under way is
#: looked at again, to see when it went idle.
_RECHECK = 0.05

#: The lifespan shutdown's share of the retirement's STOP_GRACE (supervisor/swap.py).
SHUTDOWN_TIMEOUT = 3.0

#: How long a hand-over waits for a WebSocket to reach a frame boundary (its
#: app waiting in ``receive()``) before closing it with 1012 instead.
PARK_WAIT = 0.25

#: A pause that lasts longer than this logs what held it (more than an idle
#: connection's grace, which is no news).
HELD_NOTICE = 0.6


def socket_name(sockets: dict[str, Any]) -> str:
    """The socket an asgi bundle serves: ``http``, or its only socket."""
    if "http" in sockets:
        return "http"
    if len(sockets) == 1:
        return next(iter(sockets))
    known = ", ".join(sorted(sockets)) or "none"
    raise ValueError(f"an asgi bundle serves its socket named http, or its only socket "
                   f"(declared: {known})")


class AsgiBundle:
    """One generation of an asgi bundle, as the runtime sees a bundle."""

    snapshot: Any
    restore: Any

    def __init__(self, ctx: BundleContext, app: Any, module: Any,
                 websockets: str | None = "close") -> None:
        """``websockets``: ``"close"`` or ``"resume"`` (bundle.toml), None for
        no WebSocket support (wsgi bundles)."""
        self.ctx = ctx
        self.socket = socket_name(ctx.sockets)
        if websockets is not None and websockets not in WEBSOCKET_MODES:
            raise ValueError(f"websockets = {websockets!r}: expected one of "
                             f"{', '.join(WEBSOCKET_MODES)}")
        self.websockets = websockets
        # The app goes in as a factory of itself, so Config never calls the
        # app to guess whether it is one. permessage-deflate keeps a window
        # per connection that cannot move to another process: off where
        # WebSockets move.
        self.config = uvicorn.Config(
            app=lambda: app, factory=True, http=HttpConnection,
            ws=WebSocketConnection if websockets is not None else "none",
            ws_per_message_deflate=websockets != "resume", lifespan="off",
            log_config=None, interface="auto",
        )
        self.config.load()
        # One access line per request would flood the supervisor's shared log
        # (and its rate limit): they are kept for log_level = "debug".
        debug = logging.getLogger().isEnabledFor(logging.DEBUG)
        logging.getLogger("uvicorn.access").setLevel(logging.INFO if debug else logging.WARNING)
        self.lifespan = Lifespan(self.config.loaded_app, ctx.log)
        # What a service bundle gets as ctx, an app finds in every scope's
        # state (lifespan and requests): scope["state"]["hotsup"].
        self.lifespan.state["hotsup"] = ctx
        snapshot = _hook(module, "hotsup_snapshot")
        self.snapshot = None if snapshot is None else self._noting_streams(snapshot)
        self.restore = _hook(module, "hotsup_restore")

    def _noting_streams(self, snapshot: Any) -> Any:
        """``snapshot``, which logs each response still streaming when it is
        taken at a pause: such a response finishes on this generation, and
        what it changes from now on is not in the state handed over."""

        def noting() -> Any:
            now = time.monotonic()
            for listener in self.ctx.listeners:
                if isinstance(listener, HttpListener):
                    for call in listener.streaming_at_pause():
                        self.ctx.log.warning(
                            "a response was still streaming at the snapshot: %s; its changes "
                            "to state after the snapshot are not carried", call.describe(now))
            return snapshot()

        return noting

    @classmethod
    async def load(cls, ctx: BundleContext, entry: str, factory: bool,
                   websockets: str = "close") -> AsgiBundle:
        """Import ``entry`` (``module:attribute``), make the app, run its lifespan startup."""
        target = importer.resolve(entry)
        module = sys.modules[entry.partition(":")[0]]
        app = target() if factory else target
        if not callable(app):
            made = f"{entry}() returned" if factory else f"{entry} is"
            raise TypeError(f"{made} {app!r}, which is not an ASGI application")
        bundle = cls(ctx, app, module, websockets)
        await bundle.lifespan.startup()
        return bundle

    async def start(self) -> None:
        listener = HttpListener(self.socket, self.ctx.listening(self.socket), self.ctx.log,
                                self.config, self.lifespan.state, self.ctx.accepting,
                                carry_websockets=self.websockets == "resume")
        self.ctx.listeners.append(listener)

    async def stop(self) -> None:
        await self.lifespan.shutdown(SHUTDOWN_TIMEOUT)


def _hook(module: Any, name: str) -> Any:
    hook = getattr(module, name, None)
    return hook if callable(hook) else None


class HttpListener(Listener):
    """Hands every accepted connection to an ``HttpConnection`` (uvicorn's protocol).

    Accepting is uvloop's own server (in C, as fast as plain uvicorn's) on a
    copy of the shared socket, opened by ``resume()`` and closed by
    ``pause()``. The trap DESIGN.md warns of (``Server.close()`` losing a
    connection accepted just before it) is asyncio's default loop, which
    accepts first and builds the transport in a later task; uvloop accepts and
    builds the transport and protocol in one callback, so a close can only
    come between connections, and connections already made are not touched.
    Closing our copy of the socket loses nothing (the supervisor's copy keeps
    the backlog), and uvloop is given the shared backlog, never its default.

    What a pause does to each connection, and what the pause waits for
    (``inflight``, ``wait_idle``). ``pause(carry=True)`` is a hand-over's
    pause; ``pause()`` any other (a retirement's drain, probation):

    ============================  ==============================  =============================
    connection                    ``pause(carry=True)``           ``pause()``
    ============================  ==============================  =============================
    request being answered        waited for; then as idle        waited for, ``Connection: close``
    idle keep-alive               parked at once (``parked()``)   closed after the grace (0.5 s)
    SSE (``text/event-stream``)   ended: terminating chunk, the   the same
                                  app's ``receive()`` returns
                                  ``http.disconnect``; waited for
    other response sending body   not waited for, finishes here;  waited for
                                  then parked if not yet
                                  collected, else ended gently
    work after the response       waited for (the ASGI call)      waited for
    WebSocket, ``close``          closed with 1012, waited for    waited for; 1012 at
                                  (at most ``CLOSE_WAIT``)        ``cancel_inflight()``
    WebSocket, ``resume``         parked at a frame boundary,     the same as ``close``
                                  else after ``PARK_WAIT`` 1012
    ============================  ==============================  =============================

    ``cancel_inflight()`` (the end of a drain) logs each thing it cuts with
    what it was (method and path, or the WebSocket's path, and its age).

    Carried connections: ``parked()`` returns a ``Carried`` per parked
    connection whose ``fd`` is a fresh dup the caller owns and must close or
    pass on; this listener keeps its own fd for each until
    ``release_parked()`` (closes ours: no byte and no FIN reach the client,
    the successor's fd keeps the socket open) or ``resume()`` (serves them
    again, from where they stopped). ``adopt(item)`` owns ``item.fd`` from
    the call on (closed with the connection) and serves it at once.
    """

    def __init__(self, name: str, sock: socket.socket, log: Any, config: uvicorn.Config,
                 app_state: dict[str, Any], accepting: bool,
                 carry_websockets: bool = False) -> None:
        self._config = config
        self._app_state = app_state
        self._state = ServerState()
        self._connections: set[HttpConnection] = set()
        self._sockets: set[WebSocketConnection] = set()  # open, not parked
        self._calls: set[Call] = set()
        self._parked_ws: list[WebSocketConnection] = []
        self._carry_websockets = carry_websockets
        self._closing = False  # paused: connections must end (or move), new ones too
        self._hand_over = False  # the pause is a hand-over's: pause(carry=True)
        self._park_idle = False  # idle keep-alive connections park: pause(carry=True)
        self._collected = False  # parked() was called: what parks now is too late
        self._park_deadline: asyncio.TimerHandle | None = None
        self._enders: set[asyncio.Task[None]] = set()
        self._waiters = 0  # wait_idle() calls under way
        self._grace = LAST_REQUEST_GRACE
        self._clock: asyncio.TimerHandle | None = None
        self._server: asyncio.AbstractServer | None = None
        self._opening: asyncio.Task[None] | None = None
        self._tick()
        super().__init__(name, sock, log, accepting)

    # -- what is in flight ---------------------------------------------------------

    @property
    def inflight(self) -> int:
        """What a pause (or drain) waits for now (the class docstring's table)."""
        hand_over = self._hand_over
        held = {conn for conn in self._connections if conn.holds(hand_over)}
        calls = sum(1 for call in self._calls
                    if call.holds(hand_over) and call.connection not in held)
        return len(held) + calls + len(self._sockets)

    def streaming_at_pause(self) -> list[Call]:
        """The calls streaming a response while paused (they finish here)."""
        if not self._closing:
            return []
        return [call for call in self._calls if call.streaming and not call.responded
                and not call.sse]

    def _refresh(self) -> None:
        # Only a pause, a drain or a wait_idle() looks at _idle: while serving
        # nobody does, and keeping it costs nothing.
        if not (self._closing or self._waiters):
            return
        if self.inflight:
            self._idle.clear()
        else:
            self._idle.set()

    def _opened(self, connection: HttpConnection) -> None:
        self._connections.add(connection)
        if self._closing and self._park_idle and not self._collected:
            connection.hand_over()  # accepted just before the pause
        elif self._closing:
            connection.close_gracefully(self._grace)
        self._refresh()

    def _ended(self, connection: HttpConnection) -> None:
        self._connections.discard(connection)
        self._refresh()

    def _upgraded(self, connection: HttpConnection, websocket: WebSocketConnection) -> None:
        self._connections.discard(connection)
        self._sockets.add(websocket)
        if self._closing and self._hand_over and not self._carry_websockets:
            websocket.close_for_swap()
        elif self._closing and self._hand_over:
            self._bound_parking()
        self._refresh()

    def _bound_parking(self) -> None:
        """WebSockets get ``PARK_WAIT`` to reach a frame boundary (from now)."""
        if self._park_deadline is None:
            self._park_deadline = self._loop.call_later(PARK_WAIT, self._stop_parking)

    def _ws_changed(self, websocket: WebSocketConnection) -> None:
        if websocket.finished:
            self._sockets.discard(websocket)
        elif (self._closing and self._hand_over and self._carry_websockets
              and not self._collected and not websocket.parked and websocket.parkable):
            websocket.park()
            self._sockets.discard(websocket)
            self._parked_ws.append(websocket)
        self._refresh()

    def _call_began(self, call: Call) -> None:
        self._calls.add(call)

    def _call_changed(self, call: Call) -> None:
        if self._closing and call.sse and not call.ended:
            self._end_stream(call)
        self._refresh()

    def _call_ended(self, call: Call) -> None:
        self._calls.discard(call)
        self._refresh()

    def _end_stream(self, call: Call) -> None:
        task = self._loop.create_task(call.end())
        self._enders.add(task)
        task.add_done_callback(self._enders.discard)

    # -- accepting -------------------------------------------------------------------

    def _set_reading(self, on: bool) -> None:
        if on and not self._reading:
            self._reading = True
            self._opening = self._loop.create_task(self._open())  # held until it ran
        elif not on and self._reading:
            self._reading = False
            if self._server is not None:
                self._server.close()  # our copy of the socket; no connection is touched
                self._server = None

    async def _open(self) -> None:
        # With sock=, uvloop's create_server listens and returns without
        # yielding, so nothing is accepted between it and the check below.
        try:
            server = await self._loop.create_server(
                self._new_connection, sock=self._sock.dup(), backlog=BACKLOG)
        except OSError as exc:  # EMFILE, say: the backlog keeps them; try again
            self._log.error("cannot serve socket %r: %s", self.name, exc)
            if self._reading and self._retry is None:
                self._reading = False
                self._retry = self._loop.call_later(0.1, self._retry_accept)
            return
        if not self._reading or self._server is not None:  # paused meanwhile
            server.close()
            return
        self._server = server

    def _new_connection(self) -> HttpConnection:
        return HttpConnection(self._config, self._state, self._app_state, self)

    # -- a swap ----------------------------------------------------------------------

    def pause(self, carry: bool = False, overlap: bool = False) -> None:
        super().pause(carry, overlap)
        self._closing = True
        # Overlap mode: only idle keep-alive connections move; WebSockets and
        # streams stay with this generation until they end or its drain does.
        self._hand_over = carry and not overlap
        self._park_idle = carry
        if self._connections and not carry:
            self._log.debug("paused: ending %d connection(s) between requests",
                            len(self._connections))
        elif self._connections or self._sockets:
            self._log.debug("paused for a hand-over: %d connection(s), %d WebSocket(s)",
                            len(self._connections), len(self._sockets))
        for call in list(self._calls):
            if call.sse and not call.ended:
                self._end_stream(call)
        for connection in list(self._connections):
            if carry and not self._collected:
                connection.hand_over()
            else:
                connection.close_gracefully(self._grace)
        if self._hand_over:
            for websocket in list(self._sockets):
                if self._carry_websockets:
                    self._ws_changed(websocket)
                else:
                    websocket.close_for_swap()
            if self._carry_websockets and self._sockets:
                self._bound_parking()
        self._refresh()

    def _stop_parking(self) -> None:
        """``PARK_WAIT`` passed: a WebSocket still busy is closed (1012) instead."""
        self._park_deadline = None
        if not (self._closing and self._hand_over):
            return
        for websocket in list(self._sockets):
            self._log.info("WebSocket %s (%s) was not at a frame boundary within %gs: "
                           "closed with 1012 instead of moved", websocket.id, websocket.path,
                           PARK_WAIT)
            websocket.close_for_swap()

    def parked(self) -> list[Carried]:
        self._collected = True
        items = [conn.carried() for conn in self._connections if conn.parked]
        items += [websocket.carried() for websocket in self._parked_ws]
        # Too late to move the rest (busy: overlap mode does not wait for
        # them): each ends between requests instead, its response in progress
        # telling the client so (Connection: close), never closed under it.
        for connection in list(self._connections):
            if not connection.parked:
                connection.close_gracefully(self._grace)
        return items

    def release_parked(self) -> None:
        for connection in [conn for conn in self._connections if conn.parked]:
            connection.release()
        for websocket in self._parked_ws:
            websocket.release()
        self._parked_ws.clear()

    def resume(self) -> None:
        was_handing_over = self._hand_over or self._park_idle
        self._closing = False  # connections already closing go on closing: that is harmless
        self._hand_over = False
        self._park_idle = False
        self._collected = False
        if self._park_deadline is not None:
            self._park_deadline.cancel()
            self._park_deadline = None
        if was_handing_over:
            for connection in list(self._connections):
                connection.serve_on()
            for websocket in self._parked_ws:
                websocket.unpark()
                self._sockets.add(websocket)
            self._parked_ws.clear()
        super().resume()

    def adopt(self, item: Carried) -> None:
        if item.kind not in ("http", "websocket"):
            super().adopt(item)
            return
        try:
            sock = socket.socket(fileno=item.fd)
        except OSError as exc:  # not a socket: ours to close all the same
            self._log.warning("a carried %s connection cannot be taken up: %s", item.kind, exc)
            with contextlib.suppress(OSError):
                os.close(item.fd)
            return
        sock.setblocking(False)
        task = self._loop.create_task(self._take_up(item, sock))
        self._enders.add(task)
        task.add_done_callback(self._enders.discard)

    async def _take_up(self, item: Carried, sock: socket.socket) -> None:
        protocol: asyncio.Protocol
        if item.kind == "websocket":
            protocol = WebSocketConnection(self._config, self._state, self._app_state,
                                           owner=self, carried=item)
        else:
            protocol = HttpConnection(self._config, self._state, self._app_state, self,
                                      buffered=item.buffered)
        try:
            await self._loop.connect_accepted_socket(lambda: protocol, sock=sock)
        except OSError as exc:
            sock.close()
            self._log.warning("a carried %s connection was lost before it was served: %s",
                              item.kind, exc)
            return
        if isinstance(protocol, WebSocketConnection):
            self._sockets.add(protocol)
            self._refresh()

    async def wait_idle(self, timeout: float) -> bool:
        # uvloop calls connection_made later than the accept (call_soon): one
        # turn of the loop and every connection already accepted is counted.
        await asyncio.sleep(0)
        # An idle connection's grace must end well within the caller's
        # deadline (a short quiesce_timeout), or it alone would fail the pause.
        if timeout < 2 * self._grace:
            self._grace = timeout / 2
            for connection in list(self._connections):
                connection.shorten_grace(self._grace)
        self._waiters += 1
        started = time.monotonic()
        held: list[str] = []
        notice = self._loop.call_later(HELD_NOTICE, lambda: held.extend(self._holding()))
        try:
            self._refresh()
            idle = await super().wait_idle(timeout)
        finally:
            self._waiters -= 1
            notice.cancel()
        if held:  # what kept new connections waiting in the backlog that long
            self._log.info("%s held the pause %.1fs", "; ".join(held),
                           time.monotonic() - started)
        return idle

    def _holding(self) -> list[str]:
        """What the pause waits for, in words (for the log)."""
        now = time.monotonic()
        hand_over = self._hand_over
        words = [call.describe(now) for call in self._calls if call.holds(hand_over)]
        words += [f"WebSocket {ws.path} ({now - ws.opened:.1f}s old)" for ws in self._sockets]
        busy = sum(1 for conn in self._connections
                   if conn.holds(hand_over) and not conn.calls)
        if busy:
            words.append(f"{busy} connection(s) between requests")
        return words

    async def cancel_inflight(self) -> int:
        """End what a drain left: WebSockets with 1012, the rest cut; each logged."""
        now = time.monotonic()
        cut = 0
        for websocket in list(self._sockets):
            self._log.warning("drain_timeout cut: WebSocket %s (open %.1fs): closed with 1012",
                              websocket.path, now - websocket.opened)
            websocket.close_for_swap()
            cut += 1
        for call in list(self._calls):
            self._log.warning("drain_timeout cut: %s", call.describe(now))
            call.cut = True
            cut += 1
        held = [conn for conn in self._connections if not conn.calls]
        cut += len(held)
        if self._sockets:  # their close handshakes, bounded
            self._closing = True
            self._refresh()
            await super().wait_idle(CLOSE_WAIT + 0.1)
        for websocket in list(self._sockets):
            websocket.cut = True
            websocket.transport.abort()
        for connection in list(self._connections):
            connection.transport.abort()
        # connection_lost runs one turn later: the cycles then know their
        # clients are gone, and uvicorn reports nothing for them.
        await asyncio.sleep(0)
        tasks = list(self._state.tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return cut

    def close(self) -> None:
        super().close()
        if self._clock is not None:
            self._clock.cancel()
            self._clock = None
        if self._park_deadline is not None:
            self._park_deadline.cancel()
            self._park_deadline = None

    def _tick(self) -> None:
        # The Date header, once a second: what uvicorn's own main loop does.
        now = formatdate(time.time(), usegmt=True).encode()
        self._state.default_headers = [(b"date", now), *self._config.encoded_headers]
        self._clock = asyncio.get_running_loop().call_later(1.0, self._tick)


class Call:
    """One ASGI http call, from the app's start until it returned.

    ``streaming``: a body part with ``more_body`` was sent (the response is
    under way); ``sse``: its content type is ``text/event-stream``;
    ``responded``: the response is complete (what runs now is work after it).
    """

    __slots__ = ("connection", "cut", "ended", "method", "path", "responded", "send", "sse",
                 "started", "streaming")

    def __init__(self, connection: HttpConnection, scope: Message, send: Any) -> None:
        self.connection = connection
        self.method = str(scope.get("method", "?"))
        self.path = str(scope.get("path", "?"))
        self.started = time.monotonic()
        self.send = send
        self.sse = False
        self.streaming = False
        self.responded = False
        self.ended = False  # ended by a swap (SSE): what the app sends now goes nowhere
        self.cut = False  # cancelled by cancel_inflight(): its CancelledError is expected

    def sending(self, message: Message) -> Awaitable[None]:
        """The app's ``send``: uvicorn's, noting how far the response is.

        Not a coroutine of its own, which would cost every request a frame
        per message: it returns uvicorn's awaitable, noting what it sends
        before it goes (a body's last part marks the response complete as it
        goes out: from then on what runs is work after it), except for an SSE
        response's start, which is looked at once it was sent."""
        if self.ended:
            return _sent_nowhere()  # ended for a swap: the rest goes nowhere
        kind = message["type"]
        if kind == "http.response.body":
            more = message.get("more_body", False)
            changed = not more or not self.streaming
            if more:
                self.streaming = True
            else:
                self.responded = True
            listener = self.connection._listener
            if changed and listener is not None and listener._closing:
                listener._call_changed(self)
        elif kind == "http.response.start":
            self.sse = _is_event_stream(message.get("headers", ()))
            if self.sse:
                return self._stream_started(message)
        return cast(Awaitable[None], self.send(message))

    async def _stream_started(self, message: Message) -> None:
        await self.send(message)
        listener = self.connection._listener
        if listener is not None and listener._closing:  # begun during a pause: ended at once
            listener._call_changed(self)

    def holds(self, hand_over: bool) -> bool:
        """Whether a pause waits for it: not a stream that finishes on this generation."""
        return not (hand_over and self.streaming and not self.sse and not self.responded)

    def describe(self, now: float) -> str:
        if self.responded:
            what = "work after its response (background task)"
        elif self.streaming:
            what = "streaming its response"
        else:
            what = "before its response"
        return f"{self.method} {self.path} ({now - self.started:.1f}s old, {what})"

    async def end(self) -> None:
        """End an SSE response cleanly: the terminating chunk, the connection
        closed after it; the app's ``receive()`` then returns ``http.disconnect``."""
        self.ended = True
        cycle = getattr(self.send, "__self__", None)
        if isinstance(cycle, RequestResponseCycle):
            if cycle.response_complete or cycle.disconnected:
                return
            cycle.keep_alive = False
        with contextlib.suppress(OSError, RuntimeError):  # the client left, or the app ended it
            await self.send({"type": "http.response.body", "body": b"", "more_body": False})


async def _sent_nowhere() -> None:
    return None


def _is_event_stream(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    for name, value in headers:
        if name.lower() == b"content-type":
            return value.lower().startswith(b"text/event-stream")
    return False


class HttpConnection(HttpToolsProtocol):
    """uvicorn's httptools protocol, which can also end or move its connection
    for a swap and knows its ASGI calls (``Call``).

    Requests run through uvicorn's code untouched; the app is wrapped to
    count its calls, which ``HttpListener`` weighs at a pause.
    """

    def __init__(self, config: uvicorn.Config, server_state: ServerState,
                 app_state: dict[str, Any], listener: HttpListener | None = None,
                 buffered: bytes = b"") -> None:
        super().__init__(config, server_state, app_state)
        # uvicorn formats an access line's arguments before the logger drops
        # it: a cost on every request, unless we ask the logger first.
        self.access_log = self.access_log and self.access_logger.isEnabledFor(logging.INFO)
        self._listener = listener
        self._check: asyncio.TimerHandle | None = None
        self._grace = LAST_REQUEST_GRACE
        self._idle_since: float | None = None
        self._ending = False
        self._handing_over = False
        self.parked = False
        self._buffered = buffered  # carried from a predecessor: parsed first
        self._held = b""  # what arrived once parked: not parsed here, it goes with the socket
        self.calls: set[Call] = set()
        if listener is not None:
            self.app = self._tracking(self.app)

    def _tracking(self, app: AsgiApp) -> AsgiApp:
        listener = self._listener
        assert listener is not None

        async def tracked(scope: Message, receive: Any, send: Any) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            call = Call(self, scope, send)
            self.calls.add(call)
            listener._call_began(call)
            try:
                await app(scope, receive, call.sending)
            except asyncio.CancelledError:
                if not call.cut:
                    raise
                # cut by cancel_inflight(), which logged it: no traceback
            except RuntimeError:
                if not call.ended:
                    raise
                # the app sent on a stream the swap had ended
            finally:
                self.calls.discard(call)
                listener._call_ended(call)

        return tracked

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if self._listener is not None:
            self._listener._opened(self)
        if self._buffered:
            buffered, self._buffered = self._buffered, b""
            self.data_received(buffered)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self._check is not None:
            self._check.cancel()
            self._check = None
        if self._listener is not None:
            self._listener._ended(self)

    def handle_websocket_upgrade(self) -> None:
        """uvicorn's upgrade, to a ``WebSocketConnection`` its listener knows of."""
        self.connections.discard(self)
        if self._check is not None:
            self._check.cancel()
            self._check = None
        method = self.scope["method"].encode()
        output = [method, b" ", self.url, b" HTTP/1.1\r\n"]
        for name, value in self.scope["headers"]:
            output += [name, b": ", value, b"\r\n"]
        output.append(b"\r\n")
        protocol = WebSocketConnection(self.config, self.server_state, self.app_state,
                                       owner=self._listener)
        if self._listener is not None:
            self._listener._upgraded(self, protocol)
        protocol.connection_made(self.transport)
        protocol.data_received(b"".join(output))
        self.transport.set_protocol(protocol)

    def _unsupported_upgrade_warning(self) -> None:
        # uvicorn's own text tells the user to install a library, which is
        # not the reason here: only asgi bundles serve WebSockets.
        self.logger.warning("an upgrade request (%s) was answered as plain HTTP: only asgi "
                            "bundles serve WebSockets", self._get_upgrade() or b"?")

    def holds(self, hand_over: bool) -> bool:
        """Whether a pause waits for this connection (``HttpListener``'s table)."""
        if self.parked:
            return False
        return not (hand_over and self.calls and not any(c.holds(True) for c in self.calls))

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._handing_over and not self.parked:
            self._park_if_idle()

    # -- a hand-over: park ------------------------------------------------------------

    def hand_over(self) -> None:
        """Park this connection as soon as it is between requests: now, or once
        the response in progress is complete. A response already streaming its
        body goes on here (the pause does not wait for it) and then parks the
        same way, if the successor has not collected the parked ones yet; else
        the connection ends between requests (``close_gracefully``). Its head
        went out keep-alive, so closing it right after the body would race the
        client's next request: every wsgi body is streamed, for one."""
        if self._ending or self.parked or self.transport is None or self.transport.is_closing():
            return
        self._handing_over = True
        self._park_if_idle()

    def _park_if_idle(self) -> None:
        if self._check is not None:
            self._check.cancel()
            self._check = None
        if not self._handing_over or self.transport.is_closing():
            return
        listener = self._listener
        if not self._between_requests():
            self._check = asyncio.get_running_loop().call_later(_RECHECK, self._park_if_idle)
            return
        if listener is not None and listener._collected:  # too late to move: end it
            self.close_gracefully(listener._grace)
            return
        self.parked = True
        self.flow.pause_reading()  # the next bytes stay in the kernel, for the successor
        self._unset_keepalive_if_required()  # nor is it timed out while parked
        if listener is not None:
            listener._refresh()

    def _between_requests(self) -> bool:
        """No request in progress here, none begun in the parser (what the
        kernel holds goes with the socket)."""
        if self.pipeline:
            return False
        if self.cycle is None:
            return self.scope is None
        return self.cycle.response_complete and self.scope is self.cycle.scope

    def data_received(self, data: bytes) -> None:
        if self.parked:
            # uvloop starts reading after connection_made() whatever it was
            # told there, so a connection parked as it was accepted may still
            # be given bytes: they are its successor's (or ours again after a
            # rollback), never parsed here.
            self._held += data
            self.transport.pause_reading()
            return
        super().data_received(data)

    def carried(self) -> Carried:
        """This parked connection for a successor: a fresh dup the caller owns,
        with what arrived since it was parked."""
        self.transport.pause_reading()  # effective now, whatever connection_made saw
        sock: socket.socket = self.transport.get_extra_info("socket")
        return Carried(kind="http", fd=os.dup(sock.fileno()), buffered=self._held)

    def release(self) -> None:
        """The successor took it: close our fd (no byte, no FIN: theirs keeps it open)."""
        self._handing_over = False
        self.transport.close()

    def serve_on(self) -> None:
        """The hand-over rolled back: read again, as if nothing happened."""
        if self._check is not None:
            self._check.cancel()
            self._check = None
        self._handing_over = False
        if self.parked:
            self.parked = False
            self.flow.resume_reading()
            if not self.transport.is_closing():
                self.timeout_keep_alive_task = self.loop.call_later(
                    self.timeout_keep_alive, self.timeout_keep_alive_handler)
            if self._held:
                held, self._held = self._held, b""
                super().data_received(held)

    # -- any other pause: close gracefully ---------------------------------------------

    def close_gracefully(self, grace: float) -> None:
        """End this connection between requests, so its client loses nothing.

        The rule: every request that starts from now on is answered with
        ``Connection: close`` and ends the connection; so does the request in
        progress, unless its response head was already sent (then the
        connection counts as idle once that response is complete). A
        connection idle since the call (or since that response) gets
        ``grace`` seconds to send one more request; if it sends none, and no
        byte of one is waiting in the socket, it is closed.

        Why not close idle connections at once: a keep-alive client may be
        sending its next request at that very moment, and a request that
        meets a closed connection is lost (the client sees a reset or an
        empty reply). Answering it with ``Connection: close`` is the one
        race-free way for a server to end an HTTP/1.1 connection. The grace
        bounds what an idle client costs: a client that waited that long is
        between bursts, and closing an idle connection is what every HTTP
        server does on its keep-alive timeout (uvicorn's own is 5 s), which
        clients detect before reusing the connection.
        """
        if self._ending or self.transport is None or self.transport.is_closing():
            return
        if self.parked:  # a drain after a hand-over that kept it: it was released
            return
        self._handing_over = False
        self._ending = True
        self._grace = grace
        self.app = _answer_with_close(self.app)  # only this connection, from now on
        if self.cycle is not None and not self.cycle.response_started:
            self.cycle.keep_alive = False  # it adds Connection: close and closes after
        self._check_idle()

    def shorten_grace(self, grace: float) -> None:
        if self._ending and grace < self._grace:
            self._grace = grace
            self._check_idle()

    def _check_idle(self) -> None:
        if self._check is not None:
            self._check.cancel()
        self._check = None
        if self.transport.is_closing():
            return
        loop = asyncio.get_running_loop()
        if not self._idle():
            self._idle_since = None
            self._check = loop.call_later(_RECHECK, self._check_idle)
            return
        now = time.monotonic()
        if self._idle_since is None:
            self._idle_since = now
        left = self._idle_since + self._grace - now
        if left > 0:
            self._check = loop.call_later(left, self._check_idle)
            return
        self.transport.close()

    def _idle(self) -> bool:
        """No request in progress, none begun in the parser, no byte unread in the socket."""
        return self._between_requests() and not _readable(self.transport)


def _readable(transport: asyncio.BaseTransport) -> bool:
    """Whether the kernel holds bytes (or an EOF) the loop has not delivered yet."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return False
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    return bool(poller.poll(0))


def _answer_with_close(app: AsgiApp) -> AsgiApp:
    """``app``, whose responses carry ``Connection: close`` (uvicorn then closes
    the connection once the response is complete)."""

    async def closing(scope: Message, receive: Any, send: Any) -> None:
        async def send_closing(message: Message) -> None:
            if message.get("type") == "http.response.start":
                headers = [*message.get("headers", ()), (b"connection", b"close")]
                message = {**message, "headers": headers}
            await send(message)

        await app(scope, receive, send_closing)

    return closing
