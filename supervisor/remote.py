"""The network endpoint (``[remote]``): remote control and push over CURVE.

A ZeroMQ ROUTER on ``remote.bind`` with CURVE: the supervisor proves itself
with its secret certificate (``remote.key``), each client with its own, and
the traffic is encrypted. Whom to let in is decided by a ZAP handler on the
supervisor's own loop (pyzmq's ``AsyncioAuthenticator``): a key whose public
file ``NAME.key`` is in ``remote.authorized_keys`` gets in as user ``NAME``;
any other key fails the handshake, so its client hears nothing at all (that
is CURVE: an unknown peer learns nothing, not even an error).

The requests are ``control``'s (same framing, same parser, same replies, the
same ``submit`` of the supervisor), limited to ``COMMANDS``: status, logs,
reload, stop, run and the push commands (``push``); never shutdown. On top:

* every request is logged with its key's name and the command (an audit line;
  a ``logs`` follower's repeated polls at debug level, not to flood the log);
* ``remote.allow.NAME`` limits a key to some bundles: anything else it names
  is refused, a command over every bundle too, and ``status`` shows it only
  its bundles;
* a token bucket per key: ``remote.rate_limit`` requests per second, with a
  burst of as many again;
* a message is at most ``MAX_MESSAGE`` bytes (ZeroMQ drops a peer that sends
  more); a push as a whole is bounded by ``remote.max_push_bytes`` and
  ``remote.max_push_files``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Final

import zmq
import zmq.asyncio
from zmq.auth.asyncio import AsyncioAuthenticator
from zmq.utils import z85

from .commands import PUSH_CHUNK
from .config import RemoteConfig
from .control import BadRequest, ControlError, Request, make_reply, parse_request
from .control_server import Submit, wind_down

log = logging.getLogger("hotsup")

#: What a remote key may ask for.
COMMANDS: Final = frozenset({"status", "logs", "reload", "stop", "run",
                             "push_begin", "push_files", "push_commit"})
#: The largest request taken: a ``push_files`` of PUSH_CHUNK bytes in base64
#: (4/3), with room for its JSON.
MAX_MESSAGE: Final = PUSH_CHUNK * 4 // 3 + 64 * 1024
#: Requests of one key answered at once.
MAX_INFLIGHT: Final = 16
#: The ZAP domain of the endpoint.
DOMAIN: Final = "hotsup"


class _Keys(AsyncioAuthenticator):
    """The ZAP handler: the authorized keys, and each one's name as its user id."""

    def __init__(self, zctx: zmq.asyncio.Context, clients: dict[str, bytes]) -> None:
        super().__init__(zctx)  # its log is "zmq.auth", not ours: a line per handshake
        self._names = {z85.decode(public): name for name, public in clients.items()}
        self._z85 = {public: name for name, public in clients.items()}
        self._told: set[bytes] = set()
        self.configure_curve_callback(DOMAIN, self)

    def callback(self, domain: str, key: bytes) -> bool:
        """Whether the z85 ``key`` may connect (the credentials provider's call)."""
        if key in self._z85:
            return True
        if key not in self._told and len(self._told) < 1000:  # once a key, bounded
            self._told.add(key)
            log.warning("remote: refused a client key that is not in authorized_keys "
                        "(%s...)", key[:12].decode(errors="replace"))
        return False

    def curve_user_id(self, client_public_key: bytes) -> str:
        return self._names[client_public_key]


class _Bucket:
    """A token bucket: ``rate`` a second, holding at most ``rate`` more for a burst."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.tokens = 2 * rate
        self.at = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(2 * self.rate, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


class RemoteServer:
    """The CURVE ROUTER; each request answered by its own task, as in ``control``."""

    def __init__(self, zctx: zmq.asyncio.Context, config: RemoteConfig, submit: Submit) -> None:
        self.config = config
        self.endpoint = config.bind
        self._zctx = zctx
        self._submit = submit
        self._auth = _Keys(zctx, config.clients)
        self._sock: zmq.asyncio.Socket | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._inflight: dict[str, int] = {}
        self._buckets: dict[str, _Bucket] = {}
        self._pushes: dict[str, str] = {}  # push token -> the key that began it
        self._receiver: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the ZAP handler, then bind (ZMQError if the address is taken)."""
        import zmq.auth

        public, secret = zmq.auth.load_certificate(self.config.secret_key)
        self._auth.start()
        sock = self._zctx.socket(zmq.ROUTER)
        try:
            sock.setsockopt(zmq.LINGER, 500)
            sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE)
            sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
            sock.curve_server = True
            sock.curve_publickey = public
            assert secret is not None  # config checked it
            sock.curve_secretkey = secret
            sock.zap_domain = DOMAIN.encode()
            sock.bind(self.config.bind)
        except zmq.ZMQError:
            sock.close()
            self._auth.stop()
            raise
        self._sock = sock
        self.endpoint = sock.getsockopt(zmq.LAST_ENDPOINT).decode()  # type: ignore[union-attr]
        log.info("remote: listening on %s (CURVE, %d authorized key(s): %s)", self.endpoint,
                 len(self.config.clients), ", ".join(sorted(self.config.clients)))
        self._receiver = asyncio.ensure_future(self._receive())

    async def close(self) -> None:
        """Stop taking requests, let answers on their way leave (1 s at most), close."""
        await wind_down(self._receiver, self._tasks)
        if self._sock is not None:
            self._sock.close()
        self._auth.stop()

    async def _receive(self) -> None:
        assert self._sock is not None
        while True:
            frames = await self._sock.recv_multipart(copy=False)
            if len(frames) < 2:
                continue
            # Every message of an authenticated peer carries the user id its
            # ZAP handshake gave: our key's name.
            key = str(frames[1].get("User-Id"))
            route, body = frames[0].bytes, [frame.bytes for frame in frames[1:]]
            if self._inflight.get(key, 0) >= MAX_INFLIGHT:
                await self._send(route, make_reply(None, error="too many requests in flight"))
                continue
            self._inflight[key] = self._inflight.get(key, 0) + 1
            task = asyncio.ensure_future(self._answer(key, route, body))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _answer(self, key: str, route: bytes, body: list[bytes]) -> None:
        request_id: Any = None
        try:
            request_id, request = parse_request(body)
            self._vet(key, request)
            try:
                result = await self._submit(request)
            except ControlError as exc:
                log.info("remote: %s: %s refused: %s", key, _describe(request), exc)
                raise
            reply = make_reply(request_id, self._shape(key, request, result))
        except BadRequest as exc:
            log.info("remote: %s: refused a bad request: %s", key, exc)
            reply = make_reply(exc.request_id, error=str(exc))
        except ControlError as exc:
            reply = make_reply(request_id, error=str(exc))
        except Exception:
            log.exception("remote: failed to answer a request")
            reply = make_reply(request_id, error="internal error (see the supervisor's log)")
        finally:
            self._inflight[key] -= 1
        await self._send(route, reply)

    def _vet(self, key: str, request: Request) -> None:
        """Log the request (the audit line); raise ControlError if the key may not."""
        args = request.args
        what = _describe(request)
        level = logging.DEBUG if request.cmd == "logs" and args.get("after") else logging.INFO
        try:
            if request.cmd not in COMMANDS:
                raise ControlError(f"{request.cmd!r} is not available remotely (remote "
                                   f"commands: {', '.join(sorted(COMMANDS))})")
            bucket = self._buckets.setdefault(key, _Bucket(self.config.rate_limit))
            if not bucket.take():
                raise ControlError(f"rate limit: key {key} may make {self.config.rate_limit:g} "
                                   f"requests a second; slow down")
            if "push" in args and self._pushes.get(args["push"]) not in (None, key):
                raise ControlError("no such push (it ended, or sat idle too long): push again")
            allowed = self.config.allow.get(key)
            if allowed is not None and request.cmd != "status" and "push" not in args:
                name = args.get("name")
                if name is None:
                    raise ControlError(f"key {key} may touch only {', '.join(allowed) or 'no '}"
                                       f" bundle(s) (remote.allow.{key}): name one")
                if name not in allowed:
                    raise ControlError(f"key {key} may not touch bundle {name!r} "
                                       f"(remote.allow.{key}: {', '.join(allowed) or 'none'})")
        except ControlError as exc:
            log.warning("remote: %s: %s refused: %s", key, what, exc)
            raise
        log.log(level, "remote: %s: %s", key, what)

    def _shape(self, key: str, request: Request, result: Any) -> Any:
        """What the key gets to see of a result."""
        if request.cmd == "push_begin" and isinstance(result, dict):
            if len(self._pushes) >= 1024:  # forget the oldest; the store expires them too
                self._pushes.pop(next(iter(self._pushes)))
            self._pushes[result["push"]] = key
        elif request.cmd == "push_commit":
            self._pushes.pop(request.args["push"], None)
        allowed = self.config.allow.get(key)
        if request.cmd == "status" and allowed is not None and isinstance(result, dict):
            result = {**result, "bundles": [b for b in result["bundles"]
                                            if b.get("name") in allowed]}
        return result

    async def _send(self, route: bytes, reply: bytes) -> None:
        assert self._sock is not None
        try:
            await self._sock.send_multipart([route, reply])
        except zmq.ZMQError as exc:  # the client gave up and went away
            log.debug("remote: reply not delivered: %s", exc)


def _describe(request: Request) -> str:
    """The command and what it names, for the audit line."""
    args = request.args
    if request.cmd == "push_begin":
        files = args.get("files", {})
        size = sum(v[1] for v in files.values()
                   if isinstance(v, list) and len(v) == 3 and type(v[1]) is int)
        return f"push {args.get('name')} ({len(files)} file(s), {size} bytes)"
    if request.cmd == "push_files":
        sent = sum(len(b[2]) * 3 // 4 - b[2][-2:].count("=") for b in args.get("blobs", [])
                   if isinstance(b, list) and len(b) == 3 and isinstance(b[2], str))
        return f"push_files ({sent} bytes)"
    if request.cmd == "push_commit":
        return "push_commit"
    name = args.get("name")
    return f"{request.cmd} {name}" if name else f"{request.cmd} (all)" \
        if request.cmd in ("reload", "logs") else request.cmd
