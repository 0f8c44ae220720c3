"""The listening sockets: bound once by the supervisor, held for as long as a bundle uses them.

The supervisor keeps its own copy of every listening socket open, so the port
never closes while generations come and go, and connections that arrive while
no generation accepts wait in the kernel backlog. Workers receive copies by
SCM_RIGHTS. Nobody ever calls ``shutdown()`` on a listening socket: it would
reset the queued connections of every holder.

Under systemd socket activation (``bind = "systemd:NAME"``) the socket is not
bound here but taken from those systemd passed (``systemd_sockets``); the
supervisor then holds it like one of its own, and keeps it even while no
bundle declares it, since it could not get it back before its next start.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat
from collections.abc import MutableMapping
from dataclasses import dataclass

from hotsup.worker.protocol import BACKLOG

from .config import MANIFEST, BundleSpec, SocketSpec

log = logging.getLogger("hotsup")


class SocketError(Exception):
    """A socket could not be bound; the message names the bundle, socket and address."""


@dataclass
class Bound:
    key: str
    owner: str  # the bundle's name, for messages
    holder: object  # the bundle's runner: who may use and close it
    sock: socket.socket
    address: str
    adoptable: bool = False  # its bundle is going away: the next to declare it takes it


class SocketRegistry:
    """Every bound listening socket, by address, with the bundle runner that holds it.

    Holders are runner objects, not names: a bundle removed and added again
    (or renamed) is a new runner while the old one still drains. The old one
    ``disown()``s its sockets first, so the new one adopts them, with the
    connections queued in their backlog, instead of failing to bind the
    address the old one still holds.
    """

    def __init__(self, inherited: dict[str, socket.socket] | None = None) -> None:
        self._bound: dict[str, Bound] = {}
        #: The sockets systemd passed, by name (``systemd_sockets``): held for
        #: our whole life, whoever uses them.
        self._inherited = dict(inherited or {})

    def acquire(self, spec: BundleSpec, holder: object) -> dict[str, socket.socket]:
        """The sockets ``spec`` declares: the ones ``holder`` holds or may adopt,
        others bound now.

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
                if bound is not None and bound.holder is not holder:
                    if not bound.adoptable:
                        raise SocketError(f"{where}: {sock_spec.bind} is already used by "
                                          f"bundle {bound.owner!r}")
                    log.info("%s: takes over %s from %s", spec.name, bound.address, bound.owner,
                             extra={"bundle": spec.name})
                    bound.owner, bound.holder, bound.adoptable = spec.name, holder, False
                if bound is None:
                    bound = self._bind(spec.name, holder, key, sock_spec, where)
                    self._bound[key] = bound
                    fresh.append(key)
                result[sock_spec.name] = bound.sock
        except BaseException:
            for key in fresh:
                self._close(self._bound.pop(key))
            raise
        return result

    def disown(self, holder: object) -> None:
        """``holder``'s bundle is going away: let the next bundle that declares
        one of its addresses adopt the socket (until ``holder`` closes it)."""
        for bound in self._bound.values():
            if bound.holder is holder:
                bound.adoptable = True

    def release_unused(self, holder: object, keep: list[BundleSpec]) -> None:
        """Close ``holder``'s sockets that none of the specs in ``keep`` declares."""
        wanted = {self._key(spec.name, s) for spec in keep for s in spec.sockets}
        for key, bound in list(self._bound.items()):
            if bound.holder is holder and key not in wanted:
                self._close(self._bound.pop(key))

    def addresses(self, holder: object) -> list[str]:
        return [b.address for b in self._bound.values() if b.holder is holder]

    def close_all(self) -> None:
        for key in list(self._bound):
            self._close(self._bound.pop(key))
        for sock in self._inherited.values():
            sock.close()
        self._inherited.clear()

    @staticmethod
    def _key(owner: str, spec: SocketSpec) -> str:
        # Port 0 asks the kernel for a port: each such socket is its own.
        return spec.key if spec.shared else f"{spec.key}:{owner}:{spec.name}"

    def _bind(self, owner: str, holder: object, key: str, spec: SocketSpec,
              where: str) -> Bound:
        if spec.systemd is not None:
            return self._take_inherited(owner, holder, key, spec, where)
        try:
            sock = _bind_unix(spec) if spec.path is not None else _bind_tcp(spec)
        except OSError as exc:
            raise SocketError(f"{where}: cannot bind {spec.bind}: {exc.strerror or exc}") from None
        if spec.path is not None:
            address = f"unix:{spec.path}"
        else:
            host, port = sock.getsockname()[:2]
            address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        log.info("%s: socket %s listening on %s", owner, spec.name, address,
                 extra={"bundle": owner})
        return Bound(key, owner, holder, sock, address)

    def _take_inherited(self, owner: str, holder: object, key: str, spec: SocketSpec,
                        where: str) -> Bound:
        assert spec.systemd is not None
        sock = self._inherited.get(spec.systemd)
        if sock is None:
            if not self._inherited:
                raise SocketError(f"{where}: {spec.bind}: systemd passed no sockets (hotsup "
                                  f"was not started by socket activation: no LISTEN_FDS for "
                                  f"pid {os.getpid()})")
            raise SocketError(f"{where}: {spec.bind}: systemd passed no socket of that name "
                              f"(it passed: {', '.join(sorted(self._inherited))})")
        address = f"systemd:{spec.systemd} ({_describe(sock)})"
        log.info("%s: socket %s listening on %s", owner, spec.name, address,
                 extra={"bundle": owner})
        return Bound(key, owner, holder, sock, address)

    def _close(self, bound: Bound) -> None:
        if bound.address.startswith("systemd:"):
            # Ours until we exit (close_all): systemd hands it over only at start.
            log.info("%s: released %s", bound.owner, bound.address,
                     extra={"bundle": bound.owner})
            return
        path = bound.address[len("unix:"):] if bound.address.startswith("unix:") else None
        bound.sock.close()  # our copy only; a worker still draining keeps its own
        if path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        log.info("%s: closed %s", bound.owner, bound.address, extra={"bundle": bound.owner})


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


# -- systemd socket activation ------------------------------------------------------

#: sd_listen_fds(3): the first passed descriptor is fd 3, the others follow.
SD_LISTEN_FDS_START = 3
_ACTIVATION_ENV = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def systemd_sockets(environ: MutableMapping[str, str] | None = None) -> dict[str, socket.socket]:
    """The listening sockets systemd passed us, by name (sd_listen_fds_with_names(3)).

    Reads LISTEN_PID, LISTEN_FDS and LISTEN_FDNAMES and unsets them, so neither
    the zygote nor any worker believes it was passed these fds. They are ours
    only if LISTEN_PID is our pid (else they were meant for a parent, and are
    left alone). Each becomes close-on-exec (systemd passes them inheritable,
    and uvloop does not close fds for us) and non-blocking, and listens with
    the shared BACKLOG (DESIGN.md: every holder uses the same one). An fd that
    is not a listening stream socket is refused with a warning; of two with one
    name, the first is taken. Call it once, before any child is started.
    """
    env = os.environ if environ is None else environ
    pid, count, names = (env.pop(key, None) for key in _ACTIVATION_ENV)
    if count is None:
        return {}
    if pid is None or not pid.isdigit() or int(pid) != os.getpid():
        log.warning("LISTEN_FDS is set for pid %s, not for us (%d): the sockets are ignored",
                    pid, os.getpid())
        return {}
    if not count.isdigit():
        log.warning("LISTEN_FDS=%r is not a number: no systemd socket is used", count)
        return {}
    labels = names.split(":") if names else []
    if len(labels) != int(count):
        log.warning("LISTEN_FDNAMES names %d socket(s) but LISTEN_FDS is %s: the unnamed ones "
                    "are called 'unknown', as systemd does", len(labels), count)
        labels = (labels + ["unknown"] * int(count))[:int(count)]
    found: dict[str, socket.socket] = {}
    for offset, name in enumerate(labels):
        sock = _adopt(SD_LISTEN_FDS_START + offset, name)
        if sock is None:
            continue
        if name in found:
            log.warning("systemd passed two sockets named %r: fd %d is not used", name,
                        sock.fileno())
            sock.close()
            continue
        found[name] = sock
        log.info("systemd passed socket %r: %s", name, _describe(sock))
    return found


def _adopt(fd: int, name: str) -> socket.socket | None:
    try:
        os.set_inheritable(fd, False)  # before anything can fork or exec
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        log.warning("systemd socket %r (fd %d) is unusable: %s", name, fd, exc.strerror or exc)
        return None
    listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    if sock.type != socket.SOCK_STREAM or not listening:
        log.warning("systemd socket %r (fd %d) is not a listening stream socket (use "
                    "ListenStream= with Accept=no): not used", name, fd)
        sock.close()
        return None
    sock.setblocking(False)
    sock.listen(BACKLOG)  # already listening: this only sets the backlog, ours for all
    return sock


def _describe(sock: socket.socket) -> str:
    where = sock.getsockname()
    if isinstance(where, tuple):
        host, port = where[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if isinstance(where, bytes):  # abstract unix socket
        return f"unix:@{where[1:].decode(errors='replace')}"
    return f"unix:{where}" if where else "unix:(unnamed)"
