"""The file watcher on its own: batching, re-watching, surviving inotify's failures."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest
from hotsup.supervisor import watcher as watcher_module
from hotsup.supervisor.inotify import Inotify
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


def test_watching_survives_an_inotify_failure(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    real = watcher_module.Inotify
    calls = 0

    def flaky() -> Inotify:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise OSError(24, "inotify_init1: Too many open files")
        return real()

    monkeypatch.setattr(watcher_module, "REWATCH_AFTER", 0.05)
    monkeypatch.setattr(watcher_module, "Inotify", flaky)

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


def test_digest_follows_no_symlink_out_of_the_bundle(tmp_path: Path) -> None:
    bundle, outside = tmp_path / "bundle", tmp_path / "outside"
    bundle.mkdir()
    outside.mkdir()
    (bundle / "app.py").write_text("A = 1\n")
    (outside / "data.txt").write_text("one")
    (bundle / "data.txt").symlink_to(outside / "data.txt")
    (bundle / "lib").symlink_to(outside)
    (bundle / "alias.py").symlink_to("app.py")
    notes: list[str] = []
    before = digest(bundle, notes=notes)
    assert sorted(notes) == sorted([
        f"{bundle / 'data.txt'} -> {outside / 'data.txt'} points out of the bundle: not "
        f"followed (a change there does not swap the bundle)",
        f"{bundle / 'lib'} -> {outside} points out of the bundle: not followed (a change "
        f"there does not swap the bundle)"])
    (outside / "data.txt").write_text("two")
    (outside / "more.py").write_text("B = 1\n")
    assert digest(bundle) == before, "what a link points to outside is not hashed"
    (bundle / "lib").unlink()
    (bundle / "lib").symlink_to(tmp_path)
    assert digest(bundle) != before, "where a link points is"
    (bundle / "app.py").write_text("A = 2\n")
    assert digest(bundle) != before


def test_a_symlink_loop_or_an_undecodable_name_is_an_error_naming_it(tmp_path: Path) -> None:
    (tmp_path / "app.py").write_text("A = 1\n")
    (tmp_path / "self").symlink_to(".")  # not followed: no loop for the digest
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "up").symlink_to("..")
    digest(tmp_path)
    (tmp_path / "one").symlink_to("two")
    (tmp_path / "two").symlink_to("one")
    with pytest.raises(watcher_module.DigestError,
                       match=f"^{tmp_path / 'one'}: a symlink loop \\(two leads back"):
        digest(tmp_path)
    (tmp_path / "one").unlink()
    (tmp_path / "two").unlink()
    bad = os.fsencode(tmp_path) + b"/caf\xe9.py"
    with open(bad, "w") as handle:
        handle.write("x")
    with pytest.raises(watcher_module.DigestError,
                       match=r"caf\\xe9.py: the file name is not valid UTF-8: rename it"):
        digest(tmp_path)


def test_digest_work_is_bounded(tmp_path: Path) -> None:
    for i in range(11):
        (tmp_path / f"m{i}.py").write_text("x" * 100)
    assert digest(tmp_path, max_files=11, max_bytes=1100)
    with pytest.raises(watcher_module.DigestError, match="more than 10 files"):
        digest(tmp_path, max_files=10)
    with pytest.raises(watcher_module.DigestError, match="more than 0 MiB of files"):
        digest(tmp_path, max_bytes=1000)


def test_a_cancelled_digest_stops_reading(tmp_path: Path) -> None:
    """A shut-down never waits for a digest: cancelled, its thread stops at
    the next chunk instead of hashing the rest (the loop's close waits for it)."""
    for i in range(3):
        with open(tmp_path / f"big{i}", "wb") as handle:
            handle.truncate(80 * 1024 * 1024)  # sparse: costs no disk
    digest(tmp_path)  # the first read of a sparse file is slower: time the second
    started = time.monotonic()
    digest(tmp_path)
    whole = time.monotonic() - started

    async def cancel_soon() -> None:
        task = asyncio.ensure_future(watcher_module.adigest(tmp_path))
        await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    started = time.monotonic()
    asyncio.run(cancel_soon())  # returns once the default executor's threads are done
    cut = time.monotonic() - started
    print(f"whole digest {whole:.2f}s, cancelled one {cut:.2f}s")
    assert cut < whole / 3, (cut, whole)


def test_the_watch_follows_no_symlink_out_of_a_bundle(tmp_path: Path) -> None:
    """A bundle holding a link to a big tree outside (``/usr``, say) once cost an
    inotify watch per directory of that tree: no directory behind a link is
    watched, and a change there is not seen."""
    bundles, outside = tmp_path / "bundles", tmp_path / "outside"
    for sub in ("a", "b/c", "b/d"):
        (outside / sub).mkdir(parents=True)
    (bundles / "app" / "pkg").mkdir(parents=True)
    (bundles / "app" / "lib").symlink_to(outside)
    (bundles / "app" / "pkg" / "__pycache__").mkdir()
    assert watcher_module.watched_directories([bundles]) == [
        bundles, bundles / "app", bundles / "app" / "pkg"]

    async def main() -> None:
        batches: list[set[Path]] = []
        watcher = Watcher([bundles], quiet_ms=30, batch_ms=1600, on_batch=batches.append)
        task = asyncio.ensure_future(watcher.run())
        await asyncio.sleep(0)  # one step: the watch is set up
        (outside / "b" / "c" / "x.py").write_text("x")  # behind the link: not seen
        (bundles / "app" / "pkg" / "mod.py").write_text("x")  # in the bundle: seen
        await until_called(batches, bundles / "app" / "pkg" / "mod.py", "the bundle's file")
        # A directory made after the watch began is watched too.
        (bundles / "app" / "new").mkdir()
        await until_called(batches, bundles / "app" / "new", "the new directory")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while not any(bundles / "app" / "new" / "late.py" in batch for batch in batches):
            (bundles / "app" / "new" / "late.py").write_text(str(loop.time()))
            assert loop.time() < deadline, "a file in the new directory was never seen"
            await asyncio.sleep(0.05)
        watcher.stop()
        await task
        seen = set().union(*batches)
        assert not any(outside in path.parents or path.is_relative_to(bundles / "app" / "lib")
                       for path in seen), seen

    asyncio.run(main())


def _context_switches() -> int:
    """Voluntary context switches of every thread of this process so far."""
    total = 0
    for task in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{task}/status") as status:
            for line in status:
                if line.startswith("voluntary_ctxt_switches:"):
                    total += int(line.split()[1])
    return total


def test_an_idle_watch_wakes_nothing(tmp_path: Path) -> None:
    """No thread looks for events on a clock (watchfiles' did, 200 times a
    second): idle, the process sleeps until the kernel has something."""
    for sub in ("a", "b/c"):
        (tmp_path / sub).mkdir(parents=True)

    async def main() -> None:
        batches: list[set[Path]] = []
        watcher = Watcher([tmp_path], quiet_ms=30, batch_ms=1600, on_batch=batches.append)
        task = asyncio.ensure_future(watcher.run())
        await asyncio.sleep(0.2)  # whatever starting up costs is behind us
        before = _context_switches()
        await asyncio.sleep(1.0)
        woke = _context_switches() - before
        (tmp_path / "b" / "c" / "x.py").write_text("x")  # and it still sees a change
        await until_called(batches, tmp_path / "b" / "c" / "x.py", "a change after the idle second")
        watcher.stop()
        await task
        assert woke < 20, f"{woke} wake-ups in an idle second"
    asyncio.run(main())


def test_events_the_kernel_dropped_make_every_root_looked_at(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    if limit > 100_000:
        pytest.skip(f"max_queued_events is {limit}: too many files to overflow it")

    async def main() -> None:
        batches: list[set[Path]] = []
        watcher = Watcher([tmp_path], quiet_ms=30, batch_ms=1600, on_batch=batches.append)
        task = asyncio.ensure_future(watcher.run())
        await asyncio.sleep(0)  # one step: the watch is set up
        # The loop is not running while these are made: nothing reads the
        # queue, and the kernel drops what does not fit.
        for i in range(limit + 100):
            os.close(os.open(tmp_path / f"f{i}", os.O_CREAT | os.O_WRONLY, 0o600))
        await until_called(batches, tmp_path, "the root, after the overflow")
        watcher.stop()
        await task
    with caplog.at_level("WARNING", logger="hotsup"):
        asyncio.run(main())
    assert "the kernel dropped file events" in caplog.text
