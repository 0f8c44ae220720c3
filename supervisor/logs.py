"""Log output: the supervisor's own records and every worker's log pipe, one stream.

Each line is ``TIME LEVEL TAG: message`` where TAG is ``hotsup`` for the
supervisor and ``bundle@generation`` for a worker. A worker's logging records
arrive as JSON lines (see ``hotsup.worker.runtime``); anything else it writes
(print, a traceback, C-level output) arrives as plain text and is tagged the
same way. The last lines of every bundle are kept for ``hotsup logs``.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import sys
import time
from typing import TextIO

_RING = 2000
_MAX_LINE = 64 * 1024


def _stamp(ts: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ts)) + f".{int(ts * 1000) % 1000:03d}"


class LogSink:
    """Where every line goes: the output stream and a ring buffer per bundle."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream if stream is not None else sys.stderr
        self.recent: dict[str, collections.deque[str]] = {}

    def write(self, tag: str, level: str, message: str, ts: float | None = None,
              bundle: str | None = None) -> None:
        stamp = _stamp(ts if ts is not None else time.time())
        lines = [f"{stamp} {level:<7} {tag}: {part}" for part in message.splitlines() or [""]]
        if bundle is not None:
            ring = self.recent.setdefault(bundle, collections.deque(maxlen=_RING))
            ring.extend(lines)
        try:
            self._stream.write("\n".join(lines) + "\n")
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
                           bundle)
                return
            except (ValueError, KeyError, TypeError):
                pass
        self.write(tag, "OUTPUT", text, bundle=bundle)


class SinkHandler(logging.Handler):
    """The supervisor's logging records, formatted like the workers' lines."""

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
        if len(self._partial) > _MAX_LINE:  # a line without end: emit it in pieces
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
