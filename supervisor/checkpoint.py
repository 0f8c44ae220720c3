"""Checkpoint storage: each bundle's latest state snapshot, on disk under run_dir.

A checkpoint is the opaque pickled bytes a worker's ``snapshot()`` produced. The
supervisor stores them so that a crashed worker, or a supervisor started again
over the same run_dir, can hand them to the bundle's next generation. The
supervisor never unpickles them, and neither does this module: the bytes go to
a worker, which does. Unpickling runs arbitrary code, so the one promise this
store makes is that ``load()`` returns only bytes that this installation's
``save()`` wrote, for that bundle, whole.

Layout (the directory is created 0700, every file 0600)::

    <run_dir>/checkpoints/
        key                  32 random bytes: this installation's HMAC key
        <bundle>.ckpt        one per bundle, replaced atomically by each save
        <bundle>.gen         its ledger: the last generation number given and the
                             last one checkpointed (MAC'd as well)
        .<name>.<hex>.tmp    a write in progress (or left by a crash)

File format (big-endian)::

    magic "hotsupck" | version u16 | name length u16 | generation u64
    | payload length u64 | created (Unix time) f64 | bundle name (UTF-8)
    | payload | HMAC-SHA256(key, everything before it)

Threat model. The key is made once per run_dir (``os.urandom``, published with
a hard link so no reader ever sees half a key) and kept beside the
checkpoints, readable by the owner only; it is reused by every later
supervisor over the same run_dir. The HMAC, checked with
``hmac.compare_digest`` before anything is returned, detects:

- truncation and corruption (a crash, a full disk, a bad sector, a bit flip);
- tampering by anyone who can write a checkpoint file but cannot read the key
  (a loosened mode, a shared backup, a file restored from elsewhere);
- a checkpoint of another bundle renamed or copied into place (the bundle name
  is inside the MAC'd header and must match);
- a checkpoint from another installation or an older key copied in (it was
  MAC'd with another key).

It cannot protect against:

- anyone who can read the key: the same Unix user, or root. They can forge a
  checkpoint, but they can also run code as that user directly;
- a rollback by the same user: an older checkpoint of the same bundle,
  written by this installation, copied back over the newer one, verifies.
  The ledger beside it tells it apart (its generation is below the last one
  checkpointed) and the supervisor says so, but anyone who can copy the
  checkpoint can copy an old ledger too;
- the bundle itself: the bytes are whatever its own ``snapshot()`` pickled; the
  HMAC vouches for where they came from, not for what they do when unpickled;
- secrecy: payloads are stored in clear, protected only by the file modes.

Losing the key (the file deleted) makes every existing checkpoint fail to
verify (each bundle starts fresh, loudly) and a new key is made. A key that
exists but cannot be read, has the wrong size, or is open to group or others
is an error: a new key is never made silently over an existing one, since that
would quietly orphan every checkpoint.

Everything here is synchronous and blocks on fsync: call it from a thread
(``asyncio.to_thread``) in the supervisor.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import hmac
import os
import secrets
import stat
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from hotsup.worker.channel import Payload

MAGIC = b"hotsupck"
VERSION = 1
KEY_BYTES = 32
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
SUFFIX = ".ckpt"
LEDGER_SUFFIX = ".gen"
TEMP_SUFFIX = ".tmp"
KEY_NAME = "key"

_HEADER = struct.Struct(">8sHHQQd")
_LEDGER = struct.Struct(">8sQQ")  # magic, last generation given, last checkpointed
_LEDGER_MAGIC = b"hotsupgn"
_MAC_BYTES = hashlib.sha256().digest_size
_MAX_NAME_BYTES = 200  # leaves room for the temp file's decorations within NAME_MAX
_OPEN_FLAGS = os.O_CLOEXEC | os.O_NOFOLLOW


class CheckpointError(Exception):
    """A checkpoint or the key could not be written, read or trusted.

    The message is one line and names the file and the problem.
    """


class CheckpointTooLarge(CheckpointError):
    """A snapshot (or a file on disk) over the store's ``max_bytes``."""

    def __init__(self, message: str, size: int, limit: int) -> None:
        super().__init__(message)
        self.size = size
        self.limit = limit


@dataclass(frozen=True)
class Saved:
    """What ``save()`` wrote: the file, its size in bytes, the seconds it took."""

    path: Path
    size: int
    duration: float


@dataclass(frozen=True)
class Checkpoint:
    """A verified checkpoint. ``payload`` is still pickled: it is for a worker."""

    bundle: str
    generation: int
    payload: bytes
    created: float  # Unix time of the save
    path: Path
    size: int


class CheckpointStore:
    """The checkpoints of one run_dir, and the key that vouches for them.

    ``run_dir`` must exist (the supervisor makes it, owner-only). Construction
    creates the directory (0700) and the key if they are missing,
    and refuses (``CheckpointError``) a directory or key it cannot trust.
    One store per run_dir at a time: the supervisor's run_dir lock ensures it.
    """

    def __init__(self, run_dir: Path, *, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, not {max_bytes}")
        self.directory = run_dir / "checkpoints"
        self.key_path = self.directory / KEY_NAME
        self.max_bytes = max_bytes
        _make_private_dir(self.directory)
        self._key = _load_or_make_key(self.key_path)

    def path(self, bundle: str) -> Path:
        _check_name(bundle)
        return self.directory / f"{bundle}{SUFFIX}"

    def save(self, bundle: str, generation: int, payload: bytes | Payload) -> Saved:
        """Replace ``bundle``'s checkpoint with ``payload``, atomically and durably.

        A ``Payload`` (a snapshot left in its memfd) is streamed through the
        HMAC and into the file a chunk at a time, never read whole.

        Either the new checkpoint is in place and synced, or (on any error
        before the rename) the previous one is untouched and no temp file is
        left. A payload over ``max_bytes`` raises ``CheckpointTooLarge``.
        """
        started = time.perf_counter()
        target = self.path(bundle)
        if not 0 <= generation < 2**64:
            raise CheckpointError(f"checkpoint {target}: generation {generation} out of range")
        if len(payload) > self.max_bytes:
            raise CheckpointTooLarge(
                f"checkpoint {target}: snapshot of {len(payload)} bytes exceeds limit "
                f"{self.max_bytes}", len(payload), self.max_bytes)
        name = bundle.encode()
        header = _HEADER.pack(MAGIC, VERSION, len(name), generation, len(payload),
                              time.time()) + name
        mac = hmac.new(self._key, digestmod=hashlib.sha256)  # over everything before it
        size = _write_replace(target, (header, payload), mac)
        return Saved(target, size, time.perf_counter() - started)

    def load(self, bundle: str) -> Checkpoint | None:
        """``bundle``'s verified checkpoint, or None if it has none.

        A file that is not whole, not ours, not this bundle's or too large
        raises ``CheckpointError`` naming it; the caller starts fresh.
        """
        target = self.path(bundle)
        data = self._read(target)
        if data is None:
            return None
        return self._verify(target, bundle, data)

    def record(self, bundle: str, last: int, checkpointed: int) -> None:
        """Write ``bundle``'s ledger: ``last``, the last generation number given
        (so numbers go on across supervisor runs), and ``checkpointed``, the
        generation of its newest checkpoint (so an older one put back is seen)."""
        target = self.directory / f"{bundle}{LEDGER_SUFFIX}"
        _check_name(bundle)
        body = _LEDGER.pack(_LEDGER_MAGIC, last, checkpointed)
        mac = hmac.new(self._key, bundle.encode() + body, hashlib.sha256).digest()
        _write_replace(target, (body, mac))

    def numbers(self, bundle: str) -> tuple[int, int]:
        """``bundle``'s ledger as ``record`` wrote it: (last, checkpointed); (0, 0)
        if it has none. CheckpointError if it is not whole or not ours."""
        target = self.directory / f"{bundle}{LEDGER_SUFFIX}"
        _check_name(bundle)
        data = self._read(target)
        if data is None:
            return 0, 0
        body, mac = data[:_LEDGER.size], data[_LEDGER.size:]
        expected = hmac.new(self._key, bundle.encode() + body, hashlib.sha256).digest()
        if len(body) != _LEDGER.size or not hmac.compare_digest(mac, expected):
            raise CheckpointError(f"checkpoint ledger {target}: not whole, or not written by "
                                  f"this installation for {bundle!r}")
        _, last, checkpointed = _LEDGER.unpack(body)
        return int(last), int(checkpointed)

    def discard(self, bundle: str) -> bool:
        """Remove ``bundle``'s checkpoint; False if it had none."""
        target = self.path(bundle)
        try:
            os.unlink(target)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise CheckpointError(f"checkpoint {target}: cannot remove: {_why(exc)}") from None
        _sync_dir(target.parent, target)
        return True

    def bundles(self) -> list[str]:
        """The names of the bundles that have a checkpoint file (verified or not)."""
        return sorted(p.name[:-len(SUFFIX)] for p in self._entries()
                      if p.name.endswith(SUFFIX) and not p.name.startswith("."))

    def temp_files(self) -> list[Path]:
        """Temp files of writes that never finished (a crash mid-save)."""
        return sorted(p for p in self._entries()
                      if p.name.startswith(".") and p.name.endswith(TEMP_SUFFIX))

    def remove_temp_files(self) -> list[Path]:
        """Remove ``temp_files()``; what was removed.

        Call it at start-up, before this process saves anything: a temp file is
        never a checkpoint, so this loses nothing that was committed, but it
        would break a save running at the same moment.
        """
        removed = []
        for path in self.temp_files():
            try:
                os.unlink(path)
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise CheckpointError(f"checkpoint temp file {path}: cannot remove: "
                                      f"{_why(exc)}") from None
            removed.append(path)
        return removed

    def _entries(self) -> list[Path]:
        try:
            return list(self.directory.iterdir())
        except OSError as exc:
            raise CheckpointError(f"checkpoint directory {self.directory}: cannot list: "
                                  f"{_why(exc)}") from None

    def _read(self, target: Path) -> bytes | None:
        limit = _HEADER.size + _MAX_NAME_BYTES + self.max_bytes + _MAC_BYTES
        try:
            with open(target, "rb", opener=_open_nofollow) as handle:
                info = os.fstat(handle.fileno())
                if not stat.S_ISREG(info.st_mode):
                    raise CheckpointError(f"checkpoint {target}: not a regular file")
                # One byte past the limit: a file that grew since fstat is refused too.
                data = b"" if info.st_size > limit else handle.read(limit + 1)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise CheckpointError(f"checkpoint {target}: cannot read: {_why(exc)}") from None
        size = max(len(data), info.st_size)
        if size > limit:
            raise CheckpointTooLarge(
                f"checkpoint {target}: file of {size} bytes exceeds limit {limit} "
                f"(max_bytes {self.max_bytes} plus header)", size, limit)
        return data

    def _verify(self, target: Path, bundle: str, data: bytes) -> Checkpoint:
        def bad(problem: str) -> CheckpointError:
            return CheckpointError(f"checkpoint {target}: {problem}")

        if len(data) < _HEADER.size + _MAC_BYTES:
            if not MAGIC.startswith(data[:len(MAGIC)]):
                raise bad("not a hotsup checkpoint (bad magic)")
            raise bad(f"truncated ({len(data)} bytes, shorter than any checkpoint)")
        magic, version, name_len, generation, payload_len, created = _HEADER.unpack_from(data)
        if magic != MAGIC:
            raise bad("not a hotsup checkpoint (bad magic)")
        if version != VERSION:
            raise bad(f"format version {version}, this hotsup reads version {VERSION}")
        expected = _HEADER.size + name_len + payload_len + _MAC_BYTES
        if len(data) < expected:
            raise bad(f"truncated ({len(data)} bytes, its header says {expected})")
        if len(data) > expected:
            raise bad(f"{len(data) - expected} unexpected bytes after the end "
                      f"({len(data)} bytes, its header says {expected})")
        body, mac = data[:-_MAC_BYTES], data[-_MAC_BYTES:]
        if not hmac.compare_digest(hmac.digest(self._key, body, "sha256"), mac):
            raise bad(f"authentication failed: corrupted, tampered with, or written with "
                      f"another key than {self.key_path}")
        # Authentic from here on: the fields were written by our own save().
        name = body[_HEADER.size:_HEADER.size + name_len].decode(errors="replace")
        if name != bundle:
            raise bad(f"belongs to bundle {name!r}, not {bundle!r}")
        payload = body[_HEADER.size + name_len:]
        return Checkpoint(bundle, generation, payload, created, target, len(data))


# -- files -------------------------------------------------------------------------


def _why(exc: OSError) -> str:
    code = errno.errorcode.get(exc.errno, "") if exc.errno is not None else ""
    text = exc.strerror or str(exc)
    return f"{text} ({code})" if code else text


def _check_name(bundle: str) -> None:
    # A bundle's name is its directory's name; these rules keep it one plain
    # file name that can never be a temp file, the key, or outside the directory.
    try:
        size = len(bundle.encode())
    except UnicodeEncodeError:
        size = -1
    if (not 0 < size <= _MAX_NAME_BYTES or "/" in bundle or "\0" in bundle
            or bundle.startswith(".")):
        raise CheckpointError(f"checkpoint: {bundle!r} is not a usable bundle name (empty, "
                              f"hidden, not UTF-8, has '/' or NUL, or over {_MAX_NAME_BYTES} "
                              f"bytes)")


def _make_private_dir(directory: Path) -> None:
    try:
        directory.mkdir(mode=0o700, exist_ok=True)
        info = os.lstat(directory)
        if not stat.S_ISDIR(info.st_mode):
            raise CheckpointError(f"checkpoint directory {directory}: not a directory "
                                  f"(a symlink or a file is in its place)")
        if info.st_uid != os.geteuid():
            raise CheckpointError(f"checkpoint directory {directory}: owned by uid "
                                  f"{info.st_uid}, not by this user ({os.geteuid()})")
        if stat.S_IMODE(info.st_mode) != 0o700:
            os.chmod(directory, 0o700)  # mkdir's mode is masked by umask; be explicit
    except OSError as exc:
        raise CheckpointError(f"checkpoint directory {directory}: {_why(exc)}") from None


def _load_or_make_key(path: Path) -> bytes:
    try:
        with open(path, "rb", opener=_open_nofollow) as handle:
            info = os.fstat(handle.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise CheckpointError(f"checkpoint key {path}: not a regular file")
            mode = stat.S_IMODE(info.st_mode)
            if info.st_uid != os.geteuid() or mode & 0o077:
                raise CheckpointError(
                    f"checkpoint key {path}: mode {mode:04o}, uid {info.st_uid}: others may "
                    f"know it; delete it (existing checkpoints are then discarded) and a new "
                    f"one is made")
            key = handle.read(KEY_BYTES + 1)
    except FileNotFoundError:
        return _make_key(path)
    except OSError as exc:
        raise CheckpointError(
            f"checkpoint key {path}: cannot read: {_why(exc)}; not making a new one (that "
            f"would orphan every checkpoint): fix it, or delete it to start afresh") from None
    if len(key) != KEY_BYTES:
        raise CheckpointError(f"checkpoint key {path}: {len(key)} bytes, expected {KEY_BYTES}; "
                              f"delete it (existing checkpoints are then discarded)")
    return key


def _make_key(path: Path) -> bytes:
    key = os.urandom(KEY_BYTES)
    temp = _temp_path(path)
    try:
        _write_new(temp, (key,))
        # link() fails if the key appeared meanwhile: the first key made wins,
        # and nobody can ever read a key file that is only half written.
        os.link(temp, path)
    except FileExistsError:
        return _load_or_make_key(path)
    except OSError as exc:
        raise CheckpointError(f"checkpoint key {path}: cannot create: {_why(exc)}") from None
    finally:
        _unlink_quietly(temp)
    _sync_dir(path.parent, path)
    return key


def _temp_path(target: Path) -> Path:
    return target.with_name(f".{target.name}.{secrets.token_hex(6)}{TEMP_SUFFIX}")


#: How much of a streamed payload is read at a time.
_CHUNK = 1 << 20


def _write_new(path: Path, parts: tuple[bytes | Payload, ...],
               mac: hmac.HMAC | None = None) -> int:
    """Create ``path`` (0600, must not exist), write ``parts``, fsync. Its size.
    With ``mac``: every part goes through it too, and its digest is written last."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _OPEN_FLAGS, 0o600)
    try:
        written = 0
        for part in parts:
            for chunk in _chunks(part):
                if mac is not None:
                    mac.update(chunk)
                written += _write_all(fd, chunk)
        if mac is not None:
            written += _write_all(fd, mac.digest())
        os.fsync(fd)
        return written
    finally:
        os.close(fd)


def _chunks(part: bytes | Payload) -> Iterator[bytes]:
    if not isinstance(part, Payload):
        yield part
        return
    for offset in range(0, part.size, _CHUNK):
        chunk = os.pread(part.fd, min(_CHUNK, part.size - offset), offset)
        if not chunk:
            raise OSError(errno.EIO, "the snapshot's memfd ended early")
        yield chunk


def _write_all(fd: int, data: bytes) -> int:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    return len(data)


def _write_replace(target: Path, parts: tuple[bytes | Payload, ...],
                   mac: hmac.HMAC | None = None) -> int:
    temp = _temp_path(target)
    try:
        size = _write_new(temp, parts, mac)
        os.rename(temp, target)
    except OSError as exc:
        _unlink_quietly(temp)
        raise CheckpointError(f"checkpoint {target}: cannot write: {_why(exc)}; the previous "
                              f"checkpoint is kept") from None
    except BaseException:
        _unlink_quietly(temp)
        raise
    _sync_dir(target.parent, target)
    return size


def _sync_dir(directory: Path, target: Path) -> None:
    """fsync the directory, so the rename or unlink survives a power loss."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise CheckpointError(f"checkpoint {target}: changed, but its directory could not be "
                              f"synced ({_why(exc)}); a power loss may undo the change") from None


def _unlink_quietly(path: Path) -> None:
    # Best effort, on an error path: a temp file left here is found by temp_files().
    with contextlib.suppress(OSError):
        os.unlink(path)


def _open_nofollow(path: str, flags: int) -> int:
    # A symlink planted in place of a checkpoint or the key is refused (ELOOP).
    return os.open(path, flags | _OPEN_FLAGS)
