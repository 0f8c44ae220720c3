"""A stateless service: answers every request with one line and closes.

    $ curl -s http://127.0.0.1:8102/
    hello from generation 1
"""

from __future__ import annotations

import asyncio
from typing import Any

MESSAGE = "hello"


class Hello:
    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx

    async def start(self) -> None:
        await self.ctx.serve("main", self.handle)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Read the request head (an HTTP request or a bare line) and answer it.
        while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
            if not line.startswith((b"GET", b"HEAD", b"POST")) and b":" not in line:
                break
        body = f"{MESSAGE} from generation {self.ctx.generation}\n".encode()
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode() + body
        )
        await writer.drain()
