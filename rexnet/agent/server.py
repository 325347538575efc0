"""The client agent: one per user and network namespace, on a 0600 Unix socket.

It keeps what a cold `rexnet exec` pays for on every run (the interpreter with Twisted and
cryptography imported, loaded credentials, and warm channels to workers, see rexnet.client.warm)
and runs the jobs of thin launchers (rexnet.cli.launcher), which pass it their descriptors
with SCM_RIGHTS and relay their signals; it answers with the job's exit status. The
socket is the trust boundary: a peer of another uid (SO_PEERCRED) is refused with a logged
complaint. A launcher that goes away ends its job, as a client that dies would.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import json
import os
import socket
import struct
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet.interfaces import IFileDescriptorReceiver
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import ILogObserver, Logger, LogLevel
from twisted.python.failure import Failure
from zope.interface import implementer

from rexnet.agent import paths
from rexnet.agent.kept import Kept
from rexnet.client.cluster import Cluster
from rexnet.client.warm import WarmPool
from rexnet.net.pollguard import guard
from rexnet.net.tuning import send_now
from rexnet.protocol import agentwire, exitcodes
from rexnet.protocol.agentwire import AgentWireError
from rexnet.protocol.request import ExecRequest, RequestError
from rexnet.security.credentials import Credential, CredentialCache
from rexnet.security.revocation import RevokedFile, beside, open_list

DEFAULT_IDLE = 600.0

log = Logger()


class Agent:
    """The agent's state: its sessions (one per launcher), credentials and warm channels."""

    def __init__(self, reactor: Any, idle_timeout: float = DEFAULT_IDLE) -> None:
        self.reactor = reactor
        self.idle_timeout = idle_timeout
        self.pool = WarmPool(reactor)
        self.sessions: set[Session] = set()
        self.last_active = reactor.seconds()
        self.netns = paths.netns_id()
        self._credentials = CredentialCache("client")
        self._revoked: dict[str, RevokedFile | None] = {}
        self._beside: dict[tuple[str, str], str] = {}
        self.jobs = 0
        self.kept = Kept(self.credential, self.revocations)

    def credential(self, path: str) -> Credential:
        """The client credential in PATH, loaded again only if the file changed (its
        mode and owner are part of the check, so a file made unsafe is refused)."""
        return self._credentials.load(path)

    def revocations(self, option: str, keypath: str, app: str) -> RevokedFile | None:
        """The revocation list of --revoked OPTION (else APP.revoked beside the credential,
        if there is one); kept, as it re-reads its file when that changes."""
        path = option
        if not path:  # where APP.revoked would be is worked out once; whether it is, each job
            where = self._beside.get((keypath, app))
            if where is None:
                where = self._beside[keypath, app] = str(beside(Path(keypath), app))
            path = where if os.path.isfile(where) else ""
        if not path:
            return None
        if path not in self._revoked:
            self._revoked[path] = open_list(path, Path(keypath), app)
        return self._revoked[path]

    def idle_check(self) -> None:
        if self.sessions:
            self.last_active = self.reactor.seconds()
        elif self.reactor.seconds() - self.last_active >= self.idle_timeout:
            log.info("idle for {s:g} s: the agent stops", s=self.idle_timeout)
            self.reactor.stop()

    def shutdown(self) -> None:
        self.pool.close()
        for session in list(self.sessions):
            session.transport.loseConnection()  # type: ignore[union-attr]


def peer_uid(transport: Any) -> tuple[int, int]:
    """(pid, uid) of the process at the other end of a Unix socket (SO_PEERCRED)."""
    raw = transport.socket.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                      struct.calcsize("3i"))
    pid, uid, _ = struct.unpack("3i", raw)
    return pid, uid


@implementer(IFileDescriptorReceiver)
class Session(Protocol):
    """One launcher's connection: its descriptors, its job, its signals."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.decoder = agentwire.Decoder(json.loads)
        self.fds: list[int] = []
        self.job: Any = None
        self.streams: Any = None
        self.refused = False
        self.finished = False
        self.verbose = False

    # -- the connection ---------------------------------------------------------------

    def connectionMade(self) -> None:
        pid, uid = peer_uid(self.transport)
        if uid != os.getuid():
            self.refused = True
            log.warn("complaint: refused a connection from pid {pid} of uid {uid}: this agent "
                     "serves uid {me} only", pid=pid, uid=uid, me=os.getuid())
            self.transport.abortConnection()  # type: ignore[union-attr]
            return
        self.agent.sessions.add(self)
        # the launcher sends its request as soon as it is connected: read it in this turn,
        # the accept's, not in the next one (an empty or failed read is left to the
        # reactor, which finds the socket readable again and ends the connection)
        self.transport.doRead()  # type: ignore[union-attr]

    def fileDescriptorReceived(self, descriptor: int) -> None:
        if self.refused or self.job is not None or len(self.fds) >= agentwire.MAX_FDS:
            os.close(descriptor)
            self.refused = True
            log.warn("complaint: a launcher sent descriptors it should not have")
            self.transport.abortConnection()  # type: ignore[union-attr]
            return
        self.fds.append(descriptor)

    def dataReceived(self, data: bytes) -> None:
        if self.refused:
            return
        first = self.job is None and not self.finished and not self.decoder.pending
        if first and (known := self.agent.kept.exec_of(data)) is not None:
            self.handle(known)  # the request, as decoded for an earlier launcher
            return
        try:
            messages = self.decoder.feed(data)
        except AgentWireError as e:
            log.warn("complaint: bad message from a launcher: {e}", e=e)
            self.finish(exitcodes.WORKER_LOST, f"rexnet: the agent refused a bad message: {e}")
            return
        if (first and len(messages) == 1 and isinstance(messages[0], agentwire.Exec)
                and not self.decoder.pending):
            self.agent.kept.keep_exec(data, messages[0])
        for message in messages:
            self.handle(message)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.agent.sessions.discard(self)
        self.agent.last_active = self.agent.reactor.seconds()
        if self.job is not None and not self.finished:
            log.info("the launcher of a job went away: ending the job")
            self.job.abandon()
        self.finish(exitcodes.WORKER_LOST, "")

    def send(self, message: agentwire.Message) -> None:
        if self.transport is not None and self.transport.connected:  # type: ignore[attr-defined]
            write_now(self.transport, message.encode())

    def say(self, text: str) -> None:
        self.send(agentwire.Say(text))

    # -- messages ---------------------------------------------------------------------

    def handle(self, message: agentwire.Message) -> None:
        if isinstance(message, agentwire.Exec) and self.job is None and not self.finished:
            self.start(message)
        elif isinstance(message, agentwire.Signal):
            if self.job is not None:
                self.job.send_signal(message.number)
        elif isinstance(message, agentwire.Winch):
            if self.job is not None:
                self.job.resize(message.rows, message.cols)
        elif isinstance(message, agentwire.Stop):
            log.info("asked to stop")
            self.send(agentwire.Stopped(os.getpid()))
            self.transport.loseConnection()  # type: ignore[union-attr]
            self.agent.reactor.callLater(0.05, self.agent.reactor.stop)
        else:
            log.warn("complaint: unexpected {op!r} message from a launcher", op=message.OP)
            self.finish(exitcodes.WORKER_LOST, f"rexnet: the agent refused an unexpected "
                        f"{message.OP!r} message")

    def start(self, message: agentwire.Exec) -> None:
        request = message.request
        numbers = [fd for fd, _ in request.fds]
        if len(self.fds) != 3 + len(numbers):
            self.finish(exitcodes.WORKER_LOST, f"rexnet: the agent got {len(self.fds)} "
                        f"descriptors, not {3 + len(numbers)}")
            return
        if message.netns and message.netns != self.agent.netns:
            self.finish(exitcodes.USAGE, "rexnet: the agent at this socket serves another "
                        "network namespace; use --no-agent or another REXNET_AGENT_SOCKET")
            return
        self.verbose = request.verbose
        try:
            cluster = self.agent.kept.cluster(request)
        except RequestError as e:
            self.finish(e.exit_code, f"rexnet: {e.message}")
            return
        self.run(request, cluster, dict(zip([0, 1, 2, *numbers], self.fds, strict=True)))

    def run(self, request: ExecRequest, cluster: Cluster, local: dict[int, int]) -> None:
        from rexnet.client.progress import silent
        from rexnet.client.streams import StdioStreams

        end = "\r\n" if request.raw else "\n"
        verbose = self.verbose

        def tell(message: str) -> None:
            self.say(f"rexnet: {message}{end}")

        say = tell if verbose else silent  # without -v the job makes no progress messages

        logger = Logger("rexnet.client.job", observer=JobMessages(tell, verbose))
        self.streams = StdioStreams(self.agent.reactor, request.tty, dict(request.fds), local)
        self.job = job = cluster.job(self.agent.reactor, request, self.streams, say=say,
                                     pool=self.agent.pool, logger=logger)
        self.agent.jobs += 1
        job.run().addBoth(self.ended)

    def ended(self, result: object) -> None:
        from rexnet.client.results import JobFailed, JobResult

        if isinstance(result, JobResult):
            self.finish(result.status, "")
            return
        error = result.value if isinstance(result, Failure) else None
        if isinstance(error, JobFailed):
            self.finish(error.exit_code, f"rexnet: {error}")
        else:
            log.failure("a job failed inside the agent", result)  # type: ignore[arg-type]
            self.finish(exitcodes.WORKER_LOST, f"rexnet: internal error: {result}")

    def finish(self, status: int, message: str) -> None:
        """Tell the launcher how to exit; let go of its descriptors first (so that a pipe
        the job wrote to sees its end once the launcher exits)."""
        if self.finished:
            return
        self.finished = True
        if self.streams is not None:
            self.streams.abort()
        for fd in self.fds:
            try:  # blocking again: the launcher (and its parent) share the descriptions
                flags = fcntl.fcntl(fd, fcntl.F_GETFL)
                if flags & os.O_NONBLOCK:
                    fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_NONBLOCK)
            except OSError:
                pass
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds = []
        transport = self.transport
        if transport is not None:
            if transport.connected and not write_now(  # type: ignore[attr-defined]
                    transport, exit_message(status, message)):
                send_now(transport)  # the launcher waits: before the job's last bookkeeping
            transport.loseConnection()


def write_now(transport: Any, data: bytes) -> bool:
    """DATA to a launcher's socket, straight to the kernel if nothing waits before it (a
    message the launcher waits on goes without Twisted's write: its two changes of the
    poll set and a reactor turn); what the socket does not take, through TRANSPORT. Whether
    all of DATA went (or the launcher is gone, which the reactor finds out by itself)."""
    sock = getattr(transport, "socket", None)
    if (sock is not None and not transport.disconnecting and not transport._tempDataBuffer
            and len(transport.dataBuffer) == transport.offset):
        try:
            sent = sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            return True
        data = data[sent:]
    if data:
        transport.write(data)
        return False
    return True


def exit_message(status: int, message: str) -> bytes:
    """Exit(STATUS, MESSAGE) encoded; a plain status's bytes are made once."""
    if message:
        return agentwire.Exit(status, message).encode()
    encoded = _EXITS.get(status)
    if encoded is None:
        encoded = _EXITS[status] = agentwire.Exit(status, "").encode()
    return encoded


_EXITS: dict[int, bytes] = {}


@implementer(ILogObserver)
class JobMessages:
    """A job's log events as messages for its launcher (TELL): warnings always, info too
    if VERBOSE, as rexnet.logs.message_observer writes them; that observer is made at the
    first event that passes, as most jobs log none."""

    def __init__(self, tell: Callable[[str], None], verbose: bool) -> None:
        self.tell = tell
        self.verbose = verbose
        self.least = LogLevel.info if verbose else LogLevel.warn
        self.observer: ILogObserver | None = None

    def __call__(self, event: dict[str, Any]) -> None:
        level = event.get("log_level")
        if level is None or level < self.least:
            return
        if self.observer is None:
            from rexnet.logs import message_observer

            self.observer = message_observer(self.tell, self.verbose)
        self.observer(event)


# -- starting and stopping ------------------------------------------------------------


ON_DEMAND = "REXNET_AGENT_ON_DEMAND"  # set by a launcher that starts the agent


class AgentError(Exception):
    """The agent cannot start (its socket's directory is unsafe, or in use)."""


def listen(path: str) -> tuple[socket.socket, int]:
    """Bind the agent's socket at PATH (mode 0600, in a private directory) and take its
    lock file; a socket left by a dead agent is replaced. AgentError if another agent holds
    the lock (it runs, or is starting) or the directory is not safe."""
    try:
        paths.safe_directory(path)
    except paths.UnsafeDirectory as e:
        raise AgentError(str(e)) from None
    lock = os.open(path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(lock)
        raise AgentError(f"an agent already serves {path}") from None
    if os.path.lexists(path):  # we hold the lock: whoever made it is gone
        import stat

        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            os.close(lock)
            raise AgentError(f"{path} exists and is not a socket; remove it")
        log.info("replacing the stale socket {path}", path=path)
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    umask = os.umask(0o177)
    try:
        sock.bind(path)
    except OSError as e:
        os.close(lock)
        sock.close()
        raise AgentError(f"cannot listen on {path}: {e.strerror or e}") from None
    finally:
        os.umask(umask)
    os.chmod(path, 0o600)
    sock.listen(128)
    return sock, lock


def daemonize(log_path: str, keep: set[int]) -> None:
    """Double fork and setsid; the first process exits 0 once the agent is detached (the
    socket is already listening). Stdio goes to /dev/null, stderr to LOG_PATH."""
    pid = os.fork()
    if pid:
        _, status = os.waitpid(pid, 0)
        os._exit(0 if status == 0 else 1)
    os.setsid()
    if os.fork():
        os._exit(0)
    null = os.open(os.devnull, os.O_RDWR)
    logfile = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.dup2(logfile, 2)
    for fd in range(3, 1024):
        if fd not in keep:
            with contextlib.suppress(OSError):
                os.close(fd)
    os.chdir("/")


def serve(sock: socket.socket, lock: int, path: str, idle_timeout: float) -> int:
    """Run the agent on the listening SOCK until stopped or idle."""
    from twisted.internet import reactor
    from twisted.internet.task import LoopingCall
    from twisted.logger import (
        FilteringLogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        globalLogBeginner,
        textFileLogObserver,
    )

    levels = LogLevelFilterPredicate(defaultLogLevel=LogLevel.warn)
    levels.setLogLevelForNamespace("rexnet", LogLevel.info)
    globalLogBeginner.beginLoggingTo(
        [FilteringLogObserver(textFileLogObserver(sys.stderr), [levels])],
        redirectStandardIO=False)
    guard(reactor)  # no stale poll event reaches a reused descriptor (rexnet.net.pollguard)
    agent = Agent(reactor, idle_timeout)
    factory = Factory.forProtocol(lambda: Session(agent))
    sock.setblocking(False)
    reactor.adoptStreamPort(sock.fileno(), socket.AF_UNIX, factory)  # type: ignore[attr-defined]
    os.chmod(path, 0o600)  # Twisted makes an adopted Unix port 0666; the directory is 0700
    sock.close()
    with open(path + ".pid", "w") as f:
        f.write(f"{os.getpid()}\n")
    checker = LoopingCall(agent.idle_check)
    checker.clock = reactor
    checker.start(min(5.0, max(idle_timeout / 4, 0.05)), now=False)

    def cleanup() -> None:
        # the socket is still ours (a successor needs the lock we hold until we exit);
        # Twisted removes it when the port closes
        agent.shutdown()
        with contextlib.suppress(OSError):
            os.unlink(path + ".pid")

    reactor.addSystemEventTrigger("before", "shutdown", cleanup)  # type: ignore[attr-defined]
    log.info("rexnet agent {pid} serves {path} (idle timeout {idle:g} s)", pid=os.getpid(),
             path=path, idle=idle_timeout)
    # what the agent imported and made so far lives as long as it does: out of the
    # collector's sight, so that a full collection, which comes every few hundred jobs,
    # takes ~1 ms of a job's round trip, not ~30 (it walked some 50,000 objects)
    gc.freeze()
    reactor.run()  # type: ignore[attr-defined]
    os.close(lock)
    return 0


def stop(path: str) -> int:
    """Ask the agent at PATH to stop; 0 if it did or none ran."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    try:
        sock.connect(path)
    except (FileNotFoundError, ConnectionRefusedError):
        print(f"rexnet: no agent runs at {path}", file=sys.stderr)
        return 0
    sock.sendall(agentwire.Stop().encode())
    decoder = agentwire.Decoder()
    pid = 0
    with contextlib.suppress(OSError):
        while not pid:
            data = sock.recv(4096)
            if not data:
                break
            for message in decoder.feed(data):
                if isinstance(message, agentwire.Stopped):
                    pid = message.pid
    sock.close()
    if pid:  # wait (briefly) until it is gone, so a new agent can take over at once
        import time

        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and os.path.exists(f"/proc/{pid}"):
            time.sleep(0.02)
        print(f"rexnet: stopped the agent {pid} at {path}", file=sys.stderr)
    return 0


def command(path: str | None, foreground: bool, stop_it: bool, idle_timeout: float) -> int:
    """`rexnet agent`: run (detached unless FOREGROUND) or STOP_IT."""
    path = os.path.abspath(path) if path else paths.socket_path()
    if stop_it:
        return stop(path)
    try:
        sock, lock = listen(path)
    except AgentError as e:
        if "already serves" in str(e):
            if not os.environ.get(ON_DEMAND):  # a launcher's start lost a race: no news
                print(f"rexnet: {e}", file=sys.stderr)
            return 0
        print(f"rexnet: agent: {e}", file=sys.stderr)
        return exitcodes.CREDENTIAL
    if not foreground:

        daemonize(paths.log_path(path), {sock.fileno(), lock})
    return serve(sock, lock, path, idle_timeout)
