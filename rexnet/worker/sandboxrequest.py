"""A sandboxed job's request as the root helper (rexnet.worker.sandboxd) checks it: its
descriptors, its user, its control group's bounds; and the resident memory of a job's
namespace where no memory controller bounds it."""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import sys
from typing import Any

from rexnet.worker import sandboxwire as wire
from rexnet.worker.cgroups import BOUNDS, JobCgroup


def request_identity(sock: socket.socket, request: dict[str, Any],
                     users: list[tuple[int, int, str]]) -> tuple[int, int, str]:
    """The job's uid, gid and name: a user of the pool by index, else the worker's own
    (SO_PEERCRED of its socket)."""
    index = request.get("user")
    if index is None:
        _, uid, gid = struct.unpack("3i", sock.getsockopt(
            socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
        return uid, gid, ""
    if not isinstance(index, int) or not 0 <= index < len(users):
        raise wire.WireError(f"no job user {index!r} in the pool")
    return users[index]


def checked_fds(request: dict[str, Any], fds: list[int]) -> list[int]:
    """The descriptor numbers the job's FDS take (one each, below 1024)."""
    targets = request.get("fds")
    if (not isinstance(targets, list) or len(targets) != len(fds)
            or not all(isinstance(t, int) and 0 <= t < 1024 for t in targets)):
        raise wire.WireError("descriptors do not match their numbers")
    return targets


def controllers(prepare: dict[str, Any]) -> list[str] | None:
    """The controllers a sandbox's group needs, as the worker's request to prepare it says
    ("bounds": the limits its jobs get, as in a job's request); None (all) if it does not
    say."""
    bounds = prepare.get("bounds")
    if not isinstance(bounds, list) or not all(b in BOUNDS for b in bounds):
        return None
    return [BOUNDS[b] for b in bounds]


def set_bounds(group: JobCgroup | None, limits: dict[str, Any], init: int = 0) -> int:
    """Bound GROUP as LIMITS say (a bound whose hierarchy it lacks is added, with process
    INIT moved in); the memory bound left to the helper (0: none, or the kernel's)."""
    if not isinstance(limits, dict):
        raise ValueError("the limits are not an object")
    memory = int(limits.get("memory", 0))
    if group is None:
        return memory
    if init:
        group.add([BOUNDS[b] for b, value in limits.items() if b in BOUNDS and value], init)
    missing = group.limit(memory, int(limits.get("pids", 0)), float(limits.get("cpus", 0.0)))
    if "memory" in missing:
        print("rexnet-sandboxd: control group: no memory controller", file=sys.stderr,
              flush=True)
        return memory
    return 0  # the kernel bounds it


def namespace_rss(init: int) -> int:
    """Resident bytes of every process of the job's PID namespace (its /proc, mounted by
    INIT in the job's mount namespace)."""
    total = 0
    page = os.sysconf("SC_PAGE_SIZE")
    proc = f"/proc/{init}/root/proc"
    try:
        names = os.listdir(proc)
    except OSError:
        return 0
    for name in names:
        if name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError), \
                    open(f"{proc}/{name}/statm") as f:
                total += int(f.read().split()[1]) * page
    return total
