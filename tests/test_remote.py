"""Remote push and remote control over real CURVE on 127.0.0.1, against a real
``hotsup start``; keys made by ``hotsup keygen``."""

from __future__ import annotations

import os
import queue
import re
import resource
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from harness import (
    DEADLINE,
    Hotsup,
    counter_source,
    free_port,
    request,
    save,
    wait_for,
    write_bundle,
)
from hotsup.supervisor.control import ControlError, RemoteClient

pytestmark = pytest.mark.timeout(90)

HOTSUP = [sys.executable, "-m", "hotsup.supervisor.cli"]


@dataclass
class Remote:
    sup: Hotsup
    endpoint: str
    keys: Path  # every key pair, the server's too
    laptop: Path  # the developer's side: bundle directories to push

    def run(self, *args: str, key: str = "alice", server_key: str = "server",
            timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """``hotsup ARGS --to ... --key ... --server-key ...`` to its end."""
        return subprocess.run([*HOTSUP, *args, *self.flags(key, server_key)], cwd=self.laptop,
                              capture_output=True, text=True, timeout=timeout)

    def flags(self, key: str = "alice", server_key: str = "server") -> list[str]:
        return ["--to", self.endpoint, "--key", str(self.keys / f"{key}.key_secret"),
                "--server-key", str(self.keys / f"{server_key}.key")]

    def client(self, key: str = "alice") -> RemoteClient:
        return RemoteClient(self.endpoint, str(self.keys / f"{key}.key_secret"),
                            str(self.keys / "server.key"))

    def bundle(self, name: str, tag: str, port: int) -> Path:
        return write_bundle(self.laptop / name, counter_source(tag), port)


def keygen(directory: Path, name: str) -> None:
    subprocess.run([*HOTSUP, "keygen", name, "--dir", str(directory)], check=True,
                   capture_output=True, timeout=30)


def remote_config(tmp_path: Path) -> tuple[str, Path, str]:
    """Keys for server, alice, bob and mallory (alice and bob authorized) under
    ``tmp_path``; the ``[remote]`` table for them, the keys' directory, the endpoint."""
    keys = tmp_path / "keys"
    for name in ("server", "alice", "bob", "mallory"):
        keygen(keys, name)
    authorized = tmp_path / "authorized"
    authorized.mkdir(mode=0o700)
    for name in ("alice", "bob"):  # not mallory
        (authorized / f"{name}.key").write_bytes((keys / f"{name}.key").read_bytes())
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    return f"""
[remote]
bind = "{endpoint}"
key = "keys/server.key_secret"
authorized_keys = "authorized"
rate_limit = 50
[remote.allow]
bob = ["api"]
""", keys, endpoint


@pytest.fixture
def remote(hotsup: Callable[..., Hotsup], tmp_path: Path) -> Iterator[Remote]:
    config, keys, endpoint = remote_config(tmp_path)
    sup = hotsup(config).start()
    sup.wait_log(r"remote: listening on tcp://127\.0\.0\.1:\d+")
    laptop = tmp_path / "laptop"
    laptop.mkdir()
    yield Remote(sup, endpoint, keys, laptop)
    assert sup.stop() == 0


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts}


def test_a_new_bundle_is_pushed_started_and_swapped_with_its_state(remote: Remote) -> None:
    port = free_port()
    local = remote.bundle("api", "one", port)
    done = remote.run("push", str(local))
    assert done.returncode == 0, done.stderr
    assert "api: started" in done.stdout
    assert request(port) == "count=1 generation=1 tag=one"
    assert _tree(remote.sup.bundles / "api") == _tree(local)

    save(local / "counter.py", counter_source("two"))
    done = remote.run("push", str(local))
    assert done.returncode == 0, done.stderr
    assert "api: swapped" in done.stdout
    assert request(port) == "count=2 generation=2 tag=two"  # new code, the count carried
    assert _tree(remote.sup.bundles / "api") == _tree(local)
    # Only the changed file travelled, and each request has its audit line.
    size = (local / "counter.py").stat().st_size
    remote.sup.wait_log(rf"remote: alice: push_files \({size} bytes\)")
    remote.sup.wait_log(r"remote: alice: push api \(2 file\(s\), \d+ bytes\)", count=2)
    remote.sup.wait_log(r"remote: alice: push_commit", count=2)
    # The runner swapped once for the push (the watcher's event found nothing new).
    assert remote.sup.log().count("api@2: swapped from api@1") == 1
    assert not any((remote.sup.bundles / ".hotsup-push").iterdir())  # staging cleaned

    again = remote.run("push", str(local))
    assert again.returncode == 0 and "unchanged" in again.stdout
    assert "api@3" not in remote.sup.log()


def test_a_broken_push_exits_1_shows_the_error_and_the_old_code_serves(remote: Remote) -> None:
    port = free_port()
    local = remote.bundle("api", "one", port)
    assert remote.run("push", str(local)).returncode == 0
    assert request(port) == "count=1 generation=1 tag=one"
    save(local / "counter.py", counter_source("two") + "\ndef broken(:\n")
    done = remote.run("push", str(local))
    assert done.returncode == 1, done.stdout
    assert "api: rolled back" in done.stderr and "SyntaxError" in done.stderr
    assert "counter.py" in done.stderr
    assert request(port) == "count=2 generation=1 tag=one"


def test_an_unknown_client_key_is_refused_and_nothing_changes(remote: Remote) -> None:
    local = remote.bundle("api", "one", free_port())
    before = sorted(os.listdir(remote.sup.bundles))
    done = remote.run("push", str(local), key="mallory")
    assert done.returncode == 3, done.stderr
    assert "not authorized: the supervisor refused this key" in done.stderr  # at once
    assert sorted(os.listdir(remote.sup.bundles)) == before
    remote.sup.wait_log(r"remote: refused a client key that is not in authorized_keys")
    status = remote.run("status", key="mallory")
    assert status.returncode == 3 and "not authorized" in status.stderr


def test_a_wrong_server_key_is_refused_by_the_client(remote: Remote) -> None:
    local = remote.bundle("api", "one", free_port())
    done = remote.run("push", str(local), server_key="mallory")  # not the supervisor's key
    assert done.returncode == 3, done.stderr
    assert "unreachable or not authorized" in done.stderr
    assert not (remote.sup.bundles / "api").exists()


def test_nobody_listening_is_unreachable(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    for name in ("server", "alice"):
        keygen(keys, name)
    done = subprocess.run(
        [*HOTSUP, "status", "--to", f"tcp://127.0.0.1:{free_port()}", "--key",
         str(keys / "alice.key_secret"), "--server-key", str(keys / "server.key")],
        capture_output=True, text=True, timeout=30)
    assert done.returncode == 3
    assert "unreachable or not authorized (no answer within 5s)" in done.stderr


def _files(sha: str = "0" * 64) -> dict[str, list[int | str]]:
    return {"bundle.toml": [sha, 1, 0o100644]}


CRAFTED = {
    "traversal": ({"../evil.py": ["0" * 64, 1, 0o100644]}, {}, "a path with '..'"),
    "deep traversal": ({"a/../../evil.py": ["0" * 64, 1, 0o100644]}, {}, "a path with '..'"),
    "absolute path": ({"/tmp/evil.py": ["0" * 64, 1, 0o100644]}, {}, "an absolute path"),
    "link out": ({}, {"out": "../../etc"}, "leads outside the bundle"),
    "absolute link": ({}, {"passwd": "/etc/passwd"}, "absolute path"),
    "link chain out": ({}, {"here": ".", "up": "here/.."}, "leads outside the bundle"),
    "through a link": ({"sub/x.py": ["0" * 64, 1, 0o100644]}, {"sub": "."},
                       "sub is a link, not a directory"),
    "fifo": ({"pipe": ["0" * 64, 0, 0o010644]}, {}, "not a regular file"),
    "device": ({"disk": ["0" * 64, 0, 0o060644]}, {}, "not a regular file"),
    "not utf-8": ({"bad\udcff.py": ["0" * 64, 1, 0o100644]}, {}, "not UTF-8"),
    "oversize": ({"big.bin": ["0" * 64, 2**40, 0o100644]}, {}, "remote.max_push_bytes"),
}


def test_crafted_pushes_are_refused_at_the_protocol_level_with_nothing_written(
        remote: Remote) -> None:
    before = sorted(os.listdir(remote.sup.bundles))
    client = remote.client()
    try:
        for case, (files, links, why) in CRAFTED.items():
            with pytest.raises(ControlError, match=why):
                client.request("push_begin", 10, name="api", files={**_files(), **files},
                               links=links)
            assert sorted(os.listdir(remote.sup.bundles)) == before, case
        with pytest.raises(ControlError, match="a bundle name may use"):
            client.request("push_begin", 10, name="../x", files=_files(), links={})
        with pytest.raises(ControlError, match="no such push"):
            client.request("push_commit", 10, push="f" * 32)
        # A valid start, then contents it did not ask for, and broken ones.
        begun = client.request("push_begin", 10, name="api", files=_files("a" * 64), links={})
        with pytest.raises(ControlError, match="not a content this push lacks"):
            client.request("push_files", 10, push=begun["push"], blobs=[["b" * 64, 0, ""]])
        with pytest.raises(ControlError, match="not base64"):
            client.request("push_files", 10, push=begun["push"], blobs=[["a" * 64, 0, "!!"]])
        with pytest.raises(ControlError, match="did not arrive whole"):
            client.request("push_files", 10, push=begun["push"], blobs=[["a" * 64, 0, "eA=="]])
            client.request("push_commit", 10, push=begun["push"])
    finally:
        client.close()
    assert not (remote.sup.bundles / "api").exists()
    assert not (remote.sup.root / "evil.py").exists() and not Path("/tmp/evil.py").exists()
    remote.sup.wait_log(r"remote: alice: push api \(2 file\(s\), 2 bytes\) refused: .*'\.\.'")


def test_a_key_limited_to_one_bundle_is_refused_for_another(remote: Remote) -> None:
    api, web = remote.bundle("api", "one", free_port()), remote.bundle("web", "one", free_port())
    assert remote.run("push", str(web)).returncode == 0  # alice may
    done = remote.run("push", str(api), key="bob")
    assert done.returncode == 0, done.stderr
    save(web / "counter.py", counter_source("bob's"))
    refused = remote.run("push", str(web), key="bob")
    assert refused.returncode == 1
    assert "key bob may not touch bundle 'web' (remote.allow.bob: api)" in refused.stderr
    assert b"bob's" not in (remote.sup.bundles / "web" / "counter.py").read_bytes()
    every = remote.run("reload", "--all", key="bob")
    assert every.returncode == 1 and "name one" in every.stderr
    status = remote.run("status", "--json", key="bob")
    assert status.returncode == 0, status.stderr
    assert '"name": "api"' in status.stdout and '"name": "web"' not in status.stdout
    remote.sup.wait_log(r"remote: bob: push web \(2 file\(s\), \d+ bytes\) refused: key bob")


def test_remote_control_and_its_limits(remote: Remote) -> None:
    port = free_port()
    assert remote.run("push", str(remote.bundle("api", "one", port))).returncode == 0
    reload = remote.run("reload", "api")
    assert reload.returncode == 0 and "api: swapped" in reload.stdout, reload.stderr
    assert remote.run("stop", "api").returncode == 0
    wait_for(lambda: not _serves(port), what="api stopped")
    assert remote.run("run", "api").returncode == 0
    assert request(port).startswith("count=")
    logs = remote.run("logs", "api")
    assert logs.returncode == 0 and "api@" in logs.stdout
    shutdown = remote.run("shutdown")  # not a remote command: -c is all it has
    assert shutdown.returncode == 2
    client = remote.client()
    try:
        with pytest.raises(ControlError, match="'shutdown' is not available remotely"):
            client.request("shutdown", 10)
        with pytest.raises(ControlError, match="rate limit: key alice"):
            for _ in range(200):
                client.request("status", 10)
    finally:
        client.close()
    remote.sup.wait_log(r"remote: alice: reload api")
    remote.sup.wait_log(r"remote: alice: status refused: rate limit")


def _serves(port: int) -> bool:
    try:
        request(port, timeout=1.0)
        return True
    except OSError:
        return False


def test_push_watch_pushes_three_saves(remote: Remote) -> None:
    port = free_port()
    local = remote.bundle("api", "zero", port)
    with subprocess.Popen([*HOTSUP, "push", "--watch", str(local), *remote.flags()],
                          cwd=remote.laptop, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as proc:
        lines: queue.Queue[str] = queue.Queue()
        reader = threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout or []],
                                  daemon=True)
        reader.start()
        try:
            assert "api: started" in lines.get(timeout=DEADLINE)
            for n, tag in enumerate(("one", "two", "three"), start=2):
                save(local / "counter.py", counter_source(tag))
                line = lines.get(timeout=DEADLINE)
                assert "api: swapped in" in line and f"(generation {n})" in line, line
                assert request(port).endswith(f"generation={n} tag={tag}")
        finally:
            proc.send_signal(signal.SIGINT)
            assert proc.wait(10) == 0
            reader.join(10)
            assert proc.stderr is not None
            assert proc.stderr.read() == ""


def test_pushes_to_a_swapping_bundle_wait_their_turn(remote: Remote) -> None:
    port = free_port()
    # Each generation loads for half a second, then imports a second module:
    # a push swapped in meanwhile would give it that push's module.
    slow = ("import time; time.sleep(0.5); import helper; "
            "print(f'loaded {TAG} with {helper.TAG}', flush=True)")

    def bundle(where: str, tag: str) -> Path:
        path = write_bundle(remote.laptop / where / "api", counter_source(tag, init=slow), port)
        (path / "helper.py").write_text(f"TAG = {tag!r}\n")
        return path

    assert remote.run("push", str(bundle("a", "one"))).returncode == 0
    assert request(port) == "count=1 generation=1 tag=one"
    procs = [subprocess.Popen([*HOTSUP, "push", str(bundle(where, tag)), *remote.flags()],
                              text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for where, tag in (("b", "two"), ("c", "three"))]
    outs = [proc.communicate(timeout=60) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outs
    assert all("api: swapped" in out for out, _ in outs), outs
    # One after the other, each on the whole tree of one push. (A generation
    # loaded ahead of a pass and dropped may leave a number unused.)
    swapped_to = {tag: int(re.findall(r"-> api@(\d+)", out)[0])
                  for (out, _), tag in zip(outs, ("two", "three"), strict=True)}
    last = max(swapped_to, key=swapped_to.__getitem__)
    first = min(swapped_to, key=swapped_to.__getitem__)
    assert swapped_to[first] < swapped_to[last]
    assert request(port) == f"count=2 generation={swapped_to[last]} tag={last}"
    loaded = re.findall(r"api@(\d+): loaded (\w+) with (\w+)", remote.sup.log())
    served = {gen: tag for gen, tag, _ in loaded}
    assert (served["1"], served[str(swapped_to[first])], served[str(swapped_to[last])]) == (
        "one", first, last), loaded
    assert all(module == helper for _, module, helper in loaded), loaded


def test_a_flood_of_tcp_connections_cannot_take_the_supervisor_down(
        hotsup: Callable[..., Hotsup], tmp_path: Path) -> None:
    """Like the control socket's (test_isolation): at ulimit -n 256, more idle
    TCP connections to [remote] than the supervisor may hold. libzmq's TCP
    listener stops accepting at EMFILE (it aborted on it for ipc): the
    supervisor and its bundles go on, and the endpoint answers once they go."""
    config, keys, endpoint = remote_config(tmp_path)
    sup = hotsup(config)
    port = free_port()
    write_bundle(sup.bundles / "counter", counter_source("v0"), port)

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    with sup.log_path.open("ab") as log:
        sup.proc = subprocess.Popen([*HOTSUP, "start", str(sup.config)], cwd=sup.root,
                                    stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True,
                                    preexec_fn=limit)
    sup.wait_log(r"counter@1: serving")
    sup.wait_log(r"remote: listening on")
    host, _, remote_port = endpoint.removeprefix("tcp://").rpartition(":")
    clients: list[socket.socket] = []
    try:
        for _ in range(320):  # more than ulimit -n allows
            client = socket.socket()
            client.settimeout(0.5)
            try:
                client.connect((host, int(remote_port)))
            except OSError:  # the backlog is full: that is the point
                client.close()
                continue
            clients.append(client)
        assert len(clients) > 256
        assert request(port, "incr").startswith("count=1 generation=1"), "the bundle serves"
        assert sup.proc.poll() is None, "the supervisor survived"
    finally:
        for client in clients:
            client.close()
    remote = RemoteClient(endpoint, str(keys / "alice.key_secret"), str(keys / "server.key"))
    try:
        status = remote.request("status", 10)
    finally:
        remote.close()
    assert [b["name"] for b in status["bundles"]] == ["counter"]
    assert sup.stop() == 0
