"""A DEALER's side of ZMTP 3.0 (NULL security) over a connected stream socket:
enough for the command line to send one request to the control endpoint's
ROUTER and read its reply, without importing pyzmq.

Why: every ``hotsup status`` is a fresh process, and importing pyzmq and
starting a libzmq context (its I/O thread) was a third of its time. The
control socket is an ipc endpoint, a unix stream socket in a 0700 run_dir,
where ZMTP's NULL mechanism is what libzmq speaks, so the exchange is small
and fixed (the spec is ZeroMQ RFC 23, ZMTP 3.0):

* greeting, 64 bytes each way: signature ``FF 00*8 7F``, version 3.0,
  mechanism ``NULL`` (20 bytes, zero-padded), as-server 0, 31 bytes filler;
* handshake, each way: a READY command with the property ``Socket-Type``
  (ours DEALER, theirs must be ROUTER); an ERROR command ends it;
* then frames: a flags byte (bit 0 MORE, bit 1 LONG: an 8-byte size instead
  of 1, bit 2 COMMAND), the size, the body. Our request is one frame; the
  ROUTER strips its routing frame, so its reply is one message.

Every read has the caller's deadline; the peer closing or breaking the
protocol raises ``ProtocolError``.
"""

from __future__ import annotations

import socket
import time

_SIGNATURE = b"\xff" + b"\x00" * 8 + b"\x7f"
GREETING = _SIGNATURE + bytes([3, 0]) + b"NULL".ljust(20, b"\x00") + b"\x00" + b"\x00" * 31

_MORE, _LONG, _COMMAND = 0x01, 0x02, 0x04


class ProtocolError(Exception):
    """The peer closed the connection or did not speak ZMTP 3 as a ROUTER."""


def _property(name: bytes, value: bytes) -> bytes:
    return bytes([len(name)]) + name + len(value).to_bytes(4, "big") + value


def frame(body: bytes, flags: int = 0) -> bytes:
    """One frame carrying ``body`` (a command if ``flags`` has COMMAND)."""
    if len(body) < 256:
        return bytes([flags]) + bytes([len(body)]) + body
    return bytes([flags | _LONG]) + len(body).to_bytes(8, "big") + body


READY = frame(b"\x05READY" + _property(b"Socket-Type", b"DEALER") + _property(b"Identity", b""),
              _COMMAND)


class Dealer:
    """One connected stream socket, after the ZMTP handshake, with a deadline."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self._sock = sock
        self._deadline = deadline  # time.monotonic()
        self._buffer = b""
        sock.sendall(GREETING + READY)  # NULL security: nothing to wait for in between
        greeting = self._read(64)
        if greeting[:1] != b"\xff" or greeting[9:10] != b"\x7f" or greeting[10] < 3:
            raise ProtocolError("the peer does not speak ZMTP 3")
        if greeting[12:32].rstrip(b"\x00") != b"NULL":
            raise ProtocolError(f"the peer wants security {greeting[12:32].rstrip(bytes(1))!r}")
        flags, body = self._frame()
        if not flags & _COMMAND:
            raise ProtocolError("the peer sent a message before its READY")
        name, properties = _command(body)
        if name == b"ERROR":
            reason = body[7:].decode(errors="replace")
            raise ProtocolError(f"the peer refused the handshake: {reason}")
        if name != b"READY" or properties.get(b"socket-type") != b"ROUTER":
            raise ProtocolError(f"the peer is not a ROUTER ({name!r}, {properties!r})")

    def send(self, body: bytes) -> None:
        """One message of one frame."""
        self._sock.sendall(frame(body))

    def recv(self) -> bytes:
        """The next message (its frames joined), skipping commands (a PING...)."""
        parts: list[bytes] = []
        while True:
            flags, body = self._frame()
            if flags & _COMMAND:
                continue
            parts.append(body)
            if not flags & _MORE:
                return b"".join(parts)

    def _frame(self) -> tuple[int, bytes]:
        flags = self._read(1)[0]
        size = int.from_bytes(self._read(8), "big") if flags & _LONG else self._read(1)[0]
        return flags, self._read(size)

    def _read(self, count: int) -> bytes:
        while len(self._buffer) < count:
            left = self._deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            self._sock.settimeout(left)
            chunk = self._sock.recv(max(65536, count - len(self._buffer)))
            if not chunk:
                raise ProtocolError("the peer closed the connection")
            self._buffer += chunk
        data, self._buffer = self._buffer[:count], self._buffer[count:]
        return data


def _command(body: bytes) -> tuple[bytes, dict[bytes, bytes]]:
    """A command's name and its properties (names lower-cased, as RFC 23 compares them)."""
    if not body:
        raise ProtocolError("an empty command")
    size = body[0]
    name, at = body[1:1 + size], 1 + size
    properties: dict[bytes, bytes] = {}
    if name != b"READY":
        return name, properties
    while at < len(body):
        key_size = body[at]
        key = body[at + 1:at + 1 + key_size]
        at += 1 + key_size
        value_size = int.from_bytes(body[at:at + 4], "big")
        properties[key.lower()] = body[at + 4:at + 4 + value_size]
        at += 4 + value_size
    if at != len(body):
        raise ProtocolError("a malformed READY")
    return name, properties
