"""One worker: one generation of one bundle, from import to exit.

Runs in a process forked from the zygote, after the zygote reset signals,
closed every fd not the worker's own and pointed stdout and stderr at the
worker's log pipe. It creates its own event loop (nothing of the zygote's is
reused; it needs no zmq context at all), imports the bundle's entry from
source, reports ``loaded`` over its channel (``channel``: the socketpair it was
handed at fork) and then obeys the supervisor's requests until it is retired
or the supervisor is gone (EOF on the lifeline or on the channel).

A request handler gets ``(header, payload, fds)``: the fds that came with the
request are lent to it and closed when it returns (``os.dup`` one to keep it).
It returns None, a dict (merged into the reply), bytes (the reply's payload),
a ``(dict | bytes, fds)`` pair or a ``Reply``; fds returned are sent and then
closed: the handler gives them away.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib
import inspect
import json
import logging
import os
import pickle
import select
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvloop

# asgi imports uvicorn, wsgi a2wsgi: here, so the zygote has them loaded for every worker.
from . import asgi, importer, wsgi
from . import channel as wire
from . import protocol as P
from .channel import Payload
from .context import BundleContext
from .listener import Carried

#: Seconds a worker's loop gets to exit by itself once the supervisor is gone,
#: before its watchdog kills the worker's whole process group.
ORPHAN_GRACE = 1.0


def prepare(lifeline: int) -> asyncio.AbstractEventLoop:
    """What a worker sets up whatever its bundle: the zygote's spare does it
    before the spawn request comes. Returns the worker's event loop."""
    _start_watchdog(lifeline)
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    return loop


def run(spec: P.SpawnSpec, sockets: dict[str, socket.socket], channel: socket.socket,
        lifeline: int, loop: asyncio.AbstractEventLoop) -> int:
    """Run the worker (``prepare``d) to its end and return its exit code."""
    path = Path(spec["path"])
    sys.argv = [f"hotsup:{spec['bundle']}@{spec['generation']}"]  # not the zygote's arguments
    importer.install(path)
    log = _setup_logging(spec)
    try:
        return loop.run_until_complete(_main(spec, sockets, channel, lifeline, log))
    finally:
        loop.close()
        logging.shutdown()


def _start_watchdog(lifeline: int) -> None:
    """If the supervisor dies, the worker must go, even with its loop blocked.

    The loop watches the lifeline and exits cleanly; this thread is the
    backstop: ORPHAN_GRACE after EOF it kills the worker's process group,
    which takes whatever the bundle forked along.
    """

    def watch() -> None:
        select.select([lifeline], [], [])  # nobody writes: readable means EOF
        time.sleep(ORPHAN_GRACE)  # the grace deadline, then the kill
        os.killpg(0, signal.SIGKILL)

    threading.Thread(target=watch, name="hotsup-watchdog", daemon=True).start()


async def _main(spec: P.SpawnSpec, sockets: dict[str, socket.socket], channel: socket.socket,
                lifeline: int, log: logging.Logger) -> int:
    return await Worker(spec, sockets, channel, lifeline, log).run()


class _JsonLineHandler(logging.Handler):
    """One JSON object per record on the log pipe, tagged with bundle and generation."""

    def __init__(self, bundle: str, generation: int) -> None:
        super().__init__()
        self._tag = {"bundle": bundle, "generation": generation}

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            if record.exc_info:
                message += "\n" + "".join(traceback.format_exception(*record.exc_info)).rstrip()
            line = json.dumps(
                {
                    "hotsup": 1,
                    **self._tag,
                    "ts": record.created,
                    "level": record.levelname,
                    "logger": record.name,
                    "msg": message,
                }
            )
            sys.stderr.write(line + "\n")
            sys.stderr.flush()
        except Exception:
            self.handleError(record)


def _setup_logging(spec: P.SpawnSpec) -> logging.Logger:
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(line_buffering=True)
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.addHandler(_JsonLineHandler(spec["bundle"], spec["generation"]))
    root.setLevel(spec["log_level"].upper())
    if spec["multiprocessing_logging"]:
        # Helpers the bundle forks with multiprocessing inherit a handler that
        # queues their records to a thread of this worker, which writes each
        # one whole to the pipe: never interleaved with another process's.
        import multiprocessing_logging

        multiprocessing_logging.install_mp_handler(root)
    return logging.getLogger(f"hotsup.bundle.{spec['bundle']}")


class Worker:
    """The worker's side of the swap: answers the supervisor's requests."""

    def __init__(
        self,
        spec: P.SpawnSpec,
        sockets: dict[str, socket.socket],
        channel: socket.socket,
        lifeline: int,
        log: logging.Logger,
    ) -> None:
        self.spec = spec
        self.sockets = sockets
        self.lifeline = lifeline
        self.log = log
        self.ctx = BundleContext(
            spec["bundle"], spec["generation"], spec["settings"], sockets, Path(spec["path"]), log
        )
        self.bundle: Any = None
        self.done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._loaded = asyncio.Event()  # requests wait for the bundle to exist
        self._tasks: set[asyncio.Task[None]] = set()
        self._chan = wire.Channel(channel, self._on_message, wire.RateLimitedLog(log),
                                  on_closed=self._on_channel_closed, keep_over=wire.KEEP_OVER)
        self._handlers: dict[str, Handler] = {
            P.OP_START: self._start,
            P.OP_PAUSE: self._pause,
            P.OP_RESUME: self._resume,
            P.OP_SNAPSHOT: self._snapshot,
            P.OP_RETIRE: self._retire,
            P.OP_PING: self._ping,
            P.OP_PARKED: self._take_parked,
            P.OP_ADOPT: self._adopt,
            P.OP_HANDED: self._handed,
        }
        #: Connections parked by the pause (listener name, item), until the
        #: supervisor takes them or the pause ends; their fds are ours.
        self._parked: list[tuple[str, Carried]] = []
        #: Connections carried to us, taken up once start() returned.
        self._adopted: list[tuple[str, Carried]] = []
        self._serial = asyncio.Lock()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        # The supervisor holds the only write end of the lifeline pipe: EOF on
        # it means the supervisor is gone (even SIGKILLed), and so must we be.
        loop.add_reader(self.lifeline, self._on_lifeline)
        try:
            code = await self._serve()
        finally:
            loop.remove_reader(self.lifeline)
            for listener in self.ctx.listeners:
                listener.pause()
            for task in self._tasks:
                task.cancel()
            # What we sent is queued on the supervisor's side already; closing
            # our end loses none of it.
            self._chan.close()
        return code

    async def _serve(self) -> int:
        try:
            self.bundle = await self._load()
        except BaseException as exc:
            text = _bundle_traceback(exc)
            self.log.error("cannot load %s: %s", self.spec["entry"], text)
            # Done: the supervisor closes the channel once it read this, as it should.
            self.done.set_result(P.EXIT_LOAD_ERROR)
            await self._send({"op": P.OP_FAILED, "error": _one_line(exc), "detail": text})
            return P.EXIT_LOAD_ERROR
        hooks = {name: callable(getattr(self.bundle, name, None)) for name in _HOOKS}
        await self._send({"op": P.OP_LOADED, "hooks": hooks, "pid": os.getpid()})
        self._loaded.set()
        return await self.done

    async def _load(self) -> Any:
        """Import the entry and make the bundle: step 1 of a swap, before ``loaded``.

        A service bundle is ``Entry(ctx)``; an asgi bundle is the app wrapped in
        ``asgi.AsgiBundle``, its lifespan startup done.
        """
        kind = self.spec["kind"]
        if kind not in ("service", "asgi", "wsgi"):
            raise RuntimeError(f"bundle kind {kind!r} is not supported by this worker")
        shadowed = importer.shadowed(Path(self.spec["path"]), importer.loaded_modules())
        if shadowed:
            raise ImportError(
                "; ".join(shadowed) + ": rename the bundle's module (the worker already "
                "imported a module of that name, so the bundle's would never be loaded)")
        if kind == "asgi":
            return await asgi.AsgiBundle.load(self.ctx, self.spec["entry"], self.spec["factory"],
                                              websockets=self.spec.get("websockets", "close"))
        if kind == "wsgi":  # an asgi bundle over a2wsgi (worker/wsgi.py)
            return await wsgi.WsgiBundle.load_wsgi(self.ctx, self.spec["entry"],
                                                   self.spec["factory"], self.spec["threads"])
        entry = importer.resolve(self.spec["entry"])
        bundle = entry(self.ctx)
        if not callable(getattr(bundle, "start", None)):
            raise TypeError(f"{self.spec['entry']} made {bundle!r}, which has no start() method")
        return bundle

    def _on_message(self, message: wire.Message) -> None:
        # Pings are answered even while a long request (start()) runs; the
        # other requests run one at a time, in the order they arrived.
        serial = message.header["op"] != P.OP_PING
        task = asyncio.ensure_future(self._answer_in_turn(message, serial))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _on_channel_closed(self) -> None:
        if not self.done.done():  # the supervisor's end is gone: so is the supervisor
            self.log.warning("the supervisor closed the channel; exiting")
            self.done.set_result(P.EXIT_SUPERVISOR_GONE)

    async def _answer_in_turn(self, message: wire.Message, serial: bool) -> None:
        try:
            await self._loaded.wait()
            if not serial:
                await self._answer(message)
                return
            async with self._serial:
                await self._answer(message)
        finally:
            wire.close_fds(message.fds)  # lent to the handler, which has returned

    async def _answer(self, message: wire.Message) -> None:
        header = message.header
        handler = self._handlers.get(header["op"])
        reply: dict[str, Any] = {"op": P.OP_REPLY, "id": header.get("id")}
        result = Reply()
        if handler is None:
            reply.update(ok=False, error=f"unknown request {header['op']!r}")
        else:
            try:
                result = _as_reply(await handler(header, message.payload, message.fds))
            except asyncio.CancelledError:
                raise
            except BaseException as exc:  # a bundle's sys.exit() in start() is a failure too
                text = _bundle_traceback(exc)
                self.log.error("%s failed: %s", header["op"], text)
                reply.update(ok=False, error=_one_line(exc), detail=text,
                             error_type=type(exc).__name__)
            else:
                reply["ok"] = True
                reply.update(result.fields)
        try:
            await self._send(reply, result.payload, result.fds)
        finally:
            wire.close_fds(result.fds)  # given away with the reply
            if isinstance(result.payload, Payload):
                result.payload.close()  # the supervisor has its own duplicate
            if isinstance(message.payload, Payload):
                message.payload.close()  # read by now: its pages go
        if header["op"] == P.OP_RETIRE and not self.done.done():
            self.done.set_result(P.EXIT_OK)

    async def _send(self, header: dict[str, Any], payload: Payload | bytes | None = None,
                    fds: Sequence[int] = ()) -> None:
        # A traceback can be longer than a header may be: keep its end.
        for key, room in (("detail", _MAX_DETAIL), ("error", _MAX_ERROR)):
            text = header.get(key)
            if isinstance(text, str) and len(text) > room:
                header[key] = "..." + text[-room:]
        # ConnectionError: the supervisor is gone; _on_channel_closed ends us.
        with contextlib.suppress(ConnectionError):
            await self._chan.send(header, payload, fds)

    # -- requests -------------------------------------------------------------

    async def _start(self, header: dict[str, Any], payload: Payload | bytes | None,
                     fds: Sequence[int]) -> dict[str, Any]:
        if payload is not None:
            # The snapshot came from the previous generation of this same
            # bundle (or its checkpoint), relayed by the supervisor over the
            # channel it handed us at fork: nobody else holds its other end.
            state = _unpickle(payload)
            await _maybe_await(self.bundle.restore(state))
        resume = getattr(self.bundle, "resume", None)
        self.ctx.resume_hook = resume if callable(resume) else None
        await _maybe_await(self.bundle.start())
        self._take_up_adopted()
        self.ctx.accepting = True
        for listener in self.ctx.listeners:  # ready: now accept
            listener.resume()
        if self.sockets and not self.ctx.listeners:
            self.log.warning("start() served none of its sockets through ctx.serve(): hotsup "
                             "cannot pause this bundle, so a swap may drop its connections")
        return {"listeners": len(self.ctx.listeners)}

    async def _pause(self, header: dict[str, Any], payload: Payload | bytes | None,
                     fds: Sequence[int]) -> Reply | dict[str, Any]:
        started = time.monotonic()
        carry = bool(header.get("carry"))
        self.ctx.accepting = False
        self.ctx.pausing.set()
        for listener in self.ctx.listeners:
            listener.pause(carry, overlap=not header.get("wait", True))
        # Without waiting (overlap mode, probation): in-flight connections just
        # finish here; those that park within ``settle`` seconds (a handler
        # needs a few turns of the loop to see ctx.pausing) are carried.
        if not header.get("wait", True):
            await self._wait_idle(float(header.get("settle", 0.0)))
        else:
            timeout = float(header.get("quiesce_timeout", 5.0))
            if not await self._wait_idle(timeout):
                busy = sum(listener.inflight for listener in self.ctx.listeners)
                raise Busy(f"{busy} connection(s) still in flight after {timeout:g}s")
        fields: dict[str, Any] = {"quiesce_ms": (time.monotonic() - started) * 1000}
        data = self._take_snapshot(header) if header.get("snapshot") else None
        if carry:  # after the snapshot: a snapshot that fails parks nothing more
            self._drop_parked()
            self._parked = [(listener.name, item) for listener in self.ctx.listeners
                            for item in listener.parked()]
            fields["parked"] = len(self._parked)
        return Reply(fields, data)

    async def _resume(self, header: dict[str, Any], payload: Payload | bytes | None,
                      fds: Sequence[int]) -> None:
        if payload is not None:  # a newer state than its own (a checkpoint of a successor)
            await _maybe_await(self.bundle.restore(_unpickle(payload)))
        self._drop_parked()  # copies we did not give away; the connections stay ours
        self.ctx.accepting = True
        self.ctx.pausing.clear()
        for listener in self.ctx.listeners:  # parked connections are served here again
            listener.resume()

    async def _take_parked(self, header: dict[str, Any], payload: Payload | bytes | None,
                           fds: Sequence[int]) -> Reply:
        batch, self._parked = self._parked[:_CARRY_BATCH], self._parked[_CARRY_BATCH:]
        manifest = [(name, item.kind, item.buffered, item.meta) for name, item in batch]
        try:
            data = pickle.dumps(manifest, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:  # a hand_over() state that cannot be pickled
            wire.close_fds([item.fd for _, item in batch])
            raise SnapshotError(f"a carried connection's state cannot be pickled: "
                                f"{type(exc).__name__}: {exc}") from None
        return Reply({"count": len(batch)}, data, tuple(item.fd for _, item in batch))

    async def _adopt(self, header: dict[str, Any], payload: Payload | bytes | None,
                     fds: Sequence[int]) -> None:
        # The manifest came from our predecessor (the same bundle), relayed by
        # the supervisor over our channel, like a snapshot.
        manifest = _unpickle(payload) if payload is not None else []
        if len(manifest) != len(fds):
            raise ValueError(f"adopt: {len(manifest)} connection(s) described, {len(fds)} fds")
        for (name, kind, buffered, meta), fd in zip(manifest, fds, strict=True):
            self._adopted.append((name, Carried(kind, os.dup(fd), buffered, meta)))
        if self.ctx.accepting:  # serving already (overlap mode): take them up now
            self._take_up_adopted()

    async def _handed(self, header: dict[str, Any], payload: Payload | bytes | None,
                      fds: Sequence[int]) -> None:
        self._drop_parked()
        for listener in self.ctx.listeners:
            listener.release_parked()

    def _take_up_adopted(self) -> None:
        """Give each carried connection to the listener of its socket, once start() returned."""
        adopted, self._adopted = self._adopted, []
        for name, item in adopted:
            listener = next((one for one in self.ctx.listeners if one.name == name), None)
            if listener is None:
                self.log.warning("a %s connection carried on socket %r was closed: this "
                                 "generation serves nothing on that socket", item.kind, name)
                wire.close_fds([item.fd])
                continue
            listener.adopt(item)

    def _drop_parked(self) -> None:
        wire.close_fds([item.fd for _, item in self._parked])
        self._parked = []

    async def _snapshot(self, header: dict[str, Any], payload: Payload | bytes | None,
                        fds: Sequence[int]) -> Payload:
        return self._take_snapshot(header)

    async def _retire(self, header: dict[str, Any], payload: Payload | bytes | None,
                      fds: Sequence[int]) -> Reply:
        self.ctx.accepting = False
        self.ctx.pausing.set()
        for listener in self.ctx.listeners:
            listener.pause()
        timeout = float(header.get("drain_timeout", 30.0))
        cut = 0
        if not await self._wait_idle(timeout):
            for listener in self.ctx.listeners:
                cut += await listener.cancel_inflight()
            self.log.warning("drain_timeout (%gs) passed: cut %d connection(s)", timeout, cut)
        state: Payload | None = None
        fields: dict[str, Any] = {"cut": cut}
        if header.get("snapshot"):  # the final state, once nothing can change it any more
            try:
                state = self._take_snapshot(header)
            except Exception as exc:
                self.log.error("no snapshot at retirement: %s", _one_line(exc))
                fields["snapshot_error"] = _one_line(exc)  # the supervisor says why
        stop = getattr(self.bundle, "stop", None)
        if callable(stop):
            await _maybe_await(stop())
        for listener in self.ctx.listeners:
            listener.close()
        return Reply(fields, state)

    async def _ping(self, header: dict[str, Any], payload: Payload | bytes | None,
                    fds: Sequence[int]) -> dict[str, Any]:
        return {"pong": time.time()}

    # -- helpers --------------------------------------------------------------

    def _take_snapshot(self, header: dict[str, Any]) -> Payload:
        """The bundle's state, pickled straight into a sealed memfd (no copy of
        it in this process's memory), which goes to the supervisor as is."""
        snapshot = getattr(self.bundle, "snapshot", None)
        if not callable(snapshot):
            raise RuntimeError("this bundle has no snapshot() hook")
        state = snapshot()
        fd = wire.new_memfd()
        try:
            with open(fd, "wb", buffering=_PICKLE_BUFFER, closefd=False) as out, _no_gc():
                pickle.dump(state, out, protocol=pickle.HIGHEST_PROTOCOL)
            data = wire.sealed_payload(fd)
        except Exception as exc:  # PicklingError, TypeError, AttributeError, RecursionError
            os.close(fd)
            if isinstance(exc, OSError):  # ENOMEM and the like: not the state's fault
                raise SnapshotError(f"snapshot() could not be written: {exc}") from None
            raise SnapshotError(f"snapshot() returned a {type(state).__name__} that cannot be "
                                f"pickled: {type(exc).__name__}: {exc}") from None
        limit = int(header.get("max_bytes", 0))
        if limit and len(data) > limit:
            data.close()
            raise SnapshotError(f"snapshot() is {len(data)} bytes pickled, more than "
                                f"max_snapshot_bytes ({limit})")
        return data

    async def _wait_idle(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        for listener in self.ctx.listeners:
            if not await listener.wait_idle(max(0.0, deadline - time.monotonic())):
                return False
        return True

    def _on_lifeline(self) -> None:
        try:
            data = os.read(self.lifeline, 1)
        except BlockingIOError:
            return
        if not data and not self.done.done():
            self.log.warning("the supervisor is gone; exiting")
            self.done.set_result(P.EXIT_SUPERVISOR_GONE)


_HOOKS = ("snapshot", "restore", "stop", "resume")

#: Connections per ``parked`` reply: a message carries at most ``channel.MAX_FDS``
#: fds, its payload's memfd among them.
_CARRY_BATCH = wire.MAX_FDS - 1

#: The most characters of a traceback (``detail``) and of an error in a reply
#: header, which must stay within ``channel.MAX_HEADER``.
_MAX_DETAIL = 32 * 1024
_MAX_ERROR = 2 * 1024


@dataclass(frozen=True)
class Reply:
    """What a handler may return: ``fields`` go into the reply header,
    ``payload`` is its payload, ``fds`` are sent with it and then closed."""

    fields: dict[str, Any] = field(default_factory=dict)
    payload: Payload | bytes | None = None
    fds: tuple[int, ...] = ()


#: A request handler: ``(header, payload, fds) -> awaitable result`` (module docstring).
Handler = Callable[[dict[str, Any], Payload | bytes | None, Sequence[int]], Any]


def _as_reply(result: Any) -> Reply:
    fds: tuple[int, ...] = ()
    if isinstance(result, Reply):
        return result
    if isinstance(result, tuple):
        result, fds = result[0], tuple(result[1])
    if isinstance(result, (bytes, Payload)):
        return Reply(payload=result, fds=fds)
    if isinstance(result, dict):
        return Reply(fields=result, fds=fds)
    return Reply(fds=fds)


class Busy(TimeoutError):
    """Connections still in flight when a pause's quiesce_timeout passed."""


class SnapshotError(ValueError):
    """A snapshot that cannot be handed over: not picklable, or too large."""


#: The write buffer of a snapshot's pickling into its memfd.
_PICKLE_BUFFER = 1 << 20


@contextlib.contextmanager
def _no_gc() -> Iterator[None]:
    """The cyclic GC off for a (un)pickling: building a large state creates
    millions of objects, each allocation counting towards a collection that
    scans them all again, and none of them is garbage yet."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _unpickle(payload: Payload | bytes) -> Any:
    """A state (or a manifest) from our predecessor, relayed by the supervisor
    over the channel it handed us at fork: read from its memfd, not copied."""
    if isinstance(payload, bytes):
        with _no_gc():
            return pickle.loads(payload)
    with payload.view() as view, _no_gc():
        return pickle.loads(view)


async def _maybe_await(value: Any) -> Any:
    if inspect.isawaitable(value):
        return await value
    return value


def _bundle_traceback(exc: BaseException) -> str:
    """The traceback of a bundle's error, without hotsup's and importlib's frames."""
    ours = (os.path.dirname(os.path.abspath(__file__)) + os.sep,
            os.path.dirname(importlib.__file__) + os.sep, "<frozen importlib")
    summary = traceback.TracebackException.from_exception(exc)
    summary.stack = traceback.StackSummary.from_list(
        [frame for frame in summary.stack if not frame.filename.startswith(ours)])
    return "".join(summary.format()).rstrip()


def _one_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, SyntaxError) and exc.filename:
        text = f"{type(exc).__name__}: {exc.msg} ({exc.filename}, line {exc.lineno})"
    return text.splitlines()[0] if text else type(exc).__name__
