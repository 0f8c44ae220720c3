from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from harness import Hotsup

#: What a supervisor logs when its swap loop met a bug: fails any test.
INTERNAL_ERROR = "internal error in the swap loop"


@pytest.fixture
def hotsup(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Callable[..., Hotsup]]:
    """Make (not start) a supervisor over a config in tmp_path; everything it
    started is gone after the test, and its log is printed if the test failed."""
    made: list[Hotsup] = []

    def make(config_extra: str = "") -> Hotsup:
        sup = Hotsup(tmp_path, config_extra)
        made.append(sup)
        return sup

    yield make
    broken: list[str] = []
    for sup in made:
        failed = getattr(request.node, "rep_call", None)
        sup.kill_everything()
        log = sup.log() if sup.log_path.exists() else ""
        if INTERNAL_ERROR in log:
            broken.append(str(sup.log_path))
        if failed is None or failed.failed or INTERNAL_ERROR in log:
            sys.stderr.write(f"\n----- hotsup log ({sup.log_path}) -----\n")
            sys.stderr.write(log or "(none)\n")
    if broken:  # an illegal move must not hide behind a timeout or a lenient assertion
        pytest.fail(f"the supervisor logged {INTERNAL_ERROR!r} ({', '.join(broken)})")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> object:
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report
