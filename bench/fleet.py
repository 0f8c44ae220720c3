"""A ``hotsup start`` over N copies of the benchmark counter bundle, in a work directory.

The benchmarks that measure the supervisor itself (``cli_latency``,
``swap_breakdown``, ``idle_cost``, ``many_bundles``) share it: each bundle is
``swap_latency``'s counter (``counter-0`` ... on ports the kernel picked), the
supervisor runs in a session of its own (``processes``), and ``stop()`` leaves
nothing behind: SIGTERM, then SIGKILL by pid of whatever is left in the session.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from clients import HOST, free_port, probe
from processes import SUPERVISOR_CONFIG, kill_session, stop_process
from swap_latency import BUNDLE_MODULE, BUNDLE_TOML, REPLY, write_text

START_DEADLINE = 120.0


def bench_env() -> dict[str, str]:
    """The environment of what a benchmark times: bytecode caching on, as users
    have it (a test runner's PYTHONDONTWRITEBYTECODE would make every command
    compile its modules again)."""
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


class Fleet:
    """``count`` counter bundles under one supervisor, in ``work``."""

    def __init__(self, work: Path, count: int, log_level: str = "warning",
                 config_extra: str = "") -> None:
        self.work = work
        self.count = count
        self.config = work / "config.toml"
        self.log_path = work / "hotsup.log"
        self.ports = [free_port() for _ in range(count)]
        self.names = [f"counter-{i}" for i in range(count)]
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0  # time.monotonic() just before the supervisor's fork
        config = SUPERVISOR_CONFIG.replace('log_level = "info"', f'log_level = "{log_level}"')
        write_text(self.config, config + config_extra)
        for name, port in zip(self.names, self.ports, strict=True):
            bundle = work / "bundles" / name
            bundle.mkdir(parents=True)
            write_text(bundle / "bundle.toml", BUNDLE_TOML.format(host=HOST, port=port))
            write_text(bundle / "counter.py", BUNDLE_MODULE.format(tag="v0"))

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.started_at = time.monotonic()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "hotsup.supervisor.cli", "start", str(self.config)],
                cwd=self.work, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, env=bench_env())

    def wait_all_serving(self, deadline: float = START_DEADLINE) -> float:
        """Seconds from ``start()`` until every bundle answered a ``get``."""
        assert self.proc is not None
        waiting = set(self.ports)
        ends = time.monotonic() + deadline
        while waiting:
            if self.proc.poll() is not None:
                raise RuntimeError(f"hotsup exited ({self.proc.returncode}) before serving; "
                                   f"see {self.log_path}")
            if time.monotonic() > ends:
                raise RuntimeError(f"{len(waiting)} of {self.count} bundles not serving "
                                   f"within {deadline:g}s; see {self.log_path}")
            waiting = {port for port in waiting if not probe(port, REPLY)}
            if waiting:
                time.sleep(0.005)  # a poll interval, not a synchronisation
        return time.monotonic() - self.started_at

    def cli(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "hotsup.supervisor.cli", *args,
                               "-c", str(self.config)], cwd=self.work, capture_output=True,
                              text=True, timeout=timeout, env=bench_env())

    def status(self) -> dict[str, Any]:
        done = self.cli("status", "--json")
        if done.returncode != 0:
            raise RuntimeError(f"hotsup status failed: {done.stderr.strip()}")
        result: dict[str, Any] = json.loads(done.stdout)
        return result

    def pids(self) -> dict[str, int]:
        """The supervisor's own processes by role: supervisor, zygote, control
        endpoint, spare; and each worker by bundle name."""
        from processes import all_processes, cmdline

        assert self.proc is not None
        found: dict[str, int] = {"supervisor": self.proc.pid}
        for info in all_processes():
            if info.session != self.proc.pid or info.state == "Z" or info.pid == self.proc.pid:
                continue
            argv = " ".join(cmdline(info.pid))
            if "hotsup.worker.zygote" in argv and info.name != "hotsup-spare" \
                    and "@" not in info.name:
                found["zygote"] = info.pid
            elif "control_endpoint" in argv:
                found["control_endpoint"] = info.pid
            else:
                found[info.name] = info.pid
        return found

    def stop(self) -> int | None:
        """SIGTERM, wait, SIGKILL what is left; the supervisor's exit status."""
        if self.proc is None:
            return None
        stop_process(self.proc, group=True)
        kill_session(self.proc.pid)
        return self.proc.returncode
