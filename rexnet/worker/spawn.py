"""Starting a job's process: a session of its own, with pipes, socketpairs or a terminal.

The worker is a large process, and fork copies its page tables for every job (a few
milliseconds each), so jobs start with posix_spawn where it can serve, and a sandboxed job
is no child of the worker at all (its supervisor runs it and reports its end). Both go
through Twisted's private process API (Process._trySpawnInsteadOfFork, _listOpenFDs,
_getFileActions, _PS_CLOSE, _PS_DUP2, _setupChild, _BaseProcess): this module is the only
one that uses it, and tests/test_twisted_private.py says which name a Twisted release
removed.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import struct
import termios
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from twisted.internet import abstract, fdesc, process
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger

from rexnet.net.pipes import PipeReader, PipeWriter
from rexnet.protocol import wire

log = Logger()


def reset_signals() -> None:
    """In a forked child: default dispositions for every signal, as a login would give
    (the worker's own ignored signals, such as Python's SIGPIPE, must not leak into jobs)."""
    for number in range(1, signal.NSIG):
        if number not in (signal.SIGKILL, signal.SIGSTOP):
            with contextlib.suppress(OSError, ValueError):
                signal.signal(number, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


DEFAULT_SIGNALS = frozenset(int(s) for s in signal.valid_signals()
                            if s not in (signal.SIGKILL, signal.SIGSTOP))


class SessionProcess(process.Process):
    """A child process that leads its own session, so its whole group can be signalled.

    Started with posix_spawn (setsid, every signal default, none blocked), which uses
    vfork. Where posix_spawn cannot serve (a --chdir), fork and setsid.
    """

    processReaderFactory = PipeReader
    processWriterFactory = PipeWriter

    def _trySpawnInsteadOfFork(self, path: Any, uid: Any, gid: Any, executable: Any,
                               args: Any, environment: Any, kwargs: Any) -> bool:
        listing = getattr(process, "_listOpenFDs", None)
        actions = getattr(process, "_getFileActions", None)
        if (uid is not None or gid is not None or listing is None or actions is None
                or (path is not None and os.path.abspath(path) != os.path.abspath("."))):
            return False
        state = []
        for fd in listing():
            with contextlib.suppress(OSError):
                state.append((fd, fcntl.fcntl(fd, fcntl.F_GETFD, fcntl.FD_CLOEXEC)))
        self.pid = os.posix_spawnp(
            executable, args, os.environ if environment is None else environment,
            file_actions=actions(state, kwargs.get("fdmap"), doClose=process._PS_CLOSE,
                                 doDup2=process._PS_DUP2),
            setsigdef=DEFAULT_SIGNALS,
            setsigmask=(), setsid=True)
        self.status = -1
        return True

    def _setupChild(self, *args: Any, **kwargs: Any) -> None:
        os.setsid()
        reset_signals()
        super()._setupChild(*args, **kwargs)


class TerminalProcess(process.PTYProcess):
    """A child process in a pseudo-terminal (PTYProcess already makes it a session)."""

    def _setupChild(self, *args: Any, **kwargs: Any) -> None:
        reset_signals()
        super()._setupChild(*args, **kwargs)


class Supervisor(Protocol):
    """A sandboxed job's root supervisor, as the worker holds it (rexnet.worker.sandbox.Link):
    START hands it the job's descriptors and returns the job's pid (not a child of the
    worker), SIGNAL passes a signal on, WATCH reports the end to the transport."""

    def start(self, fdmap: Mapping[int, int]) -> int: ...

    def signal(self, number: int) -> None: ...

    def watch(self, reactor: Any, transport: Any) -> None: ...


class Supervised:
    """What a sandboxed job's transport does differently from a child's: its supervisor
    signals the job and reports its end; the worker reaps nothing."""

    supervisor: Supervisor

    def connect_supervised(self, supervisor: Supervisor, reactor: Any, proto: Any) -> None:
        """Connect PROTO to this transport, then have SUPERVISOR report the job's end."""
        try:
            proto.makeConnection(self)
        except Exception:
            log.failure("while starting a sandboxed job's protocol")
        supervisor.watch(reactor, self)

    def reapProcess(self) -> None:
        """Not a child: the supervisor reports the end (processEnded)."""

    def signalProcess(self, signalID: Any) -> None:
        self.supervisor.signal(int(getattr(signal, f"SIG{signalID}", signalID)))


class SandboxedProcess(Supervised, process.Process):
    """A job with pipes (and socketpairs) in a sandbox: no process of the worker's own (a
    fork of the worker costs it milliseconds per job); the job's ends of its pipes go to
    its supervisor, which reports its end (Process.__init__ without fork and reaping)."""

    processReaderFactory = PipeReader

    def __init__(self, supervisor: Supervisor, reactor: Any, proto: Any,
                 childFDs: dict[int, Any]) -> None:
        self._reactor = reactor
        self.supervisor = supervisor
        process._BaseProcess.__init__(self, proto)
        self.pipes = {}
        helpers: dict[int, int] = {}
        fdmap: dict[int, int] = {}
        opened: list[int] = []
        try:
            for child, target in childFDs.items():
                if target in ("r", "w"):
                    r, w = os.pipe()
                    opened += [r, w]
                    fdmap[child], helpers[child] = (w, r) if target == "r" else (r, w)
                else:
                    fdmap[child] = target
            self.pid = supervisor.start(fdmap)
        except BaseException:
            for fd in opened:
                os.close(fd)
            raise
        for child, parent in helpers.items():
            os.close(fdmap[child])
            pipe: Any = (
                self.processReaderFactory(reactor, self, child, parent)
                if childFDs[child] == "r" else
                self.processWriterFactory(reactor, self, child, parent, forceReadHack=True))
            self.pipes[child] = pipe
        self.connect_supervised(supervisor, reactor, proto)


class SandboxedTerminal(Supervised, process.PTYProcess):
    """A job in a terminal, in a sandbox: the supervisor gets the terminal's slave (the
    command's controlling terminal); the worker keeps the master (PTYProcess.__init__
    without fork and reaping)."""

    def __init__(self, supervisor: Supervisor, reactor: Any, proto: Any, master: int,
                 slave: int) -> None:
        abstract.FileDescriptor.__init__(self, reactor)
        process._BaseProcess.__init__(self, proto)
        self.supervisor = supervisor
        self.pid = supervisor.start({0: slave, 1: slave, 2: slave})  # type: ignore[assignment]
        os.close(slave)
        fdesc.setNonBlocking(master)
        self.fd = master
        self.startReading()
        self.connected = 1
        self.status = -1
        self.connect_supervised(supervisor, reactor, proto)


def set_winsize(fd: int, rows: int, cols: int) -> None:
    with contextlib.suppress(OSError):
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


class Spawnable(Protocol):
    """What spawn needs of a job's process protocol (rexnet.worker.job.JobProcess)."""

    start: wire.Start

    def child_fds(self) -> tuple[dict[int, Any], dict[int, socket.socket]]: ...


class Isolator(Protocol):
    """Starts jobs in sandboxes of their own (rexnet.worker.sandbox.Sandbox)."""

    def spawn(self, reactor: Any, proto: Any, argv: Sequence[str], env: Mapping[str, str],
              cwd: str | None) -> Any: ...


def spawn(
    reactor: Any,
    proto: Spawnable,
    argv: Sequence[str],
    env: Mapping[str, str],
    cwd: str | None = None,
    sandbox: Isolator | None = None,
) -> Any:
    """Start ARGV as the job of PROTO: with pipes (and socketpairs), or in a pty; in a
    sandbox of its own when SANDBOX is given."""
    assert isinstance(proto, ProcessProtocol)
    start = proto.start
    if start.tty:
        # the terminal has its own size: LINES and COLUMNS (say, inherited from the
        # worker's environment) would override it for curses programs, resizes included
        env = {k: v for k, v in env.items() if k not in ("LINES", "COLUMNS")}
    if sandbox is not None:
        return sandbox.spawn(reactor, proto, argv, env, cwd)
    if start.tty:
        master, slave = os.openpty()
        set_winsize(slave, start.rows or 24, start.cols or 80)
        try:  # PTYProcess closes both once forked (the slave in the parent), not before
            return TerminalProcess(reactor, argv[0], list(argv), dict(env), cwd, proto,
                                   None, None, (master, slave, os.ttyname(slave)))
        except BaseException:
            for fd in (master, slave):
                with contextlib.suppress(OSError):
                    os.close(fd)
            raise
    fds, children = proto.child_fds()
    try:
        return SessionProcess(reactor, argv[0], list(argv), dict(env), cwd, proto, None, None,
                              fds)
    finally:
        for sock in children.values():
            sock.close()
