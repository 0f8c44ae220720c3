"""Many bundles from ``hotsup start`` to all serving, beside as many plain
processes started by a shell loop.

Run with the interpreter that has hotsup installed (``python
bench/many_bundles.py [--counts 50,200] [--json-only]``). For each count N:

* ``hotsup``: a supervisor over N counter bundles (``fleet``); seconds from its
  fork until every bundle's port answered a ``get``; then its peak RSS
  (``VmHWM``) and the PSS of all its processes;
* ``shell_peer``: ``sh -c 'for port in ...; do python counter_peer.py $port & done; wait'``
  (``swap_latency``'s standalone counter): the same, measured the same way.

One JSON object on stdout (per count: both figures and the ratio), a table on
stderr. Target (issue 12): 50 bundles serving within 3 s; 200 reported.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from clients import HOST, free_port, probe
from fleet import Fleet, bench_env
from idle_cost import memory
from processes import all_processes, kill_session
from stats import machine, ratio
from swap_latency import PEER_SCRIPT, REPLY, write_text

TARGET_50_S = 3.0
DEADLINE = 300.0


def peak_rss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as handle:
            return next(int(line.split()[1]) for line in handle if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None


def session_of(sid: int) -> list[int]:
    return [p.pid for p in all_processes() if p.session == sid and p.state != "Z"]


def run_hotsup(count: int) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="hotsup-many-"))
    try:
        with Fleet(work, count) as fleet:
            fleet.start()
            took = fleet.wait_all_serving(DEADLINE)
            assert fleet.proc is not None
            pids = session_of(fleet.proc.pid)
            result = {"all_serving_s": round(took, 3), "processes": len(pids),
                      "supervisor_peak_rss_kib": peak_rss_kib(fleet.proc.pid), **memory(pids)}
            result["supervisor_exit_status"] = fleet.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return result


def run_shell_peer(count: int) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="hotsup-many-peer-"))
    script = work / "counter_peer.py"
    write_text(script, PEER_SCRIPT.format(tag="v0", host=HOST))
    ports = [free_port() for _ in range(count)]
    loop = (f'for port in {" ".join(map(str, ports))}; do "{sys.executable}" "{script}" '
            f'"$port" & done; wait')
    began = time.monotonic()
    shell = subprocess.Popen(["sh", "-c", loop], cwd=work, stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True, env=bench_env())
    try:
        waiting = set(ports)
        while waiting:
            if time.monotonic() - began > DEADLINE:
                raise RuntimeError(f"{len(waiting)} peers not serving within {DEADLINE:g}s")
            waiting = {port for port in waiting if not probe(port, REPLY)}
            if waiting:
                time.sleep(0.005)  # a poll interval, not a synchronisation
        took = time.monotonic() - began
        pids = [pid for pid in session_of(shell.pid) if pid != shell.pid]
        return {"all_serving_s": round(took, 3), "processes": len(pids), **memory(pids)}
    finally:
        os.killpg(shell.pid, signal.SIGTERM)
        shell.wait(30)
        kill_session(shell.pid)
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="50,200", help="bundle counts (default 50,200)")
    parser.add_argument("--json-only", action="store_true")
    args = parser.parse_args(argv)
    result: dict[str, Any] = {"counts": {}}
    for count in (int(c) for c in args.counts.split(",")):
        hotsup = run_hotsup(count)
        peer = run_shell_peer(count)
        result["counts"][str(count)] = {
            "hotsup": hotsup, "shell_peer": peer,
            "ratio_all_serving": ratio(hotsup["all_serving_s"], peer["all_serving_s"]),
            "ratio_pss": ratio(hotsup["pss_kib"], peer["pss_kib"])}
    fifty = result["counts"].get("50")
    result["targets"] = {"all_serving_s_50": {
        "value": fifty["hotsup"]["all_serving_s"] if fifty else None, "bound": TARGET_50_S,
        "pass": fifty["hotsup"]["all_serving_s"] <= TARGET_50_S if fifty else None}}
    result["machine"] = machine()
    print(json.dumps(result))
    if not args.json_only:
        for count, entry in result["counts"].items():
            h, p = entry["hotsup"], entry["shell_peer"]
            print(f"{count:>4} bundles: hotsup {h['all_serving_s']} s (pss "
                  f"{h['pss_kib'] / 1024:.0f} MiB), shell loop {p['all_serving_s']} s (pss "
                  f"{p['pss_kib'] / 1024:.0f} MiB), ratio {entry['ratio_all_serving']}",
                  file=sys.stderr)
        target = result["targets"]["all_serving_s_50"]
        if target["pass"] is not None:
            print(f"{'PASS' if target['pass'] else 'FAIL'} 50 bundles serving in "
                  f"{target['value']} s <= {TARGET_50_S:g} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
