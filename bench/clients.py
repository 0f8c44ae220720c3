"""The benchmarks' client load on a line-protocol counter, and readiness probes.

``Load`` runs K client threads on 127.0.0.1, each looping connect / ``incr`` /
read one line / close until stopped. A reply is parsed with a regular
expression that has two named groups: ``count`` (the counter's value) and
``mark`` (what tells the server's code versions apart: a tag, a generation).
A client that fails waits 10 ms before its next request (no busy spinning), so
failures count attempts, not seconds of downtime.
"""

from __future__ import annotations

import re
import socket
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

HOST = "127.0.0.1"
CLIENT_TIMEOUT = 10.0
START_DEADLINE = 30.0
FAIL_PAUSE = 0.010


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


@dataclass
class Reply:
    t: float
    count: int
    tag: str  # the reply's ``mark`` group
    client: int


@dataclass
class Load:
    """K client threads: connect, ``incr``, read one line, close, until stopped."""

    port: int
    clients: int
    reply: re.Pattern[bytes]
    replies: list[Reply] = field(default_factory=list)
    failures: Counter[str] = field(default_factory=Counter)
    first_seen: dict[str, float] = field(default_factory=dict)
    cond: threading.Condition = field(default_factory=threading.Condition)
    stop_event: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        for i in range(self.clients):
            thread = threading.Thread(target=self._client, args=(i,), name=f"client-{i}",
                                      daemon=True)
            self.threads.append(thread)
            thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        for thread in self.threads:
            thread.join(CLIENT_TIMEOUT + 5)

    @property
    def requests(self) -> int:
        with self.cond:
            return len(self.replies) + sum(self.failures.values())

    def wait_tag(self, tag: str, deadline: float) -> float | None:
        """The monotonic time of the first reply carrying ``tag``; None past the deadline."""
        with self.cond:
            while tag not in self.first_seen:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.cond.wait(left)
            return self.first_seen[tag]

    def _client(self, index: int) -> None:
        while not self.stop_event.is_set():
            kind, reply = self._one(index)
            with self.cond:
                if reply is not None:
                    self.replies.append(reply)
                    if reply.tag not in self.first_seen:
                        self.first_seen[reply.tag] = reply.t
                        self.cond.notify_all()
                else:
                    self.failures[kind] += 1
            if reply is None:
                self.stop_event.wait(FAIL_PAUSE)

    def _one(self, index: int) -> tuple[str, Reply | None]:
        try:
            with socket.create_connection((HOST, self.port), timeout=CLIENT_TIMEOUT) as sock:
                sock.sendall(b"incr\n")
                data = b""
                while not data.endswith(b"\n"):
                    chunk = sock.recv(4096)
                    if not chunk:
                        break
                    data += chunk
            now = time.monotonic()
        except ConnectionRefusedError:
            return "refused", None
        except (ConnectionResetError, BrokenPipeError, ConnectionAbortedError):
            return "reset", None
        except TimeoutError:
            return "timeout", None
        except OSError as exc:
            return f"oserror:{exc.errno}", None
        match = self.reply.search(data)
        if not data.endswith(b"\n") or match is None:
            return "bad_reply", None
        return "", Reply(now, int(match["count"]), match["mark"].decode(), index)


def ask(port: int, line: bytes, timeout: float = 1.0) -> bytes:
    """One request on a fresh connection: the reply line (b"" if none came)."""
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        sock.sendall(line)
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    return data


def probe(port: int, reply: re.Pattern[bytes]) -> bool:
    """True once the port answers a ``get`` with a well-formed reply."""
    try:
        return reply.search(ask(port, b"get\n")) is not None
    except OSError:
        return False


def wait_serving(port: int, proc: subprocess.Popen[bytes], what: str,
                 reply: re.Pattern[bytes]) -> None:
    deadline = time.monotonic() + START_DEADLINE
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode} before serving")
        if probe(port, reply):
            return
        time.sleep(0.02)
    raise RuntimeError(f"{what} did not answer on port {port} within {START_DEADLINE:g}s")
