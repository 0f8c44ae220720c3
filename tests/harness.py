"""Test harness: a real ``hotsup start`` in a temporary directory, and a real load.

Everything waits on a condition with a deadline; nothing sleeps to synchronise.
The supervisor runs in its own session, so every process it started (zygote,
workers, their children) can be found by session id and, if a test fails,
killed by pid: never by name.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEADLINE = 15.0


def wait_for(condition: Callable[[], object], timeout: float = DEADLINE, what: str = "") -> object:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what or condition}")
        time.sleep(0.01)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def request(port: int, line: str = "incr", timeout: float = 5.0) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(line.encode() + b"\n")
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    return data.decode().strip()


@contextlib.contextmanager
def idle_client(port: int) -> Iterator[socket.socket]:
    """A client whose connection was served once and then just stays open."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"get\n")
        assert sock.recv(100).startswith(b"count="), "the idle client was served"
        yield sock


def save(path: Path, text: str, mtime_ns: int | None = None) -> None:
    """Write a file the way editors save: a hidden temp file, renamed over the
    old one. The watcher never sees it half-written (a plain write_text
    truncates first, and a busy machine can pause the writer in between)."""
    temp = path.with_name(f".{path.name}.saving")
    temp.write_text(text)
    if mtime_ns is not None:
        os.utime(temp, ns=(mtime_ns, mtime_ns))
    os.replace(temp, path)


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def session_pids(sid: int) -> list[int]:
    """Every live (non-zombie) process whose session id is ``sid``."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                stat = handle.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        state, session = fields[0], int(fields[3])
        if session == sid and state != "Z":
            pids.append(int(entry))
    return pids


# -- bundles --------------------------------------------------------------------

#: Module source for a hostile bundle's tests: ``channel()`` finds this worker's
#: own channel to the supervisor among its fds (a dup the caller closes).
FIND_CHANNEL = """\
import fcntl, os, socket

def channel():
    for name in os.listdir("/proc/self/fd"):
        try:
            sock = socket.socket(fileno=os.dup(int(name)))
        except OSError:
            continue
        if sock.family == socket.AF_UNIX and sock.type == socket.SOCK_SEQPACKET:
            return sock
        sock.close()
"""


def counter_source(tag: str, *, start: str = "pass", restore: str = "pass",
                   init: str = "pass", tail: str = "", hooks: bool = True,
                   snapshot: str = "pass") -> str:
    """A counter bundle module; the one-line fragments inject faults into its hooks."""
    lines = [
        "import asyncio",
        "",
        f"TAG = {tag!r}",
        "",
        "",
        "class Counter:",
        "    def __init__(self, ctx):",
        f"        {init}",
        "        self.ctx = ctx",
        "        self.count = 0",
        "",
    ]
    if hooks:
        lines += [
            "    def snapshot(self):",
            f"        {snapshot}",
            '        return {"count": self.count}',
            "",
            "    def restore(self, state):",
            f"        {restore}",
            '        self.count = state["count"]',
            "",
        ]
    lines += [
        "    async def start(self):",
        f"        {start}",
        '        await self.ctx.serve("main", self.handle)',
        "",
        "    async def handle(self, reader, writer):",
        "        while line := await reader.readline():",
        '            if line.strip() == b"incr":',
        "                self.count += 1",
        '            if line.strip() == b"slow":  # a request that takes a second',
        '                print("slow request accepted", flush=True)',
        "                await asyncio.sleep(1.0)",
        "            gen = self.ctx.generation",
        '            writer.write(f"count={self.count} generation={gen} tag={TAG}\\n".encode())',
        "            await writer.drain()",
        "",
    ]
    return "\n".join(lines) + tail


def write_bundle(directory: Path, source: str, port: int, module: str = "counter",
                 extra: str = "") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "bundle.toml").write_text(
        f'entry = "{module}:Counter"\nversion = "1.0"\n{extra}\n'
        f'[sockets.main]\nbind = "127.0.0.1:{port}"\n')
    (directory / f"{module}.py").write_text(source)
    return directory


# -- the supervisor ---------------------------------------------------------------

def serve_counter(sup: Hotsup, **source: str) -> int:
    """The usual first step: a counter bundle (``counter_source(**source)``) on a
    free port, started and serving; its port."""
    port = free_port()
    write_bundle(sup.bundles / "counter", counter_source("v0", **source), port)
    sup.start_serving("counter")
    return port


class Hotsup:
    """A ``hotsup start`` subprocess over a config in ``root``."""

    def __init__(self, root: Path, config_extra: str = "") -> None:
        self.root = root
        self.bundles = root / "bundles"
        self.bundles.mkdir(exist_ok=True)
        self.config = root / "config.toml"
        self.config.write_text(textwrap.dedent("""\
            [supervisor]
            bundles_dir = "bundles"
            run_dir = ".hotsup"
            log_level = "debug"
            """) + config_extra)
        self.log_path = root / "hotsup.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, env: dict[str, str] | None = None) -> Hotsup:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "hotsup.supervisor.cli", "start", str(self.config)],
                cwd=self.root, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, env=env,
            )
        return self

    def start_serving(self, *names: str, env: dict[str, str] | None = None) -> Hotsup:
        """Start, and wait until generation 1 of each bundle named serves."""
        self.start(env)
        for name in names:
            self.wait_log(rf"{re.escape(name)}@1: serving")
        return self

    def status(self) -> dict[str, dict[str, Any]]:
        """``hotsup status --json``: each bundle's object, by name."""
        done = self.cli("status", "--json")
        assert done.returncode == 0, done.stderr
        return {b["name"]: b for b in json.loads(done.stdout)["bundles"]}

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, pattern: str, timeout: float = DEADLINE, count: int = 1) -> str:
        regex = re.compile(pattern)

        def found() -> str | None:
            matches = regex.findall(self.log())
            return matches[count - 1] if len(matches) >= count else None

        def alive_or_found() -> object:
            hit = found()
            if hit is None and self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"hotsup exited ({self.proc.returncode}) while waiting "
                                     f"for {pattern!r}")
            return hit

        return str(wait_for(alive_or_found, timeout, f"log line {pattern!r} (#{count})"))

    def cli(self, *args: str, timeout: float = 60.0,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``hotsup ARGS -c config.toml`` (the command line against this
        supervisor) to its end."""
        command = [sys.executable, "-m", "hotsup.supervisor.cli", *args]
        if args and args[0] not in ("start", "check"):
            command += ["-c", str(self.config)]
        return subprocess.run(command, cwd=self.root, capture_output=True, text=True,
                              timeout=timeout, env=env)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait: the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def leftovers(self) -> list[int]:
        return session_pids(self.pid) if self.proc is not None else []

    def kill_everything(self) -> None:
        """Last resort for a failed test: SIGKILL each process of our session, by pid."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for pid in session_pids(self.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


# -- load -------------------------------------------------------------------------

@dataclass
class Reply:
    at: float
    client: int
    count: int
    generation: int
    tag: str


@dataclass
class Load:
    """``clients`` threads, each: connect, ``incr``, read the reply, close; until stopped.

    Bounded: every client stops by itself after ``limit`` seconds.
    """

    port: int
    clients: int = 4
    limit: float = 100.0
    timeout: float = 20.0
    replies: list[Reply] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Condition()
        self._threads = [threading.Thread(target=self._client, args=(i,), daemon=True)
                         for i in range(self.clients)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(self.timeout + 5)

    def _client(self, index: int) -> None:
        ends = time.monotonic() + self.limit
        pattern = re.compile(r"count=(\d+) generation=(\d+) tag=(\S+)")
        while not self._stop.is_set() and time.monotonic() < ends:
            try:
                text = self.ask(index)
                match = pattern.fullmatch(text)
                if match is None:
                    raise ValueError(f"bad reply {text!r}")
            except (OSError, ValueError) as exc:
                with self._lock:
                    self.failures.append(f"client {index}: {type(exc).__name__}: {exc}")
                    self._lock.notify_all()
                continue
            reply = Reply(time.monotonic(), index, int(match[1]), int(match[2]), match[3])
            with self._lock:
                self.replies.append(reply)
                self._lock.notify_all()
            time.sleep(0.002)  # pacing, so the clients leave the swap some CPU

    def ask(self, index: int) -> str:
        """One request of client ``index``: its reply, ``count=N generation=G tag=T``."""
        return request(self.port, "incr", self.timeout)

    def wait_reply(self, predicate: Callable[[Reply], bool], timeout: float = DEADLINE,
                   after: float = 0.0) -> Reply:
        """The first reply at or after ``after`` that satisfies ``predicate``."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                for reply in self.replies:
                    if reply.at >= after and predicate(reply):
                        return reply
                left = deadline - time.monotonic()
                if left <= 0:
                    last = self.replies[-1] if self.replies else None
                    raise AssertionError(f"no matching reply within {timeout:g}s; last: {last}; "
                                         f"failures: {self.failures[-3:]}")
                self._lock.wait(left)

    def assert_consistent(self) -> None:
        """Zero failures, and the count neither reset nor forked: every count once."""
        assert not self.failures, self.failures[:5]
        counts = sorted(r.count for r in self.replies)
        assert counts == list(range(1, len(counts) + 1)), _first_gap(counts)
        for client in range(self.clients):
            mine = [r.count for r in self.replies if r.client == client]
            assert mine == sorted(mine), f"client {client} saw its count go backwards"


def _first_gap(counts: list[int]) -> str:
    for expected, got in enumerate(counts, start=1):
        if expected != got:
            return f"expected count {expected}, got {got} (of {len(counts)} replies)"
    return "ok"
