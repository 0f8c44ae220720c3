"""``HttpListener`` at a pause, in one process: two listeners on one listening
socket stand for two generations (A the old, B the new), real sockets on
127.0.0.1, real clients (http.client, the websockets client, a raw socket)
in threads.

What is guarded: an idle keep-alive connection parked in A and adopted by B
is answered by B on the same client connection (and by A again after a
rollback); a WebSocket moves the same way without a close or a second
handshake (``websockets = "resume"``), or is closed with 1012 (``"close"``);
an SSE response is ended cleanly; a streaming download does not hold the
pause and finishes on A; work after the response does hold it; a drain's cut
is logged, without a traceback. The cross-generation wiring (fds through the
supervisor) is the runtime's and is tested there.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import logging
import os
import pickle
import socket
import time
import types
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import uvicorn
import uvloop
from hotsup.worker.asgi import AsgiBundle, HttpConnection, HttpListener
from hotsup.worker.context import BundleContext
from hotsup.worker.websocket import WebSocketConnection, _complete_frames
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect
from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.sync.client import ClientConnection, connect
from websockets.uri import parse_uri

pytestmark = pytest.mark.timeout(60)

LOG = logging.getLogger("test.carry")


class App:
    """A raw ASGI app whose answers name ``tag``; what it sees goes in ``events``."""

    def __init__(self, tag: str, events: list[Any]) -> None:
        self.tag = tag
        self.events = events

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "websocket":
            await self.websocket(scope, receive, send)
            return
        if scope["path"] == "/sse":
            await self.sse(receive, send)
            return
        more = True
        while more:
            more = (await receive()).get("more_body", False)
        if scope["path"] == "/stream":
            await self.stream(send)
        else:
            await self.plain(scope["path"], send)

    async def websocket(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        connection = scope["extensions"]["hotsup.connection"]
        scope["app"] = lambda: None  # what frameworks add: not picklable, not carried
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept"})
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                self.events.append(("disconnect", self.tag, message.get("code")))
                return
            if message.get("text") == "push":  # sends on its own, never in receive() again
                self.events.append(("push", self.tag))
                with contextlib.suppress(OSError):
                    while True:
                        await send({"type": "websocket.send", "text": "pushed"})
                        await asyncio.sleep(0.02)
                self.events.append(("push ended", self.tag))
                return
            if message.get("text") == "slow":  # busy with a message: work in flight
                self.events.append(("slow", self.tag))
                await asyncio.sleep(1.0)
            await send({"type": "websocket.send", "text": f"{self.tag}:{message.get('text')}:"
                        f"{connection['id']}:{connection['resumed']}"})

    async def sse(self, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        gone = asyncio.Event()

        async def listen() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            self.events.append(("sse disconnect", self.tag))
            gone.set()

        listening = asyncio.ensure_future(listen())
        number = 0
        while not gone.is_set():
            await send({"type": "http.response.body", "body": f"id: {number}\n\n".encode(),
                        "more_body": True})
            number += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(gone.wait(), 0.05)
        await listening

    async def stream(self, send: Any) -> None:  # 10 parts, 0.1 s apart
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", b"10")]})
        for _ in range(9):
            await send({"type": "http.response.body", "body": b"x", "more_body": True})
            await asyncio.sleep(0.1)
        await send({"type": "http.response.body", "body": b"x"})
        self.events.append(("stream done", self.tag))

    async def plain(self, path: str, send: Any) -> None:
        body = self.tag.encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
        if path == "/bg":  # work after the response
            await asyncio.sleep(0.5)
            self.events.append(("bg done", self.tag))
        if path == "/forever":
            await asyncio.sleep(60)


def starlette_app(tag: str, events: list[Any]) -> Any:
    """The same WebSocket echo, as a Starlette app."""

    async def echo(websocket: WebSocket) -> None:
        await websocket.accept()
        connection = websocket.scope["extensions"]["hotsup.connection"]
        try:
            while True:
                text = await websocket.receive_text()
                await websocket.send_text(f"{tag}:{text}:{connection['id']}:"
                                          f"{connection['resumed']}")
        except WebSocketDisconnect as gone:
            events.append(("disconnect", tag, gone.code))

    return Starlette(routes=[WebSocketRoute("/ws", echo)])


def listener(sock: socket.socket, tag: str, events: list[Any], resume: bool = False,
             accepting: bool = True, framework: bool = False) -> HttpListener:
    app = starlette_app(tag, events) if framework else App(tag, events)
    config = uvicorn.Config(app=lambda: app, factory=True, http=HttpConnection,
                            ws=WebSocketConnection, ws_per_message_deflate=not resume,
                            lifespan="off", log_config=None)
    config.load()
    return HttpListener("http", sock, LOG, config, {}, accepting, carry_websockets=resume)


def run(test: Callable[[socket.socket], Awaitable[None]]) -> None:
    """Run ``test(listening socket)`` on a uvloop loop, as a worker would."""
    sock = socket.create_server(("127.0.0.1", 0), backlog=128)
    loop = uvloop.new_event_loop()
    try:
        loop.run_until_complete(asyncio.wait_for(test(sock), 40))
    finally:
        loop.close()
        sock.close()


def port_of(sock: socket.socket) -> int:
    return int(sock.getsockname()[1])


def post(conn: http.client.HTTPConnection, path: str = "/") -> str:
    conn.request("POST", path, body=b"")
    return conn.getresponse().read().decode()


async def until(condition: Callable[[], object], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


# -- idle keep-alive connections move -----------------------------------------------


def test_an_idle_keep_alive_connection_moves_to_the_successor() -> None:
    async def body(sock: socket.socket) -> None:
        events: list[Any] = []
        a = listener(sock, "A", events)
        conn = http.client.HTTPConnection("127.0.0.1", port_of(sock), timeout=10)
        assert await asyncio.to_thread(post, conn) == "A"
        client_socket = conn.sock
        a.pause(carry=True)
        assert await a.wait_idle(2.0)
        assert a.inflight == 0
        items = a.parked()
        assert [item.kind for item in items] == ["http"]
        b = listener(sock, "B", events, accepting=False)
        b.adopt(items[0])  # B owns the fd from here
        a.release_parked()
        assert await asyncio.to_thread(post, conn) == "B"
        assert conn.sock is client_socket, "the client had to reconnect"
        assert await asyncio.to_thread(post, conn) == "B"
        conn.close()
        await until(lambda: b.inflight == 0 and a.inflight == 0)
        a.close()
        b.close()

    run(body)


def test_a_rolled_back_hand_over_serves_the_parked_connection_on() -> None:
    async def body(sock: socket.socket) -> None:
        events: list[Any] = []
        a = listener(sock, "A", events)
        conn = http.client.HTTPConnection("127.0.0.1", port_of(sock), timeout=10)
        assert await asyncio.to_thread(post, conn) == "A"
        client_socket = conn.sock
        a.pause(carry=True)
        assert await a.wait_idle(2.0)
        for item in a.parked():  # the successor failed: its copies are closed
            os.close(item.fd)
        a.resume()
        assert await asyncio.to_thread(post, conn) == "A"
        assert conn.sock is client_socket
        conn.close()
        a.close()

    run(body)


def test_without_carry_an_idle_connection_is_still_closed_gracefully() -> None:
    async def body(sock: socket.socket) -> None:
        a = listener(sock, "A", [])
        conn = http.client.HTTPConnection("127.0.0.1", port_of(sock), timeout=10)
        assert await asyncio.to_thread(post, conn) == "A"
        a.pause()
        assert await a.wait_idle(3.0)
        assert a.parked() == []
        conn.close()
        a.close()

    run(body)


# -- WebSockets ---------------------------------------------------------------------


def open_ws(sock: socket.socket) -> ClientConnection:
    """A client connection, entered as the context manager websockets wants
    (closed by ``ws.close()``)."""
    return connect(f"ws://127.0.0.1:{port_of(sock)}/ws", open_timeout=10).__enter__()


def ws_say(ws: ClientConnection, text: str) -> str:
    ws.send(text)
    return str(ws.recv(timeout=10))


@pytest.mark.parametrize("framework", [False, True], ids=["raw", "starlette"])
def test_a_websocket_moves_without_a_close_or_a_second_handshake(framework: bool) -> None:
    async def body(sock: socket.socket) -> None:
        events: list[Any] = []
        a = listener(sock, "A", events, resume=True, framework=framework)
        ws = await asyncio.to_thread(open_ws, sock)
        tag, text, ident, resumed = (await asyncio.to_thread(ws_say, ws, "one")).split(":")
        assert (tag, text, resumed) == ("A", "one", "False")
        a.pause(carry=True)
        assert await a.wait_idle(2.0)
        items = a.parked()
        assert [item.kind for item in items] == ["websocket"]
        assert items[0].meta["id"] == ident
        meta = pickle.loads(pickle.dumps(items[0].meta))  # it travels like a snapshot
        assert meta["scope"]["path"] == "/ws" and "app" not in meta["scope"]
        b = listener(sock, "B", events, resume=True, accepting=False, framework=framework)
        b.adopt(items[0])
        a.release_parked()
        await until(lambda: ("disconnect", "A", 1012) in events)  # A's app ended
        assert await asyncio.to_thread(ws_say, ws, "two") == f"B:two:{ident}:True"
        assert await asyncio.to_thread(ws_say, ws, "three") == f"B:three:{ident}:True"
        await asyncio.to_thread(ws.close)
        await until(lambda: ("disconnect", "B", 1000) in events)
        await until(lambda: b.inflight == 0)
        a.close()
        b.close()

    run(body)


def test_frame_boundaries_are_found_in_the_raw_stream() -> None:
    def frame(payload: bytes, masked: bool = True) -> bytes:
        client = ClientProtocol(parse_uri("ws://x/")) if masked else ServerProtocol()
        client.state = State.OPEN
        client.send_binary(payload)
        return b"".join(client.data_to_send())

    small, medium, large = frame(b"a" * 10), frame(b"b" * 300), frame(b"c" * 70000)
    assert _complete_frames(bytearray(small)) == len(small)
    assert _complete_frames(bytearray(small + medium + large)) == len(small + medium + large)
    stream = small + medium + large[:5]
    for cut in range(len(stream)):
        done = _complete_frames(bytearray(stream[:cut]))
        assert done in (0, len(small), len(small + medium)), cut
        assert done <= cut
    unmasked = frame(b"d" * 200, masked=False)
    assert _complete_frames(bytearray(unmasked + unmasked[:3])) == len(unmasked)


def raw_ws_client(port: int) -> tuple[socket.socket, ClientProtocol]:
    """A WebSocket client on a plain socket (websockets' sans-IO protocol), so
    a test can send half a frame."""
    client = ClientProtocol(parse_uri(f"ws://127.0.0.1:{port}/ws"))
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    client.send_request(client.connect())
    sock.sendall(b"".join(client.data_to_send()))
    while client.state is not State.OPEN:
        client.receive_data(sock.recv(65536))
    client.events_received()
    return sock, client


def raw_ws_recv(sock: socket.socket, client: ClientProtocol) -> str:
    while True:
        for event in client.events_received():
            if isinstance(event, Frame) and event.opcode is Opcode.TEXT:
                return bytes(event.data).decode()
        data = sock.recv(65536)
        assert data, "closed by the server"
        client.receive_data(data)


def test_a_websocket_moves_in_the_middle_of_a_frame() -> None:
    """Half a frame read by A goes to B in ``Carried.buffered``; the other
    half comes from the socket: B gets the whole message."""

    async def body(sock: socket.socket) -> None:
        events: list[Any] = []
        a = listener(sock, "A", events, resume=True)
        raw, client = await asyncio.to_thread(raw_ws_client, port_of(sock))
        await until(lambda: any(ws.parkable for ws in a._sockets))
        client.send_text(b"split" * 100)
        message = b"".join(client.data_to_send())
        raw.sendall(message[:200])
        await until(lambda: any(len(ws._unframed) == 200 for ws in a._sockets))
        a.pause(carry=True)
        assert await a.wait_idle(2.0)
        (item,) = a.parked()
        assert item.buffered == message[:200]
        b = listener(sock, "B", events, resume=True, accepting=False)
        b.adopt(item)
        a.release_parked()
        raw.sendall(message[200:])
        reply = await asyncio.to_thread(raw_ws_recv, raw, client)
        assert reply.startswith("B:" + "split" * 100 + ":") and reply.endswith(":True")
        raw.close()
        await until(lambda: b.inflight == 0)
        a.close()
        b.close()

    run(body)


def test_a_websocket_parked_then_rolled_back_stays_with_the_old_generation() -> None:
    async def body(sock: socket.socket) -> None:
        events: list[Any] = []
        a = listener(sock, "A", events, resume=True)
        ws = await asyncio.to_thread(open_ws, sock)
        assert (await asyncio.to_thread(ws_say, ws, "one")).startswith("A:one:")
        a.pause(carry=True)
        assert await a.wait_idle(2.0)
        for item in a.parked():
            os.close(item.fd)
        a.resume()
        assert (await asyncio.to_thread(ws_say, ws, "two")).startswith("A:two:")
        await asyncio.to_thread(ws.close)
        await until(lambda: a.inflight == 0)
        assert not [event for event in events if event[0] == "disconnect" and event[2] == 1012]
        a.close()

    run(body)


def drain_until_closed(ws: ClientConnection) -> int:
    """Read until the server closes: its close code."""
    try:
        while True:
            ws.recv(timeout=10)
    except ConnectionClosed as closed:
        assert closed.rcvd is not None
        return closed.rcvd.code


def test_a_websocket_never_at_a_frame_boundary_is_closed_with_1012_within_the_bound() -> None:
    async def body(sock: socket.socket) -> None:
        events: list[Any] = []
        a = listener(sock, "A", events, resume=True)
        ws = await asyncio.to_thread(open_ws, sock)
        await asyncio.to_thread(ws.send, "push")
        await until(lambda: ("push", "A") in events)
        a.pause(carry=True)
        started = time.monotonic()
        assert await a.wait_idle(5.0)
        assert time.monotonic() - started < 0.8, "the pushing WebSocket held the pause"
        assert a.parked() == []
        assert await asyncio.to_thread(drain_until_closed, ws) == 1012
        assert ("push ended", "A") in events
        a.close()

    run(body)


def test_a_websocket_app_busy_with_a_message_is_waited_for_and_said(
        caplog: pytest.LogCaptureFixture) -> None:
    async def body(sock: socket.socket) -> None:
        events: list[Any] = []
        a = listener(sock, "A", events, resume=True)
        ws = await asyncio.to_thread(open_ws, sock)
        await asyncio.to_thread(ws.send, "slow")
        await until(lambda: ("slow", "A") in events)
        a.pause(carry=True)
        assert await a.wait_idle(5.0)  # the message was handled before the snapshot
        assert await asyncio.to_thread(drain_until_closed, ws) == 1012
        a.close()

    with caplog.at_level(logging.INFO):
        run(body)
    held = [r.getMessage() for r in caplog.records if "held the pause" in r.getMessage()]
    assert len(held) == 1, caplog.text
    assert "WebSocket /ws" in held[0], held[0]


def test_in_close_mode_a_hand_over_closes_each_websocket_with_1012_first() -> None:
    async def body(sock: socket.socket) -> None:
        events: list[Any] = []
        a = listener(sock, "A", events)
        ws = await asyncio.to_thread(open_ws, sock)
        assert (await asyncio.to_thread(ws_say, ws, "one")).startswith("A:one:")
        a.pause(carry=True)
        started = time.monotonic()
        assert await a.wait_idle(5.0)  # the close handshake is over
        assert time.monotonic() - started < 2.0
        assert a.parked() == []
        assert ("disconnect", "A", 1012) in events
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.to_thread(ws.recv, 10)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1012
        a.close()

    run(body)


# -- streams, SSE, work after the response ---------------------------------------------


def read_sse_until_closed(port: int, started: Callable[[], None]) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
        client.sendall(b"GET /sse HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while b"id: 2\n\n" not in data:
            data += client.recv(4096)
        started()
        while True:
            chunk = client.recv(4096)
            if not chunk:
                return data
            data += chunk


def test_an_sse_response_is_ended_cleanly_at_a_pause() -> None:
    async def body(sock: socket.socket) -> None:
        events: list[Any] = []
        a = listener(sock, "A", events)
        loop = asyncio.get_running_loop()
        streaming = asyncio.Event()
        reader = asyncio.ensure_future(asyncio.to_thread(
            read_sse_until_closed, port_of(sock),
            lambda: loop.call_soon_threadsafe(streaming.set)))
        await streaming.wait()
        a.pause(carry=True)
        assert await a.wait_idle(3.0)
        data = await reader
        assert data.endswith(b"0\r\n\r\n"), data[-40:]
        assert ("sse disconnect", "A") in events
        a.close()

    run(body)


def test_a_streaming_download_does_not_hold_the_hand_over_and_finishes() -> None:
    async def body(sock: socket.socket) -> None:
        events: list[Any] = []
        a = listener(sock, "A", events)
        conn = http.client.HTTPConnection("127.0.0.1", port_of(sock), timeout=10)
        download = asyncio.ensure_future(asyncio.to_thread(post, conn, "/stream"))
        await until(lambda: any(call.streaming for call in a._calls))
        a.pause(carry=True)
        assert await a.wait_idle(0.3), "the download held the pause"
        assert [call.describe(time.monotonic()).split(" (")[0]
                for call in a.streaming_at_pause()] == ["POST /stream"]
        assert ("stream done", "A") not in events
        assert await download == "x" * 10  # whole, from A
        assert ("stream done", "A") in events
        # Complete before the successor collected the parked ones: it moves too.
        moved = a.parked()
        assert [item.kind for item in moved] == ["http"]
        os.close(moved[0].fd)
        a.release_parked()
        await until(lambda: not a._connections)
        conn.close()
        # A drain (a pause without carry) does wait for a download.
        a.resume()
        conn = http.client.HTTPConnection("127.0.0.1", port_of(sock), timeout=10)
        download = asyncio.ensure_future(asyncio.to_thread(post, conn, "/stream"))
        await until(lambda: any(call.streaming for call in a._calls))
        a.pause()
        assert not await a.wait_idle(0.3)
        assert await download == "x" * 10
        conn.close()
        a.close()

    run(body)


def test_work_after_the_response_holds_the_pause() -> None:
    async def body(sock: socket.socket) -> None:
        events: list[Any] = []
        a = listener(sock, "A", events)
        conn = http.client.HTTPConnection("127.0.0.1", port_of(sock), timeout=10)
        assert await asyncio.to_thread(post, conn, "/bg") == "A"  # answered; work goes on
        a.pause(carry=True)
        assert ("bg done", "A") not in events
        assert await a.wait_idle(5.0)
        assert ("bg done", "A") in events, "the pause did not wait for the background work"
        a.resume()  # its connection was parked: served again, it sees the client leave
        conn.close()
        await until(lambda: not a._connections)
        a.close()

    run(body)


def test_a_drain_cut_is_logged_with_what_it_was(caplog: pytest.LogCaptureFixture) -> None:
    async def body(sock: socket.socket) -> None:
        a = listener(sock, "A", [])
        conn = http.client.HTTPConnection("127.0.0.1", port_of(sock), timeout=10)
        assert await asyncio.to_thread(post, conn, "/forever") == "A"
        a.pause()
        assert not await a.wait_idle(0.2)
        assert await a.cancel_inflight() >= 1
        conn.close()
        a.close()

    with caplog.at_level(logging.WARNING):
        run(body)
    cut = [r.getMessage() for r in caplog.records if "drain_timeout cut" in r.getMessage()]
    assert len(cut) == 1, caplog.text
    assert cut[0].startswith("drain_timeout cut: POST /forever (")
    assert "work after its response" in cut[0]
    assert "Traceback" not in caplog.text and "CancelledError" not in caplog.text
    assert not [r for r in caplog.records if r.exc_info], caplog.text


def test_the_snapshot_names_a_response_still_streaming(caplog: pytest.LogCaptureFixture) -> None:
    """``AsgiBundle.snapshot`` (the entry module's hook) logs each download
    that streams on through a hand-over: its later changes are not carried."""

    async def body(sock: socket.socket) -> None:
        events: list[Any] = []
        module = types.SimpleNamespace(hotsup_snapshot=lambda: {"count": 1})
        ctx = BundleContext("web", 1, {}, {"http": sock}, Path("."), LOG)
        bundle = AsgiBundle(ctx, App("A", events), module)
        await bundle.start()
        (a,) = ctx.listeners
        a.resume()
        conn = http.client.HTTPConnection("127.0.0.1", port_of(sock), timeout=10)
        download = asyncio.ensure_future(asyncio.to_thread(post, conn, "/stream"))
        assert isinstance(a, HttpListener)
        await until(lambda: any(call.streaming for call in a._calls))
        a.pause(carry=True)
        assert await a.wait_idle(0.3)
        assert bundle.snapshot() == {"count": 1}
        assert await download == "x" * 10
        for item in a.parked():  # it parked once complete: as if a successor took it
            os.close(item.fd)
        a.release_parked()
        conn.close()
        await until(lambda: not a._connections)
        a.close()
        for copy in ctx.sockets.values():
            copy.close()

    with caplog.at_level(logging.WARNING):
        run(body)
    noted = [r.getMessage() for r in caplog.records if "still streaming" in r.getMessage()]
    assert len(noted) == 1, caplog.text
    assert noted[0].startswith("a response was still streaming at the snapshot: POST /stream (")
    assert noted[0].endswith("its changes to state after the snapshot are not carried")
