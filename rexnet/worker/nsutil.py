"""Namespaces and mounts for the root sandbox helper (rexnet.worker.sandboxd): the system
calls Python lacks (unshare, mount, prctl) and a job's private directories."""

from __future__ import annotations

import contextlib
import ctypes
import os
import stat
from typing import Any

from rexnet.worker import cgroups

CLONE_NEWNS = 0x00020000
CLONE_NEWPID = 0x20000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, MS_REC = 2, 4, 8, 4096, 0x4000
MS_PRIVATE, MS_SLAVE = 1 << 18, 1 << 19
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_NAME = 1, 4, 15
PRIVATE_DIRS = ("/tmp", "/var/tmp", "/dev/shm")


_libc = ctypes.CDLL(None, use_errno=True)


def _call(what: str, result: int) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def unshare(flags: int) -> None:
    _call("unshare", _libc.unshare(flags))


def setns(fd: int, kind: int) -> None:
    _call("setns", _libc.setns(fd, kind))


def mount(source: str, target: str, fstype: str | None, flags: int, data: str = "") -> None:
    _call(f"mount {target}", _libc.mount(source.encode(), target.encode(),
                                         fstype.encode() if fstype else None,
                                         ctypes.c_ulong(flags), data.encode() or None))


def prctl(option: int, value: int) -> None:
    _libc.prctl(option, ctypes.c_ulong(value), 0, 0, 0)


def set_name(name: str) -> None:
    """The process's name (comm): SPARE_NAME while it waits for a job."""
    _libc.prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0)


def which(name: str, path: object = None) -> str | None:
    """NAME as shutil.which(NAME, path=PATH) finds it (an executable file, not a directory,
    in the first of PATH's directories that has one; None: the helper's PATH), with one
    stat per directory that lacks it (shutil.which makes three). TypeError: PATH is not a
    string."""
    if path is None:
        path = os.environ.get("PATH")
        if path is None:
            try:
                path = os.confstr("CS_PATH")
            except (AttributeError, ValueError):
                path = os.defpath
    if not isinstance(path, str):
        raise TypeError("PATH is not a string")
    seen: set[str] = set()
    for directory in path.split(os.pathsep) if path else ():
        if directory in seen:
            continue
        seen.add(directory)
        candidate = os.path.join(directory, name)
        try:
            mode = os.stat(candidate).st_mode
        except (OSError, ValueError):
            continue
        if not stat.S_ISDIR(mode) and os.access(candidate, os.F_OK | os.X_OK):
            return candidate
    return None


def program_dir(request: dict[str, Any]) -> str | None:
    """The directory of the job's program (the worker's COMMAND, found as the job will find
    it), so that a program kept below a private directory stays visible; None if unknown."""
    argv = request.get("argv") or []
    if not argv or not isinstance(argv[0], str):
        return None
    env = request.get("env", {})
    found = argv[0] if "/" in argv[0] else which(
        argv[0], env.get("PATH") if isinstance(env, dict) else None)
    return os.path.dirname(os.path.abspath(found)) if found else None


def real_dir(path: str) -> str | None:
    """The real path of directory PATH (as os.path.realpath, which lstats every component:
    here the kernel resolves it, an open and a readlink); None if it is no directory."""
    try:
        fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except (OSError, ValueError):
        return None
    try:
        real = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:  # no /proc here
        real = ""
    finally:
        os.close(fd)
    if not real.startswith("/") or real.endswith(" (deleted)"):
        return os.path.realpath(path) if os.path.isdir(path) else None
    return real


def kept_dirs(cwd: str, *more: str | None) -> list[tuple[int, str]]:
    """The directories that stay visible below PRIVATE_DIRS: a working directory CWD below
    one of them (the worker's --chdir, a job's own directory) and MORE (the program's), as
    (index in PRIVATE_DIRS, real path)."""
    kept = sorted({real for real in (real_dir(d) for d in (cwd, *more) if d) if real})
    return [(i, d) for i, directory in enumerate(PRIVATE_DIRS) for d in kept
            if d.startswith(directory.rstrip("/") + "/")]


def private_dirs(cwd: str, *more: str | None) -> None:
    """A fresh tmpfs on each of PRIVATE_DIRS; the kept_dirs(CWD, *MORE) stay where they
    were, bound into the new tmpfs."""
    kept = kept_dirs(cwd, *more)
    for index, directory in enumerate(PRIVATE_DIRS):
        if not os.path.isdir(directory) or os.path.islink(directory):
            continue
        inside = [d for i, d in kept if i == index]
        handles = [os.open(d, os.O_PATH | os.O_DIRECTORY) for d in inside]
        try:
            mount("tmpfs", directory, "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
            for d, handle in zip(inside, handles, strict=True):
                os.makedirs(d, 0o755, exist_ok=True)
                mount(f"/proc/self/fd/{handle}", d, None, MS_BIND | MS_REC)
        finally:
            for handle in handles:
                os.close(handle)


def mount_cgroups() -> None:
    """Mount the host's control group hierarchies on /sys/fs/cgroup where this mount
    namespace lacks them (`ip netns exec` mounts a fresh /sys without them)."""
    if cgroups.version() or not os.path.isdir("/sys/fs/cgroup"):
        return
    cgroups.forget()
    with open("/proc/self/cgroup") as f:
        hierarchies = [line.split(":")[1] for line in f.read().splitlines()]
    if hierarchies == [""]:
        mount("cgroup2", "/sys/fs/cgroup", "cgroup2", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        cgroups.forget()
        return
    mount("tmpfs", "/sys/fs/cgroup", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=755")
    for controllers in hierarchies:
        wanted = [c for c in controllers.split(",") if c in cgroups.V1_CONTROLLERS]
        if wanted and controllers == wanted[0]:  # one controller: its own directory
            target = f"/sys/fs/cgroup/{controllers}"
            os.mkdir(target)
            with contextlib.suppress(OSError):
                mount("cgroup", target, "cgroup", MS_NOSUID | MS_NODEV | MS_NOEXEC,
                      controllers)
    cgroups.forget()
