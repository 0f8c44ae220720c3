"""WebSockets in asgi bundles, end to end: a real ``hotsup start``, Starlette and FastAPI
apps, the real ``websockets`` client.

The protocol itself (subprotocols, close codes, ping/pong, the size limit) is
uvicorn's; what these tests guard is that it is served at all (the worker once
forced ``ws="none"``), that every scope carries ``hotsup.connection``, and what
a swap does to an open WebSocket in overlap mode (it stays with its generation
until the drain ends, then gets 1012), and at a real hand-over: moved to the
new generation unnoticed with ``websockets = "resume"`` (and left with the old
one by a rollback), closed with 1012 by default. The listener's side of it, in
one process, is tests/test_asgi_carry.py.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Callable

import pytest
from harness import Hotsup, free_port, save
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

pytestmark = pytest.mark.timeout(90)

MakeHotsup = Callable[..., Hotsup]


def starlette_source(tag: str) -> str:
    """An echo endpoint that reports its scope's hotsup.connection, the
    negotiated subprotocol, and closes with 4001 on "bye"."""
    return f'''
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocketDisconnect

TAG = {tag!r}


async def echo(websocket):
    offered = websocket.scope["subprotocols"]
    await websocket.accept(subprotocol="chat.v2" if "chat.v2" in offered else None)
    connection = websocket.scope["extensions"]["hotsup.connection"]
    gen = websocket.scope["state"]["hotsup"].generation
    while True:
        try:
            text = await websocket.receive_text()
        except WebSocketDisconnect as gone:
            print(f"disconnected {{gone.code}}", flush=True)
            return
        if text == "bye":
            await websocket.close(code=4001, reason="asked to")
            return
        if text == "who":
            await websocket.send_json({{"id": connection["id"],
                                       "resumed": connection["resumed"],
                                       "generation": gen, "tag": TAG}})
            continue
        await websocket.send_text(f"{{TAG}}:{{text}}")


app = Starlette(routes=[WebSocketRoute("/ws", echo)])
'''


def start(hotsup: MakeHotsup, source: str, manifest: str = "") -> tuple[Hotsup, int]:
    sup = hotsup()
    port = free_port()
    directory = sup.bundles / "web"
    directory.mkdir(parents=True)
    (directory / "bundle.toml").write_text(
        f'entry = "app:app"\nkind = "asgi"\n{manifest}\n'
        f'[sockets.http]\nbind = "127.0.0.1:{port}"\n')
    (directory / "app.py").write_text(source)
    sup.start_serving("web")
    return sup, port


@pytest.mark.parametrize("mode", ["", 'websockets = "resume"'], ids=["default", "resume"])
def test_websocket_echo_subprotocol_close_code_ping_and_scope(hotsup: MakeHotsup,
                                                              mode: str) -> None:
    sup, port = start(hotsup, starlette_source("v0"), mode)
    url = f"ws://127.0.0.1:{port}/ws"
    with connect(url, subprotocols=["chat.v1", "chat.v2"], open_timeout=10) as ws:  # type: ignore[list-item]
        assert ws.subprotocol == "chat.v2"
        ws.send("hello")
        assert ws.recv(timeout=10) == "v0:hello"
        ws.send("who")
        who = json.loads(ws.recv(timeout=10))
        assert (who["resumed"], who["generation"]) == (False, 1)
        assert isinstance(who["id"], str) and len(who["id"]) >= 16
        ws.ping().wait(10)  # answered with a pong
        ws.send("bye")
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=10)
    assert closed.value.rcvd is not None
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4001, "asked to")
    # Another connection, another id.
    with connect(url, open_timeout=10) as ws:
        assert ws.subprotocol is None
        ws.send("who")
        assert json.loads(ws.recv(timeout=10))["id"] != who["id"]
    assert sup.stop() == 0


def test_a_message_over_the_size_limit_closes_with_1009(hotsup: MakeHotsup) -> None:
    sup, port = start(hotsup, starlette_source("v0"))
    with connect(f"ws://127.0.0.1:{port}/ws", open_timeout=10, max_size=None) as ws:
        ws.send("x" * (16 * 1024 * 1024 + 1))  # uvicorn's ws_max_size
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=20)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
    assert sup.stop() == 0


def test_in_overlap_mode_a_websocket_stays_with_its_generation_then_gets_1012(
        hotsup: MakeHotsup) -> None:
    sup, port = start(hotsup, starlette_source("v0"), "drain_timeout = 2")
    url = f"ws://127.0.0.1:{port}/ws"
    with connect(url, open_timeout=10) as old:
        old.send("a")
        assert old.recv(timeout=10) == "v0:a"
        save(sup.bundles / "web" / "app.py", starlette_source("v1"))
        sup.wait_log(r"web@2: swapped from web@1 .*overlap")
        with connect(url, open_timeout=10) as new:  # new connections: the new code
            new.send("b")
            assert new.recv(timeout=10) == "v1:b"
        old.send("c")  # the open one: still the old code, until the drain ends
        assert old.recv(timeout=10) == "v0:c"
        with pytest.raises(ConnectionClosed) as closed:
            old.recv(timeout=20)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1012
    sup.wait_log(r"web@1: drain_timeout cut: WebSocket /ws \(open [\d.]+s\): closed with 1012")
    sup.wait_log(r"web@1: disconnected 1012")
    sup.wait_log(r"web@1: retired")
    assert "Traceback" not in sup.log()
    assert sup.stop() == 0


FASTAPI_SOURCE = '''
import asyncio

from fastapi import BackgroundTasks, FastAPI, WebSocket, WebSocketDisconnect

TAG = {tag!r}
state = {{"jobs": 0}}
app = FastAPI()


def hotsup_snapshot():
    return dict(state)


def hotsup_restore(saved):
    state.update(saved)


async def work():
    print("job started", flush=True)
    await asyncio.sleep(1.5)
    state["jobs"] += 1


@app.post("/job")
async def job(background: BackgroundTasks):
    background.add_task(work)
    return {{"queued": True}}


@app.websocket("/ws")
async def echo(websocket: WebSocket):
    await websocket.accept()
    try:
        while True:
            text = await websocket.receive_text()
            await websocket.send_text(f"{{TAG}}:{{text}}:jobs={{state['jobs']}}")
    except WebSocketDisconnect:
        pass
'''


def test_a_fastapi_app_with_a_websocket_and_a_background_task(hotsup: MakeHotsup) -> None:
    sup, port = start(hotsup, FASTAPI_SOURCE.format(tag="v0"))
    url = f"ws://127.0.0.1:{port}/ws"
    with connect(url, open_timeout=10) as ws:
        ws.send("a")
        assert ws.recv(timeout=10) == "v0:a:jobs=0"
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("POST", "/job")
    assert json.loads(conn.getresponse().read()) == {"queued": True}
    conn.close()
    sup.wait_log(r"web@1: job started")
    save(sup.bundles / "web" / "app.py", FASTAPI_SOURCE.format(tag="v1"))
    sup.wait_log(r"web@2: swapped from web@1 .*hand-over")
    with connect(url, open_timeout=10) as ws:  # the job's effect came along
        ws.send("b")
        assert ws.recv(timeout=10) == "v1:b:jobs=1"
    assert sup.stop() == 0


# -- across a hand-over (the worker's wiring: fds through the supervisor) ----------

STATEFUL = '''
def hotsup_snapshot():
    return {"messages": MESSAGES}


def hotsup_restore(saved):
    global MESSAGES
    MESSAGES = saved["messages"]


MESSAGES = 0
'''


def stateful_source(tag: str, broken: bool = False) -> str:
    """The echo app with a message count carried across hand-overs; ``broken``
    fails its import (a swap to it rolls back)."""
    source = starlette_source(tag) + STATEFUL
    source = source.replace('        await websocket.send_text(f"{TAG}:{text}")',
                            '        global MESSAGES\n'
                            '        MESSAGES += 1\n'
                            '        await websocket.send_text(f"{TAG}:{text}:{MESSAGES}")')
    return source + ("\nraise RuntimeError('this version cannot load')\n" if broken else "")


def test_with_resume_a_websocket_moves_to_the_new_generation_unnoticed(
        hotsup: MakeHotsup) -> None:
    sup, port = start(hotsup, stateful_source("v0"), 'websockets = "resume"')
    app = sup.bundles / "web" / "app.py"
    with connect(f"ws://127.0.0.1:{port}/ws", open_timeout=10) as ws:
        ws.send("a")
        assert ws.recv(timeout=10) == "v0:a:1"
        ws.send("who")
        before = json.loads(ws.recv(timeout=10))
        assert (before["generation"], before["resumed"]) == (1, False)
        save(app, stateful_source("v1"))
        sup.wait_log(r"web@2: 1 connection\(s\) carried from web@1")
        ws.send("b")
        assert ws.recv(timeout=10) == "v1:b:2", "the new code, the count carried"
        ws.send("who")
        after = json.loads(ws.recv(timeout=10))
        assert after == {"id": before["id"], "resumed": True, "generation": 2, "tag": "v1"}
        # A rolled-back swap leaves it with the generation that has it.
        save(app, stateful_source("v2", broken=True))
        sup.wait_log(r"swap to web@3 rolled back, web@2 keeps serving")
        ws.send("c")
        assert ws.recv(timeout=10) == "v1:c:3"
        ws.close()
    assert ws.close_code == 1000, "closed by us, never by a swap"
    assert sup.stop() == 0


def test_by_default_a_hand_over_closes_a_websocket_with_1012(hotsup: MakeHotsup) -> None:
    sup, port = start(hotsup, stateful_source("v0"))
    app = sup.bundles / "web" / "app.py"
    with connect(f"ws://127.0.0.1:{port}/ws", open_timeout=10) as ws:
        ws.send("a")
        assert ws.recv(timeout=10) == "v0:a:1"
        save(app, stateful_source("v1"))
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=10)
    assert ws.close_code == 1012
    sup.wait_log(r"web@2: swapped from web@1 .*hand-over")
    with connect(f"ws://127.0.0.1:{port}/ws", open_timeout=10) as again:
        again.send("b")
        assert again.recv(timeout=10) == "v1:b:2", "reconnected to the new code, count carried"
    assert sup.stop() == 0
