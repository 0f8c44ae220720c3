"""wsgi bundles: a WSGI callable (Flask, Django's ``get_wsgi_application()``)
served on the asgi path through a2wsgi's ``WSGIMiddleware``.

A wsgi bundle is an asgi bundle whose app is ``WSGIMiddleware(callable,
workers=threads)``: the same listener, the same ``Connection: close`` at a
swap, the same module-level ``hotsup_snapshot()``/``hotsup_restore(state)``
hooks of the entry's module, so the swap guarantees are the asgi ones. What
is WSGI's own:

* the callable runs in a2wsgi's thread pool, ``threads`` (bundle.toml) at
  once; a request waits for a free thread. A call is in flight until it
  returned and its body was sent, even if its client left meanwhile (a thread
  cannot be stopped, and it may still change the state): ``RunningCalls``
  counts them beside the connections, so a pause's snapshot and a
  retirement's drain wait for them too;
* ``stop()`` (at retirement, after the drain) shuts the pool down and waits up
  to POOL_DRAIN seconds for a call still running (one whose client was cut
  at drain_timeout); after that the worker exits anyway, which ends the thread;
* a2wsgi answers the lifespan protocol itself (nothing to start); Flask's and
  Django's set-up happens at import, in step 1 of a swap, while the old
  generation still serves;
* ``factory = true``: the entry is called with no arguments to make the callable;
* every request's environ has the bundle's ctx as ``environ["hotsup"]`` (what an
  asgi app finds in ``scope["state"]["hotsup"]``).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterable
from typing import Any

from a2wsgi import WSGIMiddleware
from a2wsgi.wsgi_typing import Environ, StartResponse, WSGIApp

from . import importer
from .asgi import AsgiBundle, socket_name
from .context import BundleContext
from .lifespan import Message
from .listener import Listener

#: Seconds ``stop()`` waits for WSGI calls still running when the pool shuts down.
POOL_DRAIN = 2.0


class WsgiBundle(AsgiBundle):
    """One generation of a wsgi bundle: an ``AsgiBundle`` over a2wsgi's middleware."""

    def __init__(self, ctx: BundleContext, middleware: WSGIMiddleware, module: Any) -> None:
        name = socket_name(ctx.sockets)
        self.calls = RunningCalls(name, ctx.sockets[name], ctx.log)
        # WSGI has no WebSockets: an upgrade request reaches the app as plain HTTP.
        super().__init__(ctx, self.calls.tracking(middleware), module, websockets=None)
        self.middleware = middleware

    async def start(self) -> None:
        await super().start()
        self.calls.http = self.ctx.listeners[-1]  # the HTTP listener AsgiBundle.start() made
        self.ctx.listeners.append(self.calls)

    @classmethod
    async def load_wsgi(cls, ctx: BundleContext, entry: str, factory: bool,
                        threads: int) -> WsgiBundle:
        """Import ``entry`` (``module:attribute``), make the callable, wrap it."""
        target = importer.resolve(entry)
        module = sys.modules[entry.partition(":")[0]]
        app = target() if factory else target
        if not callable(app):
            made = f"{entry}() returned" if factory else f"{entry} is"
            raise TypeError(f"{made} {app!r}, which is not a WSGI application")
        bundle = cls(ctx, WSGIMiddleware(_with_ctx(app, ctx), workers=threads), module)
        await bundle.lifespan.startup()
        return bundle

    async def stop(self) -> None:
        await super().stop()
        executor = self.middleware.executor
        # Queued calls are dropped (their connections are gone by now); a
        # running one cannot be interrupted, only waited for.
        drained = asyncio.to_thread(executor.shutdown, wait=True, cancel_futures=True)
        try:
            async with asyncio.timeout(POOL_DRAIN):
                await drained
        except TimeoutError:
            self.ctx.log.warning("a WSGI call still runs %gs after the drain; exiting "
                                 "without it", POOL_DRAIN)


def _with_ctx(app: WSGIApp, ctx: BundleContext) -> WSGIApp:
    """``app`` with the bundle's ctx in every environ, as ``environ["hotsup"]``."""

    def call(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        environ["hotsup"] = ctx  # type: ignore[typeddict-unknown-key]
        return app(environ, start_response)

    return call


class RunningCalls(Listener):
    """The app calls in flight, for the runtime's pause and drain (which wait
    until every listener is idle). Accepts nothing: the HTTP listener does.

    Counted on the event loop around the whole ASGI call, which a2wsgi ends
    only once the WSGI callable returned in its thread and the body was sent:
    exact at the moment the runtime looks, whatever the threads are doing.
    """

    def __init__(self, name: str, sock: Any, log: Any) -> None:
        self._running = 0
        self.http: Listener | None = None
        super().__init__(f"{name} (WSGI calls)", sock, log, accepting=False)

    async def wait_idle(self, timeout: float) -> bool:
        """Idle once no call runs, and the HTTP listener is idle again after one
        more turn of the loop.

        Why the turn: uvloop accepts a connection in its I/O callback but calls
        the protocol's ``connection_made`` later (``call_soon``). A connection
        accepted just before the pause is not yet counted when the runtime
        asks the HTTP listener (before this one) whether it is idle; once
        counted it is ended gracefully, but may carry one more request, which
        must be answered before the snapshot, not after (the state would fork).
        """
        deadline = asyncio.get_running_loop().time() + timeout
        await asyncio.sleep(0)  # every connection_made already scheduled runs first
        if self.http is not None and not await self.http.wait_idle(timeout):
            return False
        left = max(0.0, deadline - asyncio.get_running_loop().time())
        return await super().wait_idle(left)

    @property
    def inflight(self) -> int:
        return self._running

    def _set_reading(self, on: bool) -> None:
        self._reading = on  # nothing to accept: the socket is the HTTP listener's

    def close(self) -> None:
        self.pause()  # the socket is the HTTP listener's to close

    def tracking(self, app: Any) -> Any:
        """``app`` (ASGI), counted while each of its http calls runs."""

        async def counted(scope: Message, receive: Any, send: Any) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            self._running += 1
            self._idle.clear()
            try:
                await app(scope, receive, send)
            finally:
                self._running -= 1
                if not self._running:
                    self._idle.set()

        return counted
