"""The worker endpoint: one ZeroMQ ROUTER that every worker connects to.

A worker proves who it is with the per-generation token it was given at fork
time; the first accepted message binds its ZeroMQ routing id to that
generation, and every later message must carry the same token from the same
routing id. Anything else is dropped and logged, so a worker cannot speak for
another bundle or generation.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
from collections.abc import Callable
from typing import Any

import zmq
import zmq.asyncio
from hotsup.worker import protocol as P

log = logging.getLogger("hotsup")

Handler = Callable[[dict[str, Any], bytes | None], None]


class WorkerChannel:
    def __init__(self, zctx: zmq.asyncio.Context, endpoint: str) -> None:
        self.endpoint = endpoint
        self._sock = zctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        # Sending to a worker that has gone raises instead of vanishing silently.
        self._sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self._sock.setsockopt(zmq.MAXMSGSIZE, P.MAX_WORKER_MESSAGE)
        self._sock.bind(endpoint)
        if endpoint.startswith("ipc://"):  # run_dir is 0700 already; this holds if it is not
            os.chmod(endpoint.removeprefix("ipc://"), 0o600)
        self._by_token: dict[str, Handler] = {}
        self._routes: dict[bytes, str] = {}  # routing id -> token
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._receive())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._sock.close()

    def register(self, token: str, handler: Handler) -> None:
        self._by_token[token] = handler

    def unregister(self, token: str) -> None:
        self._by_token.pop(token, None)
        for route, owner in list(self._routes.items()):
            if owner == token:
                del self._routes[route]

    async def send(self, token: str, header: dict[str, Any], payload: bytes | None) -> None:
        route = next((r for r, t in self._routes.items() if t == token), None)
        if route is None:
            raise ConnectionError("the worker has not connected")
        try:
            await self._sock.send_multipart([route, *P.encode(header, payload)])
        except zmq.ZMQError as exc:
            raise ConnectionError(f"cannot reach the worker: {exc}") from None

    async def _receive(self) -> None:
        while True:
            frames = await self._sock.recv_multipart()
            try:
                self._dispatch(frames)
            except Exception:
                log.exception("worker channel: failed to handle a message")

    def _dispatch(self, frames: list[bytes]) -> None:
        route, body = frames[0], frames[1:]
        try:
            header, payload = P.decode(body)
        except P.ProtocolError as exc:
            log.warning("worker channel: dropped a malformed message: %s", exc)
            return
        token = header.get("token")
        handler = self._by_token.get(token) if isinstance(token, str) else None
        known = self._routes.get(route)
        if handler is None or (known is not None and not hmac.compare_digest(known, token or "")):
            log.warning("worker channel: dropped a %r message with a wrong token", header["op"])
            return
        if known is None:
            if token in self._routes.values():
                log.warning("worker channel: a second peer claimed a generation's token")
                return
            self._routes[route] = token  # type: ignore[assignment]
        handler(header, payload)
