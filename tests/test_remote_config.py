"""``[remote]`` in config.toml, ``hotsup keygen``, and push manifests: checked
without a network (but with the real files and the real ``hotsup`` command)."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from harness import Hotsup, free_port
from hotsup.supervisor.config import check, load_config
from hotsup.supervisor.push import PushError, check_manifest, manifest_of

pytestmark = pytest.mark.timeout(60)

HOTSUP = [sys.executable, "-m", "hotsup.supervisor.cli"]


def keygen(directory: Path, name: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*HOTSUP, "keygen", name, "--dir", str(directory)],
                          capture_output=True, text=True, timeout=30)


def setup(tmp_path: Path, remote: str | None = None) -> Path:
    assert keygen(tmp_path / "keys", "server").returncode == 0
    assert keygen(tmp_path / "keys", "alice").returncode == 0
    authorized = tmp_path / "authorized"
    authorized.mkdir(mode=0o755, exist_ok=True)
    (authorized / "alice.key").write_bytes((tmp_path / "keys" / "alice.key").read_bytes())
    config = tmp_path / "config.toml"
    config.write_text(remote if remote is not None else f"""
[remote]
bind = "tcp://127.0.0.1:{free_port()}"
key = "keys/server.key_secret"
authorized_keys = "authorized"
""")
    return config


def test_keygen_writes_a_pair_the_secret_owner_only(tmp_path: Path) -> None:
    done = keygen(tmp_path / "keys", "alice")
    assert done.returncode == 0, done.stderr
    secret, public = tmp_path / "keys" / "alice.key_secret", tmp_path / "keys" / "alice.key"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert stat.S_IMODE(public.stat().st_mode) == 0o644
    assert b"secret-key" in secret.read_bytes() and b"secret-key" not in public.read_bytes()
    again = keygen(tmp_path / "keys", "alice")
    assert again.returncode == 1 and "exists" in again.stderr
    assert keygen(tmp_path / "keys", "../x").returncode == 2


def test_a_good_remote_table_loads(tmp_path: Path) -> None:
    config = load_config(setup(tmp_path))
    assert config.remote is not None
    assert set(config.remote.clients) == {"alice"}
    assert config.remote.allow == {}
    assert load_config(setup(tmp_path / "none", "")).remote is None


@pytest.mark.parametrize(("change", "problem"), [
    (lambda t: os.chmod(t / "keys" / "server.key_secret", 0o644),
     r"remote\.key: .*server\.key_secret is open to other users \(mode 644\); chmod 600 it"),
    (lambda t: os.unlink(t / "keys" / "server.key_secret"),
     r"remote\.key: .*server\.key_secret not found"),
    (lambda t: os.chmod(t / "authorized", 0o777),
     r"remote\.authorized_keys: .*authorized is writable by other users"),
    (lambda t: os.chmod(t / "authorized" / "alice.key", 0o666),
     r"remote\.authorized_keys: .*alice\.key is writable by other users"),
    (lambda t: os.unlink(t / "authorized" / "alice.key"),
     r"remote\.authorized_keys: .*authorized holds no NAME\.key file"),
    (lambda t: (t / "authorized" / "alice.key").write_text("not a certificate"),
     r"remote\.authorized_keys: .*alice\.key: not a ZeroMQ certificate \(no public-key"),
])
def test_a_bad_key_file_is_a_config_error_naming_it(
        tmp_path: Path, change: Callable[[Path], None], problem: str) -> None:
    config = setup(tmp_path)
    change(tmp_path)
    problems = check(config)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{config}: ")
    assert re.search(problem, problems[0]), problems[0]


@pytest.mark.parametrize(("table", "problem"), [
    ('bind = "127.0.0.1:7400"', 'remote.bind: expected "tcp://HOST:PORT"'),
    ('bind = "tcp://example.com:7400"', 'host "example.com" is not an IP address'),
    ('key = "keys/server.key"', "holds no secret key"),
    ('colour = "red"', "remote.colour: unknown key"),
    ("rate_limit = 0", "remote.rate_limit: must be greater than 0"),
    ('[remote.allow]\nbob = ["api"]', "remote.allow.bob: no key bob.key in authorized_keys"),
    ('[remote.allow]\nalice = "api"', "remote.allow.alice: expected a list of bundle names"),
])
def test_bad_remote_values_are_reported(tmp_path: Path, table: str, problem: str) -> None:
    lines = {"bind": f'bind = "tcp://127.0.0.1:{free_port()}"',
             "key": 'key = "keys/server.key_secret"',
             "authorized_keys": 'authorized_keys = "authorized"'}
    key = table.split(" ")[0]
    if key in lines:
        lines[key] = table
        body = "\n".join(lines.values())
    else:
        body = "\n".join(lines.values()) + "\n" + table
    config = setup(tmp_path, "[remote]\n" + body + "\n")
    problems = check(config)
    assert any(problem in line for line in problems), problems
    done = subprocess.run([*HOTSUP, "check", str(config)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 1 and problem in done.stderr


def _listening_tcp(pid: int) -> list[str]:
    """The TCP sockets in LISTEN that process ``pid`` holds."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        target = os.readlink(f"/proc/{pid}/fd/{fd}")
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:
                found.append(fields[1])
    return found


def test_without_remote_the_supervisor_listens_on_no_network_port(
        hotsup: Callable[..., Hotsup], tmp_path: Path) -> None:
    sup = hotsup().start()
    sup.wait_log(r"serving 0 bundle\(s\)")
    assert _listening_tcp(sup.pid) == []
    assert sup.stop() == 0
    setup(tmp_path / "r")
    port = free_port()
    with_remote = hotsup(f"""
[remote]
bind = "tcp://127.0.0.1:{port}"
key = "r/keys/server.key_secret"
authorized_keys = "r/authorized"
""").start()
    with_remote.wait_log(rf"remote: listening on tcp://127\.0\.0\.1:{port}")
    assert [a.split(":")[1] for a in _listening_tcp(with_remote.pid)] == [f"{port:04X}"]
    assert with_remote.stop() == 0


def test_a_manifest_of_a_directory_and_what_it_may_hold(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "bundle.toml").write_text("x")
    (tmp_path / "sub" / "run.sh").write_text("#!/bin/sh\n")
    os.chmod(tmp_path / "sub" / "run.sh", 0o755)
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / "__pycache__" / "x.pyc").write_text("")
    (tmp_path / ".hidden").write_text("")
    os.symlink("sub/run.sh", tmp_path / "run")
    os.symlink("../bundle.toml", tmp_path / "sub" / "up")
    manifest = manifest_of(tmp_path)
    assert sorted(manifest.files) == ["bundle.toml", "sub/run.sh"]
    assert manifest.files["sub/run.sh"].mode == 0o755
    assert manifest.links == {"run": "sub/run.sh", "sub/up": "../bundle.toml"}
    wire = manifest.wire()
    assert check_manifest(wire["files"], wire["links"], None) == manifest  # links inside: fine
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(PushError, match="pipe: not a regular file or a symlink"):
        manifest_of(tmp_path)
