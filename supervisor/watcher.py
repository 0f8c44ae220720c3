"""File changes: one inotify instance over bundles_dir and every bundle directory.

An event only says "look again": editors save by rename, a copy into a
brand-new subdirectory can be missed, a write may not change a byte. So a batch
of events becomes "rescan these bundles", and a bundle swaps only when its
content digest changed.

Latency: the kernel's events wake the event loop as they come (inotify.py
says why not watchfiles here), and the quiet period (``watch_quiet_ms``) is
measured from the last of them, so a change is taken ``watch_quiet_ms`` after
the last write. A directory that never goes quiet is still taken every
``watch_batch_ms``. Idle, nothing wakes.

The quiet period need not be dead time: the changes are also told at once to
``on_change`` (the supervisor loads the bundle's next generation ahead, while
the current one serves), and ``on_batch`` after the quiet period (the swap).

The digest (``digest``) is bounded and follows no symlink: a bundle directory
that holds a link to ``/``, a link loop or a name that is not UTF-8 is an
error naming the path or the limit (``MAX_FILES``, ``MAX_BYTES``), and a
cancelled digest stops at its next chunk, so a shut-down never waits for one.
The watch follows no symlink either: each real directory under the roots is
watched on its own (``watched_directories``), and a directory that appears
makes the watch start again with it.

Files created in a brand-new subdirectory can be missed by inotify, so each
batch is reported once more after RECHECK_AFTER seconds of silence (a batch
whose content did not change costs a hash and swaps nothing). Only after
silence: a look while a file is being written could see half of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

from .inotify import Change, Event, Inotify

log = logging.getLogger("hotsup")

#: Seconds from the first event of a burst to telling ``on_change``: a save is
#: several events in a row (truncate, write, close, rename), told once.
CHANGE_SETTLE = 0.002

#: Seconds of silence after a batch before the same places are reported again.
RECHECK_AFTER = 1.0

#: Seconds between looks for a watched directory that was deleted.
ROOT_POLL = 0.5

#: Seconds before watching again after the watch failed.
REWATCH_AFTER = 1.0

_IGNORED_DIRS = {"__pycache__", ".git", ".hg", ".svn", ".mypy_cache", ".pytest_cache",
                 ".ruff_cache", "node_modules"}
_IGNORED_SUFFIXES = (".pyc", ".pyo", "~", ".swp", ".swx", ".swo", ".tmp", ".bak")


def ignored(name: str) -> bool:
    """Files that never change what a bundle runs (bytecode, editor droppings)."""
    return (name.startswith(".") or name in _IGNORED_DIRS or name.endswith(_IGNORED_SUFFIXES)
            or (name.startswith("#") and name.endswith("#")))


#: The most files a bundle's digest looks at, and the most bytes it reads: a
#: bundle directory that is (or holds) something huge, a symlink to ``/`` say,
#: is an error naming the limit, not a hash that runs for ever.
MAX_FILES = 20_000
MAX_BYTES = 256 * 1024 * 1024


class DigestError(Exception):
    """A bundle directory the digest refuses; the message names the path and why."""


class _Walk:
    """One digest's walk: the hash, what it counted, the notes for the log."""

    def __init__(self, top: Path, max_files: int | None, max_bytes: int | None,
                 cancel: threading.Event | None) -> None:
        self.top = top
        self.root = os.path.realpath(top)
        self.hash = hashlib.blake2b(digest_size=16)
        self.files = 0
        self.bytes = 0
        self.max_files = max_files
        self.max_bytes = max_bytes
        self.cancel = cancel
        self.notes: list[str] = []

    def name(self, full: str) -> bytes:
        """``full`` relative to the top, as bytes; DigestError for a name that is
        not valid UTF-8 (the worker could not import it, a person not read it)."""
        relative = os.path.relpath(full, self.top)
        try:
            relative.encode()
        except UnicodeEncodeError:
            shown = os.fsencode(relative).decode("utf-8", "backslashreplace")
            raise DigestError(f"{self.top / shown}: the file name is not valid UTF-8: "
                              f"rename it") from None
        return relative.encode()

    def count(self, size: int) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise asyncio.CancelledError()
        self.files += 1
        self.bytes += size
        if self.max_files is not None and self.files > self.max_files:
            raise DigestError(f"{self.top}: more than {self.max_files} files (the limit of a "
                              f"bundle's digest): is it the right directory?")
        if self.max_bytes is not None and self.bytes > self.max_bytes:
            raise DigestError(f"{self.top}: more than {self.max_bytes // (1024 * 1024)} MiB "
                              f"of files (the limit of a bundle's digest): is it the right "
                              f"directory?")

    def link(self, full: str) -> None:
        """A symlink is hashed as its target's text, never followed: a link out
        of the bundle is noted, a loop is an error."""
        target = os.readlink(full)
        self.hash.update(self.name(full) + b"\0-> " + os.fsencode(target) + b"\0")
        self.count(0)
        try:
            os.stat(full)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise DigestError(f"{full}: a symlink loop ({target} leads back to itself): "
                                  f"remove it") from None
            return  # dangling: nothing to follow anyway
        resolved = os.path.realpath(full)
        if resolved != self.root and not resolved.startswith(self.root + os.sep):
            self.notes.append(f"{full} -> {target} points out of the bundle: not followed "
                              f"(a change there does not swap the bundle)")

    def file(self, full: str) -> None:
        try:
            if not stat.S_ISREG(os.lstat(full).st_mode):
                return  # a unix socket or fifo a bundle made is not its code
            # Never a symlink (swapped in since the walk saw it), never a
            # blocking open (a fifo swapped in).
            fd = os.open(full, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            return  # vanished mid-walk: the next event rescans
        except OSError:
            self.hash.update(self.name(full) + b"\0<unreadable>\0")
            return
        with os.fdopen(fd, "rb") as handle:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                return
            self.count(info.st_size)
            self.hash.update(self.name(full) + b"\0")
            try:
                while chunk := handle.read(1 << 16):
                    self.hash.update(chunk)
                    if self.cancel is not None and self.cancel.is_set():
                        raise asyncio.CancelledError()
            except OSError:
                self.hash.update(b"<unreadable>")
        self.hash.update(b"\0")


def digest(path: Path, *, max_files: int | None = MAX_FILES, max_bytes: int | None = MAX_BYTES,
           cancel: threading.Event | None = None, notes: list[str] | None = None) -> str | None:
    """A hash of every file a bundle could run or read; None if the directory is gone.

    No symlink under ``path`` is followed: each is hashed as its target's text
    (one that points out of the bundle is said in ``notes``); a symlink loop,
    a file name that is not UTF-8, more than ``max_files`` files or
    ``max_bytes`` bytes raise DigestError naming the path. ``cancel`` set:
    CancelledError at the next file or chunk (the caller went away).
    """
    if not path.is_dir():
        return None
    walk = _Walk(path, max_files, max_bytes, cancel)
    for root, dirs, files in os.walk(path):
        links = [d for d in dirs if os.path.islink(os.path.join(root, d))]
        dirs[:] = sorted(d for d in dirs if not ignored(d) and d not in links)
        for name in sorted([*files, *links]):
            if ignored(name):
                continue
            full = os.path.join(root, name)
            if os.path.islink(full):
                walk.link(full)
            else:
                walk.file(full)
    if notes is not None:
        notes += walk.notes
    return walk.hash.hexdigest()


def digest_paths(paths: list[Path]) -> str:
    """One hash over several directories (as ``digest``, without its limits:
    installed packages are not a bundle's) and files: what the preloaded
    packages and modules hold."""
    h = hashlib.blake2b(digest_size=16)
    for path in paths:
        h.update(str(path).encode() + b"\0")
        if path.is_dir():
            try:
                h.update((digest(path, max_files=None, max_bytes=None) or "").encode())
            except DigestError as exc:
                h.update(str(exc).encode())
            continue
        try:
            h.update(path.read_bytes())
        except OSError:
            h.update(b"<unreadable>")
    return h.hexdigest()


#: Notes already logged (a link out of a bundle), so each is said once.
_told: set[str] = set()


async def adigest(path: Path) -> str | None:
    """``digest`` in a thread of its own. Cancelled, it stops at the next file
    or chunk (so a shut-down never waits for a digest); its notes are logged
    here, once each, in the loop's thread."""
    cancel = threading.Event()
    notes: list[str] = []
    try:
        return await asyncio.to_thread(digest, path, cancel=cancel, notes=notes)
    except asyncio.CancelledError:
        cancel.set()
        raise
    finally:
        for note in notes:
            if note not in _told:
                _told.add(note)
                log.warning("%s", note)


#: The most directories one watch covers (inotify watches cost kernel memory,
#: and their number is limited per user); past it, the rest are not watched.
MAX_WATCHED = 20_000


def watched_directories(roots: list[Path], limit: int = MAX_WATCHED) -> list[Path]:
    """Each root and every directory under it, never through a symlink (a
    link to ``/`` in a bundle is not watched, as its digest does not follow
    it) nor into an ignored one (``__pycache__``, ``.git``...); at most ``limit``."""
    found: list[Path] = []
    for root in roots:
        found.append(root)
        for here, dirs, _ in os.walk(root):  # followlinks=False: links are not entered
            dirs[:] = sorted(d for d in dirs
                             if not ignored(d) and not os.path.islink(os.path.join(here, d)))
            found.extend(Path(here) / d for d in dirs)
            if len(found) >= limit:
                log.warning("watching only the first %d directories under %s", limit,
                            ", ".join(map(str, roots)))
                return found[:limit]
    return found


def _real_directory(path: str) -> bool:
    return os.path.isdir(path) and not os.path.islink(path) and not ignored(
        os.path.basename(path))


class Watcher:
    """Calls ``on_batch(paths)`` once per quiet batch of changes under ``roots``,
    and ``on_change(paths)`` as soon as each change of the batch is seen."""

    def __init__(self, roots: list[Path], quiet_ms: int, batch_ms: int,
                 on_batch: Callable[[set[Path]], None],
                 on_change: Callable[[set[Path]], None] | None = None) -> None:
        self._roots = roots
        self._quiet = quiet_ms / 1000
        self._batch_ms = batch_ms
        self._on_batch = on_batch
        self._on_change = on_change
        self._stopped = False
        self._cycle = asyncio.Event()  # set: watch again from scratch (or stop)
        self._gone: set[Path] = set()  # roots deleted since they were last watched
        self._pending: set[Path] = set()
        self._first: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._recheck: asyncio.TimerHandle | None = None
        self._recheck_paths: set[Path] = set()
        self._changing: set[Path] = set()  # for on_change, CHANGE_SETTLE after the first
        self._change_timer: asyncio.TimerHandle | None = None
        self._failed: BaseException | None = None  # what ended the watch, if not the cycle

    async def run(self) -> None:
        """Watch until stop(). A root that is deleted is watched again once it is back."""
        first = True
        try:
            while not self._stopped:
                self._cycle = asyncio.Event()
                present = [root for root in self._roots if root.is_dir()]
                missing = [root for root in self._roots if root not in present]
                for root in self._gone.intersection(present):
                    log.info("watching %s again", root)
                self._gone.difference_update(present)
                if not first:
                    # Between the old watch and the new one, changes anywhere
                    # went unseen: look at everything once (a digest each).
                    self._add(set(present))
                first = False
                poll = asyncio.ensure_future(self._await_return(missing)) if missing else None
                try:
                    if present:
                        await self._watch(present)
                    else:
                        await self._cycle.wait()
                except Exception:
                    # inotify's instance limit, a root turned into a file...: say
                    # so, and watch anew in a moment rather than go deaf.
                    log.exception("watching %s failed; watching again in %gs",
                                  ", ".join(map(str, present)), REWATCH_AFTER)
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(REWATCH_AFTER):
                            await self._cycle.wait()
                finally:
                    if poll is not None:
                        poll.cancel()
                        await asyncio.gather(poll, return_exceptions=True)
        finally:
            for timer in (self._timer, self._recheck, self._change_timer):
                if timer is not None:
                    timer.cancel()

    def stop(self) -> None:
        self._stopped = True
        self._cycle.set()

    async def _watch(self, roots: list[Path]) -> None:
        """Watch ``roots`` until this cycle ends (stop(), a new directory, a root
        gone). The watches are set up before the first await; an error in
        reading them ends the watch with it."""
        loop = asyncio.get_running_loop()
        with Inotify() as notify:
            directories = watched_directories(roots)  # a walk of directories only: quick
            for count, directory in enumerate(directories):
                try:
                    notify.add(str(directory))
                except OSError as exc:
                    if exc.errno != errno.ENOSPC or count == 0:
                        raise
                    log.warning("%s: only %d of the %d directories under %s are watched; "
                                "changes in the others are not seen", exc.strerror, count,
                                len(directories), ", ".join(map(str, roots)))
                    break
            self._failed = None
            loop.add_reader(notify.fd, self._on_events, notify, roots)
            try:
                await self._cycle.wait()
            finally:
                loop.remove_reader(notify.fd)
            if self._failed is not None:
                raise self._failed

    def _on_events(self, notify: Inotify, roots: list[Path]) -> None:
        """The inotify fd is readable: take in what happened."""
        try:
            events, overflowed = notify.read()
            if overflowed:
                log.warning("the kernel dropped file events (fs.inotify.max_queued_events): "
                            "looking at every bundle again")
                self._add(set(roots))
            self._take(events, roots)
        except Exception as exc:  # the watch is broken: run() says so and watches anew
            self._failed = exc
            self._cycle.set()

    def _take(self, events: list[Event], roots: list[Path]) -> None:
        paths = {Path(path) for _, path, _ in events if not ignored(os.path.basename(path))}
        if not paths:
            return
        if any(change is Change.ADDED and is_dir and _real_directory(path)
               for change, path, is_dir in events):
            # A directory that is not watched yet: watch again, with it
            # (the next cycle looks at everything once, so nothing written
            # into it meanwhile goes unseen).
            self._cycle.set()
        if self._on_change is not None:  # before the quiet period: what can be done ahead
            self._changing |= paths
            if self._change_timer is None:
                self._change_timer = asyncio.get_running_loop().call_later(
                    CHANGE_SETTLE, self._tell_change)
        self._add(paths)
        gone = {Path(path) for change, path, _ in events if change is Change.DELETED}
        gone = gone.intersection(roots) | {root for root in roots if not root.is_dir()}
        if gone:
            # inotify watches die with their directory: one that is back
            # (or comes back) would be deaf. Watch anew; poll while gone.
            log.info("%s was removed; watching for it", ", ".join(sorted(map(str, gone))))
            self._gone |= gone
            self._cycle.set()

    def _tell_change(self) -> None:
        paths, self._changing, self._change_timer = self._changing, set(), None
        if self._on_change is not None and paths:
            self._on_change(paths)

    async def _await_return(self, missing: list[Path]) -> None:
        """Poll for deleted roots: no event says a watched directory came back."""
        while True:
            await asyncio.sleep(ROOT_POLL)
            if any(root.is_dir() for root in missing):
                self._cycle.set()  # run() watches it again
                return

    def _add(self, paths: set[Path]) -> None:
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        if self._first is None:
            self._first = now
        self._pending |= paths
        if self._recheck is not None:  # not silent any more: the next batch rechecks
            self._recheck.cancel()
            self._recheck = None
            self._pending |= self._recheck_paths
        if self._timer is not None:
            self._timer.cancel()
        overdue = (now - self._first) * 1000 >= self._batch_ms
        self._timer = loop.call_later(0 if overdue else self._quiet, self._flush)

    def _flush(self) -> None:
        paths, self._pending = self._pending, set()
        self._first = None
        self._timer = None
        if paths:
            self._on_batch(paths)
            self._recheck_paths = paths
            self._recheck = asyncio.get_running_loop().call_later(RECHECK_AFTER, self._recheck_now)

    def _recheck_now(self) -> None:
        self._recheck = None
        self._on_batch(self._recheck_paths)
