"""Log output: the supervisor's own records and every worker's log pipe, one stream.

Every record has a tag: ``bundle@generation`` for a worker's lines, ``hotsup``
for the supervisor's. As text a record is ``TIME LEVEL TAG: message`` (one
line per line of the message); as JSON it is one object per record (see
``LogRecord.as_json``). A worker's logging records arrive as JSON lines (see
``hotsup.worker.runtime``); anything else it writes (print, a traceback,
C-level output) arrives as plain text and is tagged the same way.

The newest records are kept for ``hotsup logs``: a ring per bundle (so a
chatty bundle cannot push a quiet one's lines out) and a ring of everything.
Each ring is bounded twice: ``RING`` records and ``RING_BYTES`` (per bundle)
or ``ALL_RING_BYTES`` (everything) of text, so a bundle that writes huge
lines costs the supervisor a few MiB, not what it wrote. Records are numbered
in order of arrival, so a reader can follow: ask for what came after the last
number it saw (``LogSink.after``, ``LogSink.wait``).

A worker's line is at most ``MAX_LINE`` bytes: a longer one (a newline that
never comes, a 200 MB dump) is cut into pieces of ``MAX_LINE`` bytes, each but
the last marked with ``CUT_MARK``, so nothing of it is buffered beyond one
piece.

Nothing a worker writes can stall the supervisor's event loop:

* Each worker's lines pass a token bucket (``RateLimit``: ``LINES_PER_SECOND``
  with a burst of ``LINE_BURST``). Lines beyond it are dropped where they are
  read, never queued, and counted (``WorkerLog.dropped``); while it drops, a
  WARNING record tagged with the worker says how many, at most once every
  ``DROP_REPORT_INTERVAL`` seconds and once more when the pipe closes. The
  pipe itself is always read, so a flooding worker blocks on its full pipe
  only for as long as its own kernel buffer takes to drain, never because we
  stopped reading; and one readable callback reads at most ``READ_CHUNK``
  bytes, so one worker cannot hold the loop while others wait.
* The supervisor's own stream (stderr) is written by a thread of its own
  (``_Output``) from a bounded buffer (``OUTPUT_BACKLOG`` characters). If the
  stream does not keep up (a pipe nobody reads, a stopped terminal), records
  that do not fit are dropped from the stream and counted
  (``LogSink.dropped_output``), and the thread writes a WARNING saying how many
  once it can; the rings still hold them, so ``hotsup logs`` shows them. A
  thread rather than a non-blocking fd because O_NONBLOCK belongs to the open
  file description, which stderr shares with the zygote, the shell that
  started us and whatever else holds it: it would change their stream too. The
  thread writes with ``os.write`` on the stream's fd, not through the
  ``TextIO``, so a write blocked at interpreter exit holds no Python-level
  lock the main thread would need; at exit the backlog gets
  ``OUTPUT_DRAIN_TIMEOUT`` seconds to drain.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, TextIO

#: Records kept per bundle, and of everything together.
RING = 2000
#: Text kept per bundle's ring and in the ring of everything (characters of
#: message, plus ``RECORD_OVERHEAD`` per record): the oldest records go first.
RING_BYTES = 4 * 1024 * 1024
ALL_RING_BYTES = 8 * 1024 * 1024
#: What a record costs in a ring beside its message (the object, its fields).
RECORD_OVERHEAD = 200
#: A worker line longer than this (bytes; no newline in sight) is cut into pieces.
MAX_LINE = 64 * 1024
#: Appended to every piece of a cut line but the last.
CUT_MARK = f" [cut at {MAX_LINE} bytes; the line goes on in the next record]"
#: Bytes read from one worker's pipe per readable callback: the pipe's own
#: kernel buffer, so one read usually empties it, and the loop turns to the
#: other fds in between.
READ_CHUNK = 64 * 1024
#: A worker's lines per second, and how many more it may send at once. A line
#: costs the supervisor about 7 us to parse, format and keep (measured here),
#: so a worker at the limit costs under 2% of a core, and several floods
#: together still leave the loop for swaps and control requests. 2000/s is
#: still a line per request for a busy development server; the burst lets a
#: start-up banner or a burst of tracebacks through whole; at most that many
#: lines (about 30 ms) are handled in one callback.
LINES_PER_SECOND = 2000.0
LINE_BURST = 4000
#: While a worker's lines are dropped, a summary at most this often (seconds).
DROP_REPORT_INTERVAL = 1.0
#: Characters of formatted records waiting for the supervisor's own stream;
#: beyond it records are dropped from the stream (they stay in the rings).
#: About 3000 records: a stalled terminal loses nothing of a swap or a burst
#: of tracebacks, and a flood fills it in a couple of seconds.
OUTPUT_BACKLOG = 256 * 1024
#: At exit, how long the output thread may take to write what is waiting.
OUTPUT_DRAIN_TIMEOUT = 2.0


class RateLimit:
    """A token bucket: ``rate`` tokens a second, at most ``burst`` saved up.

    ``clock`` is a monotonic time source in seconds (a fake one in tests).
    """

    def __init__(self, rate: float, burst: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._clock = clock
        self._tokens = float(burst)
        self._last = clock()

    def take(self, wanted: int) -> int:
        """Take up to ``wanted`` tokens now; how many were granted."""
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
        self._last = now
        granted = min(wanted, int(self._tokens))
        self._tokens -= granted
        return granted


class _Output:
    """Writes text to a stream from a thread, out of a bounded backlog.

    ``put`` never blocks: text that does not fit in ``limit`` characters is
    dropped and counted. After a write, if anything was dropped since the
    last summary (and ``interval`` seconds passed), the thread writes
    ``summary(count)``. A stream with a file descriptor is written with
    ``os.write`` on it; one without (a test's StringIO) through ``write``.
    Write errors (our stream is gone) are ignored: the supervisor keeps serving.
    """

    def __init__(self, stream: TextIO, summary: Callable[[int], str],
                 limit: int = OUTPUT_BACKLOG, interval: float = DROP_REPORT_INTERVAL) -> None:
        self._stream = stream
        self._summary = summary
        self._limit = limit
        self._interval = interval
        self._encoding = getattr(stream, "encoding", None) or "utf-8"
        try:
            self._fd: int | None = stream.fileno()
            stream.flush()  # what was written through the TextIO comes first
        except (OSError, ValueError):  # io.UnsupportedOperation is an OSError
            self._fd = None
        self._cond = threading.Condition()
        self._backlog: collections.deque[str] = collections.deque()
        self._size = 0
        self._busy = False
        self._closing = False
        self.dropped = 0
        self._reported = 0
        self._last_report = -interval
        self._thread = threading.Thread(target=self._run, name="hotsup-log-output", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    def put(self, text: str) -> None:
        with self._cond:
            if self._closing:
                return
            if self._size + len(text) > self._limit:
                self.dropped += 1
                return
            self._backlog.append(text)
            self._size += len(text)
            self._cond.notify()

    def flush(self, timeout: float) -> bool:
        """Wait until everything put so far is written; False after ``timeout``."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._backlog and not self._busy, timeout)

    def close(self, timeout: float = OUTPUT_DRAIN_TIMEOUT) -> None:
        """Write what is waiting (for up to ``timeout``), then stop the thread."""
        atexit.unregister(self.close)
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._busy = False
                self._cond.notify_all()  # for flush()
                while not self._backlog and not self._closing and not self._summary_due():
                    unreported = self.dropped > self._reported
                    # wake up for the summary even if nothing else comes
                    self._cond.wait(self._interval if unreported else None)
                if not self._backlog and self._closing and not self._summary_due(final=True):
                    return
                text = "".join(self._backlog)
                self._backlog.clear()
                self._size = 0
                if self._summary_due(final=self._closing):
                    text += self._summary(self.dropped - self._reported)
                    self._reported = self.dropped
                    self._last_report = time.monotonic()
                self._busy = True
            self._emit(text)

    def _summary_due(self, final: bool = False) -> bool:
        return self.dropped > self._reported and (
            final or time.monotonic() - self._last_report >= self._interval)

    def _emit(self, text: str) -> None:
        try:
            if self._fd is None:
                self._stream.write(text)
                self._stream.flush()
                return
            data = memoryview(text.encode(self._encoding, "backslashreplace"))
            while data:
                data = data[os.write(self._fd, data):]
        except (OSError, ValueError):
            pass  # our own output is gone (closed terminal): keep serving


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


class _Ring:
    """The newest records, at most ``count`` of them and ``budget`` in size
    (``RECORD_OVERHEAD`` plus the message's length each)."""

    def __init__(self, budget: int, count: int = RING) -> None:
        self._records: collections.deque[LogRecord] = collections.deque()
        self._budget = budget
        self._count = count
        self.size = 0

    def append(self, record: LogRecord) -> None:
        self._records.append(record)
        self.size += _cost(record)
        while len(self._records) > self._count or (
                self.size > self._budget and len(self._records) > 1):
            self.size -= _cost(self._records.popleft())

    def after(self, seq: int) -> list[LogRecord]:
        """The records numbered above ``seq``, oldest first: read from the
        newest end, so a follower's look costs what is new, not the ring."""
        found: list[LogRecord] = []
        for record in reversed(self._records):
            if record.seq <= seq:
                break
            found.append(record)
        found.reverse()
        return found

    def __len__(self) -> int:
        return len(self._records)


def _cost(record: LogRecord) -> int:
    return RECORD_OVERHEAD + len(record.msg)


class LogSink:
    """Where every record goes: the output stream and the rings.

    ``json``: write one JSON object per record instead of text. ``write``
    never blocks: the stream is written by a thread (see the module docstring);
    ``flush`` waits for it, ``close`` stops it (also done at exit).
    """

    def __init__(self, stream: TextIO | None = None, json: bool = False) -> None:
        self._json = json
        self._seq = 0
        self._all = _Ring(ALL_RING_BYTES)
        self._by_bundle: dict[str, _Ring] = {}
        self._arrived: asyncio.Event | None = None
        self._output = _Output(stream if stream is not None else sys.stderr,
                               self._output_dropped)

    def write(self, tag: str, level: str, message: str, ts: float | None = None,
              bundle: str | None = None, generation: int | None = None) -> None:
        self._seq += 1
        record = LogRecord(self._seq, ts if ts is not None else time.time(), level, tag,
                           bundle, generation, message)
        self._all.append(record)
        if bundle is not None:
            ring = self._by_bundle.get(bundle)
            if ring is None:
                ring = self._by_bundle[bundle] = _Ring(RING_BYTES)
            ring.append(record)
        if self._arrived is not None:
            self._arrived.set()
        self._output.put(self._format(record))

    @property
    def dropped_output(self) -> int:
        """Records that never reached the stream because it did not keep up."""
        return self._output.dropped

    def flush(self, timeout: float = OUTPUT_DRAIN_TIMEOUT) -> bool:
        """Wait until every record so far is written; False after ``timeout``."""
        return self._output.flush(timeout)

    def close(self, timeout: float = OUTPUT_DRAIN_TIMEOUT) -> None:
        """Write what is waiting (for up to ``timeout``) and stop writing."""
        self._output.close(timeout)

    def _format(self, record: LogRecord) -> str:
        return (record.as_json() if self._json else record.as_text()) + "\n"

    def _output_dropped(self, count: int) -> str:
        # Called by the output thread: a record of its own, outside the rings
        # and the numbering (seq 0), which belong to the loop's thread.
        return self._format(LogRecord(
            0, time.time(), "WARNING", "hotsup", None, None,
            f"dropped {count} log record(s) from this output: it was not keeping up "
            "(`hotsup logs` still has the newest)"))

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

    def after(self, seq: int, bundle: str | None = None, limit: int = RING,
              budget: int | None = None) -> list[LogRecord]:
        """The newest ``limit`` records numbered above ``seq`` (of ``bundle``, or
        all), and of those the newest that fit in ``budget`` (as the rings count
        size; the newest record always fits)."""
        if limit <= 0:
            return []
        ring = self._all if bundle is None else self._by_bundle.get(bundle)
        found = ring.after(seq)[-limit:] if ring is not None else []
        if budget is not None:
            keep, used = len(found), 0
            while keep > 0 and (used + _cost(found[keep - 1]) <= budget or keep == len(found)):
                keep -= 1
                used += _cost(found[keep])
            found = found[keep:]
        return found

    def kept_bytes(self) -> int:
        """What the rings hold (as ``_Ring`` counts it), for status and tests."""
        return self._all.size + sum(ring.size for ring in self._by_bundle.values())

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
                async with asyncio.timeout(left):
                    await self._arrived.wait()
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


def _cut(line: bytes) -> list[bytes]:
    """``line`` in pieces of at most ``MAX_LINE`` bytes, each but the last
    ending with ``CUT_MARK``."""
    if len(line) <= MAX_LINE:
        return [line]
    mark = CUT_MARK.encode()
    pieces = [line[at:at + MAX_LINE] for at in range(0, len(line), MAX_LINE)]
    return [piece + mark for piece in pieces[:-1]] + pieces[-1:]


class WorkerLog:
    """Reads one worker's log pipe until EOF (the worker and all it forked are gone).

    At most ``READ_CHUNK`` bytes per readable callback; lines beyond the
    worker's ``RateLimit`` are dropped and counted (see the module docstring).
    ``clock`` is for tests.
    """

    def __init__(self, fd: int, bundle: str, generation: int, sink: LogSink,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._fd = fd
        self._bundle = bundle
        self._generation = generation
        self._tag = f"{bundle}@{generation}"
        self._sink = sink
        self._partial = b""
        self._clock = clock
        self._limit = RateLimit(LINES_PER_SECOND, LINE_BURST, clock)
        self._dropped = 0
        self._unreported = 0
        self._dropping_since = 0.0
        self._report: asyncio.TimerHandle | None = None
        loop = asyncio.get_running_loop()
        self.closed = loop.create_future()
        os.set_blocking(fd, False)
        loop.add_reader(fd, self._on_readable)

    @property
    def dropped(self) -> int:
        """Lines of this worker dropped by the rate limit, in all."""
        return self._dropped

    def _on_readable(self) -> None:
        try:
            data = os.read(self._fd, READ_CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.close()
            return
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        pieces: list[bytes] = []
        for line in lines:
            pieces += _cut(line)
        if len(self._partial) > MAX_LINE:  # a line without end: hand on its whole pieces
            *whole, self._partial = _cut(self._partial)
            pieces += whole
        self._pass(pieces)

    def _pass(self, lines: list[bytes]) -> None:
        """Hand on the lines the rate limit grants; count the rest."""
        granted = self._limit.take(len(lines))
        for line in lines[:granted]:
            self._sink.worker_line(self._bundle, self._generation, line)
        if granted < len(lines):
            if self._unreported == 0:
                self._dropping_since = self._clock()
            self._dropped += len(lines) - granted
            self._unreported += len(lines) - granted
            if self._report is None:
                self._report = asyncio.get_running_loop().call_later(
                    DROP_REPORT_INTERVAL, self._report_drops)

    def _report_drops(self) -> None:
        self._report = None
        if not self._unreported:
            return
        took = self._clock() - self._dropping_since
        self._sink.write(self._tag, "WARNING",
                         f"dropped {self._unreported} log line(s) in {took:.1f}s "
                         f"(more than {LINES_PER_SECOND:g} lines/s)",
                         bundle=self._bundle, generation=self._generation)
        self._unreported = 0

    def close(self) -> None:
        if self._fd < 0:
            return
        if self._partial:
            self._pass([self._partial])
            self._partial = b""
        if self._report is not None:
            self._report.cancel()
        self._report_drops()  # the last count, now: nobody is left to say it later
        asyncio.get_running_loop().remove_reader(self._fd)
        os.close(self._fd)
        self._fd = -1
        if not self.closed.done():
            self.closed.set_result(None)
