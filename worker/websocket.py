"""WebSockets in asgi bundles: uvicorn's websockets sans-IO protocol, which can
also end a connection for a swap or move it to the next generation.

``WebSocketConnection`` runs every WebSocket of an asgi bundle (the HTTP
protocol hands the upgraded connection to it). The ASGI side is uvicorn's,
untouched: subprotocols, close codes and reasons, ping/pong keep-alive
(``ws_ping_interval``), ``ws_max_size``. What hotsup adds:

* every scope carries ``scope["extensions"]["hotsup.connection"] = {"id": str,
  "resumed": bool}``; the id is made at the handshake and kept for the
  connection's life, across generations;
* ``close_for_swap()``: the close handshake with 1012 (Service Restart), the
  app's ``receive()`` returning ``websocket.disconnect`` (1012); the
  connection is counted until the client answered (or ``CLOSE_WAIT`` passed);
* ``park()`` / ``unpark()`` / ``release()`` / ``carried()``: the connection at
  a frame boundary, handed to a successor (``websockets = "resume"``), and
  ``adopt()`` on the successor's side.

A frame boundary (``parkable``): the handshake is done, no close was sent or
received, no fragmented message is half read, the app waits in ``receive()``
with nothing queued for it (it has handled every message), everything it
sent has left the process (the transport's buffer is empty) and no
compression context exists (permessage-deflate is off in resume mode: its
window cannot move between processes). Bytes of an incomplete frame already
read from the socket are carried in ``Carried.buffered``; bytes the kernel
holds go with the socket itself.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from typing import Any, Protocol

from uvicorn.config import Config
from uvicorn.protocols.utils import ClientDisconnected
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from uvicorn.server import ServerState
from websockets.protocol import State
from websockets.server import ServerProtocol

from .listener import Carried

#: The close code for a connection ended by a swap (RFC 6455: Service Restart).
SERVICE_RESTART = 1012

#: How long a close for a swap waits for the client's answer before the
#: connection is dropped (a pause waits at most this for a WebSocket). With
#: ``asgi.PARK_WAIT`` it bounds what open WebSockets add to a hand-over's
#: pause (new connections wait that long in the backlog): 0.5 s at most.
CLOSE_WAIT = 0.25

#: What a carried WebSocket's ``meta`` holds (``Carried.kind == "websocket"``).
KIND = "websocket"

#: The extension every websocket scope carries.
EXTENSION = "hotsup.connection"


class Owner(Protocol):
    """What a ``WebSocketConnection`` tells its listener (``asgi.HttpListener``)."""

    def _ws_changed(self, connection: WebSocketConnection) -> None: ...


class WebSocketConnection(WebSocketsSansIOProtocol):
    """One WebSocket, from the upgrade (or its adoption) until the app returned
    and the socket is closed (``finished``)."""

    def __init__(self, config: Config, server_state: ServerState, app_state: dict[str, Any],
                 owner: Owner | None = None, carried: Carried | None = None) -> None:
        super().__init__(config, server_state, app_state)
        self._owner = owner
        self.id = uuid.uuid4().hex
        self.opened = time.monotonic()
        self.resumed = carried is not None
        self._carried = carried
        self._app_running = False  # the app's call has begun and not returned
        self._handshake_scope: dict[str, Any] = {}
        self._lost = False
        self._receiving = False  # the app waits in receive()
        self.parked = False
        self._released = False
        self.closing_for_swap = False
        self._close_on_accept = False  # a swap asked to close it before the app accepted
        self.cut = False  # cancelled at the end of a drain: its CancelledError is expected
        # The bytes read since the last complete frame (see _track): what a
        # successor must parse first if the connection moves now.
        self._unframed = bytearray()
        if carried is not None:
            self.id = str(carried.meta["id"])
            # Straight to frames: the handshake happened in a predecessor.
            self.conn = ServerProtocol(state=State.OPEN, max_size=config.ws_max_size,
                                       logger=logging.getLogger("uvicorn.error"))

    # -- what the listener looks at ------------------------------------------

    @property
    def finished(self) -> bool:
        """The socket is closed and the app's call returned."""
        return self._lost and not self._app_running

    @property
    def path(self) -> str:
        scope = getattr(self, "scope", None)
        return str(scope["path"]) if scope is not None else "?"

    @property
    def parkable(self) -> bool:
        """At a frame boundary (module docstring): it can move now."""
        return (self.handshake_complete and not self.close_sent and not self.disconnected
                and not self._lost and self.conn.state is State.OPEN
                and self.conn.current_size is None and not self.conn.extensions
                and self._receiving and self.queue.empty()
                and self.initial_response is None and not self.transport.is_closing()
                and self.transport.get_write_buffer_size() == 0)

    def _changed(self) -> None:
        if self._owner is not None:
            self._owner._ws_changed(self)

    # -- uvicorn's protocol, extended ------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self._carried is None:
            return
        meta = self._carried.meta
        self.handshake_initiated = True
        scope: Any = {**meta["scope"], "state": self.app_state.copy()}
        scope["extensions"] = {**meta["scope"].get("extensions", {}),
                               EXTENSION: {"id": self.id, "resumed": True}}
        self.scope = scope
        self._handshake_scope = dict(meta["scope"])
        self.queue.put_nowait({"type": "websocket.connect"})
        self._start_app()
        if self._carried.buffered:  # read by the predecessor, not parsed: it goes first
            self.data_received(self._carried.buffered)
        self._carried = None

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._lost = True
        self._changed()

    def data_received(self, data: bytes) -> None:
        if self.handshake_initiated:
            self._track(data)
        super().data_received(data)

    def handle_connect(self, event: Any) -> None:
        super().handle_connect(event)
        scope = getattr(self, "scope", None)
        if scope is not None:  # accepted by websockets: the app is called with it
            # uvicorn made the app's task; it has not run yet. The scope as
            # the handshake made it, before a framework adds its objects to
            # it (Starlette's app, router, endpoint): what a successor gets.
            scope["extensions"][EXTENSION] = {"id": self.id, "resumed": False}
            self._handshake_scope = {key: value for key, value in scope.items()
                                     if key != "state"}
            self._app_running = True

    def _start_app(self) -> None:
        """What uvicorn's ``handle_connect`` does once the handshake is accepted."""
        task = self.loop.create_task(self.run_asgi())
        task.add_done_callback(self.on_task_complete)
        self.tasks.add(task)
        self._app_running = True

    def on_task_complete(self, task: asyncio.Task[None]) -> None:
        super().on_task_complete(task)
        self._app_running = False
        self._changed()

    async def run_asgi(self) -> None:
        try:
            await super().run_asgi()
        except asyncio.CancelledError:
            if not self.cut:
                raise
            # Cut at the end of a drain: logged by the listener, no traceback.

    async def receive(self) -> Any:
        self._receiving = True
        if self.queue.empty():  # the app waits for the client: a frame boundary, maybe
            self._changed()
        try:
            return await super().receive()
        finally:
            self._receiving = False
            self._changed()

    async def send(self, message: Any) -> None:
        if self._released or self.closing_for_swap:
            # Released: the successor owns the wire. Closing: the app was told
            # (websocket.disconnect); what it sends now has nobody to go to.
            raise ClientDisconnected()
        kind = message.get("type")
        if self.resumed and not self.handshake_complete:
            if kind == "websocket.accept":  # the client is connected already
                self.handshake_complete = True
                self.start_keepalive()
                return
            if kind != "websocket.close":
                raise RuntimeError(f"a resumed WebSocket expects 'websocket.accept' or "
                                   f"'websocket.close', got {kind!r}")
            self.handshake_complete = True  # close it with a close frame, not a 403
        await super().send(message)
        if kind == "websocket.accept" and self._close_on_accept:
            self.close_for_swap()
        self._changed()

    # -- a swap ------------------------------------------------------------------

    def close_for_swap(self) -> None:
        """Start the close handshake with 1012; the app gets ``websocket.disconnect``.

        Not yet accepted by the app: closed as soon as it is. Already closing:
        nothing more. The connection ends when the client answers, or after
        ``CLOSE_WAIT``.
        """
        if self._lost or self.close_sent or self.transport.is_closing():
            return
        if not self.handshake_complete:
            self._close_on_accept = True
            return
        self.closing_for_swap = True
        self.stop_keepalive()
        self.queue.put_nowait({"type": "websocket.disconnect", "code": SERVICE_RESTART,
                               "reason": "service restart"})
        self.conn.send_close(SERVICE_RESTART, "service restart")
        self.transport.write(b"".join(self.conn.data_to_send()))
        self.close_sent = True
        if self.read_paused:  # the client's close frame must be read
            self.read_paused = False
            self.transport.resume_reading()
        self.close_timer = self.loop.call_later(CLOSE_WAIT, self.transport.close)
        self._changed()

    def park(self) -> None:
        """Stop reading and writing here: the connection may move (``parkable``)."""
        self.parked = True
        self.transport.pause_reading()
        self.stop_keepalive()

    def unpark(self) -> None:
        """The swap rolled back: serve on here, from where it stopped."""
        self.parked = False
        if not self.read_paused:
            self.transport.resume_reading()
        self.start_keepalive()

    def carried(self) -> Carried:
        """The connection for a successor: a fresh dup of the socket (the
        caller owns it), the unparsed bytes, the scope (without ``state``,
        which is the generation's) and the id."""
        sock: socket.socket = self.transport.get_extra_info("socket")
        scope = dict(self._handshake_scope)
        extensions: dict[str, Any] = dict(scope.get("extensions") or {})
        extensions.pop(EXTENSION, None)
        scope["extensions"] = extensions
        return Carried(kind=KIND, fd=os.dup(sock.fileno()), buffered=bytes(self._unframed),
                       meta={"id": self.id, "scope": scope})

    def release(self) -> None:
        """The successor took the connection: end ours without a byte on the wire.

        The app's ``receive()`` returns ``websocket.disconnect`` (1012) and its
        sends raise ``ClientDisconnected``; our fd is closed, which sends
        nothing while the successor's fd keeps the socket open (a FIN goes
        only with the last fd, and nothing is left in our write buffer).
        """
        self._released = True
        self.disconnected = True
        self.close_sent = True
        self.stop_keepalive()
        self.queue.put_nowait({"type": "websocket.disconnect", "code": SERVICE_RESTART,
                               "reason": "moved to the next generation"})
        self.transport.close()

    def _track(self, data: bytes) -> None:
        """Keep ``_unframed``: the bytes after the last complete frame."""
        self._unframed += data
        end = _complete_frames(self._unframed)
        if end:
            del self._unframed[:end]


def _complete_frames(data: bytearray) -> int:
    """The length of the complete WebSocket frames at the start of ``data`` (RFC 6455 5.2)."""
    at = 0
    size = len(data)
    while size - at >= 2:
        length = data[at + 1] & 0x7F
        head = 2
        if length == 126:
            head = 4
            if size - at < head:
                break
            length = int.from_bytes(data[at + 2:at + 4], "big")
        elif length == 127:
            head = 10
            if size - at < head:
                break
            length = int.from_bytes(data[at + 2:at + 10], "big")
        if data[at + 1] & 0x80:
            head += 4  # the mask
        if size - at < head + length:
            break
        at += head + length
    return at
