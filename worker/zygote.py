"""The zygote: a fresh interpreter that forks workers.

Started by the supervisor as ``python -m hotsup.worker.zygote`` (never forked
from it: the supervisor runs an event loop and a zmq context, and neither may
cross a fork). It imports the worker runtime, uvloop, zmq and the configured
``preload`` modules, and no bundle code. It runs no event loop and owns no zmq
context, so a fork of it carries nothing that the child could misuse.

It serves the supervisor on a ``SOCK_SEQPACKET`` socketpair (see
``protocol``): each ``spawn`` request brings the worker's log pipe, its end of
its own channel to the supervisor and its listening sockets by ``SCM_RIGHTS``,
and nothing else; the zygote forks, answers ``spawned`` with the pid, and
later ``exited`` with the wait status once it reaped the worker (and killed
what was left of its process group). The worker reads its spec from its
channel: the zygote never holds a bundle's spec, so no child forked from it
carries another's. Every child closes every fd that is not its own right
after the fork.
It watches its children with pidfds, not SIGCHLD, so there is no signal handler
or wakeup fd for a child to inherit.

Forking a process that already imported the heavy, unchanging parts starts a
generation in a few milliseconds instead of the tens a fresh interpreter needs.
And the fork itself is done ahead of time: a *spare* child, forked after each
spawn, sets up what does not depend on the bundle (its process group, signals,
watchdog, event loop) and waits for a spawn request of its own, so a swap
does not wait for a fork.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import importlib
import os
import selectors
import signal
import socket
import sys
import traceback
from collections.abc import Callable
from typing import Any

# Imported here, once, so every worker forked from us has them already.
import uvloop  # noqa: F401
import zmq
import zmq.asyncio  # noqa: F401

from . import channel as wire
from . import credentials, importer, runtime
from . import protocol as P

#: The most fds one spawn request may carry (a log pipe and the sockets).
_MAX_FDS = 64

#: Seconds a new worker waits for its spec, queued before it was forked.
_SPEC_TIMEOUT = 10.0

#: Signals whose disposition a worker must not inherit from the zygote.
_RESET_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD, signal.SIGUSR1)


class Zygote:
    def __init__(self, channel: socket.socket, lifeline: int) -> None:
        self.channel = channel
        self.lifeline = lifeline
        self.selector = selectors.DefaultSelector()
        self.children: dict[int, int] = {}  # pidfd -> pid
        self.spare: tuple[int, socket.socket] | None = None  # pid, its request socket

    def serve(self) -> int:
        self.selector.register(self.channel, selectors.EVENT_READ, "channel")
        self.selector.register(self.lifeline, selectors.EVENT_READ, "lifeline")
        try:
            while True:
                if self.spare is None:
                    # Forked here, between requests, never from inside one: no
                    # frame of ours holds a request or its fds at the fork.
                    self._fork_spare()
                for key, _ in self.selector.select():
                    if key.data == "channel":
                        if not self._on_request():
                            return 0
                    elif key.data == "lifeline":
                        if not os.read(self.lifeline, 1):
                            return 0
                    else:
                        self._on_child_exit(key.fd)
        finally:
            self._drop_spare()

    def _on_request(self) -> bool:
        try:
            data, fds, _flags, _addr = socket.recv_fds(self.channel, P.MAX_ZYGOTE_MESSAGE, _MAX_FDS)
        except (ConnectionResetError, BrokenPipeError):
            return False
        for fd in fds:
            # SCM_RIGHTS fds arrive inheritable: a program the bundle runs must
            # not hold its listening socket (it would keep the port open).
            os.set_inheritable(fd, False)
        if not data:
            for fd in fds:
                os.close(fd)
            return False  # the supervisor closed its end: we are done
        request: dict[str, Any] = {}
        try:
            request = P.unpack_zygote(data)
            if request["op"] != P.ZY_SPAWN:
                raise P.ProtocolError(f"unknown zygote request {request['op']!r}")
            pid = self._fork(fds)
        except Exception as exc:
            self._reply({"op": P.ZY_ERROR, "id": request.get("id"), "error": str(exc)})
        else:
            self._reply({"op": P.ZY_SPAWNED, "id": request["id"], "pid": pid})
        finally:
            for fd in fds:
                os.close(fd)
        return True

    def _fork(self, fds: list[int]) -> int:
        """A worker for these fds (``[log_pipe, channel, *sockets]``): the spare,
        or a child forked now. The spec is not ours to see: the worker reads it
        from its channel."""
        if len(fds) < 2:
            raise P.ProtocolError(f"spawn carried {len(fds)} fds, not a log pipe and a channel")
        pid = self._hand_to_spare(fds)
        if pid is not None:
            return pid
        return self._fork_child(lambda: self._become_worker(fds, self._detach(fds)))

    def _hand_to_spare(self, fds: list[int]) -> int | None:
        """Give the request to the waiting spare; its pid, or None if there is none."""
        spare, self.spare = self.spare, None
        if spare is None:
            return None
        pid, sock = spare
        try:
            socket.send_fds(sock, [P.pack_zygote({"op": P.ZY_SPAWN})], fds)
        except OSError:  # it died meanwhile; its exit is reported as any child's
            return None
        finally:
            sock.close()
        return pid

    def _fork_spare(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            pid = self._fork_child(lambda: self._wait_as_spare(theirs))
        except OSError:
            ours.close()
            return  # no spare: the next spawn forks the usual way
        finally:
            theirs.close()
        self.spare = (pid, ours)

    def _wait_as_spare(self, sock: socket.socket) -> int:
        loop = self._detach([sock.fileno()])
        _name_process("hotsup-spare")
        # A worker's load walks every module it has (``importer.shadowed``):
        # the first touch of each, after the fork, is a copy-on-write fault.
        # Taken here, while the spare waits, they cost a swap nothing (1.5 of
        # its 8 ms of loading, measured), and no memory: a worker touches
        # those pages anyway.
        importer.loaded_modules()
        try:
            data, fds, _flags, _addr = socket.recv_fds(sock, P.MAX_ZYGOTE_MESSAGE, _MAX_FDS)
        except OSError:
            return 0
        finally:
            sock.close()
        for fd in fds:
            os.set_inheritable(fd, False)
        if not data or len(fds) < 2:
            return 0  # the zygote is done with us
        return self._become_worker(fds, loop)

    def _drop_spare(self) -> None:
        spare, self.spare = self.spare, None
        if spare is None:
            return
        pid, sock = spare
        sock.close()  # EOF: it exits
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)

    def _fork_child(self, body: Callable[[], int]) -> int:
        """Fork a child that runs ``body`` and exits with its code; its pid."""
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child, which never returns
            code = 70
            try:
                code = body()
            except SystemExit as exc:  # sys.exit() in the bundle: its code, as Python gives it
                code = _exit_code(exc)
            except BaseException:
                traceback.print_exc()
            finally:
                try:
                    sys.stdout.flush()
                    sys.stderr.flush()
                finally:
                    os._exit(code)
        pidfd = os.pidfd_open(pid)
        self.children[pidfd] = pid
        self.selector.register(pidfd, selectors.EVENT_READ, "child")
        return pid

    def _detach(self, keep: list[int]) -> asyncio.AbstractEventLoop:
        """In a new child: leave the zygote's group, signals and fds behind, and
        prepare what a worker needs whatever its bundle."""
        # Own process group: the supervisor stops a worker and whatever it
        # spawned with one killpg, and a terminal's Ctrl-C reaches only the
        # supervisor, which drains the workers in order.
        os.setpgid(0, 0)
        for sig in _RESET_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.set_wakeup_fd(-1)
        # Drop the zygote's own fds. close() on the epoll fd only drops this
        # process's reference; it does not touch the zygote's registrations.
        self.selector.close()
        self.channel.close()
        for pidfd in self.children:
            os.close(pidfd)
        if self.spare is not None:
            self.spare[1].close()
        # And every other fd but ours: stdio, the lifeline and what this child
        # was forked for. Whatever else the zygote (or a preloaded module) had
        # open, another worker's included, must not reach bundle code.
        _close_all_but({0, 1, 2, self.lifeline, *keep})
        return runtime.prepare(self.lifeline)

    def _become_worker(self, fds: list[int], loop: asyncio.AbstractEventLoop) -> int:
        log_fd, channel_fd, socket_fds = fds[0], fds[1], fds[2:]
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.close(log_fd)
        channel = socket.socket(fileno=channel_fd)
        sockets = [socket.socket(fileno=fd) for fd in socket_fds]
        # The supervisor queued the spec on the channel before asking for us.
        message = wire.receive_blocking(channel, _SPEC_TIMEOUT)
        if message is None:
            return 0  # the supervisor gave the spawn up
        wire.close_fds(message.fds)
        spec = wire.decode_spec(message)
        if len(spec["socket_names"]) != len(sockets):
            raise P.ProtocolError(f"spawn carried {len(sockets)} sockets for "
                                  f"{spec['socket_names']}")
        _name_process(f"{spec['bundle']}@{spec['generation']}")
        if spec["uid"] is not None and spec["gid"] is not None:
            credentials.drop_to(spec["uid"], spec["gid"])
        named = dict(zip(spec["socket_names"], sockets, strict=True))
        return runtime.run(spec, named, channel, self.lifeline, loop)

    def _on_child_exit(self, pidfd: int) -> None:
        pid = self.children.pop(pidfd)
        if self.spare is not None and self.spare[0] == pid:  # died waiting: fork anew later
            self.spare[1].close()
            self.spare = None
        self.selector.unregister(pidfd)
        # Whatever the worker forked dies with it, before anyone counts its
        # sockets as free: a child that ignores SIGTERM would otherwise live
        # on, reparented to init, holding the listening socket. Now, while the
        # worker is an unreaped zombie, its pid (the group's id) cannot have
        # been reused, so this kills nothing but its own group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        os.close(pidfd)
        _, status = os.waitpid(pid, 0)
        self._reply({"op": P.ZY_EXITED, "pid": pid, "status": os.waitstatus_to_exitcode(status)})

    def _reply(self, message: dict[str, Any]) -> None:
        # If the supervisor is gone, the lifeline ends us; nothing to report to.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.channel.send(P.pack_zygote(message))


def _close_all_but(keep: set[int]) -> None:
    """Close every fd of this process not in ``keep``."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd not in keep:
            with contextlib.suppress(OSError):  # the listing's own fd, closed already
                os.close(fd)


def _name_process(name: str) -> None:
    """What ``ps -o comm`` and ``top`` show for this process (15 bytes at most)."""
    with contextlib.suppress(OSError), open("/proc/self/comm", "w") as comm:
        comm.write(name[:15])


def _exit_code(exc: SystemExit) -> int:
    """The status ``sys.exit(arg)`` ends a process with: None is 0, an int is
    itself, anything else is printed and is 1."""
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code & 0xFF
    print(exc.code, file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hotsup-zygote")
    parser.add_argument("--channel", type=int, required=True)
    parser.add_argument("--lifeline", type=int, required=True)
    parser.add_argument("preload", nargs="*")
    args = parser.parse_args(argv)
    channel = socket.socket(fileno=args.channel)
    os.set_inheritable(args.lifeline, False)  # pass_fds made it inheritable
    for name in args.preload:
        try:
            importlib.import_module(name)
        except BaseException as exc:
            error = f"cannot preload {name!r}: {type(exc).__name__}: {exc}"
            channel.send(P.pack_zygote({"op": P.ZY_ERROR, "id": None, "error": error}))
            return 3
    channel.send(P.pack_zygote({"op": "ready", "pid": os.getpid(),
                                "preloaded": _locations(args.preload)}))
    # Everything imported so far lives as long as every worker: out of the
    # collector's sight, a worker's collections do not walk (and copy, page by
    # page, out of the memory it shares with us) the zygote's objects. Measured
    # in bench/asgi_swap.py: keep-alive throughput 0.91 -> 1.0 of plain uvicorn.
    gc.freeze()
    return Zygote(channel, args.lifeline).serve()


def _locations(names: list[str]) -> dict[str, str]:
    """Where each preloaded top-level package (its directory) or module (its
    file) lives, so the supervisor can watch it and replace us when it changes."""
    found: dict[str, str] = {}
    for name in names:
        top = sys.modules.get(name.partition(".")[0])
        paths = list(getattr(top, "__path__", None) or [])  # a package's directories
        file = getattr(top, "__file__", None)
        if paths:
            found[name] = os.path.abspath(paths[0])
        elif file:
            found[name] = os.path.abspath(file)
    return found


if __name__ == "__main__":
    sys.exit(main())
