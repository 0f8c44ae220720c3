"""The tour (``make tour``): about a minute of hotsup, scripted, printing what happens.

It copies the demo (config.toml and bundles/) into a temporary directory and
runs, there, what README's tour describes:

1. ``hotsup start config.toml``: the three demo bundles serve;
2. an edit of the counter swaps it with its count carried over;
3. a syntax error is rolled back (the old generation serves on), the fix swaps;
4. (the place for "a WebSocket survives a swap", once issue 10 lands);
5. ``hotsup keygen`` and ``hotsup push`` to a second supervisor over CURVE;
6. ``hotsup shutdown`` of both.

Every ``$ hotsup ...`` line it prints is run as shown (with the same
interpreter's hotsup), with its real output below it; ``|`` lines are the
supervisor's log. Each step waits for what it shows, with a deadline; one
that does not come prints the log and exits 1. The supervisors it starts are
stopped at the end, or killed (by process group) if the tour fails. Ports:
the demo's (8101-8103, 7400 for the push) where they are free, any free one
otherwise (``--any-port``: always any, so a tour never meets a ``make run``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from websockets.sync.client import ClientConnection
from websockets.sync.client import connect as ws_connect

REPO = Path(__file__).resolve().parent.parent
HOTSUP = [sys.executable, "-m", "hotsup.supervisor.cli"]

#: Seconds any one step may take before the tour gives up.
STEP_DEADLINE = 30.0

#: The demo's ports, used when free: what README shows.
DEMO_PORTS = {"counter": 8101, "hello": 8102, "greeter": 8103, "remote": 7400, "staging": 8201}


class TourFailed(Exception):
    pass


class Supervisor:
    """A ``hotsup start`` of ours: its log file, read on from where we last looked."""

    def __init__(self, root: Path, config: str) -> None:
        self.root = root
        self.config = config
        self.log_path = root / f"{Path(config).stem}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._seen = 0

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen([*HOTSUP, "start", self.config], cwd=self.root,
                                         stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def wait(self, pattern: str, deadline: float = STEP_DEADLINE) -> None:
        """Wait for a log line matching ``pattern`` (after what was shown); show
        the new lines up to it."""
        regex = re.compile(pattern)
        ends = time.monotonic() + deadline
        while True:
            text = self.log_path.read_text(errors="replace")
            for match in regex.finditer(text, self._seen):
                end = text.index("\n", match.end()) + 1 if "\n" in text[match.end():] \
                    else len(text)
                self.show(text[self._seen:end])
                self._seen = end
                return
            if self.proc is not None and self.proc.poll() is not None:
                raise TourFailed(f"hotsup ({self.config}) exited ({self.proc.returncode}) "
                                 f"while the tour waited for {pattern!r}")
            if time.monotonic() > ends:
                raise TourFailed(f"no log line {pattern!r} within {deadline:g}s")
            time.sleep(0.02)  # a poll of a file: nothing to wait on but its growth

    def show(self, text: str) -> None:
        for line in text.splitlines():
            if " DEBUG " in line:
                continue
            print(f"  | {line.replace(str(self.root) + os.sep, '')}")

    def stop(self) -> None:
        """If it still runs (a failed tour): SIGTERM, then its whole process group."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(STEP_DEADLINE)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(STEP_DEADLINE)


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def run(root: Path, *args: str, expect: int = 0) -> str:
    """``hotsup ARGS`` in ``root``, shown as typed, with its output."""
    print(f"$ hotsup {' '.join(args)}", flush=True)
    done = subprocess.run([*HOTSUP, *args], cwd=root, capture_output=True, text=True,
                          timeout=STEP_DEADLINE * 2)
    output = (done.stdout + done.stderr).replace(str(root) + os.sep, "")
    for line in output.rstrip("\n").splitlines():
        print(f"  {line}".rstrip())
    if done.returncode != expect:
        raise TourFailed(f"hotsup {' '.join(args)} exited {done.returncode}, not {expect}")
    return output


def incr(port: int, sock: socket.socket | None = None) -> str:
    """One ``incr`` to a counter (on a new connection, or on ``sock``): its
    answer, shown as the line exchange it is."""
    with contextlib.ExitStack() as stack:
        if sock is None:
            sock = stack.enter_context(socket.create_connection(("127.0.0.1", port),
                                                                timeout=10))
            how = ""
        else:
            how = " (the connection kept open)"
        sock.sendall(b"incr\n")
        answer = b""
        while not answer.endswith(b"\n"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
    text = answer.decode().strip()
    print(f"  127.0.0.1:{port} <- incr -> {text}{how}", flush=True)
    return text


def greet(ws: ClientConnection, text: str) -> str:
    """One message on an open WebSocket: its answer, shown as the exchange it is."""
    ws.send(text)
    answer = str(ws.recv(timeout=10))
    print(f"  ws <- {text} -> {answer}", flush=True)
    return answer


def save(path: Path, text: str) -> None:
    """Save as an editor does: a temp file renamed over the old one."""
    temp = path.with_name(f".{path.name}.saving")
    temp.write_text(text)
    os.replace(temp, path)


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    if old not in text:
        raise TourFailed(f"{path}: {old!r} not found")
    save(path, text.replace(old, new, 1))


def pick_ports(any_port: bool) -> dict[str, int]:
    ports: dict[str, int] = {}
    for name, port in DEMO_PORTS.items():
        ports[name] = _free_port(None if any_port else port)
        while ports[name] in list(ports.values())[:-1]:  # the kernel gave one out twice
            ports[name] = _free_port(None)
    return ports


def _free_port(wanted: int | None) -> int:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        with contextlib.suppress(OSError):
            sock.bind(("127.0.0.1", wanted or 0))
            return int(sock.getsockname()[1])
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rebind(manifest: Path, port: int) -> None:
    text = manifest.read_text()
    manifest.write_text(re.sub(r'bind = "127\.0\.0\.1:\d+"', f'bind = "127.0.0.1:{port}"', text))


@contextlib.contextmanager
def workspace(keep: bool) -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="hotsup-tour-"))
    try:
        yield root
    finally:
        if keep:
            print(f"\n(kept {root})")
        else:
            shutil.rmtree(root, ignore_errors=True)


def tour(root: Path, ports: dict[str, int]) -> None:
    shutil.copy(REPO / "config.toml", root)
    shutil.copytree(REPO / "bundles", root / "bundles",
                    ignore=shutil.ignore_patterns("__pycache__", ".*"))
    for name in ("counter", "hello", "greeter"):
        rebind(root / "bundles" / name / "bundle.toml", ports[name])
    counter = ports["counter"]

    say(f"1. hotsup start config.toml: the demo's three bundles, in a copy at {root}")
    print("$ hotsup start config.toml &")
    local = Supervisor(root, "config.toml")
    supervisors = [local]
    try:
        local.start()
        local.wait(r"hotsup \d+ serving 3 bundle\(s\)")
        for _ in range(3):
            incr(counter)

        say('2. state and a connection across a swap: a client stays connected while '
            'bundles/counter/bundle.toml gets greeting = "hey"')
        with socket.create_connection(("127.0.0.1", counter), timeout=10) as client:
            incr(counter, client)
            edit(root / "bundles/counter/bundle.toml", 'greeting = "hi"', 'greeting = "hey"')
            local.wait(r"counter@2: swapped from counter@1")
            answer = incr(counter, client)
        if not answer.startswith("count=5 mine=2 generation=2 greeting=hey"):
            raise TourFailed(f"expected count=5 mine=2 from generation 2, got {answer!r}")
        print("  (new code, old count; the client's connection moved to generation 2 with its "
              "own count, mine)")

        say("3. a broken edit is rolled back: a syntax error in bundles/counter/counter.py")
        module = root / "bundles/counter/counter.py"
        good = module.read_text()
        save(module, good + "\ndef broken(:\n")
        local.wait(r"swap to counter@3 rolled back, counter@2 keeps serving")
        incr(counter)
        run(root, "status")
        print("  ... and the fix swaps again (generation numbers count attempts):")
        save(module, good)
        local.wait(r"counter@4: swapped from counter@2")
        incr(counter)

        say('4. a WebSocket survives a swap: greeter (websockets = "resume"), '
            'GREETING = "hey" in bundles/greeter/greeter.py')
        url = f"ws://127.0.0.1:{ports['greeter']}/ws"
        print(f"$ python3 -m websockets {url}   # (the websockets client, kept open)")
        with ws_connect(url, open_timeout=10) as ws:
            greet(ws, "alice")
            edit(root / "bundles/greeter/greeter.py", 'GREETING = "hello"', 'GREETING = "hey"')
            local.wait(r"greeter@2: swapped from greeter@1")
            answer = greet(ws, "alice")
        if answer != "hey, alice (generation 2, resumed)":
            raise TourFailed(f"expected the new code on the same WebSocket, got {answer!r}")
        print("  (the same WebSocket, no close and no second handshake: now the new code "
              "answers)")

        say("5. hotsup push to a second supervisor (staging), over CURVE")
        run(root, "keygen", "server", "--dir", "keys")
        run(root, "keygen", "alice", "--dir", "keys")
        (root / "authorized").mkdir(mode=0o755)
        shutil.copy(root / "keys/alice.key", root / "authorized/alice.key")
        print("$ cp keys/alice.key authorized/   # alice may push")
        (root / "staging").mkdir()
        (root / "staging/bundles").mkdir()
        endpoint = f"tcp://127.0.0.1:{ports['remote']}"
        (root / "staging/staging.toml").write_text(
            '[supervisor]\nbundles_dir = "bundles"\nrun_dir = ".hotsup"\n\n[remote]\n'
            f'bind = "{endpoint}"\nkey = "../keys/server.key_secret"\n'
            'authorized_keys = "../authorized"\n')
        print("$ cat staging/staging.toml")
        for line in (root / "staging/staging.toml").read_text().splitlines():
            print(f"  {line}".rstrip())
        print("$ hotsup start staging/staging.toml &")
        staging = Supervisor(root / "staging", "staging.toml")
        supervisors.append(staging)
        staging.start()
        staging.wait(r"remote: listening on")
        laptop = root / "laptop/counter"
        shutil.copytree(root / "bundles/counter", laptop,
                        ignore=shutil.ignore_patterns("__pycache__"))
        rebind(laptop / "bundle.toml", ports["staging"])
        print(f"$ cp -r bundles/counter laptop/   # on staging it binds 127.0.0.1:"
              f"{ports['staging']}")
        push = ["push", "laptop/counter", "--to", endpoint, "--key", "keys/alice.key_secret",
                "--server-key", "keys/server.key"]
        run(root, *push)
        staging.wait(r"counter@1: serving")
        incr(ports["staging"])
        incr(ports["staging"])
        edit(laptop / "bundle.toml", 'greeting = "hey"', 'greeting = "from the laptop"')
        print('  (laptop/counter/bundle.toml: greeting = "from the laptop")')
        run(root, *push)
        staging.wait(r"counter@2: swapped from counter@1")
        answer = incr(ports["staging"])
        if not answer.startswith("count=3 mine=1 generation=2"):
            raise TourFailed(f"expected count=3 from generation 2 on staging, got {answer!r}")

        say("6. hotsup shutdown: every bundle drains, the ports close")
        run(root, "shutdown", "-c", "staging/staging.toml")
        run(root, "shutdown")
        local.wait(r"hotsup stopped")
    finally:
        for sup in supervisors:
            sup.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--any-port", action="store_true",
                        help="free ports only, never the demo's (tests; beside a make run)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args(argv)
    started = time.monotonic()
    with workspace(args.keep) as root:
        try:
            tour(root, pick_ports(args.any_port))
        except (TourFailed, OSError, subprocess.SubprocessError) as exc:
            print(f"\ntour failed: {exc}", file=sys.stderr)
            for log in sorted(root.rglob("*.log")):
                print(f"----- {log.name} -----\n{log.read_text(errors='replace')}",
                      file=sys.stderr)
            return 1
    print(f"\n== the tour took {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
