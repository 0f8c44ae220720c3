"""What idle bundles cost: CPU of the supervisor and of all its processes while
nothing happens, beside as many idle plain processes.

Run with the interpreter that has hotsup installed (``python bench/idle_cost.py
[--bundles 50] [--seconds 10] [--json-only]``). A supervisor serves N counter
bundles (``fleet``); once all serve and a settling second has passed, the bench
reads every process of its session (supervisor, zygote, control endpoint,
spare, workers) from ``/proc/PID/stat`` (utime + stime), waits ``--seconds``,
and reads them again: CPU % of one core over the interval, the supervisor's and
everyone's. Then the same for the peers, measured the same way in the same run:

* ``sleep_peer``: N ``python -c "import time; time.sleep(99)"`` (the floor: a
  process that never wakes up);
* ``asyncio_peer``: N asyncio servers on a port each, doing nothing (what an
  idle plain service costs; uvloop if installed, as hotsup's workers run).

It also reports the PSS of every process (``/proc/PID/smaps_rollup``), summed,
beside the sum of their RSS (PSS shares the zygote's pages among the workers).
Targets (issue 12), for 50 bundles: supervisor <= 0.5 %, all <= 2 %.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fleet import Fleet, bench_env
from processes import all_processes, rss_kib
from stats import machine, ratio

TICKS = os.sysconf("SC_CLK_TCK")
TARGETS = {"supervisor_cpu_pct": 0.5, "all_cpu_pct": 2.0}

ASYNCIO_PEER = """\
import asyncio, sys
try:
    import uvloop
except ImportError:
    uvloop = None

async def main():
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    async with server:
        await server.serve_forever()

(uvloop.run if uvloop else asyncio.run)(main())
"""


def cpu_ticks(pid: int) -> int | None:
    """utime + stime of ``pid`` in clock ticks; None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rpartition(")")[2].split()
    except OSError:
        return None
    return int(fields[11]) + int(fields[12])


def pss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as rollup:
            return next(int(line.split()[1]) for line in rollup if line.startswith("Pss:"))
    except (OSError, StopIteration):
        return None


def cpu_over(pids: Iterable[int], seconds: float) -> dict[int, float]:
    """CPU % of one core each of ``pids`` spent over ``seconds`` from now."""
    pids = list(pids)
    before = {pid: cpu_ticks(pid) for pid in pids}
    began = time.monotonic()
    time.sleep(seconds)  # the measured interval itself, not a synchronisation
    took = time.monotonic() - began
    after = {pid: cpu_ticks(pid) for pid in pids}
    return {pid: round(100 * ((after[pid] or 0) - (before[pid] or 0)) / TICKS / took, 3)
            for pid in pids if before[pid] is not None and after[pid] is not None}


def settle(pids: list[int], deadline: float = 60.0) -> None:
    """Wait until ``pids`` are done starting: half a second in which they used
    less than 1 % of a core together (or ``deadline`` passed)."""
    ends = time.monotonic() + deadline
    while time.monotonic() < ends and sum(cpu_over(pids, 0.5).values()) >= 1.0:
        pass


def memory(pids: Iterable[int]) -> dict[str, int]:
    pids = list(pids)
    return {"pss_kib": sum(pss_kib(pid) or 0 for pid in pids),
            "rss_kib": sum(rss_kib(pid) or 0 for pid in pids)}


def run_hotsup(bundles: int, seconds: float, config_extra: str = "") -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="hotsup-idle-"))
    try:
        with Fleet(work, bundles, config_extra=config_extra) as fleet:
            fleet.start()
            fleet.wait_all_serving()
            sid = fleet.pids()["supervisor"]
            pids = [p.pid for p in all_processes() if p.session == sid and p.state != "Z"]
            settle(pids)  # the spare forked, the workers' first pings answered
            cpu = cpu_over(pids, seconds)
            mem = memory(pids)
            roles = {pid: role for role, pid in fleet.pids().items()}
            status = fleet.status()
            exit_status = fleet.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    workers = [b["pss_kib"] for b in status["bundles"] if b.get("pss_kib")]
    return {
        "processes": len(cpu),
        "supervisor_cpu_pct": cpu.get(sid),
        "all_cpu_pct": round(sum(cpu.values()), 3),
        "busiest": sorted(((roles.get(pid, str(pid)), pct) for pid, pct in cpu.items()),
                          key=lambda item: -item[1])[:5],
        **mem,
        "worker_pss_kib_median": sorted(workers)[len(workers) // 2] if workers else None,
        "supervisor_exit_status": exit_status,
    }


def run_peer(count: int, seconds: float, code: str) -> dict[str, Any]:
    procs = [subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.DEVNULL,
                              env=bench_env()) for _ in range(count)]
    try:
        settle([p.pid for p in procs])  # imported and asleep (they report nothing)
        alive = [p.pid for p in procs if p.poll() is None]
        if len(alive) != count:
            raise RuntimeError(f"{count - len(alive)} peer processes exited early")
        cpu = cpu_over(alive, seconds)
        mem = memory(alive)
    finally:
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.wait()
    return {"processes": len(cpu), "all_cpu_pct": round(sum(cpu.values()), 3), **mem}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundles", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--no-pings", action="store_true",
                        help="also measure hotsup with ping_interval = 0 (what pings cost)")
    parser.add_argument("--json-only", action="store_true")
    args = parser.parse_args(argv)
    result: dict[str, Any] = {"bundles": args.bundles, "seconds": args.seconds}
    result["hotsup"] = run_hotsup(args.bundles, args.seconds)
    if args.no_pings:
        result["hotsup_no_pings"] = run_hotsup(args.bundles, args.seconds,
                                               "\n[defaults]\nping_interval = 0\n")
    result["sleep_peer"] = run_peer(args.bundles, args.seconds,
                                    "import time; time.sleep(99)")
    result["asyncio_peer"] = run_peer(args.bundles, args.seconds, ASYNCIO_PEER)
    hot = result["hotsup"]
    result["compare"] = {
        "all_cpu_pct_vs_asyncio_peer": ratio(hot["all_cpu_pct"],
                                             result["asyncio_peer"]["all_cpu_pct"]),
        "pss_vs_asyncio_peer": ratio(hot["pss_kib"], result["asyncio_peer"]["pss_kib"]),
    }
    result["targets"] = {name: {"value": hot[name], "bound": bound,
                                "pass": hot[name] is not None and hot[name] <= bound}
                         for name, bound in TARGETS.items()}
    result["machine"] = machine()
    print(json.dumps(result))
    if not args.json_only:
        for name in ("hotsup", "hotsup_no_pings", "sleep_peer", "asyncio_peer"):
            if name in result:
                r = result[name]
                print(f"{name:16} processes {r['processes']:4}  cpu all {r['all_cpu_pct']:6.2f} %"
                      f"  supervisor {r.get('supervisor_cpu_pct', '-')} %  "
                      f"pss {r['pss_kib'] / 1024:7.1f} MiB  rss {r['rss_kib'] / 1024:7.1f} MiB",
                      file=sys.stderr)
        for name, target in result["targets"].items():
            print(f"{'PASS' if target['pass'] else 'FAIL'} {name} {target['value']} "
                  f"<= {target['bound']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
