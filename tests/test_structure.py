"""Rules of the code's shape that a reader relies on, checked."""

from __future__ import annotations

import ast
import io
import subprocess
import sys
from pathlib import Path

import pytest
from hotsup.supervisor import commands, control
from hotsup.supervisor.config import load_config
from hotsup.supervisor.logs import LogSink
from hotsup.supervisor.server import Supervisor

pytestmark = pytest.mark.timeout(30)

ROOT = Path(__file__).resolve().parent.parent


def test_every_wire_command_has_a_handler_and_a_help(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text("")
    supervisor = Supervisor(load_config(tmp_path / "config.toml"), LogSink(io.StringIO()))
    for name, kind in commands.WIRE.items():
        assert kind in supervisor._dispatch, f"{name}: no handler"
        assert kind.help(), f"{name}: no help"
    assert commands.FilesChanged in supervisor._dispatch


def test_a_request_builds_its_command_from_its_schema() -> None:
    _, request = control.parse_request([b'{"v": 1, "cmd": "logs", "args": {"wait": 99}}'])
    command = commands.WIRE[request.cmd].from_request(request.args, reply=None)  # type: ignore[arg-type]
    assert command == commands.Logs(name=None, after=0, limit=commands.DEFAULT_LIMIT,
                                    wait=commands.MAX_WAIT)


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            found.add("." * node.level + (node.module or ""))
    return found


def test_the_worker_never_imports_the_supervisor() -> None:
    for path in sorted((ROOT / "worker").glob("*.py")):
        bad = {name for name in _imports(path)
               if name.startswith(("hotsup.supervisor", "..supervisor", "supervisor"))}
        assert not bad, f"{path.name} imports {bad}"
    # And at run time, whatever the worker's modules pull in between them.
    code = ("import sys, hotsup.worker.runtime, hotsup.worker.zygote; "
            "print([m for m in sys.modules if m.startswith('hotsup.supervisor')])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=20, check=True)
    assert done.stdout.strip() == "[]"
