"""The control plane: how ``hotsup status|reload|stop|run|logs|shutdown`` talk
to a running supervisor. Both ends live here; this docstring is the protocol.

Transport: ZeroMQ. A ROUTER is bound on ``ipc://<run_dir>/control`` (by a
process of the supervisor's own, ``control_endpoint``, which says why);
run_dir is 0700 and the socket file 0600, so only their owner can connect
(ipc sockets are files; abstract ``ipc://@name`` ones would be open to every
local user). A client connects a DEALER, sends one request and waits for its
reply with a deadline. The server refuses requests over ``MAX_REQUEST`` bytes
(ZeroMQ drops such a peer), answers anything malformed with an error reply,
and never lets input raise.

Bounds, so that no client can make the supervisor hold more than a few
replies' worth or lock others out: ``MAX_INFLIGHT`` requests at once,
``MAX_PER_PEER`` of one connection, ``MAX_LONG_POLLS`` followers waiting
(apart, so ``status`` is answered beside them), ``REPLY_BUDGET`` per ``logs``
reply; a reply its client does not read is dropped by the endpoint process
(``control_endpoint`` has its own bounds).

Version 1. A request is one frame, a UTF-8 JSON object::

    {"v": 1, "id": "<string>", "cmd": "<command>", "args": {...}}

A reply is one frame, echoing the request's id (null if it had none)::

    {"v": 1, "id": "...", "ok": true, "result": {...}}
    {"v": 1, "id": "...", "ok": false, "error": "<one line for a person>"}

Commands (``args`` -> ``result``); each one's arguments are checked against its
``ARGS`` in ``commands``, and unknown args are errors:

* ``status`` {} -> ``{"supervisor": {"pid", "config", "uptime", "log_dropped"},
  "bundles": [...]}``, one object per bundle with the fields of DESIGN.md
  (name, state, generation, pid, restarts, version, last_swap_ms,
  last_pause_ms, last_error) and uptime (seconds the serving generation has
  served), last_swap_at (unix time), log_dropped (its log lines dropped for
  flooding), swaps, sockets.
* ``reload`` {"name": str or null (all)} -> ``{"bundles": [report, ...]}``, sent
  when every swap asked for has finished.
* ``stop`` {"name"} / ``run`` {"name"} -> a report, once the bundle is down / up.
* ``logs`` {"name": str or null, "after": int, "limit": int, "wait": float}
  -> ``{"records": [record, ...], "last": int}``: the newest ``limit`` records
  numbered above ``after`` (a ``LogSink`` record: seq, ts, level, tag, bundle,
  generation, msg), at most ``REPLY_BUDGET`` of text; with ``wait`` > 0 and
  none yet, the reply waits up to that long (at most ``MAX_WAIT``) for one:
  that is how ``logs -f`` follows. Past ``MAX_LONG_POLLS`` waiting, the oldest
  is answered at once with no records and ``last`` = its ``after``.
* ``shutdown`` {} -> ``{"pid": int}``; the supervisor then drains and exits.
* ``push_begin``, ``push_files``, ``push_commit``: a push of a bundle's files
  (``push`` has that protocol); ``push_commit`` answers with a report.

The same requests reach the network endpoint of ``[remote]`` (``remote``),
over CURVE, from a ``RemoteClient``.

A report is ``{"name", "result", "ok", "message", "generation", "duration_ms"}``;
``result`` is one of ``swap.Result``'s values, ``ok`` false for "rolled back"
and "failed".
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import json
import logging
import os
import secrets
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import zmq
import zmq.asyncio

from . import control_endpoint
from .commands import WIRE
from .control_endpoint import Unpacker

log = logging.getLogger("hotsup")

VERSION: Final = 1
#: The largest request the supervisor accepts (bytes).
MAX_REQUEST: Final = 64 * 1024
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
#: The name of the control socket inside run_dir.
SOCKET_NAME: Final = "control"

_NONE = type(None)


class ControlError(Exception):
    """A request the supervisor refused or could not carry out; the message says why."""


class BadRequest(ControlError):
    """A request that is not valid version-1; ``request_id`` if it could be read."""

    def __init__(self, message: str, request_id: Any = None) -> None:
        super().__init__(message)
        self.request_id = request_id


class Unreachable(Exception):
    """No supervisor answered: none is running, it is not ours, or it did not reply."""


@dataclass(frozen=True)
class Request:
    """A valid request: ``cmd`` is one of ``commands.WIRE``, ``args`` fit its ``ARGS``."""

    cmd: str
    args: dict[str, Any]


def endpoint(run_dir: Path) -> str:
    return f"ipc://{run_dir / SOCKET_NAME}"


def parse_request(frames: list[bytes]) -> tuple[Any, Request]:
    """The id and the request in ``frames``; BadRequest for anything that is
    not a valid version-1 request."""
    if len(frames) != 1:
        raise BadRequest(f"expected one frame, got {len(frames)}")
    try:
        body = json.loads(frames[0])
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise BadRequest("the request is not a JSON object") from None
    if not isinstance(body, dict):
        raise BadRequest("the request is not a JSON object")
    request_id = body.get("id")
    if not isinstance(request_id, str | int | _NONE) or isinstance(request_id, bool):
        request_id = None
    try:
        version = body.get("v")
        if type(version) is not int or version != VERSION:  # not True, not 1.0
            raise ControlError(f"unsupported protocol version {body.get('v')!r} (this "
                               f"supervisor speaks {VERSION})")
        cmd, args = body.get("cmd"), body.get("args", {})
        if not isinstance(cmd, str) or cmd not in WIRE:
            raise ControlError(f"unknown command {cmd!r} (known: {', '.join(WIRE)})")
        if not isinstance(args, dict):
            raise ControlError("args must be a JSON object")
        _check_args(cmd, args)
    except ControlError as exc:
        raise BadRequest(str(exc), request_id) from None
    return request_id, Request(cmd, args)


def _check_args(cmd: str, args: dict[str, Any]) -> None:
    accepted = WIRE[cmd].ARGS
    for name in args:
        if name not in accepted:
            raise ControlError(f"{cmd}: unknown argument {name!r}")
    for name, arg in accepted.items():
        if name not in args:
            if arg.required:
                raise ControlError(f"{cmd}: argument {name!r} is required")
            continue
        value = args[name]
        if (isinstance(value, bool) and bool not in arg.types) \
                or not isinstance(value, arg.types):
            raise ControlError(f"{cmd}: argument {name!r} must be {arg.describe()}")
        if isinstance(value, int | float) and not -2**53 <= value <= 2**53:
            raise ControlError(f"{cmd}: argument {name!r} is out of range")


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


def make_reply(request_id: Any, result: Any = None, error: str | None = None) -> bytes:
    body: dict[str, Any] = {"v": VERSION, "id": request_id, "ok": error is None}
    if error is None:
        body["result"] = result
    else:
        body["error"] = error
    return json.dumps(body).encode()


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
            messages = await asyncio.wait_for(self._read(unpacker), START_TIMEOUT)
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


# -- the command line's end ---------------------------------------------------------

def probe(run_dir: Path) -> None:
    """Raise Unreachable, with a one-line reason, unless a supervisor listens
    on run_dir's control socket and we may talk to it."""
    path = run_dir / SOCKET_NAME
    try:
        info = os.stat(run_dir)
    except FileNotFoundError:
        raise Unreachable(f"no hotsup is running here: {run_dir} does not exist") from None
    except PermissionError:
        raise Unreachable(f"permission denied: cannot read {run_dir}") from None
    if info.st_uid != os.geteuid():
        raise Unreachable(f"{run_dir} belongs to uid {info.st_uid}, not to you "
                          f"(uid {os.geteuid()}): refusing to talk to its supervisor")
    if stat.S_IMODE(info.st_mode) & 0o077:
        raise Unreachable(f"{run_dir} is open to other users (mode "
                          f"{stat.S_IMODE(info.st_mode):o}); a supervisor makes it 0700")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(str(path))
        except FileNotFoundError:
            raise Unreachable(f"no hotsup is running with run_dir {run_dir}") from None
        except ConnectionRefusedError:
            raise Unreachable(f"no hotsup is running with run_dir {run_dir} (its control "
                              f"socket was left by a supervisor that died)") from None
        except PermissionError:
            raise Unreachable(f"permission denied: {path}") from None
        except OSError as exc:
            if exc.errno != errno.ENAMETOOLONG:
                raise Unreachable(f"cannot connect to {path}: {exc.strerror}") from None
            raise Unreachable(f"{path}: the path is too long for a unix socket") from None


class ControlClient:
    """A synchronous client: one request, one reply, each with a deadline."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir

    def request(self, cmd: str, timeout: float, **args: Any) -> Any:
        """The command's result. Unreachable if no supervisor answers within
        ``timeout`` seconds; ControlError if it answered with an error."""
        probe(self.run_dir)
        request_id = secrets.token_hex(8)
        zctx = zmq.Context()
        sock = zctx.socket(zmq.DEALER)
        try:
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(endpoint(self.run_dir))
            sock.send(json.dumps({"v": VERSION, "id": request_id, "cmd": cmd,
                                  "args": args}).encode())
            deadline = time.monotonic() + timeout
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not sock.poll(int(left * 1000) + 1):
                    raise Unreachable(f"the supervisor did not answer {cmd!r} within "
                                      f"{timeout:g}s")
                reply = json.loads(sock.recv())
                # A fresh socket hears only about its own request: id null is
                # a refusal that came before the id was read (too many requests).
                if isinstance(reply, dict) and reply.get("id") in (request_id, None):
                    break
        finally:
            sock.close()
            zctx.term()
        if not reply.get("ok"):
            raise ControlError(str(reply.get("error", "the supervisor refused the request")))
        return reply.get("result")

    def close(self) -> None:
        """Nothing to release: each request had its own socket."""


class RemoteClient:
    """A synchronous CURVE client with ``ControlClient``'s ``request()``; one
    connection for all its requests (``close()`` it)."""

    def __init__(self, endpoint: str, secret_key: str, server_key: str) -> None:
        import zmq.auth

        self.endpoint = endpoint
        try:
            mode = stat.S_IMODE(os.stat(secret_key).st_mode)
            public, secret = zmq.auth.load_certificate(secret_key)
        except (OSError, ValueError) as exc:
            raise ControlError(f"--key {secret_key}: cannot read the certificate: {exc}"
                               ) from None
        if not secret:
            raise ControlError(f"--key {secret_key}: holds no secret key (give the "
                               f".key_secret file that `hotsup keygen` writes)")
        if mode & 0o077:
            raise ControlError(f"--key {secret_key} is open to other users (mode {mode:o}); "
                               f"chmod 600 it")
        try:
            server_public, _ = zmq.auth.load_certificate(server_key)
        except (OSError, ValueError) as exc:
            raise ControlError(f"--server-key {server_key}: cannot read the certificate: "
                               f"{exc}") from None
        self._zctx = zmq.Context()
        self._sock = self._zctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.curve_publickey = public
        self._sock.curve_secretkey = secret
        self._sock.curve_serverkey = server_public
        # CURVE tells a refused client nothing on the wire, but libzmq's monitor
        # does: the handshake's failure, so we need not wait for a timeout.
        self._monitor: zmq.Socket[bytes] | None = self._sock.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
            | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_SUCCEEDED)
        try:
            self._sock.connect(endpoint)
        except zmq.ZMQError as exc:
            self.close()
            raise ControlError(f"--to {endpoint}: {exc} (expected tcp://HOST:PORT)") from None

    def request(self, cmd: str, timeout: float, **args: Any) -> Any:
        """The command's result. Unreachable if no answer comes within ``timeout``
        seconds, or at once if the CURVE handshake failed (a wrong server key,
        a key the supervisor does not know); ControlError if it refused."""
        request_id = secrets.token_hex(8)
        self._sock.send(json.dumps({"v": VERSION, "id": request_id, "cmd": cmd,
                                    "args": args}).encode())
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        if self._monitor is not None:
            poller.register(self._monitor, zmq.POLLIN)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            ready = dict(poller.poll(int(left * 1000) + 1)) if left > 0 else {}
            if not ready:
                raise Unreachable(f"{self.endpoint}: unreachable or not authorized (no answer "
                                  f"within {timeout:g}s)" if self._monitor is not None else
                                  f"{self.endpoint} did not answer {cmd!r} within "
                                  f"{timeout:g}s")
            if self._monitor is not None and self._monitor in ready:
                self._handshake()
                continue
            reply = json.loads(self._sock.recv())
            if isinstance(reply, dict) and reply.get("id") in (request_id, None):
                break
        if not reply.get("ok"):
            raise ControlError(str(reply.get("error", "the supervisor refused the request")))
        return reply.get("result")

    def _handshake(self) -> None:
        """Read a monitor event: a failed handshake raises Unreachable."""
        from zmq.utils.monitor import recv_monitor_message

        assert self._monitor is not None
        event = recv_monitor_message(self._monitor)["event"]
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self._stop_monitor()
            return
        if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            raise Unreachable(f"{self.endpoint}: not authorized: the supervisor refused this "
                              f"key (is its public key in the supervisor's authorized_keys?)")
        raise Unreachable(f"{self.endpoint}: unreachable or not authorized: the CURVE "
                          f"handshake failed (is --server-key the supervisor's public key?)")

    def _stop_monitor(self) -> None:
        if self._monitor is not None:
            self._sock.disable_monitor()
            self._monitor.close()
            self._monitor = None

    def close(self) -> None:
        self._stop_monitor()
        self._sock.close()
        self._zctx.term()
