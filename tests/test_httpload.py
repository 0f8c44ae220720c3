"""The ASGI bench's load generator against scripted servers: what it retries, what it fails.

A keep-alive client may retry (RFC 9112 9.3.1) only when no byte of the
response arrived on a connection that had served before; everything else that
goes wrong is a failed request, classified.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from httpload import Load, Mode, Outcome, Recorder

Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


def response(count: int, version: str = "v0", extra: bytes = b"") -> bytes:
    body = f"version={version} count={count} pid=1\n".encode()
    return (b"HTTP/1.1 200 OK\r\ncontent-length: " + str(len(body)).encode()
            + b"\r\nx-app-version: " + version.encode() + b"\r\n" + extra + b"\r\n" + body)


class Scripted:
    """A server whose Nth connection (from 1) is handled by ``script(n, conn)``."""

    def __init__(self, script: Callable[[int, Conn, Callable[[], int]], Awaitable[None]]) -> None:
        self.script = script
        self.connections = 0
        self.count = 0
        self.wanted = 5
        self.enough = asyncio.Event()  # set once ``wanted`` good responses went out

    def next_count(self) -> int:
        self.count += 1
        if self.count >= self.wanted:
            self.enough.set()
        return self.count

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.script(self.connections, (reader, writer), self.next_count)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


async def serve_normally(conn: Conn, next_count: Callable[[], int]) -> None:
    reader, writer = conn
    while True:
        request = await reader.readuntil(b"\r\n\r\n")
        closing = b"connection: close" in request.lower()
        writer.write(response(next_count(), extra=b"connection: close\r\n" if closing else b""))
        await writer.drain()
        if closing:
            return


async def run(server: Scripted, short: int, keepalive: int) -> Recorder:
    """Load ``server`` until it sent ``server.wanted`` good responses (or 10 s passed);
    the clients read the responses in flight before they stop."""
    srv = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    recorder = Recorder()
    stop = asyncio.Event()
    load = Load(port, short, keepalive, timeout=5.0, recorder=recorder)
    task = asyncio.create_task(load.run(stop, time.monotonic() + 10))
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(server.enough.wait(), 10)
    stop.set()
    await task
    srv.close()
    await srv.wait_closed()
    return recorder


def failures(recorder: Recorder, mode: Mode) -> dict[str, int]:
    return {o.value: n for o, n in recorder.outcomes[mode].items() if o is not Outcome.OK and n}


@pytest.mark.timeout(30)
def test_a_request_on_an_idle_connection_closed_unanswered_is_retried_once() -> None:
    async def script(n: int, conn: Conn, next_count: Callable[[], int]) -> None:
        reader, writer = conn
        if n == 1:  # answer one request, read the next, close without a byte
            await reader.readuntil(b"\r\n\r\n")
            writer.write(response(next_count()))
            await reader.readuntil(b"\r\n\r\n")
            return
        await serve_normally(conn, next_count)

    server = Scripted(script)
    recorder = asyncio.run(run(server, short=0, keepalive=1))
    assert failures(recorder, Mode.KEEPALIVE) == {}
    assert recorder.retries["closed_before_response"] == 1
    assert recorder.outcomes[Mode.KEEPALIVE][Outcome.OK] >= 5
    assert server.connections == 2


@pytest.mark.timeout(30)
def test_a_connection_closed_after_part_of_a_response_is_a_failure_not_a_retry() -> None:
    async def script(n: int, conn: Conn, next_count: Callable[[], int]) -> None:
        reader, writer = conn
        if n == 1:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(response(next_count()))
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\n")  # a byte came: no retry allowed
            await writer.drain()
            return
        await serve_normally(conn, next_count)

    recorder = asyncio.run(run(Scripted(script), short=0, keepalive=1))
    assert failures(recorder, Mode.KEEPALIVE) == {"reset": 1}
    assert sum(recorder.retries.values()) == 0


@pytest.mark.timeout(30)
def test_a_fresh_connection_closed_unanswered_is_a_failure_for_both_kinds() -> None:
    async def script(n: int, conn: Conn, next_count: Callable[[], int]) -> None:
        reader, _ = conn
        if n <= 2:  # the first two connections: read the request, close
            await reader.readuntil(b"\r\n\r\n")
            return
        await serve_normally(conn, next_count)

    for short, keepalive, mode in ((1, 0, Mode.SHORT), (0, 1, Mode.KEEPALIVE)):
        recorder = asyncio.run(run(Scripted(script), short=short, keepalive=keepalive))
        assert failures(recorder, mode) == {"reset": 2}, mode
        assert sum(recorder.retries.values()) == 0


@pytest.mark.timeout(30)
def test_connection_close_moves_the_client_and_bad_responses_are_classified() -> None:
    async def script(n: int, conn: Conn, next_count: Callable[[], int]) -> None:
        reader, writer = conn
        await reader.readuntil(b"\r\n\r\n")
        if n == 1:
            writer.write(response(next_count(), extra=b"connection: close\r\n"))
        elif n == 2:
            writer.write(b"HTTP/1.1 503 Busy\r\ncontent-length: 0\r\n\r\n")
        elif n == 3:
            writer.write(response(next_count(), version="v9")[:-3] + b"xx\n")
        elif n == 4:
            writer.write(b"SSH-2.0-nonsense\r\n\r\n")
        else:
            writer.write(response(next_count()))
            await serve_normally(conn, next_count)
            return
        await writer.drain()

    recorder = asyncio.run(run(Scripted(script), short=0, keepalive=1))
    assert failures(recorder, Mode.KEEPALIVE) == {"non_200": 1, "wrong_body": 2}
    assert recorder.server_closes == 1
    assert sum(recorder.retries.values()) == 0


@pytest.mark.timeout(30)
def test_nobody_listening_is_refused() -> None:
    async def main() -> Recorder:
        srv = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        srv.close()
        await srv.wait_closed()
        recorder = Recorder()
        await Load(port, 1, 1, 1.0, recorder).run(asyncio.Event(), time.monotonic() + 0.2)
        return recorder

    recorder = asyncio.run(main())
    for mode in Mode:
        assert set(failures(recorder, mode)) == {"refused"}, mode
    assert recorder.ok_total() == 0
