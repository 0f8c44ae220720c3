"""The file watcher on its own: batching, re-watching, surviving watchfiles' failures."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import watchfiles
from hotsup.supervisor import watcher as watcher_module
from hotsup.supervisor.watcher import Watcher, digest

pytestmark = pytest.mark.timeout(30)


async def until_called(batches: list[set[Path]], path: Path, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while not any(path in batch for batch in batches):
        assert loop.time() < deadline, f"never reported: {what}"
        await asyncio.sleep(0.01)


def test_a_burst_of_writes_is_one_batch(tmp_path: Path) -> None:
    async def main() -> None:
        batches: list[set[Path]] = []
        watcher = Watcher([tmp_path], quiet_ms=100, batch_ms=1600, on_batch=batches.append)
        task = asyncio.ensure_future(watcher.run())
        await asyncio.sleep(0)  # one step: the watch is set up
        for i in range(5):
            (tmp_path / f"f{i}.py").write_text("x")
        await until_called(batches, tmp_path / "f4.py", "the burst")
        watcher.stop()
        await task
        assert len(batches) == 1 and len(batches[0]) == 5, batches
    asyncio.run(main())


def test_watching_survives_a_watchfiles_failure(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    real = watchfiles.awatch
    calls = 0

    def flaky(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise OSError(28, "inotify watch limit reached")
        return real(*args, **kwargs)

    monkeypatch.setattr(watcher_module, "REWATCH_AFTER", 0.05)
    monkeypatch.setattr(watchfiles, "awatch", flaky)

    async def main() -> None:
        batches: list[set[Path]] = []
        watcher = Watcher([tmp_path], quiet_ms=30, batch_ms=1600, on_batch=batches.append)
        task = asyncio.ensure_future(watcher.run())
        await until_called(batches, tmp_path, "every root, once watching resumed")
        (tmp_path / "late.py").write_text("x")
        await until_called(batches, tmp_path / "late.py", "a change after the failure")
        watcher.stop()
        await task
    asyncio.run(main())


def test_digest_sees_content_not_bytecode_or_sockets(tmp_path: Path) -> None:
    import socket

    (tmp_path / "app.py").write_text("A = 1\n")
    before = digest(tmp_path)
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / "__pycache__" / "app.cpython-311.pyc").write_bytes(b"junk")
    (tmp_path / ".app.py.swp").write_text("editor")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(tmp_path / "app.sock"))
        assert digest(tmp_path) == before
    (tmp_path / "app.py").write_text("A = 2\n")
    assert digest(tmp_path) != before
    assert digest(tmp_path / "missing") is None
