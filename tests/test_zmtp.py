"""The command line's own ZMTP client (supervisor/zmtp.py) against libzmq's ROUTER."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq
from hotsup.supervisor import zmtp

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def router(tmp_path: Path) -> Iterator[tuple[Path, zmq.Socket[bytes]]]:
    zctx = zmq.Context()
    sock = zctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    path = tmp_path / "control"
    sock.bind(f"ipc://{path}")
    try:
        yield path, sock
    finally:
        sock.close()
        zctx.term()


def dealer(path: Path, timeout: float = 5.0) -> tuple[socket.socket, zmtp.Dealer]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(path))
    return sock, zmtp.Dealer(sock, time.monotonic() + timeout)


@pytest.mark.parametrize("size", [0, 255, 256, 70_000])
def test_a_request_and_its_reply_cross_a_real_router(
        router: tuple[Path, zmq.Socket[bytes]], size: int) -> None:
    path, server = router
    sock, client = dealer(path)
    with sock:
        body = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
        client.send(body)
        assert server.poll(5000), "the router got the request"
        route, got = server.recv_multipart()
        assert got == body
        server.send_multipart([route, body[::-1]])
        assert client.recv() == body[::-1]


def test_a_peer_that_is_not_zmtp_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "plain"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen()

        def serve() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n" + b"\0" * 64)

        thread = threading.Thread(target=serve)
        thread.start()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(str(path))
            with pytest.raises(zmtp.ProtocolError, match="does not speak ZMTP 3"):
                zmtp.Dealer(sock, time.monotonic() + 5.0)
        thread.join(5)


def test_a_router_that_does_not_answer_runs_into_the_deadline(
        router: tuple[Path, zmq.Socket[bytes]]) -> None:
    path, _ = router
    sock, client = dealer(path, timeout=0.3)
    with sock:
        client.send(b"anyone?")
        began = time.monotonic()
        with pytest.raises(TimeoutError):
            client.recv()
        assert time.monotonic() - began < 2.0
