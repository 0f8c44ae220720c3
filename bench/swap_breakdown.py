"""Where a ``hotsup reload`` swap's time goes, step by step, beside the floors
of the same steps measured apart in the same run.

Run with the interpreter that has hotsup installed (``python
bench/swap_breakdown.py [--reloads 30] [--json-only]``). A supervisor serves
one counter bundle (``fleet``), idle; the bench runs ``hotsup reload
counter-0 --json`` ``--reloads`` times, and after each reads the swap's
``last_swap_phases`` from status: milliseconds of each step the runner made,
in order (``swap.Phases``):

  digest          hash the bundle's files
  manifest        read and check bundle.toml
  spawn           the zygote's spare takes the spawn (fds over SCM_RIGHTS), the pid back
  load            the worker imports the entry and constructs it (LOADED)
  pause_snapshot  N stops accepting, waits for in-flight, snapshot(), pickled, sent
  restore_start   N+1 unpickles, restore(), start(), answers (READY)
  log             the "swapped" record (formatted, written)
  hold            N held for probation (a request to it)
  keep_state      the snapshot kept: the checkpoint written to run_dir (atomically)

and the command's own figures: wall time, the report's ``duration_ms`` (the
supervisor's handling of the event), and what is left (process start, imports,
control round trip). Run at ``log_level = "info"`` (the default) and again at
``"warning"``, each in a supervisor of its own: the difference is logging.

The floors, measured apart in the same run: ``import_ms``, a fresh interpreter
importing the bundle's module (``swap_latency``'s counter) from source, timed
inside it; ``roundtrip_ms``, one request and reply over a SOCK_SEQPACKET
socketpair to a forked process (what each request to a worker costs at
least); ``python_start_ms``, ``python -c pass``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from cli_latency import figures, hotsup_command, timed
from fleet import Fleet, bench_env
from stats import machine
from swap_latency import BUNDLE_MODULE, write_text


def median(values: list[float]) -> float | None:
    return figures(values)["p50"]


def run_reloads(reloads: int, log_level: str) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="hotsup-breakdown-"))
    try:
        with Fleet(work, 1, log_level=log_level) as fleet:
            fleet.start()
            fleet.wait_all_serving()
            command = [*hotsup_command(), "reload", "counter-0", "--json", "-c",
                       str(fleet.config)]
            timed(command, work)  # warm-up: bytecode written, the zygote's spare forked
            walls: list[float] = []
            durations: list[float] = []
            phases: dict[str, list[float]] = {}
            for _ in range(reloads):
                wall, out = timed(command, work)
                walls.append(wall)
                durations.append(float(json.loads(out)["duration_ms"]))
                [bundle] = fleet.status()["bundles"]
                for step, ms in bundle["last_swap_phases"].items():
                    phases.setdefault(step, []).append(ms)
            exit_status = fleet.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    steps = {step: median(values) for step, values in phases.items()}
    wall_p50 = median(walls)
    duration_p50 = median(durations)
    return {"log_level": log_level, "reloads": reloads, "phases_ms_p50": steps,
            "phases_sum_ms": round(sum(v for v in steps.values() if v is not None), 2),
            "duration_ms": figures(durations), "wall_ms": figures(walls),
            "outside_supervisor_ms_p50": round(wall_p50 - duration_p50, 1)
            if wall_p50 is not None and duration_p50 is not None else None,
            "supervisor_exit_status": exit_status}


def import_floor(runs: int) -> float | None:
    """A fresh interpreter importing the counter module from source (ms, inside it)."""
    work = Path(tempfile.mkdtemp(prefix="hotsup-import-"))
    try:
        write_text(work / "counter.py", BUNDLE_MODULE.format(tag="v0"))
        code = ("import sys, time; sys.dont_write_bytecode = True; import asyncio; "
                "t = time.perf_counter(); import counter; counter.Counter(None); "
                "print((time.perf_counter() - t) * 1000)")
        values = []
        for _ in range(runs):
            done = subprocess.run([sys.executable, "-c", code], cwd=work, capture_output=True,
                                  text=True, env=bench_env(), check=True)
            values.append(float(done.stdout))
        return median(values)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def roundtrip_floor(count: int = 2000) -> float:
    """One request and reply over a SOCK_SEQPACKET socketpair to a forked echo (ms)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the echo child
        ours.close()
        while data := theirs.recv(65536):
            theirs.send(data)
        os._exit(0)
    theirs.close()
    message = json.dumps({"op": "ping", "id": 1}).encode()
    began = time.perf_counter()
    for _ in range(count):
        ours.send(message)
        ours.recv(65536)
    took = (time.perf_counter() - began) * 1000 / count
    ours.close()
    os.waitpid(pid, 0)
    return round(took, 3)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reloads", type=int, default=30)
    parser.add_argument("--json-only", action="store_true")
    args = parser.parse_args(argv)
    work = Path(tempfile.gettempdir())
    start = [timed([sys.executable, "-c", "pass"], work)[0] for _ in range(10)]
    result: dict[str, Any] = {
        "info": run_reloads(args.reloads, "info"),
        "warning": run_reloads(args.reloads, "warning"),
        "floors": {"import_ms": import_floor(10), "roundtrip_ms": roundtrip_floor(),
                   "python_start_ms": median(start)},
        "machine": machine(),
    }
    info, warning = result["info"], result["warning"]
    result["logging_ms_p50"] = round(info["duration_ms"]["p50"] - warning["duration_ms"]["p50"],
                                     2)
    print(json.dumps(result))
    if not args.json_only:
        for name in ("info", "warning"):
            r = result[name]
            steps = "  ".join(f"{k} {v}" for k, v in r["phases_ms_p50"].items())
            print(f"log_level {name}: wall p50 {r['wall_ms']['p50']} ms, duration p50 "
                  f"{r['duration_ms']['p50']} ms, outside {r['outside_supervisor_ms_p50']} ms\n"
                  f"  {steps}", file=sys.stderr)
        floors = result["floors"]
        print(f"floors: import {floors['import_ms']} ms, round trip {floors['roundtrip_ms']} ms, "
              f"python start {floors['python_start_ms']} ms; logging "
              f"{result['logging_ms_p50']} ms", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
