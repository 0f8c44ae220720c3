"""An asyncio streams server on an inherited listening socket, controlled by the runtime.

Why not ``asyncio.start_server``: ``Server.close()`` can lose a connection that
was accepted just before it (the client sees a reset), and pausing means closing.
This listener runs its own accept loop as a reader callback, so pausing is just
removing the reader: connections that arrive meanwhile wait in the kernel
backlog of the socket, which the supervisor and the next generation also hold,
and none is refused or reset.

The listening socket is never ``shutdown()``: that would reset every queued
connection for every process holding it. Closing our copy loses nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Coroutine, Generator
from dataclasses import dataclass, field
from typing import Any, cast

ClientCallback = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]

#: accept() errors after which a socket will never accept again.
_BROKEN = frozenset({errno.EBADF, errno.ENOTSOCK, errno.EINVAL})

#: Connections accepted per readiness callback, so one busy socket cannot starve
#: the loop (and a pause request waits at most one batch).
_ACCEPT_BATCH = 64


@dataclass
class Carried:
    """A connection moving from this generation to its successor at a hand-over.

    ``fd`` is a duplicate of the connection's socket that the receiver owns
    (the sender keeps its own until the move is committed or rolled back);
    ``buffered`` is what was read from the socket but not yet consumed (it
    goes first, before anything more the socket delivers); ``kind`` tells the
    successor's listener how to take it up (``"http"`` an idle keep-alive
    connection, ``"websocket"``, ``"stream"`` a service bundle's
    ``ctx.hand_over``); ``meta`` is whatever that kind needs (picklable: it
    travels like a snapshot, between generations of the same bundle only).
    """

    kind: str
    fd: int
    buffered: bytes = b""
    meta: dict[str, Any] = field(default_factory=dict)


class Listener:
    """Accepts connections on ``sock``; each is served by ``_serve_connection``.

    Contract: accepting starts at construction if ``accepting``, else at the
    first ``resume()``; ``pause()`` stops accepting at
    once (no connection is accepted after it returns); ``resume()`` starts
    again; ``inflight`` counts connections accepted and not yet finished
    (``_serve_connection`` returned); ``wait_idle()`` waits until it is zero.
    Every connection task is strongly referenced until it ends.

    Carrying connections across a hand-over (all optional for a subclass; the
    defaults carry nothing):

    * ``pause(carry=True)``: the pause is a hand-over's; connections that can
      move (idle between requests, at a frame boundary, a handler in
      ``ctx.hand_over``) may be *parked* instead of ended: no longer read or
      written by this generation, and no longer counted in ``inflight``.
      With ``overlap=True`` too, the successor serves already (overlap mode,
      no state handed over): only connections with nothing of their own in
      flight move (idle keep-alive ones, ``ctx.hand_over``); the rest stay
      and finish here, as in any other pause.
    * ``parked()``: a ``Carried`` for each parked connection (fresh duplicate
      fds, owned by the caller), once the pause's wait is over.
    * ``release_parked()``: the successor took them: drop this generation's
      side without a byte on the wire (never a FIN: the successor's fd keeps
      the connection open).
    * ``resume()`` after a pause: parked connections are served here again
      (the swap rolled back), from where they stopped.
    * ``adopt(item)``: the successor's side; the default closes the fd, logged.

    This class owns accepting; how a connection is served is a subclass's
    ``_serve_connection``: ``StreamsListener`` here (``ctx.serve``), the ASGI
    server in ``asgi``.
    """

    def __init__(
        self, name: str, sock: socket.socket, log: logging.Logger, accepting: bool = True,
    ) -> None:
        self.name = name
        self._sock = sock
        self._log = log
        self._loop = asyncio.get_running_loop()
        self._tasks: set[asyncio.Task[None]] = set()
        self._parked_tasks: set[asyncio.Task[None]] = set()  # in _tasks, not in flight
        self._idle = asyncio.Event()
        self._idle.set()
        self._accepting = False  # what the runtime asked for
        self._reading = False  # whether our reader is installed right now
        self._retry: asyncio.TimerHandle | None = None
        self._broken = False  # the socket can never accept again (see _on_readable)
        # The socket is shared: O_NONBLOCK lives on the open file description,
        # which the supervisor already made non-blocking for every holder.
        self._sock.setblocking(False)
        if accepting:
            self.resume()

    def __await__(self) -> Generator[Any, None, Listener]:
        """``await ctx.serve(...)`` and plain ``ctx.serve(...)`` both work."""
        return self
        yield  # pragma: no cover - makes this a generator

    @property
    def accepting(self) -> bool:
        return self._accepting

    @property
    def inflight(self) -> int:
        return len(self._tasks) - len(self._parked_tasks)

    def pause(self, carry: bool = False, overlap: bool = False) -> None:
        self._accepting = False
        self._set_reading(False)
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None

    def resume(self) -> None:
        self._accepting = True
        self._set_reading(True)

    def parked(self) -> list[Carried]:
        """The connections parked for the successor (see the class docstring)."""
        return []

    def release_parked(self) -> None:
        """The successor took the parked connections: drop ours, silently."""

    def adopt(self, item: Carried) -> None:
        """Serve a connection a predecessor carried here. Owns ``item.fd``."""
        self._log.warning("socket %r: a carried %s connection cannot be taken up here; closed",
                          self.name, item.kind)
        with contextlib.suppress(OSError):
            os.close(item.fd)

    def _set_reading(self, on: bool) -> None:
        if on and (self._broken or self._sock.fileno() < 0):
            return  # nothing to read: add_reader(-1) would raise
        if on and not self._reading:
            self._loop.add_reader(self._sock.fileno(), self._on_readable)
        elif not on and self._reading:
            self._loop.remove_reader(self._sock.fileno())
        self._reading = on

    def _retry_accept(self) -> None:
        self._retry = None
        if self._accepting:  # not if the runtime paused us meanwhile
            self._set_reading(True)

    async def wait_idle(self, timeout: float) -> bool:
        """True once no connection is in flight, False if ``timeout`` passed first."""
        if not self.inflight:
            return True  # at once: no wait, not even a zero timeout's
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    async def cancel_inflight(self) -> int:
        """Cancel every connection still in flight; returns how many there were."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return len(tasks)

    def close(self) -> None:
        """Stop accepting and close this process's copy of the socket (never shutdown)."""
        self.pause()
        self._sock.close()

    def _on_readable(self) -> None:
        for _ in range(_ACCEPT_BATCH):
            try:
                conn, _addr = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                if exc.errno in _BROKEN:
                    # Our copy is closed, or the socket no longer listens
                    # (someone shutdown() it): it will never accept again, and
                    # a level-triggered reader would spin on it. Stop, once.
                    self._log.error("socket %r cannot accept any more (%s): this generation "
                                    "serves no new connection on it", self.name, exc)
                    self.pause()
                    self._broken = True
                    return
                # EMFILE and friends: leave the connection queued in the backlog
                # and try again shortly, rather than spinning on a readable fd.
                self._log.error("accept on socket %r failed: %s", self.name, exc)
                self._set_reading(False)
                if self._retry is None:
                    self._retry = self._loop.call_later(0.1, self._retry_accept)
                return
            conn.setblocking(False)
            self._start_task(self._serve_connection(conn))

    def _start_task(self, serving: Coroutine[Any, Any, None]) -> None:
        task = self._loop.create_task(serving)
        self._tasks.add(task)
        self._idle.clear()
        task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._parked_tasks.discard(task)
        self._recount()

    def _park(self, task: asyncio.Task[None]) -> None:
        """``task``'s connection waits for the successor: not in flight any more."""
        if task in self._tasks:
            self._parked_tasks.add(task)
            self._recount()

    def _unpark(self, task: asyncio.Task[None]) -> None:
        if task in self._parked_tasks:
            self._parked_tasks.discard(task)
            self._recount()

    def _recount(self) -> None:
        if self.inflight:
            self._idle.clear()
        else:
            self._idle.set()

    async def _serve_connection(self, conn: socket.socket) -> None:
        """Own one accepted (non-blocking) connection until it is closed.

        Cancelled by ``cancel_inflight()``: it must then close the connection.
        """
        raise NotImplementedError


#: ``resume(reader, writer, state)``: the bundle's hook for a connection carried to it.
ResumeCallback = Callable[[asyncio.StreamReader, asyncio.StreamWriter, Any], Awaitable[None]]


@dataclass
class _Parking:
    """A ``ctx.hand_over`` in progress: its connection, and the answer it waits for."""

    task: asyncio.Task[None]
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    state: Any
    moved: asyncio.Future[bool]


class StreamsListener(Listener):
    """Serves ``callback(reader, writer)`` for every connection (``ctx.serve``).

    A connection is in flight until the callback returned and the transport
    closed, or until its handler calls ``hand_over`` during a carrying pause:
    then it is parked (nothing reads it) and the handler waits for the
    outcome. A connection carried here from a predecessor is served by
    ``resume(reader, writer, state)`` (the bundle's hook), its reader fed
    first with what the predecessor had read but not consumed.
    """

    def __init__(
        self, name: str, sock: socket.socket, callback: ClientCallback, log: logging.Logger,
        accepting: bool = True, resume: Callable[[], ResumeCallback | None] | None = None,
    ) -> None:
        self._callback = callback
        self._resume_hook = resume
        self._carrying = False  # a hand-over pause: hand_over() may park connections
        self._streams: dict[asyncio.StreamWriter, tuple[asyncio.StreamReader,
                                                        asyncio.Task[None]]] = {}
        self._parking: dict[asyncio.StreamWriter, _Parking] = {}
        super().__init__(name, sock, log, accepting)

    def owns(self, writer: asyncio.StreamWriter) -> bool:
        return writer in self._streams

    def pause(self, carry: bool = False, overlap: bool = False) -> None:
        super().pause(carry, overlap)
        self._carrying = carry

    async def hand_over(self, writer: asyncio.StreamWriter, state: Any) -> bool:
        """Park ``writer``'s connection for the successor (``ctx.hand_over``).

        True once the successor took it (this side is closed without a byte
        on the wire: the caller must not touch it); False at once when no
        carrying pause is under way, or later when the swap rolled back (the
        connection is served here again, reading where it stopped).
        """
        entry = self._streams.get(writer)
        if not self._carrying or entry is None or writer.transport.is_closing():
            return False
        reader, task = entry
        # Nothing is read from here on: whatever arrives waits in the kernel for
        # whichever generation serves the connection next.
        _transport(writer).pause_reading()
        parking = _Parking(task, reader, writer, state, self._loop.create_future())
        self._parking[writer] = parking
        self._park(task)
        try:
            return await parking.moved
        finally:
            self._parking.pop(writer, None)
            self._unpark(task)

    def parked(self) -> list[Carried]:
        items = []
        for parking in self._parking.values():
            sock = parking.writer.get_extra_info("socket")
            if sock is None or sock.fileno() < 0:
                continue
            # StreamReader has no public peek: its buffer is what was read from
            # the socket and not consumed by the handler, which must go first.
            buffered = bytes(getattr(parking.reader, "_buffer", b""))
            items.append(Carried("stream", os.dup(sock.fileno()), buffered,
                                 {"state": parking.state}))
        return items

    def release_parked(self) -> None:
        for parking in list(self._parking.values()):
            # abort(): close our fd without flushing or shutting down; the
            # successor's duplicate keeps the connection open.
            parking.writer.transport.abort()
            if not parking.moved.done():
                parking.moved.set_result(True)

    def resume(self) -> None:
        self._carrying = False
        for parking in list(self._parking.values()):
            if not parking.moved.done():
                _transport(parking.writer).resume_reading()
                parking.moved.set_result(False)
        super().resume()

    def adopt(self, item: Carried) -> None:
        hook = self._resume_hook() if self._resume_hook is not None else None
        if item.kind != "stream" or hook is None:
            why = "the bundle has no resume(reader, writer, state) hook" if hook is None \
                else f"it is a {item.kind} connection"
            self._log.warning("socket %r: a connection carried from the previous generation "
                              "was closed: %s", self.name, why)
            with contextlib.suppress(OSError):
                os.close(item.fd)
            return
        conn = socket.socket(fileno=item.fd)
        conn.setblocking(False)
        state = item.meta.get("state")

        async def resume(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await hook(reader, writer, state)

        self._start_task(self._serve(conn, resume, item.buffered))

    async def _serve_connection(self, conn: socket.socket) -> None:
        await self._serve(conn, self._callback, b"")

    async def _serve(self, conn: socket.socket, callback: ClientCallback,
                     buffered: bytes) -> None:
        reader = asyncio.StreamReader(loop=self._loop)
        if buffered:
            reader.feed_data(buffered)
        protocol = asyncio.StreamReaderProtocol(reader, loop=self._loop)
        try:
            transport, _ = await self._loop.connect_accepted_socket(lambda: protocol, sock=conn)
        except OSError as exc:
            conn.close()
            self._log.warning("connection on %r lost before it was served: %s", self.name, exc)
            return
        writer = asyncio.StreamWriter(transport, protocol, reader, self._loop)
        task = asyncio.current_task()
        assert task is not None
        self._streams[writer] = (reader, task)
        try:
            await callback(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away; nothing to report
        except Exception:
            self._log.exception("connection handler for socket %r failed", self.name)
        finally:
            del self._streams[writer]
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()


def _transport(writer: asyncio.StreamWriter) -> asyncio.Transport:
    """A served connection's transport: a full (read-write) one (uvloop's
    transports do not subclass asyncio's, so this is a cast, not a check)."""
    return cast(asyncio.Transport, writer.transport)
