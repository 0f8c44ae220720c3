"""The listening sockets: bound once by the supervisor, held for as long as a bundle uses them.

The supervisor keeps its own copy of every listening socket open, so the port
never closes while generations come and go, and connections that arrive while
no generation accepts wait in the kernel backlog. Workers receive copies by
SCM_RIGHTS. Nobody ever calls ``shutdown()`` on a listening socket: it would
reset the queued connections of every holder.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat
from dataclasses import dataclass

from hotsup.worker.protocol import BACKLOG

from .config import MANIFEST, BundleSpec, SocketSpec

log = logging.getLogger("hotsup")


class SocketError(Exception):
    """A socket could not be bound; the message names the bundle, socket and address."""


@dataclass
class Bound:
    key: str
    owner: str
    sock: socket.socket
    address: str


class SocketRegistry:
    """Every bound listening socket, by address, with the bundle that owns it."""

    def __init__(self) -> None:
        self._bound: dict[str, Bound] = {}

    def acquire(self, spec: BundleSpec) -> dict[str, socket.socket]:
        """The sockets ``spec`` declares: the ones it already holds, others bound now.

        All or nothing: if one cannot be bound, the ones bound by this call are
        closed again and SocketError says why.
        """
        fresh: list[str] = []
        result: dict[str, socket.socket] = {}
        try:
            for sock_spec in spec.sockets:
                key = self._key(spec.name, sock_spec)
                bound = self._bound.get(key)
                where = f"{spec.path / MANIFEST}: sockets.{sock_spec.name}.bind"
                if bound is not None and bound.owner != spec.name:
                    raise SocketError(
                        f"{where}: {sock_spec.bind} is already used by bundle {bound.owner!r}"
                    )
                if bound is None:
                    bound = self._bind(spec.name, key, sock_spec, where)
                    self._bound[key] = bound
                    fresh.append(key)
                result[sock_spec.name] = bound.sock
        except BaseException:
            for key in fresh:
                self._close(self._bound.pop(key))
            raise
        return result

    def release_unused(self, owner: str, keep: list[BundleSpec]) -> None:
        """Close ``owner``'s sockets that none of the specs in ``keep`` declares."""
        wanted = {self._key(spec.name, s) for spec in keep for s in spec.sockets}
        for key, bound in list(self._bound.items()):
            if bound.owner == owner and key not in wanted:
                self._close(self._bound.pop(key))

    def addresses(self, owner: str) -> list[str]:
        return [b.address for b in self._bound.values() if b.owner == owner]

    def close_all(self) -> None:
        for key in list(self._bound):
            self._close(self._bound.pop(key))

    @staticmethod
    def _key(owner: str, spec: SocketSpec) -> str:
        # Port 0 asks the kernel for a port: each such socket is its own.
        return f"{spec.key}:{owner}:{spec.name}" if spec.port == 0 and spec.path is None \
            else spec.key

    def _bind(self, owner: str, key: str, spec: SocketSpec, where: str) -> Bound:
        try:
            sock = _bind_unix(spec) if spec.path is not None else _bind_tcp(spec)
        except OSError as exc:
            raise SocketError(f"{where}: cannot bind {spec.bind}: {exc.strerror or exc}") from None
        if spec.path is not None:
            address = f"unix:{spec.path}"
        else:
            host, port = sock.getsockname()[:2]
            address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        log.info("%s: socket %s listening on %s", owner, spec.name, address)
        return Bound(key, owner, sock, address)

    @staticmethod
    def _close(bound: Bound) -> None:
        path = bound.address[len("unix:"):] if bound.address.startswith("unix:") else None
        bound.sock.close()  # our copy only; a worker still draining keeps its own
        if path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        log.info("%s: closed %s", bound.owner, bound.address)


def _listening(family: socket.AddressFamily, address: str | tuple[str, int]) -> socket.socket:
    """A non-blocking socket listening on ``address`` with the shared BACKLOG."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if family != socket.AF_UNIX:
            # Rebinding right after a restart must not wait out TIME_WAIT. No
            # SO_REUSEPORT: a second bind of the same port is a mistake to report.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _bind_tcp(spec: SocketSpec) -> socket.socket:
    family = socket.AF_INET6 if ":" in spec.host else socket.AF_INET
    return _listening(family, (spec.host, spec.port))


def _bind_unix(spec: SocketSpec) -> socket.socket:
    assert spec.path is not None
    path = str(spec.path)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(mode):
            raise FileExistsError(17, f"{path} exists and is not a socket")
        if _unix_in_use(path):
            raise OSError(98, f"{path} is in use by another process")
        os.unlink(path)  # stale, from a process that died
    return _listening(socket.AF_UNIX, path)


def _unix_in_use(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        return False
    finally:
        probe.close()
    return True
