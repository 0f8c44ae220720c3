"""Checkpoint storage: only whole checkpoints this installation wrote come back."""

from __future__ import annotations

import ast
import errno
import os
import pickle
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import hotsup.supervisor.checkpoint as checkpoint_module
import pytest
from hotsup.supervisor.checkpoint import (
    KEY_BYTES,
    CheckpointError,
    CheckpointStore,
    CheckpointTooLarge,
)

pytestmark = pytest.mark.timeout(60)

PAYLOAD = pickle.dumps({"count": 41, "names": ["a", "b"]})


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    path = tmp_path / "run"
    path.mkdir(mode=0o700)
    return path


@pytest.fixture
def store(run_dir: Path) -> CheckpointStore:
    return CheckpointStore(run_dir)


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def refused(store: CheckpointStore, bundle: str = "counter") -> str:
    """The one-line message ``load`` refuses ``bundle``'s checkpoint with."""
    with pytest.raises(CheckpointError) as info:
        store.load(bundle)
    message = str(info.value)
    assert "\n" not in message
    assert str(store.path(bundle)) in message, message
    return message


# -- round trip -------------------------------------------------------------------


def test_round_trip(store: CheckpointStore) -> None:
    before = time.time()
    saved = store.save("counter", 7, PAYLOAD)
    after = time.time()
    assert saved.path == store.path("counter")
    assert saved.size == saved.path.stat().st_size > len(PAYLOAD)
    assert saved.duration >= 0
    loaded = store.load("counter")
    assert loaded is not None
    assert (loaded.bundle, loaded.generation, loaded.payload) == ("counter", 7, PAYLOAD)
    assert before <= loaded.created <= after
    assert (loaded.path, loaded.size) == (saved.path, saved.size)
    assert store.bundles() == ["counter"]


def test_empty_and_binary_payloads_round_trip(store: CheckpointStore) -> None:
    for payload in (b"", bytes(range(256)) * 100):
        store.save("counter", 1, payload)
        loaded = store.load("counter")
        assert loaded is not None and loaded.payload == payload


def test_no_checkpoint_is_none(store: CheckpointStore) -> None:
    assert store.load("counter") is None
    assert store.bundles() == []


def test_a_save_replaces_the_previous_one(store: CheckpointStore) -> None:
    store.save("counter", 1, b"one")
    store.save("counter", 2, b"two")
    loaded = store.load("counter")
    assert loaded is not None and (loaded.generation, loaded.payload) == (2, b"two")
    assert store.temp_files() == []


def test_bundles_are_kept_apart(store: CheckpointStore) -> None:
    store.save("a", 1, b"alpha")
    store.save("b", 3, b"beta")
    a, b = store.load("a"), store.load("b")
    assert a is not None and b is not None
    assert (a.payload, b.payload) == (b"alpha", b"beta")
    assert store.bundles() == ["a", "b"]


def test_a_later_store_over_the_same_run_dir_reads_it(run_dir: Path) -> None:
    CheckpointStore(run_dir).save("counter", 4, PAYLOAD)
    key = (run_dir / "checkpoints" / "key").read_bytes()
    again = CheckpointStore(run_dir)
    assert (run_dir / "checkpoints" / "key").read_bytes() == key, "the key is reused"
    loaded = again.load("counter")
    assert loaded is not None and loaded.payload == PAYLOAD


def test_discard(store: CheckpointStore) -> None:
    store.save("counter", 1, PAYLOAD)
    assert store.discard("counter") is True
    assert store.load("counter") is None
    assert store.discard("counter") is False


@pytest.mark.parametrize("name", ["", ".hidden", "a/b", "../escape", "nul\0", "x" * 201,
                                  "\udcff"])
def test_unusable_bundle_names_are_refused(store: CheckpointStore, name: str) -> None:
    with pytest.raises(CheckpointError, match="not a usable bundle name"):
        store.save(name, 1, b"x")
    with pytest.raises(CheckpointError, match="not a usable bundle name"):
        store.load(name)


# -- files and modes ----------------------------------------------------------------


def test_directory_0700_and_files_0600_whatever_the_umask(run_dir: Path) -> None:
    old = os.umask(0)
    try:
        store = CheckpointStore(run_dir)
        store.save("counter", 1, PAYLOAD)
    finally:
        os.umask(old)
    assert mode(store.directory) == 0o700
    assert mode(store.key_path) == 0o600
    assert len(store.key_path.read_bytes()) == KEY_BYTES
    assert mode(store.path("counter")) == 0o600


def test_an_existing_open_directory_is_made_private(run_dir: Path) -> None:
    (run_dir / "checkpoints").mkdir()
    os.chmod(run_dir / "checkpoints", 0o755)
    CheckpointStore(run_dir)
    assert mode(run_dir / "checkpoints") == 0o700


def test_a_symlinked_directory_is_refused(run_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    (run_dir / "checkpoints").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(CheckpointError, match="not a directory"):
        CheckpointStore(run_dir)


def test_a_symlink_in_place_of_a_checkpoint_is_refused(store: CheckpointStore) -> None:
    store.save("other", 1, PAYLOAD)
    store.path("counter").symlink_to(store.path("other"))
    assert "cannot read" in refused(store)


# -- the key ----------------------------------------------------------------------


def test_an_unreadable_key_is_an_error_not_a_new_key(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    CheckpointStore(run_dir).save("counter", 1, PAYLOAD)
    key_path = run_dir / "checkpoints" / "key"
    key = key_path.read_bytes()
    if os.geteuid() == 0:  # root reads a 0000 file: make open() fail as it would for a user
        real_open = os.open

        def deny(path: str | os.PathLike[str], flags: int, *args: int, **kw: int) -> int:
            if Path(path) == key_path:
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return real_open(path, flags, *args, **kw)

        monkeypatch.setattr(os, "open", deny)
    else:
        os.chmod(key_path, 0)
    with pytest.raises(CheckpointError) as info:
        CheckpointStore(run_dir)
    monkeypatch.undo()
    os.chmod(key_path, 0o600)
    message = str(info.value)
    assert str(key_path) in message and "Permission denied" in message, message
    assert "not making a new one" in message and "\n" not in message
    assert key_path.read_bytes() == key, "the key was not replaced"
    loaded = CheckpointStore(run_dir).load("counter")
    assert loaded is not None and loaded.payload == PAYLOAD


@pytest.mark.parametrize("damage", ["short", "long", "empty", "directory", "group-readable",
                                    "symlink"])
def test_a_damaged_key_is_an_error_not_a_new_key(run_dir: Path, damage: str) -> None:
    CheckpointStore(run_dir)
    key_path = run_dir / "checkpoints" / "key"
    key = key_path.read_bytes()
    if damage == "short":
        key_path.write_bytes(key[:16])
    elif damage == "long":
        key_path.write_bytes(key + b"\n")
    elif damage == "empty":
        key_path.write_bytes(b"")
    elif damage == "directory":
        key_path.unlink()
        key_path.mkdir()
    elif damage == "group-readable":
        os.chmod(key_path, 0o640)
    elif damage == "symlink":
        (run_dir / "elsewhere").write_bytes(key)
        key_path.unlink()
        key_path.symlink_to(run_dir / "elsewhere")
    snapshot = sorted(os.listdir(run_dir / "checkpoints"))
    with pytest.raises(CheckpointError) as info:
        CheckpointStore(run_dir)
    assert str(key_path) in str(info.value) and "\n" not in str(info.value)
    assert sorted(os.listdir(run_dir / "checkpoints")) == snapshot, "nothing was made"


def test_a_deleted_key_makes_a_new_one_and_old_checkpoints_fail_loudly(run_dir: Path) -> None:
    CheckpointStore(run_dir).save("counter", 1, PAYLOAD)
    (run_dir / "checkpoints" / "key").unlink()
    store = CheckpointStore(run_dir)
    assert "authentication failed" in refused(store)


def test_two_stores_making_the_key_at_once_agree_on_one(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_link = os.link
    other: list[CheckpointStore] = []
    raced = [False]

    def link_after_the_other(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        if not raced[0]:  # the other store publishes its key first, then ours collides
            raced[0] = True
            other.append(CheckpointStore(run_dir))
        real_link(src, dst)

    monkeypatch.setattr(os, "link", link_after_the_other)
    mine = CheckpointStore(run_dir)
    monkeypatch.undo()
    other[0].save("counter", 1, PAYLOAD)
    loaded = mine.load("counter")
    assert loaded is not None and loaded.payload == PAYLOAD
    assert mine.temp_files() == []


# -- what load refuses --------------------------------------------------------------


def test_every_single_byte_flipped_is_refused(store: CheckpointStore) -> None:
    """Header (magic, version, lengths, generation, time, name), payload and MAC."""
    store.save("counter", 3, b"payload bytes")
    path = store.path("counter")
    good = path.read_bytes()
    for i in range(len(good)):
        damaged = bytearray(good)
        damaged[i] ^= 0x01
        path.write_bytes(bytes(damaged))
        refused(store)
    path.write_bytes(good)
    assert store.load("counter") is not None


@pytest.mark.parametrize("where", ["magic", "payload", "mac"])
def test_tampering_says_what_is_wrong(store: CheckpointStore, where: str) -> None:
    store.save("counter", 3, b"payload bytes")
    path = store.path("counter")
    data = bytearray(path.read_bytes())
    index = {"magic": 0, "payload": len(data) - 32 - 3, "mac": len(data) - 1}[where]
    data[index] ^= 0xFF
    path.write_bytes(bytes(data))
    message = refused(store)
    expected = "bad magic" if where == "magic" else "authentication failed"
    assert expected in message, message


def test_a_forged_payload_with_the_right_layout_is_refused(store: CheckpointStore) -> None:
    """Someone without the key rewrites the payload and fixes up the lengths."""
    store.save("counter", 3, b"good")
    path = store.path("counter")
    data = path.read_bytes()
    evil = b"cos\nsystem\n(S'true'\ntR."  # a pickle that would run a command
    header_len = len(data) - 32 - 4
    header = bytearray(data[:header_len])
    header[20:28] = len(evil).to_bytes(8, "big")  # payload length field
    path.write_bytes(bytes(header) + evil + data[-32:])
    assert "authentication failed" in refused(store)


def test_every_truncation_and_trailing_bytes_are_refused(store: CheckpointStore) -> None:
    store.save("counter", 3, b"payload bytes")
    path = store.path("counter")
    good = path.read_bytes()
    for length in range(len(good)):
        path.write_bytes(good[:length])
        message = refused(store)
        assert "truncated" in message, (length, message)
    path.write_bytes(good + b"\0")
    assert "unexpected bytes after the end" in refused(store)


@pytest.mark.parametrize("content", [b"", b"garbage", b"x" * 4096, pickle.dumps({"count": 1})])
def test_garbage_is_refused(store: CheckpointStore, content: bytes) -> None:
    store.path("counter").write_bytes(content)
    message = refused(store)
    assert "not a hotsup checkpoint" in message or "truncated" in message, message


def test_another_bundles_checkpoint_copied_in_is_refused(store: CheckpointStore) -> None:
    store.save("other", 1, PAYLOAD)
    shutil.copy(store.path("other"), store.path("counter"))
    assert "belongs to bundle 'other', not 'counter'" in refused(store)


def test_another_installations_checkpoint_copied_in_is_refused(
    store: CheckpointStore, tmp_path: Path
) -> None:
    elsewhere = tmp_path / "other-run"
    elsewhere.mkdir()
    foreign = CheckpointStore(elsewhere)
    foreign.save("counter", 1, PAYLOAD)
    shutil.copy(foreign.path("counter"), store.path("counter"))
    assert "authentication failed" in refused(store)


def test_a_newer_format_version_is_named(store: CheckpointStore) -> None:
    store.save("counter", 1, PAYLOAD)
    path = store.path("counter")
    data = bytearray(path.read_bytes())
    data[8:10] = (2).to_bytes(2, "big")
    path.write_bytes(bytes(data))
    assert "format version 2" in refused(store)


# -- size limit -------------------------------------------------------------------


def test_a_snapshot_over_the_limit_is_refused_and_the_old_one_kept(run_dir: Path) -> None:
    store = CheckpointStore(run_dir, max_bytes=100)
    store.save("counter", 1, b"x" * 100)
    with pytest.raises(CheckpointTooLarge) as info:
        store.save("counter", 2, b"y" * 101)
    assert (info.value.size, info.value.limit) == (101, 100)
    assert "snapshot of 101 bytes exceeds limit 100" in str(info.value)
    assert str(store.path("counter")) in str(info.value)
    loaded = store.load("counter")
    assert loaded is not None and loaded.payload == b"x" * 100
    assert store.temp_files() == []


def test_a_file_over_the_limit_is_not_read(run_dir: Path) -> None:
    CheckpointStore(run_dir).save("counter", 1, b"x" * 5000)
    small = CheckpointStore(run_dir, max_bytes=1000)
    with pytest.raises(CheckpointTooLarge, match="exceeds limit"):
        small.load("counter")


# -- crashes and full disks ---------------------------------------------------------


def test_a_partial_temp_file_left_by_a_crash_is_harmless_and_cleaned(
    store: CheckpointStore,
) -> None:
    store.save("counter", 1, PAYLOAD)
    good = store.path("counter").read_bytes()
    leftover = store.directory / ".counter.ckpt.0123456789ab.tmp"
    leftover.write_bytes(good[: len(good) // 2])
    loaded = store.load("counter")
    assert loaded is not None and loaded.payload == PAYLOAD
    assert store.temp_files() == [leftover]
    assert store.bundles() == ["counter"]
    assert store.remove_temp_files() == [leftover]
    assert store.temp_files() == [] and not leftover.exists()
    assert store.load("counter") is not None


def test_a_process_killed_mid_save_leaves_the_old_checkpoint(
    store: CheckpointStore, run_dir: Path
) -> None:
    """A real crash: the saving process is SIGKILLed after writing, before the rename."""
    store.save("counter", 1, PAYLOAD)
    script = textwrap.dedent(f"""\
        import os, signal
        from pathlib import Path
        from hotsup.supervisor.checkpoint import CheckpointStore
        store = CheckpointStore(Path({str(run_dir)!r}))
        os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)
        store.save("counter", 2, b"new state" * 1000)
        """)
    proc = subprocess.run([sys.executable, "-c", script], timeout=30, check=False)
    assert proc.returncode == -signal.SIGKILL
    loaded = store.load("counter")
    assert loaded is not None and (loaded.generation, loaded.payload) == (1, PAYLOAD)
    assert len(store.temp_files()) == 1, "the crash left its temp file"
    store.remove_temp_files()
    store.save("counter", 2, b"after")
    loaded = store.load("counter")
    assert loaded is not None and loaded.payload == b"after"


@pytest.fixture
def failing(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    with monkeypatch.context() as patch:
        yield patch


@pytest.mark.parametrize(("call", "code"), [("write", errno.ENOSPC), ("fsync", errno.EDQUOT),
                                            ("rename", errno.EACCES), ("open", errno.EACCES)])
def test_a_failed_write_keeps_the_old_checkpoint_and_says_why(
    store: CheckpointStore, failing: pytest.MonkeyPatch, call: str, code: int
) -> None:
    store.save("counter", 1, PAYLOAD)
    real = getattr(os, call)
    calls = [0]

    def fail_second_time(*args: object, **kw: object) -> object:
        # The first write goes through, so a partial temp file exists to be removed.
        calls[0] += 1
        if call == "write" and calls[0] == 1:
            return real(*args, **kw)
        if call == "open" and not str(args[0]).endswith(".tmp"):
            return real(*args, **kw)
        raise OSError(code, os.strerror(code))

    failing.setattr(os, call, fail_second_time)
    with pytest.raises(CheckpointError) as info:
        store.save("counter", 2, b"new" * 10000)
    failing.undo()
    message = str(info.value)
    assert "\n" not in message
    assert str(store.path("counter")) in message
    assert os.strerror(code) in message and errno.errorcode[code] in message, message
    assert "previous checkpoint is kept" in message
    loaded = store.load("counter")
    assert loaded is not None and (loaded.generation, loaded.payload) == (1, PAYLOAD)
    assert store.temp_files() == [], "the temp file was removed"


def test_a_failed_first_save_leaves_nothing(store: CheckpointStore,
                                            failing: pytest.MonkeyPatch) -> None:
    def full(*args: object) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    failing.setattr(os, "write", full)
    with pytest.raises(CheckpointError, match="No space left on device"):
        store.save("counter", 1, PAYLOAD)
    failing.undo()
    assert store.load("counter") is None
    assert store.temp_files() == []


# -- nothing is ever unpickled --------------------------------------------------------


def test_the_module_never_unpickles() -> None:
    source = Path(checkpoint_module.__file__).read_text()
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & {"pickle", "_pickle", "marshal", "shelve", "dill", "cloudpickle"}
    assert "loads(" not in source and "Unpickler" not in source
