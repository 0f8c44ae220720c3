"""Connections of service bundles carried across a hand-over (DESIGN.md,
"Connections across swaps"): ``ctx.pausing``, ``ctx.hand_over`` and the
successor's ``resume(reader, writer, state)``, with real clients on real
sockets through real swaps."""

from __future__ import annotations

import contextlib
import re
import shutil
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

from harness import Hotsup, free_port

#: A line service whose handlers wait for their client's next line or for the
#: pause, whichever comes first, and then hand their connection over with its
#: own count. ``hold`` makes a handler wait for the pause without reading on,
#: so what the client sent after it is still in the reader's buffer.
CHAT = '''\
import asyncio

FAIL_START = {fail!r}


class Chat:
    def __init__(self, ctx):
        self.ctx = ctx
        self.total = 0

    def snapshot(self):
        return {{"total": self.total}}

    def restore(self, state):
        self.total = state["total"]

    async def start(self):
        if FAIL_START:
            raise RuntimeError("this version cannot start")
        await self.ctx.serve("main", self.handle)

    async def handle(self, reader, writer):
        await self.serve(reader, writer, {{"seen": 0}})

    async def resume(self, reader, writer, conn):
        await self.serve(reader, writer, conn)

    async def serve(self, reader, writer, conn):
        while True:
            line = await self.next_line(reader)
            if line is None or line.strip() == b"hold":
                if line is not None:
                    print("holding", flush=True)
                    await self.ctx.pausing.wait()
                if await self.ctx.hand_over(writer, conn):
                    return
                if self.ctx.pausing.is_set():
                    return  # retiring, nothing to hand over to: close
                print("handed back", flush=True)
                continue
            if not line or line.strip() == b"bye":
                return
            conn["seen"] += 1
            self.total += 1
            gen = self.ctx.generation
            writer.write(f"seen={{conn['seen']}} total={{self.total}} gen={{gen}}\\n".encode())
            await writer.drain()

    async def next_line(self, reader):
        if self.ctx.pausing.is_set():
            return None
        read = asyncio.ensure_future(reader.readline())
        pausing = asyncio.ensure_future(self.ctx.pausing.wait())
        done, _ = await asyncio.wait({{read, pausing}}, return_when=asyncio.FIRST_COMPLETED)
        pausing.cancel()
        if read in done:
            return read.result()
        read.cancel()  # readline() consumes nothing until a whole line is there
        await asyncio.gather(read, return_exceptions=True)
        return None
'''


def write_chat(sup: Hotsup, port: int, fail: bool = False, hooks: bool = True) -> None:
    """The chat bundle; without ``hooks`` (no snapshot/restore) it swaps in overlap mode."""
    directory = sup.bundles / "chat"
    directory.mkdir(exist_ok=True)
    (directory / "bundle.toml").write_text(
        f'entry = "chat:Chat"\nquiesce_timeout = 4\nprobation = 30\n'
        f'[sockets.main]\nbind = "127.0.0.1:{port}"\n')
    source = CHAT.format(fail=fail)
    if not hooks:
        source = source.replace("def snapshot(", "def _snapshot(")
    (directory / "chat.py").write_text(source)


@contextlib.contextmanager
def serving_chat(hotsup: Callable[..., Hotsup], hooks: bool = True
                 ) -> Iterator[tuple[Hotsup, int, Client]]:
    """A supervisor serving the chat bundle, and one client connected to it."""
    sup = hotsup()
    port = free_port()
    write_chat(sup, port, hooks=hooks)
    sup.start_serving("chat")
    client = Client(port)
    try:
        yield sup, port, client
    finally:
        client.close()


class Client:
    """A line client on one connection, kept open for the whole test."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.file = self.sock.makefile("rb")

    def ask(self, line: str = "ping") -> str:
        self.sock.sendall(line.encode() + b"\n")
        return self.file.readline().decode().strip()

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def test_idle_connections_move_with_their_state(hotsup: Callable[..., Hotsup]) -> None:
    sup = hotsup()
    port = free_port()
    write_chat(sup, port)
    sup.start_serving("chat")
    clients = [Client(port) for _ in range(150)]  # more than one batch of fds
    try:
        for client in clients:
            assert client.ask().startswith("seen=1 ")
        done = sup.cli("reload", "chat")
        assert done.returncode == 0, done.stdout + done.stderr
        sup.wait_log(r"chat@2: 150 connection\(s\) carried from chat@1")
        # The same connections, answered by the new generation, with their own
        # count and the bundle's total carried.
        answers = [client.ask() for client in clients]
        assert all(a.startswith("seen=2 ") and a.endswith(" gen=2") for a in answers), answers
        assert answers[-1] == "seen=2 total=300 gen=2"
        assert sup.status()["chat"]["last_pause_ms"] < 2000  # not quiesce_timeout
    finally:
        for client in clients:
            client.close()


def test_what_the_reader_had_buffered_goes_with_it(hotsup: Callable[..., Hotsup]) -> None:
    with serving_chat(hotsup) as (sup, _port, client):
        client.sock.sendall(b"hold\nping\n")  # "ping" waits in gen 1's reader
        sup.wait_log(r"holding")
        done = sup.cli("reload", "chat")
        assert done.returncode == 0, done.stdout + done.stderr
        assert client.file.readline() == b"seen=1 total=1 gen=2\n"
        assert client.ask() == "seen=2 total=2 gen=2"


def test_a_rolled_back_swap_leaves_them_with_the_old_generation(
        hotsup: Callable[..., Hotsup]) -> None:
    with serving_chat(hotsup) as (sup, port, client):
        assert client.ask() == "seen=1 total=1 gen=1"
        write_chat(sup, port, fail=True)
        sup.wait_log(r"swap to chat@2 rolled back")
        sup.wait_log(r"handed back")
        assert client.ask() == "seen=2 total=2 gen=1"
        write_chat(sup, port)  # fixed: the next swap carries it after all
        sup.wait_log(r"connection\(s\) carried from chat@1")
        assert client.ask() == "seen=3 total=3 gen=3"


def test_the_old_generation_lets_go_of_a_carried_connection(
        hotsup: Callable[..., Hotsup]) -> None:
    with serving_chat(hotsup) as (sup, _port, client):
        assert client.ask() == "seen=1 total=1 gen=1"
        assert sup.cli("reload", "chat").returncode == 0
        assert client.ask() == "seen=2 total=2 gen=2"
        # Closing from the new side must reach the client at once: no copy of
        # the connection is left open in generation 1, held for probation.
        client.sock.sendall(b"bye\n")
        client.sock.settimeout(2.0)
        assert client.file.readline() == b""


def test_the_demo_counter_keeps_its_client_through_an_edit(
        hotsup: Callable[..., Hotsup]) -> None:
    sup = hotsup()
    demo = Path(__file__).resolve().parent.parent / "bundles" / "counter"
    port = free_port()
    shutil.copytree(demo, sup.bundles / "counter")
    toml = sup.bundles / "counter" / "bundle.toml"
    toml.write_text(re.sub(r'bind = "[^"]*"', f'bind = "127.0.0.1:{port}"', toml.read_text()))
    sup.start_serving("counter")
    client = Client(port)
    try:
        assert client.ask("incr").startswith("count=1 mine=1 generation=1 ")
        toml.write_text(re.sub(r'greeting = "[^"]*"', 'greeting = "edited"', toml.read_text()))
        sup.wait_log(r"counter@2: 1 connection\(s\) carried from counter@1")
        assert client.ask("incr") == "count=2 mine=2 generation=2 greeting=edited"
    finally:
        client.close()


def test_in_overlap_mode_idle_connections_move_too(hotsup: Callable[..., Hotsup]) -> None:
    with serving_chat(hotsup, hooks=False) as (sup, _port, client):
        assert client.ask() == "seen=1 total=1 gen=1"
        done = sup.cli("reload", "chat")
        assert done.returncode == 0, done.stdout + done.stderr
        assert "overlap" in done.stdout
        sup.wait_log(r"chat@2: 1 connection\(s\) carried from chat@1")
        # Its own state came along; the bundle's (no hooks) did not.
        assert client.ask() == "seen=2 total=1 gen=2"
