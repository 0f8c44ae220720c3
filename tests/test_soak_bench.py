"""bench/soak.py still runs and still reports what it promises (a short run)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from harness import wait_for

pytestmark = pytest.mark.timeout(150)

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture
def soak_module() -> Iterator[ModuleType]:
    sys.path.insert(0, str(BENCH))
    try:
        import soak

        yield soak
    finally:
        sys.path.remove(str(BENCH))


def run_soak(*args: str, timeout: float = 120.0) -> tuple[int, str, str]:
    proc = subprocess.Popen([sys.executable, str(BENCH / "soak.py"), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # SIGTERM: the benchmark stops the supervisor it started before it exits.
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        raise AssertionError(f"soak.py ran over {timeout:g}s; stderr:\n{err.decode()}") from None
    return proc.returncode, out.decode(), err.decode()


def test_a_short_soak_reports_every_figure() -> None:
    code, out, err = run_soak("--swaps", "3", "--warmup", "1", "--sample-every", "2",
                              "--json-only")
    assert code in (0, 1), err
    result = json.loads(out)
    assert set(result) >= {
        "swaps", "warmup_swaps", "swaps_done", "swaps_timed_out", "aborted", "swap_ms",
        "clients", "requests", "failed_requests", "failures", "successful_incrs",
        "final_count", "count_carried", "supervisor", "zygote", "flat_within", "flat",
        "settled", "zombies", "workers_end", "exit_status", "leftover_processes",
        "duration_s", "trend", "pass", "machine",
    }, err
    for part in ("supervisor", "zygote"):
        for resource in ("fds", "rss_kib"):
            figures = result[part][resource]
            assert set(figures) == {"start", "end", "ratio"}
            assert isinstance(figures["start"], int) and figures["start"] > 0, (part, figures)
            assert isinstance(figures["end"], int) and figures["end"] > 0, (part, figures)
            assert isinstance(figures["ratio"], float), (part, figures)
    assert set(result["swap_ms"]) == {"p50", "p99", "max"}
    assert [s["swap"] for s in result["trend"]] == [1, 3, 4]
    # What must hold after any run, however short and however busy the machine:
    assert (result["swaps_done"], result["swaps_timed_out"]) == (3, 0), err
    assert result["failed_requests"] == 0, result["failures"]
    assert result["successful_incrs"] > 0
    assert result["count_carried"] is True, (result["final_count"], result["successful_incrs"])
    assert result["zombies"] == 0 and result["workers_end"] == 1, err
    assert result["exit_status"] == 0 and result["leftover_processes"] == 0, err


def test_the_zombie_count_sees_a_zombie(soak_module: ModuleType) -> None:
    """The figure can be non-zero: an unreaped child of ours is counted."""
    family = soak_module.family
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        def is_zombie() -> bool:
            with open(f"/proc/{child.pid}/stat") as handle:
                stat = handle.read()
            return stat[stat.rindex(")") + 2] == "Z"

        wait_for(is_zombie, 30.0, "the child to exit")
        assert family(os.getpid())[2] >= 1
    finally:
        child.wait(30)
    wait_for(lambda: family(os.getpid())[2] == 0, 10.0, "the reaped zombie to be gone")
