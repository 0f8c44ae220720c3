"""Pushing a bundle's files into bundles_dir: both ends of ``hotsup push``.

The protocol (three commands of ``commands``, over ``control``'s framing):

1. ``push_begin`` {"name", "files": {path: [sha256, size, mode]}, "links":
   {path: target}}: the client's manifest of its bundle directory. The
   supervisor checks all of it before it writes anything (``check_manifest``:
   relative UTF-8 paths without ``..``, regular files and symlinks only, links
   that stay inside the bundle, within the size and file-count bounds) and
   answers ``{"push": token, "missing": [sha256, ...], "same": bool}``: the
   contents it does not hold already in the bundle's directory.
2. ``push_files`` {"push", "blobs": [[sha256, offset, base64], ...]}: those
   contents, in pieces of at most ``PUSH_CHUNK`` bytes, each piece at the offset
   where the last one ended.
3. ``push_commit`` {"push"}: the supervisor stages the complete new tree in
   ``<bundle's parent>/.hotsup-push/<token>/tree`` (a dot-directory, which no
   rescan takes for a bundle), checks every digest, then swaps it in with one
   ``renameat2(RENAME_EXCHANGE)`` (a new bundle: one rename), so the watcher
   and the bundle's runner see the old tree or the new one, never a mix; then
   the bundle's pass runs and its report is the answer.

A token is the push's capability: 128 random bits, known only to the client
that began it. A push idle for ``IDLE_TIMEOUT`` is dropped with its staging.
The new tree replaces the directory's whole content (as ``rsync --delete``):
files the bundle wrote into its own directory do not survive a push.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import ctypes
import errno
import hashlib
import os
import posixpath
import secrets
import shutil
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol

from .commands import PUSH_CHUNK
from .config import MANIFEST, RemoteConfig, valid_name
from .control import ControlError
from .watcher import ignored

#: The staging directory's name, beside the bundle directories.
STAGING: Final = ".hotsup-push"
#: Seconds a push may sit between two of its requests before it is dropped.
IDLE_TIMEOUT: Final = 120.0
#: Pushes under way at once, over every key.
MAX_SESSIONS: Final = 16
_MAX_PATH, _MAX_LINK_DEPTH = 1024, 40


class PushError(ControlError):
    """A push refused or failed; nothing of it was swapped in."""


@dataclass(frozen=True)
class FileEntry:
    sha: str
    size: int
    mode: int  # 0o755 or 0o644: only the owner's execute bit travels


@dataclass(frozen=True)
class Manifest:
    files: dict[str, FileEntry]
    links: dict[str, str]

    @property
    def size(self) -> int:
        return sum(entry.size for entry in self.files.values())

    def wire(self) -> dict[str, Any]:
        """The ``files`` and ``links`` arguments of ``push_begin``."""
        return {"files": {p: [e.sha, e.size, e.mode] for p, e in self.files.items()},
                "links": dict(self.links)}


# -- what a directory holds (both ends) ---------------------------------------------

def manifest_of(directory: Path) -> Manifest:
    """The manifest of ``directory``: its regular files and symlinks, skipping
    what the watcher ignores (bytecode, editor droppings, dot-files). Raises
    PushError for what cannot be pushed (a fifo, a name that is not UTF-8)."""
    files: dict[str, FileEntry] = {}
    links: dict[str, str] = {}
    for root, dirs, names in os.walk(directory):
        kept = []
        for name in sorted(dirs):
            full = os.path.join(root, name)
            if ignored(name):
                continue
            if os.path.islink(full):  # os.walk does not descend into it: a link entry
                names.append(name)
                continue
            kept.append(name)
        dirs[:] = kept
        for name in sorted(names):
            if ignored(name):
                continue
            full = os.path.join(root, name)
            rel = os.path.relpath(full, directory)
            _check_utf8(rel)
            info = os.lstat(full)
            if stat.S_ISLNK(info.st_mode):
                links[rel] = os.readlink(full)
                _check_utf8(links[rel])
            elif stat.S_ISREG(info.st_mode):
                files[rel] = FileEntry(_sha256(full), info.st_size,
                                       0o755 if info.st_mode & 0o100 else 0o644)
            else:
                raise PushError(f"{full}: not a regular file or a symlink (a device, fifo "
                                f"or socket cannot be pushed)")
    return Manifest(files, links)


def _check_utf8(text: str) -> None:
    try:
        text.encode()
    except UnicodeEncodeError:
        raise PushError(f"{text.encode(errors='surrogateescape')!r}: the name is not "
                        f"UTF-8") from None


def _sha256(path: str | Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


# -- sending (the command line's end) -----------------------------------------------

class Client(Protocol):
    def request(self, cmd: str, timeout: float, **args: Any) -> Any: ...


def send(client: Client, directory: Path, name: str, timeout: float) -> dict[str, Any]:
    """Push ``directory`` as bundle ``name``: the report of its pass (``reload``'s
    shape; result "unchanged" when the supervisor had this content already).
    PushError if the directory cannot be pushed; ``client``'s errors as they are."""
    manifest = manifest_of(directory)
    if MANIFEST not in manifest.files:
        raise PushError(f"{directory}: no {MANIFEST} here: not a bundle directory")
    begun = client.request("push_begin", min(timeout, 10.0), name=name, **manifest.wire())
    token = begun["push"]
    where = {entry.sha: path for path, entry in manifest.files.items()}
    batch: list[list[Any]] = []
    size = 0
    for sha in begun["missing"]:
        with open(directory / where[sha], "rb") as handle:
            offset = 0
            while True:
                room = PUSH_CHUNK - size
                data = handle.read(room)
                batch.append([sha, offset, base64.b64encode(data).decode()])
                size += len(data)
                offset += len(data)
                if size >= PUSH_CHUNK:
                    client.request("push_files", timeout, push=token, blobs=batch)
                    batch, size = [], 0
                if len(data) < room:
                    break
    if batch:
        client.request("push_files", timeout, push=token, blobs=batch)
    report: dict[str, Any] = client.request("push_commit", timeout, push=token)
    return report


# -- checking a manifest (the supervisor's end) --------------------------------------

def check_manifest(files: dict[str, Any], links: dict[str, Any],
                   limits: RemoteConfig | None) -> Manifest:
    """The manifest a ``push_begin`` gave, or PushError naming its first problem."""
    max_files = limits.max_push_files if limits else RemoteConfig.max_push_files
    max_bytes = limits.max_push_bytes if limits else RemoteConfig.max_push_bytes
    if len(files) + len(links) > max_files:
        raise PushError(f"{len(files) + len(links)} files: a push may hold at most "
                        f"{max_files} (remote.max_push_files)")
    entries: dict[str, FileEntry] = {}
    for path, value in files.items():
        _check_path(path)
        if not (isinstance(value, list) and len(value) == 3
                and isinstance(value[0], str) and len(value[0]) == 64
                and all(c in "0123456789abcdef" for c in value[0])
                and all(type(v) is int for v in value[1:]) and value[1] >= 0):
            raise PushError(f"{path}: expected [sha256 hex, size, mode]")
        mode = value[2]
        if stat.S_IFMT(mode) not in (0, stat.S_IFREG):
            raise PushError(f"{path}: not a regular file (a device, fifo or socket cannot "
                            f"be pushed)")
        entries[path] = FileEntry(value[0], value[1], 0o755 if mode & 0o100 else 0o644)
    total = sum(entry.size for entry in entries.values())
    if total > max_bytes:
        raise PushError(f"{total} bytes: a push may hold at most {max_bytes} "
                        f"(remote.max_push_bytes)")
    targets: dict[str, str] = {}
    for path, target in links.items():
        _check_path(path)
        if path in entries:
            raise PushError(f"{path}: both a file and a symlink")
        if not isinstance(target, str) or not target or "\0" in target:
            raise PushError(f"{path}: a symlink needs a target")
        _check_utf8(target)
        if target.startswith("/"):
            raise PushError(f"{path}: a symlink to an absolute path ({target}) leaves the "
                            f"bundle")
        targets[path] = target
    manifest = Manifest(entries, targets)
    _check_tree(manifest)
    if MANIFEST not in entries:
        raise PushError(f"no {MANIFEST} at the top of the pushed directory")
    return manifest


def _check_path(path: str) -> None:
    _check_utf8(path)
    if not path or len(path) > _MAX_PATH or "\0" in path:
        raise PushError(f"{path!r}: not a usable path")
    if path.startswith("/"):
        raise PushError(f"{path}: an absolute path")
    parts = path.split("/")
    if ".." in parts:
        raise PushError(f"{path}: a path with '..' in it")
    if any(part in ("", ".") for part in parts):
        raise PushError(f"{path}: not a normal relative path")
    if any(ignored(part) for part in parts):
        raise PushError(f"{path}: a name the watcher ignores (dot-files, bytecode, editor "
                        f"files) cannot be pushed")


def _check_tree(manifest: Manifest) -> None:
    """No path goes through a symlink or a file, no symlink leads outside."""
    kinds = {path: "file" for path in manifest.files} | {p: "link" for p in manifest.links}
    for path in kinds:
        parts = path.split("/")
        for depth in range(1, len(parts)):
            above = "/".join(parts[:depth])
            if above in kinds:
                raise PushError(f"{path}: {above} is a {kinds[above]}, not a directory")
    for path in manifest.links:
        _resolve(path, manifest.links, 0)


def _resolve(path: str, links: dict[str, str], depth: int) -> list[str]:
    """The components of where ``path`` leads inside the bundle, following its
    symlinks as the kernel would; PushError if it leaves the bundle."""
    if depth > _MAX_LINK_DEPTH:
        raise PushError(f"{path}: too many levels of symlinks")
    where: list[str] = []
    parts = path.split("/")
    for part in parts:
        if part in ("", "."):
            continue
        if part == "..":
            if not where:
                raise PushError(f"{path}: a symlink that leads outside the bundle")
            where.pop()
            continue
        here = "/".join([*where, part])
        if here in links:
            target = links[here]
            base = posixpath.dirname(here)
            where = _resolve(posixpath.join(base, target) if base else target, links,
                             depth + 1)
            continue
        where.append(part)
    return where


# -- the supervisor's end: sessions, staging, the swap-in ----------------------------

@dataclass
class Session:
    token: str
    name: str
    target: Path  # the bundle directory the tree goes to
    root: Path  # <target's parent>/.hotsup-push/<token>
    manifest: Manifest
    have: dict[str, str]  # sha256 -> a path in the current tree with that content
    missing: set[str]
    same: bool
    received: dict[str, int] = field(default_factory=dict)
    touched: float = field(default_factory=time.monotonic)

    @property
    def blobs(self) -> Path:
        return self.root / "blobs"

    @property
    def tree(self) -> Path:
        return self.root / "tree"


class PushStore:
    """The pushes under way; a lock per bundle so two never land at once."""

    def __init__(self, limits: RemoteConfig | None) -> None:
        self.limits = limits
        self._sessions: dict[str, Session] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    def lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    async def begin(self, name: str, target: Path, files: dict[str, Any],
                    links: dict[str, Any]) -> dict[str, Any]:
        if not valid_name(name):
            raise PushError(f"{name!r}: a bundle name may use letters, digits, _ . and -")
        self._expire()
        if len(self._sessions) >= MAX_SESSIONS:
            raise PushError(f"{MAX_SESSIONS} pushes are under way; try again in a moment")
        manifest = check_manifest(files, links, self.limits)
        token = secrets.token_hex(16)
        root = target.parent / STAGING / token
        try:
            current = await asyncio.to_thread(_current, target)
            await asyncio.to_thread(_make_dirs, root)
        except OSError as exc:
            raise PushError(f"cannot stage the push next to {target}: {exc.strerror or exc}"
                            ) from None
        have = {entry.sha: path for path, entry in current.files.items()}
        wanted = {entry.sha for entry in manifest.files.values()}
        session = Session(token, name, target, root, manifest, have, wanted - have.keys(),
                          same=current == manifest)
        self._sessions[token] = session
        return {"push": token, "missing": sorted(session.missing), "same": session.same}

    async def add(self, token: str, blobs: list[Any]) -> dict[str, Any]:
        session = self.get(token)
        pieces: list[tuple[str, int, bytes]] = []
        for blob in blobs:
            if not (isinstance(blob, list) and len(blob) == 3 and isinstance(blob[0], str)
                    and type(blob[1]) is int and isinstance(blob[2], str)):
                raise PushError("a blob is [sha256, offset, base64]")
            sha, offset, text = blob
            if sha not in session.missing:
                raise PushError(f"{sha[:16]}...: not a content this push lacks")
            try:
                data = base64.b64decode(text, validate=True)
            except (binascii.Error, ValueError):
                raise PushError(f"{sha[:16]}...: not base64") from None
            size = max(e.size for e in session.manifest.files.values() if e.sha == sha)
            if offset != session.received.get(sha, 0) or offset + len(data) > size:
                raise PushError(f"{sha[:16]}...: a piece out of order or beyond its size")
            session.received[sha] = offset + len(data)
            pieces.append((sha, offset, data))
        try:
            await asyncio.to_thread(_write_pieces, session.blobs, pieces)
        except OSError as exc:
            await self.drop(session)
            raise PushError(f"cannot stage the push: {exc.strerror or exc}") from None
        session.touched = time.monotonic()
        return {"received": sum(len(p[2]) for p in pieces)}

    def get(self, token: str) -> Session:
        self._expire()
        session = self._sessions.get(token)
        if session is None:
            raise PushError("no such push (it ended, or sat idle too long): push again")
        session.touched = time.monotonic()
        return session

    async def stage(self, session: Session) -> None:
        """Build the complete new tree and check every digest."""
        try:
            await asyncio.to_thread(_build, session)
        except OSError as exc:
            raise PushError(f"cannot stage the push: {exc.strerror or exc}") from None

    def swap_in(self, session: Session) -> None:
        """The staged tree becomes the bundle directory, in one rename."""
        self._sessions.pop(session.token, None)
        try:
            if session.target.exists():
                _exchange(session.tree, session.target)
            else:
                session.target.parent.mkdir(parents=True, exist_ok=True)
                os.rename(session.tree, session.target)
        except OSError as exc:
            raise PushError(f"cannot swap the push into {session.target}: "
                            f"{exc.strerror or exc}") from None

    async def drop(self, session: Session) -> None:
        """Forget the push and remove its staging (after a swap-in: the old tree)."""
        self._sessions.pop(session.token, None)
        await asyncio.to_thread(_remove, session.root)

    def close(self) -> None:
        for session in list(self._sessions.values()):
            _remove(session.root)
        self._sessions.clear()

    def _expire(self) -> None:
        now = time.monotonic()
        for session in list(self._sessions.values()):
            if now - session.touched > IDLE_TIMEOUT:
                self._sessions.pop(session.token, None)
                _remove(session.root)


def clear_staging(bundles_dir: Path | None) -> list[Path]:
    """Remove what pushes cut short by a killed supervisor left; what was removed."""
    if bundles_dir is None or not (bundles_dir / STAGING).is_dir():
        return []
    left = sorted((bundles_dir / STAGING).iterdir())
    for path in left:
        _remove(path)
    return left


def _current(target: Path) -> Manifest:
    try:
        return manifest_of(target) if target.is_dir() else Manifest({}, {})
    except PushError:  # something unpushable there: it is replaced, never reused
        return Manifest({}, {})


def _make_dirs(root: Path) -> None:
    # 0700: a staged file is not for other users' eyes before it is in place.
    root.parent.mkdir(mode=0o700, exist_ok=True)
    with contextlib.suppress(OSError):
        os.chmod(root.parent, 0o700)  # mkdir's mode is masked by umask
    root.mkdir(mode=0o700)
    (root / "blobs").mkdir(mode=0o700)


def _write_pieces(blobs: Path, pieces: list[tuple[str, int, bytes]]) -> None:
    for sha, offset, data in pieces:
        flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
        fd = os.open(blobs / sha, flags, 0o600)
        try:
            os.pwrite(fd, data, offset)
        finally:
            os.close(fd)


def _build(session: Session) -> None:
    tree = session.tree
    tree.mkdir(mode=0o755)
    for sha in session.missing:
        blob = session.blobs / sha
        if not blob.is_file() or _sha256(blob) != sha:
            raise PushError(f"{sha[:16]}...: its content did not arrive whole; push again")
    for path, entry in sorted(session.manifest.files.items()):
        dest = tree / path
        dest.parent.mkdir(parents=True, exist_ok=True)
        if entry.sha in session.missing:
            shutil.copyfile(session.blobs / entry.sha, dest)
        else:
            shutil.copyfile(session.target / session.have[entry.sha], dest,
                            follow_symlinks=False)
            if _sha256(dest) != entry.sha:  # changed on this side since push_begin
                raise PushError(f"{path}: the bundle changed on the supervisor's side "
                                f"during the push; push again")
        os.chmod(dest, entry.mode)
    for path, target in sorted(session.manifest.links.items()):
        dest = tree / path
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(target, dest)
        # The manifest was checked; the kernel's view of the staged tree is the proof.
        real = os.path.realpath(dest)
        if os.path.commonpath([real, os.path.realpath(tree)]) != os.path.realpath(tree):
            raise PushError(f"{path}: a symlink that leads outside the bundle")


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(new: Path, old: Path) -> None:
    """Swap two directories in one step (Linux ``renameat2(RENAME_EXCHANGE)``), so
    at every instant ``old``'s path holds one whole tree.

    Where the filesystem cannot (EINVAL, ENOSYS), two renames: the path is
    missing for the microseconds between them, within one batch of the watcher
    (watch_quiet_ms), which rescans after both."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is not None:
        if renameat2(_AT_FDCWD, os.fsencode(new), _AT_FDCWD, os.fsencode(old),
                     _RENAME_EXCHANGE) == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.EINVAL, errno.ENOSYS):
            raise OSError(code, os.strerror(code), str(old))
    aside = new.with_name("old")
    os.rename(old, aside)
    os.rename(new, old)
    os.rename(aside, new)


def _remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
