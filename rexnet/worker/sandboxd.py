"""The root sandbox helper: `python -m rexnet.worker.sandboxd --control FD [--users SPEC]`.

A worker started as root starts this helper before twistd drops its privileges
(rexnet.worker.sandbox), and keeps one end of a socketpair to it: root stays here, in a
process that reads nothing from the network and runs no job code. One process, one event
loop (epoll over every job's sockets and its init's pidfd), no fork per job. For each
socket the worker sends it (ahead of a job: rexnet.worker.sandbox keeps spares) it

- names a control group for the job (memory, pids and CPU bounds; rexnet.worker.cgroups)
  and spawns an init as PID 1 of a new PID namespace (rexnet-sandbox-init, the C program
  of rexnet.worker.nativeinit; else a fork of this process, rexnet.worker.sandboxinit).
  The C init makes the group (a fresh one: it refuses one that exists; the Python init's
  is made here) and joins it itself (a cgroup v1 mkdir and migration wait for the cgroup
  lock and an RCU grace period, ~10 ms, that no job and no other job's event waits for);
  once it says so the worker is told "ready" with the init's pid;

and when the worker's job comes on the socket (the request, the job's descriptors):

- sets the group's bounds and hands the request to the init, which unshares a mount
  namespace with a private tmpfs on /tmp, /var/tmp and /dev/shm and starts the command
  (setsid; the terminal as its controlling terminal; the job user's uid, gids and groups)
  and passes on the signals the worker sends (SIGKILL: to the init, which ends every
  process of the namespace),
- when the init ends (the command ended, or the worker's socket closed: the helper then
  killed the init; the kernel ends every process of the namespace before the init's pidfd
  says so), the worker is told the status and whether the memory bound ended the job, and
  only then, in a clean-up thread (Cleanup), the control group is killed too (belt and
  braces) and removed and the job's mount namespace let go (its unmounts wait for RCU too).

One job's failure touches no other: a message is read as it comes (never waiting for a
peer), a bad one ends that job's sandbox only; signals go through pidfds (never to a
reused pid). If the helper dies, every init dies with it (PDEATHSIG) and so every job.
The helper makes one mount namespace for itself at start (a slave of the host's: later host
mounts still reach new jobs, nothing mounted here reaches the host). A job user comes from
the pool given at start (--users uid:gid:name,...), by index; with no pool the job runs as
the worker's own uid and gid (SO_PEERCRED of its socket).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import itertools
import os
import resource
import select
import signal
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

from rexnet.worker import nativeinit, sandboxinit
from rexnet.worker import sandboxwire as wire
from rexnet.worker.cgroups import JobCgroup
from rexnet.worker.nsutil import (
    CLONE_NEWNS,
    CLONE_NEWPID,
    MS_REC,
    MS_SLAVE,
    PR_SET_DUMPABLE,
    kept_dirs,
    mount,
    mount_cgroups,
    prctl,
    program_dir,
    setns,
    unshare,
)
from rexnet.worker.nsutil import MS_BIND as MS_BIND  # tests/test_launcher_checks.py uses it
from rexnet.worker.sandboxcleanup import Cleanup
from rexnet.worker.sandboxinit import FORWARDED, SPARE_NAME
from rexnet.worker.sandboxrequest import (
    checked_fds,
    controllers,
    namespace_rss,
    request_identity,
    set_bounds,
)

__all__ = ["SPARE_NAME", "main", "namespace_rss", "parse_users"]

MEMORY_CHECK = 0.2  # seconds between checks of a memory bound no control group keeps
SEND_TIMEOUT = 5.0  # seconds an init may take to read its job's request
JOB_NOFILE = 0  # the jobs' soft bound on descriptors (the worker's), once main() started


def parse_users(spec: str) -> list[tuple[int, int, str]]:
    """'uid:gid:name,...' as [(uid, gid, name)]."""
    users = []
    for item in filter(None, spec.split(",")):
        uid, gid, name = item.split(":", 2)
        users.append((int(uid), int(gid), name))
    return users


def complain(what: str) -> None:
    """One line on stderr, a pipe the worker reads into its log (rexnet.worker.helperlog);
    lost, never fatal, once the worker is gone."""
    line = f"rexnet-sandboxd: {what}".replace("\n", " ")
    with contextlib.suppress(OSError):
        os.write(2, (line + "\n").encode(errors="replace"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rexnet-sandboxd")
    parser.add_argument("--control", type=int, required=True)
    parser.add_argument("--users", default="")
    args = parser.parse_args(argv)
    prctl(PR_SET_DUMPABLE, 0)
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_IGN)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # inits are reaped once ended (their
    # CPU, and their jobs', then counts in this process's children's times)
    os.set_inheritable(args.control, False)  # no init inherits it
    # a few descriptors per sandbox, all in this process: as many as allowed (the jobs'
    # commands get the worker's own bound back: JOB_NOFILE)
    global JOB_NOFILE
    JOB_NOFILE, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    # one mount namespace for the helper (for mount_cgroups; each job's init makes its own
    # from it): a slave of the host's, so that later mounts still reach new jobs, and
    # nothing mounted here reaches the host
    unshare(CLONE_NEWNS)
    mount("none", "/", None, MS_REC | MS_SLAVE)
    try:
        mount_cgroups()
    except OSError as e:
        complain(f"control groups: {e}")
    helper = Helper(socket.socket(fileno=args.control), parse_users(args.users),
                    nativeinit.find())
    return helper.run()


class Job:
    """One sandbox: the worker's socket, the init (pid, pidfd, control socket, status
    pipe) and the control group; joining -> spare -> running -> ended."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock: socket.socket | None = sock
        self.reader = wire.Reader(sock)
        self.state = "joining"
        self.group: JobCgroup | None = None
        self.init = 0
        self.pidfd = -1
        self.go: socket.socket | None = None
        self.status_r = -1
        self.namespaces: list[int] = []
        self.memory = 0  # a bound the helper checks itself (no memory controller)
        self.limit = ""

    def kill(self, number: int = signal.SIGKILL) -> None:
        """Signal the init (SIGKILL: the kernel ends every process of the namespace)."""
        if self.pidfd >= 0:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self.pidfd, number)


class Helper:
    """The event loop: the worker's control socket, and per job its socket, its init's
    control socket and pidfd."""

    def __init__(self, control: socket.socket, users: list[tuple[int, int, str]],
                 native: str | None) -> None:
        self.users = users
        self.native = native
        self.server: nativeinit.Server | None = None  # the fork server of spare inits
        if native:
            try:
                self.server = nativeinit.Server(native)
            except OSError as e:
                complain(f"no init server ({e}): an exec per spare")
        # epoll itself, not selectors: a job's three descriptors (its socket, its init's
        # socket and pidfd) come and go with it, and selectors' keys cost tens of us a job
        self.epoll = select.epoll()
        self.watched: dict[int, tuple[Any, Callable[[], None]]] = {}  # fd: (object, callback)
        self.bounded: set[Job] = set()  # running jobs with a memory bound the helper checks
        control.setblocking(False)
        self.control: socket.socket | None = control
        self.control_reader = wire.Reader(control)
        self._watch(control, self._from_control)
        self.own_pid_namespace = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
        self.jobs: set[Job] = set()
        self.unreaped: set[int] = set()
        self.names = (f"job-{os.getpid()}-{n}" for n in itertools.count(1))
        self.cleanup = Cleanup(complain)

    def run(self) -> int:
        """Until the worker is gone and every job has ended; 0."""
        checked = time.monotonic()
        watched = self.watched
        while self.control is not None or self.jobs:
            self.cleanup.flush()  # while this loop waits: no contention for the GIL
            events = self.epoll.poll(MEMORY_CHECK if self.bounded else -1)
            # an earlier callback may have closed a descriptor (and its number be reused):
            # only the callbacks watching when the events came are called
            for entry in [watched.get(fd) for fd, _ in events]:
                if entry is not None and watched.get(_fileno(entry[0])) is entry:
                    entry[1]()
            if self.bounded and time.monotonic() - checked >= MEMORY_CHECK:
                checked = time.monotonic()
                for job in list(self.bounded):
                    if not job.limit and namespace_rss(job.init) > job.memory:
                        job.limit = "memory"
                        job.kill()
        self._reap()
        self.epoll.close()
        self.cleanup.close()
        self._close_server()
        return 0

    def _reap(self) -> None:
        """Reap the inits that have ended (a zombie's pidfd is readable: at once)."""
        for pid in list(self.unreaped):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                self.unreaped.discard(pid)

    def _close_server(self) -> None:
        """Let the init server go (reaped with the inits)."""
        if self.server is not None:
            self.server.close()
            self.unreaped.add(self.server.pid)
            self.server = None
        self._reap()

    def _watch(self, fileobj: Any, callback: Callable[[], None]) -> None:
        """Call CALLBACK when FILEOBJ (a socket or a descriptor) is readable."""
        fd = _fileno(fileobj)
        self.epoll.register(fd, select.EPOLLIN)
        self.watched[fd] = (fileobj, callback)

    def _unwatch(self, fileobj: Any) -> None:
        """No more callbacks for FILEOBJ (before it is closed)."""
        fd = _fileno(fileobj)
        entry = self.watched.get(fd)
        if entry is None or entry[0] != fileobj:  # (a socket's == is identity)
            return
        del self.watched[fd]
        with contextlib.suppress(OSError):
            self.epoll.unregister(fd)

    # -- the worker's control socket: a socket per sandbox to prepare -------------------

    def _from_control(self) -> None:
        assert self.control is not None
        reader = self.control_reader
        try:
            got = reader.read()
        except (wire.WireError, OSError) as e:  # the stream is lost: as if the worker went
            complain(f"a bad request from the worker: {e}")
            got, reader.ended = [], True
        for reason in reader.bad:
            complain(f"a bad request from the worker: {reason}")
        reader.bad.clear()
        for message, fds in got:
            if len(fds) == 1:
                self._prepare(Job(socket.socket(fileno=fds[0])), controllers(message))
            else:
                complain(f"a request with {len(fds)} sockets, not one")
                for fd in fds:
                    os.close(fd)
        if reader.ended:  # the worker is gone or let us go: spares end, jobs run on
            self._unwatch(self.control)
            self.control.close()
            self.control = None
            for job in self.jobs:
                if job.state != "running":
                    job.kill()

    def _prepare(self, job: Job, bounds: list[str] | None = None) -> None:
        """The job's control group (for the controllers of BOUNDS: None, all) and its init,
        in a new PID namespace."""
        try:  # (the C init makes its directories itself, out of this loop)
            group = JobCgroup(next(self.names), bounds, make=not self.native)
            job.group = group if group.paths else None
        except FileExistsError as e:  # another's group of this name: never joined (as the
            complain(f"control group: {e}")  # C init refuses it); no job in this sandbox
            self._drop(job)
            return
        except OSError as e:  # no control groups to be had here: the job runs without
            complain(f"control group: {e}")
        # the status pipe's read end never blocks the loop (its write end: a few bytes once)
        status_r, status_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        go, init_go = socket.socketpair()
        try:
            job.init = self._spawn(job, init_go, status_w)
            job.pidfd = os.pidfd_open(job.init)
        except OSError as e:
            complain(f"a job's init could not start: {e}")
            if job.init:  # our own unreaped child: its pid is not reused
                os.kill(job.init, signal.SIGKILL)
                self.unreaped.add(job.init)
            for fd in (status_r, go.detach()):
                os.close(fd)
            self._drop(job)
            return
        finally:
            os.close(status_w)
            init_go.close()
        job.status_r, job.go = status_r, go
        go.setblocking(False)
        self.jobs.add(job)
        self._watch(job.pidfd, lambda: self._ended(job))
        self._watch(go, lambda: self._from_init(job))

    def _spawn(self, job: Job, init_go: socket.socket, status_w: int) -> int:
        """The job's init, PID 1 of a new PID namespace: from the fork server, else
        spawned or forked here."""
        procs = job.group.procs() if job.group is not None else []
        if self.server is not None:
            try:
                return self.server.spawn(init_go, status_w, procs, JOB_NOFILE)
            except (OSError, ValueError) as e:  # it is gone, or this request is not for it
                complain(f"the init server: {e}")
                if not isinstance(e, ValueError) and e.errno != errno.EPROTO:
                    self._close_server()
        unshare(CLONE_NEWPID)  # the next child is PID 1 of a new namespace
        try:
            if self.native:
                return nativeinit.spawn(self.native, init_go, status_w, procs, JOB_NOFILE)
            pid = os.fork()  # the Python init (REXNET_SANDBOX_INIT=python, or no compiler)
            if pid == 0:
                sandboxinit.init(init_go, job.group, status_w, JOB_NOFILE)
            return pid
        finally:
            setns(self.own_pid_namespace, CLONE_NEWPID)  # and only that one

    def _drop(self, job: Job, namespaces: list[int] | None = None) -> None:
        """A sandbox that never ran a job, or whose job ended (its mount NAMESPACES to let
        go): the worker sees its socket close; one hand-over to the clean-up."""
        if job.group is not None or namespaces:
            self.cleanup.put(namespaces or [], job.group)
            job.group = None
        if job.sock is not None:
            job.reader.close()
            self._unwatch(job.sock)
            job.sock.close()
            job.sock = None

    # -- a job's init ------------------------------------------------------------------

    def _read_init(self, job: Job) -> tuple[bytes, list[int]] | None:
        """A byte from the init and the descriptor it carried; None: nothing yet."""
        assert job.go is not None
        try:
            data, ancillary, _, _ = job.go.recvmsg(1, socket.CMSG_SPACE(4),
                                                   socket.MSG_CMSG_CLOEXEC)
        except BlockingIOError:
            return None
        except OSError:
            return b"", []
        return data, wire.descriptors(ancillary)

    def _from_init(self, job: Job) -> None:
        """The init joined its group (one byte; the C init's carries its mount namespace,
        the Python init sends it once the command is started), or ended."""
        got = self._read_init(job)
        if got is None:
            return
        data, fds = got
        if job.state == "joining" and data == b"j" and len(fds) <= 1 and job.sock is not None:
            job.namespaces.extend(fds)  # held: it is torn down after the report
            job.state = "spare"
            if job.group is not None:  # the init made it and joined it
                job.group.made = True
            try:
                wire.send_with_fds(job.sock, wire.ready(job.init))
            except OSError:  # the worker went
                self._worker_gone(job)
                return
            self._watch(job.sock, lambda: self._from_worker(job))
            return
        job.namespaces.extend(fds)  # held: it is torn down after the report
        if job.state == "joining":
            complain("a job's init could not start")
            job.kill()
            self._drop(job)
            self._close_init(job)
        elif not data:
            self._close_init(job)

    def _close_init(self, job: Job) -> None:
        if job.go is not None:
            self._unwatch(job.go)
            job.go.close()
            job.go = None

    def _ended(self, job: Job) -> None:
        """The init has ended, and with it every process of the namespace: the status to
        the worker, then the rest (the init reaped, the clean-up)."""
        status: int | None = None
        with contextlib.suppress(OSError, ValueError):  # (a non-blocking pipe)
            status = int(os.read(job.status_r, 64))
        if job.group is not None and job.group.memory_exceeded():
            job.limit = "memory"
        if job.sock is not None and job.state == "running":
            code = os.waitstatus_to_exitcode(status) if status is not None else -signal.SIGKILL
            with contextlib.suppress(OSError):
                wire.send_with_fds(job.sock, wire.ended(code if code >= 0 else None,
                                                        -code if code < 0 else None, job.limit))
        self._unwatch(job.pidfd)
        self.bounded.discard(job)
        self.unreaped.add(job.init)
        self._reap()
        while job.go is not None:  # (after the report) the Python init's mount namespace
            got = self._read_init(job)  # may be waiting there still; then its EOF
            if got is not None:
                job.namespaces.extend(got[1])
            if got is None or not got[0]:
                self._close_init(job)
        namespaces, job.namespaces = job.namespaces, []
        self._drop(job, namespaces)
        os.close(job.pidfd)
        os.close(job.status_r)
        job.pidfd = job.status_r = -1
        job.state = "ended"
        self.jobs.discard(job)

    # -- the worker's socket of a job --------------------------------------------------

    def _from_worker(self, job: Job) -> None:
        got: list[tuple[dict[str, Any], list[int]]] = []
        try:
            got = job.reader.read(1)  # one at a time: the request, then signals
            if job.reader.bad:
                raise wire.WireError(job.reader.bad[0])
        except (wire.WireError, OSError) as e:
            if not isinstance(e, (ConnectionResetError, BrokenPipeError)):  # else: let go
                complain(f"job {job.init}: a bad message from the worker: {e}")
            for _, fds in got:
                for fd in fds:
                    os.close(fd)
            self._worker_gone(job)
            return
        for message, fds in got:
            if job.state == "spare":
                self._start(job, message, fds)
            else:
                for fd in fds:
                    os.close(fd)
                self._signal(job, message.get("signal"))
        if job.reader.ended:
            self._worker_gone(job)

    def _worker_gone(self, job: Job) -> None:
        """The worker ended the job, or died: the init and the namespace end; no report."""
        job.kill()
        if job.sock is not None:
            self._unwatch(job.sock)
            job.reader.close()
            job.sock.close()
            job.sock = None

    def _signal(self, job: Job, number: object) -> None:
        if isinstance(number, int) and (number == signal.SIGKILL or number in FORWARDED):
            job.kill(number)

    def _start(self, job: Job, request: dict[str, Any], fds: list[int]) -> None:
        """Bound the group and hand the request and the job's descriptors to the init."""
        assert job.sock is not None and job.go is not None
        job.state = "running"
        try:
            request["fds"] = checked_fds(request, fds)
            identity = request_identity(job.sock, request, self.users)
            job.memory = set_bounds(job.group, request.get("limits", {}), job.init)
            if job.memory:
                self.bounded.add(job)
            if self.native:
                env = request.get("env", {})
                if not isinstance(env, dict) or not isinstance(request.get("argv"), list):
                    raise wire.WireError("a request without argv or env")
                env = dict(env)
                if identity[2]:  # a job user has no home of its own: the job's private /tmp
                    env.update(USER=identity[2], LOGNAME=identity[2], HOME="/tmp")
                cwd = str(request.get("cwd") or "/")
                nativeinit.send(job.go, nativeinit.encode(
                    request["argv"], env, cwd, bool(request.get("tty")), identity,
                    request["fds"], kept_dirs(cwd, program_dir(request))), fds, SEND_TIMEOUT)
            else:
                job.go.settimeout(SEND_TIMEOUT)
                wire.send(job.go, {"request": request, "identity": list(identity)}, fds)
                job.go.setblocking(False)
        except (wire.WireError, ValueError, TypeError, KeyError, OSError) as e:
            complain(f"job {job.init}: cannot start it: {e!r}")
            self._worker_gone(job)  # as before: the worker sees the socket close
        finally:
            for fd in fds:
                os.close(fd)


def _fileno(fileobj: Any) -> int:
    return fileobj if isinstance(fileobj, int) else int(fileobj.fileno())


if __name__ == "__main__":
    sys.exit(main())
