"""The control plane: how ``hotsup status|reload|stop|run|logs|shutdown`` talk
to a running supervisor. This docstring is the protocol; the command line's
end lives here, the supervisor's in ``control_server``.

Transport: ZeroMQ. A ROUTER is bound on ``ipc://<run_dir>/control`` (by a
process of the supervisor's own, ``control_endpoint``, which says why);
run_dir is 0700 and the socket file 0600, so only their owner can connect
(ipc sockets are files; abstract ``ipc://@name`` ones would be open to every
local user). A client connects a DEALER, sends one request and waits for its
reply with a deadline. The
server refuses requests over ``MAX_REQUEST`` bytes (ZeroMQ drops such a peer),
answers anything malformed with an error reply, and never lets input raise.

Bounds, so that no client can make the supervisor hold more than a few
replies' worth or lock others out (``control_server``): ``MAX_INFLIGHT``
requests at once, ``MAX_PER_PEER`` of one connection, ``MAX_LONG_POLLS``
followers waiting (apart, so ``status`` is answered beside them),
``REPLY_BUDGET`` per ``logs`` reply; a reply its client does not read is
dropped by the endpoint process (``control_endpoint`` has its own bounds).

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
  flooding), swaps, sockets, pss_kib (the serving worker's proportional set
  size, KiB) and workers (each live worker: generation, state, pid, pss_kib).
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

# The command line imports this module for its client: nothing here may pull
# in asyncio, and zmq is imported by the client that uses it (``hotsup status``
# is a fresh process each time, and those imports were most of its time).
import errno
import json
import os
import stat
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, NamedTuple

if TYPE_CHECKING:
    import zmq

VERSION: Final = 1
#: The largest request the supervisor accepts (bytes).
MAX_REQUEST: Final = 64 * 1024
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


class Request(NamedTuple):  # not a dataclass: importing dataclasses costs a command ~10 ms
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
    from .commands import WIRE  # the supervisor's end only: the client never needs it

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
    from .commands import WIRE

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


def make_reply(request_id: Any, result: Any = None, error: str | None = None) -> bytes:
    body: dict[str, Any] = {"v": VERSION, "id": request_id, "ok": error is None}
    if error is None:
        body["result"] = result
    else:
        body["error"] = error
    return json.dumps(body).encode()


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
    # _socket, the C module under socket: what socket adds (its enums) costs
    # a command line ~3 ms of imports, and the probe needs none of it.
    import _socket

    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
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
    finally:
        sock.close()


class ControlClient:
    """A synchronous client: one request, one reply, each with a deadline."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir

    def request(self, cmd: str, timeout: float, **args: Any) -> Any:
        """The command's result. Unreachable if no supervisor answers within
        ``timeout`` seconds; ControlError if it answered with an error."""
        import zmq

        probe(self.run_dir)
        request_id = os.urandom(8).hex()
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
        import zmq
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
        import zmq

        request_id = os.urandom(8).hex()
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
        import zmq
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
