"""A line-protocol counter whose count survives swaps.

    $ printf 'incr\n' | nc 127.0.0.1 8101
    count=1 generation=1 greeting=hi

Commands: ``incr`` (add one, reply with the new count), ``get``.
"""

from __future__ import annotations

import asyncio
from typing import Any


class Counter:
    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx
        self.count = 0

    def snapshot(self) -> dict[str, int]:
        return {"count": self.count}

    def restore(self, state: dict[str, int]) -> None:
        self.count = state["count"]

    async def start(self) -> None:
        await self.ctx.serve("main", self.handle)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while line := await reader.readline():
            command = line.strip().decode(errors="replace")
            if command == "incr":
                self.count += 1
            elif command != "get":
                writer.write(f"error unknown command {command!r}\n".encode())
                continue
            greeting = self.ctx.settings.get("greeting", "")
            writer.write(
                f"count={self.count} generation={self.ctx.generation} greeting={greeting}\n"
                .encode()
            )
            await writer.drain()
