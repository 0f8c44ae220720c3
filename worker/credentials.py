"""A worker's user: the drop to a bundle's ``user``/``group`` right after fork.

Done in the forked worker before it reads a byte of bundle code, with nothing
open but its own fds (stdio on its log pipe, its channel, its listening
sockets, the lifeline): the zygote closed everything else first. After it the
process cannot regain any privilege (``PR_SET_NO_NEW_PRIVS``: no setuid
binary, no file capability), and the kernel marks it non-dumpable because its
credentials changed, so processes of that same user cannot ptrace it or read
its memory either.
"""

from __future__ import annotations

import ctypes
import os
import sys

#: prctl(2) option: no execve() from here on can grant privileges.
_PR_SET_NO_NEW_PRIVS = 38


def drop_to(uid: int, gid: int) -> None:
    """Become ``uid``:``gid`` for good, with no supplementary groups.

    The order matters: groups and gid first, while we are still allowed to
    change them; setuid last. Any failure raises (OSError): a worker that
    should not run as root must not run at all.
    """
    os.setgroups([gid])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if os.getuid() != uid or os.geteuid() != uid or os.getegid() != gid:
        raise PermissionError(f"could not drop to uid {uid}, gid {gid}")
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_NO_NEW_PRIVS): {os.strerror(err)}")
    # Bytecode of the non-bundle modules this worker imports would be written
    # beside them, where this user cannot (and must not) write: write none.
    # Bundle modules are compiled from source anyway (importer).
    sys.dont_write_bytecode = True
