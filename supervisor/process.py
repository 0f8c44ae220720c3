"""One worker process as the supervisor sees it: spawn, requests, exit, kill.

It knows nothing of swap states; ``swap`` decides what to ask and when. Every
request has a deadline and fails at once if the process exits meanwhile.

Each worker has a channel of its own (``hotsup.worker.channel``): a socketpair
made here at spawn, whose other end goes to the zygote with the spawn request
and is the worker's from its fork. The worker's spec is the first message on
it, queued before the spawn. Nothing else can write to our end, so whatever
arrives on it is this worker's (and is still checked: it runs bundle code).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from hotsup.worker import channel as wire
from hotsup.worker import protocol as P

from .config import BundleSpec
from .logs import LogSink, WorkerLog
from .zygote import Zygote, ZygoteError

log = logging.getLogger("hotsup")

#: Seconds a reply may trail its worker's exit (see WorkerProcess._first_of).
REPLY_GRACE = 0.25


class WorkerError(Exception):
    """A worker failed: could not load, answered a request with an error, died, or timed out."""

    def __init__(self, message: str, detail: str = "", kind: str = "") -> None:
        super().__init__(message)
        self.detail = detail
        self.kind = kind  # the worker's exception type, when it answered with one


#: ``WorkerError.kind`` of a worker that reported it could not load its bundle.
LOAD_FAILED = "LoadFailed"

#: A payload as the supervisor holds it: bytes, or (over ``channel.KEEP_OVER``)
#: left in the memfd it came in, so relaying and keeping a snapshot costs
#: the supervisor no memory of its own.
Data = bytes | wire.Payload


@dataclass(frozen=True)
class WorkerReply:
    """A worker's answer to ``WorkerProcess.request``. The caller owns ``fds``
    (connections, a memfd, ...): it must close each one it does not keep."""

    header: dict[str, Any]
    payload: Data | None
    fds: tuple[int, ...]


def pss_kib(pid: int) -> int | None:
    """``Pss`` of ``pid`` in KiB, from ``/proc/PID/smaps_rollup``; None if unreadable."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as rollup:
            for line in rollup:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


class WorkerProcess:
    def __init__(self, spec: BundleSpec, generation: int, zygote: Zygote,
                 sink: LogSink) -> None:
        self.spec = spec
        self.generation = generation
        self.tag = f"{spec.name}@{generation}"
        self.pid: int | None = None
        self._zygote = zygote
        self._sink = sink
        loop = asyncio.get_running_loop()
        self.loaded: asyncio.Future[dict[str, Any]] = loop.create_future()
        self.exited: asyncio.Future[None] = loop.create_future()
        self._replies: dict[int, asyncio.Future[wire.Message]] = {}
        self._ids = itertools.count(1)
        self._pidfd = -1
        self._log: WorkerLog | None = None
        self._channel: wire.Channel | None = None
        self._drops = wire.RateLimitedLog(logging.LoggerAdapter(log, {"bundle": spec.name}))

    @classmethod
    async def start(cls, spec: BundleSpec, generation: int, sockets: dict[str, socket.socket],
                    *, zygote: Zygote, sink: LogSink, log_level: str) -> WorkerProcess:
        """Fork a worker for ``spec`` from the zygote; WorkerError if it cannot be."""
        process = cls(spec, generation, zygote, sink)
        try:
            await process._spawn(sockets, log_level)
        except ZygoteError as exc:
            process.release()
            raise WorkerError(f"cannot fork {process.tag}: {exc}") from None
        except BaseException:  # cancelled: the zygote kills a fork nobody waits for
            process.release()
            raise
        return process

    async def _spawn(self, sockets: dict[str, socket.socket], log_level: str) -> None:
        names = list(sockets)
        spec: P.SpawnSpec = {
            "bundle": self.spec.name, "generation": self.generation, "path": str(self.spec.path),
            "entry": self.spec.entry, "kind": self.spec.kind, "factory": self.spec.factory,
            "threads": self.spec.threads, "websockets": self.spec.websockets,
            "version": self.spec.version,
            "settings": self.spec.settings, "socket_names": names, "log_level": log_level,
            "multiprocessing_logging": self.spec.multiprocessing_logging,
            "uid": self.spec.uid, "gid": self.spec.gid,
        }
        # Both ends close-on-exec: ours never reaches a process we run, theirs
        # reaches the worker only through SCM_RIGHTS.
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._channel = wire.Channel(ours, self._on_message, self._drops,
                                     limit=self._payload_limit, keep_over=wire.KEEP_OVER)
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        try:
            self._log = WorkerLog(read_fd, self.spec.name, self.generation, self._sink)
            # Queued in the worker's end before it exists: its first read.
            await self._channel.send({"op": P.OP_SPEC}, wire.encode_spec(spec))
            fds = [write_fd, theirs.fileno(), *(sockets[name].fileno() for name in names)]
            self.pid = await self._zygote.spawn(fds)
        finally:
            os.close(write_fd)  # the worker has its copy; EOF comes when it exits
            theirs.close()
        try:
            self._pidfd = os.pidfd_open(self.pid)
        except ProcessLookupError:  # already gone and reaped
            self._set_exited()
            return
        asyncio.get_running_loop().add_reader(self._pidfd, self._set_exited)

    @property
    def pss_kib(self) -> int | None:
        """The worker's proportional set size in KiB (``/proc/PID/smaps_rollup``):
        pages it shares with the zygote and its siblings count divided among
        them, so this is what the worker really costs; None if it cannot be read
        (gone, or another user's)."""
        if self.pid is None or self.exited.done():
            return None
        return pss_kib(self.pid)

    @property
    def log_dropped(self) -> int:
        """Log lines of this worker dropped by the rate limit (``hotsup.supervisor.logs``)."""
        return self._log.dropped if self._log is not None else 0

    async def call(self, op: str, timeout: float, payload: Data | None = None,
                   **fields: Any) -> tuple[dict[str, Any], Data | None]:
        """Send a request and wait for its reply; WorkerError on error, exit or timeout.
        Any fds the reply carries are closed."""
        reply = await self.request(op, timeout, payload, **fields)
        wire.close_fds(reply.fds)
        return reply.header, reply.payload

    async def request(self, op: str, timeout: float, payload: Data | None = None,
                      fds: Sequence[int] = (), **fields: Any) -> WorkerReply:
        """Send a request with ``fds`` (which stay the caller's: the worker gets
        duplicates) and wait for its reply; WorkerError on error, exit or
        timeout. The reply's fds are the caller's to close."""
        request_id = next(self._ids)
        future: asyncio.Future[wire.Message] = asyncio.get_running_loop().create_future()
        self._replies[request_id] = future
        deadline = asyncio.get_running_loop().time() + timeout
        handed = False
        try:
            if self._channel is None:
                raise ConnectionError("the worker has no channel")
            header = {"op": op, "id": request_id, **fields}
            async with asyncio.timeout(timeout):
                await self._channel.send(header, payload, fds)
            left = max(0.0, deadline - asyncio.get_running_loop().time())
            done = await self._first_of(future, left)
            if future in done:
                message = future.result()
                handed = True
                if not message.header.get("ok"):
                    wire.close_fds(message.fds)
                    header = message.header
                    raise WorkerError(f"{op}: {header.get('error')}", header.get("detail", ""),
                                      str(header.get("error_type", "")))
                return WorkerReply(message.header, message.payload, message.fds)
            if self.exited in done:
                raise WorkerError(f"{op}: the worker {await self.describe_exit()}")
            raise WorkerError(_no_answer(op, timeout, payload is not None))
        except (ConnectionError, P.ProtocolError) as exc:
            raise WorkerError(f"{op}: {exc}") from None
        except TimeoutError:
            raise WorkerError(f"{op}: could not send within {timeout:g}s") from None
        finally:
            self._replies.pop(request_id, None)
            if not handed and future.done() and not future.cancelled():
                wire.close_fds(future.result().fds)  # a reply nobody takes: cancelled late

    async def wait_loaded(self, timeout: float) -> dict[str, Any]:
        done = await self._first_of(self.loaded, timeout)
        if self.loaded in done:
            return self.loaded.result()  # raises WorkerError if it reported a failure
        if self.exited in done:
            raise WorkerError(f"the worker {await self.describe_exit()} before it loaded")
        raise WorkerError(f"not loaded within start_timeout ({timeout:g}s)")

    async def _first_of(self, future: asyncio.Future[Any], timeout: float) -> set[Any]:
        """Wait for ``future`` or this process's exit, whichever comes first.

        The exit (a pidfd) and the worker's messages (its channel) are read apart, so a
        reply sent just before exiting may still be queued when the exit is
        seen: it gets REPLY_GRACE to arrive, and then wins.
        """
        waiting: set[asyncio.Future[Any]] = {future, self.exited}
        done, _ = await asyncio.wait(waiting, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if self.exited in done and future not in done:
            await asyncio.wait({future}, timeout=REPLY_GRACE)
            if future.done():
                return {future}
        return done

    def kill(self) -> None:
        """SIGKILL the worker's whole process group: it leads its own, and what
        it forked stays in it (and may hold its sockets) after it exited."""
        if self.pid is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        if self._pidfd >= 0 and not self.exited.done():
            with contextlib.suppress(ProcessLookupError, OSError):
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)

    async def wait_exit(self, timeout: float) -> bool:
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(self.exited)
        except TimeoutError:
            return False
        return True

    async def describe_exit(self) -> str:
        """How the process ended, for a person: "exited with code 4", "was killed by SIGKILL"."""
        if self.pid is None:
            return "exited"
        try:
            # The zygote reaps and reports right after the pidfd fired.
            async with asyncio.timeout(1.0):
                code = await asyncio.shield(self._zygote.exit_code(self.pid))
        except (TimeoutError, ZygoteError):
            return "exited"
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            return f"was killed by {name}"
        return f"exited with code {code}"

    async def close(self) -> None:
        """Forget the process after it exited, once its log pipe drained."""
        if self._log is not None:
            # The last lines of a crash matter, but do not wait on a grandchild
            # that keeps the pipe open.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await asyncio.shield(self._log.closed)
        self.release()

    def release(self) -> None:
        """Drop everything held for the process: channel, pidfd, log pipe."""
        if self.loaded.done() and not self.loaded.cancelled():
            self.loaded.exception()  # a late 'failed' report: seen, not an asyncio warning
        if self._channel is not None:
            self._channel.close()
        if self.pid is not None:
            self._zygote.forget(self.pid)
        if self._pidfd >= 0:
            with contextlib.suppress(ValueError, OSError):
                asyncio.get_running_loop().remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = -1
        if self._log is not None:
            self._log.close()

    def _set_exited(self) -> None:
        if self._pidfd >= 0:
            asyncio.get_running_loop().remove_reader(self._pidfd)
        if not self.exited.done():
            self.exited.set_result(None)

    def _payload_limit(self, header: dict[str, Any]) -> int:
        """A reply to no request of ours may carry no payload: one a bundle
        forged is refused before it is read, not read whole and dropped."""
        if header.get("op") == P.OP_REPLY and header.get("id", -1) not in self._replies:
            return 0
        return P.MAX_WORKER_MESSAGE

    def _on_message(self, message: wire.Message) -> None:
        header = message.header
        op = header["op"]
        if op == P.OP_REPLY:
            future = self._replies.get(header.get("id", -1))
            if future is not None and not future.done():
                future.set_result(message)  # its fds go to the caller of request()
                return
        wire.close_fds(message.fds)  # nobody asked for these
        if op == P.OP_LOADED and not self.loaded.done():
            self.loaded.set_result(header)
        elif op == P.OP_FAILED and not self.loaded.done():
            self.loaded.set_exception(WorkerError(str(header.get("error")),
                                                  str(header.get("detail", "")), LOAD_FAILED))
        elif op != P.OP_REPLY:
            self._drops.warning("%s: dropped an unexpected %r message", self.tag, op)


def _no_answer(op: str, timeout: float, with_state: bool) -> str:
    """Why a request timed out, in the words a bundle's author knows: its hooks
    and the config key that set the deadline."""
    if op == P.OP_START:  # the only start request is bounded by start_timeout
        hooks = "restore() and start()" if with_state else "start()"
        return f"{hooks} did not return within start_timeout ({timeout:g}s)"
    return f"{op}: no answer within {timeout:g}s"
