"""The ASGI benchmark suite runs, end to end, at a tiny size: it cannot rot.

One real run of ``bench/asgi_swap.py`` (hotsup and every peer that is
installed, the slow-import app, 2 hotsup swaps, 1 reload per peer) and a check
of the JSON it prints. Figures that depend on timing are only checked for
shape; what does not (every swap seen, no failed request, the counter carried
by hotsup and lost by the peers) is checked for its value.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

SUITE = Path(__file__).resolve().parents[1] / "bench" / "asgi_swap.py"
PHASE_KEYS = {"seconds", "ok", "ok_by_mode", "throughput_rps", "failed", "outcomes",
              "keepalive_retries", "keepalive_server_closes"}
SWAP_KEYS = PHASE_KEYS | {"swaps", "swaps_timed_out", "latency_ms", "state", "per_swap"}
OUTCOMES = {"refused", "reset", "timeout", "non_200", "wrong_body", "other"}


@pytest.fixture(scope="module")
def report() -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, str(SUITE), "--apps", "slow_import", "--swaps", "2", "--peer-swaps", "1",
         "--steady-seconds", "0.6", "--steady-rounds", "2", "--short-clients", "2",
         "--keepalive-clients", "2", "--json-only"],
        capture_output=True, text=True, timeout=90,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stderr}\n{proc.stdout}"
    return dict(json.loads(proc.stdout))


def _phase(phase: dict[str, Any], keys: set[str]) -> None:
    assert keys <= set(phase), keys - set(phase)
    assert phase["ok"] > 0 and phase["throughput_rps"] > 0
    assert set(phase["failed"]) == {"short_lived", "keep_alive", "total"}
    for counts in phase["outcomes"].values():
        assert set(counts) == OUTCOMES
    assert set(phase["keepalive_retries"]) == {"closed_idle", "closed_before_response"}


@pytest.mark.timeout(120)
def test_the_suite_reports_every_contender_and_target(report: dict[str, Any]) -> None:
    assert report["benchmark"] == "asgi_swap"
    assert set(report["apps"]) == {"slow_import"}
    section = report["apps"]["slow_import"]
    results = section["contenders"]
    assert set(results) == {"hotsup", "uvicorn_reload", "gunicorn_hup", "uvicorn"}
    if importlib.util.find_spec("gunicorn") is None:
        assert "not installed" in results.pop("gunicorn_hup")["skipped"]
    for name, result in results.items():
        assert "error" not in result, (name, result["error"])
        assert result["start_s"] > 0
        _phase(result["steady"], PHASE_KEYS | {"rounds_rps"})
        assert len(result["steady"]["rounds_rps"]) == 2
        if name != "uvicorn":
            _phase(result["swapping"], SWAP_KEYS)
            assert result["swapping"]["swaps_timed_out"] == 0, (name, result["swapping"])
    assert "swapping" not in results["uvicorn"]

    hotsup = results["hotsup"]["swapping"]
    assert hotsup["swaps"] == 2
    assert [s["swap"] for s in hotsup["per_swap"]] == [1, 2]
    assert all(s["latency_ms"] > 0 for s in hotsup["per_swap"])
    assert hotsup["state"] == {"carried": 2, "lost": 0, "duplicate_counts": 0, "every_swap": True}
    for phase in (results["hotsup"]["steady"], hotsup):
        assert phase["failed"]["total"] == 0, phase["outcomes"]
    # The peers restart a process: their counter starts again, and the bench sees it.
    for name in results.keys() - {"hotsup", "uvicorn"}:
        assert results[name]["swapping"]["state"]["lost"] == 1, name

    compared = section["compare"]
    assert compared["steady_rps"]["hotsup"] == results["hotsup"]["steady"]["throughput_rps"]
    assert compared["steady_rps"]["uvicorn"]["ratio"] > 0
    assert compared["steady_rps"]["uvicorn"]["paired_ratio"] > 0
    assert compared["swap_p50_ms"]["uvicorn_reload"]["ratio"] > 0
    targets = {row["target"]: row for row in section["targets"]}
    assert len(targets) == 8
    assert all(set(row) == {"target", "value", "bound", "pass"} for row in targets.values())
    assert targets["state carried across every swap"]["pass"] is True
    assert targets["0 failed requests, short-lived"]["pass"] is True
    assert targets["0 failed requests, keep-alive"]["pass"] is True
    against_gunicorn = targets.pop("swap p50 / gunicorn + HUP's")
    if "gunicorn_hup" in results:
        assert against_gunicorn["value"] == compared["swap_p50_ms"]["gunicorn_hup"]["ratio"]
        assert isinstance(against_gunicorn["pass"], bool)
    else:  # not measured: neither passed nor failed
        assert against_gunicorn["value"] is None and against_gunicorn["pass"] is None
    assert all(isinstance(row["pass"], bool) for row in targets.values())
