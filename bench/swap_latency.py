"""Swap latency under load: hotsup against a plain stop-then-start reload.

Run from anywhere (``python bench/swap_latency.py [--swaps N] [--peer-swaps M]
[--clients K] [--json-only] [--keep]``). Everything happens in a fresh
temporary directory on 127.0.0.1 with ports picked by the kernel:

1. hotsup: ``hotsup start config.toml`` serves a stateful line-protocol counter
   bundle (``incr`` -> ``count=N tag=vI generation=G``). While K client
   threads loop connect / ``incr`` / read one line / close, the benchmark
   rewrites the bundle module N times (``TAG = "v1"``, ``"v2"``, ...). Latency
   of a swap = the first reply carrying the new tag minus the moment just
   before the write, both on ``time.monotonic()``.
2. restart peer: the same counter as a standalone script. On each write the
   benchmark itself SIGTERMs the process, waits for it and starts a new one
   (what ``watchfiles.run_process`` or a plain restart does, minus any file
   watching delay), under the same load.

One JSON object goes to stdout, a short table to stderr. ``state_kept`` is
true when no count was served twice, every client saw its counts strictly
increase, and every generation's counts are above the previous one's.
A client that fails waits 10 ms before its next request (no busy spinning), so
``failed_requests`` counts attempts, not seconds of downtime.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from clients import HOST, Load, free_port, wait_serving
from processes import SUPERVISOR_CONFIG, notable_log_lines, stop_process

SWAP_DEADLINE = 10.0
TARGETS = {"p50_ms": 60, "p99_ms": 150}
REPLY = re.compile(rb"count=(?P<count>\d+) tag=(?P<mark>\S+)")

BUNDLE_TOML = """\
entry = "counter:Counter"
version = "1.0.0"

[sockets.main]
bind = "{host}:{port}"
"""

BUNDLE_MODULE = '''\
"""Benchmark counter: its count survives swaps, TAG tells generations apart."""

from __future__ import annotations

import asyncio
from typing import Any

TAG = "{tag}"


class Counter:
    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx
        self.count = 0

    def snapshot(self) -> dict[str, int]:
        return {{"count": self.count}}

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
                writer.write(f"error unknown command {{command!r}}\\n".encode())
                continue
            writer.write(
                f"count={{self.count}} tag={{TAG}} generation={{self.ctx.generation}}\\n".encode()
            )
            await writer.drain()
'''

PEER_SCRIPT = '''\
"""The same counter as a standalone server: python counter_peer.py PORT."""

import asyncio
import sys

TAG = "{tag}"
count = 0


async def handle(reader, writer):
    global count
    try:
        while line := await reader.readline():
            command = line.strip().decode(errors="replace")
            if command == "incr":
                count += 1
            elif command != "get":
                writer.write(f"error unknown command {{command!r}}\\n".encode())
                continue
            writer.write(f"count={{count}} tag={{TAG}} generation=0\\n".encode())
            await writer.drain()
    finally:
        writer.close()


async def main():
    server = await asyncio.start_server(handle, "{host}", int(sys.argv[1]), backlog=1024)
    async with server:
        await server.serve_forever()


asyncio.run(main())
'''


def write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)


# -- results ------------------------------------------------------------------------


def percentile(sorted_values: list[float], p: float) -> float | None:
    """Nearest-rank percentile."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def state_kept(load: Load, tags: list[str]) -> bool:
    """No count twice, each client's counts strictly increase, generations in order."""
    counts = [r.count for r in load.replies]
    if len(counts) != len(set(counts)):
        return False
    last: dict[int, int] = {}
    for reply in sorted(load.replies, key=lambda r: r.t):
        if reply.count <= last.get(reply.client, -1):
            return False
        last[reply.client] = reply.count
    by_tag: dict[str, list[int]] = {}
    for reply in load.replies:
        by_tag.setdefault(reply.tag, []).append(reply.count)
    ranges = [(min(by_tag[t]), max(by_tag[t])) for t in tags if t in by_tag]
    return all(prev[1] < nxt[0] for prev, nxt in itertools.pairwise(ranges))


def summarize(load: Load, latencies: list[float | None], tags: list[str]) -> dict[str, Any]:
    done = sorted(x * 1000 for x in latencies if x is not None)

    def ms(p: float) -> float | None:
        value = percentile(done, p)
        return round(value, 1) if value is not None else None

    return {
        "swaps": len(latencies),
        "swaps_timed_out": sum(1 for x in latencies if x is None),
        "latency_ms": {"p50": ms(50), "p90": ms(90), "p99": ms(99), "max": ms(100)},
        "failed_requests": sum(load.failures.values()),
        "requests": load.requests,
        "failures": dict(sorted(load.failures.items())),
        "state_kept": state_kept(load, tags),
    }


def swap_loop(load: Load, swaps: int, write: Callable[[str], None],
              restart: Callable[[], None] | None = None) -> list[float | None]:
    """For each swap: write TAG=v{i} (and restart, for the peer), time the first new reply."""
    latencies: list[float | None] = []
    for i in range(1, swaps + 1):
        tag = f"v{i}"
        t0 = time.monotonic()
        write(tag)
        if restart is not None:
            restart()
        seen = load.wait_tag(tag, t0 + SWAP_DEADLINE)
        latencies.append(None if seen is None else seen - t0)
        if seen is None:
            print(f"swap {i}: no reply with tag {tag} within {SWAP_DEADLINE:g}s",
                  file=sys.stderr)
        time.sleep(random.uniform(0.05, 0.15))
    return latencies


# -- the two contenders -------------------------------------------------------------


def run_hotsup(work: Path, swaps: int, clients: int) -> dict[str, Any]:
    port = free_port()
    bundle = work / "bundles" / "counter"
    bundle.mkdir(parents=True)
    write_text(work / "config.toml", SUPERVISOR_CONFIG)
    write_text(bundle / "bundle.toml", BUNDLE_TOML.format(host=HOST, port=port))
    module = bundle / "counter.py"
    write_text(module, BUNDLE_MODULE.format(tag="v0"))
    proc = load = None
    with open(work / "hotsup.log", "wb") as log:
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "hotsup.supervisor.cli", "start", "config.toml"],
                cwd=work, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            wait_serving(port, proc, "hotsup", REPLY)
            load = Load(port, clients, REPLY)
            load.start()
            load.wait_tag("v0", time.monotonic() + SWAP_DEADLINE)
            latencies = swap_loop(load, swaps,
                                  lambda tag: write_text(module, BUNDLE_MODULE.format(tag=tag)))
        finally:
            if load is not None:
                load.stop()
            stop_process(proc, group=True)
    result = summarize(load, latencies, [f"v{i}" for i in range(swaps + 1)])
    result["exit_status"] = proc.returncode
    return result


def run_peer(work: Path, swaps: int, clients: int) -> dict[str, Any]:
    port = free_port()
    peer_dir = work / "peer"
    peer_dir.mkdir()
    script = peer_dir / "counter_peer.py"
    write_text(script, PEER_SCRIPT.format(tag="v0", host=HOST))
    current: list[subprocess.Popen[bytes] | None] = [None]
    load = None
    log = open(work / "peer.log", "wb")  # noqa: SIM115 - closed in finally

    def launch() -> None:
        current[0] = subprocess.Popen([sys.executable, str(script), str(port)], cwd=peer_dir,
                                      stdin=subprocess.DEVNULL, stdout=log,
                                      stderr=subprocess.STDOUT)

    def restart() -> None:
        stop_process(current[0], group=False)
        launch()

    try:
        launch()
        assert current[0] is not None
        wait_serving(port, current[0], "restart peer", REPLY)
        load = Load(port, clients, REPLY)
        load.start()
        load.wait_tag("v0", time.monotonic() + SWAP_DEADLINE)
        latencies = swap_loop(
            load, swaps, lambda tag: write_text(script, PEER_SCRIPT.format(tag=tag, host=HOST)),
            restart)
    finally:
        if load is not None:
            load.stop()
        stop_process(current[0], group=False)
        log.close()
    return summarize(load, latencies, [f"v{i}" for i in range(swaps + 1)])


# -- main ---------------------------------------------------------------------------


def table(result: dict[str, Any]) -> str:
    rows = [f"{'':14}{'swaps':>6}{'p50':>8}{'p90':>8}{'p99':>8}{'max':>8}"
            f"{'failed':>8}{'requests':>10}  state_kept"]
    for name in ("hotsup", "restart_peer"):
        r = result[name]
        lat = r["latency_ms"]
        cells = "".join(f"{'-' if lat[k] is None else lat[k]:>8}"
                        for k in ("p50", "p90", "p99", "max"))
        rows.append(f"{name:14}{r['swaps']:>6}{cells}{r['failed_requests']:>8}"
                    f"{r['requests']:>10}  {r['state_kept']}")
    rows.append(f"ratio p50 {result['ratio_p50']}  ratio p99 {result['ratio_p99']}  "
                f"(targets: p50 <= {TARGETS['p50_ms']} ms, p99 <= {TARGETS['p99_ms']} ms; "
                f"latencies in ms)")
    return "\n".join(rows)


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--swaps", type=int, default=50, help="hotsup swaps (default 50)")
    parser.add_argument("--peer-swaps", type=int, default=20,
                        help="restarts of the stop-then-start peer (default 20)")
    parser.add_argument("--clients", type=int, default=4, help="client threads (default 4)")
    parser.add_argument("--json-only", action="store_true", help="no table on stderr")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary directory (config, bundle, logs)")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="hotsup-bench-"))
    try:
        hotsup = run_hotsup(work, args.swaps, args.clients)
        peer = run_peer(work, args.peer_swaps, args.clients)
        result = {
            "hotsup": hotsup,
            "restart_peer": peer,
            "ratio_p50": ratio(hotsup["latency_ms"]["p50"], peer["latency_ms"]["p50"]),
            "ratio_p99": ratio(hotsup["latency_ms"]["p99"], peer["latency_ms"]["p99"]),
            "targets": TARGETS,
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                        "platform": platform.platform()},
        }
        print(json.dumps(result))
        if not args.json_only:
            print(table(result), file=sys.stderr)
            notable = notable_log_lines(work / "hotsup.log")
            if notable:
                print("hotsup log, errors and warnings:", file=sys.stderr)
                print(textwrap.indent("\n".join(notable), "  "), file=sys.stderr)
            if args.keep:
                print(f"kept {work}", file=sys.stderr)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
