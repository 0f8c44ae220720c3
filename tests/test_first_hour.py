"""What a new user meets in the first hour (issue 14): the command line and its messages."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from harness import Hotsup, request, serve_counter
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
