"""The supervisor-cost benchmarks (issue 12) still run and still report what
they promise: each at its smallest, its JSON checked."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.timeout(240)

BENCH = Path(__file__).resolve().parent.parent / "bench"


def run_bench(script: str, *args: str) -> dict[str, Any]:
    done = subprocess.run([sys.executable, str(BENCH / script), *args, "--json-only"],
                          capture_output=True, text=True, timeout=200)
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def test_cli_latency_times_the_commands_beside_their_peers() -> None:
    result = run_bench("cli_latency.py", "--runs", "2")
    commands = result["commands"]
    assert set(commands) == {"python -c pass", "python -c 'import zmq'", "hotsup status",
                             "hotsup status --json", "hotsup reload"}
    assert commands["hotsup status"]["wall_ms"]["p50"] > 0
    assert set(commands["hotsup reload"]["ratio_p50"]) == {"python -c pass",
                                                           "python -c 'import zmq'"}
    assert commands["hotsup reload"]["swap_duration_ms"]["p50"] > 0
    assert result["supervisor_exit_status"] == 0


def test_swap_breakdown_reports_each_step_of_a_swap() -> None:
    result = run_bench("swap_breakdown.py", "--reloads", "2")
    for level in ("info", "warning"):
        phases = result[level]["phases_ms_p50"]
        assert {"digest", "manifest", "spawn", "load", "pause_snapshot", "restore_start",
                "log", "hold"} <= set(phases), phases
        assert result[level]["supervisor_exit_status"] == 0
    assert result["floors"]["import_ms"] > 0 and result["floors"]["roundtrip_ms"] > 0


def test_idle_cost_and_many_bundles_measure_hotsup_and_the_peers() -> None:
    idle = run_bench("idle_cost.py", "--bundles", "3", "--seconds", "0.5")
    assert idle["hotsup"]["processes"] >= 3 + 2  # the workers, the supervisor, the zygote
    assert idle["hotsup"]["supervisor_cpu_pct"] is not None
    assert idle["sleep_peer"]["processes"] == idle["asyncio_peer"]["processes"] == 3
    assert idle["hotsup"]["worker_pss_kib_median"] > 0
    many = run_bench("many_bundles.py", "--counts", "3")
    entry = many["counts"]["3"]
    assert entry["hotsup"]["all_serving_s"] > 0 and entry["shell_peer"]["all_serving_s"] > 0
    assert entry["hotsup"]["supervisor_exit_status"] == 0


def test_state_handover_reports_the_cost_per_mb_and_per_million_objects() -> None:
    done = subprocess.run([sys.executable, str(BENCH / "state_handover.py"), "--mb", "2",
                           "--entries", "20000", "--swaps", "1", "--clients", "1"],
                          capture_output=True, text=True, timeout=200)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["hotsup"]["failed_requests"] == 0 and result["peer"]["floor_ms"] > 0
    for unit in ("per_mb", "per_million_objects"):
        assert {"hotsup_ms", "floor_ms", "ratio"} <= set(result[unit]), result[unit]
        assert result[unit]["run"]["hotsup"]["pause_ms_median"] > 0
    assert result["per_mb"]["run"]["state"] == {"mb": 2, "entries": 0}
    assert result["per_million_objects"]["run"]["state"] == {"mb": 0, "entries": 20000}
    assert result["empty_state"]["state"] == {"mb": 0, "entries": 0}
