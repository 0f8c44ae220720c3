"""The ``hotsup`` command line.

``start`` and ``check`` work on a config file. The other commands talk to a
running supervisor over its control socket (see ``control``), found through
``-c FILE`` (its run_dir), else ``HOTSUP_RUN_DIR``, else ``./config.toml``;
or, with ``--to tcp://HOST:PORT`` (or ``HOTSUP_REMOTE``), to a remote one over
CURVE (``remote``), with ``--key``/``HOTSUP_KEY`` (our secret certificate) and
``--server-key``/``HOTSUP_SERVER_KEY`` (its public one). ``keygen`` writes a
certificate pair, ``push`` sends a bundle directory (``push``).

Exit codes: 0 done; 1 the supervisor carried the command out and it failed (a
reload rolled back, an unknown bundle) or ``check`` found problems; 2 a usage
or config error; 3 no supervisor could be reached (none running, not ours, or
no answer in time): the message says which, in one line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

# Only what every command needs: a command to a running supervisor is a fresh
# process each time, and its imports were most of its time (`start` imports
# the event loop, `logs` the records, `push --watch` watchfiles, `--help` the
# commands' help lines: each its own).
from .control import ControlClient, ControlError, RemoteClient, Unreachable

if TYPE_CHECKING:
    from .logs import LogRecord

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3

#: Seconds to wait for the answer to a query (status, logs).
QUERY_TIMEOUT = 5.0


class UsageError(Exception):
    pass


def _start(args: argparse.Namespace) -> int:
    from .config import ConfigError, load_config, preload_conflicts

    try:
        config = load_config(Path(args.config))
        conflicts = preload_conflicts(config, list(config.sources().values()))
        if conflicts:
            raise ConfigError(conflicts)
    except ConfigError as exc:
        for line in exc.problems:
            print(f"hotsup: {line}", file=sys.stderr)
        return EXIT_USAGE
    from .server import run  # the event loop and zmq only for the command that needs them

    return run(config, json_logs=args.json)


def _check(args: argparse.Namespace) -> int:
    from .config import check

    problems = check(Path(args.config))
    for line in problems:
        print(line, file=sys.stderr)
    if problems:
        print(f"hotsup check: {len(problems)} problem(s)", file=sys.stderr)
        return EXIT_FAILED
    print(f"hotsup check: {args.config} is fine")
    return EXIT_OK


# -- commands to a running supervisor ---------------------------------------------------

#: Clients made by this command, closed when it ends.
_clients: list[ControlClient | RemoteClient] = []


def _client(args: argparse.Namespace) -> ControlClient | RemoteClient:
    """The supervisor to talk to: ``--to``, else ``-c``, else ``HOTSUP_REMOTE``,
    else ``HOTSUP_RUN_DIR``, else ``./config.toml``."""
    to = getattr(args, "to", None)
    if to is None and args.config is None:
        to = os.environ.get("HOTSUP_REMOTE") or None
    if to is not None:
        key = getattr(args, "key", None) or os.environ.get("HOTSUP_KEY")
        server_key = getattr(args, "server_key", None) or os.environ.get("HOTSUP_SERVER_KEY")
        if not key or not server_key:
            raise UsageError(f"{to}: give --key SECRET and --server-key PUBLIC (or "
                             f"HOTSUP_KEY and HOTSUP_SERVER_KEY)")
        if not to.startswith("tcp://"):
            raise UsageError(f"--to {to}: expected tcp://HOST:PORT")
        try:
            remote = RemoteClient(to, key, server_key)
        except ControlError as exc:
            raise UsageError(str(exc)) from None
        _clients.append(remote)
        return remote
    if args.config is not None:
        return ControlClient(_run_dir(Path(args.config)))
    env = os.environ.get("HOTSUP_RUN_DIR")
    if env:
        return ControlClient(Path(env).absolute())
    return ControlClient(_run_dir(Path("config.toml")))


def _run_dir(config: Path) -> Path:
    from .rundir import RunDirError, run_dir_of

    try:
        return run_dir_of(config)
    except RunDirError as exc:
        raise UsageError(f"{exc} (use -c FILE or HOTSUP_RUN_DIR)") from None


def _status(args: argparse.Namespace) -> int:
    result = _client(args).request("status", QUERY_TIMEOUT)
    if args.json:
        print(json.dumps({"bundles": result["bundles"], "supervisor": result["supervisor"]},
                         indent=2))
        return EXIT_OK
    rows = [["BUNDLE", "STATE", "GEN", "PID", "UPTIME", "RESTARTS", "VERSION", "PSS",
             "LAST SWAP", "LAST ERROR"]]
    for b in result["bundles"]:
        swap = "-"
        if b.get("last_swap_at") is not None:
            swap = time.strftime("%H:%M:%S", time.localtime(b["last_swap_at"]))
            swap += f" ({b['last_swap_ms']:g} ms)"
        rows.append([b["name"], b["state"], _text(b["generation"]), _text(b["pid"]),
                     _duration(b.get("uptime")), str(b["restarts"]), _text(b["version"]),
                     _mib(b.get("pss_kib")), swap, _text(b["last_error"])])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=True)]
        print("  ".join([*cells, row[-1]]))
    sup = result["supervisor"]
    print(f"\nsupervisor pid {sup['pid']}, up {_duration(sup['uptime'])}, {sup['config']}")
    return EXIT_OK


def _reload(args: argparse.Namespace) -> int:
    if (args.name is None) == (not args.all):
        raise UsageError("reload: give a bundle NAME or --all")
    if args.discard_state and args.name is None:
        raise UsageError("reload: --discard-state drops a bundle's state: name the bundle")
    extra = {"discard_state": True} if args.discard_state else {}
    result = _client(args).request("reload", args.timeout, name=args.name, **extra)
    return _reports(result["bundles"], args.json)


def _stop(args: argparse.Namespace) -> int:
    return _reports([_client(args).request("stop", args.timeout, name=args.name)], args.json)


def _run(args: argparse.Namespace) -> int:
    return _reports([_client(args).request("run", args.timeout, name=args.name)], args.json)


def _reports(reports: list[dict[str, Any]], as_json: bool) -> int:
    for report in reports:
        if as_json:
            print(json.dumps(report))
            continue
        line = f"{report['name']}: {report['result']} in {report['duration_ms']:g} ms"
        if report["message"]:
            line += f": {report['message']}"
        print(line, file=sys.stdout if report["ok"] else sys.stderr)
        for warning in report.get("warnings", []):
            print(f"{report['name']}: warning: {warning}", file=sys.stderr)
    # A state that could not be kept (a checkpoint not written) fails the command too.
    return EXIT_OK if all(r["ok"] and not r.get("warnings") for r in reports) else EXIT_FAILED


def _logs(args: argparse.Namespace) -> int:
    from .logs import LogRecord

    client = _client(args)
    show: Callable[[LogRecord], str] = LogRecord.as_json if args.json else LogRecord.as_text
    result = client.request("logs", QUERY_TIMEOUT, name=args.name, after=0, limit=args.lines)
    for record in result["records"]:
        print(show(LogRecord.from_dict(record)), flush=True)
    if not args.follow:
        return EXIT_OK
    return _follow(client, args.name, show, result["last"])


def _follow(client: ControlClient | RemoteClient, name: str | None,
            show: Callable[[LogRecord], str], last: int) -> int:
    """Print the records after ``last`` as they come, until the supervisor goes."""
    from .logs import LogRecord

    wait = 2.0
    try:
        while True:
            try:
                result = client.request("logs", wait + QUERY_TIMEOUT, name=name,
                                        after=last, wait=wait)
            except (Unreachable, ControlError) as exc:
                print(f"hotsup logs: the supervisor is gone ({exc})", file=sys.stderr)
                return EXIT_OK
            for record in result["records"]:
                print(show(LogRecord.from_dict(record)), flush=True)
            last = result["last"]
    except KeyboardInterrupt:
        return EXIT_OK


# -- remote push ----------------------------------------------------------------------

def _keygen(args: argparse.Namespace) -> int:
    import zmq.auth

    from .config import valid_name

    if not valid_name(args.name):
        raise UsageError(f"{args.name!r}: a key name may use letters, digits, _ . and -")
    directory = Path(args.dir)
    public, secret = directory / f"{args.name}.key", directory / f"{args.name}.key_secret"
    for path in (public, secret):
        if path.exists():
            print(f"hotsup keygen: {path} exists; remove it first, or choose another NAME",
                  file=sys.stderr)
            return EXIT_FAILED
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    old = os.umask(0o077)  # the secret file is never readable by others, not even briefly
    try:
        zmq.auth.create_certificates(directory, args.name)
    finally:
        os.umask(old)
    os.chmod(secret, 0o600)
    os.chmod(public, 0o644)
    print(f"{secret}  (secret: keep it here, 0600)\n{public}  (public: copy it to the other "
          f"side: a client's into the supervisor's authorized_keys, the supervisor's to "
          f"each client's --server-key)")
    return EXIT_OK


def _push(args: argparse.Namespace) -> int:
    from .logs import LogRecord
    from .push import PushError, send

    directory = Path(args.dir).absolute()
    if not directory.is_dir():
        raise UsageError(f"{args.dir} is not a directory")
    name = args.name or directory.resolve().name
    client = _client(args)
    if args.watch:
        return _watch(args, client, directory, name)
    last = _last_seq(client) if args.follow else 0  # --follow shows the swap's records too
    try:
        report = send(client, directory, name, args.timeout)
    except PushError as exc:
        raise UsageError(str(exc)) from None
    code = _reports([report], args.json)
    if args.follow:
        return _follow(client, name, LogRecord.as_text, last)
    return code


def _last_seq(client: ControlClient | RemoteClient) -> int:
    return int(client.request("logs", QUERY_TIMEOUT, limit=0)["last"])


def _watch(args: argparse.Namespace, client: ControlClient | RemoteClient, directory: Path,
           name: str) -> int:
    """Push now, then after each saved change; one line per outcome, until Ctrl-C."""
    import threading

    import watchfiles

    from .logs import LogRecord
    from .push import PushError, send
    from .watcher import ignored

    class Filter(watchfiles.DefaultFilter):
        def __call__(self, change: watchfiles.Change, path: str) -> bool:
            return not ignored(os.path.basename(path)) and super().__call__(change, path)

    if args.follow:  # the logs on a connection of their own, beside the pushes
        follower = _client(args)
        last = _last_seq(follower)
        threading.Thread(target=_follow, args=(follower, name, LogRecord.as_text, last),
                         daemon=True).start()

    def push(seen: float, first: bool = False) -> None:
        try:
            report = send(client, directory, name, args.timeout)
        except (PushError, ControlError, Unreachable) as exc:
            print(f"{name}: push failed: {exc}", file=sys.stderr, flush=True)
            return
        took = (time.monotonic() - seen) * 1000
        if report["result"] == "unchanged" and not first:
            return  # a touch, bytecode, an editor's temp file: nothing to say
        if report["ok"]:
            print(f"{name}: {report['result']} in {took:.0f} ms"
                  + (f" (generation {report['generation']})" if report["generation"] else ""),
                  flush=True)
        else:
            print(f"{name}: {report['result']}: {report['message']}", file=sys.stderr,
                  flush=True)

    first = True
    try:
        # The first push once the watch is set up (its first, empty, yield
        # after rust_timeout), so a save in between is not missed.
        for changes in watchfiles.watch(directory, watch_filter=Filter(), debounce=1600,
                                        step=20, rust_timeout=200, yield_on_timeout=True):
            if changes or first:
                push(time.monotonic(), first)
                first = False
    except KeyboardInterrupt:
        pass
    return EXIT_OK


# -- a new bundle --------------------------------------------------------------------

def _new(args: argparse.Namespace) -> int:
    from .config import ConfigError, load_config
    from .scaffold import ScaffoldError, create

    if args.dir is not None:
        directory = Path(args.dir)
    else:  # the bundles_dir of the config (-c FILE, else ./config.toml), if there is one
        config = Path(args.config or "config.toml")
        directory = Path(".")
        if config.exists():
            try:
                directory = load_config(config).bundles_dir or directory
            except ConfigError as exc:
                raise UsageError(f"{exc.problems[0]} (or give --dir DIR)") from None
    try:
        made = create(args.name, args.kind, directory, args.bind)
    except ScaffoldError as exc:
        print(f"hotsup new: {exc}", file=sys.stderr)
        return EXIT_FAILED
    shown = made.path.absolute()
    if shown.is_relative_to(Path.cwd()):
        shown = shown.relative_to(Path.cwd())
    print(f"{shown}: a new {args.kind} bundle ({', '.join(made.files)}) on {made.bind}\n"
          f"hotsup serves it from there (a running one picks it up by itself); "
          f"`hotsup check` imports it as a worker would")
    return EXIT_OK


def _shutdown(args: argparse.Namespace) -> int:
    pid = _client(args).request("shutdown", QUERY_TIMEOUT)["pid"]
    deadline = time.monotonic() + args.timeout
    while _alive(pid):  # return once it has exited: its bundles drained, its ports closed
        if time.monotonic() > deadline:
            print(f"hotsup {pid} is still draining after {args.timeout:g}s", file=sys.stderr)
            return EXIT_FAILED
        time.sleep(0.05)  # a poll interval
    print(f"hotsup {pid} stopped")
    return EXIT_OK


def _alive(pid: int) -> bool:
    """Whether ``pid`` still runs (an exited process its parent has not reaped does not)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split()[0] not in (b"Z", b"X")
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def _text(value: Any) -> str:
    return "-" if value is None else str(value)


def _mib(kib: int | None) -> str:
    return "-" if kib is None else f"{kib / 1024:.1f}M"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    whole = int(seconds)
    if whole < 60:
        return f"{seconds:.0f}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


# -- the parser ---------------------------------------------------------------------------

class _Unhelpful(argparse.ArgumentParser):
    """The parser of a command line that asks for no help. argparse makes a
    formatter for each argument it adds (to check it), and a formatter asks the
    terminal its width through shutil, whose imports cost every command ~4 ms:
    these are 80 columns wide (a usage line after a mistake is all they print).
    Its subparsers are of this class too (argparse makes them of the parent's)."""

    def _get_formatter(self) -> argparse.HelpFormatter:
        return argparse.HelpFormatter(prog=self.prog, width=80)


def build_parser(helps: bool = True) -> argparse.ArgumentParser:
    """The command line's parser; ``helps``: with each command's help line, which
    only ``hotsup --help`` shows (they come from ``commands``, which the other
    commands need not import)."""
    if helps:
        from .commands import WIRE
    parser = (argparse.ArgumentParser if helps else _Unhelpful)(
        prog="hotsup",
        description="A process-isolated reloading supervisor for Python bundles.",
    )
    # -c FILE before the command too (``hotsup -c FILE status``): its own dest,
    # since a subparser's defaults would overwrite a shared one; main() merges them.
    parser.add_argument("-c", "--config", dest="config_first", metavar="FILE",
                        help="the config.toml (also accepted after the command)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    start = commands.add_parser("start", help="run the supervisor in the foreground")
    start.add_argument("config", nargs="?")
    start.add_argument("--json", action="store_true", help="log one JSON object per record")
    start.set_defaults(func=_start)
    checker = commands.add_parser("check", help="validate config.toml and every bundle")
    checker.add_argument("config", nargs="?")
    checker.set_defaults(func=_check)

    def remote(name: str, func: Callable[[argparse.Namespace], int],
               timeout: float | None = None, what: str | None = None
               ) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=what or (WIRE[name].help() if helps else None))
        sub.add_argument("-c", "--config", metavar="FILE",
                         help="the supervisor's config.toml (default: $HOTSUP_RUN_DIR, "
                              "else ./config.toml)")
        if timeout is not None:
            sub.add_argument("--timeout", type=float, default=timeout, metavar="S",
                             help=f"seconds to wait for the outcome (default {timeout:g})")
        sub.set_defaults(func=func)
        return sub

    def to(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--to", metavar="tcp://HOST:PORT",
                         help="a remote supervisor's [remote] endpoint (default: "
                              "$HOTSUP_REMOTE)")
        sub.add_argument("--key", metavar="SECRET",
                         help="our secret certificate (default: $HOTSUP_KEY)")
        sub.add_argument("--server-key", metavar="PUBLIC",
                         help="the supervisor's public certificate (default: "
                              "$HOTSUP_SERVER_KEY)")

    status = remote("status", _status)
    to(status)
    status.add_argument("--json", action="store_true", help="one JSON object")
    reload = remote("reload", _reload, 120.0)
    to(reload)
    reload.add_argument("name", nargs="?")
    reload.add_argument("--all", action="store_true", help="every bundle")
    reload.add_argument("--discard-state", action="store_true",
                        help="swap to the new code without the old generation's state (the "
                             "way past a snapshot() that fails); the state is lost")
    reload.add_argument("--json", action="store_true", help="one JSON object per bundle")
    for name, func in (("stop", _stop), ("run", _run)):
        sub = remote(name, func, 120.0)
        to(sub)
        sub.add_argument("name")
        sub.add_argument("--json", action="store_true", help="one JSON object")
    logs = remote("logs", _logs)
    to(logs)
    logs.add_argument("name", nargs="?", help="one bundle's records (and the supervisor's "
                                              "about it); default: everything")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing new records")
    logs.add_argument("-n", "--lines", type=int, default=50, metavar="N",
                      help="how many records to show first (default 50)")
    logs.add_argument("--json", action="store_true", help="one JSON object per record")
    remote("shutdown", _shutdown, 120.0)
    keygen = commands.add_parser("keygen", help="write a CURVE certificate pair for [remote] "
                                                "or hotsup push")
    keygen.add_argument("name", help="NAME: writes NAME.key (public), NAME.key_secret")
    keygen.add_argument("--dir", default=".", help="where to write them (default: here)")
    keygen.set_defaults(func=_keygen)
    new = commands.add_parser("new", help="write a new bundle's directory: bundle.toml and "
                                          "a module with every hook, commented")
    new.add_argument("name", help="the bundle's name (its directory's)")
    new.add_argument("--kind", choices=("service", "asgi", "wsgi"), default="service",
                     help="a service class, an ASGI app or a WSGI callable (default service)")
    new.add_argument("--dir", metavar="DIR", help="where to make NAME/ (default: the "
                                                  "bundles_dir of -c FILE or ./config.toml, "
                                                  "else here)")
    new.add_argument("--bind", metavar="HOST:PORT",
                     help="its socket (default: 127.0.0.1 and a free port from 8100 up)")
    new.add_argument("-c", "--config", metavar="FILE",
                     help="the config.toml whose bundles_dir to use (default ./config.toml)")
    new.set_defaults(func=_new)
    push = remote("push", _push, 120.0, "send a bundle directory to a supervisor and swap "
                                        "it in (only what changed travels)")
    push.add_argument("dir", metavar="DIR", help="the bundle directory to push")
    push.add_argument("--name", help="the bundle's name there (default: DIR's name)")
    push.add_argument("--follow", action="store_true", help="then show its logs as they come")
    push.add_argument("--watch", action="store_true",
                      help="push again after each saved change, until Ctrl-C")
    push.add_argument("--json", action="store_true", help="the report as one JSON object")
    to(push)
    return parser


def _merge_config(args: argparse.Namespace) -> None:
    """One ``args.config`` from ``-c FILE`` given before or after the command."""
    first, after = args.config_first, getattr(args, "config", None)
    if first is not None and after is not None and first != after:
        raise UsageError(f"two config files given ({first} and {after}): give one")
    args.config = after if after is not None else first
    if args.config is None and args.command in ("start", "check"):
        args.config = "config.toml"


def main(argv: list[str] | None = None) -> int:
    """The command line; its exit code. Run as the ``hotsup`` script
    (``argv`` None), a command other than ``start`` ends the process itself."""
    given = sys.argv[1:] if argv is None else argv
    args = build_parser(helps=any(arg in ("-h", "--help") for arg in given)).parse_args(given)
    code = _command(args)
    if argv is None and args.command != "start":
        _exit_at_once(code)
    return code


def _exit_at_once(code: int) -> NoReturn:
    """End the process without the interpreter's teardown: freeing every module
    and pyzmq's own at-exit work cost ~10 ms of a ~90 ms ``hotsup status``, and
    a command whose clients are closed and whose output is flushed has nothing
    left to finalize. Not for ``start``: the supervisor's log output thread
    drains at exit."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:  # `hotsup logs | head`: the reader had enough
        code = 141
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.flush()
    os._exit(code)


def _command(args: argparse.Namespace) -> int:
    try:
        _merge_config(args)
        code: int = args.func(args)
    except UsageError as exc:
        print(f"hotsup {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Unreachable as exc:
        print(f"hotsup {args.command}: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except ControlError as exc:
        print(f"hotsup {args.command}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:  # Ctrl-C while waiting: the supervisor carries on
        return 130
    except BrokenPipeError:  # `hotsup status | head`: the reader had enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    finally:
        while _clients:
            _clients.pop().close()
    return code


if __name__ == "__main__":
    sys.exit(main())
