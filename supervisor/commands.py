"""The supervisor's commands, each defined once, here.

Signals, file changes and control requests all become one of these objects
on the supervisor's queue, handled by one dispatcher (``server.Supervisor``).
A command a control request may ask for has a ``wire`` name and ``ARGS``, the
schema of its arguments: ``control.parse_request`` checks a request against
it and ``from_request`` builds the command, so adding a command is one class
here and one handler in the dispatcher's table. The first line of a command's
docstring is its help (``hotsup --help`` shows it).

A command that someone waits for carries a ``reply`` future, resolved when the
work is done (a reload: when its swap finished) or failed with a
``ControlError`` that says why.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Final, Self, TypeAlias

if TYPE_CHECKING:  # the command line imports this module: asyncio only for the types
    import asyncio

Reply: TypeAlias = "asyncio.Future[Any]"

#: The longest a ``logs`` request may wait for a new record (seconds).
MAX_WAIT: Final = 5.0
#: Records a ``logs`` request returns when it does not say.
DEFAULT_LIMIT: Final = 2000

#: The most file content one ``push_files`` carries (bytes, before base64).
PUSH_CHUNK: Final = 4 * 1024 * 1024

_NONE = type(None)


@dataclass(frozen=True)
class Arg:
    """One argument of a wire command: the JSON types it may have, and its default."""

    types: tuple[type, ...]
    required: bool = False
    default: Any = None

    def describe(self) -> str:
        return " or ".join("null" if t is _NONE else t.__name__ for t in self.types)


@dataclass(frozen=True)
class Command:
    """The base of every command; ``wire`` None: not for control requests."""

    wire: ClassVar[str | None] = None
    ARGS: ClassVar[dict[str, Arg]] = {}
    reply: Reply | None = field(default=None, kw_only=True)

    @classmethod
    def from_request(cls, args: dict[str, Any], reply: Reply) -> Self:
        """The command for a request whose ``args`` passed ``ARGS``."""
        values = {name: args.get(name, arg.default) for name, arg in cls.ARGS.items()}
        return cls(**values, reply=reply)

    @classmethod
    def help(cls) -> str:
        """The first line of the docstring, as ``--help`` shows it: "show every bundle"."""
        line = (cls.__doc__ or "").strip().splitlines()[0].rstrip(".")
        return line[:1].lower() + line[1:]


@dataclass(frozen=True)
class Status(Command):
    """Show every bundle."""

    wire = "status"


@dataclass(frozen=True)
class Reload(Command):
    """Swap a bundle now, even if its files did not change; report the outcome.

    Every bundle when ``name`` is None (SIGHUP too)."""

    wire = "reload"
    ARGS = {"name": Arg((str, _NONE)), "discard_state": Arg((bool,), default=False)}
    name: str | None = None
    discard_state: bool = False  # swap without the old generation's state
    signal: str = ""  # the signal that asked for it (SIGHUP), for the log


@dataclass(frozen=True)
class Stop(Command):
    """Take a bundle down: retire it, close its ports, until `run`."""

    wire = "stop"
    ARGS = {"name": Arg((str,), required=True)}
    name: str = ""


@dataclass(frozen=True)
class Run(Command):
    """Bring a stopped or failed bundle back."""

    wire = "run"
    ARGS = {"name": Arg((str,), required=True)}
    name: str = ""


@dataclass(frozen=True)
class Logs(Command):
    """Show the newest log records.

    Those numbered above ``after``, at most ``limit``, waiting up to ``wait``
    seconds (at most MAX_WAIT) for one: that is how ``logs -f`` follows."""

    wire = "logs"
    ARGS = {"name": Arg((str, _NONE)), "after": Arg((int,), default=0),
            "limit": Arg((int,), default=DEFAULT_LIMIT), "wait": Arg((int, float), default=0.0)}
    name: str | None = None
    after: int = 0
    limit: int = DEFAULT_LIMIT
    wait: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "wait", min(max(float(self.wait), 0.0), MAX_WAIT))


@dataclass(frozen=True)
class Shutdown(Command):
    """Drain every bundle and stop the supervisor."""

    wire = "shutdown"
    reason: str = "hotsup shutdown"

    @classmethod
    def from_request(cls, args: dict[str, Any], reply: Reply) -> Self:
        return cls("hotsup shutdown", reply=reply)


@dataclass(frozen=True)
class PushBegin(Command):
    """Offer a bundle's manifest; the answer lists the contents the supervisor lacks.

    ``files`` maps a relative path to ``[sha256 hex, size, mode]``, ``links`` a
    relative path to its symlink target (see ``push``)."""

    wire = "push_begin"
    ARGS = {"name": Arg((str,), required=True), "files": Arg((dict,), required=True),
            "links": Arg((dict,), default={})}
    name: str = ""
    files: dict[str, Any] = field(default_factory=dict)
    links: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PushFiles(Command):
    """Send contents a push lacks: ``blobs`` of ``[sha256 hex, offset, base64]``."""

    wire = "push_files"
    ARGS = {"push": Arg((str,), required=True), "blobs": Arg((list,), required=True)}
    push: str = ""
    blobs: list[Any] = field(default_factory=list)


@dataclass(frozen=True)
class PushCommit(Command):
    """Swap the pushed tree in and report the bundle's pass (as ``reload`` does)."""

    wire = "push_commit"
    ARGS = {"push": Arg((str,), required=True)}
    push: str = ""


@dataclass(frozen=True)
class FilesChanged(Command):
    """Files changed under a watched directory (from the watcher)."""

    paths: frozenset[Path] = frozenset()


@dataclass(frozen=True)
class FilesChanging(Command):
    """Files are changing under a watched directory (the watcher's early word,
    before the quiet period): the bundles there may load their next generation
    ahead, so that when the quiet period ends only the switch is left."""

    paths: frozenset[Path] = frozenset()


#: Every command a control request may name, by its wire name.
WIRE: Final[dict[str, type[Command]]] = {
    cls.wire: cls for cls in (Status, Reload, Stop, Run, Logs, Shutdown, PushBegin, PushFiles,
                              PushCommit) if cls.wire
}
