"""The root sandbox helper: `python -m rexnet.worker.sandboxd --control FD [--users SPEC]`.

A worker started as root starts this helper before twistd drops its privileges
(rexnet.worker.sandbox), and keeps one end of a socketpair to it: root stays here, in a
process that reads nothing from the network and runs no job code. For each socket the
worker sends it (ahead of a job: rexnet.worker.sandbox keeps spares), the helper forks a
*supervisor*, which at once

- makes a control group for the job (memory, pids and CPU bounds; rexnet.worker.cgroups),
  and a PID namespace whose first process, a small init, joins the group (a cgroup v1
  migration waits for an RCU grace period: ~10 ms that no job waits for), then says
  "ready" with the init's pid;

and when the worker's job comes on the socket (the request, the job's descriptors):

- sets the group's bounds; the init unshares a mount namespace with a private tmpfs on
  /tmp, /var/tmp and /dev/shm and starts the command (setsid; the terminal as its
  controlling terminal; the job user's uid, gids and groups), and passes on the signals
  the worker sends (SIGKILL: to the init, which ends every process of the namespace),
- when the command ends, or the worker's socket closes (it ended the job, or died):
  SIGKILL to the init ends every process of the namespace (the kernel does it), the
  worker is told the status and whether the memory bound ended the job, and only then
  the control group is killed too (belt and braces) and removed, and the job's mount
  namespace is let go (its unmounts wait for RCU too).

A job user comes from the pool given at start (--users uid:gid:name,...), by index; with
no pool the job runs as the worker's own uid and gid (SO_PEERCRED of its socket).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import os
import select
import shutil
import signal
import socket
import struct
import sys
import termios
from typing import Any

from rexnet.worker import cgroups
from rexnet.worker import sandboxwire as wire
from rexnet.worker.cgroups import JobCgroup

CLONE_NEWNS = 0x00020000
CLONE_NEWPID = 0x20000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, MS_REC, MS_PRIVATE = 2, 4, 8, 4096, 0x4000, 1 << 18
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_NAME = 1, 4, 15
SPARE_NAME = "rexnet-spare"  # a sandbox's processes until their job comes
PRIVATE_DIRS = ("/tmp", "/var/tmp", "/dev/shm")
MEMORY_CHECK = 0.2
FORWARDED = [s for s in signal.valid_signals()
             if s not in (signal.SIGKILL, signal.SIGSTOP, signal.SIGCHLD)]

_libc = ctypes.CDLL(None, use_errno=True)


def _call(what: str, result: int) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def unshare(flags: int) -> None:
    _call("unshare", _libc.unshare(flags))


def mount(source: str, target: str, fstype: str | None, flags: int, data: str = "") -> None:
    _call(f"mount {target}", _libc.mount(source.encode(), target.encode(),
                                         fstype.encode() if fstype else None,
                                         ctypes.c_ulong(flags), data.encode() or None))


def prctl(option: int, value: int) -> None:
    _libc.prctl(option, ctypes.c_ulong(value), 0, 0, 0)


def parse_users(spec: str) -> list[tuple[int, int, str]]:
    """'uid:gid:name,...' as [(uid, gid, name)]."""
    users = []
    for item in filter(None, spec.split(",")):
        uid, gid, name = item.split(":", 2)
        users.append((int(uid), int(gid), name))
    return users


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rexnet-sandboxd")
    parser.add_argument("--control", type=int, required=True)
    parser.add_argument("--users", default="")
    args = parser.parse_args(argv)
    users = parse_users(args.users)
    prctl(PR_SET_DUMPABLE, 0)
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_IGN)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # supervisors are reaped by the kernel
    control = socket.socket(fileno=args.control)
    while True:
        try:
            got = wire.receive(control)
        except (wire.WireError, OSError) as e:
            print(f"rexnet-sandboxd: a bad request from the worker: {e}", file=sys.stderr)
            continue
        if got is None:
            return 0  # the worker is gone; supervisors end as their sockets close
        _, fds = got
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            continue
        if os.fork() == 0:
            code = 1
            try:
                control.close()
                code = supervise(socket.socket(fileno=fds[0]), users)
            except BaseException as e:
                print(f"rexnet-sandboxd: job supervisor failed: {e!r}", file=sys.stderr)
            finally:
                os._exit(code)
        os.close(fds[0])


def _identity(sock: socket.socket, request: dict[str, Any], users: list[tuple[int, int, str]]
              ) -> tuple[int, int, str]:
    index = request.get("user")
    if index is None:
        _, uid, gid = struct.unpack("3i", sock.getsockopt(
            socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
        return uid, gid, ""
    if not isinstance(index, int) or not 0 <= index < len(users):
        raise wire.WireError(f"no job user {index!r} in the pool")
    return users[index]


def supervise(sock: socket.socket, users: list[tuple[int, int, str]]) -> int:
    """Run one job's sandbox for the worker at the other end of SOCK.

    Everything that does not depend on the job is done before its request comes (the
    worker asks for supervisors ahead of its jobs, so this one is a spare until then):
    the control group, the PID namespace and its init, which joins the group (a cgroup v1
    migration waits for an RCU grace period, ~10 ms). Once the job has ended its status
    goes to the worker first; the group is removed afterwards."""
    for sig in (signal.SIGCHLD, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    set_name(SPARE_NAME)
    unshare(CLONE_NEWNS)  # for mount_cgroups; the init makes the job's own from it
    mount("none", "/", None, MS_REC | MS_PRIVATE)
    group: JobCgroup | None = None
    try:
        mount_cgroups()
        group = JobCgroup(f"job-{os.getpid()}")
        group = group if group.dirs else None
    except OSError as e:
        print(f"rexnet-sandboxd: control group: {e}", file=sys.stderr)
    try:
        return _run(sock, users, group)
    finally:
        if group is not None:
            group.kill()
            group.remove()


def _run(sock: socket.socket, users: list[tuple[int, int, str]], group: JobCgroup | None
         ) -> int:
    unshare(CLONE_NEWPID)
    status_r, status_w = os.pipe()
    go, init_go = socket.socketpair()
    init = os.fork()
    if init == 0:
        os.close(status_r)
        sock.close()
        go.close()
        _init(init_go, group, status_w)
    os.close(status_w)
    init_go.close()
    try:
        if wire.receive(go) is None:  # the init could not join the job's group
            _end(init)
            print("rexnet-sandboxd: a job's init could not start", file=sys.stderr)
            return 1
        wire.send(sock, {"ready": init})
        got = wire.receive(sock)  # the job's request, once the worker has a job
    except OSError:  # the worker went (a spare's unread "ready" makes it a reset)
        got = None
    except BaseException:
        _end(init)
        raise
    if got is None:
        _end(init)
        return 0
    set_name("rexnet-sandbox")
    request, fds = got
    try:
        request["fds"] = _checked(request, fds)
        identity = _identity(sock, request, users)
        memory = _limit(group, request.get("limits", {}))
        wire.send(go, {"request": request, "identity": list(identity)}, fds)
    except BaseException:
        _end(init)
        raise
    finally:
        for fd in fds:
            os.close(fd)
    try:  # the job's mount namespace, held so that it is torn down after the report
        _, namespaces = wire.receive(go) or ({}, [])
    except (wire.WireError, OSError):
        namespaces = []
    go.close()
    status, connected, limit = _watch(sock, init, status_r, memory)
    os.waitpid(init, 0)  # once the init is reaped, every process of its namespace is gone
    if group is not None and group.memory_exceeded():
        limit = "memory"
    if connected:
        code = os.waitstatus_to_exitcode(status) if status is not None else -signal.SIGKILL
        with contextlib.suppress(OSError):
            wire.send(sock, {"code": max(code, 0) if code >= 0 else None,
                             "signal": -code if code < 0 else None, "limit": limit})
    sock.close()
    for fd in namespaces:  # its unmounts wait for an RCU grace period (~5 ms)
        os.close(fd)
    return 0


def _checked(request: dict[str, Any], fds: list[int]) -> list[int]:
    targets = request.get("fds")
    if (not isinstance(targets, list) or len(targets) != len(fds)
            or not all(isinstance(t, int) and 0 <= t < 1024 for t in targets)):
        raise wire.WireError("descriptors do not match their numbers")
    return targets


def _limit(group: JobCgroup | None, limits: dict[str, Any]) -> int:
    """Bound GROUP as LIMITS say; the memory bound left to the supervisor (0: none, or
    the kernel's)."""
    memory = int(limits.get("memory", 0))
    if group is None:
        return memory
    missing = group.limit(memory, int(limits.get("pids", 0)), float(limits.get("cpus", 0.0)))
    if "memory" in missing:
        print("rexnet-sandboxd: control group: no memory controller", file=sys.stderr)
        return memory
    return 0  # the kernel bounds it


def _end(init: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(init, signal.SIGKILL)
    os.waitpid(init, 0)


def set_name(name: str) -> None:
    """The process's name (comm): SPARE_NAME while it waits for a job."""
    _libc.prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0)


def program_dir(request: dict[str, Any]) -> str | None:
    """The directory of the job's program (the worker's COMMAND, found as the job will find
    it), so that a program kept below a private directory stays visible; None if unknown."""
    argv = request.get("argv") or []
    if not argv or not isinstance(argv[0], str):
        return None
    env = request.get("env", {})
    found = argv[0] if "/" in argv[0] else shutil.which(
        argv[0], path=env.get("PATH") if isinstance(env, dict) else None)
    return os.path.dirname(os.path.abspath(found)) if found else None


def private_dirs(cwd: str, *more: str | None) -> None:
    """A fresh tmpfs on each of PRIVATE_DIRS; a working directory CWD below one of them
    (the worker's --chdir, a job's own directory) and the directories MORE (the program's)
    stay where they were, bound into the new tmpfs."""
    kept = sorted({os.path.realpath(d) for d in (cwd, *more) if d and os.path.isdir(d)})
    for directory in PRIVATE_DIRS:
        if not os.path.isdir(directory) or os.path.islink(directory):
            continue
        inside = [d for d in kept if d.startswith(directory.rstrip("/") + "/")]
        handles = [os.open(d, os.O_PATH | os.O_DIRECTORY) for d in inside]
        try:
            mount("tmpfs", directory, "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
            for d, handle in zip(inside, handles, strict=True):
                os.makedirs(d, 0o755, exist_ok=True)
                mount(f"/proc/self/fd/{handle}", d, None, MS_BIND | MS_REC)
        finally:
            for handle in handles:
                os.close(handle)


def _watch(sock: socket.socket, init: int, status_r: int, memory: int
           ) -> tuple[int | None, bool, str]:
    """Pass signals on to the init until the command ends (its wait status) or the
    worker's socket closes (the namespace is then killed). MEMORY, when there is no control
    group to bound it: the namespace's resident memory is checked every MEMORY_CHECK s."""
    connected, limit = True, ""
    ended = os.pidfd_open(init)  # readable once the init has exited: one wake-up, not two
    try:
        while True:
            watched = [sock.fileno(), ended] if connected else [ended]
            ready, _, _ = select.select(watched, [], [], MEMORY_CHECK if memory else None)
            if ended in ready:
                os.set_blocking(status_r, False)
                with contextlib.suppress(BlockingIOError):
                    data = os.read(status_r, 64)
                    return (int(data) if data else None), connected, limit
                return None, connected, limit
            connected = _signals(sock, init, connected, ready)
            if memory and not limit and namespace_rss(init) > memory:
                limit = "memory"
                os.kill(init, signal.SIGKILL)
    finally:
        os.close(ended)


def _signals(sock: socket.socket, init: int, connected: bool, ready: list[int]) -> bool:
    """Pass on a signal the worker sent; whether the worker is still connected."""
    if not connected or sock.fileno() not in ready:
        return connected
    try:
        got = wire.receive(sock)
    except (wire.WireError, OSError):
        got = None
    if got is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(init, signal.SIGKILL)  # the kernel ends every process of the namespace
        return False
    message, extra = got
    for fd in extra:
        os.close(fd)
    number = message.get("signal")
    if number == signal.SIGKILL:  # the kernel ends every process of the namespace
        with contextlib.suppress(ProcessLookupError):
            os.kill(init, signal.SIGKILL)
    elif isinstance(number, int) and number in FORWARDED:
        with contextlib.suppress(ProcessLookupError):
            os.kill(init, number)
    return True


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


def mount_cgroups() -> None:
    """Mount the host's control group hierarchies on /sys/fs/cgroup where this mount
    namespace lacks them (`ip netns exec` mounts a fresh /sys without them)."""
    if cgroups.version() or not os.path.isdir("/sys/fs/cgroup"):
        return
    with open("/proc/self/cgroup") as f:
        hierarchies = [line.split(":")[1] for line in f.read().splitlines()]
    if hierarchies == [""]:
        mount("cgroup2", "/sys/fs/cgroup", "cgroup2", MS_NOSUID | MS_NODEV | MS_NOEXEC)
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


def _init(go: socket.socket, group: JobCgroup | None, status_w: int) -> None:
    """PID 1 of the job's namespace: join the job's group, wait for the job, make its
    mount namespace (a private /tmp ...), start the command, pass signals on, report its
    end."""
    status = 0
    try:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if group is not None:
            group.join()
        wire.send(go, {"joined": True})
        got = wire.receive(go)
        if got is None:
            os._exit(0)
        message, fds = got
        request, identity = message["request"], message["identity"]
        set_name("rexnet-init")
        unshare(CLONE_NEWNS)
        private_dirs(str(request.get("cwd") or "/"), program_dir(request))
        mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
        command = 0

        def forward(number: int, frame: Any) -> None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(command, number)

        for sig in FORWARDED:
            with contextlib.suppress(OSError, ValueError):
                signal.signal(sig, forward)
        command = os.fork()
        if command == 0:
            go.close()
            _exec(request, fds, request["fds"], (int(identity[0]), int(identity[1]),
                                                 str(identity[2])))
        for fd in fds:
            os.close(fd)
        with contextlib.suppress(OSError):
            namespace = os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
            wire.send(go, {"mnt": True}, [namespace])
            os.close(namespace)
        go.close()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)
        while True:
            pid, status = os.waitpid(-1, 0)
            if pid == command:
                break
        os.write(status_w, str(status).encode())
    finally:
        os._exit(0)


def _exec(request: dict[str, Any], fds: list[int], targets: list[int],
          identity: tuple[int, int, str]) -> None:
    """The command's process: its descriptors, session, terminal and user; then exec."""
    try:
        for sig in FORWARDED:
            with contextlib.suppress(OSError, ValueError):
                signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        os.setsid()
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 1024) for fd in fds]
        for fd, target in zip(high, targets, strict=True):
            os.dup2(fd, target)
        keep = sorted(set(targets))
        previous = -1
        for fd in keep:
            if fd > previous + 1:  # closerange(n, n) would close everything from n
                os.closerange(previous + 1, fd)
            previous = fd
        os.closerange(previous + 1, 65536)
        if request.get("tty"):
            fcntl.ioctl(0, termios.TIOCSCTTY, 1)
        uid, gid, name = identity
        if name:
            os.initgroups(name, gid)
        else:
            os.setgroups([gid] if uid else [0])
        os.setgid(gid)
        os.setuid(uid)
        env = dict(request.get("env", {}))
        if name:  # a job user has no home of its own: the job's private /tmp
            env.update(USER=name, LOGNAME=name, HOME="/tmp")
        os.chdir(request.get("cwd") or "/")
        argv = request["argv"]
        os.execvpe(argv[0], argv, env)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.write(2, f"rexnet: cannot start the job: {e}\n".encode())
    os._exit(127)


if __name__ == "__main__":
    sys.exit(main())
