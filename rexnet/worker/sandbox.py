"""Job isolation, the worker's side: every job in a sandbox of its own.

Design. Switching a job to a uid of its own, unsharing namespaces, mounting and making
control groups all need root; the worker should not keep it (it parses network input).
So a worker started as root (e.g. `twistd -u rexnet -g rexnet ...`) starts, while it is
still root, a small helper (rexnet.worker.sandboxd) and keeps one end of a socketpair to
it; then twistd drops the worker's privileges for good (no saved uid, no capabilities).
Root stays in the helper, which reads nothing from the network, runs no job code and
starts only what the worker's socket asks, only as the worker's own uid or as a user of
the pool fixed at start (--job-users): a compromised worker can run code as the job
users, never as root. Ambient capabilities (CAP_SETUID, CAP_SETGID, CAP_KILL, and
CAP_SYS_ADMIN for namespaces and mounts) would have left the worker root in all but name.

Per job, the worker forks a *trampoline* in place of the job's process (Twisted sees an
ordinary child with pipes or a terminal, so streams, flow control and exit statuses work
as before): it hands the job's descriptors to a supervisor the helper forks for the job,
passes on the signals the worker sends it, and exits with the job's status once the
supervisor reports the end (and writes, on a pipe only the worker reads, whether the
memory bound ended the job). If the trampoline dies (the worker's SIGKILL after the
grace period, or the worker's death: PR_SET_PDEATHSIG), the supervisor kills the job's
PID namespace. Without root nothing of this is available, and the worker says so at
start; jobs then run as before (a process group, which setsid'd processes can leave).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import gc
import os
import pwd
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from twisted.application.service import Service
from twisted.internet import process
from twisted.logger import Logger

from rexnet.worker import cgroups
from rexnet.worker import sandboxwire as wire
from rexnet.worker.job import JobProcess
from rexnet.worker.spawn import SandboxedProcess, SandboxedTerminal, set_winsize

FORWARDED = [s for s in signal.valid_signals()
             if s not in (signal.SIGKILL, signal.SIGSTOP, signal.SIGCHLD, signal.SIGPIPE)]
PR_SET_PDEATHSIG, PR_SET_NAME = 1, 15
SPARE_NAME = "rexnet-spare"  # (comm) until its job comes; tests tell spares by it
FILL_DELAY = 0.01  # seconds after a job's end
TAKEN_FILL_DELAY = 0.1  # seconds after a job's start
SPARES = 2  # trampolines forked ahead of their jobs, per application

log = Logger()


class JobUsers:
    """The pool of job users (--job-users): one per running job, never two jobs at once."""

    def __init__(self, users: Sequence[tuple[int, int, str]]) -> None:
        self.users = list(users)
        self._free = list(range(len(self.users)))

    def __len__(self) -> int:
        return len(self.users)

    def acquire(self) -> int:
        if not self._free:
            raise OSError(errno.EAGAIN, "no free job user (all of --job-users are busy)")
        return self._free.pop(0)

    def release(self, index: int) -> None:
        if index not in self._free:
            self._free.append(index)

    def spec(self) -> str:
        return ",".join(f"{uid}:{gid}:{name}" for uid, gid, name in self.users)


def parse_job_users(text: str) -> list[tuple[int, int, str]]:
    """'rexjob0-15' (users rexjob0 ... rexjob15), '61000-61015' (uids without a passwd
    entry, each with the group of the same number) or a comma-separated list of those and
    of user names, as [(uid, gid, name or "")]. ValueError for unknown users or root."""
    users: list[tuple[int, int, str]] = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        match = re.fullmatch(r"(.*?)(\d+)-(\d+)", item)
        prefix, first, last = (match.group(1), int(match.group(2)), int(match.group(3))
                               ) if match else (item, -1, -1)
        names = ([f"{prefix}{n}" for n in range(first, last + 1)] if match else [item])
        if match and last < first:
            raise ValueError(f"{item}: an empty range")
        for name in names:
            if name.isdigit():
                users.append((int(name), int(name), ""))
                continue
            try:
                entry = pwd.getpwnam(name)
            except KeyError:
                raise ValueError(f"no such user: {name}") from None
            users.append((entry.pw_uid, entry.pw_gid, entry.pw_name))
    if any(uid == 0 for uid, _, _ in users):
        raise ValueError("root cannot be a job user")
    if len({uid for uid, _, _ in users}) != len(users):
        raise ValueError("a job user is named twice")
    return users


def missing_isolation() -> str:
    """What this worker cannot isolate (it is not root), for its start-up line."""
    return ("job isolation missing: not started as root, so jobs run as the worker's user, "
            "with no PID namespace, control group, private /tmp or job users: a job's "
            "setsid'd processes can outlive it, and jobs can signal each other")


class Sandbox:
    """The root helper of one worker, its pool of job users (None: the worker's uid) and
    its spare trampolines (SPARES, forked ahead of their jobs, each with its supervisor
    already prepared by the helper)."""

    def __init__(self, users: JobUsers | None = None, spares: int = SPARES) -> None:
        self.users = users
        self.spares = spares
        self.control: socket.socket | None = None
        self.helper: subprocess.Popen[bytes] | None = None
        self._ready: list[Spare] = []
        self._filling: Any = None

    def start(self) -> None:
        """Start the helper: while the worker is still root (privilegedStartService)."""
        ours, theirs = socket.socketpair()
        with theirs:
            self.helper = subprocess.Popen(
                [sys.executable, "-m", "rexnet.worker.sandboxd", "--control",
                 str(theirs.fileno()), "--users", self.users.spec() if self.users else ""],
                pass_fds=[theirs.fileno()], start_new_session=True, stdin=subprocess.DEVNULL)
        self.control = ours

    def stop(self) -> None:
        """Let the helper go (running jobs' supervisors end with their jobs; spares end)."""
        if self._filling is not None and self._filling.active():
            self._filling.cancel()
        while self._ready:
            self._ready.pop().discard()
        if self.control is not None:
            self.control.close()
            self.control = None

    def describe(self) -> str:
        version = cgroups.version()
        who = (f"{len(self.users)} job users" if self.users
               else "the worker's own user (give --job-users for a uid per job)")
        return (f"job isolation: a PID and a mount namespace per job (private /tmp), "
                f"{f'a cgroup v{version} per job' if version else 'no control groups'}, "
                f"jobs run as {who}")

    def _job_socket(self) -> socket.socket:
        if self.control is None:
            raise OSError(errno.ENOTCONN, "the sandbox helper is not running")
        mine, helper = socket.socketpair()
        try:
            wire.send(self.control, {"job": True}, [helper.fileno()])
        except OSError as e:
            mine.close()
            raise OSError(e.errno or errno.EPIPE, "the sandbox helper is gone") from e
        finally:
            helper.close()
        return mine

    def fill(self) -> None:
        """Fork spare trampolines up to SPARES (only once the worker has dropped root:
        a trampoline is a copy of the worker)."""
        self._filling = None
        self._ready = [spare for spare in self._ready if spare.alive]
        while self.control is not None and len(self._ready) < self.spares:
            try:
                self._ready.append(self._fork())
            except OSError as e:
                log.warn("cannot fork a spare trampoline: {error}", error=e)
                return

    def _fork(self) -> Spare:
        sock = self._job_socket()  # the helper prepares this trampoline's supervisor now
        mine, theirs = socket.socketpair()
        report_r, report_w = os.pipe()
        trampoline = Trampoline(sock, report_w, theirs)
        collect = gc.isenabled()
        gc.disable()
        try:
            pid = os.fork()
            if pid == 0:
                trampoline.run()  # never returns
        except BaseException:
            mine.close()
            os.close(report_r)
            raise
        finally:
            if collect:
                gc.enable()
            sock.close()
            theirs.close()
            os.close(report_w)
        return Spare(pid, mine, report_r)

    def refill(self, reactor: Any, delay: float = FILL_DELAY) -> None:
        """Fork the missing spares in DELAY seconds: after a job's end, not before its
        status is sent (a fork stalls the worker for a few ms); after a job's start, once
        a short job would have ended."""
        if reactor is None or len(self._ready) >= self.spares:
            return
        if self._filling is None or not self._filling.active():
            self._filling = reactor.callLater(delay, self.fill)
        elif self._filling.getTime() > reactor.seconds() + delay:
            self._filling.reset(delay)

    def _take(self) -> Spare:
        """A spare trampoline; forked now if none is ready."""
        while self._ready:
            spare = self._ready.pop(0)
            if spare.alive:
                return spare
            spare.discard()
        return self._fork()

    def spawn(self, reactor: Any, proto: JobProcess, argv: Sequence[str],
              env: Mapping[str, str], cwd: str | None) -> Any:
        """Start ARGV as PROTO's job in a sandbox of its own (see the module docstring)."""
        user = self.users.acquire() if self.users else None
        try:
            spare = self._take()
            self.refill(reactor, TAKEN_FILL_DELAY)
        except OSError:
            if user is not None and self.users:
                self.users.release(user)
            raise
        limits = proto.limits
        spare.request = {"argv": list(argv), "env": dict(env), "cwd": cwd or os.getcwd(),
                         "tty": bool(proto.start.tty), "user": user,
                         "limits": {"memory": limits.memory, "pids": limits.pids,
                                    "cpus": limits.cpus}}
        proto.isolation = Isolated(spare.report, self.users, user,
                                   lambda: self.refill(reactor))
        spare.report = -1  # Isolated's now
        try:
            if proto.start.tty:
                master, slave = os.openpty()
                set_winsize(slave, proto.start.rows or 24, proto.start.cols or 80)
                try:
                    return SandboxedTerminal(spare, reactor, argv[0], list(argv),
                                             None, None, proto, None, None,
                                             (master, slave, os.ttyname(slave)))
                except BaseException:
                    for fd in (master, slave):
                        with contextlib.suppress(OSError):
                            os.close(fd)
                    raise
            fds, children = proto.child_fds()
            try:
                return SandboxedProcess(spare, reactor, argv[0], list(argv), None, None,
                                        proto, None, None, fds)
            finally:
                for child in children.values():
                    child.close()
        except BaseException:
            spare.discard()
            proto.isolation.finish()
            raise


class Spare:
    """A trampoline forked ahead of its job, as the worker holds it: its pid, the socket
    that hands it the job, and the pipe of its report (read by Isolated)."""

    def __init__(self, pid: int, control: socket.socket, report: int) -> None:
        self.pid = pid
        self.control: socket.socket | None = control
        self.report = report
        self.alive = True
        self.request: dict[str, Any] = {}
        process.registerReapProcessHandler(pid, self)

    # what Twisted's reaper calls while the spare waits
    def reapProcess(self) -> None:
        with contextlib.suppress(ChildProcessError):
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                process.unregisterReapProcessHandler(pid, self)
                self.processEnded(status)

    def processEnded(self, status: int) -> None:
        self.alive = False

    def start(self, fdmap: Mapping[int, int]) -> int:
        """Hand the job (its request and the descriptors FDMAP) to the trampoline; its pid
        for the Process, which reaps it from now on."""
        if self.control is None or not self.alive:
            raise OSError(errno.ESRCH, "the spare trampoline is gone")
        targets = sorted(fdmap)
        try:
            wire.send(self.control, {**self.request, "fds": targets},
                      [fdmap[t] for t in targets])
        except OSError as e:
            raise OSError(e.errno or errno.EPIPE, "the spare trampoline is gone") from e
        self.control.close()
        self.control = None
        if self.alive:
            process.unregisterReapProcessHandler(self.pid, self)
        return self.pid

    def discard(self) -> None:
        """A spare no job will use: it ends when its socket closes (and is reaped then)."""
        if self.control is not None:
            self.control.close()
            self.control = None
        if self.report >= 0:
            os.close(self.report)
            self.report = -1


class SandboxService(Service):
    """Starts a Sandbox's helper before twistd drops the worker's privileges."""

    def __init__(self, sandbox: Sandbox) -> None:
        self.sandbox = sandbox

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self.sandbox.start()
        log.info("{isolation}", isolation=self.sandbox.describe())

    def startService(self) -> None:
        super().startService()
        if self.sandbox.control is None:  # not started by twistd (a .tac, a test)
            self.sandbox.start()
            log.info("{isolation}", isolation=self.sandbox.describe())
        from twisted.internet import reactor
        reactor.callWhenRunning(self.sandbox.fill)  # type: ignore[attr-defined]

    def stopService(self) -> None:
        super().stopService()
        self.sandbox.stop()


class Isolated:
    """A sandboxed job's end, for its JobProcess: the limit that ended it, if any."""

    def __init__(self, report: int, users: JobUsers | None, user: int | None,
                 ended: Callable[[], None] = lambda: None) -> None:
        self.report = report
        self.users = users
        self.user = user
        self.ended = ended

    def finish(self) -> str:
        """Once the trampoline is gone: release the job user, read the report."""
        if self.report < 0:
            return ""
        if self.users is not None and self.user is not None:
            self.users.release(self.user)
        os.set_blocking(self.report, False)
        try:
            said = os.read(self.report, 64).decode(errors="replace")
        except OSError:
            said = ""
        os.close(self.report)
        self.report = -1
        self.ended()
        return said if said == "memory" else ""


class Trampoline:
    """What a spare, forked from the worker ahead of its job, does: stand for the job."""

    def __init__(self, sock: socket.socket, report: int, control: socket.socket) -> None:
        self.sock = sock
        self.report = report
        self.control = control
        self.parent = os.getpid()

    def run(self) -> None:
        """In the forked child: never returns."""
        code = 255
        try:
            signal.set_wakeup_fd(-1)
            signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
            for sig in FORWARDED:
                with contextlib.suppress(OSError, ValueError):
                    signal.signal(sig, signal.SIG_DFL)
            signal.signal(signal.SIGPIPE, signal.SIG_IGN)
            libc = ctypes.CDLL(None)
            libc.prctl(PR_SET_PDEATHSIG, ctypes.c_ulong(signal.SIGKILL), 0, 0, 0)
            if os.getppid() != self.parent:
                os._exit(code)
            os.setsid()
            libc.prctl(PR_SET_NAME, SPARE_NAME.encode(), 0, 0, 0)
            keep = sorted({self.sock.fileno(), self.report, self.control.fileno()})
            previous = -1
            for fd in keep:
                if fd > previous + 1:  # closerange(n, n) would close everything from n
                    os.closerange(previous + 1, fd)
                previous = fd
            os.closerange(previous + 1, 65536)  # close_range(2) since Python 3.10
            got = wire.receive(self.control)  # the job, or EOF: not needed
            if got is None:
                code = 0
                raise SystemExit
            request, fds = got
            self.control.close()
            libc.prctl(PR_SET_NAME, b"rexnet-job", 0, 0, 0)
            wire.send(self.sock, request, fds)
            for fd in set(fds):
                os.close(fd)

            def forward(number: int, frame: Any) -> None:
                with contextlib.suppress(OSError):
                    wire.send(self.sock, {"signal": number})

            for sig in FORWARDED:
                with contextlib.suppress(OSError, ValueError):
                    signal.signal(sig, forward)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)
            got = wire.receive(self.sock)
            if got is None:
                code = 128 + signal.SIGKILL
                raise SystemExit
            end = got[0]
            for sig in FORWARDED:
                with contextlib.suppress(OSError, ValueError):
                    signal.signal(sig, signal.SIG_DFL)
            os.write(self.report, str(end.get("limit") or "").encode())
            number = end.get("signal")
            if isinstance(number, int) and number > 0:
                code = 128 + number
                os.kill(os.getpid(), number)  # exit as the job did, by its signal
            else:
                code = int(end.get("code") or 0)
        except BaseException:  # nothing may escape into the worker's code
            pass
        os._exit(code)
