"""Long responses at a swap, end to end: a real ``hotsup start``, a Starlette
app, raw clients.

* an SSE stream is ended cleanly at the pause (the terminating chunk), and a
  client that reconnects with Last-Event-ID gets the next ids from the new
  generation: none repeats, none is skipped, no stream is broken;
* a BackgroundTask still running when the swap begins is waited for: its
  effect is in the state the new generation gets;
* a download in flight at a swap arrives whole.
"""

from __future__ import annotations

import http.client
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from harness import Hotsup, free_port, save, wait_for

pytestmark = pytest.mark.timeout(90)

MakeHotsup = Callable[..., Hotsup]


def source(tag: str) -> str:
    return f'''
import asyncio

from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.responses import PlainTextResponse, StreamingResponse
from starlette.routing import Route

TAG = {tag!r}
state = {{"jobs": 0}}


def hotsup_snapshot():
    return dict(state)


def hotsup_restore(saved):
    state.update(saved)


async def events(request):
    first = int(request.headers.get("last-event-id", "-1")) + 1

    async def stream():
        number = first
        while True:
            yield f"id: {{number}}\\ndata: {{TAG}}\\n\\n"
            number += 1
            await asyncio.sleep(0.05)

    return StreamingResponse(stream(), media_type="text/event-stream")


async def job(request):
    async def work():
        print("job started", flush=True)
        await asyncio.sleep(2.0)
        state["jobs"] += 1
        print("job done", flush=True)

    return PlainTextResponse("queued", background=BackgroundTask(work))


async def jobs(request):
    return PlainTextResponse(f"jobs={{state['jobs']}} tag={{TAG}}")


async def download(request):
    async def body():
        print("download started", flush=True)
        for _ in range(30):
            yield b"x" * 1000
            await asyncio.sleep(0.1)

    return StreamingResponse(body(), media_type="application/octet-stream",
                             headers={{"content-length": "30000"}})


app = Starlette(routes=[Route("/events", events), Route("/job", job, methods=["POST"]),
                        Route("/jobs", jobs), Route("/download", download)])
'''


def start(hotsup: MakeHotsup) -> tuple[Hotsup, int]:
    sup = hotsup()
    port = free_port()
    directory = sup.bundles / "web"
    directory.mkdir(parents=True)
    (directory / "bundle.toml").write_text(
        f'entry = "app:app"\nkind = "asgi"\n[sockets.http]\nbind = "127.0.0.1:{port}"\n')
    (directory / "app.py").write_text(source("v0"))
    sup.start_serving("web")
    return sup, port


def edit(sup: Hotsup, tag: str) -> None:
    save(sup.bundles / "web" / "app.py", source(tag))


def get(port: int, path: str, method: str = "GET") -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        conn.request(method, path)
        return conn.getresponse().read().decode()
    finally:
        conn.close()


@dataclass
class SseClient:
    """An EventSource as browsers make it: on a clean end, reconnect with
    Last-Event-ID. ``ids`` are the ids received with their data (the tag)."""

    port: int
    ids: list[tuple[int, str]] = field(default_factory=list)
    clean_ends: int = 0
    broken: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self._stream()
            except OSError as exc:
                self.broken.append(repr(exc))
                return

    def _stream(self) -> None:
        last = f"Last-Event-ID: {self.ids[-1][0]}\r\n" if self.ids else ""
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
            sock.sendall(f"GET /events HTTP/1.1\r\nHost: x\r\n{last}\r\n".encode())
            data = b""
            while not self.stop.is_set():
                chunk = sock.recv(65536)
                if not chunk:
                    if data.endswith(b"0\r\n\r\n"):
                        self.clean_ends += 1
                    else:
                        self.broken.append(f"stream broken: {data[-60:]!r}")
                    return
                data += chunk
                for number, tag in re.findall(rb"id: (\d+)\ndata: (\w+)\n\n", chunk):
                    self.ids.append((int(number), tag.decode()))


def test_an_sse_client_reconnects_to_the_new_generation_with_its_last_event_id(
        hotsup: MakeHotsup) -> None:
    sup, port = start(hotsup)
    client = SseClient(port)
    thread = threading.Thread(target=client.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: len(client.ids) >= 5, what="the first events")
        edit(sup, "v1")
        swapped = sup.wait_log(r"web@2: swapped from web@1 in [\d.]+ ms \(hand-over, paused "
                               r"([\d.]+) ms\)")
        wait_for(lambda: sum(tag == "v1" for _, tag in client.ids) >= 5,
                 what="events from the new generation")
    finally:
        client.stop.set()
        thread.join(15)
    assert not client.broken, client.broken
    assert client.clean_ends == 1
    numbers = [number for number, _ in client.ids]
    assert numbers == list(range(numbers[0], numbers[0] + len(numbers))), "repeated or skipped"
    tags = [tag for _, tag in client.ids]
    assert tags == sorted(tags), "old code answered after new code"
    assert float(swapped) < 1000, f"the open stream held the pause {swapped} ms"
    assert sup.stop() == 0


def test_a_background_task_running_at_a_swap_is_carried(hotsup: MakeHotsup) -> None:
    sup, port = start(hotsup)
    assert get(port, "/job", "POST") == "queued"
    sup.wait_log(r"web@1: job started")
    edit(sup, "v1")
    sup.wait_log(r"web@2: swapped from web@1")
    log = sup.log()
    assert log.index("web@1: ready -> paused") < log.index("web@1: job done"), (
        "the swap began only after the job: nothing was tested")
    assert get(port, "/jobs") == "jobs=1 tag=v1"
    assert sup.stop() == 0


def test_a_download_in_flight_at_a_swap_arrives_whole(hotsup: MakeHotsup) -> None:
    sup, port = start(hotsup)
    result: list[str] = []
    thread = threading.Thread(target=lambda: result.append(get(port, "/download")))
    thread.start()
    sup.wait_log(r"web@1: download started")
    started = time.monotonic()
    edit(sup, "v1")
    sup.wait_log(r"web@2: swapped from web@1")
    thread.join(20)
    assert result == ["x" * 30000]
    assert time.monotonic() - started < 15
    assert get(port, "/jobs") == "jobs=0 tag=v1"
    assert sup.stop() == 0
