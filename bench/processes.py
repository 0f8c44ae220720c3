"""The processes a benchmark starts: stopping them, and what /proc says about them.

``hotsup start`` runs with ``start_new_session=True``, so its pid is also its
session id: the zygote and every worker stay in that session (each in a
process group of its own), which is how the leftovers of a run are found and
killed, by pid, never by name.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

STOP_WAIT = 30.0


#: The config.toml of a benchmark's supervisor: the demo's, run_dir inside the work directory.
SUPERVISOR_CONFIG = """\
[supervisor]
bundles_dir = "bundles"
run_dir = ".hotsup"
watch_quiet_ms = 30
watch_batch_ms = 1600
log_level = "info"
"""

@dataclass(frozen=True)
class ProcStat:
    pid: int
    state: str  # "R", "S", "Z", ...
    ppid: int
    session: int
    name: str = ""  # the command name (hotsup names its workers and its spare)


def proc_stat(pid: int) -> ProcStat | None:
    """``/proc/PID/stat``'s state, parent and session; None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            text = handle.read()
    except OSError:
        return None
    # The command name, in parentheses, may itself contain spaces and ")".
    fields = text[text.rindex(")") + 2:].split()
    name = text[text.index("(") + 1:text.rindex(")")]
    return ProcStat(pid, fields[0], int(fields[1]), int(fields[3]), name)


def all_processes() -> list[ProcStat]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (info := proc_stat(int(entry))) is not None:
            found.append(info)
    return found


def session_pids(sid: int) -> list[int]:
    """Every live (non-zombie) process of session ``sid``."""
    return [p.pid for p in all_processes() if p.session == sid and p.state != "Z"]


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def open_fds(pid: int) -> int | None:
    """How many fds ``pid`` has open; None if it is gone."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def rss_kib(pid: int) -> int | None:
    """``VmRSS`` of ``pid`` in KiB; None if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def stop_process(proc: subprocess.Popen[bytes] | None, group: bool) -> None:
    """SIGTERM, wait; then SIGKILL (the whole process group, for the supervisor)."""
    if proc is None:
        return
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(STOP_WAIT if group else 5.0)
    if group:
        # start_new_session=True: its pgid is its pid. The zygote and workers
        # have groups of their own and leave when the supervisor is gone.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    elif proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5.0)


def kill_session(sid: int) -> list[int]:
    """SIGKILL, by pid, whatever of session ``sid`` is still alive: what was there."""
    left = session_pids(sid)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return left


def notable_log_lines(path: Path, limit: int = 30) -> list[str]:
    """The first ERROR/WARNING/CRITICAL/traceback lines of a supervisor log."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    keys = (" ERROR ", " WARNING ", " CRITICAL ", "Traceback", " OUTPUT ")
    return [line for line in lines if any(k in line for k in keys)][:limit]
