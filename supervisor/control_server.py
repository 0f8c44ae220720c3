"""The supervisor's end of the control plane (``control`` has the protocol and
the command line's end, which import neither asyncio nor zmq until they run).

``ControlServer`` relays requests from the control endpoint process
(``control_endpoint``) to the supervisor's ``submit`` and sends the replies
back; ``wind_down`` is how it and the remote endpoint (``remote``) stop.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, Final

from . import control_endpoint
from .control import (
    MAX_REQUEST,
    SOCKET_NAME,
    BadRequest,
    ControlError,
    Request,
    endpoint,
    make_reply,
    parse_request,
)
from .control_endpoint import Unpacker

log = logging.getLogger("hotsup")

#: Requests answered at once; more are refused until some are done.
MAX_INFLIGHT: Final = 64
#: Requests of one client connection answered at once (the command line uses
#: a connection per request; more is a client that does not wait for answers).
#: The endpoint queues as many replies per client, so a client that keeps
#: within it never loses one.
MAX_PER_PEER: Final = control_endpoint.SEND_HWM
#: ``logs`` long polls (``wait`` > 0) waiting at once, apart from MAX_INFLIGHT
#: so that followers never crowd out ``status``. One more answers the oldest
#: now, with nothing new: its follower asks again, nothing is lost.
MAX_LONG_POLLS: Final = 32
#: ``logs`` replies encoded and on their way to the endpoint process at once.
ENCODING: Final = 2
#: The most record text one ``logs`` reply carries (its newest records that
#: fit): with ``MAX_INFLIGHT`` and the endpoint's bounds, what a client that
#: never reads its replies can make the supervisor hold.
REPLY_BUDGET: Final = 1024 * 1024
#: Seconds the control endpoint process gets to listen, at start and after a crash.
START_TIMEOUT: Final = 10.0
#: Seconds between the death of the control endpoint process and its successor.
RESTART_DELAY: Final = 1.0


async def wind_down(receiver: asyncio.Task[None] | None, tasks: set[asyncio.Task[None]],
                    grace: float = 1.0) -> None:
    """Stop a server's ``receiver`` taking requests, give the answers on their way
    (``tasks``) ``grace`` seconds to leave, then cancel what is left."""
    if receiver is not None:
        receiver.cancel()
        await asyncio.gather(receiver, return_exceptions=True)
    if tasks:
        await asyncio.wait(tasks, timeout=grace)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)




# -- the supervisor's end ---------------------------------------------------------

#: Carries out a valid request: returns a future of its result, or raises
#: ControlError (or sets it on the future) when it cannot.
Submit = Callable[[Request], "asyncio.Future[Any]"]


class ControlServer:
    """The supervisor's end of the control socket. Each request is answered
    by its own task, so a ``reload`` that waits for its swap does not hold up
    ``status``.

    The ROUTER itself lives in a process of its own (``control_endpoint``,
    which says why); this relays to it over a socketpair and starts a new one
    whenever it dies (a flood of connections can make libzmq abort it),
    ``RESTART_DELAY`` later.
    """

    def __init__(self, run_dir: Path, submit: Submit) -> None:
        self.path = run_dir / SOCKET_NAME
        self._endpoint = endpoint(run_dir)
        self._submit = submit
        self._tasks: set[asyncio.Task[None]] = set()
        self._per_peer: collections.Counter[bytes] = collections.Counter()
        # Large replies are encoded and written ENCODING at a time, so that
        # MAX_INFLIGHT of them never sit encoded in memory (or in the link's
        # buffer, which the endpoint process empties) at once.
        self._encoding = asyncio.Semaphore(ENCODING)
        self._polls: collections.OrderedDict[asyncio.Task[None], tuple[bytes, Any, int]] = \
            collections.OrderedDict()  # long polls waiting, oldest first
        self._receiver: asyncio.Task[None] | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def start(self) -> None:
        """Listen: returns once the control socket accepts connections."""
        await self._launch()
        self._receiver = asyncio.ensure_future(self._receive())

    async def _launch(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # fork+exec of a fresh interpreter, as for the zygote (never a bare
            # fork of this process); its own process group, so a terminal's
            # Ctrl-C reaches only us. EOF on the link ends it.
            self._proc = subprocess.Popen(  # noqa: ASYNC220 - fork+exec, returns at once
                [sys.executable, "-P", "-m", "hotsup.supervisor.control_endpoint",
                 "--link", str(theirs.fileno()), "--endpoint", self._endpoint,
                 "--path", str(self.path), "--max-request", str(MAX_REQUEST)],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, process_group=0)
        finally:
            theirs.close()
        self._reader, self._writer = await asyncio.open_unix_connection(sock=ours)
        unpacker = Unpacker(control_endpoint.MAX_REPLY)
        try:
            async with asyncio.timeout(START_TIMEOUT):
                messages = await self._read(unpacker)
        except (TimeoutError, ValueError):
            messages = []
        if messages[:1] != [[b"ready"]]:
            await self._stop_endpoint()
            raise ControlError(f"the control endpoint did not start (is {self.path} "
                               f"writable?)")
        self._unpacker = unpacker

    async def _read(self, unpacker: Unpacker) -> list[list[bytes]]:
        """The next messages from the endpoint process; [] at EOF."""
        assert self._reader is not None
        while True:
            data = await self._reader.read(1 << 16)
            if not data:
                return []
            messages = unpacker.feed(data)
            if messages:
                return messages

    async def _receive(self) -> None:
        while True:
            try:
                messages = await self._read(self._unpacker)
            except ValueError as exc:  # the endpoint process is ours: should never happen
                log.error("control: malformed message from the endpoint process: %s", exc)
                messages = []
            if not messages:
                await self._relaunch()
                continue
            for frames in messages:
                self._dispatch(frames[0], frames[1:])

    async def _relaunch(self) -> None:
        code = await self._stop_endpoint()
        log.error("control: the control endpoint process exited (%s); starting a new one in "
                  "%gs", _describe_code(code), RESTART_DELAY)
        while True:
            await asyncio.sleep(RESTART_DELAY)  # backoff: a flood may go on
            try:
                await self._launch()
            except (ControlError, OSError) as exc:
                log.error("control: %s; trying again", exc)
                continue
            log.warning("control: listening again")
            return

    def _dispatch(self, route: bytes, body: list[bytes]) -> None:
        try:
            parsed: tuple[Any, Request] | BadRequest = parse_request(body)
        except BadRequest as exc:
            parsed = exc
        poll = isinstance(parsed, tuple) and parsed[1].cmd == "logs" \
            and float(parsed[1].args.get("wait", 0)) > 0
        if self._per_peer[route] >= MAX_PER_PEER:
            self._track(self._send(route, make_reply(
                parsed[0] if isinstance(parsed, tuple) else None,
                error=f"too many requests from this connection at once (at most "
                      f"{MAX_PER_PEER}): wait for the answers")))
            return
        if poll:
            while len(self._polls) >= MAX_LONG_POLLS:
                self._answer_early(*self._polls.popitem(last=False))
        elif len(self._tasks) - len(self._polls) >= MAX_INFLIGHT:
            self._track(self._send(route, make_reply(None, error="too many requests in flight")))
            return
        task = self._track(self._answer(route, parsed))
        self._per_peer[route] += 1
        task.add_done_callback(lambda _: self._left(route))
        if poll and isinstance(parsed, tuple):
            self._polls[task] = (route, parsed[0], int(parsed[1].args.get("after", 0)))
            task.add_done_callback(lambda done: self._polls.pop(done, None))

    def _track(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _left(self, route: bytes) -> None:
        self._per_peer[route] -= 1
        if self._per_peer[route] <= 0:
            del self._per_peer[route]

    def _answer_early(self, task: asyncio.Task[None], where: tuple[bytes, Any, int]) -> None:
        """Answer the long poll ``task`` now: nothing after its ``after`` yet."""
        route, request_id, after = where
        task.cancel()  # its reply future with it: the supervisor stops waiting
        self._track(self._send(route, make_reply(request_id, {"records": [], "last": after})))

    async def close(self) -> None:
        """Stop taking requests; let answers already on their way leave (1 s at
        most), then close."""
        await wind_down(self._receiver, self._tasks)
        await self._stop_endpoint()

    async def _stop_endpoint(self) -> int | None:
        """Close the link (the endpoint process exits on EOF, its LINGER
        letting the last replies leave), wait for it, kill it if it will not
        go. Its exit code."""
        if self._writer is not None:
            self._writer.close()
            self._writer = self._reader = None
        proc, self._proc = self._proc, None
        if proc is None:
            return None
        try:
            return await asyncio.to_thread(proc.wait, 5.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            return await asyncio.to_thread(proc.wait)

    async def _answer(self, route: bytes, parsed: tuple[Any, Request] | BadRequest) -> None:
        request_id: Any = None
        try:
            if isinstance(parsed, BadRequest):
                raise parsed
            request_id, request = parsed
            result = await self._submit(request)
            if request.cmd == "logs":  # up to REPLY_BUDGET: a few of them at a time
                async with self._encoding:
                    await self._send(route, make_reply(request_id, result))
                return
            reply = make_reply(request_id, result)
        except BadRequest as exc:
            reply = make_reply(exc.request_id, error=str(exc))
        except ControlError as exc:
            reply = make_reply(request_id, error=str(exc))
        except Exception:
            log.exception("control: failed to answer a request")
            reply = make_reply(request_id, error="internal error (see the supervisor's log)")
        await self._send(route, reply)

    async def _send(self, route: bytes, reply: bytes) -> None:
        writer = self._writer
        if writer is None:  # the endpoint process died with the client's connection
            return
        try:
            writer.write(control_endpoint.pack([route, reply]))
            await writer.drain()
        except (ConnectionError, RuntimeError) as exc:
            log.debug("control: reply not delivered: %s", exc)


def _describe_code(code: int | None) -> str:
    if code is None:
        return "gone"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"code {code}"
