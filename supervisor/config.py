"""config.toml and bundle.toml: reading, validating, merging.

Every problem is one line that names the file, the key and what is wrong
(``config.toml: defaults.start_timeout: expected a number, got "fast"``), and
validation goes on after the first problem so ``hotsup check`` can list them
all. The supervisor's own settings are fatal when wrong; a bundle's manifest is
loaded on its own (``load_bundle``) so one broken bundle never stops another.
"""

from __future__ import annotations

import contextlib
import grp
import ipaddress
import json
import os
import pwd
import re
import signal
import stat
import subprocess
import sys
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hotsup.worker import importer
from hotsup.worker.protocol import MAX_WORKER_MESSAGE

from . import rundir
from .watcher import DigestError, digest

MANIFEST = "bundle.toml"

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_DOTTED = r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*"
_ENTRY = re.compile(rf"^{_DOTTED}:{_DOTTED}$")
_LOG_LEVELS = ("debug", "info", "warning", "error")
_KINDS = ("service", "asgi", "wsgi")
_WEBSOCKET_MODES = ("close", "resume")
#: What systemd allows in a FileDescriptorName= (sd_listen_fds_with_names(3)).
_FDNAME = re.compile(r"^[\x21-\x39\x3b-\x7e]{1,255}$")
#: A wsgi bundle's thread pool: a2wsgi's default, and a bound on what one worker runs.
DEFAULT_THREADS = 10
MAX_THREADS = 256


class ConfigError(Exception):
    """One or more problems, each a line naming the file and the key."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class Timing:
    """Per-bundle deadlines and restart policy (``[defaults]``, overridable per bundle)."""

    start_timeout: float = 10.0
    quiesce_timeout: float = 5.0
    drain_timeout: float = 30.0
    checkpoint_interval: float = 0.0
    max_restarts: int = 5
    restart_window: float = 60.0
    #: Seconds the old generation stays loaded and paused after a swap, to
    #: take over again if the new one crashes; 0 retires it at once.
    probation: float = 5.0
    #: The serving generation is pinged every ping_interval seconds (0: never);
    #: no answer within ping_timeout means its event loop is blocked: hung.
    ping_interval: float = 2.0
    ping_timeout: float = 10.0
    #: The largest pickled snapshot a generation may hand over or checkpoint.
    max_snapshot_bytes: int = 64 * 1024 * 1024


@dataclass(frozen=True)
class SocketSpec:
    """A named listening socket: ``HOST:PORT`` (TCP), ``unix:PATH``, or
    ``systemd:NAME`` (the socket systemd passed under that name)."""

    name: str
    bind: str
    host: str = ""
    port: int = 0
    path: Path | None = None
    systemd: str | None = None

    @property
    def key(self) -> str:
        """What identifies the bound socket: same key, same socket across generations."""
        if self.systemd is not None:
            return f"systemd:{self.systemd}"
        return f"unix:{self.path}" if self.path is not None else f"tcp:{self.host}:{self.port}"

    @property
    def shared(self) -> bool:
        """Whether two declarations of this key mean the same socket (port 0 never does)."""
        return self.port != 0 or self.path is not None or self.systemd is not None


@dataclass(frozen=True)
class BundleSource:
    """Where a bundle lives, and what config.toml overrides of its manifest."""

    name: str
    path: Path
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def manifest(self) -> Path:
        return self.path / MANIFEST


@dataclass(frozen=True)
class BundleSpec:
    """A bundle's manifest, validated and merged with config.toml."""

    name: str
    path: Path
    entry: str
    kind: str
    factory: bool
    version: str
    sockets: tuple[SocketSpec, ...]
    settings: dict[str, Any]
    multiprocessing_logging: bool
    timing: Timing
    #: ``user``/``group``: the worker drops to these after fork (None: it stays ours).
    uid: int | None = None
    gid: int | None = None
    threads: int = DEFAULT_THREADS  # kind = "wsgi": the app's thread pool
    #: kind = "asgi": what a hand-over does to an open WebSocket ("close" or "resume").
    websockets: str = "close"


@dataclass(frozen=True)
class RemoteConfig:
    """``[remote]``: the CURVE-secured network endpoint (``remote.py``, ``push.py``)."""

    bind: str  # a ZeroMQ endpoint, tcp://HOST:PORT (port 0: tcp://HOST:*, any free port)
    secret_key: Path
    authorized_keys: Path
    #: Key name (the public file's stem) -> its z85 public key.
    clients: dict[str, bytes]
    #: Key name -> the bundles it may touch; a key not named may touch every bundle.
    allow: dict[str, tuple[str, ...]]
    #: Requests per second a key may make (a burst of as many again).
    rate_limit: float = 20.0
    #: A push's bounds: its total size and its number of files.
    max_push_bytes: int = 64 * 1024 * 1024
    max_push_files: int = 5000


@dataclass(frozen=True)
class Config:
    path: Path
    bundles_dir: Path | None
    run_dir: Path
    preload: tuple[str, ...]
    watch_quiet_ms: int
    watch_batch_ms: int
    log_level: str
    defaults: Timing
    declared: dict[str, BundleSource]
    #: ``[supervisor] metrics``: (host, port) of /metrics, /healthz, /readyz; None: off.
    metrics: tuple[str, int] | None = None
    remote: RemoteConfig | None = None  # None: no network endpoint at all

    def sources(self) -> dict[str, BundleSource]:
        """Every bundle: the drop-ins found in bundles_dir now, and the declared ones."""
        found: dict[str, BundleSource] = {}
        if self.bundles_dir is not None:
            for name in discover(self.bundles_dir):
                found[name] = BundleSource(name, self.bundles_dir / name)
        for name, source in self.declared.items():
            found[name] = source
        return found


def valid_name(name: str) -> bool:
    """Whether ``name`` may name a bundle (or a key): letters, digits, _ . and -."""
    return bool(_NAME.match(name))


def discover(bundles_dir: Path) -> list[str]:
    """Names of the bundle directories (those with a bundle.toml) in bundles_dir."""
    return [entry.name for entry in _candidates(bundles_dir) if _NAME.match(entry.name)]


def misnamed(bundles_dir: Path) -> list[str]:
    """Problems with bundle directories that discover() must skip for their name."""
    return [f"{entry}: a bundle name may use letters, digits, _ . and - (skipped)"
            for entry in _candidates(bundles_dir) if not _NAME.match(entry.name)]


def _candidates(bundles_dir: Path) -> list[Path]:
    """Directories of bundles_dir with a bundle.toml; unreadable ones are skipped."""
    try:
        entries = sorted(bundles_dir.iterdir())
    except OSError:  # gone, or not readable: nothing to run from it
        return []
    found = []
    for entry in entries:
        if entry.name.startswith("."):
            continue
        try:
            if (entry / MANIFEST).is_file():
                found.append(entry)
        except OSError:
            continue  # a directory we may not read is not a bundle we can run
    return found


# -- validation helpers ---------------------------------------------------------


class _Problems:
    """Collects problem lines. ``origin(key)`` may redirect a key to the file
    that really set it (a config.toml override of a manifest key)."""

    def __init__(self, file: Path, origin: Callable[[str], tuple[Path, str]] | None = None) -> None:
        self.file = file
        self.origin = origin
        self.lines: list[str] = []

    def add(self, key: str, message: str) -> None:
        file = self.file
        if key and self.origin is not None:
            file, key = self.origin(key)
        self.lines.append(f"{file}: {key}: {message}" if key else f"{file}: {message}")


def _describe(value: Any) -> str:
    text = repr(value) if not isinstance(value, str) else f'"{value}"'
    return text if len(text) <= 40 else text[:37] + "..."


def _read_toml(path: Path, problems: _Problems) -> dict[str, Any] | None:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        problems.add("", "file not found")
    except IsADirectoryError:
        problems.add("", "is a directory, expected a TOML file")
    except tomllib.TOMLDecodeError as exc:
        problems.add("", f"not valid TOML: {exc}")
    except (OSError, UnicodeDecodeError) as exc:
        problems.add("", f"cannot read: {exc}")
    return None


def _unknown(table: dict[str, Any], known: set[str], prefix: str, problems: _Problems) -> None:
    for key in table:
        if key not in known:
            choices = ", ".join(sorted(known))
            problems.add(f"{prefix}{key}", f"unknown key (known keys: {choices})")


def _number(
    table: dict[str, Any], key: str, default: float, prefix: str, problems: _Problems,
    *, minimum: float = 0.0, integer: bool = False, positive: bool = False,
) -> Any:
    if key not in table:
        return default
    value = table[key]
    ok = isinstance(value, int) if integer else isinstance(value, int | float)
    if isinstance(value, bool) or not ok:
        kind = "a whole number" if integer else "a number"
        problems.add(f"{prefix}{key}", f"expected {kind}, got {_describe(value)}")
        return default
    if value < minimum or (positive and value <= 0):
        bound = f"greater than {minimum:g}" if positive else f"at least {minimum:g}"
        problems.add(f"{prefix}{key}", f"must be {bound}, got {value}")
        return default
    return value


def _string(
    table: dict[str, Any], key: str, default: str, prefix: str, problems: _Problems
) -> str:
    value = table.get(key, default)
    if not isinstance(value, str):
        problems.add(f"{prefix}{key}", f"expected a string, got {_describe(value)}")
        return default
    return value


def _bool(table: dict[str, Any], key: str, prefix: str, problems: _Problems) -> bool:
    value = table.get(key, False)
    if not isinstance(value, bool):
        problems.add(f"{prefix}{key}", f"expected true or false, got {_describe(value)}")
        return False
    return value


_TIMING_KEYS = {
    "start_timeout", "quiesce_timeout", "drain_timeout",
    "checkpoint_interval", "max_restarts", "restart_window",
    "probation", "ping_interval", "ping_timeout", "max_snapshot_bytes",
}


def _timing(table: dict[str, Any], base: Timing, prefix: str, problems: _Problems) -> Timing:
    return Timing(
        start_timeout=_number(table, "start_timeout", base.start_timeout, prefix, problems,
                              positive=True),
        quiesce_timeout=_number(table, "quiesce_timeout", base.quiesce_timeout, prefix,
                                problems, positive=True),
        drain_timeout=_number(table, "drain_timeout", base.drain_timeout, prefix, problems),
        checkpoint_interval=_number(table, "checkpoint_interval", base.checkpoint_interval,
                                    prefix, problems),
        max_restarts=_number(table, "max_restarts", base.max_restarts, prefix, problems,
                             integer=True),
        restart_window=_number(table, "restart_window", base.restart_window, prefix, problems,
                               positive=True),
        probation=_number(table, "probation", base.probation, prefix, problems),
        ping_interval=_number(table, "ping_interval", base.ping_interval, prefix, problems),
        ping_timeout=_number(table, "ping_timeout", base.ping_timeout, prefix, problems,
                             positive=True),
        max_snapshot_bytes=_snapshot_limit(table, base, prefix, problems),
    )


def _snapshot_limit(table: dict[str, Any], base: Timing, prefix: str,
                    problems: _Problems) -> int:
    limit: int = _number(table, "max_snapshot_bytes", base.max_snapshot_bytes, prefix,
                         problems, integer=True, positive=True)
    if limit > MAX_WORKER_MESSAGE:
        problems.add(f"{prefix}max_snapshot_bytes", f"must be at most {MAX_WORKER_MESSAGE} "
                     f"(the largest message a worker may send), got {limit}")
        return base.max_snapshot_bytes
    return limit


def parse_bind(bind: str, base: Path) -> tuple[str, int, Path | None]:
    """``(host, port, None)`` for ``HOST:PORT``, ``("", 0, path)`` for ``unix:PATH``.

    Raises ValueError with a message fit for a person.
    """
    if bind.startswith("unix:"):
        raw = bind[len("unix:"):]
        if not raw:
            raise ValueError('"unix:" needs a path, as in "unix:/run/app.sock"')
        path = Path(raw)
        return "", 0, Path(os.path.normpath(path if path.is_absolute() else base / path))
    host, sep, port_text = bind.rpartition(":")
    if not sep or not host:
        raise ValueError(f'"{bind}" is not "HOST:PORT" or "unix:PATH"')
    bracketed = host.startswith("[") and host.endswith("]")
    host = host[1:-1] if bracketed else host
    if ":" in host and not bracketed:
        raise ValueError(f'"{bind}": write an IPv6 host in brackets, as in "[::1]:8080"')
    if host == "localhost":
        host = "127.0.0.1"
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f'"{bind}": host "{host}" is not an IP address') from None
    if not (port_text.isascii() and port_text.isdigit()) or not 0 <= int(port_text) <= 65535:
        raise ValueError(f'"{bind}": port "{port_text}" is not a number from 0 to 65535')
    return host, int(port_text), None


# -- config.toml ------------------------------------------------------------------

_TOP_KEYS = {"supervisor", "defaults", "bundles", "remote"}
_SUPERVISOR_KEYS = {
    "bundles_dir", "run_dir", "preload", "watch_quiet_ms", "watch_batch_ms", "log_level",
    "metrics",
}
_MANIFEST_KEYS = {
    "entry", "kind", "factory", "version", "sockets", "settings", "multiprocessing_logging",
    "user", "group", "threads", "websockets",
} | _TIMING_KEYS
_OVERRIDE_KEYS = _MANIFEST_KEYS | {"path"}


def _table(data: dict[str, Any], key: str, problems: _Problems, prefix: str = "") -> dict[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        problems.add(f"{prefix}{key}", f"expected a table, got {_describe(value)}")
        return {}
    return value


def load_config(path: Path) -> Config:
    """Read and validate config.toml; raises ConfigError listing every problem."""
    config, problems = _read_config(path)
    if config is None or problems:
        raise ConfigError(problems)
    return config


def _read_config(path: Path) -> tuple[Config | None, list[str]]:
    """config.toml as far as it can be read (a bad value is replaced by its
    default), and every problem found; None if it cannot be read at all."""
    path = path.resolve() if path.exists() else path.absolute()
    problems = _Problems(path)
    data = _read_toml(path, problems)
    if data is None:
        return None, problems.lines
    base = path.parent
    _unknown(data, _TOP_KEYS, "", problems)

    sup = _table(data, "supervisor", problems)
    _unknown(sup, _SUPERVISOR_KEYS, "supervisor.", problems)
    bundles_dir_text = _string(sup, "bundles_dir", "bundles", "supervisor.", problems)
    implicit_bundles_dir = "bundles_dir" not in sup
    run_dir = rundir.resolve(base, _string(sup, "run_dir", rundir.DEFAULT, "supervisor.",
                                           problems))
    preload = sup.get("preload", [])
    if not isinstance(preload, list) or not all(isinstance(p, str) for p in preload):
        problems.add("supervisor.preload", f"expected a list of module names, got "
                     f"{_describe(preload)}")
        preload = []
    quiet = _number(sup, "watch_quiet_ms", 30, "supervisor.", problems, integer=True,
                    positive=True)
    batch = _number(sup, "watch_batch_ms", 1600, "supervisor.", problems, integer=True,
                    positive=True)
    if batch < quiet:
        problems.add("supervisor.watch_batch_ms",
                     f"must be at least watch_quiet_ms ({quiet}), got {batch}")
    log_level = _string(sup, "log_level", "info", "supervisor.", problems).lower()
    if log_level not in _LOG_LEVELS:
        problems.add("supervisor.log_level",
                     f"expected one of {', '.join(_LOG_LEVELS)}, got {_describe(log_level)}")
        log_level = "info"
    metrics = _metrics(sup, base, problems)

    defaults_table = _table(data, "defaults", problems)
    _unknown(defaults_table, _TIMING_KEYS, "defaults.", problems)
    defaults = _timing(defaults_table, Timing(), "defaults.", problems)

    bundles_dir = _normal(base / bundles_dir_text) if bundles_dir_text else None
    if bundles_dir is not None and not bundles_dir.is_dir():
        if implicit_bundles_dir:
            bundles_dir = None  # the default, absent: only declared bundles
        else:
            problems.add("supervisor.bundles_dir", f"{bundles_dir} is not a directory")
    declared = _declared(_table(data, "bundles", problems), base, bundles_dir, problems)
    remote = _remote(data["remote"], base, problems) if "remote" in data else None
    return Config(
        path=path, bundles_dir=bundles_dir, run_dir=run_dir, preload=tuple(preload),
        watch_quiet_ms=quiet, watch_batch_ms=batch, log_level=log_level, defaults=defaults,
        declared=declared, metrics=metrics, remote=remote,
    ), problems.lines


def _metrics(sup: dict[str, Any], base: Path, problems: _Problems) -> tuple[str, int] | None:
    """``[supervisor] metrics = "HOST:PORT"``: where /metrics, /healthz and /readyz are served."""
    if "metrics" not in sup:
        return None
    text = _string(sup, "metrics", "", "supervisor.", problems)
    if not text:
        return None  # not a string: reported; "" is not an address either
    try:
        host, port, path = parse_bind(text, base)
    except ValueError as exc:
        problems.add("supervisor.metrics", str(exc))
        return None
    if path is not None:
        problems.add("supervisor.metrics", f'expected "HOST:PORT" (TCP, for Prometheus and '
                     f'probes), got {_describe(text)}')
        return None
    return host, port


def _declared(tables: dict[str, Any], base: Path, bundles_dir: Path | None,
              problems: _Problems) -> dict[str, BundleSource]:
    """The ``[bundles.NAME]`` tables: where each bundle is, and what it overrides."""
    declared: dict[str, BundleSource] = {}
    for name, table in tables.items():
        prefix = f"bundles.{name}."
        if not isinstance(table, dict):
            problems.add(f"bundles.{name}", f"expected a table, got {_describe(table)}")
            continue
        if not _NAME.match(name):
            problems.add(f"bundles.{name}", "a bundle name may use letters, digits, _ . and -")
            continue
        _unknown(table, _OVERRIDE_KEYS, prefix, problems)
        overrides = {k: v for k, v in table.items() if k != "path"}
        if "path" in table:
            bundle_path = _normal(base / _string(table, "path", "", prefix, problems))
        elif bundles_dir is not None:
            bundle_path = bundles_dir / name
        else:
            problems.add(f"{prefix}path", "missing, and there is no bundles_dir to find it in")
            continue
        if not (bundle_path / MANIFEST).is_file():
            problems.add(f"{prefix}path", f"{bundle_path} has no {MANIFEST}")
        declared[name] = BundleSource(name, bundle_path, overrides)
    return declared


# -- [remote] -----------------------------------------------------------------------

_REMOTE_KEYS = {"bind", "key", "authorized_keys", "allow", "rate_limit", "max_push_bytes",
                "max_push_files"}


def _remote(table: Any, base: Path, problems: _Problems) -> RemoteConfig | None:
    """``[remote]``, its key files read and checked; None (with problems) when unusable."""
    if not isinstance(table, dict):
        problems.add("remote", f"expected a table, got {_describe(table)}")
        return None
    _unknown(table, _REMOTE_KEYS, "remote.", problems)
    before = len(problems.lines)
    for key in ("bind", "key", "authorized_keys"):
        if key not in table:
            problems.add(f"remote.{key}", "missing (see README.md, Remote push)")
    bind = _remote_bind(_string(table, "bind", "", "remote.", problems), problems)
    secret = _normal(base / _string(table, "key", "", "remote.", problems))
    keys_dir = _normal(base / _string(table, "authorized_keys", "", "remote.", problems))
    if "key" in table:
        _secret_key(secret, problems)
    clients = _client_keys(keys_dir, problems) if "authorized_keys" in table else {}
    allow = _allow(_table(table, "allow", problems, "remote."), clients, problems)
    defaults = RemoteConfig("", Path(), Path(), {}, {})
    rate = _number(table, "rate_limit", defaults.rate_limit, "remote.", problems, positive=True)
    max_bytes = _number(table, "max_push_bytes", defaults.max_push_bytes, "remote.", problems,
                        integer=True, positive=True)
    max_files = _number(table, "max_push_files", defaults.max_push_files, "remote.", problems,
                        integer=True, positive=True)
    if len(problems.lines) > before or bind is None:
        return None
    return RemoteConfig(bind, secret, keys_dir, clients, allow, rate, max_bytes, max_files)


def _remote_bind(bind: str, problems: _Problems) -> str | None:
    if not bind:
        return None
    if not bind.startswith("tcp://"):
        problems.add("remote.bind", f'expected "tcp://HOST:PORT", got {_describe(bind)}')
        return None
    try:
        host, port, _ = parse_bind(bind[len("tcp://"):], Path())
    except ValueError as exc:
        problems.add("remote.bind", str(exc))
        return None
    if bind[len("tcp://"):].startswith("unix:"):
        problems.add("remote.bind", f'expected "tcp://HOST:PORT", got {_describe(bind)}')
        return None
    shown = f"[{host}]" if ":" in host else host
    return f"tcp://{shown}:{port or '*'}"


def _key_file(path: Path, key: str, open_bits: int, problems: _Problems) -> bool:
    """Whether ``path`` is a regular file we can read that others cannot misuse."""
    try:
        info = os.stat(path)
        with path.open("rb"):
            pass
    except FileNotFoundError:
        problems.add(key, f"{path} not found (`hotsup keygen NAME` makes a pair)")
        return False
    except OSError as exc:
        problems.add(key, f"{path}: cannot read: {exc.strerror or exc}")
        return False
    if not stat.S_ISREG(info.st_mode):
        problems.add(key, f"{path} is not a regular file")
        return False
    mode = stat.S_IMODE(info.st_mode)
    if mode & open_bits and open_bits & 0o044:
        problems.add(key, f"{path} is open to other users (mode {mode:o}); chmod 600 it")
        return False
    if mode & open_bits:
        problems.add(key, f"{path} is writable by other users (mode {mode:o}): they could "
                     f"put in a key of their own")
        return False
    return True


def _secret_key(path: Path, problems: _Problems) -> None:
    import zmq.auth  # only for a config with [remote]

    if not _key_file(path, "remote.key", 0, problems):
        return
    public: bytes | None = None
    secret: bytes | None = None
    try:
        public, secret = zmq.auth.load_certificate(path)
    except OSError as exc:
        problems.add("remote.key", f"{path}: cannot read: {exc.strerror or exc}")
        return
    except ValueError:
        pass  # not a certificate: said below
    if not secret or not public:
        problems.add("remote.key", f"{path} holds no secret key (give the .key_secret file "
                     f"that `hotsup keygen` writes)")
        return
    _key_file(path, "remote.key", 0o077, problems)


def _client_keys(directory: Path, problems: _Problems) -> dict[str, bytes]:
    import zmq.auth

    key = "remote.authorized_keys"
    before = len(problems.lines)
    try:
        info = os.stat(directory)
        names = sorted(p for p in directory.iterdir() if p.name.endswith(".key"))
    except FileNotFoundError:
        problems.add(key, f"{directory} not found (a directory of the clients' NAME.key files)")
        return {}
    except OSError as exc:
        problems.add(key, f"{directory}: cannot read: {exc.strerror or exc}")
        return {}
    if not stat.S_ISDIR(info.st_mode):
        problems.add(key, f"{directory} is not a directory")
        return {}
    if stat.S_IMODE(info.st_mode) & 0o022:
        problems.add(key, f"{directory} is writable by other users (mode "
                     f"{stat.S_IMODE(info.st_mode):o}): they could put in a key of their own")
        return {}
    clients: dict[str, bytes] = {}
    for path in names:
        if not _NAME.match(path.stem):
            problems.add(key, f"{path}: a key name may use letters, digits, _ . and -")
            continue
        if not _key_file(path, key, 0o022, problems):
            continue
        public: bytes | None = None
        try:
            public, _ = zmq.auth.load_certificate(path)
        except OSError as exc:
            problems.add(key, f"{path}: cannot read: {exc.strerror or exc}")
            continue
        except ValueError:
            pass  # not a certificate: said below
        if not public:
            problems.add(key, f"{path}: not a ZeroMQ certificate (no public-key in it: "
                         f"`hotsup keygen` writes them)")
            continue
        clients[path.stem] = public
    if not clients and len(problems.lines) == before:
        problems.add(key, f"{directory} holds no NAME.key file: no client could connect")
    return clients


def _allow(table: dict[str, Any], clients: dict[str, bytes],
           problems: _Problems) -> dict[str, tuple[str, ...]]:
    allow: dict[str, tuple[str, ...]] = {}
    for name, bundles in table.items():
        if not isinstance(bundles, list) or not all(isinstance(b, str) for b in bundles):
            problems.add(f"remote.allow.{name}", f"expected a list of bundle names, got "
                         f"{_describe(bundles)}")
            continue
        if clients and name not in clients:
            problems.add(f"remote.allow.{name}", f"no key {name}.key in authorized_keys")
            continue
        allow[name] = tuple(bundles)
    return allow


# -- bundle.toml ------------------------------------------------------------------


def _merge(manifest: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """config.toml's [bundles.NAME] over the manifest: tables merge, values replace."""
    merged = dict(manifest)
    for key, value in overrides.items():
        if key in ("settings", "sockets") and isinstance(value, dict):
            base = merged.get(key)
            merged[key] = {**(base if isinstance(base, dict) else {}), **value}
        else:
            merged[key] = value
    return merged


def _normal(path: Path) -> Path:
    """``a/b/../c`` as ``a/c``: paths are compared by prefix (watch events, sockets)."""
    return Path(os.path.normpath(path))


def load_bundle(source: BundleSource, config: Config) -> BundleSpec:
    """Read, merge and validate one bundle's manifest; raises ConfigError.

    A problem in a value that config.toml's ``[bundles.NAME]`` overrides is
    reported against config.toml and that key, not the manifest.
    """
    overrides = source.overrides

    def origin(key: str) -> tuple[Path, str]:
        top, _, rest = key.partition(".")
        sub = rest.partition(".")[0]
        value = overrides.get(top)
        from_config = top in overrides and (
            top not in ("settings", "sockets") or not isinstance(value, dict) or not sub
            or sub in value)
        if from_config:
            return config.path, f"bundles.{source.name}.{key}"
        return source.manifest, key

    problems = _Problems(source.manifest, origin)
    data = _read_toml(source.manifest, problems)
    if data is None:
        raise ConfigError(problems.lines)
    data = _merge(data, overrides)
    _unknown(data, _MANIFEST_KEYS, "", problems)

    entry = _string(data, "entry", "", "", problems)
    if "entry" not in data:
        problems.add("entry", 'missing (as in entry = "module:Class")')
    elif not _ENTRY.match(entry):
        problems.add("entry", f'expected "module:attribute", got {_describe(entry)}')
    elif not _module_exists(source.path, entry.partition(":")[0]):
        module = entry.partition(":")[0]
        problems.add("entry", f"module {module!r} not found in {source.path}")
    kind = _string(data, "kind", "service", "", problems)
    if kind not in _KINDS:
        problems.add("kind", f"expected one of {', '.join(_KINDS)}, got {_describe(kind)}")
    factory = _bool(data, "factory", "", problems)
    if factory and kind == "service":
        problems.add("factory", 'only for kind = "asgi" or "wsgi" (a service entry is always '
                     "called as Entry(ctx)); remove the key")
    threads = _threads(data, kind, problems)
    websockets = _websockets(data, kind, problems)
    version = _string(data, "version", "", "", problems)
    mp_logging = _bool(data, "multiprocessing_logging", "", problems)
    settings = _table(data, "settings", problems)
    _settings_fit(settings, problems)
    sockets = _sockets(_table(data, "sockets", problems), source, problems)
    if kind in ("asgi", "wsgi"):
        _asgi_sockets(sockets, kind, problems)
    timing = _timing(data, config.defaults, "", problems)
    uid, gid = _identity(data, source.path, problems)
    problems.lines.extend(preload_conflicts(config, [source]))

    if problems.lines:
        raise ConfigError(problems.lines)
    return BundleSpec(
        name=source.name, path=source.path, entry=entry, kind=kind, factory=factory,
        version=version, sockets=sockets, settings=settings,
        multiprocessing_logging=mp_logging, timing=timing, uid=uid, gid=gid,
        threads=threads, websockets=websockets,
    )


#: The largest ``[settings]`` table (as the JSON the worker receives): settings
#: are configuration; data that large belongs in a file the bundle reads.
MAX_SETTINGS = 16 * 1024 * 1024


def _settings_fit(settings: dict[str, Any], problems: _Problems) -> None:
    """The settings reach the worker as JSON in its spec: they must be JSON
    (TOML dates and times are not) and at most ``MAX_SETTINGS``."""
    try:
        size = len(json.dumps(settings, separators=(",", ":")).encode())
    except (TypeError, ValueError):
        key = next((k for k, v in _flatten(settings) if not isinstance(
            v, str | int | float | bool | type(None))), "")
        problems.add(f"settings.{key}" if key else "settings",
                     "a date or time cannot reach the worker: write it as a string")
        return
    if size > MAX_SETTINGS:
        problems.add("settings", f"{size} bytes as JSON, more than the {MAX_SETTINGS >> 20} MiB "
                     f"a worker receives: put that data in a file the bundle reads")


def _flatten(table: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """``(dotted key, value)`` for every leaf of a TOML table (arrays by index)."""
    if isinstance(table, dict):
        items: list[tuple[str, Any]] = []
        for key, value in table.items():
            items += _flatten(value, f"{prefix}{key}.")
        return items
    if isinstance(table, list):
        return [pair for i, value in enumerate(table) for pair in _flatten(value, f"{prefix}{i}.")]
    return [(prefix.rstrip("."), table)]


def _identity(data: dict[str, Any], path: Path,
              problems: _Problems) -> tuple[int | None, int | None]:
    """``user`` and ``group``: the uid and gid the worker runs as, checked."""
    user = _string(data, "user", "", "", problems)
    group = _string(data, "group", "", "", problems)
    if not user:
        if group:
            problems.add("group", 'only with user = "NAME"')
        return None, None
    if os.geteuid() != 0:
        problems.add("user", f"the worker can run as {user!r} only when the supervisor runs "
                     f"as root (it runs as uid {os.geteuid()}); remove the key or start "
                     "hotsup as root")
        return None, None
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        problems.add("user", f"no such user: {user!r}")
        return None, None
    gid = entry.pw_gid
    if group:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            problems.add("group", f"no such group: {group!r}")
            return None, None
    if entry.pw_uid == 0:
        problems.add("user", f"{user!r} is root: a bundle user is there to drop privileges")
        return None, None
    unreadable = _unreadable_by(path, entry.pw_uid, gid)
    if unreadable:
        problems.add("user", f"user {user!r} cannot read the bundle directory: {unreadable} "
                     f"(make it readable by that user or group {gid})")
    return entry.pw_uid, gid


def _unreadable_by(path: Path, uid: int, gid: int) -> str:
    """What keeps ``uid``:``gid`` from reading ``path`` (a directory every
    ancestor of which it must be able to enter), or "" if nothing does. By
    mode bits, as the kernel decides for a process with only that group."""
    path = Path(os.path.realpath(path))
    for directory, need in [*((p, 0o1) for p in reversed(path.parents)), (path, 0o5)]:
        try:
            info = os.stat(directory)
        except OSError as exc:
            return f"{directory}: {exc.strerror}"
        if info.st_uid == uid:
            bits = info.st_mode >> 6
        elif info.st_gid == gid:
            bits = info.st_mode >> 3
        else:
            bits = info.st_mode
        if bits & need != need:
            return f"{directory} (mode {stat.S_IMODE(info.st_mode):o})"
    return ""


def _threads(data: dict[str, Any], kind: str, problems: _Problems) -> int:
    """``threads``: how many requests a wsgi bundle's app runs at once (its thread pool)."""
    if "threads" not in data:
        return DEFAULT_THREADS
    if kind != "wsgi":
        problems.add("threads", 'only for kind = "wsgi" (the size of its thread pool); '
                     "remove the key")
        return DEFAULT_THREADS
    threads: int = _number(data, "threads", DEFAULT_THREADS, "", problems, integer=True,
                           positive=True)
    if threads > MAX_THREADS:
        problems.add("threads", f"must be at most {MAX_THREADS}, got {threads}")
        return DEFAULT_THREADS
    return threads


def _websockets(data: dict[str, Any], kind: str, problems: _Problems) -> str:
    """``websockets``: what a hand-over does to an asgi bundle's open WebSockets."""
    if "websockets" not in data:
        return "close"
    value = data["websockets"]
    if kind != "asgi":
        problems.add("websockets", 'only for kind = "asgi" (what a hand-over does to its '
                     "open WebSockets); remove the key")
        return "close"
    if value not in _WEBSOCKET_MODES:
        problems.add("websockets", 'expected "close" (each open WebSocket is closed with 1012 '
                     'at a hand-over) or "resume" (each moves to the new generation), got '
                     f"{_describe(value)}")
        return "close"
    return str(value)


def _sockets(
    table: dict[str, Any], source: BundleSource, problems: _Problems
) -> tuple[SocketSpec, ...]:
    specs: list[SocketSpec] = []
    seen: dict[str, str] = {}
    for name, value in table.items():
        prefix = f"sockets.{name}."
        if not isinstance(value, dict):
            problems.add(f"sockets.{name}", f"expected a table, got {_describe(value)}")
            continue
        _unknown(value, {"bind"}, prefix, problems)
        if "bind" not in value:
            problems.add(f"{prefix}bind", 'missing (as in bind = "127.0.0.1:8101")')
            continue
        bind = _string(value, "bind", "", prefix, problems)
        if bind.startswith("systemd:"):
            fdname = bind[len("systemd:"):]
            if not _FDNAME.match(fdname):
                problems.add(f"{prefix}bind", f"{_describe(bind)}: expected systemd:NAME, NAME "
                             "as in the socket unit's FileDescriptorName= (printable ASCII, "
                             "no ':' or space)")
                continue
            spec = SocketSpec(name=name, bind=bind, systemd=fdname)
        else:
            try:
                host, port, path = parse_bind(bind, source.path)
            except ValueError as exc:
                problems.add(f"{prefix}bind", str(exc))
                continue
            spec = SocketSpec(name=name, bind=bind, host=host, port=port, path=path)
        if spec.shared and spec.key in seen:
            problems.add(f"{prefix}bind", f"{bind} is also used by sockets.{seen[spec.key]}")
            continue
        seen[spec.key] = name
        specs.append(spec)
    return tuple(specs)


def _asgi_sockets(sockets: tuple[SocketSpec, ...], kind: str, problems: _Problems) -> None:
    """An asgi (or wsgi) bundle serves one socket: the one named ``http``, or its only one."""
    names = [sock.name for sock in sockets]
    article = "an" if kind == "asgi" else "a"
    if not names:
        problems.add("sockets", f'{article} {kind} bundle needs a socket to serve (as in '
                     '[sockets.http] bind = "127.0.0.1:8103")')
    elif len(names) > 1:
        others = ", ".join(name for name in names if name != "http")
        if "http" in names:
            problems.add("sockets", f"{article} {kind} bundle serves only its socket named http; "
                         f"remove the others ({others})")
        else:
            problems.add("sockets", f"{article} {kind} bundle serves one socket: name it http, or "
                         f"declare only one (declared: {others})")


def _zygote_modules(preload: tuple[str, ...]) -> tuple[dict[str, str | None], dict[str, str]]:
    """What a fresh zygote imports (name -> file), and the preloads it cannot import."""
    probe = ("import importlib, json, sys\n"
             "import hotsup.worker.zygote\n"
             "from hotsup.worker.importer import loaded_modules\n"
             "errors = {}\n"
             "for name in sys.argv[1:]:\n"
             "    try: importlib.import_module(name)\n"
             "    except BaseException as exc: errors[name] = f'{type(exc).__name__}: {exc}'\n"
             "print(json.dumps([loaded_modules(), errors]))\n")
    try:
        result = subprocess.run([sys.executable, "-P", "-c", probe, *preload],
                                capture_output=True, text=True, timeout=60, check=True)
        modules, errors = json.loads(result.stdout.splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        # close enough: this process imported the runtime too
        return importer.loaded_modules(), {}
    return modules, errors


def _module_exists(bundle_dir: Path, module: str) -> bool:
    parts = module.split(".")
    base = bundle_dir.joinpath(*parts)
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file() or (
        len(parts) == 1 and any(bundle_dir.glob(f"{parts[0]}.*.so"))
    )


def preload_conflicts(config: Config, sources: list[BundleSource]) -> list[str]:
    """A preloaded module that lives in a bundle would never be reloaded: refuse it."""
    return [
        f"{config.path}: supervisor.preload: {module!r} lives in bundle {source.name!r} "
        f"({source.path}); bundle code cannot be preloaded"
        for source in sources
        for module in config.preload
        if _module_exists(source.path, module.split(".")[0])
    ]


def check(config_path: Path, probe: bool = True) -> list[str]:
    """Every problem in config.toml and its bundles, without starting anything.

    The bundles are checked even when config.toml has problems (with the
    defaults standing in for its bad values), so one run lists everything.
    With ``probe``, each valid bundle's entry is also imported as a worker
    would, in a throwaway interpreter (``probe_entries``).
    """
    config, problems = _read_config(config_path)
    if config is None:
        return problems
    owners: dict[str, str] = {}
    sources = config.sources()
    loaded: list[tuple[BundleSource, BundleSpec]] = []
    zygote_modules, preload_errors = _zygote_modules(config.preload)
    in_bundles = {module for module in config.preload for source in sources.values()
                  if _module_exists(source.path, module.split(".")[0])}
    problems.extend(f"{config.path}: supervisor.preload: cannot import {name!r}: {error}"
                    for name, error in preload_errors.items()
                    if name not in in_bundles)  # that one gets its own message below
    if config.bundles_dir is not None:
        problems.extend(misnamed(config.bundles_dir))
    for name, source in sorted(sources.items()):
        try:
            spec = load_bundle(source, config)
        except ConfigError as exc:
            problems.extend(exc.problems)
            continue
        try:  # what the runner digests before each load: a loop, a huge tree
            digest(source.path)
        except DigestError as exc:
            problems.append(str(exc))
            continue
        loaded.append((source, spec))
        problems.extend(f"{line}: rename it (the worker imports a module of that name first)"
                        for line in importer.shadowed(source.path, zygote_modules))
        problems.extend(systemd_problems(source, spec))
        for sock in spec.sockets:
            if not sock.shared:
                continue
            other = owners.setdefault(sock.key, name)
            if other != name:
                problems.append(f"{source.manifest}: sockets.{sock.name}.bind: {sock.bind} is "
                                f"already used by bundle {other!r}")
    if config.metrics is not None and config.metrics[1] != 0:
        host, port = config.metrics
        user = owners.get(f"tcp:{host}:{port}")
        if user is not None:
            problems.append(f"{config.path}: supervisor.metrics: {host}:{port} is also a "
                            f"socket of bundle {user!r}")
    if probe:
        problems.extend(probe_entries(config, loaded))
    return problems


def probe_entries(config: Config, bundles: list[tuple[BundleSource, BundleSpec]]) -> list[str]:
    """Import each bundle's entry as a worker would (``hotsup.worker.probe``), all at
    once, each in a fresh interpreter of its own session, bounded by the bundle's
    ``start_timeout``. Nothing is served and the entry is never called.

    Returns one line per failure: the bundle's file and line where the error
    was raised (a SyntaxError's own), else the file and key that name it.
    """
    running: list[tuple[BundleSource, BundleSpec, subprocess.Popen[str]]] = []
    for source, spec in bundles:
        # -P: the cwd does not go on sys.path; the probe puts the bundle there.
        # A session of its own, so a timeout kills whatever the import started.
        proc = subprocess.Popen(
            [sys.executable, "-P", "-m", "hotsup.worker.probe", str(spec.path), spec.entry],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            text=True, start_new_session=True, cwd=config.path.parent)
        running.append((source, spec, proc))
    problems = []
    for source, spec, proc in running:
        key_file = config.path if "entry" in source.overrides else source.manifest
        key = f"bundles.{source.name}.entry" if "entry" in source.overrides else "entry"
        timeout = spec.timing.start_timeout
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # the probe's own session, by its pid
            proc.communicate()
            problems.append(f"{key_file}: {key}: importing {spec.entry!r} did not finish "
                            f"within start_timeout ({timeout:g}s)")
            continue
        try:
            result = json.loads(out.splitlines()[-1])
        except (ValueError, IndexError):
            problems.append(f"{key_file}: {key}: importing {spec.entry!r} killed the "
                            f"interpreter (exit status {proc.returncode})")
            continue
        error = result.get("error")
        if error is None:
            continue
        if error.startswith("AttributeError: bundle.toml: "):  # the entry names nothing
            error = error.removeprefix("AttributeError: bundle.toml: ")
            problems.append(f"{key_file}: {key}: {error.partition(': ')[2]}")
        elif result.get("file"):
            problems.append(f"{result['file']}:{result['line']}: {error} (bundle "
                            f"{source.name!r}, {key} = {spec.entry!r})")
        else:
            problems.append(f"{key_file}: {key}: {error}")
    return problems


def systemd_problems(source: BundleSource, spec: BundleSpec,
                     environ: dict[str, str] | None = None) -> list[str]:
    """``hotsup check`` under systemd (LISTEN_FDS set): each ``systemd:NAME`` the
    bundle declares must be among LISTEN_FDNAMES. Without LISTEN_FDS there is
    nothing to compare with: only the syntax of NAME is checked (load_bundle);
    ``hotsup start`` refuses a name systemd did not pass."""
    env = os.environ if environ is None else environ
    if "LISTEN_FDS" not in env:
        return []
    passed = [n for n in env.get("LISTEN_FDNAMES", "").split(":") if n]
    return [f"{source.manifest}: sockets.{sock.name}.bind: systemd passed no socket named "
            f"{sock.systemd!r} (LISTEN_FDNAMES: {':'.join(passed) or 'none'})"
            for sock in spec.sockets
            if sock.systemd is not None and sock.systemd not in passed]
