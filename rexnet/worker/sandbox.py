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

Per job the worker forks nothing (a fork of the worker cost it ~5 ms of CPU, and the
copy as much again), nor does the helper fork Python: it prepares SPARES sandboxes ahead
of their jobs (each a control group and a PID namespace whose init has joined the group;
one event loop for all of them, rexnet.worker.sandboxd) and the worker keeps a socket to
each (the job's "supervisor" below: the helper's side of it). A job takes a ready one
(else the first being prepared: its start then waits for the "ready" in the reactor, which
never blocks on a spare; and as jobs outrun the refill, the worker asks for the missing
ones at once and keeps one more spare, up to GROWN_SPARES): the worker sends it the request
and the job's ends of its pipes or terminal, passes signals on over the socket (SIGKILL
ends every process of the job's namespace) and reads the job's end from it (Twisted's
Process and PTYProcess without fork and reaping: rexnet.worker.spawn). If the worker goes
(stopped, or killed), the helper sees the sockets close and kills the jobs' namespaces.
Without root nothing of this is available, and the worker says so at start; jobs then run
as before (a process group, which setsid'd processes can leave).
"""

from __future__ import annotations

import contextlib
import errno
import os
import pwd
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from twisted.application.service import Service
from twisted.internet.interfaces import IReadDescriptor
from twisted.logger import Logger
from zope.interface import implementer

from rexnet.worker import cgroups
from rexnet.worker import sandboxwire as wire
from rexnet.worker.helperlog import HelperLog
from rexnet.worker.job import JobProcess
from rexnet.worker.spawn import SandboxedProcess, SandboxedTerminal, set_winsize

SPARES = 2  # sandboxes the helper prepares ahead of their jobs, per application, at least
MAX_SPARES = 8  # ... and at most (the worker asks for one per slot)
GROWN_SPARES = 16  # at most after growing: a job that found no spare ready adds one
FIRST_FILL = 1.0  # seconds after start
REFILL_DELAY = 0.02  # seconds after a job took a spare
READY_TIMEOUT = 10.0  # seconds a job waits (in the reactor) for a supervisor being prepared
NOT_STARTED = 127 << 8  # the wait status of a job no supervisor could start

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
    SPARES supervisors the helper prepared ahead of their jobs."""

    def __init__(self, users: JobUsers | None = None, spares: int = SPARES,
                 bounds: Sequence[str] | None = None, grow_to: int = 0) -> None:
        """BOUNDS: the limits (memory, pids, cpus) the worker sets on its jobs, so that the
        helper makes their groups in those hierarchies only (None: in all). GROW_TO: how
        many spares it may keep at most, one more each time a job finds none ready."""
        self.users = users
        self.spares = spares
        self.grow_to = max(spares, grow_to)
        self.prepare: dict[str, Any] = {"job": True}
        if bounds is not None:
            self.prepare["bounds"] = list(bounds)
        self.control: socket.socket | None = None
        self.helper: subprocess.Popen[bytes] | None = None
        self._ready: list[Link] = []

    def start(self) -> None:
        """Start the helper: while the worker is still root (privilegedStartService).
        Its stderr comes to the worker's log (rexnet.worker.helperlog)."""
        from twisted.internet import reactor

        ours, theirs = socket.socketpair()
        complaints, stderr = os.pipe2(os.O_CLOEXEC)
        try:
            with theirs:
                # -P: not the worker's directory first on the root helper's sys.path (as
                # `-m` would put it): a rexnet/ there must not run as root
                self.helper = subprocess.Popen(
                    [sys.executable, "-P", "-m", "rexnet.worker.sandboxd", "--control",
                     str(theirs.fileno()), "--users", self.users.spec() if self.users else ""],
                    pass_fds=[theirs.fileno()], start_new_session=True,
                    stdin=subprocess.DEVNULL, stderr=stderr)
        except BaseException:
            os.close(complaints)
            raise
        finally:
            os.close(stderr)
        HelperLog(reactor, complaints)
        self.control = ours

    def stop(self) -> None:
        """Let the helper go (running jobs' supervisors end with their jobs; spares end)."""
        while self._ready:
            self._ready.pop().close()
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
            wire.send(self.control, self.prepare, [helper.fileno()])
        except OSError as e:
            mine.close()
            raise OSError(e.errno or errno.EPIPE, "the sandbox helper is gone") from e
        finally:
            helper.close()
        return mine

    def fill(self) -> None:
        """Ask the helper for supervisors up to SPARES. Only once the worker has dropped
        root: a job without a job user runs as the uid that made its socket."""
        while self.control is not None and len(self._ready) < self.spares:
            try:
                self._ready.append(Link(self._job_socket()))
            except OSError as e:
                log.warn("cannot ask for a spare supervisor: {error}", error=e)
                return

    def _take(self) -> Link:
        """A prepared supervisor: the first that says it is ready, else the first being
        prepared (the helper prepares one in ~10-20 ms): the job's start then waits for it
        in the reactor (Link.start), never blocking it. Then the jobs outrun the refill:
        one spare more (up to GROW_TO), and the missing ones asked for at once."""
        if not self._ready:
            self.fill()
        for link in list(self._ready):
            if link.ready():
                self._ready.remove(link)
                return link
            if link.sock is None:
                self._ready.remove(link)
        if not self._ready:
            raise OSError(errno.EPIPE, "the sandbox helper prepares no supervisor")
        link = self._ready.pop(0)
        if self.spares < self.grow_to:
            self.spares += 1
        self.fill()
        return link

    def spawn(self, reactor: Any, proto: JobProcess, argv: Sequence[str],
              env: Mapping[str, str], cwd: str | None) -> Any:
        """Start ARGV as PROTO's job in a sandbox of its own (see the module docstring)."""
        user = self.users.acquire() if self.users else None
        try:
            link = self._take()
        except OSError:
            if user is not None and self.users:
                self.users.release(user)
            raise
        limits = proto.limits
        link.request = {"argv": list(argv), "env": dict(env), "cwd": cwd or os.getcwd(),
                        "tty": bool(proto.start.tty), "user": user,
                        "limits": {"memory": limits.memory, "pids": limits.pids,
                                   "cpus": limits.cpus}}
        proto.isolation = Isolated(link, self.users, user)
        try:
            if proto.start.tty:
                master, slave = os.openpty()
                set_winsize(slave, proto.start.rows or 24, proto.start.cols or 80)
                try:
                    return SandboxedTerminal(link, reactor, proto, master, slave)
                except BaseException:
                    for fd in (master, slave):
                        with contextlib.suppress(OSError):
                            os.close(fd)
                    raise
            fds, children = proto.child_fds()
            try:
                return SandboxedProcess(link, reactor, proto, fds)
            finally:
                for child in children.values():
                    child.close()
        except BaseException:
            link.close()
            proto.isolation.finish()
            raise
        finally:
            # one message to the helper, once the job has started: preparing a supervisor
            # takes CPU that the job's start (on this host, the client's too) needs now
            reactor.callLater(REFILL_DELAY, self.fill)


class Link:
    """A job's supervisor as the worker holds it: the socket to it (the request and the
    job's descriptors go out, signals go out, the end comes back). A job may take one
    still being prepared: its request, descriptors and signals wait (in the reactor) for
    the supervisor's "ready"."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock: socket.socket | None = sock
        self.pid = 0  # the job's init (in the host's PID namespace), once ready
        self.request: dict[str, Any] = {}
        self.limit = ""
        self._reader: EndReader | None = None
        self._waiting: list[int] | None = None  # copies of the job's fds, until ready
        self._signals: list[int] = []  # signals sent before then

    def ready(self) -> bool:
        """Whether the supervisor has said it is ready (read without blocking)."""
        if self.pid:
            return True
        if self.sock is None:
            return False
        blocking = self.sock.getblocking()
        self.sock.setblocking(False)
        try:
            got = wire.receive(self.sock)
        except BlockingIOError:
            return False
        except (wire.WireError, OSError) as e:
            log.warn("a spare supervisor failed: {error}", error=e)
            got = None
        finally:
            if self.sock is not None:
                self.sock.setblocking(blocking)
        if got is None:
            self.close()
            return False
        message, fds = got
        for fd in fds:
            os.close(fd)
        pid = message.get("ready")
        self.pid = pid if isinstance(pid, int) and pid > 0 else 0
        if not self.pid:
            self.close()
        return bool(self.pid)

    def start(self, fdmap: Mapping[int, int]) -> int:
        """Hand the job (its request and the descriptors FDMAP, the caller's to close) over;
        the job's pid, or 0 while the supervisor is being prepared (then copies of the
        descriptors wait with the request, and watch() sends them once it is ready)."""
        if self.sock is None:
            raise OSError(errno.EPIPE, "the job's supervisor is gone")
        if not self.pid:
            self._waiting = []
            for target in sorted(fdmap):
                self._waiting.append(os.dup(fdmap[target]))
            self.request["fds"] = sorted(fdmap)
            return 0
        targets = sorted(fdmap)
        wire.send(self.sock, {**self.request, "fds": targets}, [fdmap[t] for t in targets])
        return self.pid

    def _started(self) -> None:
        """The supervisor is ready: the waiting request, descriptors and signals go."""
        assert self.sock is not None and self._waiting is not None
        fds, self._waiting = self._waiting, None
        try:
            self.sock.setblocking(True)
            wire.send(self.sock, self.request, fds)
        finally:
            self.sock.setblocking(False)
            for fd in fds:
                os.close(fd)
        for number in self._signals:
            self.signal(number)
        self._signals = []

    def signal(self, number: int) -> None:
        """Pass signal NUMBER on to the job's processes (SIGKILL: all of its namespace)."""
        if self._waiting is not None:
            self._signals.append(number)
        elif self.sock is not None:
            with contextlib.suppress(OSError):
                wire.send(self.sock, {"signal": number})

    def watch(self, reactor: Any, transport: Any) -> None:
        """Report the job's end to TRANSPORT (processEnded with a wait status)."""
        assert self.sock is not None
        self.sock.setblocking(False)
        self._reader = EndReader(reactor, self, transport)
        reactor.addReader(self._reader)
        if self._waiting is not None:
            self._reader.timeout = reactor.callLater(READY_TIMEOUT, self._reader.unready)

    def close(self) -> None:
        if self._reader is not None:
            self._reader.reactor.removeReader(self._reader)
            if self._reader.timeout is not None and self._reader.timeout.active():
                self._reader.timeout.cancel()
            self._reader = None
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        for fd in self._waiting or ():
            os.close(fd)
        self._waiting = None


@implementer(IReadDescriptor)
class EndReader:
    """Reads, in the reactor, a job's supervisor's "ready" (if the job took it still being
    prepared), then the job's end."""

    def __init__(self, reactor: Any, link: Link, transport: Any) -> None:
        self.reactor = reactor
        self.link = link
        self.transport = transport
        self.timeout: Any = None

    def fileno(self) -> int:
        return self.link.sock.fileno() if self.link.sock is not None else -1

    def logPrefix(self) -> str:
        return "sandbox"

    def unready(self) -> None:
        """The supervisor did not get ready in READY_TIMEOUT seconds: the job ends."""
        log.warn("a job's supervisor was not ready after {seconds} s", seconds=READY_TIMEOUT)
        self.link.close()
        self.transport.processEnded(NOT_STARTED)

    def doRead(self) -> None:
        link = self.link
        if link._waiting is not None:
            if link.ready():
                if self.timeout is not None and self.timeout.active():
                    self.timeout.cancel()
                try:
                    link._started()
                except OSError as e:
                    log.warn("a job's supervisor went: {error}", error=e)
                else:
                    self.transport.pid = link.pid
                    self.transport.proto.pid = link.pid
                    return
            elif link.sock is not None:
                return  # not yet: wait on
            log.warn("no supervisor could start a job: the sandbox helper failed")
            link.close()
            self.transport.processEnded(NOT_STARTED)
            return
        sock = link.sock
        if sock is None:
            return
        try:
            got = wire.receive(sock)
        except BlockingIOError:
            return
        except (wire.WireError, OSError) as e:
            log.warn("job {pid}: its supervisor said something wrong: {error}",
                     pid=link.pid, error=e)
            got = None
        status = int(signal.SIGKILL)  # the supervisor is gone: the kernel killed the job's init
        if got is not None:
            end, fds = got
            for fd in fds:
                os.close(fd)
            code, number = end.get("code"), end.get("signal")
            if isinstance(number, int) and 0 < number < 128:
                status = number
            elif isinstance(code, int) and 0 <= code < 256:
                status = code << 8
            link.limit = str(end.get("limit") or "")
        link.close()
        self.transport.processEnded(status)

    def connectionLost(self, reason: Any) -> None:
        pass


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
        # once the worker has settled (preparing takes CPU from its first connections)
        reactor.callLater(FIRST_FILL, self.sandbox.fill)  # type: ignore[attr-defined]

    def stopService(self) -> None:
        super().stopService()
        self.sandbox.stop()


class Isolated:
    """A sandboxed job's end, for its JobProcess: its signals, the limit that ended it."""

    def __init__(self, link: Link, users: JobUsers | None, user: int | None) -> None:
        self.link = link
        self.users = users
        self.user = user

    def signal(self, number: int) -> None:
        self.link.signal(number)

    def finish(self) -> str:
        """Once the job has ended: release the job user; the limit that ended it."""
        if self.users is not None and self.user is not None:
            self.users.release(self.user)
            self.user = None
        self.link.close()
        return "memory" if self.link.limit == "memory" else ""
