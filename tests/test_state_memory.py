"""A large state costs the supervisor no memory of its own: snapshots travel
from generation N to N+1 (and into the checkpoint) in their memfd, which the
supervisor relays and keeps without reading it whole."""

from __future__ import annotations

from collections.abc import Callable

from harness import Hotsup, free_port, request

MB = 48

BIG = f'''\
import os


class Counter:
    def __init__(self, ctx):
        self.ctx = ctx
        self.count = 0
        self.blob = None

    def snapshot(self):
        return {{"count": self.count, "blob": self.blob}}

    def restore(self, state):
        self.count, self.blob = state["count"], state["blob"]

    async def start(self):
        if self.blob is None:
            self.blob = os.urandom({MB} * 1024 * 1024)
        await self.ctx.serve("main", self.handle)

    async def handle(self, reader, writer):
        while line := await reader.readline():
            self.count += 1
            digest = hash(self.blob[-4096:])
            writer.write(f"count={{self.count}} generation={{self.ctx.generation}} "
                         f"blob={{len(self.blob)}}:{{digest}}\\n".encode())
            await writer.drain()
'''


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_swaps_of_a_large_state_do_not_grow_the_supervisor(
        hotsup: Callable[..., Hotsup]) -> None:
    sup = hotsup()
    port = free_port()
    directory = sup.bundles / "big"
    directory.mkdir()
    (directory / "bundle.toml").write_text(
        f'entry = "big:Counter"\nmax_snapshot_bytes = {128 << 20}\nprobation = 0\n'
        f'[sockets.main]\nbind = "127.0.0.1:{port}"\n')
    (directory / "big.py").write_text(BIG)
    sup.start_serving("big")
    first = request(port)
    before = rss_mb(sup.pid)
    for generation in (2, 3, 4):
        done = sup.cli("reload", "big")
        assert done.returncode == 0, done.stdout + done.stderr
        reply = request(port)
        assert f"generation={generation}" in reply
        assert reply.split()[2] == first.split()[2], "the same blob, carried"
    # Before snapshots stayed in their memfds the supervisor kept one (MB)
    # and relayed two more copies at every swap.
    growth = rss_mb(sup.pid) - before
    assert growth < MB / 2, f"the supervisor grew by {growth:.1f} MB over three swaps"
    assert sup.status()["big"]["checkpoint"]["bytes"] > MB * 1024 * 1024
    # The checkpoint was streamed from the memfd through its HMAC: a fresh
    # start from it verifies and restores the same state.
    assert sup.cli("stop", "big").returncode == 0
    assert sup.cli("run", "big").returncode == 0
    reply = request(port)
    assert reply.split()[2] == first.split()[2]
    assert int(reply.split()[0].removeprefix("count=")) == 5
