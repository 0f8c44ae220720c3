"""The cost of handing over a large state: hotsup against pickling it in one process.

Run from anywhere (``python bench/state_handover.py [--mb 80] [--entries 500000]
[--swaps 3] [--clients 4]``). In a fresh temporary directory a service bundle
holds ``--mb`` MB of bytes and a dict of ``--entries`` entries beside its
counter; while K clients loop connect / ``incr`` / read / close, the benchmark
runs ``hotsup reload big --json`` ``--swaps`` times and reports:

* ``pause_ms``: per swap, the longest time no client got a reply (the clients'
  view of the hand-over), and ``reload_ms``: the supervisor's own duration;
* the supervisor's RSS before the first swap and after the last, and its peak
  (``VmHWM``): a supervisor that copies or keeps snapshots in its own memory
  grows by their size;
* the peer, measured in the same run on the same state: ``pickle.dumps`` then
  ``pickle.loads`` in one process with the GC off as the worker has it
  (``floor_ms``, the median of three runs, one before the swaps and two
  after), the least any hand-over between two processes can cost.
  ``ratio`` = median pause / floor;
* unless ``--no-breakdown``, the same run three more times, on an empty state,
  on the bytes alone and on the dict alone: ``per_mb`` and
  ``per_million_objects`` are what a MB of bytes and a million objects (a
  dict entry is four: its key, a tuple, an int and a str) add to the pause
  and to the floor over the empty state's run, and their ratio.

One JSON object goes to stdout.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from clients import HOST, Load, free_port, wait_serving
from processes import SUPERVISOR_CONFIG, notable_log_lines, stop_process

REPLY = re.compile(rb"count=(?P<count>\d+) tag=(?P<mark>\S+)")

STATE = '''
def make_state(mb, entries):
    table = {{f"key-{{i}}": (i, str(i)) for i in range(entries)}}
    return {{"blob": bytes(mb * 1024 * 1024), "table": table}}
'''

BUNDLE = '''\
import asyncio
{state}

class Big:
    def __init__(self, ctx):
        self.ctx = ctx
        self.count = 0
        self.state = None

    def snapshot(self):
        return {{"count": self.count, "state": self.state}}

    def restore(self, saved):
        self.count, self.state = saved["count"], saved["state"]

    async def start(self):
        if self.state is None:
            self.state = make_state({mb}, {entries})
        await self.ctx.serve("main", self.handle)

    async def handle(self, reader, writer):
        while line := await reader.readline():
            if line.strip() == b"incr":
                self.count += 1
            writer.write(f"count={{self.count}} tag=g{{self.ctx.generation}}\\n".encode())
            await writer.drain()
'''

FLOOR = '''
import gc, pickle, sys, time
{state}
state = make_state({mb}, {entries})
gc.disable()  # as the worker does while it (un)pickles
started = time.perf_counter()
data = pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL)
pickle.loads(data)
print((time.perf_counter() - started) * 1000)
'''


#: A table entry's objects: the key, the tuple, its int and its str.
OBJECTS_PER_ENTRY = 4


def status_kib(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def longest_gap(load: Load, since: float, until: float) -> float:
    """The longest stretch within [since, until] in which no client got a reply (ms)."""
    times = sorted(r.t for r in load.replies if since <= r.t <= until)
    marks = [since, *times, until]
    return max(b - a for a, b in itertools.pairwise(marks)) * 1000


def measure(mb: int, entries: int, swaps: int, clients: int) -> dict[str, Any]:
    """One hand-over run on a state of ``mb`` MB of bytes and ``entries`` entries:
    hotsup's pauses, reload durations and RSS, and the one-process floor."""
    state = STATE.format()
    floor_script = FLOOR.format(state=state, mb=mb, entries=entries)

    def floor() -> float:
        done = subprocess.run([sys.executable, "-c", floor_script], check=True,
                              capture_output=True, text=True)
        return float(done.stdout.strip())

    floors = [floor()]
    with tempfile.TemporaryDirectory(prefix="hotsup-bench-state-") as tmp:
        work = Path(tmp)
        port = free_port()
        bundle = work / "bundles" / "big"
        bundle.mkdir(parents=True)
        (bundle / "bundle.toml").write_text(
            f'entry = "big:Big"\nstart_timeout = 60\nquiesce_timeout = 30\n'
            f'max_snapshot_bytes = {256 << 20}\nprobation = 0\n'
            f'[sockets.main]\nbind = "{HOST}:{port}"\n')
        (bundle / "big.py").write_text(BUNDLE.format(state=state, mb=mb, entries=entries))
        (work / "config.toml").write_text(SUPERVISOR_CONFIG)
        log = work / "hotsup.log"
        hotsup = [sys.executable, "-m", "hotsup.supervisor.cli"]
        with log.open("ab") as out:
            proc = subprocess.Popen([*hotsup, "start", "config.toml"], cwd=work,
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        load = Load(port, clients, REPLY)
        pauses, reloads = [], []
        try:
            wait_serving(port, proc, "hotsup", REPLY)
            rss_before = status_kib(proc.pid, "VmRSS")
            load.start()
            for _ in range(swaps):
                time.sleep(0.5)  # steady load before each swap
                started = time.monotonic()
                done = subprocess.run([*hotsup, "reload", "big", "--json", "-c", "config.toml"],
                                      cwd=work, capture_output=True, text=True, timeout=300)
                ended = time.monotonic()
                if done.returncode != 0:
                    raise RuntimeError(f"reload failed: {done.stdout}{done.stderr}")
                reloads.append(float(json.loads(done.stdout.splitlines()[0])["duration_ms"]))
                time.sleep(0.3)
                pauses.append(longest_gap(load, started, ended + 0.3))
            load.stop()
            rss_after = status_kib(proc.pid, "VmRSS")
            peak = status_kib(proc.pid, "VmHWM")
        except Exception:
            print("\n".join(notable_log_lines(log)), file=sys.stderr)
            raise
        finally:
            load.stop()
            stop_process(proc, group=True)
    floors += [floor(), floor()]  # before and after: the machine's noise, both sides
    floor_ms = statistics.median(floors)
    pause = statistics.median(pauses)
    return {
        "state": {"mb": mb, "entries": entries},
        "hotsup": {
            "pause_ms": [round(p, 1) for p in pauses],
            "pause_ms_median": round(pause, 1),
            "reload_ms": [round(r, 1) for r in reloads],
            "supervisor_rss_mb": {"before": round(rss_before / 1024, 1),
                                  "after": round(rss_after / 1024, 1),
                                  "growth": round((rss_after - rss_before) / 1024, 1),
                                  "peak": round(peak / 1024, 1)},
            "failed_requests": sum(load.failures.values()),
        },
        "peer": {"name": "pickle.dumps + pickle.loads in one process", "floor_ms":
                 round(floor_ms, 1)},
        "ratio": round(pause / floor_ms, 2),
    }


def unit_costs(run: dict[str, Any], empty: dict[str, Any], units: float) -> dict[str, float]:
    """What ``run``'s state adds over the ``empty`` state's run, per unit of
    its size: the median pause's and the floor's share of each unit."""
    pause = run["hotsup"]["pause_ms_median"] - empty["hotsup"]["pause_ms_median"]
    floor = run["peer"]["floor_ms"] - empty["peer"]["floor_ms"]
    return {"hotsup_ms": round(pause / units, 3), "floor_ms": round(floor / units, 3),
            "ratio": round(pause / floor, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=80)
    parser.add_argument("--entries", type=int, default=500_000)
    parser.add_argument("--swaps", type=int, default=3)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--no-breakdown", action="store_true",
                        help="skip the empty, bytes-only and dict-only runs (the unit costs)")
    args = parser.parse_args(argv)
    report: dict[str, Any] = {
        "benchmark": "state_handover",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "loadavg": [round(x, 2) for x in os.getloadavg()]},
        **measure(args.mb, args.entries, args.swaps, args.clients),
    }
    if not args.no_breakdown:
        # Each half of the state alone; the empty state's run is the swap's
        # own cost, taken off both (the module docstring says what is reported).
        empty = measure(0, 0, args.swaps, args.clients)
        blob = measure(args.mb, 0, args.swaps, args.clients)
        table = measure(0, args.entries, args.swaps, args.clients)
        report["per_mb"] = {**unit_costs(blob, empty, args.mb), "run": blob}
        report["per_million_objects"] = {
            **unit_costs(table, empty, args.entries * OBJECTS_PER_ENTRY / 1e6),
            "objects_per_entry": OBJECTS_PER_ENTRY, "run": table}
        report["empty_state"] = empty
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
