"""Log output: the supervisor's own records and every worker's log pipe, one stream.

Every record has a tag: ``bundle@generation`` for a worker's lines, ``hotsup``
for the supervisor's. As text a record is ``TIME LEVEL TAG: message`` (one
line per line of the message); as JSON it is one object per record (see
``LogRecord.as_json``). A worker's logging records arrive as JSON lines (see
``hotsup.worker.runtime``); anything else it writes (print, a traceback,
C-level output) arrives as plain text and is tagged the same way.

The newest records are kept for ``hotsup logs``: a ring per bundle (so a
chatty bundle cannot push a quiet one's lines out) and a ring of everything.
Records are numbered in order of arrival, so a reader can follow: ask for
what came after the last number it saw (``LogSink.after``, ``LogSink.wait``).
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import sys
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any, TextIO

#: Records kept per bundle, and of everything together.
RING = 2000
#: A worker line longer than this (no newline in sight) is cut into pieces.
MAX_LINE = 64 * 1024


def _stamp(ts: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ts)) + f".{int(ts * 1000) % 1000:03d}"


@dataclass(frozen=True)
class LogRecord:
    seq: int
    ts: float
    level: str
    tag: str  # "bundle@generation" or "hotsup"
    bundle: str | None  # the bundle it is about, if any
    generation: int | None  # the generation that wrote it (None: the supervisor)
    msg: str

    def as_text(self) -> str:
        stamp = _stamp(self.ts)
        return "\n".join(f"{stamp} {self.level:<7} {self.tag}: {part}"
                         for part in self.msg.splitlines() or [""])

    def as_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LogRecord:
        return cls(int(data["seq"]), float(data["ts"]), str(data["level"]), str(data["tag"]),
                   data.get("bundle"), data.get("generation"), str(data["msg"]))


class LogSink:
    """Where every record goes: the output stream and the rings.

    ``json``: write one JSON object per record instead of text.
    """

    def __init__(self, stream: TextIO | None = None, json: bool = False) -> None:
        self._stream = stream if stream is not None else sys.stderr
        self._json = json
        self._seq = 0
        self._all: collections.deque[LogRecord] = collections.deque(maxlen=RING)
        self._by_bundle: dict[str, collections.deque[LogRecord]] = {}
        self._arrived: asyncio.Event | None = None

    def write(self, tag: str, level: str, message: str, ts: float | None = None,
              bundle: str | None = None, generation: int | None = None) -> None:
        self._seq += 1
        record = LogRecord(self._seq, ts if ts is not None else time.time(), level, tag,
                           bundle, generation, message)
        self._all.append(record)
        if bundle is not None:
            self._by_bundle.setdefault(bundle, collections.deque(maxlen=RING)).append(record)
        if self._arrived is not None:
            self._arrived.set()
        try:
            self._stream.write((record.as_json() if self._json else record.as_text()) + "\n")
            self._stream.flush()
        except (OSError, ValueError):
            pass  # our own output is gone (closed terminal): keep serving

    def worker_line(self, bundle: str, generation: int, raw: bytes) -> None:
        tag = f"{bundle}@{generation}"
        text = raw.decode("utf-8", "replace").rstrip("\r")
        if text.startswith('{"hotsup": 1'):
            try:
                record = json.loads(text)
                self.write(tag, str(record["level"]), str(record["msg"]), float(record["ts"]),
                           bundle, generation)
                return
            except (ValueError, KeyError, TypeError):
                pass
        self.write(tag, "OUTPUT", text, bundle=bundle, generation=generation)

    # -- reading ------------------------------------------------------------------

    def last_seq(self) -> int:
        return self._seq

    def after(self, seq: int, bundle: str | None = None, limit: int = RING) -> list[LogRecord]:
        """The newest ``limit`` records numbered above ``seq`` (of ``bundle``, or all)."""
        ring: Iterable[LogRecord] = self._all if bundle is None else \
            self._by_bundle.get(bundle, ())
        found = [record for record in ring if record.seq > seq]
        return found[-limit:] if limit > 0 else []

    async def wait(self, seq: int, timeout: float) -> None:
        """Return once a record numbered above ``seq`` exists, or after ``timeout``."""
        if self._arrived is None:
            self._arrived = asyncio.Event()
        deadline = time.monotonic() + timeout
        while self._seq <= seq:
            self._arrived.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                return
            try:
                await asyncio.wait_for(self._arrived.wait(), left)
            except TimeoutError:
                return


class SinkHandler(logging.Handler):
    """The supervisor's logging records, formatted like the workers' lines.

    A record logged with ``extra={"bundle": name}`` also goes to that bundle's
    ring, so ``hotsup logs NAME`` shows what the supervisor said about it.
    """

    def __init__(self, sink: LogSink) -> None:
        super().__init__()
        self._sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            if record.exc_info:
                message += "\n" + logging.Formatter().formatException(record.exc_info)
            bundle = getattr(record, "bundle", None)
            self._sink.write("hotsup", record.levelname, message, record.created, bundle)
        except Exception:
            self.handleError(record)


class WorkerLog:
    """Reads one worker's log pipe until EOF (the worker and all it forked are gone)."""

    def __init__(self, fd: int, bundle: str, generation: int, sink: LogSink) -> None:
        self._fd = fd
        self._bundle = bundle
        self._generation = generation
        self._sink = sink
        self._partial = b""
        self.closed = asyncio.get_running_loop().create_future()
        os.set_blocking(fd, False)
        asyncio.get_running_loop().add_reader(fd, self._on_readable)

    def _on_readable(self) -> None:
        try:
            data = os.read(self._fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.close()
            return
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        if len(self._partial) > MAX_LINE:  # a line without end: emit it in pieces
            lines.append(self._partial)
            self._partial = b""
        for line in lines:
            self._sink.worker_line(self._bundle, self._generation, line)

    def close(self) -> None:
        if self._fd < 0:
            return
        if self._partial:
            self._sink.worker_line(self._bundle, self._generation, self._partial)
            self._partial = b""
        asyncio.get_running_loop().remove_reader(self._fd)
        os.close(self._fd)
        self._fd = -1
        if not self.closed.done():
            self.closed.set_result(None)
