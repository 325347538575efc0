"""Process hardening for long-running services that hold a private key."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

PR_SET_DUMPABLE = 4


def make_undumpable() -> bool:
    """Mark this process non-dumpable (Linux): no core dumps, and processes of the same
    user (such as the worker's own jobs) cannot ptrace it or read its /proc/PID/mem or
    environ, so they cannot lift the private key out of its memory.  True if done.

    The kernel already does this when twistd drops privileges (-u/-g, with the default
    fs.suid_dumpable=0); doing it explicitly also covers a worker started as its user.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        return bool(libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False
