"""asgi bundles end to end: a real ``hotsup start``, real HTTP clients, real edits.

The app under test is a plain ASGI counter (no framework): ``POST /incr`` adds
one and answers ``count=N generation=G tag=T``. Its count is carried across
swaps by the module-level ``hotsup_snapshot``/``hotsup_restore`` hooks, so a
request lost, refused, answered twice or answered by old code after the
snapshot shows as a failure or as a gap or duplicate in the counts.
"""

from __future__ import annotations

import http.client
import re
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from harness import Hotsup, Load, free_port, save

pytestmark = pytest.mark.timeout(120)

MakeHotsup = Callable[..., Hotsup]


def asgi_source(tag: str, *, hooks: bool = True, lifespan: bool = True, startup: str = "pass",
                factory: bool = False, tail: str = "") -> str:
    """A counter app module; ``startup`` is a line run in its lifespan startup."""
    lines = [
        "import asyncio",
        "",
        f"TAG = {tag!r}",
        "count = 0",
        "",
    ]
    if hooks:
        lines += [
            "def hotsup_snapshot():",
            '    return {"count": count}',
            "",
            "def hotsup_restore(state):",
            "    global count",
            '    count = state["count"]',
            "",
        ]
    lines += [
        "async def app(scope, receive, send):",
        "    global count",
    ]
    if lifespan:
        lines += [
            '    if scope["type"] == "lifespan":',
            "        while True:",
            "            message = await receive()",
            '            if message["type"] == "lifespan.startup":',
            f"                {startup}",
            '                print(f"lifespan startup {TAG}", flush=True)',
            '                await send({"type": "lifespan.startup.complete"})',
            "            else:",
            '                print(f"lifespan shutdown {TAG}", flush=True)',
            '                await send({"type": "lifespan.shutdown.complete"})',
            "                return",
        ]
    else:
        lines += ['    assert scope["type"] == "http", "no lifespan here"']
    lines += [
        "    more = True",
        "    while more:",
        "        message = await receive()",
        '        more = message.get("more_body", False)',
        '    if scope["path"] == "/incr":',
        "        count += 1",
        '    if scope["path"] == "/slow":',
        '        print("slow request accepted", flush=True)',
        "        await asyncio.sleep(1.0)",
        '    gen = scope["state"]["hotsup"].generation',
        '    body = f"count={count} generation={gen} tag={TAG}\\n".encode()',
        '    await send({"type": "http.response.start", "status": 200,',
        '                "headers": [(b"content-length", str(len(body)).encode())]})',
        '    await send({"type": "http.response.body", "body": body})',
        "",
    ]
    if factory:
        lines += ["def make_app():", "    return app", ""]
    return "\n".join(lines) + tail


def write_asgi(sup: Hotsup, source: str, port: int, entry: str = "app:app",
               extra: str = "", socket_name: str = "http") -> None:
    directory = sup.bundles / "web"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "bundle.toml").write_text(
        f'entry = "{entry}"\nkind = "asgi"\n{extra}\n'
        f'[sockets.{socket_name}]\nbind = "127.0.0.1:{port}"\n')
    (directory / "app.py").write_text(source)


def edit(sup: Hotsup, source: str) -> None:
    save(sup.bundles / "web" / "app.py", source)


def start_web(hotsup: MakeHotsup, source: str, config_extra: str = "",
              **bundle: str) -> tuple[Hotsup, int]:
    sup = hotsup(config_extra)
    port = free_port()
    write_asgi(sup, source, port, **bundle)
    sup.start_serving("web")
    return sup, port


def get(port: int, path: str = "/") -> tuple[int, str, dict[str, str]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        headers = {k.lower(): v for k, v in response.getheaders()}
        return response.status, response.read().decode(), headers
    finally:
        conn.close()


@dataclass
class HttpLoad(Load):
    """``clients`` threads POSTing ``/incr``: short-lived connections (one request
    each) or keep-alive ones (reused until the server answers ``Connection:
    close``).

    A keep-alive client checks, as urllib3 does, that the server did not close
    its idle connection before reusing it (``dropped``). Any error, timeout or
    non-200 answer is a failure.
    """

    keep_alive: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        self._local = threading.local()
        self._stats = threading.Lock()
        self.connections = 0  # connections opened
        self.closed_by_server = 0  # replies that carried Connection: close
        self.dropped = 0  # idle connections found closed before reuse

    def _client(self, index: int) -> None:
        try:
            super()._client(index)
        finally:
            conn = getattr(self._local, "conn", None)
            if conn is not None:
                conn.close()

    def ask(self, index: int) -> str:
        conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
        if conn is not None and conn.sock is not None and _readable(conn.sock):
            conn.close()  # closed by the server while idle: not reusable
            with self._stats:
                self.dropped += 1
        if conn is None or conn.sock is None:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
            conn.connect()
            self._local.conn = conn
            with self._stats:
                self.connections += 1
        try:
            headers = {} if self.keep_alive else {"Connection": "close"}
            conn.request("POST", "/incr", headers=headers)
            response = conn.getresponse()
            body = response.read().decode()
        except http.client.HTTPException as exc:
            conn.close()
            raise ValueError(f"{type(exc).__name__}: {exc}") from None
        except OSError:
            conn.close()
            raise
        if response.will_close:
            conn.close()
            if self.keep_alive:
                with self._stats:
                    self.closed_by_server += 1
        if response.status != 200:
            raise ValueError(f"status {response.status}: {body!r}")
        return body.strip()


def _readable(sock: socket.socket) -> bool:
    return bool(select.select([sock], [], [], 0)[0])


def swap_under_load(sup: Hotsup, load: Load, swaps: int, **source: Any) -> None:
    """``swaps`` edits, each one served (seen in a reply) before the next."""
    load.wait_reply(lambda r: r.tag == "v0")
    for i in range(1, swaps + 1):
        written = time.monotonic()
        edit(sup, asgi_source(f"v{i}", **source))
        load.wait_reply(lambda r, tag=f"v{i}": r.tag == tag, after=written)


# -- swaps under load ---------------------------------------------------------------


def test_hand_over_swaps_under_load_lose_no_request_and_no_count(hotsup: MakeHotsup) -> None:
    sup, port = start_web(hotsup, asgi_source("v0"))
    swaps = 10
    with HttpLoad(port, clients=2) as short, HttpLoad(port, clients=2, keep_alive=True) as keep:
        swap_under_load(sup, short, swaps)
        keep.wait_reply(lambda r: r.tag == f"v{swaps}")
    for load in (short, keep):
        assert not load.failures, load.failures[:5]
        assert {r.tag for r in load.replies} >= {f"v{swaps}"}
    # One counter, two sets of clients: every count exactly once across both.
    counts = sorted(r.count for r in short.replies + keep.replies)
    assert counts == list(range(1, len(counts) + 1)), _first_gap(counts)
    assert max(r.generation for r in keep.replies) == swaps + 1
    assert {r.tag for r in short.replies} == {f"v{i}" for i in range(swaps + 1)}
    # The keep-alive clients' connections moved to each new generation: none
    # was told to close, none was closed under its client.
    assert (keep.closed_by_server, keep.dropped) == (0, 0)
    assert sup.log().count("(hand-over") == swaps
    assert len(re.findall(r"connection\(s\) carried from", sup.log())) == swaps
    assert sup.stop() == 0
    assert not sup.leftovers()


def test_overlap_swaps_with_keep_alive_clients(hotsup: MakeHotsup) -> None:
    sup, port = start_web(hotsup, asgi_source("v0", hooks=False))
    swaps = 5
    with HttpLoad(port, clients=3, keep_alive=True) as keep:
        swap_under_load(sup, keep, swaps, hooks=False)
    assert not keep.failures, keep.failures[:5]
    assert {r.tag for r in keep.replies} == {f"v{i}" for i in range(swaps + 1)}
    # Idle ones move to the successor; one busy when its generation lets go
    # is told to close with its response: never closed under its client.
    assert keep.dropped == 0, (keep.closed_by_server, keep.dropped)
    assert "connection(s) carried from" in sup.log()
    assert "overlap" in sup.wait_log(rf"web@{swaps + 1}: swapped from web@{swaps} .*")
    assert sup.stop() == 0


def test_an_idle_keep_alive_connection_moves_to_the_new_generation(
        hotsup: MakeHotsup) -> None:
    """Idle when the pause begins: the same connection's next request is
    answered by the new generation, with the state carried."""
    sup, port = start_web(hotsup, asgi_source("v0"))
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("POST", "/incr")
    first = conn.getresponse()
    assert first.read().startswith(b"count=1 generation=1")
    assert not first.will_close
    sock = conn.sock
    edit(sup, asgi_source("v1"))
    sup.wait_log(r"web@2: 1 connection\(s\) carried from web@1")
    conn.request("POST", "/incr")
    last = conn.getresponse()
    assert last.read().decode().startswith("count=2 generation=2 tag=v1")
    assert not last.will_close
    assert conn.sock is sock, "the same connection"
    conn.close()
    assert sup.stop() == 0


def test_a_keep_alive_client_may_think_as_long_as_it_likes(hotsup: MakeHotsup) -> None:
    """The old close after 0.5 s of silence is gone: a connection idle through
    a swap and well beyond is still open, and served by the new code."""
    sup, port = start_web(hotsup, asgi_source("v0"))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = b""
        while not reply.endswith(b"tag=v0\n"):
            reply += sock.recv(4096)
        assert b"generation=1" in reply and b"connection: close" not in reply
        edit(sup, asgi_source("v1"))
        sup.wait_log(r"web@2: swapped from web@1 .*hand-over")
        time.sleep(1.0)  # the client thinks (twice the grace it used to get)
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = b""
        while not reply.endswith(b"tag=v1\n"):
            chunk = sock.recv(4096)
            assert chunk, f"closed under its client: {reply!r}"
            reply += chunk
        assert b"count=0 generation=2" in reply
    assert sup.stop() == 0


def test_a_request_in_flight_finishes_before_the_hand_over(hotsup: MakeHotsup) -> None:
    sup, port = start_web(hotsup, asgi_source("v0"))
    result: list[tuple[int, str, dict[str, str]]] = []
    slow = threading.Thread(target=lambda: result.append(get(port, "/slow")))
    slow.start()
    sup.wait_log(r"web@1: slow request accepted")
    edit(sup, asgi_source("v1"))
    slow.join(15)
    status, body, headers = result[0]
    assert status == 200 and headers.get("connection") != "close"  # it moved, not ended
    assert body.startswith("count=0 generation=1 tag=v0")
    sup.wait_log(r"web@2: swapped from web@1")
    assert sup.stop() == 0


# -- lifespan, factory, apps without lifespan ---------------------------------------


def test_lifespan_startup_runs_before_loaded_and_shutdown_at_retirement(
        hotsup: MakeHotsup) -> None:
    sup, port = start_web(hotsup, asgi_source("v0"))
    sup.wait_log(r"web@1: lifespan startup v0")
    edit(sup, asgi_source("v1"))
    sup.wait_log(r"web@1: retired")
    log = sup.log()
    # step 1 (startup of the new generation) comes before the swap; the old
    # generation's shutdown after it, before it exits
    assert (log.index("web@2: lifespan startup v1") < log.index("web@2: swapped from web@1")
            < log.index("web@1: lifespan shutdown v0") < log.index("web@1: retired"))
    assert get(port)[1].startswith("count=0 generation=2 tag=v1")
    assert sup.stop() == 0
    sup.wait_log(r"web@2: lifespan shutdown v1")


def test_lifespan_state_and_ctx_reach_requests(hotsup: MakeHotsup) -> None:
    app = asgi_source("v0", startup='scope["state"]["greeting"] = "hej"').replace(
        "tag={TAG}", "tag={TAG}-{scope['state']['greeting']}")
    sup, port = start_web(hotsup, app)
    assert get(port)[1] == "count=0 generation=1 tag=v0-hej\n"
    assert sup.stop() == 0


def test_factory_is_called_for_the_app(hotsup: MakeHotsup) -> None:
    sup, port = start_web(hotsup, asgi_source("v0", factory=True), entry="app:make_app",
                          extra="factory = true")
    status, body, headers = get(port, "/incr")
    assert (status, body) == (200, "count=1 generation=1 tag=v0\n")
    assert "date" in headers and headers["server"] == "uvicorn"
    assert sup.stop() == 0


def test_an_app_without_lifespan_support_is_served_on_its_only_socket(
        hotsup: MakeHotsup) -> None:
    sup, port = start_web(hotsup, asgi_source("v0", lifespan=False), socket_name="web")
    sup.wait_log(r"web@1: the app does not use ASGI lifespan events \(AssertionError")
    assert get(port, "/incr")[1] == "count=1 generation=1 tag=v0\n"
    edit(sup, asgi_source("v1", lifespan=False))
    sup.wait_log(r"web@2: swapped from web@1")
    assert get(port, "/incr")[1] == "count=2 generation=2 tag=v1\n"
    assert sup.stop() == 0


def test_access_and_error_logs_reach_the_supervisor_tagged(hotsup: MakeHotsup) -> None:
    app = asgi_source("v0").replace('    if scope["path"] == "/slow":',
                                    '    if scope["path"] == "/boom":\n'
                                    '        raise RuntimeError("kaboom")\n'
                                    '    if scope["path"] == "/slow":')
    sup, port = start_web(hotsup, app)
    assert get(port, "/boom")[0] == 500
    sup.wait_log(r'INFO\s+web@1: 127\.0\.0\.1:\d+ - "GET /boom HTTP/1\.1" 500')
    sup.wait_log(r"ERROR\s+web@1: Exception in ASGI application")
    sup.wait_log(r"web@1: .*RuntimeError: kaboom")
    assert sup.stop() == 0


# -- broken upgrades ------------------------------------------------------------------

BAD_UPGRADES: dict[str, dict[str, Any]] = {
    "import error": dict(tail="\nimport no_such_module_here\n"),
    "syntax error": dict(tail="\ndef broken(:\n"),
    "lifespan startup raises": dict(startup="raise RuntimeError('startup exploded')"),
    "lifespan startup fails": dict(
        startup="await send({'type': 'lifespan.startup.failed', 'message': 'no db'}); return"),
}


@pytest.mark.parametrize("fault", list(BAD_UPGRADES))
def test_a_broken_upgrade_rolls_back_under_load(hotsup: MakeHotsup, fault: str) -> None:
    sup, port = start_web(hotsup, asgi_source("v0"))
    with HttpLoad(port, clients=2) as short, HttpLoad(port, clients=2, keep_alive=True) as keep:
        short.wait_reply(lambda r: r.tag == "v0")
        keep.wait_reply(lambda r: r.tag == "v0")
        edit(sup, asgi_source("bad", **BAD_UPGRADES[fault]))
        line = sup.wait_log(r"swap to web@2 rolled back, web@1 keeps serving.*")
        rolled_back = time.monotonic()
        for load in (short, keep):
            load.wait_reply(lambda r: r.generation == 1, after=rolled_back)
        written = time.monotonic()
        edit(sup, asgi_source("fixed"))
        short.wait_reply(lambda r: r.tag == "fixed", after=written)
    for load in (short, keep):
        assert not load.failures, load.failures[:5]
        assert not any(r.tag == "bad" for r in load.replies)
    counts = sorted(r.count for r in short.replies + keep.replies)
    assert counts == list(range(1, len(counts) + 1)), _first_gap(counts)
    expected = {"import error": "ModuleNotFoundError", "syntax error": "SyntaxError",
                "lifespan startup raises": "startup exploded",
                "lifespan startup fails": "LifespanFailed: no db"}[fault]
    assert expected in line, line
    assert sup.stop() == 0


def test_a_bundle_that_is_not_an_app_fails_to_load_with_a_message(hotsup: MakeHotsup) -> None:
    sup = hotsup()
    port = free_port()
    write_asgi(sup, asgi_source("v0") + "\nnot_an_app = 42\n", port, entry="app:not_an_app")
    sup.start()
    line = sup.wait_log(r"web: web@1 did not start: .*")
    assert "TypeError: app:not_an_app is 42, which is not an ASGI application" in line, line
    assert sup.stop() == 0


def _first_gap(counts: list[int]) -> str:
    for expected, got in enumerate(counts, start=1):
        if expected != got:
            return f"expected count {expected}, got {got} (of {len(counts)} replies)"
    return "ok"
