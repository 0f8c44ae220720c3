"""A plain ASGI app (no framework) whose visit count survives swaps, and
whose WebSockets do too.

    $ curl -s http://127.0.0.1:8103/
    hello, visitor 1 (generation 1)

On ``/ws`` each text message is greeted back. bundle.toml says ``websockets =
"resume"``: an open WebSocket moves to the next generation at a swap, and the
client, still on the same connection, is greeted by the new code.

``hotsup_snapshot()`` and ``hotsup_restore(state)`` carry the count from one
generation to the next; the lifespan startup is where slow set-up belongs (it
runs while the old generation still serves).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

GREETING = "hello"
log = logging.getLogger("greeter")
visits = 0


def hotsup_snapshot() -> dict[str, int]:
    return {"visits": visits}


def hotsup_restore(state: dict[str, int]) -> None:
    global visits
    visits = state["visits"]


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        await lifespan(scope, receive, send)
        return
    if scope["type"] == "websocket":
        await websocket(scope, receive, send)
        return
    global visits
    visits += 1
    generation = scope["state"]["hotsup"].generation  # the bundle's ctx
    body = f"{GREETING}, visitor {visits} (generation {generation})\n".encode()
    await send({"type": "http.response.start", "status": 200, "headers": [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(body)).encode()),
    ]})
    await send({"type": "http.response.body", "body": body})


async def websocket(scope: Scope, receive: Receive, send: Send) -> None:
    # Resumed in a new generation, the first message is websocket.connect
    # again and the accept sends nothing: the client saw its handshake once.
    connection = scope["extensions"]["hotsup.connection"]
    await receive()  # websocket.connect
    await send({"type": "websocket.accept"})
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            return
        generation = scope["state"]["hotsup"].generation
        again = ", resumed" if connection["resumed"] else ""
        text = f"{GREETING}, {message.get('text') or ''} (generation {generation}{again})"
        await send({"type": "websocket.send", "text": text})


async def lifespan(scope: Scope, receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            # Slow set-up goes here: it runs before this generation takes over.
            log.info("lifespan startup of generation %d", scope["state"]["hotsup"].generation)
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            log.info("lifespan shutdown")
            await send({"type": "lifespan.shutdown.complete"})
            return
