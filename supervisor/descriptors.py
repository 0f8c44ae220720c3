"""The supervisor's file descriptor limit.

Raised at start from the soft limit to the hard one, so a burst of
connections, log pipes and pidfds meets EMFILE as late as it can; the zygote
and the workers inherit it. What keeps libzmq's EMFILE abort away from the
supervisor is elsewhere: the control socket lives in a process of its own
(``control_endpoint``), and worker channels are socketpairs that no other
process can connect to.
"""

from __future__ import annotations

import resource


def raise_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:  # not settable as a soft limit: the kernel's cap
        with open("/proc/sys/fs/nr_open") as nr_open:
            hard = int(nr_open.read())
    if soft != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return soft
