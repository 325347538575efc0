"""The root sandbox helper: `python -m rexnet.worker.sandboxd --control FD [--users SPEC]`.

A worker started as root starts this helper before twistd drops its privileges
(rexnet.worker.sandbox), and keeps one end of a socketpair to it: root stays here, in a
process that reads nothing from the network and runs no job code. For each socket the
worker sends it (ahead of a job: rexnet.worker.sandbox keeps spares), the helper forks a
*supervisor*, which at once

- makes a control group for the job (memory, pids and CPU bounds; rexnet.worker.cgroups),
  and a PID namespace whose first process, a small init, is in the group (a cgroup v1
  migration waits for an RCU grace period: ~10 ms that no job waits for), then says
  "ready" with the init's pid. The init is a C program where one was built
  (rexnet.worker.nativeinit: spawned, and its fork for the command costs little), else a
  fork of the supervisor;

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

The helper makes one mount namespace for itself and its supervisors at start (a slave of
the host's: later host mounts still reach new jobs, nothing mounted here reaches the host).
A job user comes from the pool given at start (--users uid:gid:name,...), by index; with
no pool the job runs as the worker's own uid and gid (SO_PEERCRED of its socket).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import gc
import os
import select
import signal
import socket
import struct
import sys
import termios
from typing import Any

from rexnet.worker import nativeinit
from rexnet.worker import sandboxwire as wire
from rexnet.worker.cgroups import JobCgroup
from rexnet.worker.nsutil import (
    CLONE_NEWNS,
    CLONE_NEWPID,
    MS_NODEV,
    MS_NOEXEC,
    MS_NOSUID,
    MS_REC,
    MS_SLAVE,
    PR_SET_DUMPABLE,
    PR_SET_PDEATHSIG,
    kept_dirs,
    mount,
    mount_cgroups,
    prctl,
    private_dirs,
    program_dir,
    set_name,
    unshare,
)
from rexnet.worker.nsutil import MS_BIND as MS_BIND  # tests/test_launcher_checks.py uses it

SPARE_NAME = "rexnet-spare"  # a sandbox's processes until their job comes
MEMORY_CHECK = 0.2
FORWARDED = [s for s in signal.valid_signals()
             if s not in (signal.SIGKILL, signal.SIGSTOP, signal.SIGCHLD)]

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
    native = nativeinit.find()
    prctl(PR_SET_DUMPABLE, 0)
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_IGN)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # supervisors are reaped by the kernel
    control = socket.socket(fileno=args.control)
    # one mount namespace for the helper and its supervisors (for mount_cgroups; each
    # job's init makes its own from it): a slave of the host's, so that later mounts
    # still reach new jobs, and nothing mounted here reaches the host
    unshare(CLONE_NEWNS)
    mount("none", "/", None, MS_REC | MS_SLAVE)
    try:
        mount_cgroups()
    except OSError as e:
        print(f"rexnet-sandboxd: control groups: {e}", file=sys.stderr)
    gc.freeze()  # forks share these pages: no collection may touch (and copy) them
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
            gc.disable()  # short-lived, ends with os._exit: nothing to collect
            code = 1
            try:
                control.close()
                os.set_inheritable(fds[0], False)
                code = supervise(socket.socket(fileno=fds[0]), users, native)
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


def supervise(sock: socket.socket, users: list[tuple[int, int, str]],
              native: str | None = None) -> int:
    """Run one job's sandbox for the worker at the other end of SOCK.

    Everything that does not depend on the job is done before its request comes (the
    worker asks for supervisors ahead of its jobs, so this one is a spare until then):
    the control group, the PID namespace and its init, which joins the group (a cgroup v1
    migration waits for an RCU grace period, ~10 ms). Once the job has ended its status
    goes to the worker first; the group is removed afterwards. NATIVE: the C init
    (rexnet.worker.nativeinit), else the init is a fork of this process."""
    for sig in (signal.SIGCHLD, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    set_name(SPARE_NAME)
    group: JobCgroup | None = None
    try:
        group = JobCgroup(f"job-{os.getpid()}")
        group = group if group.dirs else None
    except OSError as e:
        print(f"rexnet-sandboxd: control group: {e}", file=sys.stderr)
    try:
        return _run(sock, users, group, native)
    finally:
        if group is not None:
            group.kill()
            group.remove()


def _run(sock: socket.socket, users: list[tuple[int, int, str]], group: JobCgroup | None,
         native: str | None) -> int:
    unshare(CLONE_NEWPID)
    status_r, status_w = os.pipe()
    go, init_go = socket.socketpair()
    if native:
        init = nativeinit.spawn(native, init_go, status_w)
    else:
        init = os.fork()
        if init == 0:
            os.close(status_r)
            sock.close()
            go.close()
            _init(init_go, group, status_w)
    os.close(status_w)
    init_go.close()
    try:
        if not _joined(go, init, group, native):  # the init could not join the job's group
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
        if native:
            env = request.get("env", {})
            if not isinstance(env, dict) or not isinstance(request.get("argv"), list):
                raise wire.WireError("a request without argv or env")
            env = dict(env)
            if identity[2]:  # a job user has no home of its own: the job's private /tmp
                env.update(USER=identity[2], LOGNAME=identity[2], HOME="/tmp")
            cwd = str(request.get("cwd") or "/")
            nativeinit.send(go, nativeinit.encode(
                request["argv"], env, cwd, bool(request.get("tty")), identity,
                request["fds"], kept_dirs(cwd, program_dir(request))), fds)
        else:
            wire.send(go, {"request": request, "identity": list(identity)}, fds)
    except BaseException:
        _end(init)
        raise
    finally:
        for fd in fds:
            os.close(fd)
    try:  # the job's mount namespace, held so that it is torn down after the report
        namespaces = (nativeinit.namespace(go) if native else
                      (wire.receive(go) or ({}, []))[1])
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


def _joined(go: socket.socket, init: int, group: JobCgroup | None, native: str | None
            ) -> bool:
    """Whether the init is in the job's GROUP: the C init is moved there (the ~10 ms of a
    cgroup v1 migration are the supervisor's, before any job); the Python init joins it."""
    if not native:
        return wire.receive(go) is not None
    try:
        if group is not None:
            group.join(init)
    except OSError as e:
        print(f"rexnet-sandboxd: control group: {e}", file=sys.stderr)
        return False
    return True


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
        set_name("rexnet-exec")
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
