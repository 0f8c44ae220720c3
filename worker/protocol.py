"""The wire between the supervisor, the zygote and the workers.

This module is imported by both sides and imports neither, so a worker never
pulls in supervisor code. Two channels:

* **zygote channel**: a ``SOCK_SEQPACKET`` socketpair between the supervisor and
  the zygote. Each message is one JSON object; a ``spawn`` request carries the
  worker's file descriptors by ``SCM_RIGHTS`` in the same packet, in the order
  ``[log_pipe, channel, *sockets]``, and nothing else: the zygote never sees a
  bundle's spec (its settings may hold secrets, and every child forked later
  would carry a copy). Replies: ``spawned`` (with the pid) or ``error``;
  unprompted: ``exited`` with a worker's wait status, once the zygote reaped it
  (and killed the rest of its process group).

* **worker channel** (``channel``): a ``SOCK_SEQPACKET`` socketpair per worker,
  made by the supervisor, its worker end handed over at fork. A message is a
  header, a JSON object with ``v`` (protocol version) and ``op``, with an
  optional payload (opaque bytes: a pickled snapshot) and fds. The first
  message, queued by the supervisor before the spawn, is ``spec`` (payload: the
  ``SpawnSpec`` as JSON).

Worker -> supervisor: ``loaded`` (entry imported and constructed, with the hooks
it has), ``failed`` (it could not load; ``error`` says why), ``reply`` (to a
request ``id``: ``ok`` true, or false with ``error``, ``error_type`` (the
exception's class, e.g. ``Busy`` for connections still in flight at a pause)
and ``detail`` (the traceback)).

Supervisor -> worker requests (each has an ``id``; the worker replies once):
``start`` (payload: a snapshot to ``restore()`` first, if any), ``pause``
(stop accepting, wait for in-flight connections unless ``wait`` is false,
optionally ``snapshot``; the reply's payload is the snapshot), ``resume``
(payload: a newer state to ``restore()`` first, if any), ``snapshot`` (without
pausing), ``retire`` (stop accepting, drain, optionally ``snapshot`` (the
reply's payload), ``stop()``, then exit), ``ping``.

Carrying connections across a swap: a ``pause`` with ``carry`` true may
park connections (its reply says how many: ``parked``; with ``wait`` false,
overlap mode, it waits ``settle`` seconds for handlers to park theirs); ``parked`` takes the
next batch of them (the reply's fds, one per connection, and as payload a
pickled manifest ``[(socket, kind, buffered, meta), ...]`` in the same order;
``count`` says how many); ``adopt`` gives such a batch to the successor before
its ``start`` (which takes them up once ``start()`` returned); ``handed`` tells
the paused generation that its successor has them (it drops its side), and a
``resume`` instead means the swap rolled back (it serves them again). In
overlap mode the successor is serving already: it takes up an ``adopt`` at once.
A snapshot is refused (``error_type`` ``SnapshotError``) when it cannot be
pickled or is larger than the request's ``max_bytes``.
"""

from __future__ import annotations

import json
from typing import Any, Final, TypedDict

PROTOCOL_VERSION: Final = 1

#: The backlog of every listening socket, in the supervisor and anywhere a
#: worker might call listen() again: a listen() with a smaller backlog on a
#: shared socket would shrink it for every holder.
BACKLOG: Final = 1024

#: The largest payload either end of a worker channel accepts (bytes).
MAX_WORKER_MESSAGE: Final = 256 * 1024 * 1024

#: The largest packet on the zygote channel.
MAX_ZYGOTE_MESSAGE: Final = 1024 * 1024

#: Exit codes a worker uses, so the supervisor can tell a load error from a crash.
EXIT_OK: Final = 0
EXIT_LOAD_ERROR: Final = 4
EXIT_SUPERVISOR_GONE: Final = 5

# Worker channel operations.
OP_SPEC: Final = "spec"
OP_LOADED: Final = "loaded"
OP_FAILED: Final = "failed"
OP_REPLY: Final = "reply"
OP_START: Final = "start"
OP_PAUSE: Final = "pause"
OP_RESUME: Final = "resume"
OP_SNAPSHOT: Final = "snapshot"
OP_RETIRE: Final = "retire"
OP_PING: Final = "ping"
OP_PARKED: Final = "parked"
OP_ADOPT: Final = "adopt"
OP_HANDED: Final = "handed"

# Zygote channel operations.
ZY_SPAWN: Final = "spawn"
ZY_SPAWNED: Final = "spawned"
ZY_EXITED: Final = "exited"
ZY_ERROR: Final = "error"


class ProtocolError(ValueError):
    """A message that does not follow this protocol."""


class SpawnSpec(TypedDict):
    """Everything a new worker needs, sent to the zygote with its fds."""

    bundle: str
    generation: int
    path: str
    entry: str
    kind: str
    factory: bool
    threads: int  # kind = "wsgi": the size of its thread pool
    websockets: str  # kind = "asgi": "close" or "resume" (bundle.toml), what a hand-over does
    version: str
    settings: dict[str, Any]
    socket_names: list[str]
    log_level: str
    multiprocessing_logging: bool
    #: Drop to this uid/gid after fork (``user``/``group`` in bundle.toml), or stay.
    uid: int | None
    gid: int | None


def encode(header: dict[str, Any], payload: bytes | None = None) -> list[bytes]:
    """Frames for one worker-channel message."""
    frames = [json.dumps({"v": PROTOCOL_VERSION, **header}, separators=(",", ":")).encode()]
    if payload is not None:
        frames.append(payload)
    return frames


def decode(frames: list[bytes]) -> tuple[dict[str, Any], bytes | None]:
    """Header and payload of one worker-channel message; ProtocolError if malformed."""
    if not 1 <= len(frames) <= 2:
        raise ProtocolError(f"expected 1 or 2 frames, got {len(frames)}")
    try:
        header = json.loads(frames[0])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError("header is not a JSON object")
    if header.get("v") != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {header.get('v')!r}, expected {PROTOCOL_VERSION}")
    if not isinstance(header.get("op"), str):
        raise ProtocolError("header has no 'op'")
    return header, frames[1] if len(frames) == 2 else None


def pack_zygote(message: dict[str, Any]) -> bytes:
    data = json.dumps(message, separators=(",", ":")).encode()
    if len(data) > MAX_ZYGOTE_MESSAGE:
        raise ProtocolError(f"zygote message of {len(data)} bytes is too large")
    return data


def unpack_zygote(data: bytes) -> dict[str, Any]:
    try:
        message = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"zygote message is not JSON: {exc}") from None
    if not isinstance(message, dict) or not isinstance(message.get("op"), str):
        raise ProtocolError("zygote message has no 'op'")
    return message
