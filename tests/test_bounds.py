"""Memory and work bounds of the supervisor (issue 11, finding 5): what a bundle
writes to its log, what a control client asks for and never reads, how many
followers wait, cost the supervisor a bounded amount. Real supervisors; the
figures come from /proc."""

from __future__ import annotations

import json
import os
import textwrap
from collections.abc import Callable

import pytest
from harness import Hotsup, free_port, request, wait_for, write_bundle
from hotsup.supervisor import logs

pytestmark = pytest.mark.timeout(120)

MakeHotsup = Callable[..., Hotsup]

MiB = 1024 * 1024


def rss(pid: int) -> int:
    """Resident bytes of ``pid`` (VmRSS)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time ``pid`` used so far."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


#: A bundle that, asked with ``dump MB``, writes MB MiB to stdout without a
#: newline, then ends the line and says it is done.
DUMP_BUNDLE = textwrap.dedent("""\
    import sys

    class Counter:
        def __init__(self, ctx):
            self.ctx = ctx

        async def start(self):
            await self.ctx.serve("main", self.handle)

        async def handle(self, reader, writer):
            line = (await reader.readline()).split()
            if line[:1] == [b"dump"]:
                chunk = b"x" * (1 << 20)
                for _ in range(int(line[1])):
                    sys.stdout.buffer.write(chunk)
                sys.stdout.buffer.write(b"\\n")
                sys.stdout.flush()
                print("dump done", flush=True)
            writer.write(b"ok\\n")
            await writer.drain()
    """)


def _records(sup: Hotsup, name: str, lines: int) -> list[dict[str, object]]:
    done = sup.cli("logs", name, "--json", "-n", str(lines))
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def test_a_huge_line_is_cut_and_the_rings_stay_bounded(hotsup: MakeHotsup) -> None:
    """96 MiB with no newline: pieces of at most MAX_LINE bytes, each but the
    last marked; the supervisor keeps a few MiB of them, not the 96."""
    sup = hotsup()
    port = free_port()
    write_bundle(sup.bundles / "dump", DUMP_BUNDLE, port)
    sup.start_serving("dump")
    before = rss(sup.pid)
    assert request(port, "dump 96", timeout=60) == "ok"
    wait_for(lambda: any(r["msg"] == "dump done" for r in _records(sup, "dump", 5)), 60,
             "the dump to reach the log")
    after = rss(sup.pid)
    records = _records(sup, "dump", 400)
    pieces = [str(r["msg"]) for r in records if str(r["msg"]).startswith("xxx")]
    assert pieces, records[-3:]
    for piece in pieces[:-1]:
        assert piece.endswith(logs.CUT_MARK), piece[-100:]
        assert len(piece) == logs.MAX_LINE + len(logs.CUT_MARK)
    assert not pieces[-1].endswith(logs.CUT_MARK) and len(pieces[-1]) <= logs.MAX_LINE
    kept = sum(len(p) for p in pieces)
    assert kept <= logs.RING_BYTES, f"the bundle's ring kept {kept} bytes"
    grew = (after - before) / MiB
    print(f"supervisor RSS {before / MiB:.1f} MiB -> {after / MiB:.1f} MiB after a 96 MiB line")
    assert grew < 40, f"the supervisor grew by {grew:.0f} MiB for a 96 MiB line"
    assert sup.stop() == 0
