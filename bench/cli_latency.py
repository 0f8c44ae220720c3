"""The command line's own cost: ``hotsup status`` and ``hotsup reload`` against a
running supervisor, wall time, beside an interpreter doing nothing.

Run with the interpreter that has hotsup installed (``python
bench/cli_latency.py [--runs N] [--json-only]``). A supervisor serves one
counter bundle (``fleet``); then, in rounds that rotate between them so a
machine that gets busier touches them all alike, the bench runs each command to
its end and times it (fork to exit, ``time.perf_counter``):

* ``python -c pass`` and ``python -c "import zmq"``: the peers, the floor any
  Python command line pays (the second, what talking ZeroMQ costs at least);
* ``hotsup status``, ``hotsup status --json``, ``hotsup reload counter-0``
  (a swap each: its ``duration_ms``, the supervisor's part, is reported too).

The commands run with bytecode caching on, as a user's do (``fleet.bench_env``).
One JSON object on stdout: per command p50/p90/min/max in ms and the ratio of
its p50 to each peer's; a table on stderr. Target (issue 12): status and
reload <= 100 ms p50.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fleet import Fleet, bench_env
from stats import machine, percentile, ratio

TARGET_MS = 100.0


def hotsup_command() -> list[str]:
    """What a user runs: the console script beside this interpreter, if installed."""
    script = Path(sys.executable).with_name("hotsup")
    return [str(script)] if script.exists() else [sys.executable, "-m", "hotsup.supervisor.cli"]


def timed(argv: list[str], cwd: Path) -> tuple[float, str]:
    """Wall milliseconds of ``argv`` run to its end, and its stdout."""
    began = time.perf_counter()
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, env=bench_env(),
                          timeout=60)
    took = (time.perf_counter() - began) * 1000
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.strip()}")
    return took, done.stdout


def figures(values: list[float]) -> dict[str, float | None]:
    ordered = sorted(values)

    def at(p: float) -> float | None:
        value = percentile(ordered, p)
        return round(value, 1) if value is not None else None

    return {"p50": at(50), "p90": at(90), "min": at(0), "max": at(100)}


def measure(runs: int) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="hotsup-cli-"))
    try:
        with Fleet(work, 1) as fleet:
            fleet.start()
            fleet.wait_all_serving()
            hotsup = [*hotsup_command(), "-c", str(fleet.config)]
            commands = {
                "python -c pass": [sys.executable, "-c", "pass"],
                "python -c 'import zmq'": [sys.executable, "-c", "import zmq"],
                "hotsup status": [*hotsup, "status"],
                "hotsup status --json": [*hotsup, "status", "--json"],
                "hotsup reload": [*hotsup, "reload", "counter-0", "--json"],
            }
            for argv in commands.values():  # warm-up: bytecode written, pages cached
                timed(argv, work)
            walls: dict[str, list[float]] = {name: [] for name in commands}
            swap_ms: list[float] = []
            for _ in range(runs):
                for name, argv in commands.items():
                    took, out = timed(argv, work)
                    walls[name].append(took)
                    if name == "hotsup reload":
                        swap_ms.append(float(json.loads(out)["duration_ms"]))
            exit_status = fleet.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result: dict[str, Any] = {"runs": runs, "commands": {}}
    peers = ("python -c pass", "python -c 'import zmq'")
    for name, values in walls.items():
        entry: dict[str, Any] = {"wall_ms": figures(values)}
        if name not in peers:
            p50 = entry["wall_ms"]["p50"]
            entry["ratio_p50"] = {peer: ratio(p50, figures(walls[peer])["p50"])
                                  for peer in peers}
        result["commands"][name] = entry
    result["commands"]["hotsup reload"]["swap_duration_ms"] = figures(swap_ms)
    result["targets"] = {
        name: {"value": result["commands"][name]["wall_ms"]["p50"], "bound": TARGET_MS,
               "pass": result["commands"][name]["wall_ms"]["p50"] <= TARGET_MS}
        for name in ("hotsup status", "hotsup reload")}
    result["supervisor_exit_status"] = exit_status
    result["machine"] = machine()
    return result


def table(result: dict[str, Any]) -> str:
    rows = [f"{'command':26}{'p50':>8}{'p90':>8}{'min':>8}{'max':>8}   p50 / pass, / zmq"]
    for name, entry in result["commands"].items():
        wall = entry["wall_ms"]
        ratios = entry.get("ratio_p50", {})
        rows.append(f"{name:26}" + "".join(f"{wall[k]:>8}" for k in ("p50", "p90", "min", "max"))
                    + ("   " + " ".join(str(v) for v in ratios.values()) if ratios else ""))
    for name, target in result["targets"].items():
        rows.append(f"{'PASS' if target['pass'] else 'FAIL'} {name} p50 {target['value']} ms "
                    f"<= {target['bound']:g} ms")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20, help="rounds (default 20)")
    parser.add_argument("--json-only", action="store_true", help="no table on stderr")
    args = parser.parse_args(argv)
    result = measure(args.runs)
    print(json.dumps(result))
    if not args.json_only:
        print(table(result), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
