"""bench/push_latency.py runs end to end at its smallest size: it cannot rot.
Figures depend on the machine, so only their shape is checked."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "push_latency.py"


@pytest.mark.timeout(180)
def test_the_push_bench_reports_every_scenario() -> None:
    done = subprocess.run([sys.executable, str(BENCH), "--runs", "1", "--no-rsync"],
                          capture_output=True, text=True, timeout=170)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert set(report["scenarios"]) == {"small", "5mb_one_changed", "5mb_all_changed"}
    for scenario in report["scenarios"].values():
        assert scenario["push"]["save_to_serving_ms"]["runs"] == 1
        assert scenario["push"]["command_ms"]["p50"] > 0
        assert scenario["watch"]["save_to_serving_ms"]["p50"] > 0
