"""The final snapshot at ``stop`` and at shut-down (issue 11, findings 6 and 7):
when it cannot be taken or written, the log, status and the exit code say so;
the state is never dropped silently. Real supervisors."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
from harness import Hotsup, counter_source, free_port, request, write_bundle
from hotsup.supervisor.checkpoint import SUFFIX

pytestmark = pytest.mark.timeout(90)

MakeHotsup = Callable[..., Hotsup]


def breakable(sup: Hotsup) -> tuple[int, Path]:
    """A counter whose snapshot() fails once the file returned exists (outside
    the bundle, so creating it changes nothing the watcher hashes); its port."""
    flag = sup.root / "break-snapshots"
    port = free_port()
    snapshot = f"assert not __import__('os').path.exists({str(flag)!r}), 'snapshot broke'"
    write_bundle(sup.bundles / "counter", counter_source("v0", snapshot=snapshot), port)
    sup.start_serving("counter")
    for n in (1, 2, 3):
        assert request(port).startswith(f"count={n} generation=1")
    return port, flag


def test_a_stop_whose_final_snapshot_fails_says_so(hotsup: MakeHotsup) -> None:
    sup = hotsup()
    port, flag = breakable(sup)
    flag.touch()
    done = sup.cli("stop", "counter")
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert re.search(r"counter: warning: the final snapshot of counter@1 was not taken "
                     r"\(AssertionError: snapshot broke\): its state "
                     r"since it started is lost; the next start begins from no state at all",
                     done.stderr), done.stderr
    now = sup.status()["counter"]
    assert now["state"] == "stopped"
    assert "the final snapshot of counter@1 was not taken" in str(now["last_error"]), now
    assert re.search(r"ERROR +hotsup: counter: the final snapshot of counter@1 was not taken",
                     sup.log())
    flag.unlink()
    done = sup.cli("run", "counter")
    assert done.returncode == 0, done.stderr
    assert "(without state: the final snapshot of counter@1 was not taken)" in done.stdout, \
        done.stdout
    assert request(port).startswith("count=1 generation=2"), "it says what it started from"
    assert sup.stop() == 0


def test_a_shutdown_whose_final_snapshot_fails_exits_non_zero(hotsup: MakeHotsup) -> None:
    sup = hotsup()
    _, flag = breakable(sup)
    flag.touch()
    assert sup.stop() == 1
    assert re.search(r"ERROR +hotsup: hotsup stopped, but state was not kept: counter: the "
                     r"final snapshot of counter@1 was not taken", sup.log()), sup.log()[-2000:]
    assert "INFO    hotsup: hotsup stopped\n" not in sup.log()


def test_a_shutdown_whose_checkpoint_cannot_be_written_exits_non_zero(
        hotsup: MakeHotsup) -> None:
    sup = hotsup()
    port, _ = breakable(sup)
    # A directory where the checkpoint goes: the rename over it fails.
    target = sup.root / ".hotsup" / "checkpoints" / f"counter{SUFFIX}"
    target.mkdir(parents=True)
    assert sup.stop() == 1
    assert re.search(rf"counter@1: checkpoint not written: checkpoint {re.escape(str(target))}"
                     r": cannot write", sup.log()), sup.log()[-2000:]
    assert re.search(r"hotsup stopped, but state was not kept: counter: checkpoint not "
                     r"written", sup.log())
    target.rmdir()
    sup.start()  # what the next start resumes from: nothing, as said
    sup.wait_log(r"counter@2: serving")
    assert request(port).startswith("count=1 generation=2")
    assert sup.stop() == 0
