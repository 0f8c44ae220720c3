"""The worker channel on its own: real socketpairs, real fds, a real loop."""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import socket
from collections.abc import Iterator

import pytest
import uvloop
from hotsup.worker import channel as wire
from hotsup.worker import protocol as P


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    yield a, b
    a.close()
    b.close()


def _run(coro: object) -> object:
    return uvloop.run(coro)  # type: ignore[arg-type]


def test_a_message_carries_header_payload_and_fds(pair: tuple[socket.socket, socket.socket]
                                                  ) -> None:
    a, b = pair
    got: list[wire.Message] = []
    r, w = os.pipe()

    async def main() -> None:
        done = asyncio.get_running_loop().create_future()
        sender = wire.Channel(a, lambda m: None, wire.RateLimitedLog(logging.getLogger()))
        wire.Channel(b, lambda m: (got.append(m), done.set_result(None)),
                     wire.RateLimitedLog(logging.getLogger()))
        big = os.urandom(3 * 1024 * 1024)  # far over any packet size
        await sender.send({"op": "x", "n": 1}, big, [w])
        await asyncio.wait_for(done, 5)
        assert got[0].payload == big

    _run(main())
    (message,) = got
    assert message.header == {"v": 1, "op": "x", "n": 1}
    (fd,) = message.fds
    os.write(fd, b"through")  # the received fd is the pipe's write end
    assert os.read(r, 7) == b"through"
    os.write(w, b"!")  # and ours is still ours
    assert os.read(r, 1) == b"!"
    for x in (r, w, fd):
        os.close(x)


def _sealed(size: int) -> int:
    fd = os.memfd_create("t", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)  # sparse: nothing is written
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS,
                fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK)
    return fd


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize(("case", "error"), [
    ("garbage", "header is not JSON"),
    ("oversized", "over the limit of 268435456"),
    ("unsealed", "not sealed"),
    ("not a memfd", "not a memfd"),
    ("wrong size", "the header says 10"),
    ("fd count", "announces 2 fd(s), 1 came"),
    ("long header", "a header over 65536 bytes"),
])
def test_a_malformed_message_is_dropped_with_its_fds(
        pair: tuple[socket.socket, socket.socket], case: str, error: str,
        caplog: pytest.LogCaptureFixture) -> None:
    a, b = pair
    header = b'{"v":1,"op":"reply","payload":%d}'
    if case == "garbage":
        data, fds = b"\xffgarbage", [os.open("/dev/null", os.O_RDONLY)]
    elif case == "oversized":  # 300 MiB announced and real, never read
        data, fds = header % (300 << 20), [_sealed(300 << 20)]
    elif case == "unsealed":
        fd = os.memfd_create("t", os.MFD_ALLOW_SEALING)
        os.ftruncate(fd, 10)
        data, fds = header % 10, [fd]
    elif case == "not a memfd":
        data, fds = header % 10, [os.open("/dev/null", os.O_RDONLY)]
    elif case == "wrong size":
        data, fds = header % 10, [_sealed(11)]
    elif case == "fd count":
        data, fds = b'{"v":1,"op":"reply","nfds":2}', [os.open("/dev/null", os.O_RDONLY)]
    else:
        data, fds = b"x" * (wire.MAX_HEADER + 10), []
    before = _open_fds()
    socket.send_fds(a, [data], fds)
    for fd in fds:
        os.close(fd)
    got: list[wire.Message] = []

    async def main() -> None:
        arrived = asyncio.Event()
        wire.Channel(b, lambda m: (got.append(m), arrived.set()),
                     wire.RateLimitedLog(logging.getLogger("t")))
        a.send(P.encode({"op": "after"})[0])  # the channel goes on
        await asyncio.wait_for(arrived.wait(), 5)

    with caplog.at_level(logging.WARNING, "t"):
        _run(main())
    assert [m.header["op"] for m in got] == ["after"]
    assert error in caplog.text, caplog.text
    assert _open_fds() <= before - len(fds) + 1, "the dropped message's fds were closed"


def test_a_flood_of_garbage_is_logged_a_few_times(caplog: pytest.LogCaptureFixture) -> None:
    log = wire.RateLimitedLog(logging.getLogger("t"), burst=5, interval=60)
    with caplog.at_level(logging.WARNING, "t"):
        for i in range(10_000):
            log.warning("dropped %d", i)
    assert len(caplog.records) == 5
    assert log.suppressed == 9_995


def test_send_fails_once_the_peer_is_gone(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    closed: list[bool] = []

    async def main() -> None:
        gone = asyncio.Event()
        chan = wire.Channel(a, lambda m: None, wire.RateLimitedLog(logging.getLogger()),
                            on_closed=lambda: (closed.append(True), gone.set()))
        b.close()
        with pytest.raises(ConnectionError):
            await chan.send({"op": "x"})
        await asyncio.wait_for(gone.wait(), 5)

    _run(main())
    assert closed == [True]


def test_request_lends_fds_and_hands_over_the_replys(
        pair: tuple[socket.socket, socket.socket]) -> None:
    """WorkerProcess.request against a peer speaking the worker's side: the
    fds sent stay the caller's, the reply's become the caller's, and call()
    closes the ones it gets."""
    from types import SimpleNamespace

    from hotsup.supervisor.process import WorkerProcess, WorkerReply

    ours, theirs = pair
    r, w = os.pipe()
    replies: list[WorkerReply] = []

    async def main() -> None:
        process = WorkerProcess(SimpleNamespace(name="t"), 1, None, None)  # type: ignore[arg-type]
        process._channel = wire.Channel(ours, process._on_message, process._drops)
        peer: wire.Channel

        def answer(message: wire.Message) -> None:
            (lent,) = message.fds or (-1,)
            if lent >= 0:
                os.write(lent, b"L")  # the fd we were lent works ...
                os.close(lent)  # ... and is the worker's own copy to close
            back_r, back_w = os.pipe()
            os.write(back_w, b"R")
            os.close(back_w)
            reply = {"op": P.OP_REPLY, "id": message.header["id"], "ok": True}
            task = asyncio.ensure_future(peer.send(reply, b"data", [back_r]))
            task.add_done_callback(lambda _: os.close(back_r))

        peer = wire.Channel(theirs, answer, wire.RateLimitedLog(logging.getLogger()))
        replies.append(await process.request("echo", 5.0, fds=[w]))
        before = _open_fds()
        header, payload = await process.call("echo", 5.0)
        assert (header["ok"], payload) == (True, b"data")
        assert _open_fds() == before, "call() closed the fd of its reply"

    _run(main())
    (reply,) = replies
    assert reply.payload == b"data"
    (fd,) = reply.fds
    assert os.read(fd, 1) == b"R", "the reply's fd is the caller's"
    os.close(fd)
    os.write(w, b"!")  # ours is still open after the worker closed its copy
    assert os.read(r, 2) == b"L!"
    os.close(r)
    os.close(w)


def test_a_large_payload_is_relayed_without_a_copy(pair: tuple[socket.socket, socket.socket]
                                                   ) -> None:
    """Over ``keep_over`` a payload stays in its memfd: relaying it on sends the
    same memfd (the same inode), so no process in between holds its bytes."""
    a, b = pair
    c, d = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    data = os.urandom(wire.KEEP_OVER + 1)
    inodes: list[int] = []
    seen: list[bytes] = []
    sending: list[asyncio.Future[None]] = []

    async def main() -> None:
        relayed = asyncio.get_running_loop().create_future()
        drops = wire.RateLimitedLog(logging.getLogger())
        first = wire.Channel(a, lambda m: None, drops)
        relay: wire.Channel

        def on_middle(message: wire.Message) -> None:
            assert isinstance(message.payload, wire.Payload)
            inodes.append(os.fstat(message.payload.fd).st_ino)
            sending.append(asyncio.ensure_future(relay.send({"op": "relay"}, message.payload)))

        def on_last(message: wire.Message) -> None:
            assert isinstance(message.payload, wire.Payload)
            inodes.append(os.fstat(message.payload.fd).st_ino)
            with message.payload.view() as view:
                seen.append(bytes(view))
            relayed.set_result(None)

        wire.Channel(b, on_middle, drops, keep_over=wire.KEEP_OVER)
        relay = wire.Channel(c, lambda m: None, drops)
        wire.Channel(d, on_last, drops, keep_over=wire.KEEP_OVER)
        await first.send({"op": "state"}, data)
        await asyncio.wait_for(relayed, 5)

    try:
        _run(main())
    finally:
        c.close()
        d.close()
    assert seen == [data]
    assert inodes[0] == inodes[1]


def test_a_small_payload_is_read_and_its_memfd_closed(
        pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    got: list[wire.Message] = []

    async def main() -> None:
        done = asyncio.get_running_loop().create_future()
        drops = wire.RateLimitedLog(logging.getLogger())
        sender = wire.Channel(a, lambda m: None, drops)
        before = len(os.listdir("/proc/self/fd"))
        wire.Channel(b, lambda m: (got.append(m), done.set_result(None)), drops,
                     keep_over=wire.KEEP_OVER)
        await sender.send({"op": "state"}, b"small")
        await asyncio.wait_for(done, 5)
        assert len(os.listdir("/proc/self/fd")) == before

    _run(main())
    assert got[0].payload == b"small"
