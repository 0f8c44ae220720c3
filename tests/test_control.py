"""The command line against a real supervisor: every command, its exit code and
output, the JSON schema, garbage on the control socket, and who may connect."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import zmq
import zmq.utils.monitor
from harness import (
    Hotsup,
    counter_source,
    free_port,
    port_open,
    request,
    save,
    serve_counter,
    wait_for,
    write_bundle,
)

pytestmark = pytest.mark.timeout(120)

MakeHotsup = Callable[..., Hotsup]

#: DESIGN.md's fields of one bundle in ``hotsup status --json``, and their types.
STATUS_FIELDS: dict[str, tuple[type, ...]] = {
    "name": (str,), "state": (str,), "generation": (int, type(None)),
    "pid": (int, type(None)), "restarts": (int,), "version": (str, type(None)),
    "last_swap_ms": (float, int, type(None)), "last_pause_ms": (float, int, type(None)),
    "last_error": (str, type(None)),
}
STATES = {"starting", "running", "swapping", "failed", "stopped"}

LOGS_ON_START = "self.ctx.log.info('started %s', TAG)"


def start_counter(hotsup: MakeHotsup, config_extra: str = "") -> tuple[Hotsup, int]:
    sup = hotsup(config_extra)
    return sup, serve_counter(sup, start=LOGS_ON_START)


def edit(sup: Hotsup, tag: str, **fragments: str) -> None:
    save(sup.bundles / "counter" / "counter.py",
         counter_source(tag, **{"start": LOGS_ON_START, **fragments}))



def test_status_prints_a_table_and_the_json_of_the_design(hotsup: MakeHotsup) -> None:
    sup, _ = start_counter(hotsup)
    done = sup.cli("status", "--json")
    assert done.returncode == 0, done.stderr
    body = json.loads(done.stdout)
    assert set(body) >= {"bundles"}
    [bundle] = body["bundles"]
    for key, types in STATUS_FIELDS.items():
        assert isinstance(bundle[key], types), (key, bundle[key])
    assert bundle["state"] in STATES
    assert (bundle["name"], bundle["state"], bundle["generation"]) == ("counter", "running", 1)
    assert bundle["version"] == "1.0" and bundle["restarts"] == 0
    assert bundle["pid"] in sup.leftovers(), "the pid is the live worker's"

    table = sup.cli("status")
    assert table.returncode == 0, table.stderr
    header, row = table.stdout.splitlines()[:2]
    assert header.split()[:6] == ["BUNDLE", "STATE", "GEN", "PID", "UPTIME", "RESTARTS"]
    assert row.split()[:4] == ["counter", "running", "1", str(bundle["pid"])]


def _pss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as rollup:
        return next(int(line.split()[1]) for line in rollup if line.startswith("Pss:"))


def test_status_reports_each_workers_pss(hotsup: MakeHotsup) -> None:
    sup, _ = start_counter(hotsup)
    first = sup.status()["counter"]
    assert first["pss_kib"] > 0
    # Its own reading, a moment apart: the same worker within a margin.
    assert abs(first["pss_kib"] - _pss_kib(first["pid"])) <= 0.25 * first["pss_kib"]
    assert [(w["generation"], w["state"], w["pid"]) for w in first["workers"]] == \
        [(1, "ready", first["pid"])]
    done = sup.cli("reload", "counter")
    assert done.returncode == 0, done.stderr
    # Generation 1 is held on probation (5 s by default): it still costs memory.
    after = sup.status()["counter"]
    workers = {w["generation"]: w for w in after["workers"]}
    assert workers[1]["state"] == "held" and workers[2]["state"] == "ready"
    assert all(w["pss_kib"] > 0 for w in workers.values())
    assert workers[2]["pid"] == after["pid"]
    table = sup.cli("status").stdout.splitlines()
    assert table[0].split()[7] == "PSS" and table[1].split()[7].endswith("M")


#: What a command to a running supervisor must not import: the event loop, the
#: watcher, the whole config's validation (each costs a fresh process tens of ms).
NOT_FOR_CLIENTS = ("asyncio", "uvloop", "watchfiles", "hotsup.supervisor.config",
                   "hotsup.supervisor.logs", "dataclasses")

CLIENT_IMPORTS = """\
import json, sys
from hotsup.supervisor import cli
code = cli.main(sys.argv[1:])
print(json.dumps({"code": code, "modules": sorted(sys.modules)}), file=sys.stderr)
"""


@pytest.mark.parametrize("command", [["status"], ["reload", "counter"]])
def test_a_client_command_imports_only_what_it_uses(hotsup: MakeHotsup,
                                                    command: list[str]) -> None:
    sup, _ = start_counter(hotsup)
    done = subprocess.run([sys.executable, "-c", CLIENT_IMPORTS, *command, "-c",
                           str(sup.config)], capture_output=True, text=True, timeout=60)
    report = json.loads(done.stderr.strip().splitlines()[-1])
    assert report["code"] == 0, done.stderr
    loaded = [name for name in report["modules"]
              if any(name == bad or name.startswith(bad + ".") for bad in NOT_FOR_CLIENTS)]
    assert not loaded, f"hotsup {' '.join(command)} imported {loaded}"


def test_reload_reports_the_swap_and_a_rollback(hotsup: MakeHotsup) -> None:
    sup, port = start_counter(hotsup)
    assert request(port, "incr").startswith("count=1 ")
    done = sup.cli("reload", "counter")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("counter: swapped in "), done.stdout
    assert request(port, "get").startswith("count=1 generation=2"), "swapped, state carried"

    edit(sup, "broken", start="raise RuntimeError('start exploded')")
    sup.wait_log(r"rolled back, counter@2 keeps serving")
    done = sup.cli("reload", "counter", "--json")
    assert done.returncode == 1, (done.stdout, done.stderr)
    report = json.loads(done.stdout)
    assert (report["result"], report["ok"], report["generation"]) == ("rolled back", False, 2)
    assert "RuntimeError: start exploded" in report["message"]
    assert isinstance(report["duration_ms"], float)
    assert sup.status()["counter"]["last_error"] == report["message"]
    assert request(port, "get").startswith("count=1 generation=2"), "the old one serves"

    text = sup.cli("reload", "counter")
    assert text.returncode == 1 and "rolled back" in text.stderr, text.stderr


def test_a_failing_snapshot_names_the_way_out_and_discard_state_takes_it(
        hotsup: MakeHotsup) -> None:
    sup, port = start_counter(hotsup)
    assert request(port, "incr").startswith("count=1 ")
    edit(sup, "v0", snapshot="raise RuntimeError('snapshot exploded')")
    sup.wait_log(r"counter@2: swapped")  # the old code's snapshot() still works
    edit(sup, "v1")  # now counter@2's snapshot() is the broken one
    line = sup.wait_log(r"rolled back, counter@2 keeps serving: .*")
    assert "`hotsup reload counter --discard-state` swaps to the new code" in line, line
    assert sup.cli("reload", "--all", "--discard-state").returncode == 2, "only by name"
    done = sup.cli("reload", "counter", "--discard-state")
    assert done.returncode == 0, done.stderr
    assert "without state" in done.stdout, done.stdout
    sup.wait_log(r"WARNING.*swapping without state \(--discard-state\)")
    assert request(port, "get").startswith("count=0 generation=4 tag=v1"), "fresh state"


def test_reload_all_and_usage_errors(hotsup: MakeHotsup) -> None:
    sup, _ = start_counter(hotsup)
    write_bundle(sup.bundles / "other", counter_source("o"), free_port())
    sup.wait_log(r"other@1: serving")
    done = sup.cli("reload", "--all", "--json")
    assert done.returncode == 0, done.stderr
    reports = [json.loads(line) for line in done.stdout.splitlines()]
    assert [(r["name"], r["result"]) for r in reports] == [("counter", "swapped"),
                                                          ("other", "swapped")]
    unknown = sup.cli("reload", "nosuch")
    assert unknown.returncode == 1
    assert unknown.stderr.strip() == ("hotsup reload: no bundle named 'nosuch' "
                                      "(bundles: counter, other)")
    assert sup.cli("reload").returncode == 2
    assert sup.cli("stop", "nosuch").returncode == 1


def test_stop_closes_the_port_and_run_brings_the_state_back(hotsup: MakeHotsup) -> None:
    sup, port = start_counter(hotsup)
    for _ in range(3):
        request(port, "incr")
    done = sup.cli("stop", "counter")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("counter: stopped in "), done.stdout
    assert not port_open(port), "a stopped bundle refuses connections"
    assert sup.status()["counter"]["state"] == "stopped"
    assert sup.status()["counter"]["pid"] is None
    refused = sup.cli("reload", "counter")
    assert refused.returncode == 1 and "is stopped" in refused.stderr, refused.stderr
    assert sup.cli("stop", "counter").stdout.startswith("counter: stopped")  # idempotent

    done = sup.cli("run", "counter")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("counter: started in "), done.stdout
    assert request(port, "get").startswith("count=3 generation=2"), "the count survived"
    assert sup.status()["counter"]["state"] == "running"
    again = sup.cli("run", "counter")
    assert again.returncode == 0 and "unchanged" in again.stdout and "already running" in \
        again.stdout, again.stdout
    assert request(port, "get").startswith("count=3 generation=2"), "run did not swap it"


def test_logs_show_tagged_records_and_follow_across_a_swap(hotsup: MakeHotsup) -> None:
    sup, _ = start_counter(hotsup)
    done = sup.cli("logs", "counter", "-n", "50")
    assert done.returncode == 0, done.stderr
    assert "INFO    counter@1: started v0" in done.stdout, done.stdout
    records = [json.loads(line) for line in sup.cli("logs", "counter", "--json").stdout
               .splitlines()]
    assert records and all(r["bundle"] == "counter" for r in records)
    [started] = [r for r in records if r["msg"] == "started v0"]
    assert (started["tag"], started["generation"], started["level"]) == ("counter@1", 1, "INFO")
    assert len(sup.cli("logs", "-n", "2").stdout.splitlines()) == 2

    with Follower(sup, "logs", "counter", "-f", "-n", "1") as lines:
        wait_for(lambda: lines, what="the follower's first record: it is connected")
        edit(sup, "v1")
        wait_for(lambda: any("counter@2: started v1" in line for line in lines),
                 what="the new generation's record in logs -f")
        edit(sup, "v2")
        wait_for(lambda: any("counter@3: started v2" in line for line in lines),
                 what="the record of the generation after it")
    assert not any("started v0" in line for line in lines), "-n 1 showed one old record"


class Follower:
    """A ``hotsup ARGS`` process whose output lines are collected as they come."""

    def __init__(self, sup: Hotsup, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hotsup.supervisor.cli", *args, "-c", str(sup.config)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []

        self._reader = threading.Thread(target=self._read, daemon=True)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def __enter__(self) -> list[str]:
        self._reader.start()
        return self.lines

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        code = self.proc.wait(10)
        self._reader.join(10)
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        assert code == 0, "".join(self.lines)


def test_logs_follow_ends_when_the_supervisor_shuts_down(hotsup: MakeHotsup) -> None:
    sup, _ = start_counter(hotsup)
    follower = Follower(sup, "logs", "-f")
    with follower as lines:
        wait_for(lambda: any("started v0" in line for line in lines), what="the first records")
        done = sup.cli("shutdown")
        assert done.returncode == 0, done.stderr
        assert follower.proc.wait(15) == 0
    assert "the supervisor is gone" in lines[-1]


def test_shutdown_drains_and_the_cli_then_finds_no_supervisor(hotsup: MakeHotsup) -> None:
    sup, port = start_counter(hotsup)
    done = sup.cli("shutdown")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"hotsup {sup.pid} stopped"
    assert sup.proc is not None and sup.proc.wait(5) == 0
    assert sup.leftovers() == []
    assert not port_open(port)
    assert not (sup.root / ".hotsup" / "control").exists(), "a clean exit leaves no socket"
    gone = sup.cli("status", timeout=10)
    assert gone.returncode == 3
    assert gone.stderr.strip() == (f"hotsup status: no hotsup is running with run_dir "
                                   f"{sup.root / '.hotsup'}")


def test_the_cli_without_a_supervisor_says_so_in_one_line(tmp_path: Path) -> None:
    def hotsup(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "hotsup.supervisor.cli", *args],
                              cwd=tmp_path, capture_output=True, text=True, timeout=20,
                              env=env)

    started = time.monotonic()
    missing = hotsup("status")
    assert missing.returncode == 2
    assert missing.stderr.strip() == (f"hotsup status: {tmp_path / 'config.toml'}: file not "
                                      f"found (use -c FILE or HOTSUP_RUN_DIR)")
    (tmp_path / "config.toml").write_text('[supervisor]\nrun_dir = "run"\n')
    none = hotsup("reload", "--all")
    assert none.returncode == 3
    assert none.stderr.strip() == (f"hotsup reload: no hotsup is running here: "
                                   f"{tmp_path / 'run'} does not exist")
    # A run_dir a SIGKILLed supervisor left: its socket file, nobody listening.
    run = tmp_path / "stale"
    run.mkdir(mode=0o700)
    with socket.socket(socket.AF_UNIX) as dead:
        dead.bind(str(run / "control"))
    stale = hotsup("logs", "-f", env={**os.environ, "HOTSUP_RUN_DIR": str(run)})
    assert stale.returncode == 3
    assert stale.stderr.strip() == (f"hotsup logs: no hotsup is running with run_dir {run} "
                                    f"(its control socket was left by a supervisor that died)")
    assert len(stale.stderr.splitlines()) == 1
    assert time.monotonic() - started < 15, "never hangs"


@pytest.fixture
def control(hotsup: MakeHotsup) -> Iterator[tuple[Hotsup, zmq.Socket[bytes]]]:
    sup, _ = start_counter(hotsup)
    zctx = zmq.Context()
    sock = zctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 10_000)
    sock.connect(f"ipc://{sup.root / '.hotsup' / 'control'}")
    yield sup, sock
    sock.close()
    zctx.term()


GARBAGE: dict[str, tuple[list[bytes], str]] = {
    "not json": ([b"\xff\xfe hello"], "the request is not a JSON object"),
    "a json list": ([b"[1, 2]"], "the request is not a JSON object"),
    "two frames": ([b"{}", b"{}"], "expected one frame, got 2"),
    "no version": ([b'{"id": "a", "cmd": "status"}'],
                   "unsupported protocol version None (this supervisor speaks 1)"),
    "a future version": ([b'{"v": 2, "id": "a", "cmd": "status"}'],
                         "unsupported protocol version 2 (this supervisor speaks 1)"),
    "version true": ([b'{"v": true, "id": "a", "cmd": "status"}'],
                     "unsupported protocol version True (this supervisor speaks 1)"),
    "version 1.0": ([b'{"v": 1.0, "id": "a", "cmd": "status"}'],
                    "unsupported protocol version 1.0 (this supervisor speaks 1)"),
    "unknown command": ([b'{"v": 1, "id": "a", "cmd": "explode"}'],
                        "unknown command 'explode' (known: status, reload, stop, run, logs, "
                        "shutdown, push_begin, push_files, push_commit)"),
    "unknown argument": ([b'{"v": 1, "id": "a", "cmd": "status", "args": {"x": 1}}'],
                         "status: unknown argument 'x'"),
    "wrong type": ([b'{"v": 1, "id": "a", "cmd": "stop", "args": {"name": 5}}'],
                   "stop: argument 'name' must be str"),
    "missing argument": ([b'{"v": 1, "id": "a", "cmd": "run", "args": {}}'],
                         "run: argument 'name' is required"),
    "args not an object": ([b'{"v": 1, "id": "a", "cmd": "status", "args": []}'],
                           "args must be a JSON object"),
    "deep nesting": ([b"[" * 50_000], "the request is not a JSON object"),
    "a number too large": ([b'{"v": 1, "id": "a", "cmd": "logs", "args": {"wait": 1'
                            + b"0" * 400 + b"}}"], "logs: argument 'wait' is out of range"),
}


@pytest.mark.parametrize("kind", list(GARBAGE))
def test_garbage_on_the_control_socket_gets_an_error_reply(
        control: tuple[Hotsup, zmq.Socket[bytes]], kind: str) -> None:
    sup, sock = control
    frames, error = GARBAGE[kind]
    sock.send_multipart(frames)
    reply = json.loads(sock.recv())
    assert reply["ok"] is False and reply["v"] == 1
    assert reply["error"] == error
    assert reply["id"] == ("a" if b'"id": "a"' in frames[0] else None)
    assert sup.status()["counter"]["state"] == "running", "the supervisor is unharmed"


def test_an_oversized_request_is_dropped_and_the_supervisor_goes_on(
        control: tuple[Hotsup, zmq.Socket[bytes]]) -> None:
    sup, sock = control
    # ZeroMQ drops a peer whose message is over MAXMSGSIZE before it is read
    # whole: the sender sees its connection go, and never gets a reply.
    monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
    try:
        sock.send(b"x" * (1024 * 1024))
        monitor.setsockopt(zmq.RCVTIMEO, 10_000)
        event = zmq.utils.monitor.recv_monitor_message(monitor)
        assert event["event"] == zmq.EVENT_DISCONNECTED
    finally:
        sock.disable_monitor()
        monitor.close()
    with pytest.raises(zmq.Again):
        sock.recv(zmq.NOBLOCK)
    assert sup.status()["counter"]["state"] == "running"
    assert sup.proc is not None and sup.proc.poll() is None


def test_run_dir_and_sockets_are_owner_only(hotsup: MakeHotsup) -> None:
    sup, _ = start_counter(hotsup)
    run = sup.root / ".hotsup"
    assert stat.S_IMODE(run.stat().st_mode) == 0o700
    mode = (run / "control").stat()
    assert stat.S_ISSOCK(mode.st_mode)
    assert stat.S_IMODE(mode.st_mode) & 0o077 == 0, oct(mode.st_mode)
    assert stat.S_IMODE((run / "lock").stat().st_mode) == 0o600
    # Workers have no socket to find by path: each was handed its channel.
    sockets = [p.name for p in run.iterdir() if stat.S_ISSOCK(p.lstat().st_mode)]
    assert sockets == ["control"]


def _nobody() -> int | None:
    if os.geteuid() != 0:
        return None
    import pwd

    try:
        return pwd.getpwnam("nobody").pw_uid
    except KeyError:
        return None


def connect_as(uid: int | None, path: Path) -> str:
    """Try to connect to the unix socket ``path`` as user ``uid``: what happened.

    A forked child drops to ``uid`` (no interpreter to exec, so nothing on
    the other user's side needs to be readable) and reports by exit code.
    """
    assert uid is not None
    outcomes = ["connected", "PermissionError", "FileNotFoundError", "OSError"]
    pid = os.fork()
    if pid == 0:  # the child: only system calls, then _exit
        code = 3
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            with socket.socket(socket.AF_UNIX) as sock:
                sock.connect(str(path))
            code = 0
        except PermissionError:
            code = 1
        except FileNotFoundError:
            code = 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return outcomes[os.waitstatus_to_exitcode(status)]


@pytest.mark.skipif(_nobody() is None, reason="needs root and a 'nobody' user to test as")
def test_another_user_cannot_reach_the_control_socket(hotsup: MakeHotsup) -> None:
    # run_dir's parent is open to everyone, so only run_dir's own mode keeps
    # the other user out (pytest's tmp_path is owner-only all the way up).
    parent = Path(tempfile.mkdtemp(prefix="hs-", dir="/tmp"))
    try:
        os.chmod(parent, 0o755)
        sup = hotsup()
        write_bundle(sup.bundles / "counter", counter_source("v0"), free_port())
        sup.config.write_text(sup.config.read_text().replace(
            'run_dir = ".hotsup"', f'run_dir = "{parent / "run"}"'))
        sup.start_serving("counter")
        assert connect_as(_nobody(), parent / "run" / "control") == "PermissionError"
        assert sup.status()["counter"]["state"] == "running", "we, the owner, still can"
    finally:
        shutil.rmtree(parent, ignore_errors=True)


def test_the_cli_refuses_a_run_dir_open_to_others(hotsup: MakeHotsup) -> None:
    sup, _ = start_counter(hotsup)
    run = sup.root / ".hotsup"
    os.chmod(run, 0o755)
    try:
        done = sup.cli("status")
        assert done.returncode == 3
        assert done.stderr.strip() == (f"hotsup status: {run} is open to other users (mode "
                                       f"755); a supervisor makes it 0700")
    finally:
        os.chmod(run, 0o700)


BROKEN_CONFIGS: dict[str, tuple[str, str, str]] = {
    # name: (added to config.toml's [supervisor], bundle.toml, part of the expected line)
    "unknown key": ("bogus = 1\n", 'entry = "counter:Counter"\n',
                    "config.toml: supervisor.bogus: unknown key"),
    "wrong type": ("[defaults]\ndrain_timeout = \"long\"\n", 'entry = "counter:Counter"\n',
                   "config.toml: defaults.drain_timeout: expected a number"),
    "bad bind": ("", 'entry = "counter:Counter"\n[sockets.main]\nbind = "localhost"\n',
                 "bundle.toml: sockets.main.bind: "),
    "missing entry module": ("", 'entry = "nothere:App"\n',
                             "bundle.toml: entry: module 'nothere' not found"),
    "preloaded bundle module": ('preload = ["counter"]\n', 'entry = "counter:Counter"\n',
                                "config.toml: supervisor.preload: 'counter' lives in bundle"),
}


@pytest.mark.parametrize("kind", list(BROKEN_CONFIGS))
def test_check_names_the_file_and_key_of_each_problem(hotsup: MakeHotsup, kind: str) -> None:
    extra, manifest, expected = BROKEN_CONFIGS[kind]
    sup = hotsup(extra)
    bundle = sup.bundles / "counter"
    bundle.mkdir()
    (bundle / "bundle.toml").write_text(manifest)
    (bundle / "counter.py").write_text(counter_source("v0"))
    done = sup.cli("check", str(sup.config))
    assert done.returncode == 1, done.stderr
    lines = done.stderr.splitlines()
    assert any(expected in line for line in lines), lines
    assert lines[-1].startswith("hotsup check: ") and lines[-1].endswith("problem(s)")
    for line in lines[:-1]:
        assert line.startswith(str(sup.root)), "every problem names its file"
    assert not (sup.root / ".hotsup").exists(), "check starts nothing"


def test_requests_queued_behind_a_shutdown_are_refused_not_forgotten(
        control: tuple[Hotsup, zmq.Socket[bytes]]) -> None:
    sup, sock = control
    # One connection delivers in order: the stop is queued behind the shutdown.
    sock.send(json.dumps({"v": 1, "id": "s", "cmd": "shutdown"}).encode())
    sock.send(json.dumps({"v": 1, "id": "t", "cmd": "stop",
                          "args": {"name": "counter"}}).encode())
    replies = {reply["id"]: reply for reply in (json.loads(sock.recv()) for _ in range(2))}
    assert replies["s"]["ok"] is True
    assert replies["t"] == {"v": 1, "id": "t", "ok": False,
                            "error": "the supervisor is shutting down"}, replies["t"]
    assert sup.proc is not None and sup.proc.wait(15) == 0


@pytest.mark.skipif(_nobody() is None, reason="needs root and a 'nobody' user to test as")
def test_a_run_dir_owned_by_another_user_is_refused(hotsup: MakeHotsup) -> None:
    sup = hotsup()
    write_bundle(sup.bundles / "counter", counter_source("v0"), free_port())
    run = sup.root / ".hotsup"
    run.mkdir(mode=0o777)
    os.chown(run, _nobody() or 0, -1)
    sup.start()
    assert sup.proc is not None and sup.proc.wait(30) == 2
    assert f"run_dir {run} belongs to uid {_nobody()}, not to us (uid 0)" in sup.log()
    assert not (run / "lock").exists()
