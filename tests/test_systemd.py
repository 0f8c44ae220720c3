"""systemd integration: socket activation (``bind = "systemd:NAME"``) under a real
``systemd-socket-activate``, and sd_notify to a NOTIFY_SOCKET the test binds.

systemd-socket-activate binds the address, waits for the first connection,
then execs ``hotsup start`` with LISTEN_FDS/LISTEN_FDNAMES/LISTEN_PID set:
exactly what systemd does with a .socket unit, so what passes here passes
under systemd.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from harness import DEADLINE, Hotsup, Load, counter_source, free_port, request, save, wait_for
from hotsup.supervisor.config import BundleSource, BundleSpec, SocketSpec, Timing, systemd_problems
from hotsup.supervisor.notify import Notifier, summarize
from hotsup.supervisor.sockets import systemd_sockets

pytestmark = pytest.mark.timeout(120)

MakeHotsup = Callable[..., Hotsup]
ACTIVATE = shutil.which("systemd-socket-activate")
needs_activate = pytest.mark.skipif(
    ACTIVATE is None, reason="systemd-socket-activate is not installed (Debian package "
    "systemd; .ci/run installs it)")


def hotsup_command(config: Path) -> list[str]:
    """``.venv/bin/hotsup start`` (the console script beside this interpreter), or
    ``python -m`` where there is none."""
    script = Path(sys.executable).parent / "hotsup"
    if script.exists():
        return [str(script), "start", str(config)]
    return [sys.executable, "-m", "hotsup.supervisor.cli", "start", str(config)]


class Activated(Hotsup):
    """``systemd-socket-activate --fdname=NAME -l 127.0.0.1:PORT hotsup start``."""

    fdname = "main"
    port = 0

    def start(self, env: dict[str, str] | None = None) -> Activated:
        """Like systemd, systemd-socket-activate gives its child only a few
        variables (PATH, HOME, TERM, LISTEN_*): what ``env`` adds to ours
        goes with -E."""
        assert ACTIVATE is not None
        extra = [f"-E{key}={value}" for key, value in (env or {}).items()
                 if os.environ.get(key) != value]
        command = [ACTIVATE, f"--fdname={self.fdname}", "-l", f"127.0.0.1:{self.port}",
                   *extra, *hotsup_command(self.config)]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(command, cwd=self.root, stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        return self


def activated(hotsup: MakeHotsup, port: int, fdname: str = "main") -> Activated:
    """An ``Activated`` in the ``hotsup`` fixture's care (cleanup, log on failure)."""
    sup = hotsup()
    # The fixture made a plain Hotsup over tmp_path; this one replaces it there.
    sup.__class__ = Activated
    assert isinstance(sup, Activated)
    sup.port, sup.fdname = port, fdname
    return sup


def write_counter(sup: Hotsup, name: str, tag: str, bind: str, start: str = "pass") -> Path:
    directory = sup.bundles / name
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "bundle.toml").write_text(
        f'entry = "counter:Counter"\nprobation = 0\n[sockets.main]\nbind = "{bind}"\n')
    (directory / "counter.py").write_text(counter_source(tag, start=start))
    return directory


@needs_activate
def test_a_swap_under_load_on_a_socket_systemd_passed_refuses_nothing(
        hotsup: MakeHotsup) -> None:
    port = free_port()
    sup = activated(hotsup, port)
    bundle = write_counter(sup, "counter", "v0", "systemd:main")
    sup.start()
    # systemd-socket-activate listens now and starts hotsup at the first
    # connection: that connection waits in the backlog and is served.
    wait_for(lambda: _listening(port), what="systemd-socket-activate listening")
    with Load(port, clients=4) as load:
        load.wait_reply(lambda r: r.tag == "v0", timeout=30)
        sup.wait_log(r"counter: socket main listening on systemd:main \(127\.0\.0\.1:\d+\)")
        for i in range(1, 4):
            written = time.monotonic()
            save(bundle / "counter.py", counter_source(f"v{i}"))
            load.wait_reply(lambda r, tag=f"v{i}": r.tag == tag, after=written, timeout=30)
    load.assert_consistent()
    assert len(load.replies) > 100, len(load.replies)
    log = sup.log()
    assert "systemd passed socket 'main': 127.0.0.1:" in log
    assert log.count("swapped from") == 3, log
    # The supervisor bound nothing itself: the port is the one systemd passed.
    assert f"listening on 127.0.0.1:{port}" not in log.split("Execing")[-1]
    assert sup.stop() == 0
    assert not sup.leftovers()


@needs_activate
def test_a_systemd_socket_outlives_its_bundle(hotsup: MakeHotsup) -> None:
    """Removed, the bundle releases systemd's socket but the supervisor keeps
    it (systemd passes it only at start): a bundle added later serves on it,
    and the connection that waited meanwhile is served."""
    port = free_port()
    sup = activated(hotsup, port)
    bundle = write_counter(sup, "counter", "v0", "systemd:main")
    sup.start()
    wait_for(lambda: _listening(port), what="systemd-socket-activate listening")
    assert request(port, "get").startswith("count=0")
    moved = sup.root / "counter.away"
    bundle.rename(moved)
    sup.wait_log(r"counter: released systemd:main")
    sup.wait_log(r"counter@1: retired")
    with socket.create_connection(("127.0.0.1", port), timeout=30) as waiting:
        waiting.sendall(b"get\n")  # queued in the backlog: nobody accepts now
        moved.rename(sup.bundles / "again")
        sup.wait_log(r"again@1: serving")
        assert waiting.recv(100).startswith(b"count=0 generation=1")
    assert sup.stop() == 0


@needs_activate
def test_the_activation_variables_do_not_reach_the_bundles(hotsup: MakeHotsup) -> None:
    port = free_port()
    sup = activated(hotsup, port)
    directory = write_counter(sup, "counter", "v0", "systemd:main")
    # The bundle reports what it sees of the activation environment.
    source = counter_source("v0").replace(
        "        self.count = 0",
        "        self.count = 0\n        import os\n"
        "        print('env:', sorted(k for k in os.environ if k.startswith(('LISTEN_', "
        "'NOTIFY_', 'WATCHDOG_'))), flush=True)")
    (directory / "counter.py").write_text(source)
    sup.start(env={**os.environ, "NOTIFY_SOCKET": str(sup.root / "nobody"),
                   "WATCHDOG_USEC": "60000000"})
    wait_for(lambda: _listening(port), what="systemd-socket-activate listening")
    assert request(port, "get").startswith("count=0")
    assert "env: []" in sup.wait_log(r"env: \[.*\]")
    assert "sd_notify to" in sup.log()  # NOTIFY_SOCKET did reach the supervisor
    assert sup.stop() == 0


@needs_activate
def test_a_name_systemd_did_not_pass_is_an_error_naming_the_bundle_and_key(
        hotsup: MakeHotsup) -> None:
    port = free_port()
    sup = activated(hotsup, port, fdname="web")
    write_counter(sup, "good", "v0", "systemd:web")
    bad = write_counter(sup, "bad", "v0", "systemd:api")
    sup.start()
    wait_for(lambda: _listening(port), what="systemd-socket-activate listening")
    assert request(port, "get").startswith("count=0")  # the other bundle serves on
    line = sup.wait_log(r".*systemd passed no socket of that name.*")
    assert f"{bad / 'bundle.toml'}: sockets.main.bind: systemd:api" in line
    assert "(it passed: web)" in line
    status = sup.cli("status", "--json")
    assert '"failed"' in status.stdout, status.stdout
    assert sup.stop() == 0


def test_without_socket_activation_a_systemd_bind_fails_that_bundle(
        hotsup: MakeHotsup) -> None:
    sup = hotsup()
    port = free_port()
    write_counter(sup, "plain", "v0", f"127.0.0.1:{port}")
    bad = write_counter(sup, "bad", "v0", "systemd:main")
    sup.start()
    sup.wait_log(r"plain@1: serving")
    line = sup.wait_log(r".*systemd passed no sockets.*")
    assert f"{bad / 'bundle.toml'}: sockets.main.bind: systemd:main" in line
    assert "not started by socket activation" in line
    assert request(port, "get").startswith("count=0")
    assert sup.stop() == 0


def test_check_compares_systemd_names_with_listen_fdnames_when_set(tmp_path: Path) -> None:
    sup = Hotsup(tmp_path)
    write_counter(sup, "web", "v0", "systemd:web")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
    plain = sup.cli("check", str(sup.config), env=env)
    assert plain.returncode == 0, plain.stdout + plain.stderr  # nothing to compare with
    wrong = sup.cli("check", str(sup.config),
                    env={**env, "LISTEN_FDS": "2", "LISTEN_FDNAMES": "api:admin"})
    assert wrong.returncode == 1
    assert (f"{tmp_path / 'bundles' / 'web' / 'bundle.toml'}: sockets.main.bind: systemd "
            f"passed no socket named 'web' (LISTEN_FDNAMES: api:admin)") in wrong.stderr
    right = sup.cli("check", str(sup.config),
                    env={**env, "LISTEN_FDS": "1", "LISTEN_FDNAMES": "web"})
    assert right.returncode == 0, right.stderr


def test_a_bad_systemd_name_is_a_config_error(tmp_path: Path) -> None:
    sup = Hotsup(tmp_path)
    write_counter(sup, "web", "v0", "systemd:a:b")
    result = sup.cli("check", str(sup.config))
    assert result.returncode == 1
    assert "sockets.main.bind: \"systemd:a:b\": expected systemd:NAME" in result.stderr


# -- sd_notify ------------------------------------------------------------------------


class NotifySocket:
    """The NOTIFY_SOCKET end systemd would hold: a datagram socket the test binds."""

    def __init__(self, path: Path | None = None, abstract: str | None = None) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract is not None:
            self.sock.bind("\0" + abstract)
            self.address = "@" + abstract
        else:
            assert path is not None
            self.sock.bind(str(path))
            self.address = str(path)
        self.messages: list[dict[str, str]] = []

    def next(self, key: str, timeout: float = DEADLINE) -> dict[str, str]:
        """The next message (after those already read) that sets ``key``."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {key}= within {timeout:g}s; got {self.messages}")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            message = dict(line.split("=", 1) for line in data.decode().splitlines() if line)
            self.messages.append(message)
            if key in message:
                return message

    def close(self) -> None:
        self.sock.close()


def test_sd_notify_ready_reloading_ready_stopping(hotsup: MakeHotsup) -> None:
    sup = hotsup()
    notify = NotifySocket(sup.root / "notify")
    port = free_port()
    # A start() that takes a while: READY must wait for it.
    write_counter(sup, "counter", "v0", f"127.0.0.1:{port}", start="await asyncio.sleep(0.5)")
    broken = sup.bundles / "broken"
    broken.mkdir()
    (broken / "bundle.toml").write_text('entry = "nothere:X"\n')
    try:
        sup.start(env={**os.environ, "NOTIFY_SOCKET": notify.address})
        ready = notify.next("READY")
        # Only once every bundle serves or has failed.
        assert request(port, "get").startswith("count=0")
        assert ready["READY"] == "1"
        assert ready["STATUS"] == "2 bundle(s): 1 failed, 1 running (failed: broken)", ready
        sup.signal(signal.SIGHUP)
        reloading = notify.next("RELOADING")
        assert reloading["RELOADING"] == "1"
        usec = int(reloading["MONOTONIC_USEC"])
        assert abs(usec - time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000) < 30_000_000
        again = notify.next("READY")
        assert again["READY"] == "1"
        # Only once the reload is over: the new generation serves.
        bundles = json.loads(sup.cli("status", "--json").stdout)["bundles"]
        assert [b["generation"] for b in bundles if b["name"] == "counter"] == [2], bundles
        assert sup.stop() == 0
        stopping = notify.next("STOPPING")
        assert stopping["STOPPING"] == "1"
        keys = [k for m in notify.messages for k in m if k in ("READY", "RELOADING", "STOPPING")]
        assert keys == ["READY", "RELOADING", "READY", "STOPPING"], notify.messages
        assert "swapped from" in sup.log()
    finally:
        notify.close()


def test_sd_notify_watchdog_on_an_abstract_socket(hotsup: MakeHotsup) -> None:
    sup = hotsup()
    notify = NotifySocket(abstract=f"hotsup-test-{os.getpid()}-{time.monotonic_ns()}")
    port = free_port()
    write_counter(sup, "counter", "v0", f"127.0.0.1:{port}")
    try:
        # WATCHDOG_USEC=400 ms: WATCHDOG=1 every 200 ms. WATCHDOG_PID unset: for us.
        sup.start(env={**os.environ, "NOTIFY_SOCKET": notify.address,
                       "WATCHDOG_USEC": "400000"})
        notify.next("READY")
        first = time.monotonic()
        for _ in range(5):
            assert notify.next("WATCHDOG")["WATCHDOG"] == "1"
        spent = time.monotonic() - first
        assert 0.5 < spent < 4.0, spent  # about 5 x 200 ms, however busy the machine
        assert sup.stop() == 0
        notify.next("STOPPING")
    finally:
        notify.close()


def test_no_watchdog_for_another_pid(hotsup: MakeHotsup) -> None:
    sup = hotsup()
    notify = NotifySocket(sup.root / "notify")
    write_counter(sup, "counter", "v0", f"127.0.0.1:{free_port()}")
    try:
        sup.start(env={**os.environ, "NOTIFY_SOCKET": notify.address,
                       "WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"})
        notify.next("READY")
        assert sup.stop() == 0
        notify.next("STOPPING")
        assert not [m for m in notify.messages if "WATCHDOG" in m], notify.messages
    finally:
        notify.close()


# -- units: the pieces without processes ---------------------------------------------------


def test_listen_fds_for_another_pid_are_ignored_and_unset() -> None:
    env = {"LISTEN_PID": "1", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "web", "PATH": "/bin"}
    assert systemd_sockets(env) == {}
    assert env == {"PATH": "/bin"}


def test_no_listen_fds_no_sockets() -> None:
    env = {"PATH": "/bin"}
    assert systemd_sockets(env) == {}


def test_notifier_without_notify_socket_is_silent() -> None:
    env = {"WATCHDOG_USEC": "1000000"}
    notifier = Notifier(lambda: (True, "x"), env)
    assert not notifier.enabled
    notifier.send(READY=1)  # a no-op, not an error
    assert env == {}


def test_notifier_to_a_socket_that_is_gone_never_raises(tmp_path: Path) -> None:
    notifier = Notifier(lambda: (True, "x"), {"NOTIFY_SOCKET": str(tmp_path / "gone")})
    notifier.send(READY=1)
    notifier.send(STOPPING=1)
    notifier.close()


def test_summary() -> None:
    assert summarize({}) == (True, "no bundle")
    assert summarize({"a": "running", "b": "starting"}) == (
        False, "2 bundle(s): 1 running, 1 starting")
    assert summarize({"a": "failed"}) == (True, "1 bundle(s): 1 failed (failed: a)")


def test_systemd_problems_reports_against_the_manifest(tmp_path: Path) -> None:
    source = BundleSource("web", tmp_path)
    spec = BundleSpec("web", tmp_path, "app:app", "asgi", False, "", (
        SocketSpec("http", "systemd:web", systemd="web"),), {}, False, Timing())
    assert systemd_problems(source, spec, {}) == []
    assert systemd_problems(source, spec, {"LISTEN_FDS": "1", "LISTEN_FDNAMES": "web"}) == []
    assert systemd_problems(source, spec, {"LISTEN_FDS": "1"}) == [
        f"{tmp_path / 'bundle.toml'}: sockets.http.bind: systemd passed no socket named "
        "'web' (LISTEN_FDNAMES: none)"]


def _listening(port: int) -> bool:
    """Whether something listens on ``port`` (read from /proc: a probe connection
    would be the one that triggers the activation)."""
    with open("/proc/net/tcp") as handle:
        rows = handle.read().splitlines()[1:]
    return any(row.split()[1].endswith(f":{port:04X}") and row.split()[3] == "0A"
               for row in rows)
