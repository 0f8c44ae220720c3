"""``[supervisor] metrics``: /metrics parsed with prometheus-client's own parser
after real swaps and a rollback; /readyz and /healthz as probes see them; the
endpoint's bounds."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from harness import Hotsup, counter_source, free_port, request, save, wait_for
from hotsup.supervisor.metrics import MAX_CONNECTIONS, MAX_REQUEST
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.timeout(120)

MakeHotsup = Callable[..., Hotsup]


def get(port: int, path: str, method: str = "GET") -> tuple[int, str, dict[str, str]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        return response.status, response.read().decode(), dict(response.getheaders())
    finally:
        conn.close()


def samples(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    status, text, headers = get(port, "/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def value(found: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
          **labels: str) -> float | None:
    return found.get((name, frozenset(labels.items())))


def start(hotsup: MakeHotsup) -> tuple[Hotsup, int, int, Path]:
    metrics = free_port()
    sup = hotsup(f'metrics = "127.0.0.1:{metrics}"\n')
    port = free_port()
    directory = sup.bundles / "counter"
    directory.mkdir()
    (directory / "bundle.toml").write_text(
        f'entry = "counter:Counter"\nprobation = 0\n[sockets.main]\nbind = "127.0.0.1:{port}"\n')
    (directory / "counter.py").write_text(counter_source("v0"))
    sup.start()
    sup.wait_log(r"counter@1: serving")
    return sup, port, metrics, directory


def test_metrics_count_swaps_and_rollbacks(hotsup: MakeHotsup) -> None:
    sup, port, metrics, directory = start(hotsup)
    sup.wait_log(rf"metrics on http://127\.0\.0\.1:{metrics}/metrics")
    for i, tag in enumerate(["v1", "v2"], start=2):
        save(directory / "counter.py", counter_source(tag))
        sup.wait_log(rf"counter@{i}: swapped from")
    # A crash restart (counter@4, from the last checkpoint)...
    pid = json.loads(sup.cli("status", "--json").stdout)["bundles"][0]["pid"]
    os.kill(pid, signal.SIGKILL)
    sup.wait_log(r"counter@4: serving")
    # ... and a swap rolled back.
    save(directory / "counter.py", counter_source("v3", init="raise RuntimeError('no')"))
    sup.wait_log(r"swap to counter@5 rolled back")
    assert request(port, "incr").startswith("count=1 generation=4 tag=v2")

    found = samples(metrics)
    assert value(found, "hotsup_swaps_total", bundle="counter", result="swapped") == 2
    assert value(found, "hotsup_swaps_total", bundle="counter", result="rolled_back") == 1
    assert value(found, "hotsup_swaps_total", bundle="counter", result="started") == 1
    assert value(found, "hotsup_swaps_total", bundle="counter", result="restarted") == 1
    assert value(found, "hotsup_swaps_total", bundle="counter", result="failed") == 0
    assert value(found, "hotsup_swap_duration_seconds_count", bundle="counter") == 2
    assert value(found, "hotsup_swap_duration_seconds_bucket", bundle="counter",
                 le="+Inf") == 2
    total = value(found, "hotsup_swap_duration_seconds_sum", bundle="counter")
    assert total is not None and 0 < total < 20
    pause = value(found, "hotsup_last_pause_seconds", bundle="counter")
    assert pause is not None and 0 < pause < 5  # hand-over: it paused
    assert value(found, "hotsup_restarts_total", bundle="counter") == 1
    assert value(found, "hotsup_bundle_generation", bundle="counter") == 4
    assert value(found, "hotsup_bundle_state", bundle="counter", state="running") == 1
    assert value(found, "hotsup_bundle_state", bundle="counter", state="failed") == 0
    assert value(found, "hotsup_bundle_log_dropped", bundle="counter") == 0
    size = value(found, "hotsup_checkpoint_bytes", bundle="counter")
    assert size is not None and size > 0  # every hand-over keeps a checkpoint
    age = value(found, "hotsup_checkpoint_age_seconds", bundle="counter")
    assert age is not None and 0 <= age < 60
    assert value(found, "hotsup_bundles") == 1
    # The same figures as `hotsup status` (both read the runner's status()).
    assert '"swaps": 2' in sup.cli("status", "--json").stdout

    assert sup.stop() == 0


def test_readyz_is_503_while_a_bundle_is_failed_and_200_once_fixed(hotsup: MakeHotsup) -> None:
    sup, _, metrics, _ = start(hotsup)
    assert get(metrics, "/readyz")[:2] == (200, "1 bundle(s) serving\n")
    broken = sup.bundles / "broken"
    broken.mkdir()
    (broken / "bundle.toml").write_text(
        f'entry = "app:Counter"\nmax_restarts = 1\n'
        f'[sockets.main]\nbind = "127.0.0.1:{free_port()}"\n')
    (broken / "app.py").write_text(counter_source("b0", init="raise RuntimeError('boom')"))
    sup.wait_log(r"broken.*RuntimeError: boom")
    # 503 while it is retried ("broken starting"), then once it gave up:
    body = wait_for(lambda: (r := get(metrics, "/readyz"))[0] == 503
                    and r[1].startswith("broken failed (") and r[1],
                    what="/readyz 503: broken failed")
    assert "boom" in str(body), body
    assert get(metrics, "/healthz")[:2] == (200, "ok\n")  # the supervisor itself is fine
    found = samples(metrics)
    assert value(found, "hotsup_bundle_state", bundle="broken", state="failed") == 1
    save(broken / "app.py", counter_source("b1"))
    sup.wait_log(r"broken@\d+: serving")
    wait_for(lambda: get(metrics, "/readyz")[0] == 200, what="/readyz 200 after the fix")
    assert get(metrics, "/readyz")[1] == "2 bundle(s) serving\n"
    assert sup.stop() == 0


def test_the_endpoint_is_bounded(hotsup: MakeHotsup) -> None:
    sup, _, metrics, _ = start(hotsup)
    assert get(metrics, "/nothing")[0] == 404
    assert get(metrics, "/metrics", method="POST")[0] == 405
    status, body, _ = get(metrics, "/healthz", method="HEAD")
    assert (status, body) == (200, "")
    # A request head larger than MAX_REQUEST is refused, not read on and on.
    with socket.create_connection(("127.0.0.1", metrics), timeout=10) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\n" + b"X-Pad: " + b"a" * 200 + b"\r\n")
        head = b"".join(b"X-%d: %s\r\n" % (i, b"b" * 100) for i in range(MAX_REQUEST // 100))
        with contextlib.suppress(ConnectionError):  # closed on us while we sent: refused
            sock.sendall(head + b"\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 400")
    # At most MAX_CONNECTIONS at once: the next is answered 503 and closed.
    idle = [socket.create_connection(("127.0.0.1", metrics), timeout=10)
            for _ in range(MAX_CONNECTIONS)]
    try:
        wait_for(lambda: _answer(metrics).startswith(b"HTTP/1.1 503"),
                 what="503 beyond MAX_CONNECTIONS")
    finally:
        for sock in idle:
            sock.close()
    wait_for(lambda: get(metrics, "/healthz")[0] == 200, what="served again")
    assert sup.stop() == 0


def test_a_metrics_port_in_use_stops_the_start_with_the_key_named(hotsup: MakeHotsup) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        sup = hotsup(f'metrics = "127.0.0.1:{port}"\n')
        sup.start()
        assert sup.proc is not None
        assert sup.proc.wait(30) == 2
    assert f"{sup.config}: supervisor.metrics: cannot bind 127.0.0.1:{port}" in sup.log()


@pytest.mark.parametrize(("text", "problem"), [
    ('"unix:/tmp/m.sock"', 'expected "HOST:PORT"'),
    ("9100", "expected a string, got 9100"),
    ('"127.0.0.1:99999"', 'port "99999" is not a number from 0 to 65535'),
    ('"metrics.example:9100"', 'host "metrics.example" is not an IP address'),
])
def test_bad_metrics_addresses_are_config_errors(tmp_path: Path, text: str,
                                                 problem: str) -> None:
    sup = Hotsup(tmp_path, f"metrics = {text}\n")
    result = sup.cli("check", str(sup.config))
    assert result.returncode == 1
    assert f"{sup.config}: supervisor.metrics: " in result.stderr
    assert problem in result.stderr, result.stderr


def _answer(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\n\r\n")
        deadline = time.monotonic() + 5
        data = b""
        while time.monotonic() < deadline and not data.endswith(b"\n"):
            chunk = sock.recv(100)
            if not chunk:
                break
            data += chunk
        return data


def test_check_reports_a_metrics_address_a_bundle_binds(tmp_path: Path) -> None:
    port = free_port()
    sup = Hotsup(tmp_path, f'metrics = "127.0.0.1:{port}"\n')
    directory = sup.bundles / "counter"
    directory.mkdir()
    (directory / "bundle.toml").write_text(
        f'entry = "counter:Counter"\n[sockets.main]\nbind = "127.0.0.1:{port}"\n')
    (directory / "counter.py").write_text(counter_source("v0"))
    result = sup.cli("check", str(sup.config))
    assert result.returncode == 1
    assert (f"{sup.config}: supervisor.metrics: 127.0.0.1:{port} is also a socket of "
            "bundle 'counter'") in result.stderr, result.stderr
