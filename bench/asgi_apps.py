"""The ASGI app every contender serves, in two variants, and how it is rewritten.

The app answers every HTTP request with ``version=V count=N pid=P`` (and the
same version in an ``x-app-version`` header): ``V`` tells which code served it,
``N`` is a module-level counter incremented per request. The counter is what a
reload either carries (hotsup, through ``hotsup_snapshot``/``hotsup_restore``)
or loses (a peer that starts a fresh process). The slow-import variant also
imports ``slow_framework`` (0.3 s at import), which lives in ``PRELOAD_DIR``.
A WebSocket is answered ``version=V`` for every message it sends.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

PRELOAD_DIR = Path(__file__).resolve().parent / "preload"
MODULE = "app"
ENTRY = f"{MODULE}:app"
BODY = re.compile(rb"version=(\S+) count=(\d+) pid=(\d+)\n")


@dataclass(frozen=True)
class Variant:
    """One app variant: its name in the report and the framework module it imports."""

    name: str
    framework: str | None

    @property
    def preload(self) -> list[str]:
        return [self.framework] if self.framework else []


VARIANTS = {
    "trivial": Variant("trivial", None),
    "slow_import": Variant("slow_import", "slow_framework"),
}

_SOURCE = '''\
"""Benchmark app {version}: a counter that hotsup carries across swaps."""
{framework_import}
import os

VERSION = "{version}"
count = 0


def hotsup_snapshot():
    return {{"count": count}}


def hotsup_restore(state):
    global count
    count = state["count"]


async def app(scope, receive, send):
    global count
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({{"type": "lifespan.startup.complete"}})
            elif message["type"] == "lifespan.shutdown":
                await send({{"type": "lifespan.shutdown.complete"}})
                return
    if scope["type"] == "websocket":  # bench/connections.py: an echo of the version
        await receive()  # websocket.connect
        await send({{"type": "websocket.accept"}})
        while (message := await receive())["type"] == "websocket.receive":
            await send({{"type": "websocket.send", "text": f"version={{VERSION}}"}})
        return
    if scope["type"] != "http":
        return
    count += 1
    body = f"version={{VERSION}} count={{count}} pid={{os.getpid()}}\\n".encode()
    await send({{
        "type": "http.response.start",
        "status": 200,
        "headers": [
            (b"content-type", b"text/plain"),
            (b"content-length", str(len(body)).encode()),
            (b"x-app-version", VERSION.encode()),
        ],
    }})
    await send({{"type": "http.response.body", "body": body}})
'''


def source(variant: Variant, version: str) -> str:
    """The app module's text for ``variant`` at ``version``."""
    framework = f"\nimport {variant.framework}  # noqa: F401\n" if variant.framework else ""
    return _SOURCE.format(version=version, framework_import=framework)


def save(path: Path, text: str) -> None:
    """Write ``path`` the way editors save: a hidden temp file renamed over it.

    A watcher never sees a half-written module (a plain write truncates first).
    The temp name starts with a dot, which every contender's watcher ignores.
    """
    temp = path.with_name(f".{path.name}.saving")
    with open(temp, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(temp, path)
