"""The processes a benchmark starts: each in its own session, all ended at the end.

Every server under test is started with ``start_new_session=True``, so its
session id is its pid and every process it spawns (a zygote, workers, a
reloader's children, gunicorn's workers) carries that id. Stopping is: ask
(SIGTERM to the leader), wait until a deadline, then SIGKILL every process
still in the session, by pid, and reap the leader. Nothing is ever found by
name. ``Processes`` is a context manager that does this for whatever is still
running when the benchmark ends, also on Ctrl-C or an exception.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
from pathlib import Path
from types import TracebackType

HOST = "127.0.0.1"


def free_port() -> int:
    """A port the kernel just handed out on 127.0.0.1 (bind to 0, read it, let go)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


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
            continue  # gone meanwhile
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(entry))
    return pids


def stop_session(proc: subprocess.Popen[bytes] | None, grace: float) -> None:
    """SIGTERM the session leader, wait ``grace`` seconds, SIGKILL what is left, reap.

    ``proc`` must have been started with ``start_new_session=True``; None does nothing.
    """
    if proc is None:
        return
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace)
    # The leader may be gone while its children are not (a worker whose
    # supervisor was killed, a reloader's child): the session still names them.
    for pid in session_pids(proc.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5.0)


class Processes:
    """Owns every process started through ``start()``; ``__exit__`` stops them all."""

    def __init__(self, grace: float = 10.0) -> None:
        self.grace = grace
        self._running: list[subprocess.Popen[bytes]] = []

    def start(self, argv: list[str], cwd: Path, log: Path,
              env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start ``argv`` in its own session, stdout and stderr appended to ``log``."""
        with open(log, "ab") as out:
            proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self._running.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        stop_session(proc, self.grace)
        if proc in self._running:
            self._running.remove(proc)

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        # After an error or Ctrl-C nobody waits for a graceful drain.
        grace = self.grace if kind is None else 2.0
        while self._running:
            stop_session(self._running.pop(), grace)


def notable_log_lines(path: Path, limit: int = 30) -> list[str]:
    """Errors, warnings and tracebacks of a log file, for the report."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    keys = (" ERROR ", " WARNING ", " CRITICAL ", "Traceback", " OUTPUT ")
    return [line for line in lines if any(k in line for k in keys)][:limit]
