"""Remote push latency: from a save on the "laptop" side to the new code serving.

One real ``hotsup start`` with ``[remote]`` on 127.0.0.1 (CURVE), a small
line-protocol service bundle, and three changes, each ``--runs`` times:

* ``small``: one line of the service's module changes;
* ``5mb_one_changed``: the bundle also holds 5 MB of data files, and only the
  module changes;
* ``5mb_all_changed``: every file of the 5 MB bundle changes.

Each change travels three ways, and for each the figures are save-to-serving
(the save, until a fresh connection gets the new code's answer) and, where a
command runs, the command's own duration:

* ``push``: ``hotsup push DIR`` (the command: a Python start-up, the manifest,
  the changed contents, the swap's outcome);
* ``watch``: a running ``hotsup push --watch DIR`` sees the save and pushes;
* ``rsync_reload``: ``rsync -a --checksum --delete`` into a bundle directory of
  the same supervisor (a local copy: the loopback, without ssh), then ``hotsup
  reload``. --checksum because a save within the same second keeps the size
  and the mtime's seconds, and rsync's quick check would skip it.
  The supervisor's watcher sees the copy too; whichever swaps first serves.

Prints one JSON object. Targets (issue 13): p50 <= 300 ms save-to-serving for a
small change; ``hotsup push`` <= 500 ms p50. rsync is installed with apt-get
if it is missing (the bench only; CI does not need it).
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from processes import kill_session, stop_process
from stats import machine, percentile

HOTSUP = [sys.executable, "-m", "hotsup.supervisor.cli"]

SERVICE = '''\
TAG = {tag!r}


class Service:
    def __init__(self, ctx):
        self.ctx = ctx

    async def start(self):
        await self.ctx.serve("main", self.handle)

    async def handle(self, reader, writer):
        await reader.readline()
        writer.write(f"tag={{TAG}}\\n".encode())
        await writer.drain()
'''


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def answer(port: int) -> str:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            sock.sendall(b"get\n")
            return sock.recv(200).decode().strip()
    except OSError:
        return ""


def wait_serving(port: int, tag: str, timeout: float = 30.0) -> float:
    """Poll until the bundle answers with ``tag``; the time it first did."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if answer(port) == f"tag={tag}":
            return time.monotonic()
        time.sleep(0.001)  # a poll interval, not a synchronisation
    raise RuntimeError(f"port {port} never served tag {tag}")


def write_bundle(directory: Path, port: int, data_mb: int) -> None:
    directory.mkdir(parents=True)
    (directory / "bundle.toml").write_text(
        f'entry = "service:Service"\n[sockets.main]\nbind = "127.0.0.1:{port}"\n')
    (directory / "service.py").write_text(SERVICE.format(tag="t0"))
    if data_mb:
        (directory / "data").mkdir()
        for i in range(data_mb * 10):  # 100 kB files
            (directory / "data" / f"{i:03d}.bin").write_bytes(os.urandom(100 * 1024))


def change(directory: Path, tag: str, all_files: bool) -> None:
    """Save the new code the way editors do (a temp file renamed over the old)."""
    if all_files and (directory / "data").is_dir():
        for path in sorted((directory / "data").iterdir()):
            path.write_bytes(os.urandom(100 * 1024))
    temp = directory / ".service.py.saving"
    temp.write_text(SERVICE.format(tag=tag))
    os.replace(temp, directory / "service.py")


def summary(values: list[float]) -> dict[str, Any]:
    ordered = sorted(values)
    return {"runs": len(ordered), "p50": _ms(percentile(ordered, 50)),
            "p99": _ms(percentile(ordered, 99)), "max": _ms(ordered[-1] if ordered else None)}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


class Bench:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.keys = work / "keys"
        for name in ("server", "dev"):
            subprocess.run([*HOTSUP, "keygen", name, "--dir", str(self.keys)], check=True,
                           capture_output=True)
        (work / "authorized").mkdir(mode=0o700)
        shutil.copy(self.keys / "dev.key", work / "authorized" / "dev.key")
        (work / "bundles").mkdir()
        self.endpoint = f"tcp://127.0.0.1:{free_port()}"
        self.config = work / "config.toml"
        self.config.write_text(
            f'[supervisor]\nbundles_dir = "bundles"\nlog_level = "warning"\n'
            f'[defaults]\nprobation = 0\n'
            f'[remote]\nbind = "{self.endpoint}"\nkey = "keys/server.key_secret"\n'
            f'authorized_keys = "authorized"\nrate_limit = 1000\n')
        self.log = (work / "hotsup.log").open("wb")
        self.proc = subprocess.Popen([*HOTSUP, "start", str(self.config)], cwd=work,
                                     stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.env = {**os.environ, "HOTSUP_REMOTE": self.endpoint,
                    "HOTSUP_KEY": str(self.keys / "dev.key_secret"),
                    "HOTSUP_SERVER_KEY": str(self.keys / "server.key")}
        deadline = time.monotonic() + 30
        while self.run("status").returncode != 0:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("the supervisor did not come up")

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*HOTSUP, *args], env=self.env, capture_output=True, text=True,
                              timeout=120)

    def close(self) -> None:
        stop_process(self.proc, group=True)
        kill_session(self.proc.pid)
        self.log.close()

    def scenario(self, name: str, data_mb: int, all_files: bool, runs: int,
                 rsync: str | None) -> dict[str, Any]:
        result: dict[str, Any] = {}
        laptop = self.work / "laptop" / name
        port = free_port()
        write_bundle(laptop, port, data_mb)
        assert self.run("push", str(laptop)).returncode == 0
        wait_serving(port, "t0")
        tags = iter(range(1, 10**6))

        def one(push: Callable[[], float], port: int = port) -> tuple[float, float]:
            tag = f"t{next(tags)}"
            saved = time.monotonic()
            change(laptop, tag, all_files)
            took = push()
            return wait_serving(port, tag) - saved, took

        def push_cmd() -> float:
            start = time.monotonic()
            done = self.run("push", str(laptop))
            if done.returncode != 0:
                raise RuntimeError(done.stderr)
            return time.monotonic() - start

        samples = [one(push_cmd) for _ in range(runs)]
        result["push"] = {"save_to_serving_ms": summary([s for s, _ in samples]),
                          "command_ms": summary([c for _, c in samples])}
        result["watch"] = {"save_to_serving_ms": summary(self._watch(laptop, one, runs))}
        if rsync is not None:
            target = self.work / "bundles" / f"{name}_rsync"
            shutil.copytree(laptop, target)
            rport = free_port()
            (target / "bundle.toml").write_text(
                f'entry = "service:Service"\n[sockets.main]\nbind = "127.0.0.1:{rport}"\n')
            wait_serving(rport, answer(port).removeprefix("tag="))
            keep = (target / "bundle.toml").read_text()

            def rsync_reload() -> float:
                start = time.monotonic()
                subprocess.run([rsync, "-a", "--checksum", "--delete", "--exclude", "bundle.toml",
                                f"{laptop}/", f"{target}/"], check=True)
                assert (target / "bundle.toml").read_text() == keep
                done = self.run("reload", f"{name}_rsync", "-c", str(self.config))
                if done.returncode != 0:
                    raise RuntimeError(done.stderr)
                return time.monotonic() - start

            samples = [one(rsync_reload, rport) for _ in range(runs)]
            result["rsync_reload"] = {"save_to_serving_ms": summary([s for s, _ in samples]),
                                      "command_ms": summary([c for _, c in samples])}
        return result

    def _watch(self, laptop: Path, one: Callable[..., tuple[float, float]],
               runs: int) -> list[float]:
        with subprocess.Popen([*HOTSUP, "push", "--watch", str(laptop)], env=self.env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) as proc:
            lines: queue.Queue[str] = queue.Queue()
            def read() -> None:
                for line in proc.stdout or []:
                    lines.put(line)

            reader = threading.Thread(target=read, daemon=True)
            reader.start()
            lines.get(timeout=60)  # its first push: nothing new
            try:
                return [one(lambda: _outcome(lines))[0] for _ in range(runs)]
            finally:
                proc.send_signal(signal.SIGINT)
                proc.wait(10)
                reader.join(10)


def _outcome(lines: queue.Queue[str]) -> float:
    line = lines.get(timeout=60)
    if " in " not in line:
        raise RuntimeError(f"hotsup push --watch: {line}")
    return 0.0


def find_rsync() -> str | None:
    found = shutil.which("rsync")
    if found is None and shutil.which("apt-get") and os.geteuid() == 0:
        subprocess.run(["apt-get", "install", "-y", "-qq", "rsync"], capture_output=True)
        found = shutil.which("rsync")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15, help="changes per scenario and way")
    parser.add_argument("--no-rsync", action="store_true", help="skip the rsync comparison")
    args = parser.parse_args(argv)
    rsync = None if args.no_rsync else find_rsync()
    with tempfile.TemporaryDirectory(prefix="hotsup-push-bench-") as tmp:
        bench = Bench(Path(tmp))
        try:
            report: dict[str, Any] = {
                "bench": "push_latency", "machine": machine(), "transport": bench.endpoint,
                "rsync": rsync or "not installed (skipped)",
                "targets_ms": {"small_save_to_serving_p50": 300, "push_command_p50": 500},
                "scenarios": {
                    "small": bench.scenario("small", 0, False, args.runs, rsync),
                    "5mb_one_changed": bench.scenario("one", 5, False, args.runs, rsync),
                    "5mb_all_changed": bench.scenario("all", 5, True, args.runs, rsync),
                },
            }
        finally:
            bench.close()
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
