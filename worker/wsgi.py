"""wsgi bundles: a WSGI callable (Flask, Django's ``get_wsgi_application()``)
served on the asgi path through a2wsgi's ``WSGIMiddleware``.

A wsgi bundle is an asgi bundle whose app is ``WSGIMiddleware(callable,
workers=threads)``: the same listener, the same ``Connection: close`` at a
swap, the same module-level ``hotsup_snapshot()``/``hotsup_restore(state)``
hooks of the entry's module, so the swap guarantees are the asgi ones. What
is WSGI's own:

* the callable runs in a2wsgi's thread pool, ``threads`` (bundle.toml) at
  once; a request waits for a free thread. The ASGI call awaits its thread, so
  a request is in flight until the callable returned and its body was sent:
  a pause's snapshot, and a retirement's drain, wait for it;
* ``stop()`` (at retirement, after the drain) shuts the pool down and waits up
  to POOL_DRAIN seconds for a call still running (one whose client was cut
  at drain_timeout); after that the worker exits anyway, which ends the thread;
* a2wsgi answers the lifespan protocol itself (nothing to start); Flask's and
  Django's set-up happens at import, in step 1 of a swap, while the old
  generation still serves;
* ``factory = true``: the entry is called with no arguments to make the callable.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from a2wsgi import WSGIMiddleware

from . import importer
from .asgi import AsgiBundle
from .context import BundleContext

#: Seconds ``stop()`` waits for WSGI calls still running when the pool shuts down.
POOL_DRAIN = 2.0


class WsgiBundle(AsgiBundle):
    """One generation of a wsgi bundle: an ``AsgiBundle`` over a2wsgi's middleware."""

    def __init__(self, ctx: BundleContext, middleware: WSGIMiddleware, module: Any) -> None:
        super().__init__(ctx, middleware, module)
        self.middleware = middleware

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
        bundle = cls(ctx, WSGIMiddleware(app, workers=threads), module)
        await bundle.lifespan.startup()
        return bundle

    async def stop(self) -> None:
        await super().stop()
        executor = self.middleware.executor
        # Queued calls are dropped (their connections are gone by now); a
        # running one cannot be interrupted, only waited for.
        drained = asyncio.to_thread(executor.shutdown, wait=True, cancel_futures=True)
        try:
            await asyncio.wait_for(drained, POOL_DRAIN)
        except TimeoutError:
            self.ctx.log.warning("a WSGI call still runs %gs after the drain; exiting "
                                 "without it", POOL_DRAIN)
