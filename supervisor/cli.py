"""The ``hotsup`` command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .config import ConfigError, check, load_config, preload_conflicts


def _start(args: argparse.Namespace) -> int:
    try:
        config = load_config(Path(args.config))
        conflicts = preload_conflicts(config, list(config.sources().values()))
        if conflicts:
            raise ConfigError(conflicts)
    except ConfigError as exc:
        for line in exc.problems:
            print(f"hotsup: {line}", file=sys.stderr)
        return 2
    from .server import run  # the event loop and zmq only for the command that needs them

    return run(config)


def _check(args: argparse.Namespace) -> int:
    problems = check(Path(args.config))
    for line in problems:
        print(line, file=sys.stderr)
    if problems:
        print(f"hotsup check: {len(problems)} problem(s)", file=sys.stderr)
        return 1
    print(f"hotsup check: {args.config} is fine")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hotsup",
        description="A process-isolated reloading supervisor for Python bundles.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    start = commands.add_parser("start", help="run the supervisor in the foreground")
    start.add_argument("config", nargs="?", default="config.toml")
    start.set_defaults(func=_start)
    checker = commands.add_parser("check", help="validate config.toml and every bundle")
    checker.add_argument("config", nargs="?", default="config.toml")
    checker.set_defaults(func=_check)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
