"""Servers a benchmark starts, each in a session of its own, all stopped at the end.

Every server under test is started with ``start_new_session=True``, so its
session id is its pid and every process it spawns (a zygote and workers, a
reloader's child, gunicorn's workers) carries that id. Stopping one is: ask
(SIGTERM to the leader), wait until a deadline, SIGKILL by pid whatever is
still in the session (``processes.kill_session``), reap the leader. Nothing
is ever found by name. ``Sessions`` does this for whatever is still running
when the benchmark ends, also on Ctrl-C or an exception.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
from pathlib import Path
from types import TracebackType

from processes import kill_session


def stop_session(proc: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM the session leader, wait ``grace`` seconds, SIGKILL what is left, reap."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace)
    # The leader may be gone while processes it started are not (a reloader's
    # child, a worker of a supervisor that was killed): the session names them.
    kill_session(proc.pid)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5.0)


class Sessions:
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

    def __enter__(self) -> Sessions:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        # After an error or Ctrl-C nobody waits for a graceful drain.
        grace = self.grace if kind is None else 2.0
        while self._running:
            stop_session(self._running.pop(), grace)
