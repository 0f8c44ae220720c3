"""The channel between the supervisor and one worker: a socketpair made for it.

For each spawn the supervisor makes a ``SOCK_SEQPACKET`` socketpair, keeps one
end and passes the other to the zygote in the spawn request's fds; the worker
has it from the moment it is forked. There is no path to find and no token to
present: the two ends exist only in the two processes, so nothing can stand in
for either of them, and another worker cannot reach this one's channel.

**Framing.** One message is one packet: a JSON header (``protocol.encode``,
at most ``MAX_HEADER`` bytes) with file descriptors attached by ``SCM_RIGHTS``
(at most ``MAX_FDS``). SEQPACKET keeps message boundaries and delivers a
packet's fds with that packet, so an fd can never be taken for another
message's. A header may say ``"payload": SIZE``: then the first attached fd is
a **sealed memfd** holding the payload (a pickled snapshot, up to
``MAX_WORKER_MESSAGE``), and ``"nfds": N`` counts the fds after it that belong
to the message itself (connections, say).

Why a memfd rather than framing a byte stream over ``SOCK_STREAM``: a packet
stays small whatever the payload, so a 256 MiB snapshot is never cut into
frames that a reader must reassemble, and the size is known (``fstat``) before
a byte of it is read: a payload over the limit is refused before it is
buffered. The seals (no write, grow or shrink) make the bytes immutable once
sent, so what the receiver checked is what it reads. And a memfd is a file:
a later change can relay a snapshot from generation N to N+1 by passing the
fd on, without the supervisor ever copying it.

**Trust.** A worker runs bundle code, so whatever it sends is checked:
malformed headers, wrong fd counts, payloads that are not sealed memfds or are
too large are dropped (their fds closed) and logged, rate-limited, since a
bundle can flood its channel. The channel never unpickles anything.

Both sides read with their asyncio loop (``add_reader`` + ``recvmsg`` on a
non-blocking socket): reading never blocks the loop. A zero-length packet is
indistinguishable from the peer's close on SEQPACKET, and is taken as one.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import fcntl
import json
import logging
import mmap
import os
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final

from . import protocol as P

#: The largest header (JSON bytes) of one message.
MAX_HEADER: Final = 64 * 1024

#: The most fds one message may carry (its payload's memfd included).
MAX_FDS: Final = 64

#: Payloads larger than this are received as a ``Payload`` (left in their memfd)
#: by a channel that asks for it: the supervisor's, and a worker's.
KEEP_OVER: Final = 256 * 1024

#: The seals a payload memfd must carry: its bytes can no longer change.
_SEALS: Final = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK

#: Packets read per readiness callback, so a flooding peer cannot starve the loop.
_READ_BATCH: Final = 64

_INT_SIZE: Final = array.array("i").itemsize


@dataclass(frozen=True)
class Message:
    """One message received: the receiver owns ``fds`` and must close them."""

    header: dict[str, Any]
    payload: bytes | Payload | None  # a Payload: over the channel's keep_over
    fds: tuple[int, ...]


class RateLimitedLog:
    """At most ``burst`` warnings per ``interval`` seconds; the rest are counted
    and their number said with the next one let through."""

    def __init__(self, log: logging.Logger | logging.LoggerAdapter[Any], burst: int = 5,
                 interval: float = 10.0) -> None:
        self._log = log
        self._burst = burst
        self._interval = interval
        self._window = -interval
        self._said = 0
        self.suppressed = 0

    def warning(self, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._window >= self._interval:
            self._window, self._said = now, 0
        if self._said >= self._burst:
            self.suppressed += 1
            return
        self._said += 1
        if self.suppressed:
            message += " (and %d more like it, not logged)"
            args = (*args, self.suppressed)
            self.suppressed = 0
        self._log.warning(message, *args)


def close_fds(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def make_payload(data: bytes) -> int:
    """A sealed memfd holding ``data``; the caller owns (and closes) it."""
    fd = new_memfd()
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS | fcntl.F_SEAL_SEAL)
    except BaseException:
        os.close(fd)
        raise
    return fd


class Payload:
    """A payload left in its sealed memfd, unread: how a snapshot travels from
    generation N through the supervisor to N+1 (and into a checkpoint)
    without anyone but N and N+1 holding its bytes in their own memory. A
    received memfd's pages are shared, not the receiver's: the supervisor's
    RSS does not grow by what it relays or keeps this way.

    Immutable (the seals), so it may be shared freely: sending it attaches the
    same fd, never a copy. The fd is closed by ``close()``, or when the last
    reference goes (CPython's reference counting makes that deterministic).
    """

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __repr__(self) -> str:
        return f"<Payload fd={self.fd} {self.size} bytes>"

    def read(self) -> bytes:
        """Its bytes, copied into this process's memory."""
        return _pread_all(self.fd, self.size)

    @contextlib.contextmanager
    def view(self) -> Iterator[memoryview]:
        """Its bytes, mapped read-only (no copy), for the ``with`` block only."""
        if not self.size:
            yield memoryview(b"")
            return
        mapped = mmap.mmap(self.fd, self.size, prot=mmap.PROT_READ)
        try:
            with memoryview(mapped) as view:
                yield view
        finally:
            mapped.close()

    def close(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1

    def __del__(self) -> None:
        self.close()


def _pread_all(fd: int, size: int) -> bytes:
    chunks: list[bytes] = []
    offset = 0
    while offset < size:
        chunk = os.pread(fd, size - offset, offset)
        if not chunk:
            raise P.ProtocolError("the payload memfd ended early")
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def payload_bytes(payload: bytes | Payload) -> bytes:
    return payload.read() if isinstance(payload, Payload) else payload


def sealed_payload(fd: int) -> Payload:
    """Seal a memfd the caller wrote (``new_memfd``) and own it as a Payload."""
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS | fcntl.F_SEAL_SEAL)
    return Payload(fd, os.fstat(fd).st_size)


def new_memfd() -> int:
    """A fresh, sealable memfd to write a payload into (``sealed_payload``)."""
    return os.memfd_create("hotsup-payload", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)


def check_payload(fd: int, size: int, limit: int) -> None:
    """Check that ``fd`` is a sealed memfd of the announced ``size``, within
    ``limit``; ProtocolError if not."""
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        raise P.ProtocolError("the payload is not a memfd") from None
    if seals & _SEALS != _SEALS:
        raise P.ProtocolError("the payload memfd is not sealed")
    actual = os.fstat(fd).st_size
    if actual != size:
        raise P.ProtocolError(f"the payload is {actual} bytes, the header says {size}")
    if size > limit:
        raise P.ProtocolError(f"a payload of {size} bytes is over the limit of {limit}" if limit
                              else f"a payload of {size} bytes where none is expected (a "
                                   f"reply to no request)")


def pack(header: dict[str, Any], payload: bytes | Payload | None = None,
         fds: Sequence[int] = ()) -> tuple[bytes, list[int], int]:
    """The packet for one message: ``(data, fds to attach, memfd or -1)``.
    The memfd made for bytes (if any) is the caller's to close once the packet
    is sent; a ``Payload`` goes as its own fd (the kernel passes a duplicate)."""
    if len(fds) + (payload is not None) > MAX_FDS:
        raise P.ProtocolError(f"a message carries at most {MAX_FDS} fds")
    fields = dict(header)
    if fds:
        fields["nfds"] = len(fds)
    memfd = -1
    if payload is not None:
        if len(payload) > P.MAX_WORKER_MESSAGE:
            raise P.ProtocolError(f"a payload of {len(payload)} bytes is over the limit of "
                                  f"{P.MAX_WORKER_MESSAGE}")
        fields["payload"] = len(payload)
    data = P.encode(fields)[0]
    if len(data) > MAX_HEADER:
        raise P.ProtocolError(f"a header of {len(data)} bytes is over the limit of {MAX_HEADER}")
    if isinstance(payload, Payload):
        return data, [payload.fd, *fds], -1
    if payload is not None:
        memfd = make_payload(payload)
    return data, ([memfd] if memfd >= 0 else []) + list(fds), memfd


#: The most payload bytes a message may carry: a number, or a function of the
#: message's header (a reply nobody asked for need not be read at all).
Limit = int | Callable[[dict[str, Any]], int]


def unpack(data: bytes, fds: list[int], flags: int,
           limit: Limit = P.MAX_WORKER_MESSAGE, keep_over: int | None = None) -> Message:
    """The message in one received packet. ProtocolError if it is malformed
    or its payload is over ``limit`` (checked before a byte of it is read);
    then the caller still owns ``fds`` (and closes them). A payload larger
    than ``keep_over`` stays in its memfd (a ``Payload``), unread."""
    if flags & socket.MSG_TRUNC:
        raise P.ProtocolError(f"a header over {MAX_HEADER} bytes")
    if flags & socket.MSG_CTRUNC:
        raise P.ProtocolError(f"more than {MAX_FDS} fds (or no fd left to receive them)")
    header, _ = P.decode([data])
    nfds, size = header.pop("nfds", 0), header.pop("payload", None)
    if type(nfds) is not int or not (size is None or type(size) is int):
        raise P.ProtocolError("'nfds' and 'payload' must be integers")
    if len(fds) != nfds + (size is not None):
        raise P.ProtocolError(f"the header announces {nfds} fd(s)"
                              f"{' and a payload' if size is not None else ''}, "
                              f"{len(fds)} came")
    payload: bytes | Payload | None = None
    if size is not None:
        check_payload(fds[0], size, limit(header) if callable(limit) else limit)
        if keep_over is not None and size > keep_over:
            payload = Payload(fds[0], size)  # nothing can fail after this: it owns the fd
        else:
            payload = _pread_all(fds[0], size)
            os.close(fds[0])
        fds = fds[1:]
    return Message(header, payload, tuple(fds))


def _recv(sock: socket.socket) -> tuple[bytes, list[int], int]:
    """One packet: its bytes, its fds (now ours, close-on-exec) and flags."""
    data, ancillary, flags, _ = sock.recvmsg(
        MAX_HEADER, socket.CMSG_SPACE(MAX_FDS * _INT_SIZE), socket.MSG_CMSG_CLOEXEC)
    fds: list[int] = []
    for level, kind, body in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            received = array.array("i")
            received.frombytes(body[: len(body) - len(body) % _INT_SIZE])
            fds.extend(received)
    return data, fds, flags


def receive_blocking(sock: socket.socket, timeout: float) -> Message | None:
    """One message, read before any event loop runs (a worker's first, its
    spec); None if the peer closed. ProtocolError if malformed or late."""
    sock.settimeout(timeout)
    try:
        data, fds, flags = _recv(sock)
    except TimeoutError:
        raise P.ProtocolError(f"no message within {timeout:g}s") from None
    finally:
        sock.setblocking(False)
    if not data and not fds:
        return None
    try:
        return unpack(data, fds, flags)
    except P.ProtocolError:
        close_fds(fds)
        raise


class Channel:
    """One end of a worker channel, read and written on the running loop.

    ``on_message(message)`` is called for every well-formed message and owns
    its fds. ``limit``: the most payload bytes a message may carry (see
    ``Limit``). ``on_closed()`` once, when the peer closed its end (or ours
    failed). ``send()`` fails with ConnectionError once closed. Malformed
    messages are dropped and logged through ``drops`` (rate-limited).
    """

    def __init__(self, sock: socket.socket, on_message: Callable[[Message], None],
                 drops: RateLimitedLog, on_closed: Callable[[], None] | None = None,
                 limit: Limit = P.MAX_WORKER_MESSAGE, keep_over: int | None = None) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._on_message = on_message
        self._on_closed = on_closed
        self._drops = drops
        self._limit = limit
        self._keep_over = keep_over
        self._loop = asyncio.get_running_loop()
        self._sending = asyncio.Lock()
        self._writable: asyncio.Future[None] | None = None
        self.closed = False
        self._loop.add_reader(sock.fileno(), self._on_readable)

    async def send(self, header: dict[str, Any], payload: bytes | Payload | None = None,
                   fds: Sequence[int] = ()) -> None:
        """Send one message. ``fds`` stay the caller's (the kernel passes
        duplicates). ConnectionError if the peer is gone; ProtocolError if
        the message is over a limit."""
        data, attached, memfd = pack(header, payload, fds)
        try:
            async with self._sending:  # packets go out whole, in the order asked
                await self._send_packet(data, attached)
        finally:
            if memfd >= 0:
                os.close(memfd)

    async def _send_packet(self, data: bytes, fds: list[int]) -> None:
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        while True:
            if self.closed:
                raise ConnectionError("the channel is closed")
            try:
                self._sock.sendmsg([data], ancillary)
                return
            except BlockingIOError:
                pass  # the peer's queue is full: wait until it reads
            except OSError as exc:  # EPIPE, ECONNRESET: the peer is gone
                raise ConnectionError(f"the channel is closed: {exc.strerror or exc}") from None
            self._writable = writable = self._loop.create_future()
            self._loop.add_writer(self._sock.fileno(), _settle, writable)
            try:
                await writable
            finally:
                self._writable = None
                if not self.closed:
                    self._loop.remove_writer(self._sock.fileno())

    def _on_readable(self) -> None:
        for _ in range(_READ_BATCH):
            try:
                data, fds, flags = _recv(self._sock)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data, fds, flags = b"", [], 0
            if not data and not fds:
                self.close()
                return
            try:
                message = unpack(data, fds, flags, self._limit, self._keep_over)
            except P.ProtocolError as exc:
                close_fds(fds)
                self._drops.warning("dropped a malformed message: %s", exc)
                continue
            except OSError as exc:  # reading the payload failed
                close_fds(fds)
                self._drops.warning("dropped a message: %s", exc)
                continue
            self._on_message(message)

    def close(self) -> None:
        """Close our end (idempotent); the peer reads EOF."""
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_reader(self._sock.fileno())
            self._loop.remove_writer(self._sock.fileno())
        if self._writable is not None:
            _settle(self._writable)  # the sender sees `closed` and gives up
        self._sock.close()
        if self._on_closed is not None:
            self._on_closed()


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def encode_spec(spec: P.SpawnSpec) -> bytes:
    """The payload of a worker's first message (``protocol.OP_SPEC``)."""
    return json.dumps(spec, separators=(",", ":")).encode()


def decode_spec(message: Message) -> P.SpawnSpec:
    """The spec in a worker's first message; ProtocolError if it is not one."""
    if message.header["op"] != P.OP_SPEC or not isinstance(message.payload, bytes):
        raise P.ProtocolError(f"expected a {P.OP_SPEC!r} message first, got "
                              f"{message.header['op']!r}")
    try:
        spec = json.loads(message.payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise P.ProtocolError(f"the spec is not JSON: {exc}") from None
    if not isinstance(spec, dict):
        raise P.ProtocolError("the spec is not a JSON object")
    return spec  # type: ignore[return-value]
