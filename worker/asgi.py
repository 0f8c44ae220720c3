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

How connections end at a swap (``HttpListener.pause``, for a hand-over pause and
for the drain of a retirement alike): see ``HttpConnection.close_gracefully``.
"""

from __future__ import annotations

import asyncio
import logging
import select
import socket
import sys
import time
from email.utils import formatdate
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from . import importer
from .context import BundleContext
from .lifespan import AsgiApp, Lifespan, Message
from .listener import Listener
from .protocol import BACKLOG

#: How long a keep-alive connection that is idle when a swap starts may take to
#: send one more request (answered with ``Connection: close``) before it is
#: closed. See ``HttpConnection.close_gracefully``.
LAST_REQUEST_GRACE = 0.5

#: How often a closing connection whose response was already under way is
#: looked at again, to see when it went idle.
_RECHECK = 0.05

#: The lifespan shutdown's share of the retirement's STOP_GRACE (supervisor/swap.py).
SHUTDOWN_TIMEOUT = 3.0


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

    def __init__(self, ctx: BundleContext, app: Any, module: Any) -> None:
        self.ctx = ctx
        self.socket = socket_name(ctx.sockets)
        # The app goes in as a factory of itself, so Config never calls the
        # app to guess whether it is one; ws="none": no websocket support yet.
        self.config = uvicorn.Config(
            app=lambda: app, factory=True, http=HttpConnection, ws="none", lifespan="off",
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
        self.snapshot = _hook(module, "hotsup_snapshot")
        self.restore = _hook(module, "hotsup_restore")

    @classmethod
    async def load(cls, ctx: BundleContext, entry: str, factory: bool) -> AsgiBundle:
        """Import ``entry`` (``module:attribute``), make the app, run its lifespan startup."""
        target = importer.resolve(entry)
        module = sys.modules[entry.partition(":")[0]]
        app = target() if factory else target
        if not callable(app):
            made = f"{entry}() returned" if factory else f"{entry} is"
            raise TypeError(f"{made} {app!r}, which is not an ASGI application")
        bundle = cls(ctx, app, module)
        await bundle.lifespan.startup()
        return bundle

    async def start(self) -> None:
        listener = HttpListener(self.socket, self.ctx.listening(self.socket), self.ctx.log,
                                self.config, self.lifespan.state, self.ctx.accepting)
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

    A connection is in flight (``inflight``, ``wait_idle``) from its accept
    until it is closed. That is no obstacle to a pause: ``pause()`` makes every
    connection close gracefully, idle keep-alive ones within
    ``LAST_REQUEST_GRACE``, so only a request that is still being answered
    keeps a pause or a drain waiting.
    """

    def __init__(self, name: str, sock: socket.socket, log: Any, config: uvicorn.Config,
                 app_state: dict[str, Any], accepting: bool) -> None:
        self._config = config
        self._app_state = app_state
        self._state = ServerState()
        self._connections: set[HttpConnection] = set()
        self._closing = False  # paused: connections must end, new ones too
        self._grace = LAST_REQUEST_GRACE
        self._clock: asyncio.TimerHandle | None = None
        self._server: asyncio.AbstractServer | None = None
        self._opening: asyncio.Task[None] | None = None
        self._tick()
        super().__init__(name, sock, log, accepting)

    @property
    def inflight(self) -> int:
        return len(self._connections)

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

    def _opened(self, connection: HttpConnection) -> None:
        self._connections.add(connection)
        self._idle.clear()
        if self._closing:  # accepted just before a pause
            connection.close_gracefully(self._grace)

    def _ended(self, connection: HttpConnection) -> None:
        self._connections.discard(connection)
        if not self._connections:
            self._idle.set()

    def pause(self, carry: bool = False) -> None:
        super().pause(carry)
        self._closing = True
        if self._connections:
            self._log.debug("paused: ending %d connection(s) between requests",
                            len(self._connections))
        for connection in list(self._connections):
            connection.close_gracefully(self._grace)

    def resume(self) -> None:
        self._closing = False  # connections already closing go on closing: that is harmless
        super().resume()

    async def wait_idle(self, timeout: float) -> bool:
        # An idle connection's grace must end well within the caller's
        # deadline (a short quiesce_timeout), or it alone would fail the pause.
        if timeout < 2 * self._grace:
            self._grace = timeout / 2
            for connection in list(self._connections):
                connection.shorten_grace(self._grace)
        return await super().wait_idle(timeout)

    async def cancel_inflight(self) -> int:
        cut = len(self._connections)
        for connection in list(self._connections):
            connection.transport.abort()
        # The connections are gone; their requests' tasks would run on unheard.
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

    def _tick(self) -> None:
        # The Date header, once a second: what uvicorn's own main loop does.
        now = formatdate(time.time(), usegmt=True).encode()
        self._state.default_headers = [(b"date", now), *self._config.encoded_headers]
        self._clock = asyncio.get_running_loop().call_later(1.0, self._tick)


class HttpConnection(HttpToolsProtocol):
    """uvicorn's httptools protocol, which can also end its connection for a swap.

    Only ``connection_lost`` is overridden (once per connection); requests run
    through uvicorn's code untouched until ``close_gracefully()``.
    """

    def __init__(self, config: uvicorn.Config, server_state: ServerState,
                 app_state: dict[str, Any], listener: HttpListener | None = None) -> None:
        super().__init__(config, server_state, app_state)
        # uvicorn formats an access line's arguments before the logger drops
        # it: a cost on every request, unless we ask the logger first.
        self.access_log = self.access_log and self.access_logger.isEnabledFor(logging.INFO)
        self._listener = listener
        self._check: asyncio.TimerHandle | None = None
        self._grace = LAST_REQUEST_GRACE
        self._idle_since: float | None = None
        self._ending = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if self._listener is not None:
            self._listener._opened(self)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self._check is not None:
            self._check.cancel()
            self._check = None
        if self._listener is not None:
            self._listener._ended(self)

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
        if self.pipeline:
            return False
        if self.cycle is None:
            begun = self.scope is not None
        else:
            begun = not self.cycle.response_complete or self.scope is not self.cycle.scope
        return not begun and not _readable(self.transport)


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
