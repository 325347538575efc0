"""The Python init of a sandboxed job: PID 1 of its namespace where no C init was built.

rexnet-sandbox-init (rexnet/worker/native/init.c) does the same in C and is what the root
sandbox helper (rexnet.worker.sandboxd) spawns where a compiler worked; where it was not
built (or REXNET_SANDBOX_INIT=python) the helper forks this instead, in the job's new PID
namespace, with only the socket to the helper and the status pipe left open. It speaks
nearly the C init's language to the helper: one byte once it has joined the job's control
group, the job's request (a sandboxwire message, checked by the helper, and the job's
descriptors), and the command's wait status on the status pipe; it makes the job's mount
namespace only with the request, so it sends it (one byte carrying it) once the command is
started, where the C init hands it over with the first byte.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import resource
import signal
import socket
import termios
from typing import Any

from rexnet.worker import sandboxwire as wire
from rexnet.worker.cgroups import JobCgroup
from rexnet.worker.nsutil import (
    CLONE_NEWNS,
    MS_NODEV,
    MS_NOEXEC,
    MS_NOSUID,
    PR_SET_PDEATHSIG,
    mount,
    prctl,
    private_dirs,
    program_dir,
    set_name,
    unshare,
)

SPARE_NAME = "rexnet-spare"  # a sandbox's init until its job comes (as the C init's)
FORWARDED = [s for s in signal.valid_signals()
             if s not in (signal.SIGKILL, signal.SIGSTOP, signal.SIGCHLD)]




def close_all_but(keep: set[int]) -> None:
    """Close every descriptor of this process but KEEP (a fork of the helper holds other
    jobs' sockets and descriptors)."""
    previous = -1
    for fd in sorted(keep):
        if fd > previous + 1:  # closerange(n, n) would close everything from n
            os.closerange(previous + 1, fd)
        previous = fd
    os.closerange(previous + 1, 65536)


def init(go: socket.socket, group: JobCgroup | None, status_w: int, nofile: int = 0
         ) -> None:
    """PID 1 of the job's namespace (a fork of the helper): join the job's group, wait for
    the job, make its mount namespace (a private /tmp ...), start the command (NOFILE: its
    soft bound on descriptors, 0: the helper's), pass signals on, report its end."""
    status = 0
    try:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        set_name(SPARE_NAME)
        for sig in (signal.SIGCHLD, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        close_all_but({0, 1, 2, go.fileno(), status_w})
        go.setblocking(True)
        if group is not None:
            group.join()
        wire.send_with_fds(go, b"j")
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
                                                 str(identity[2])), nofile)
        for fd in fds:
            os.close(fd)
        with contextlib.suppress(OSError):
            namespace = os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
            wire.send_with_fds(go, b"m", [namespace])
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
          identity: tuple[int, int, str], nofile: int = 0) -> None:
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
        close_all_but(set(targets))
        if request.get("tty"):
            fcntl.ioctl(0, termios.TIOCSCTTY, 1)
        if nofile:  # the worker's bound, not the helper's (after the moves above)
            _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(nofile, hard), hard))
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
