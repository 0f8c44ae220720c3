"""Figures the benchmarks report: percentiles, ratios, and the machine they ran on."""

from __future__ import annotations

import math
import os
import platform
from typing import Any


def percentile(sorted_values: list[float], p: float) -> float | None:
    """Nearest-rank percentile of an ascending list; None for an empty one."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b`` to three decimals; None when either is missing or ``b`` is zero."""
    return round(a / b, 3) if a is not None and b else None


def machine() -> dict[str, Any]:
    """Where the figures came from: they mean little without it."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"cpus": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(),
            "loadavg_1m": round(load[0], 2) if load else None}
