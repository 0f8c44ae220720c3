"""The process that owns the control socket: ``python -m hotsup.supervisor.control_endpoint``.

libzmq aborts the whole process when accept() on an ipc endpoint fails with
EMFILE (``Too many open files (src/ipc_listener.cpp)``): with the ROUTER in the
supervisor, any process of its user holding enough idle connections to
``control`` took every bundle down (finding 3 of issue 11). No setting of
libzmq bounds its connections, and an fd-count watch in the supervisor loses
the race against a fast connect loop (tried: the I/O thread accepts while the
event loop reacts). So the endpoint lives here, in a process of its own that
holds nothing else: if a flood makes libzmq abort, only this process dies,
the connections of the flood with it; the supervisor starts a new one, and
the bundles never notice.

Started by ``control_server.ControlServer`` (fork+exec, never a bare fork of the
supervisor), with one end of a ``SOCK_STREAM`` socketpair. Both ways a message
is ``[route, *frames]`` framed as ``!I`` (frame count), then ``!I`` length and
bytes per frame: requests from the ROUTER go to the supervisor whole (libzmq
already dropped any over ``MAX_REQUEST``), replies come back and go out on the
ROUTER. The first message to the supervisor is ``[b"ready"]``, once the socket
is bound and owner-only. EOF on the socketpair (the supervisor is gone or done)
ends this process.

Replies go out without blocking: one for a client whose queue is full
(``SEND_HWM``: it does not read) or who left is dropped, so one such client
never holds up the others' replies, and this process's memory has a ceiling
(``MAX_MEMORY``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import socket
import struct
import sys

import zmq

_COUNT = struct.Struct("!I")

#: The most frames a message may have (a route, a request frame or two).
MAX_FRAMES = 8

#: The largest reply the supervisor may send (a ``logs`` reply is the largest).
MAX_REPLY = 64 * 1024 * 1024

#: Replies queued for one client that does not read them; more are dropped
#: (the command line reads its one reply at once).
SEND_HWM = 4

#: The memory this process may use (RLIMIT_DATA, bytes; it needs about 26 MiB).
#: Many clients that never read could still queue a few replies each: past
#: this, an allocation fails and the process dies, their connections with it,
#: and the supervisor starts a new one, as for a flood of connections.
MAX_MEMORY = 256 * 1024 * 1024


def pack(frames: list[bytes]) -> bytes:
    out = [_COUNT.pack(len(frames))]
    for frame in frames:
        out += [_COUNT.pack(len(frame)), frame]
    return b"".join(out)


class Unpacker:
    """Splits a byte stream into messages; ValueError on a malformed one."""

    def __init__(self, max_bytes: int) -> None:
        self._buffer = bytearray()
        self._max = max_bytes

    def feed(self, data: bytes) -> list[list[bytes]]:
        self._buffer += data
        messages = []
        while (message := self._next()) is not None:
            messages.append(message)
        return messages

    def _next(self) -> list[bytes] | None:
        view, offset = self._buffer, 0
        if len(view) < 4:
            return None
        (count,) = _COUNT.unpack_from(view, 0)
        if not 1 <= count <= MAX_FRAMES:
            raise ValueError(f"a message of {count} frames")
        offset, frames = 4, []
        for _ in range(count):
            if len(view) < offset + 4:
                return None
            (size,) = _COUNT.unpack_from(view, offset)
            if size > self._max:
                raise ValueError(f"a frame of {size} bytes")
            offset += 4
            if len(view) < offset + size:
                return None
            frames.append(bytes(view[offset:offset + size]))
            offset += size
        del self._buffer[:offset]
        return frames


def serve(link: socket.socket, endpoint: str, path: str, max_request: int) -> int:
    zctx = zmq.Context()
    router = zctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 500)  # time for the last replies to leave
    router.setsockopt(zmq.MAXMSGSIZE, max_request)
    router.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a vanished client raises, not hangs
    router.setsockopt(zmq.SNDHWM, SEND_HWM)
    router.bind(endpoint)
    os.chmod(path, 0o600)  # run_dir is 0700 already; this holds if it is not
    link.sendall(pack([b"ready"]))
    poller = zmq.Poller()
    poller.register(router, zmq.POLLIN)
    poller.register(link.fileno(), zmq.POLLIN)
    replies = Unpacker(MAX_REPLY)
    try:
        while True:
            for item, _ in poller.poll():
                if item is router:
                    frames = router.recv_multipart()
                    if len(frames) <= MAX_FRAMES:  # more: not a request of ours
                        link.sendall(pack(frames))
                    continue
                data = link.recv(1 << 20)
                if not data:
                    return 0  # the supervisor is done (or gone)
                for message in replies.feed(data):
                    # EHOSTUNREACH: the client went away; EAGAIN: its queue is
                    # full, it does not read. Never block: others wait behind.
                    with contextlib.suppress(zmq.ZMQError):
                        router.send_multipart(message, zmq.NOBLOCK)
    finally:
        router.close()
        zctx.term()


def _limit_memory(limit: int) -> None:
    """Lower RLIMIT_DATA to ``limit`` (never raise it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    if soft == resource.RLIM_INFINITY or soft > limit:
        resource.setrlimit(resource.RLIMIT_DATA, (limit, hard))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hotsup-control")
    parser.add_argument("--link", type=int, required=True)
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--path", required=True)
    parser.add_argument("--max-request", type=int, required=True)
    args = parser.parse_args(argv)
    link = socket.socket(fileno=args.link)
    link.set_inheritable(False)
    _limit_memory(MAX_MEMORY)
    try:
        return serve(link, args.endpoint, args.path, args.max_request)
    except (BrokenPipeError, ConnectionResetError):
        return 0
    except zmq.ZMQError as exc:
        print(f"hotsup control endpoint: {exc}", file=sys.stderr)
        return 2
    except MemoryError:
        print(f"hotsup control endpoint: out of memory (its limit is {MAX_MEMORY >> 20} MiB: "
              f"clients that do not read their replies?)", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
