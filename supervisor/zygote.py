"""The supervisor's handle on the zygote process (``hotsup.worker.zygote``)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import socket
import subprocess
import sys
from typing import Any

from hotsup.worker import protocol as P

log = logging.getLogger("hotsup")

class ZygoteError(Exception):
    pass


class Zygote:
    """Starts the zygote, asks it for workers, hears of their exits.

    ``spawn()`` sends the worker's fds (``[log_pipe, channel, *sockets]``) in
    one packet and returns the pid; the spec is not sent to the zygote at all
    (the worker reads it from its channel).
    ``exit_code(pid)`` resolves to the code the zygote reaped that worker with
    (as ``os.waitstatus_to_exitcode``: negative for a signal), even if the
    report came before anyone asked.
    """

    def __init__(self, preload: tuple[str, ...], lifeline: int) -> None:
        self._preload = preload
        self._lifeline = lifeline
        self._codes: dict[int, asyncio.Future[int]] = {}
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._pending: dict[int, asyncio.Future[int]] = {}
        self._ids = itertools.count(1)
        self._ready: asyncio.Future[None] | None = None
        self._restarting = asyncio.Lock()
        self._stopped = False
        self._abandoned: set[int] = set()  # spawn requests nobody waits for any more
        #: Where each preloaded module lives (a package's directory, a module's file).
        self.preloaded: dict[str, str] = {}
        self._retiring = False
        self._retired: asyncio.Future[None] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    async def start(self, timeout: float = 30.0) -> None:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            # fork+exec of a fresh interpreter (never a bare fork of this
            # process, whose event loop and zmq context must not be copied).
            # Its own process group: Ctrl-C in a terminal reaches only us.
            self._proc = subprocess.Popen(  # noqa: ASYNC220 - fork+exec, returns at once
                # -P: the supervisor's working directory is not on its path
                [sys.executable, "-P", "-m", "hotsup.worker.zygote",
                 "--channel", str(theirs.fileno()), "--lifeline", str(self._lifeline),
                 *self._preload],
                pass_fds=(theirs.fileno(), self._lifeline),
                stdin=subprocess.DEVNULL,
                process_group=0,
            )
        finally:
            theirs.close()
        ours.setblocking(False)
        self._sock = ours
        self._ready = loop.create_future()
        loop.add_reader(ours.fileno(), self._on_readable)
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(self._ready)
        except TimeoutError:
            await self._close(timeout=2.0)
            raise ZygoteError(f"the zygote was not ready within {timeout:g}s "
                              f"(is a preloaded module slow to import?)") from None
        except BaseException:
            await self._close(timeout=2.0)
            raise
        log.debug("zygote %d ready", self._proc.pid)

    async def spawn(self, fds: list[int], timeout: float = 10.0) -> int:
        await self._ensure_running()
        assert self._sock is not None
        request_id = next(self._ids)
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            data = P.pack_zygote({"op": P.ZY_SPAWN, "id": request_id})
            socket.send_fds(self._sock, [data], fds)
            async with asyncio.timeout(timeout):
                pid = await future
        except TimeoutError:
            self._abandoned.add(request_id)
            raise ZygoteError(f"the zygote did not answer a spawn within {timeout:g}s") from None
        except OSError as exc:
            raise ZygoteError(f"cannot reach the zygote: {exc}") from None
        except BaseException:
            self._abandoned.add(request_id)  # cancelled: nobody will own that worker
            raise
        finally:
            self._pending.pop(request_id, None)
            self._maybe_retired()  # a replaced zygote waited for this spawn too
        return pid

    async def _ensure_running(self) -> None:
        """Start a new zygote if the last one died (its workers live on without it)."""
        async with self._restarting:
            if self._sock is not None:
                return
            if self._stopped:
                raise ZygoteError("the zygote was stopped")
            old, self._proc = self._proc, None
            if old is not None:
                try:
                    await asyncio.to_thread(old.wait, 5.0)
                except subprocess.TimeoutExpired:
                    old.kill()
                    await asyncio.to_thread(old.wait)
                log.warning("zygote %d exited with code %s; starting a new one", old.pid,
                            old.returncode)
            await self.start()

    def exit_code(self, pid: int) -> asyncio.Future[int]:
        """The exit code of a worker this handle spawned (and has not forgotten)."""
        future = self._codes.get(pid)
        if future is None:  # forgotten, or never ours: no code will come
            future = asyncio.get_running_loop().create_future()
            future.set_exception(ZygoteError(f"pid {pid} is not a worker of ours"))
            future.exception()  # retrieved: nobody need wait on it
        return future

    def forget(self, pid: int) -> None:
        """The supervisor is done with ``pid``: drop its exit code."""
        self._codes.pop(pid, None)
        self._maybe_retired()

    def retire(self) -> asyncio.Future[None]:
        """Spawn no more; stop once every worker spawned from here is forgotten
        (a replaced zygote stays the parent that reaps its workers until then).
        The future resolves when it has stopped."""
        self._retiring = True
        self._retired = asyncio.get_running_loop().create_future()
        self._maybe_retired()
        return self._retired

    def _maybe_retired(self) -> None:
        if self._retiring and not self._codes and not self._pending and not self._stopped:
            self._stopped = True
            task = asyncio.ensure_future(self._close(5.0))
            task.add_done_callback(self._on_retired)

    def _on_retired(self, task: asyncio.Task[None]) -> None:
        if self._retired is not None and not self._retired.done():
            self._retired.set_result(None)

    async def stop(self, timeout: float = 5.0) -> None:
        """Close the channel (the zygote exits on EOF), wait, kill if it will not go."""
        self._stopped = True
        await self._close(timeout)
        if self._retired is not None and not self._retired.done():
            self._retired.set_result(None)

    async def _close(self, timeout: float) -> None:
        if self._sock is not None:
            asyncio.get_running_loop().remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            await asyncio.to_thread(proc.wait, timeout)
        except subprocess.TimeoutExpired:
            log.warning("zygote %d did not exit within %gs; killing it", proc.pid, timeout)
            proc.kill()
            await asyncio.to_thread(proc.wait)

    def _on_readable(self) -> None:
        assert self._sock is not None
        while True:
            try:
                data = self._sock.recv(P.MAX_ZYGOTE_MESSAGE)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self._lost()
                return
            try:
                self._handle(P.unpack_zygote(data))
            except P.ProtocolError as exc:
                log.error("zygote sent a malformed message: %s", exc)

    def _handle(self, message: dict[str, Any]) -> None:
        op = message["op"]
        if op == "ready" and self._ready is not None and not self._ready.done():
            preloaded = message.get("preloaded")
            if isinstance(preloaded, dict):
                self.preloaded = {str(k): str(v) for k, v in preloaded.items()}
            self._ready.set_result(None)
        elif op == P.ZY_SPAWNED:
            request_id, pid = message.get("id", -1), int(message["pid"])
            future = self._pending.get(request_id)
            if future is not None and not future.done():
                # Tracked from here: its exit report may follow in this very batch.
                self._codes[pid] = asyncio.get_running_loop().create_future()
                future.set_result(pid)
            elif request_id in self._abandoned:
                self._abandoned.discard(request_id)
                log.warning("killing worker %d: its spawn was given up", pid)
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)
        elif op == P.ZY_EXITED:
            code = self._codes.get(int(message["pid"]))
            if code is not None and not code.done():
                code.set_result(int(message["status"]))
        elif op == P.ZY_ERROR:
            error = ZygoteError(str(message.get("error")))
            future = self._pending.get(message.get("id") or -1)
            if future is not None and not future.done():
                future.set_exception(error)
            elif self._ready is not None and not self._ready.done():
                self._ready.set_exception(error)
            else:
                log.error("zygote: %s", error)

    def _lost(self) -> None:
        assert self._sock is not None
        asyncio.get_running_loop().remove_reader(self._sock.fileno())
        self._sock.close()
        self._sock = None
        error = ZygoteError("the zygote exited")
        for future in self._pending.values():
            if not future.done():
                future.set_exception(error)
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(error)
        else:
            log.error("the zygote exited; a new one starts with the next generation")


def lifeline() -> tuple[int, int]:
    """A pipe whose write end only the supervisor holds: EOF at the read end
    tells the zygote and every worker that the supervisor is gone, even after
    a SIGKILL. Returns ``(read_fd, write_fd)``, both close-on-exec."""
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    os.set_blocking(read_fd, False)
    return read_fd, write_fd
