"""Bundles coming and going, broken bundles, and the supervisor's own end."""

from __future__ import annotations

import shutil
import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
from harness import (
    Hotsup,
    Load,
    counter_source,
    free_port,
    port_open,
    request,
    save,
    serve_counter,
    session_pids,
    wait_for,
    write_bundle,
)

pytestmark = pytest.mark.timeout(120)

MakeHotsup = Callable[..., Hotsup]


def test_drop_in_bundle_is_served_within_two_seconds_and_removal_closes_it(
    hotsup: MakeHotsup,
) -> None:
    sup = hotsup()
    first = free_port()
    write_bundle(sup.bundles / "first", counter_source("first"), first)
    sup.start_serving("first")

    second = free_port()
    staged = write_bundle(sup.root / "staging" / "second", counter_source("second"), second)
    dropped = time.monotonic()
    shutil.copytree(staged, sup.bundles / "second")
    wait_for(lambda: port_open(second) and request(second).endswith("tag=second"), 5.0,
             "the dropped-in bundle to answer")
    assert time.monotonic() - dropped < 2.0, "served within 2 s of the drop"

    with Load(first, clients=2) as load:
        load.wait_reply(lambda r: True)
        shutil.rmtree(sup.bundles / "second")
        wait_for(lambda: not port_open(second), 10.0, "the removed bundle's port to close")
        seen = time.monotonic()
        load.wait_reply(lambda r: True, after=seen)  # the other bundle never noticed
    load.assert_consistent()
    assert "second@1: retired" in sup.log()
    assert sup.stop() == 0


def test_a_broken_bundle_does_not_stop_the_others(hotsup: MakeHotsup) -> None:
    sup = hotsup()
    good = free_port()
    write_bundle(sup.bundles / "good", counter_source("g0"), good, module="good")
    write_bundle(sup.bundles / "syntax", counter_source("s", tail="\ndef (:\n"), free_port(),
                 module="syntax")
    garbage = sup.bundles / "garbage"
    garbage.mkdir()
    (garbage / "bundle.toml").write_text("entry = [this is not toml\n")
    sup.start()

    sup.wait_log(r"good@1: serving")
    sup.wait_log(r"syntax: syntax@1 did not start: .*SyntaxError")
    line = sup.wait_log(r"garbage: cannot load the bundle: .*")
    assert "garbage/bundle.toml" in line and "not valid TOML" in line, line
    assert request(good).endswith("tag=g0")

    # a drop-in that wants a port another bundle holds is refused, clearly
    staged = write_bundle(sup.root / "staging" / "clash", counter_source("c"), good, "clash")
    shutil.copytree(staged, sup.bundles / "clash")
    line = sup.wait_log(r"clash: .*is already used by bundle 'good'")
    assert f"clash/bundle.toml: sockets.main.bind: 127.0.0.1:{good}" in line, line
    assert request(good).endswith("tag=g0")

    # the good one still swaps
    save(sup.bundles / "good" / "good.py", counter_source("g1"))
    wait_for(lambda: request(good).endswith("tag=g1"), 10.0, "the good bundle to swap")

    # and fixing a broken one starts it
    port = free_port()
    write_bundle(sup.bundles / "syntax", counter_source("s1"), port, module="syntax")
    wait_for(lambda: port_open(port) and request(port).endswith("tag=s1"), 10.0,
             "the fixed bundle to start")
    assert sup.stop() == 0


def test_sigterm_drains_and_leaves_no_process(hotsup: MakeHotsup) -> None:
    sup = hotsup()
    port = serve_counter(sup)
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(request, port, "slow", 10.0)
        sup.wait_log(r"counter@1: slow request accepted")
        assert len(session_pids(sup.pid)) >= 3  # supervisor, zygote, worker
        sup.signal(signal.SIGTERM)
        assert slow.result(timeout=10).startswith("count=0"), "the request in flight finished"
    assert sup.stop(timeout=60) == 0
    assert session_pids(sup.pid) == []
    assert not port_open(port)
    assert "hotsup stopped" in sup.log()


def test_sigkill_of_the_supervisor_leaves_no_orphan(hotsup: MakeHotsup) -> None:
    """Not even a worker whose loop is blocked, nor a helper process it forked."""
    sup = hotsup()
    port = free_port()
    helper = sup.root / "helper.pid"
    start = (f"import subprocess, time; h = subprocess.Popen(['sleep', '60']); "
             f"open({str(helper)!r}, 'w').write(str(h.pid)); "
             f"asyncio.get_running_loop().call_later(0.2, time.sleep, 30)")
    write_bundle(sup.bundles / "counter", counter_source("v0", start=start), port)
    sup.start_serving("counter")
    helper_pid = int(str(wait_for(lambda: helper.exists() and helper.read_text(), 5.0)))
    wait_for(lambda: not answers(port), 10.0, "the worker's loop to block")
    assert helper_pid in session_pids(sup.pid)
    sup.signal(signal.SIGKILL)
    assert sup.proc is not None and sup.proc.wait(10) == -signal.SIGKILL
    wait_for(lambda: session_pids(sup.pid) == [], 2.0, "the zygote, workers and helpers to exit")
    stale = sup.cli("status", timeout=20)
    assert stale.returncode == 3 and "left by a supervisor that died" in stale.stderr

    # and the next start comes up cleanly on the same run_dir and port (with
    # a bundle that does not block its loop this time)
    write_bundle(sup.bundles / "counter", counter_source("v0"), port)
    again = Hotsup(sup.root)
    again.start()
    try:
        again.wait_log(r"counter@1: serving", count=2)
        assert request(port).startswith("count=1 generation=1")
        assert again.cli("status").returncode == 0, "the stale socket was replaced"
        assert again.stop() == 0
    finally:
        again.kill_everything()


def answers(port: int) -> bool:
    try:
        request(port, "get", timeout=0.3)
    except OSError:
        return False
    return True


def test_a_second_supervisor_on_the_same_run_dir_refuses(hotsup: MakeHotsup) -> None:
    sup = hotsup()
    write_bundle(sup.bundles / "counter", counter_source("v0"), free_port())
    sup.start_serving("counter")
    second = Hotsup(sup.root)
    second.log_path = sup.root / "second.log"
    second.start()
    try:
        assert second.proc is not None and second.proc.wait(30) == 2
        assert "already running" in second.log()
    finally:
        second.kill_everything()
    assert sup.stop() == 0


def test_check_and_start_refuse_a_bad_config(hotsup: MakeHotsup) -> None:
    import subprocess
    import sys

    sup = hotsup("[defaults]\nstart_timeout = \"soon\"\nbogus = 1\n")
    for command in ("check", "start"):
        result = subprocess.run(
            [sys.executable, "-m", "hotsup.supervisor.cli", command, str(sup.config)],
            capture_output=True, text=True, timeout=30,
        )
        assert result.returncode != 0
        assert "config.toml: defaults.start_timeout: expected a number" in result.stderr
        assert "config.toml: defaults.bogus: unknown key" in result.stderr
