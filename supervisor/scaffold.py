"""``hotsup new NAME --kind service|asgi|wsgi``: a first bundle that is right the first time.

A scaffold is a bundle directory, ``DIR/NAME``, holding ``bundle.toml`` and one
module with every hook a kind has, each with one comment saying when hotsup
calls it and what belongs there:

* service: a class with ``__init__(ctx)``, ``restore(state)``, ``start()``,
  ``snapshot()``, ``stop()``, and a connection handler served through
  ``ctx.serve`` (so hotsup can pause it and count what is in flight);
* asgi: an ASGI app with its lifespan (startup, shutdown) and the module-level
  ``hotsup_snapshot()``/``hotsup_restore(state)``;
* wsgi: a WSGI callable with the same two module-level hooks.

Each keeps a request count as its state, so the first swap shows the hand-over.
The scaffold passes ``hotsup check`` and serves as written.

Contracts: ``create`` never overwrites anything (an existing ``DIR/NAME`` is a
``ScaffoldError``), and the directory appears whole: it is written under a
dot-name beside it (which the watcher and the bundle scan skip) and renamed
into place, so a running supervisor never sees a half-written bundle.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shutil
import socket
import string
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path

from .config import valid_name

KINDS = ("service", "asgi", "wsgi")

#: The first port ``pick_bind`` offers: beside the demo's 8101-8103.
FIRST_PORT = 8100


class ScaffoldError(Exception):
    """The scaffold cannot be written (the message names the path and why)."""


@dataclass(frozen=True)
class Scaffold:
    """What ``create`` wrote: the bundle directory, its files, its address."""

    path: Path
    files: tuple[str, ...]
    bind: str


def create(name: str, kind: str, directory: Path, bind: str | None = None) -> Scaffold:
    """Write the ``kind`` scaffold of bundle ``name`` as ``directory/name``.

    ``bind`` is its socket's ``HOST:PORT``; None picks one (``pick_bind``).
    Raises ScaffoldError for a bad name or kind, or if ``directory/name`` exists.
    """
    if not valid_name(name):
        raise ScaffoldError(f"{name!r}: a bundle name may use letters, digits, _ . and -")
    if kind not in KINDS:
        raise ScaffoldError(f"--kind {kind}: expected one of {', '.join(KINDS)}")
    if not directory.is_dir():
        raise ScaffoldError(f"{directory} is not a directory (create it, or give --dir DIR)")
    target = directory / name
    if target.exists() or target.is_symlink():
        raise ScaffoldError(f"{target} exists: hotsup new never overwrites; choose another "
                            f"NAME or remove it")
    if bind is None:
        bind = pick_bind(directory)
    elif not re.fullmatch(r"[^\s:]+:\d+|\[[0-9A-Fa-f:.]+\]:\d+", bind):
        raise ScaffoldError(f"--bind {bind}: expected HOST:PORT (edit bundle.toml for "
                            f"another kind of address)")
    module = module_name(name)
    words = {"name": name, "module": module, "cls": _class_name(module), "bind": bind,
             "host": bind.rpartition(":")[0], "port": bind.rpartition(":")[2]}
    files = {"bundle.toml": _MANIFESTS[kind], f"{module}.py": _MODULES[kind]}
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.new-", dir=directory))
    try:
        for filename, template in files.items():
            (staging / filename).write_text(string.Template(template).substitute(words))
        os.chmod(staging, 0o777 & ~_umask())  # as mkdir would have made it, not mkdtemp's 0700
        if target.exists():  # made meanwhile: still never overwritten
            raise ScaffoldError(f"{target} exists: hotsup new never overwrites")
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return Scaffold(target, tuple(files), bind)


def module_name(name: str) -> str:
    """The module a bundle named ``name`` gets: ``name`` as an identifier, unless
    that is importable already (the standard library, or a package the worker
    may have imported, such as ``queue`` or ``uvicorn``): a bundle module of
    that name would be refused, so it gets a ``_bundle`` suffix."""
    module = re.sub(r"\W", "_", name)
    if not module[0].isalpha() and module[0] != "_":
        module = f"bundle_{module}"
    with contextlib.suppress(ImportError, ValueError):
        if importlib.util.find_spec(module) is not None:
            return f"{module}_bundle"
    return module


def pick_bind(directory: Path) -> str:
    """``127.0.0.1:PORT`` with the first port from FIRST_PORT up that no bundle in
    ``directory`` declares and that nothing listens on now."""
    declared = _declared_ports(directory)
    for port in range(FIRST_PORT, 65536):
        if port not in declared and _free(port):
            return f"127.0.0.1:{port}"
    raise ScaffoldError("no free port on 127.0.0.1 from 8100 up: give --bind HOST:PORT")


def _declared_ports(directory: Path) -> set[int]:
    ports = set()
    for manifest in directory.glob("*/bundle.toml"):
        try:
            sockets = tomllib.loads(manifest.read_text()).get("sockets", {})
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
            continue  # not ours to judge here: `hotsup check` reports it
        for spec in sockets.values() if isinstance(sockets, dict) else ():
            bind = spec.get("bind") if isinstance(spec, dict) else None
            if isinstance(bind, str) and bind.rpartition(":")[2].isdigit():
                ports.add(int(bind.rpartition(":")[2]))
    return ports


def _free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as hotsup binds
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _class_name(module: str) -> str:
    return "".join(part[:1].upper() + part[1:] for part in module.split("_") if part) or "Bundle"


# -- the templates (string.Template: $name, $module, $cls, $bind, $host, $port) ---------

_SERVICE_TOML = """\
# $name: a service bundle (from `hotsup new`). README.md, Bundles, has every key.
# module:attribute in this directory, called as $cls(ctx)
entry = "$module:$cls"
# shown by `hotsup status`
version = "0.1.0"

# a listening socket the supervisor owns and hands to each generation: it never closes
[sockets.main]
bind = "$bind"

# free-form, handed to the bundle as ctx.settings (a change swaps the bundle)
[settings]
greeting = "hello"
"""

_SERVICE_PY = '''\
"""$name: a line service whose count survives every swap.

    $$ printf 'hi\\n' | nc $host $port
    hello #1 from $name@1: hi

Edit this file and save: hotsup starts a new generation, hands the count over
(snapshot() of the old one, restore() of the new one) and retires the old one.
"""

from __future__ import annotations

import asyncio
from typing import Any


class $cls:
    def __init__(self, ctx: Any) -> None:
        # Called while the old generation still serves: slow set-up belongs here.
        self.ctx = ctx
        self.count = 0

    def restore(self, state: dict[str, Any]) -> None:
        # Called on the new generation, before start(), with the old one's snapshot().
        self.count = state["count"]

    async def start(self) -> None:
        # Begin serving and return; hotsup accepts for it once this returned. Keep
        # it quick: during a hand-over nobody accepts until it has.
        await self.ctx.serve("main", self.handle)

    def snapshot(self) -> dict[str, Any]:
        # Called on the old generation once its connections finished: picklable state.
        return {"count": self.count}

    async def stop(self) -> None:
        # Called at retirement, after the drain: release what __init__ and start() took.
        pass

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # One connection, one line: a connection left open would hold up a
        # hand-over (it waits up to quiesce_timeout for connections to finish).
        line = (await reader.readline()).decode(errors="replace").strip()
        self.count += 1
        greeting = self.ctx.settings.get("greeting", "hello")
        tag = f"{self.ctx.name}@{self.ctx.generation}"
        writer.write(f"{greeting} #{self.count} from {tag}: {line}\\n".encode())
        await writer.drain()
        writer.close()
'''

_ASGI_TOML = """\
# $name: an asgi bundle (from `hotsup new`). README.md, asgi bundles, has every key.
# the ASGI application in $module.py, served by uvicorn's HTTP protocol
entry = "$module:app"
kind = "asgi"
# shown by `hotsup status`
version = "0.1.0"

# a listening socket the supervisor owns and hands to each generation: it never closes
[sockets.http]
bind = "$bind"
"""

_ASGI_PY = '''\
"""$name: an ASGI app whose count survives every swap.

    $$ curl -s http://$bind/
    hello #1 from $name@1

Edit this file and save: hotsup starts a new generation, hands the count over
(hotsup_snapshot() of the old one, hotsup_restore() of the new one) and retires
the old one.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

count = 0


def hotsup_snapshot() -> dict[str, Any]:
    # Called on the old generation once its requests finished: picklable state.
    return {"count": count}


def hotsup_restore(state: dict[str, Any]) -> None:
    # Called on the new generation, before it serves, with the old one's snapshot.
    global count
    count = state["count"]


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        await lifespan(receive, send)
        return
    global count
    count += 1
    ctx = scope["state"]["hotsup"]  # the bundle's ctx: name, generation, settings, log
    body = f"hello #{count} from {ctx.name}@{ctx.generation}\\n".encode()
    await send({"type": "http.response.start", "status": 200, "headers": [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(body)).encode()),
    ]})
    await send({"type": "http.response.body", "body": body})


async def lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            # Runs while the old generation still serves: slow set-up belongs here.
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            # Runs at retirement, after the drain: release what the startup took.
            await send({"type": "lifespan.shutdown.complete"})
            return
'''

_WSGI_TOML = """\
# $name: a wsgi bundle (from `hotsup new`). README.md, wsgi bundles, has every key.
# the WSGI callable in $module.py (a Flask app, Django's get_wsgi_application())
entry = "$module:app"
kind = "wsgi"
# how many requests the callable runs at once, each in a thread of its own
threads = 10
# shown by `hotsup status`
version = "0.1.0"

# a listening socket the supervisor owns and hands to each generation: it never closes
[sockets.http]
bind = "$bind"
"""

_WSGI_PY = '''\
"""$name: a WSGI callable whose count survives every swap.

    $$ curl -s http://$bind/
    hello #1 from $name@1

Edit this file and save: hotsup starts a new generation, hands the count over
(hotsup_snapshot() of the old one, hotsup_restore() of the new one) and retires
the old one. Set-up at import (a framework's app) runs while the old one serves.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any

count = 0
lock = threading.Lock()  # the callable runs in `threads` threads at once


def hotsup_snapshot() -> dict[str, Any]:
    # Called on the old generation once its calls finished: picklable state.
    return {"count": count}


def hotsup_restore(state: dict[str, Any]) -> None:
    # Called on the new generation, before it serves, with the old one's snapshot.
    global count
    count = state["count"]


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    global count
    with lock:
        count += 1
        mine = count
    ctx = environ["hotsup"]  # the bundle's ctx: name, generation, settings, log
    body = f"hello #{mine} from {ctx.name}@{ctx.generation}\\n".encode()
    start_response("200 OK", [("Content-Type", "text/plain; charset=utf-8"),
                              ("Content-Length", str(len(body)))])
    return [body]
'''

_MANIFESTS = {"service": _SERVICE_TOML, "asgi": _ASGI_TOML, "wsgi": _WSGI_TOML}
_MODULES = {"service": _SERVICE_PY, "asgi": _ASGI_PY, "wsgi": _WSGI_PY}
