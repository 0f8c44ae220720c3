"""The kernel's file events (inotify(7)), for the event loop to read.

Why not watchfiles in the supervisor (the command line's ``push --watch``,
which may run on a laptop of any kind, keeps it): watchfiles' Rust loop
looks for events once per ``step`` milliseconds, so its latency is paid for
in wake-ups. With the 5 ms step a 40 ms swap needs, that was 200 wake-ups a
second and most of an idle supervisor's CPU. An inotify fd becomes readable
when something happened, and the event loop sleeps until then. The
supervisor is Linux-only already (memfds, pidfds), and so is inotify.

A watch covers one directory, never what is under it, and never through a
symlink (``IN_DONT_FOLLOW | IN_ONLYDIR``): watcher.py chooses the directories.
"""

from __future__ import annotations

import ctypes
import enum
import errno
import functools
import os
import struct
from types import TracebackType

# <sys/inotify.h>
IN_MODIFY = 0x00000002
IN_ATTRIB = 0x00000004
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_DONT_FOLLOW = 0x02000000
IN_EXCL_UNLINK = 0x04000000
IN_ISDIR = 0x40000000

#: What a watch asks for: anything that changes what the directory holds.
#: IN_MODIFY as well as IN_CLOSE_WRITE: the first write of a save is the
#: earliest news of it (the supervisor loads the next generation ahead).
MASK = (IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE
        | IN_DELETE | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR | IN_DONT_FOLLOW
        | IN_EXCL_UNLINK)

_ADDED = IN_CREATE | IN_MOVED_TO
_DELETED = IN_DELETE | IN_MOVED_FROM | IN_DELETE_SELF | IN_MOVE_SELF

#: struct inotify_event without its name: wd, mask, cookie, len.
_EVENT = struct.Struct("iIII")

#: One read takes this much: many events, and always one whole event (a
#: header and a name of up to NAME_MAX bytes).
_READ_SIZE = 64 * 1024


class Change(enum.Enum):
    ADDED = "added"
    MODIFIED = "modified"
    DELETED = "deleted"


#: One event: what happened, to which path, and whether that path is a directory.
Event = tuple[Change, str, bool]


@functools.cache
def _libc() -> ctypes.CDLL:
    # The process's own symbols: glibc's or musl's, whichever Python runs on.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.inotify_init1.argtypes = [ctypes.c_int]
    libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
    return libc


class Inotify:
    """An inotify instance: ``add`` directories, ``read`` what happened once
    ``fd`` is readable. A context manager: leaving it closes the fd and every
    watch with it."""

    def __init__(self) -> None:
        self._c = _libc()
        fd = self._c.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            code = ctypes.get_errno()
            raise OSError(code, f"inotify_init1: {os.strerror(code)}"
                          + (" (fs.inotify.max_user_instances)" if code == errno.EMFILE else ""))
        self.fd: int = fd
        self._paths: dict[int, str] = {}  # watch descriptor -> its directory

    def add(self, directory: str) -> bool:
        """Watch ``directory`` (not what is under it). False if it is not there
        any more, or is not a directory now (a symlink included); OSError for
        anything else (ENOSPC: fs.inotify.max_user_watches is reached)."""
        wd = self._c.inotify_add_watch(self.fd, os.fsencode(directory), MASK)
        if wd < 0:
            code = ctypes.get_errno()
            if code in (errno.ENOENT, errno.ENOTDIR):
                return False
            raise OSError(code, f"cannot watch {directory}: {os.strerror(code)}"
                          + (" (fs.inotify.max_user_watches)" if code == errno.ENOSPC else ""))
        self._paths[wd] = directory
        return True

    def read(self) -> tuple[list[Event], bool]:
        """Every event queued since the last read (none if nothing was), and
        whether the kernel's queue overflowed meanwhile (events were lost:
        look at everything). Never blocks."""
        events: list[Event] = []
        overflowed = False
        while True:
            try:
                data = os.read(self.fd, _READ_SIZE)
            except BlockingIOError:
                return events, overflowed
            offset = 0
            while offset + _EVENT.size <= len(data):
                wd, mask, _, length = _EVENT.unpack_from(data, offset)
                offset += _EVENT.size
                name = data[offset:offset + length].rstrip(b"\0")
                offset += length
                if mask & IN_Q_OVERFLOW:
                    overflowed = True
                    continue
                directory = self._paths.get(wd)
                if mask & IN_IGNORED:  # the watch is gone (its directory was)
                    self._paths.pop(wd, None)
                if directory is None or not mask & ~(IN_IGNORED | IN_ISDIR):
                    continue
                # A name that is not UTF-8 keeps its bytes (surrogateescape):
                # the digest names it as an error, the watch goes on.
                path = os.path.join(directory, os.fsdecode(name)) if name else directory
                change = Change.ADDED if mask & _ADDED else \
                    Change.DELETED if mask & _DELETED else Change.MODIFIED
                events.append((change, path, bool(mask & IN_ISDIR)))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            self._paths.clear()

    def __enter__(self) -> Inotify:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()
