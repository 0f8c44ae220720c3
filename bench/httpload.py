"""HTTP/1.1 load on 127.0.0.1: short-lived and keep-alive clients, every request classified.

Standard library only (asyncio streams, run on uvloop by the caller), so one
cheap process can load a server on a small machine. ``Load.run()`` runs a
bounded number of clients until an event is set or a deadline passes; each
client sends ``GET /`` and waits for the whole response before the next one
(a closed loop: throughput is what the server and the clients manage).

- a *short-lived* client opens a connection per request and sends
  ``Connection: close``;
- a *keep-alive* client keeps its connection for as long as the server does.
  It honours a response's ``Connection: close`` by opening a new connection
  for its next request (counted in ``server_closes``, not a failure). Its
  idle connection may still be closed by the server before the next request
  is answered. RFC 9112 section 9.3.1 lets a client retry then, and only
  then: when no byte of the response arrived and the request is idempotent
  (``GET`` is). The client retries once on a fresh connection and counts it
  in ``retries`` (``closed_idle``: the close was seen before sending;
  ``closed_before_response``: the request was sent, then EOF or a reset came
  before any byte of the response). A failed retry is a failed request.

Every attempt ends as one ``Outcome``. A response is ``ok`` when it is a 200
whose body is ``version=V count=N pid=P`` and whose ``x-app-version`` header
says the same ``V``; the ``Recorder`` keeps, per version, when it first
answered and the range of counts it served.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from enum import StrEnum

from asgi_apps import BODY
from clients import HOST

FAIL_PAUSE = 0.010  # after a failed request: no busy spinning against a server that is down


class Outcome(StrEnum):
    OK = "ok"
    REFUSED = "refused"  # connect() refused: nobody listening on the port
    RESET = "reset"  # reset, or closed by the server before a whole response
    TIMEOUT = "timeout"  # no whole response within the request timeout
    NON_200 = "non_200"
    WRONG_BODY = "wrong_body"  # a response this app never sends, or no valid HTTP at all
    OTHER = "other"  # a client-side error, e.g. no free local port


FAILURES = tuple(outcome for outcome in Outcome if outcome is not Outcome.OK)


class Mode(StrEnum):
    SHORT = "short_lived"
    KEEPALIVE = "keep_alive"


@dataclass
class Response:
    status: int
    headers: dict[bytes, bytes]
    body: bytes

    @property
    def closes(self) -> bool:
        """The server said it closes the connection after this response."""
        return self.headers.get(b"connection", b"").lower() == b"close"


class NoResponseByte(Exception):
    """The connection closed (EOF or reset) before any byte of the response arrived."""


@dataclass
class VersionSeen:
    """What one code version served: when it first answered, and which counts."""

    first_at: float
    responses: int
    min_count: int
    max_count: int


@dataclass
class Recorder:
    """Everything the clients of one phase saw.

    ``swap`` is the index of the swap in progress (0 before the first write);
    failures are also filed under it, so each swap has its own count.
    """

    outcomes: dict[Mode, Counter[Outcome]] = field(
        default_factory=lambda: {mode: Counter() for mode in Mode})
    retries: Counter[str] = field(default_factory=Counter)
    server_closes: int = 0
    versions: dict[str, VersionSeen] = field(default_factory=dict)
    duplicate_counts: int = 0
    swap: int = 0
    failures_by_swap: Counter[int] = field(default_factory=Counter)
    _counts: bytearray = field(default_factory=bytearray)  # a bitmap: count N served yet?
    _waiters: dict[str, asyncio.Future[float]] = field(default_factory=dict)

    def ok(self, mode: Mode, version: str, count: int) -> None:
        now = time.monotonic()
        self.outcomes[mode][Outcome.OK] += 1
        seen = self.versions.get(version)
        if seen is None:
            self.versions[version] = VersionSeen(now, 1, count, count)
            waiter = self._waiters.pop(version, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(now)
        else:
            seen.responses += 1
            seen.min_count = min(seen.min_count, count)
            seen.max_count = max(seen.max_count, count)
        byte, bit = divmod(count, 8)
        if byte >= len(self._counts):
            self._counts.extend(bytes(byte + 1 - len(self._counts) + 4096))
        if self._counts[byte] & (1 << bit):
            self.duplicate_counts += 1
        self._counts[byte] |= 1 << bit

    def failed(self, mode: Mode, outcome: Outcome) -> None:
        self.outcomes[mode][outcome] += 1
        self.failures_by_swap[self.swap] += 1

    async def first_response(self, version: str, deadline: float) -> float | None:
        """When ``version`` first answered (time.monotonic()); None if not by ``deadline``."""
        seen = self.versions.get(version)
        if seen is not None:
            return seen.first_at
        waiter = self._waiters.get(version)
        if waiter is None:
            waiter = self._waiters[version] = asyncio.get_running_loop().create_future()
        try:
            return await asyncio.wait_for(asyncio.shield(waiter),
                                          max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            return None

    def ok_total(self) -> int:
        return sum(counter[Outcome.OK] for counter in self.outcomes.values())

    def failed_total(self, mode: Mode) -> int:
        return sum(n for outcome, n in self.outcomes[mode].items() if outcome is not Outcome.OK)


# -- one exchange -------------------------------------------------------------------


async def read_response(reader: asyncio.StreamReader) -> Response:
    """One HTTP/1.1 response. NoResponseByte if the connection ended before its first byte."""
    try:
        first = await reader.read(1)
    except ConnectionError as exc:
        raise NoResponseByte from exc
    if not first:
        raise NoResponseByte
    head = first + await reader.readuntil(b"\r\n\r\n")
    status_line, *lines = head[:-4].split(b"\r\n")
    parts = status_line.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise ValueError(f"not an HTTP/1.x status line: {status_line[:60]!r}")
    headers: dict[bytes, bytes] = {}
    for line in lines:
        name, sep, value = line.partition(b":")
        if not sep:
            raise ValueError(f"not a header line: {line[:60]!r}")
        headers[name.strip().lower()] = value.strip()
    if b"content-length" in headers:
        body = await reader.readexactly(int(headers[b"content-length"]))
    elif headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        body = await _read_chunked(reader)
    else:  # delimited by the end of the connection
        body = await reader.read()
    return Response(int(parts[1]), headers, body)


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    chunks: list[bytes] = []
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        if size == 0:
            await reader.readuntil(b"\r\n")  # we send no TE: trailers, so none come back
            return b"".join(chunks)
        chunks.append(await reader.readexactly(size))
        await reader.readexactly(2)


def judge(response: Response) -> tuple[Outcome, str, int]:
    """The outcome of a whole response, and the version and count it carries."""
    if response.status != 200:
        return Outcome.NON_200, "", 0
    match = BODY.fullmatch(response.body)
    if match is None or response.headers.get(b"x-app-version") != match[1]:
        return Outcome.WRONG_BODY, "", 0
    return Outcome.OK, match[1].decode(), int(match[2])


def classify(exc: BaseException) -> Outcome:
    """The outcome of a request that ended in ``exc``."""
    if isinstance(exc, TimeoutError):
        return Outcome.TIMEOUT
    if isinstance(exc, ConnectionRefusedError):
        return Outcome.REFUSED
    if isinstance(exc, ConnectionError | NoResponseByte | asyncio.IncompleteReadError):
        return Outcome.RESET
    if isinstance(exc, ValueError | asyncio.LimitOverrunError):
        return Outcome.WRONG_BODY
    return Outcome.OTHER


_CAUGHT = (OSError, NoResponseByte, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
           ValueError)


def _close(conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None) -> None:
    if conn is not None:
        conn[1].close()


# -- the clients --------------------------------------------------------------------


@dataclass
class Load:
    """``short`` short-lived and ``keepalive`` keep-alive clients against ``port``."""

    port: int
    short: int
    keepalive: int
    timeout: float
    recorder: Recorder
    host: str = HOST

    def __post_init__(self) -> None:
        host = f"Host: {self.host}:{self.port}\r\n".encode()
        self._close_request = b"GET / HTTP/1.1\r\n" + host + b"Connection: close\r\n\r\n"
        self._keep_request = b"GET / HTTP/1.1\r\n" + host + b"\r\n"

    async def run(self, stop: asyncio.Event, until: float) -> None:
        """Run every client until ``stop`` is set or ``until`` (monotonic) passes.

        A client finishes the request it is in (bounded by ``timeout``) first.
        """
        async with asyncio.TaskGroup() as group:
            for _ in range(self.short):
                group.create_task(self._short_client(stop, until))
            for _ in range(self.keepalive):
                group.create_task(self._keepalive_client(stop, until))

    async def _short_client(self, stop: asyncio.Event, until: float) -> None:
        while not stop.is_set() and time.monotonic() < until:
            outcome, version, count = await self._short_request()
            if outcome is Outcome.OK:
                self.recorder.ok(Mode.SHORT, version, count)
            else:
                self.recorder.failed(Mode.SHORT, outcome)
                await asyncio.sleep(FAIL_PAUSE)

    async def _short_request(self) -> tuple[Outcome, str, int]:
        conn = None
        try:
            async with asyncio.timeout(self.timeout):
                conn = await asyncio.open_connection(self.host, self.port)
                conn[1].write(self._close_request)
                response = await read_response(conn[0])
        except _CAUGHT as exc:
            return classify(exc), "", 0
        finally:
            _close(conn)
        return judge(response)

    async def _keepalive_client(self, stop: asyncio.Event, until: float) -> None:
        conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        try:
            while not stop.is_set() and time.monotonic() < until:
                conn, response = await self._keepalive_request(conn)
                if isinstance(response, Outcome):
                    self.recorder.failed(Mode.KEEPALIVE, response)
                    await asyncio.sleep(FAIL_PAUSE)
                    continue
                outcome, version, count = judge(response)
                if outcome is Outcome.OK:
                    self.recorder.ok(Mode.KEEPALIVE, version, count)
                else:
                    self.recorder.failed(Mode.KEEPALIVE, outcome)
                if response.closes or outcome is not Outcome.OK:
                    self.recorder.server_closes += response.closes
                    _close(conn)
                    conn = None
        finally:
            _close(conn)

    async def _keepalive_request(
        self, conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None
    ) -> tuple[tuple[asyncio.StreamReader, asyncio.StreamWriter] | None, Response | Outcome]:
        """One request on ``conn`` (or a new connection): the connection to keep, and
        the response or the outcome of the failure (the connection is then None)."""
        try:
            async with asyncio.timeout(self.timeout):
                if conn is not None and conn[0].at_eof():
                    # Closed while idle and noticed before sending: nothing was
                    # sent, so a new connection is a retry without any doubt.
                    self.recorder.retries["closed_idle"] += 1
                    _close(conn)
                    conn = None
                reused = conn is not None
                if conn is None:
                    conn = await asyncio.open_connection(self.host, self.port)
                try:
                    return conn, await self._exchange(conn)
                except NoResponseByte:
                    if not reused:
                        raise
                # RFC 9112 9.3.1: no byte of the response, an idempotent GET: retry once.
                self.recorder.retries["closed_before_response"] += 1
                _close(conn)
                conn = await asyncio.open_connection(self.host, self.port)
                return conn, await self._exchange(conn)
        except _CAUGHT as exc:
            _close(conn)
            return None, classify(exc)

    async def _exchange(self, conn: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> Response:
        reader, writer = conn
        writer.write(self._keep_request)
        try:
            await writer.drain()
        except ConnectionError as exc:
            raise NoResponseByte from exc
        return await read_response(reader)


async def probe(port: int, timeout: float = 1.0, host: str = HOST) -> str | None:
    """The version serving on ``port`` (one short-lived request), or None if none answers."""
    conn = None
    request = f"GET / HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode()
    try:
        async with asyncio.timeout(timeout):
            conn = await asyncio.open_connection(host, port)
            conn[1].write(request)
            outcome, version, _ = judge(await read_response(conn[0]))
    except _CAUGHT:
        return None
    finally:
        _close(conn)
    return version if outcome is Outcome.OK else None
