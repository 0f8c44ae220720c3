"""The servers under test: how each one serves the app, and what a reload takes.

- ``hotsup``: ``hotsup start config.toml`` with the app as a ``kind = "asgi"``
  bundle; a write to the bundle's file is the whole reload. The slow-import
  variant's framework is in ``preload``, so the zygote imports it once.
- ``uvicorn_reload``: ``uvicorn --reload`` watching the app directory (its
  own watchfiles reloader: a new process per change).
- ``gunicorn_hup``: ``gunicorn -k uvicorn.workers.UvicornWorker`` with one
  worker; the bench sends the master SIGHUP right after each write (it forks
  new workers, which import the app afresh, and stops the old ones).
- ``uvicorn``: plain ``uvicorn``, no reload: the throughput reference.

Each runs in its own temporary directory, in its own session (``Sessions``),
on a port from ``free_port()``, with its output in ``server.log``. Every
contender gets ``PRELOAD_DIR`` on ``PYTHONPATH``: hotsup's zygote needs it to
preload ``slow_framework``; the peers' app needs it to import the module.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from subprocess import Popen

import asgi_apps
from asgi_apps import ENTRY, MODULE, PRELOAD_DIR, Variant
from clients import HOST, free_port
from sessions import Sessions

LOG = "server.log"


@dataclass
class Server:
    """A started contender: where it listens, which file to rewrite, what follows a write."""

    contender: Contender
    port: int
    proc: Popen[bytes]
    app_file: Path
    log: Path
    after_write: Callable[[], None]

    def write(self, variant: Variant, version: str) -> None:
        """Rewrite the app as ``version`` and trigger the reload, as a developer would."""
        asgi_apps.save(self.app_file, asgi_apps.source(variant, version))
        self.after_write()


@dataclass(frozen=True)
class Contender:
    """One way of serving (and reloading) the app."""

    name: str  # its key in the JSON
    label: str  # its name in the table
    reloads: bool  # has a swap phase
    requires: str | None = None  # a module it needs that only the bench extra installs
    #: A line of its log that means it will not serve (only to fail fast: the
    #: start deadline catches the rest).
    fatal: str | None = None

    def missing(self) -> str | None:
        """Why this contender cannot run here, or None."""
        if self.requires and importlib.util.find_spec(self.requires) is None:
            return f"{self.requires} is not installed (pip install -e '.[bench]')"
        return None

    def launch(self, work: Path, variant: Variant, sessions: Sessions,
               watch_quiet_ms: int, manifest: str = "") -> Server:
        """Write the app (version ``v0``) under ``work`` and start serving it;
        ``manifest``: more lines of hotsup's bundle.toml."""
        work.mkdir(parents=True)
        port = free_port()
        if self.name == "hotsup":
            app_dir = work / "bundles" / "app"
            app_dir.mkdir(parents=True)
            _hotsup_files(work, app_dir, variant, port, watch_quiet_ms, manifest)
            argv = [sys.executable, "-m", "hotsup.supervisor.cli", "start", "config.toml"]
            cwd = work
        else:
            app_dir = work / "app"
            app_dir.mkdir()
            argv = self._peer_argv(app_dir, port)
            cwd = app_dir
        app_file = app_dir / f"{MODULE}.py"
        asgi_apps.save(app_file, asgi_apps.source(variant, "v0"))
        proc = sessions.start(argv, cwd, work / LOG, self._env())
        after_write = (lambda: os.kill(proc.pid, signal.SIGHUP)) if self.name == "gunicorn_hup" \
            else (lambda: None)
        return Server(self, port, proc, app_file, work / LOG, after_write)

    def _peer_argv(self, app_dir: Path, port: int) -> list[str]:
        uvicorn = [sys.executable, "-m", "uvicorn", ENTRY, "--host", HOST, "--port", str(port),
                   "--app-dir", str(app_dir), "--no-access-log"]
        if self.name == "uvicorn_reload":
            return [*uvicorn, "--reload", "--reload-dir", str(app_dir)]
        if self.name == "gunicorn_hup":
            # One worker, as the others serve from one process; a short
            # graceful timeout so an old worker cannot linger for 30 s.
            return [sys.executable, "-m", "gunicorn", ENTRY, "-k", "uvicorn.workers.UvicornWorker",
                    "-w", "1", "-b", f"{HOST}:{port}", "--chdir", str(app_dir),
                    "--graceful-timeout", "5"]
        return uvicorn

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(PRELOAD_DIR), env.get("PYTHONPATH", "")) if p)
        if self.name == "hotsup":
            # hotsup must not serve a stale .pyc of a file rewritten at the
            # same size within a second; measure it with bytecode caching on.
            env.pop("PYTHONDONTWRITEBYTECODE", None)
        else:
            # The peers import the rewritten app in a fresh process, where a
            # same-size rewrite within a second would load the old code from
            # its .pyc: the swap would never show. No .pyc for them.
            env["PYTHONDONTWRITEBYTECODE"] = "1"
        return env


def _hotsup_files(work: Path, app_dir: Path, variant: Variant, port: int,
                  watch_quiet_ms: int, manifest: str = "") -> None:
    preload = ", ".join(f'"{name}"' for name in variant.preload)
    (work / "config.toml").write_text(
        "[supervisor]\n"
        'bundles_dir = "bundles"\n'
        'run_dir = ".hotsup"\n'
        f"preload = [{preload}]\n"
        f"watch_quiet_ms = {watch_quiet_ms}\n"
        # warning: no access log, as the peers run with --no-access-log (the
        # worker's uvicorn logs each request at info, relayed by the supervisor).
        'log_level = "warning"\n')
    (app_dir / "bundle.toml").write_text(
        f'entry = "{ENTRY}"\n'
        'kind = "asgi"\n'
        'version = "1.0.0"\n'
        f"{manifest}"
        "\n[sockets.http]\n"
        f'bind = "{HOST}:{port}"\n')


CONTENDERS = {c.name: c for c in (
    Contender("hotsup", "hotsup", reloads=True, fatal=r" ERROR +hotsup: app: .*"),
    Contender("uvicorn_reload", "uvicorn --reload", reloads=True),
    Contender("gunicorn_hup", "gunicorn + HUP", reloads=True, requires="gunicorn"),
    Contender("uvicorn", "uvicorn (no reload)", reloads=False),
)}
#: Who hotsup's figures are compared with, per figure kind.
SWAP_PEERS = ("uvicorn_reload", "gunicorn_hup")
THROUGHPUT_PEERS = ("uvicorn", "uvicorn_reload", "gunicorn_hup")
