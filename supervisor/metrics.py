"""``[supervisor] metrics = "HOST:PORT"``: /metrics, /healthz and /readyz over HTTP.

* ``/metrics``: Prometheus' text exposition format, written by prometheus-client
  from a custom collector (``StatusCollector``) over the bundle runners'
  ``status()`` dicts. A scrape reads those and nothing else: no counter is kept
  here, so nothing can drift from what ``hotsup status`` says.
* ``/healthz``: 200 whenever it answers at all, since it is answered on the
  supervisor's own event loop (the liveness probe: a stuck loop answers nothing).
* ``/readyz``: 200 only when every bundle serves (running, or swapping while
  its old generation serves); else 503 with the reason (a bundle failed,
  starting, stopped; no bundle; shutting down). The readiness probe that gates
  an orchestrator's rolling update.

The server is a tiny HTTP/1.0-style responder on the supervisor's asyncio loop
(not a thread: it reads state that only the loop changes), one request per
connection, bounded: at most MAX_CONNECTIONS at once (more are answered 503
and closed), a request head of at most MAX_REQUEST bytes, READ_TIMEOUT to send
it and WRITE_TIMEOUT to take the answer. Only GET and HEAD. It is meant for a
trusted network (a pod, a host's scrape port): bind it to 127.0.0.1 or a
private address, like any exporter; it exposes bundle names and counts, and
accepts no input that changes anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

log = logging.getLogger("hotsup")

MAX_CONNECTIONS = 32
MAX_REQUEST = 8192
READ_TIMEOUT = 5.0
WRITE_TIMEOUT = 5.0
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: Every state a bundle can be in (swap.BundleState's values), one gauge each.
STATES = ("starting", "running", "swapping", "failed", "stopped")
#: Serving, for /readyz: the old generation serves while a swap runs.
SERVING = ("running", "swapping")
#: Results of a pass that did something (swap.Result's values but "unchanged").
RESULTS = ("swapped", "rolled back", "started", "restarted", "failed", "stopped")

#: The state a scrape reads: (supervisor status, one status() dict per bundle).
Snapshot = Callable[[], tuple[dict[str, Any], list[dict[str, Any]]]]


class StatusCollector(Collector):
    """Metric families made from the runners' ``status()`` dicts at each scrape."""

    def __init__(self, read: Snapshot) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        supervisor, bundles = self._read()
        swaps = CounterMetricFamily("hotsup_swaps", "Passes of a bundle's loop that did "
                                    "something, by result (swapped, rolled_back, started, "
                                    "restarted, failed, stopped)", labels=["bundle", "result"])
        duration = HistogramMetricFamily("hotsup_swap_duration_seconds", "Duration of the "
                                         "swaps that served, from the request to N+1 ready",
                                         labels=["bundle"])
        pause = GaugeMetricFamily("hotsup_last_pause_seconds", "How long nobody accepted in "
                                  "the last swap (0 in overlap mode)", labels=["bundle"])
        restarts = CounterMetricFamily("hotsup_restarts", "Crash restarts of a bundle",
                                       labels=["bundle"])
        state = GaugeMetricFamily("hotsup_bundle_state", "1 for the state the bundle is in, "
                                  "0 for the others", labels=["bundle", "state"])
        generation = GaugeMetricFamily("hotsup_bundle_generation", "The serving generation's "
                                       "number", labels=["bundle"])
        dropped = GaugeMetricFamily("hotsup_bundle_log_dropped", "Log lines the serving "
                                    "generation's flood limit dropped", labels=["bundle"])
        ckpt_bytes = GaugeMetricFamily("hotsup_checkpoint_bytes", "Size of the last "
                                       "checkpoint written", labels=["bundle"])
        ckpt_age = GaugeMetricFamily("hotsup_checkpoint_age_seconds", "Seconds since the "
                                     "last checkpoint was written", labels=["bundle"])
        now = time.time()
        for bundle in bundles:
            name = str(bundle["name"])
            outcomes = bundle.get("outcomes", {})
            for result in RESULTS:
                swaps.add_metric([name, result.replace(" ", "_")], outcomes.get(result, 0))
            times = bundle.get("swap_ms")
            if times:
                buckets = [(_le(le), count) for le, count in zip(times["le"], times["counts"],
                                                                  strict=False)]
                buckets.append(("+Inf", times["counts"][-1]))
                duration.add_metric([name], buckets, times["sum"] / 1000)
            if bundle.get("last_pause_ms") is not None:
                pause.add_metric([name], bundle["last_pause_ms"] / 1000)
            restarts.add_metric([name], bundle.get("restarts", 0))
            for value in STATES:
                state.add_metric([name, value], 1.0 if bundle["state"] == value else 0.0)
            if bundle.get("generation") is not None:
                generation.add_metric([name], bundle["generation"])
            dropped.add_metric([name], bundle.get("log_dropped", 0))
            if bundle.get("checkpoint_bytes") is not None:
                ckpt_bytes.add_metric([name], bundle["checkpoint_bytes"])
                ckpt_age.add_metric([name], max(0.0, now - bundle["checkpoint_at"]))
        yield from (swaps, duration, pause, restarts, state, generation, dropped, ckpt_bytes,
                    ckpt_age)
        yield GaugeMetricFamily("hotsup_bundles", "Bundles the supervisor runs",
                                value=len(bundles))
        yield CounterMetricFamily("hotsup_log_dropped", "Bytes of log output the supervisor "
                                  "dropped because its stderr was not read",
                                  value=supervisor.get("log_dropped", 0))
        yield GaugeMetricFamily("hotsup_uptime_seconds", "Seconds since the supervisor started",
                                value=supervisor.get("uptime", 0.0))


def _le(ms: float) -> str:
    return repr(ms / 1000)


def readiness(bundles: list[dict[str, Any]], stopping: bool) -> tuple[bool, str]:
    """Whether every bundle serves, and if not why: /readyz's answer."""
    if stopping:
        return False, "shutting down"
    if not bundles:
        return False, "no bundle"
    waiting = [f"{b['name']} {b['state']}" + (f" ({b['last_error']})" if b.get("last_error")
                                               else "")
               for b in bundles if b["state"] not in SERVING]
    if waiting:
        return False, "; ".join(waiting)
    return True, f"{len(bundles)} bundle(s) serving"


class MetricsServer:
    """The HTTP endpoint; ``start()`` binds it, ``close()`` ends it and every connection."""

    def __init__(self, host: str, port: int, read: Snapshot,
                 stopping: Callable[[], bool]) -> None:
        self._host, self._port = host, port
        self._read = read
        self._stopping = stopping
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(StatusCollector(read))
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self.address = ""

    async def start(self) -> None:
        """Bind HOST:PORT; OSError if it cannot."""
        self._server = await asyncio.start_server(self._serve, self._host, self._port,
                                                  limit=MAX_REQUEST, reuse_address=True)
        host, port = self._server.sockets[0].getsockname()[:2]
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        log.info("metrics on http://%s/metrics (and /healthz, /readyz)", self.address)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)  # close() cancels whatever is still answering
        try:
            if len(self._handlers) > MAX_CONNECTIONS:
                await self._send(writer, 503, "too many connections\n", head=False)
                return
            try:
                async with asyncio.timeout(READ_TIMEOUT):
                    method, path = await _request_line(reader)
            except (TimeoutError, ValueError, asyncio.LimitOverrunError,
                    asyncio.IncompleteReadError, ConnectionError):
                await self._send(writer, 400, "bad request\n", head=False)
                return
            status, body, content_type = self._route(method, path)
            await self._send(writer, status, body, head=method == "HEAD",
                             content_type=content_type)
        except ConnectionError:
            pass  # the client left: nothing to answer
        finally:
            self._handlers.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(WRITE_TIMEOUT):
                    await writer.wait_closed()

    def _route(self, method: str, path: str) -> tuple[int, str | bytes, str]:
        text = "text/plain; charset=utf-8"
        if method not in ("GET", "HEAD"):
            return 405, "only GET and HEAD\n", text
        path = path.partition("?")[0]
        if path == "/metrics":
            return 200, generate_latest(self._registry), CONTENT_TYPE
        if path == "/healthz":
            return 200, "ok\n", text
        if path == "/readyz":
            ready, why = readiness(self._read()[1], self._stopping())
            return (200 if ready else 503), why + "\n", text
        return 404, "not found: try /metrics, /healthz or /readyz\n", text

    async def _send(self, writer: asyncio.StreamWriter, status: int, body: str | bytes, *,
                    head: bool, content_type: str = "text/plain; charset=utf-8") -> None:
        data = body.encode() if isinstance(body, str) else body
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found",
                  405: "Method Not Allowed", 503: "Service Unavailable"}[status]
        writer.write(f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n"
                     f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode())
        if not head:
            writer.write(data)
        async with asyncio.timeout(WRITE_TIMEOUT):
            await writer.drain()


async def _request_line(reader: asyncio.StreamReader) -> tuple[str, str]:
    """The method and path of a request; its headers are read and ignored.

    The stream's limit (MAX_REQUEST) bounds each line; the head as a whole is
    bounded too, so a client cannot keep us reading headers for ever.
    """
    line = await reader.readuntil(b"\n")
    parts = line.decode("latin-1").split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/") or not parts[1].startswith("/"):
        raise ValueError("not an HTTP request line")
    total = len(line)
    while (header := await reader.readuntil(b"\n")) not in (b"\r\n", b"\n"):
        total += len(header)
        if total > MAX_REQUEST:
            raise ValueError("request head too large")
    return parts[0], parts[1]
