"""What a new user meets in the first hour (issue 14): the command line and its messages."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from harness import (
    Hotsup,
    counter_source,
    free_port,
    request,
    save,
    serve_counter,
    session_pids,
    wait_for,
    write_bundle,
)
from hotsup.supervisor import cli

pytestmark = pytest.mark.timeout(120)

MakeHotsup = Callable[..., Hotsup]


def hotsup_cli(sup: Hotsup, *args: str) -> subprocess.CompletedProcess[str]:
    """``hotsup ARGS`` exactly as given (no ``-c`` added), run in sup's root."""
    return subprocess.run([sys.executable, "-m", "hotsup.supervisor.cli", *args],
                          cwd=sup.root, capture_output=True, text=True, timeout=60)


# -- -c FILE before or after the command ------------------------------------------------

#: Every command that talks to a supervisor, with the arguments it needs.
REMOTE_COMMANDS = {"status": [], "reload": ["counter"], "stop": ["counter"],
                   "run": ["counter"], "logs": [], "shutdown": [], "push": ["bundles/x"]}


@pytest.mark.parametrize("command", list(REMOTE_COMMANDS))
def test_c_file_parses_before_and_after_every_command(command: str) -> None:
    rest = REMOTE_COMMANDS[command]
    for argv in (["-c", "a.toml", command, *rest], [command, *rest, "-c", "a.toml"]):
        args = cli.build_parser().parse_args(argv)
        cli._merge_config(args)
        assert args.config == "a.toml", argv


def test_c_file_twice_must_agree() -> None:
    args = cli.build_parser().parse_args(["-c", "a.toml", "status", "-c", "b.toml"])
    with pytest.raises(cli.UsageError, match=r"two config files given \(a.toml and b.toml\)"):
        cli._merge_config(args)
    for command in ("start", "check"):
        args = cli.build_parser().parse_args([command])
        cli._merge_config(args)
        assert args.config == "config.toml"


def test_c_file_before_the_command_reaches_the_supervisor(hotsup: MakeHotsup,
                                                          tmp_path: Path) -> None:
    sup = hotsup()
    port = serve_counter(sup)
    elsewhere = tmp_path / "elsewhere"  # no config.toml here: only -c can find it
    elsewhere.mkdir()
    for argv in (["-c", str(sup.config), "status", "--json"],
                 ["status", "--json", "-c", str(sup.config)]):
        done = subprocess.run([sys.executable, "-m", "hotsup.supervisor.cli", *argv],
                              cwd=elsewhere, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, (argv, done.stderr)
        assert [b["name"] for b in json.loads(done.stdout)["bundles"]] == ["counter"]
    done = hotsup_cli(sup, "-c", str(sup.config), "reload", "counter")
    assert done.returncode == 0 and "swapped" in done.stdout, done.stderr
    assert request(port, "get").startswith("count=0 generation=2")
    done = hotsup_cli(sup, "-c", str(sup.config), "check")
    assert done.returncode == 0, done.stderr


# -- hotsup check imports each entry ----------------------------------------------------

CODE_ERRORS = {
    "syntax error": ('entry = "counter:Counter"\n', "x = 1\ndef f(:\n",
                     "counter.py:2: SyntaxError: invalid syntax (bundle 'counter'"),
    "import error": ('entry = "counter:Counter"\n', "x = 1\nimport nosuchmodule\n",
                     "counter.py:2: ModuleNotFoundError: No module named 'nosuchmodule'"),
    "missing attribute": ('entry = "counter:Countr"\n', None,
                          "bundle.toml: entry: counter.py has no attribute 'Countr'"),
}


@pytest.mark.parametrize("kind", list(CODE_ERRORS))
def test_check_imports_each_entry_and_names_file_and_line(hotsup: MakeHotsup,
                                                          kind: str) -> None:
    manifest, source, expected = CODE_ERRORS[kind]
    sup = hotsup()
    bundle = sup.bundles / "counter"
    bundle.mkdir()
    started = bundle / "started"  # the entry must never be called, nor start() run
    body = counter_source("v0", init=f"open({str(started)!r}, 'w').close()")
    (bundle / "bundle.toml").write_text(
        f'{manifest}[sockets.main]\nbind = "127.0.0.1:{free_port()}"\n')
    (bundle / "counter.py").write_text(source or body)
    write_bundle(sup.bundles / "fine", body, free_port())  # the others are checked too
    done = hotsup_cli(sup, "check", str(sup.config))
    assert done.returncode == 1, (done.stdout, done.stderr)
    lines = done.stderr.splitlines()
    assert len(lines) == 2 and expected in lines[0], lines
    assert lines[0].startswith(str(bundle)), "the line names the bundle's file"
    assert lines[1] == "hotsup check: 1 problem(s)"
    assert not started.exists(), "check never calls the entry"
    assert not (sup.root / ".hotsup").exists(), "check starts nothing"


def test_check_bounds_a_hanging_import_by_start_timeout(hotsup: MakeHotsup) -> None:
    sup = hotsup("[defaults]\nstart_timeout = 1.0\n")
    write_bundle(sup.bundles / "counter", "import time\ntime.sleep(3600)\n", free_port())
    done = hotsup_cli(sup, "check")
    assert done.returncode == 1, done.stderr
    assert ("bundle.toml: entry: importing 'counter:Counter' did not finish within "
            "start_timeout (1s)") in done.stderr, done.stderr


# -- ruff lints the project, not a user's drop-ins ---------------------------------------

REPO = Path(__file__).resolve().parent.parent


def test_ruff_lints_the_demo_bundles_but_not_a_users_drop_in(tmp_path: Path) -> None:
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    shutil.copytree(REPO / "bundles", tmp_path / "bundles",
                    ignore=shutil.ignore_patterns("__pycache__"))
    mine = tmp_path / "bundles" / "mine"
    mine.mkdir()
    (mine / "mine.py").write_text("import os,sys\nx=1;y = 2\n")  # unused imports, E231, E702

    def ruff() -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."],
                              cwd=tmp_path, capture_output=True, text=True, timeout=60)

    done = ruff()
    assert done.returncode == 0, done.stdout + done.stderr
    demo = tmp_path / "bundles" / "counter" / "counter.py"
    demo.write_text(demo.read_text() + "import os\n")  # the demo bundles are still linted
    done = ruff()
    assert done.returncode == 1 and "counter.py" in done.stdout and "F401" in done.stdout, \
        done.stdout


# -- Ctrl-C on make run -----------------------------------------------------------------

#: Run argv[1:] with stdin's terminal as the controlling terminal (the caller made a
#: new session): a terminal the test holds the other end of, as a user's shell would.
TAKE_TTY = ("import fcntl, os, sys, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
            "os.execvp(sys.argv[1], sys.argv[1:])")


class Terminal:
    """A pty whose slave end is ``argv``'s controlling terminal; what it prints is kept."""

    def __init__(self, argv: list[str], cwd: Path) -> None:
        master, slave = os.openpty()
        self.master = master
        self.proc = subprocess.Popen([sys.executable, "-c", TAKE_TTY, *argv], cwd=cwd,
                                     stdin=slave, stdout=slave, stderr=slave,
                                     start_new_session=True)
        os.close(slave)
        self.output = b""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self.master, 4096)
            except OSError:  # EIO: every holder of the slave end is gone
                return
            if not data:
                return
            self.output += data

    def text(self) -> str:
        return self.output.decode(errors="replace")

    def close(self) -> None:
        """Kill by pid whatever of the session is left, and close the pty."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for pid in session_pids(self.proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self._reader.join(10)
        os.close(self.master)


def test_ctrl_c_on_make_run_drains_and_exits_0(hotsup: MakeHotsup, tmp_path: Path) -> None:
    sup = hotsup()  # its config.toml and bundles/ in tmp_path, as the demo's in the repo
    port = free_port()
    write_bundle(sup.bundles / "counter", counter_source("v0"), port)
    venv = Path(sys.executable).parent.parent
    term = Terminal(["make", "-f", str(REPO / "Makefile"), "-o", f"{venv}/.installed",
                     f"VENV={venv}", "run"], tmp_path)
    try:
        wait_for(lambda: "counter@1: serving" in term.text(), what="make run serving")
        assert request(port).startswith("count=1 generation=1")
        os.write(term.master, b"\x1a")  # Ctrl-Z: hotsup is stopped, and resumed at once
        wait_for(lambda: "Stopped" in term.text(), what="bash saw its job stop")
        assert request(port).startswith("count=2 generation=1"), "hotsup runs on"
        os.write(term.master, b"\x03")  # Ctrl-C: the terminal's SIGINT to its foreground group
        returncode = term.proc.wait(60)
        assert returncode == 0, term.text()
        assert "make: ***" not in term.text(), term.text()
        assert "draining" in term.text() or "retired" in term.text(), term.text()
        wait_for(lambda: not session_pids(term.proc.pid), what="every process of make run gone")
    finally:
        term.close()


# -- messages ---------------------------------------------------------------------------


def test_a_hung_start_names_start_timeout(hotsup: MakeHotsup) -> None:
    sup = hotsup("[defaults]\nstart_timeout = 1.0\n")
    write_bundle(sup.bundles / "counter",
                 counter_source("v0", start="await asyncio.sleep(3600)"), free_port())
    sup.start()
    line = sup.wait_log(r"counter: counter@1 did not start: .*")
    assert "start() did not return within start_timeout (1s)" in line, line
    wait_for(lambda: sup.status()["counter"]["last_error"], what="last_error set")
    error = sup.status()["counter"]["last_error"]
    assert "start() did not return within start_timeout (1s)" in error, error
    assert sup.stop() == 0


#: An app that speaks lifespan the way Starlette does: a failed startup sends
#: ``lifespan.startup.failed`` with the whole traceback as its message.
STARLETTE_LIKE = '''\
import traceback


def connect():
    raise ConnectionRefusedError("no database at db:5432")


async def app(scope, receive, send):
    assert scope["type"] == "lifespan"
    await receive()
    try:
        connect()
    except Exception:
        await send({"type": "lifespan.startup.failed", "message": traceback.format_exc()})
'''

#: An app that does not speak lifespan: a bare assert on the scope's type.
NO_LIFESPAN = '''\
async def app(scope, receive, send):
    assert scope["type"] == "http"
    await receive()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"plain"})
'''


def write_app(sup: Hotsup, name: str, source: str) -> int:
    port = free_port()
    directory = sup.bundles / name
    directory.mkdir()
    (directory / "bundle.toml").write_text(
        f'entry = "{name}:app"\nkind = "asgi"\n[sockets.http]\nbind = "127.0.0.1:{port}"\n')
    (directory / f"{name}.py").write_text(source)
    return port


def test_lifespan_messages_say_what_the_app_did(hotsup: MakeHotsup) -> None:
    sup = hotsup("[defaults]\nmax_restarts = 0\n")
    write_app(sup, "failing", STARLETTE_LIKE)
    port = write_app(sup, "plain", NO_LIFESPAN)
    sup.start_serving("plain")
    line = sup.wait_log(r"plain@1: the app does not use ASGI lifespan events.*")
    assert "AssertionError: )" not in line, line
    assert "(AssertionError at " in line and "plain.py:2" in line, line
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
        response = b""
        while chunk := sock.recv(1000):
            response += chunk
        assert b"\r\n\r\n5\r\nplain\r\n" in response, response
    wait_for(lambda: sup.status()["failing"]["state"] == "failed", what="failing failed")
    error = sup.status()["failing"]["last_error"]
    assert "Traceback" not in error, error
    assert "ConnectionRefusedError: no database at db:5432" in error, error
    # the whole traceback is in the bundle's log, for whoever needs the frames
    sup.wait_log(r"failing@1: lifespan startup failed:")
    assert 'failing.py", line 5, in connect' in sup.log()
    assert sup.stop() == 0


def test_the_start_line_counts_only_bundles_that_serve(hotsup: MakeHotsup) -> None:
    sup = hotsup()
    port = free_port()
    write_bundle(sup.bundles / "counter", counter_source("v0"), port)
    write_bundle(sup.bundles / "tally", counter_source("v0"), port, module="tally")
    sup.start()  # one of the two gets the port, the other is refused
    line = sup.wait_log(r"hotsup \d+ serving .*")
    refused = sup.wait_log(r"(\w+): \S+bundle.toml: sockets.main.bind: .* is already used")
    assert line.endswith(f"serving 1 bundle(s) from {sup.config}; 1 failed: {refused}"), line
    assert sup.stop() == 0


# -- hotsup new -------------------------------------------------------------------------


def http_body(port: int) -> str:
    """The body of ``GET /`` (HTTP/1.0: the server closes when it is done)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
        response = b""
        while chunk := sock.recv(4096):
            response += chunk
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), response
    return body.decode()


def test_hotsup_new_scaffolds_pass_check_serve_and_swap_with_state(hotsup: MakeHotsup) -> None:
    sup = hotsup()
    ports = {kind: free_port() for kind in ("service", "asgi", "wsgi")}
    for kind, port in ports.items():
        # -c FILE: the scaffold goes to that config's bundles_dir
        done = hotsup_cli(sup, "new", f"my-{kind}", "--kind", kind, "-c", str(sup.config),
                          "--bind", f"127.0.0.1:{port}")
        assert done.returncode == 0, done.stderr
        assert f"a new {kind} bundle" in done.stdout, done.stdout
        assert (sup.bundles / f"my-{kind}" / f"my_{kind}.py").is_file()
    done = hotsup_cli(sup, "check", str(sup.config))
    assert done.returncode == 0, done.stderr
    lint = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache",
                           "--config", str(REPO / "pyproject.toml"), str(sup.bundles)],
                          capture_output=True, text=True, timeout=60)
    assert lint.returncode == 0, lint.stdout  # the project's own style, as an example should be

    def ask(kind: str) -> str:
        if kind == "service":
            return request(ports[kind], "hi")
        return http_body(ports[kind]).strip()

    sup.start_serving("my-service", "my-asgi", "my-wsgi")
    for kind in ports:
        for count in (1, 2):
            answer = ask(kind)
            assert answer.startswith(f"hello #{count} from my-{kind}@1"), answer
    for kind in ports:  # the service's greeting is a setting; the apps' is in their code
        edit = sup.bundles / f"my-{kind}" / ("bundle.toml" if kind == "service"
                                             else f"my_{kind}.py")
        text = edit.read_text()
        edited = text.replace('"hello #', '"hey #').replace('greeting = "hello"',
                                                            'greeting = "hey"')
        assert edited != text
        save(edit, edited)
        sup.wait_log(rf"my-{kind}@2: swapped from my-{kind}@1 .*hand-over")
    for kind in ports:
        answer = ask(kind)
        assert answer.startswith(f"hey #3 from my-{kind}@2"), answer
    assert sup.stop() == 0


def test_hotsup_new_never_overwrites(hotsup: MakeHotsup) -> None:
    sup = hotsup()
    mine = sup.bundles / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    done = hotsup_cli(sup, "new", "mine", "--dir", str(sup.bundles))
    assert done.returncode == 1, done.stdout
    assert done.stderr == (f"hotsup new: {mine} exists: hotsup new never overwrites; "
                           "choose another NAME or remove it\n")
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    assert sorted(p.name for p in sup.bundles.iterdir()) == ["mine"], "nothing left behind"
    done = hotsup_cli(sup, "new", "b@d", "--dir", str(sup.bundles))
    assert done.returncode == 1 and "a bundle name may use letters" in done.stderr
    done = hotsup_cli(sup, "new", "queue", "--dir", str(sup.bundles))  # a stdlib module's name
    assert done.returncode == 0, done.stderr
    assert (sup.bundles / "queue" / "queue_bundle.py").is_file()
    assert hotsup_cli(sup, "check", str(sup.config)).returncode == 0


# -- the tour ---------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_the_tour_runs_to_its_end() -> None:
    done = subprocess.run([sys.executable, str(REPO / "contrib" / "tour.py"), "--any-port"],
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    for shown in ("count=5 mine=2 generation=2 greeting=hey",  # state and client carried
                  "swap to counter@3 rolled back, counter@2 keeps serving",
                  "count=6 mine=1 generation=2 greeting=hey",  # the old generation served on
                  "counter: started in",  # pushed over CURVE to the second supervisor ...
                  "count=3 mine=1 generation=2 greeting=from the laptop",  # ... swapped there
                  "ws <- alice -> hey, alice (generation 2, resumed)",  # the same WebSocket
                  "hotsup stopped"):
        assert shown in out, out
    assert re.search(r"the tour took \d+ s", out), out


# -- hotsup logs NAME: the supervisor's lines about NAME --------------------------------


def test_logs_name_has_the_supervisors_socket_lines_about_it(hotsup: MakeHotsup) -> None:
    sup = hotsup()
    port = serve_counter(sup)
    assert sup.cli("stop", "counter").returncode == 0
    done = sup.cli("logs", "counter", "--json", "-n", "500")
    assert done.returncode == 0, done.stderr
    mine = [json.loads(line) for line in done.stdout.splitlines()]
    said = {r["msg"] for r in mine if r["tag"] == "hotsup"}
    for line in ("counter: new bundle in ", f"counter: socket main listening on 127.0.0.1:{port}",
                 f"counter: closed 127.0.0.1:{port}"):
        assert any(msg.startswith(line) for msg in said), (line, said)
    assert all(r["bundle"] == "counter" for r in mine), mine
    assert sup.stop() == 0


def test_a_bundle_fixed_after_a_failed_start_has_no_last_error(hotsup: MakeHotsup) -> None:
    sup = hotsup("[defaults]\nmax_restarts = 0\n")
    port = free_port()
    module = write_bundle(sup.bundles / "counter", "def broken(:\n", port) / "counter.py"
    sup.start()
    sup.wait_log(r"serving 0 bundle\(s\) .*; 1 failed: counter")
    assert sup.status()["counter"]["state"] == "failed"
    assert "SyntaxError" in sup.status()["counter"]["last_error"]
    save(module, counter_source("fixed"))
    wait_for(lambda: sup.status()["counter"]["state"] == "running", what="counter running")
    assert sup.status()["counter"]["last_error"] is None
    assert request(port).startswith("count=1")
    assert sup.stop() == 0


# -- hotsup on PATH ---------------------------------------------------------------------


def test_make_install_puts_hotsup_on_path_for_a_second_terminal(hotsup: MakeHotsup,
                                                                 tmp_path: Path) -> None:
    venv = Path(sys.executable).parent.parent
    prefix = tmp_path / "prefix"
    make = ["make", "-s", "-f", str(REPO / "Makefile"), "-o", f"{venv}/.installed",
            f"VENV={venv}", f"PREFIX={prefix}", "install"]
    done = subprocess.run(make, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert (prefix / "bin" / "hotsup").resolve() == (venv / "bin" / "hotsup").resolve()
    sup = hotsup()
    serve_counter(sup)
    # A second terminal: a shell with that PATH and no virtualenv active, in the
    # directory of config.toml, typing the command as README writes it.
    env = {"PATH": f"{prefix / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path)}
    done = subprocess.run(["bash", "-c", "hotsup status"], cwd=sup.root, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("BUNDLE") and "counter  running" in done.stdout, done.stdout
    (prefix / "bin" / "hotsup").unlink()
    (prefix / "bin" / "hotsup").write_text("mine")
    done = subprocess.run(make, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "exists and is not a symlink" in done.stderr, done.stderr
    assert (prefix / "bin" / "hotsup").read_text() == "mine"
    assert sup.stop() == 0
