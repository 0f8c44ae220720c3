"""Restart intensity (supervisor/intensity.py): a pure policy, driven with a fake clock."""

from __future__ import annotations

import pytest
from hotsup.supervisor.intensity import GiveUp, RestartIntensity

pytestmark = pytest.mark.timeout(5)


def test_the_backoff_doubles_up_to_its_most() -> None:
    policy = RestartIntensity(max_restarts=10, window=60.0, first=0.1, most=0.5)
    assert [policy.record(float(t)) for t in range(5)] == [0.1, 0.2, 0.4, 0.5, 0.5]


def test_more_than_max_restarts_in_the_window_gives_up_and_starts_afresh() -> None:
    policy = RestartIntensity(max_restarts=2, window=10.0)
    assert policy.record(0.0) == 0.1
    assert policy.record(1.0) == 0.2
    assert policy.record(2.0) == GiveUp(failures=3, window=10.0)
    assert policy.record(3.0) == 0.1, "after giving up, the history is clear"


def test_deaths_older_than_the_window_are_forgotten() -> None:
    policy = RestartIntensity(max_restarts=2, window=10.0)
    policy.record(0.0)
    policy.record(1.0)
    assert policy.record(10.5) == 0.2, "the death at 0.0 left the window"
    assert policy.record(10.6) == GiveUp(failures=3, window=10.0)


def test_reset_forgets_every_death() -> None:
    policy = RestartIntensity(max_restarts=1, window=60.0)
    policy.record(0.0)
    policy.reset()
    assert policy.record(1.0) == 0.1
