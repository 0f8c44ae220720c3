"""Long-lived connections through reloads: hotsup against gunicorn + HUP and uvicorn --reload.

Run from anywhere (``python bench/connections.py [--swaps 10] [--clients 8]
[--think 0.6] [--contenders hotsup,gunicorn_hup,uvicorn_reload]``). Each
contender serves the benchmark app (bench/asgi_apps.py, the trivial variant;
hotsup's bundle says ``websockets = "resume"``) in a fresh temporary directory
and is reloaded ``--swaps`` times by a rewrite of the app (gunicorn: the write,
then SIGHUP), while:

* ``--clients`` keep-alive HTTP clients each hold one connection and send a
  request every ``--think`` seconds (a client that thinks between requests, as
  browsers and connection pools do). A request that fails (a reset, an empty
  reply, a timeout) is counted and the client connects again;
* one WebSocket client sends a message every 0.1 s on one connection; a close
  is counted (with its code) and the client connects again.

Reported per contender: ``keep_alive`` (requests, failed, per 1000),
``websocket`` (messages answered, closes by code, whether one connection
lasted through every reload), and the versions seen (every reload took).
``compare`` puts hotsup beside each peer measured in the same run. One JSON
object goes to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import platform
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asgi_apps
from clients import HOST
from contenders import CONTENDERS, Server
from sessions import Sessions
from websockets.exceptions import ConnectionClosed, WebSocketException
from websockets.sync.client import connect

START_DEADLINE = 30.0
SWAP_DEADLINE = 15.0
#: After a reload took, how long the clients go on before the next one.
SETTLE = 1.0


@dataclass
class Tally:
    """What the clients saw; every field is guarded by ``lock``."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    requests: int = 0
    failed: Counter[str] = field(default_factory=Counter)
    versions: set[str] = field(default_factory=set)
    ws_messages: int = 0
    ws_closes: Counter[str] = field(default_factory=Counter)
    ws_connections: int = 0


def keep_alive_client(port: int, think: float, stop: threading.Event, tally: Tally) -> None:
    conn: http.client.HTTPConnection | None = None
    while not stop.is_set():
        if conn is None:
            conn = http.client.HTTPConnection(HOST, port, timeout=10)
        try:
            conn.request("GET", "/")
            response = conn.getresponse()
            body = response.read()
            ok = response.status == 200
            version = response.getheader("x-app-version") or "?"
            if response.will_close:
                conn.close()
                conn = None
        except (OSError, http.client.HTTPException) as exc:
            ok, version, body = False, type(exc).__name__, b""
            if conn is not None:
                conn.close()
            conn = None
        with tally.lock:
            tally.requests += 1
            if ok and body:
                tally.versions.add(version)
            else:
                tally.failed[version] += 1
        stop.wait(think)
    if conn is not None:
        conn.close()


def websocket_client(port: int, stop: threading.Event, tally: Tally) -> None:
    while not stop.is_set():
        try:
            with connect(f"ws://{HOST}:{port}/ws", open_timeout=10) as ws:
                with tally.lock:
                    tally.ws_connections += 1
                while not stop.is_set():
                    ws.send("hi")
                    ws.recv(timeout=10)
                    with tally.lock:
                        tally.ws_messages += 1
                    stop.wait(0.1)
        except ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd is not None else "none"
            with tally.lock:
                tally.ws_closes[str(code)] += 1
        except (OSError, TimeoutError, WebSocketException) as exc:
            with tally.lock:
                tally.ws_closes[type(exc).__name__] += 1
            stop.wait(0.1)


def version_of(port: int) -> str | None:
    with contextlib.suppress(OSError, http.client.HTTPException):
        conn = http.client.HTTPConnection(HOST, port, timeout=2)
        try:
            conn.request("GET", "/")
            response = conn.getresponse()
            response.read()
            return response.getheader("x-app-version")
        finally:
            conn.close()
    return None


def wait_version(port: int, version: str, deadline: float) -> bool:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if version_of(port) == version:
            return True
        time.sleep(0.02)
    return False


def run_contender(name: str, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    contender = CONTENDERS[name]
    missing = contender.missing()
    if missing:
        return {"skipped": missing}
    variant = asgi_apps.VARIANTS["trivial"]
    tally = Tally()
    stop = threading.Event()
    with Sessions() as sessions:
        server: Server = contender.launch(root / name, variant, sessions, watch_quiet_ms=30,
                                          manifest='websockets = "resume"\n')
        if not wait_version(server.port, "v0", START_DEADLINE):
            return {"error": f"not serving within {START_DEADLINE:g}s; see {server.log}"}
        threads = [threading.Thread(target=keep_alive_client,
                                    args=(server.port, args.think, stop, tally), daemon=True)
                   for _ in range(args.clients)]
        threads.append(threading.Thread(target=websocket_client,
                                        args=(server.port, stop, tally), daemon=True))
        for thread in threads:
            thread.start()
        time.sleep(SETTLE)
        took = 0
        for swap in range(1, args.swaps + 1):
            server.write(variant, f"v{swap}")
            if wait_version(server.port, f"v{swap}", SWAP_DEADLINE):
                took += 1
            time.sleep(SETTLE)
        stop.set()
        for thread in threads:
            thread.join(15)
    with tally.lock:
        failed = sum(tally.failed.values())
        return {
            "reloads": args.swaps, "reloads_took": took,
            "keep_alive": {"clients": args.clients, "think_s": args.think,
                           "requests": tally.requests, "failed": failed,
                           "failed_per_1000": round(1000 * failed / max(tally.requests, 1), 1),
                           "failures": dict(tally.failed)},
            "websocket": {"messages": tally.ws_messages, "closes": dict(tally.ws_closes),
                          "connections": tally.ws_connections,
                          "one_connection_throughout": tally.ws_connections == 1
                          and not tally.ws_closes},
            "versions_seen": len(tally.versions),
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--swaps", type=int, default=10)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--think", type=float, default=0.6)
    parser.add_argument("--contenders", default="hotsup,gunicorn_hup,uvicorn_reload")
    args = parser.parse_args(argv)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="hotsup-bench-conn-") as tmp:
        for name in args.contenders.split(","):
            results[name] = run_contender(name, args, Path(tmp))
    mine = results.get("hotsup", {})
    compare = {}
    for peer, theirs in results.items():
        if peer == "hotsup" or "keep_alive" not in theirs or "keep_alive" not in mine:
            continue
        compare[peer] = {
            "keep_alive_failed_per_1000": [mine["keep_alive"]["failed_per_1000"],
                                           theirs["keep_alive"]["failed_per_1000"]],
            "websocket_closes": [sum(mine["websocket"]["closes"].values()),
                                 sum(theirs["websocket"]["closes"].values())],
        }
    print(json.dumps({"benchmark": "connections", "date": time.strftime("%Y-%m-%d"),
                      "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                  "loadavg_1m": os.getloadavg()[0]},
                      "results": results, "compare": compare}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
