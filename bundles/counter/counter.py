"""A line-protocol counter whose count survives swaps, and whose clients do too.

    $ nc 127.0.0.1 8101
    incr
    count=1 mine=1 generation=1 greeting=hi

Commands: ``incr`` (add one, reply with the new count), ``get``. ``mine`` is
this connection's own count: an open connection moves to the next generation
at a swap (``ctx.hand_over``) with it, so a client that stays connected
through an edit sees the new code answer on the same connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any

#: What ``first_of`` returns when the generation began to pause first.
PAUSING = object()


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
        await self.serve(reader, writer, {"mine": 0})

    async def resume(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     state: dict[str, int]) -> None:
        """A client carried from the previous generation, with its own state."""
        await self.serve(reader, writer, state)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    state: dict[str, int]) -> None:
        while True:
            line = await first_of(reader.readline(), self.ctx.pausing.wait())
            if line is PAUSING:
                if await self.ctx.hand_over(writer, state):
                    return  # the next generation serves this client now
                if self.ctx.pausing.is_set():
                    return  # retiring with nobody to hand over to: close
                continue  # the swap rolled back: serve on
            assert isinstance(line, bytes)
            if not line:
                return
            command = line.strip().decode(errors="replace")
            if command == "incr":
                self.count += 1
                state["mine"] += 1
            elif command != "get":
                writer.write(f"error unknown command {command!r}\n".encode())
                continue
            greeting = self.ctx.settings.get("greeting", "")
            writer.write(
                f"count={self.count} mine={state['mine']} generation={self.ctx.generation} "
                f"greeting={greeting}\n".encode()
            )
            await writer.drain()


async def first_of(reading: Awaitable[bytes], pausing: Awaitable[Any]) -> bytes | object:
    """The line read, or ``PAUSING`` if the pause came first (the read is then
    cancelled: ``readline()`` consumes nothing until a whole line is there)."""
    read = asyncio.ensure_future(reading)
    paused = asyncio.ensure_future(pausing)
    done, _ = await asyncio.wait({read, paused}, return_when=asyncio.FIRST_COMPLETED)
    paused.cancel()
    if read in done:
        return read.result()
    read.cancel()
    await asyncio.gather(read, return_exceptions=True)
    return PAUSING
