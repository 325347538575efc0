"""One running job on a worker: its process, descriptors, terminal and limits."""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from twisted.internet import process
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from rexnet.net.channel import Channel, InStream, OutStream
from rexnet.net.jobdata import STDIN, STDOUT, DataDial
from rexnet.net.pipes import PipeReader
from rexnet.protocol import wire
from rexnet.worker.load import group_rss
from rexnet.worker.spawn import set_winsize

KILL_GRACE = 2.0
OUTPUT_GRACE = 1.0  # how long a job's leftover processes may hold its output after it exits
MEMORY_CHECK = 0.2

log = Logger()


def exit_status(reason: Failure) -> tuple[int | None, int | None]:
    """(exit code, None) or (None, signal number) from a processEnded reason."""
    value = reason.value
    sig = getattr(value, "signal", None)
    if sig:
        return None, int(sig)
    code = getattr(value, "exitCode", None)
    return (int(code) if code is not None else 0), None


@dataclass(frozen=True)
class Limits:
    """Bounds on one job; 0 means none. PIDS and CPUS (processes at once, CPUs' worth of
    time) need a sandbox (rexnet.worker.sandbox); the others are enforced without one."""

    seconds: float = 0.0
    memory: int = 0
    pids: int = 0
    cpus: float = 0.0


class Isolation(Protocol):
    """A job's sandbox, as its JobProcess sees it (rexnet.worker.sandbox.Isolated)."""

    def finish(self) -> str:
        """Called once the job's process has ended: the limit that ended it, or ''."""

    def signal(self, number: int) -> None:
        """Signal the job's processes (all of them: SIGKILL)."""


class SocketEnd:
    """The worker's end of a socketpair standing in for a read-write descriptor FD."""

    def __init__(self, job: JobProcess, fd: int, sock: socket.socket) -> None:
        self.job = job
        self.fd = fd
        self.sock = sock
        self.reader = PipeReader(job.reactor, self, "r", sock.fileno())
        self.writer = process.ProcessWriter(job.reactor, self, "w", os.dup(sock.fileno()))

    # called by the reader and writer, as a Process would be
    def childDataReceived(self, name: str, data: bytes) -> None:
        self.job.childDataReceived(self.fd, data)

    def childConnectionLost(self, name: str, reason: Failure) -> None:
        if name == "w":
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_WR)
            with contextlib.suppress(OSError):
                os.close(self.writer.fd)
        else:
            self.job._output_done(self.fd)

    def close(self) -> None:
        self.sock.close()


class JobProcess(ProcessProtocol):
    """Bridges a job's descriptors (or its terminal) to the streams of a channel.

    Streams are descriptor numbers. ON_END is called once the process has ended and every
    output stream has been sent, with (code, signal, limit) where limit names the limit
    the worker ended the job for, if any.
    """

    def __init__(
        self,
        channel: Channel,
        reactor: Any,
        on_end: Callable[[int | None, int | None, str], None],
        start: wire.Start,
        limits: Limits = Limits(),
    ) -> None:
        self.channel = channel
        self.reactor = reactor
        self.on_end = on_end
        self.start = start
        self.limits = limits
        self.ended = False
        self.status: tuple[int | None, int | None] | None = None
        self.limit_hit = ""
        self.pid: int | None = None
        self.open_outputs: set[int] = set()
        self.reported = False
        self._pairs: dict[int, socket.socket] = {}
        self.sockets: dict[int, SocketEnd] = {}
        self._timers: list[Any] = []
        self._memory: LoopingCall | None = None
        self.isolation: Isolation | None = None  # set by a sandbox before the spawn
        self.apart: dict[int, DataDial] = {}  # streams on data connections of their own

    # -- wiring -----------------------------------------------------------------------

    def child_fds(self) -> tuple[dict[int, Any], dict[int, socket.socket]]:
        """The childFDs for spawnProcess, and the job's ends of any socketpairs."""
        fds: dict[int, Any] = {0: "w", 1: "r", 2: "r"}
        children: dict[int, socket.socket] = {}
        for fd, mode in self.start.fds:
            if mode == "rw":
                mine, theirs = socket.socketpair()
                self._pairs[fd] = mine
                children[fd] = theirs
                fds[fd] = theirs.fileno()
            else:
                fds[fd] = "w" if mode == "r" else "r"
        return fds, children

    def connectionMade(self) -> None:
        transport: Any = self.transport
        self.pid = transport.pid
        channel = self.channel
        if self.start.tty:  # the client's EOF must not hang up the terminal
            channel.ins[0] = InStream(channel, 0, transport, close_on_eof=False)
            self._output(1, transport)
        else:
            pipes = transport.pipes
            self._data_apart(pipes)
            if 0 not in self.apart:
                channel.ins[0] = InStream(channel, 0, pipes[0])
            for fd in (1, 2):
                if fd not in self.apart:
                    self._output(fd, pipes[fd])
            for fd, mode in self.start.fds:
                if mode == "rw":
                    end = self.sockets[fd] = SocketEnd(self, fd, self._pairs.pop(fd))
                    channel.ins[fd] = InStream(channel, fd, end.writer)
                    self._output(fd, end.reader)
                elif mode == "r":
                    channel.ins[fd] = InStream(channel, fd, pipes[fd])
                else:
                    self._output(fd, pipes[fd])
        if self.limits.seconds:
            self._timers.append(self.reactor.callLater(self.limits.seconds, self._limit, "time"))
        if self.limits.memory and self.isolation is None:  # a sandbox's cgroup bounds it
            self._memory = LoopingCall(self._check_memory)
            self._memory.clock = self.reactor
            self._memory.start(MEMORY_CHECK, now=False)

    def _data_apart(self, pipes: dict[int, Any]) -> None:
        """Take START's offer of stdin and stdout on data connections of their own
        (rexnet.net.jobdata) if the client is reachable directly (not through a cproxy):
        a thread per stream gets a copy of its pipe, the reactor's end is closed."""
        start, channel = self.start, self.channel
        pending = getattr(channel, "pending", None)
        if (not start.data_token or start.detach or channel.peer_cert is None
                or pending is None or getattr(pending, "relayed", True)):
            return
        host = getattr(channel.transport.getPeer(), "host", None)  # type: ignore[union-attr]
        if not host:
            return
        for fd, stream in ((0, STDIN), (1, STDOUT)):
            if stream in start.data_streams:
                self.apart[fd] = DataDial(
                    self.reactor, channel.credential, channel.revoked,
                    (host, start.data_port), bytes.fromhex(start.data_token),
                    channel.peer_cert, stream, pipes[fd].fileno(),
                    functools.partial(self._apart_ended, fd))
                pipes[fd].loseConnection()
        if 1 in self.apart:
            self.open_outputs.add(1)

    @property
    def sides(self) -> tuple[bool, bool]:
        """STARTED's (stdin_apart, stdout_apart): the streams on data connections."""
        return 0 in self.apart, 1 in self.apart

    def let_go(self) -> None:
        """The job's channel is gone: stop its data connections' threads (stdout's, blocked
        writing to a client that vanished, would otherwise hold the job's end)."""
        for dial in self.apart.values():
            dial.stop()

    def _apart_ended(self, fd: int, problem: str | None) -> None:
        """A stream's thread ended (see DataDial): stdout's end lets EXIT go; a job
        whose input came incomplete fails (ERROR "stdin": the client reports the worker
        lost)."""
        if problem:
            log.warn("job process {pid}: {problem}; the job fails", pid=self.pid,
                     problem=problem)
            if not self.reported:
                self.channel.send(wire.Error("stdin" if fd == 0 else "stdout",
                                             problem[:1000]))
        if fd == 1 and 1 in self.open_outputs:
            if self.apart[1].empty:  # no connection was needed: the stream's end in-band
                self.channel.send(wire.Eof(1))
            self.open_outputs.discard(1)
            self._maybe_end()

    def _output(self, fd: int, source: Any) -> None:
        out = OutStream(self.channel, fd)
        self.channel.outs[fd] = out
        self.open_outputs.add(fd)
        out.attach(source)

    def resize(self, rows: int, cols: int) -> None:
        if self.start.tty and not self.ended:
            set_winsize(self.transport.fileno(), rows, cols)  # type: ignore[union-attr]

    # -- the process's descriptors --------------------------------------------------

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        self.channel.outs[childFD].write(data)

    def childConnectionLost(self, childFD: int) -> None:
        if childFD in self.apart:
            return  # the reactor's end, closed: the stream's thread has its own
        stream = self.channel.ins.get(childFD)
        if stream is not None and childFD not in self.open_outputs:
            if not stream.eof:  # the job closed its input: tell the client to stop
                stream.drop_sink()
                self.channel.send(wire.Shut(childFD))
            return
        self._output_done(childFD)

    def _output_done(self, fd: int) -> None:
        if fd in self.open_outputs:
            self.open_outputs.discard(fd)
            self.channel.outs[fd].close()
            self._maybe_end()

    def processExited(self, reason: Failure) -> None:
        """The job's process is gone; its descendants may still hold its output open."""
        self._timers.append(self.reactor.callLater(OUTPUT_GRACE, self._end_leftovers))

    def _end_leftovers(self) -> None:
        if not self.ended:
            log.info("job process {pid} exited; ending the processes it left running",
                     pid=self.pid)
            self.kill_group()

    def processEnded(self, reason: Failure) -> None:
        self.ended = True
        self.status = exit_status(reason)
        if self.isolation is not None:
            self.limit_hit = self.limit_hit or self.isolation.finish()
        for timer in self._timers:
            if timer.active():
                timer.cancel()
        if self._memory is not None and self._memory.running:
            self._memory.stop()
        if 0 in self.apart:
            self.apart[0].stop(hard=False)
        if 1 in self.open_outputs and 1 in self.apart:  # what the job left running may
            self._timers.append(self.reactor.callLater(  # hold its stdout: as above
                OUTPUT_GRACE, self._end_stdout_holders))
        if self.start.tty:
            self._output_done(1)
        self._maybe_end()

    def _end_stdout_holders(self) -> None:
        if 1 in self.open_outputs and self.pid is not None:
            log.info("job process {pid} ended; ending the processes that hold its stdout",
                     pid=self.pid)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                self._signal(signal.SIGKILL)

    def _maybe_end(self) -> None:
        """Report the end once the process is gone and all its output is sent."""
        if self.status is None or self.open_outputs or self.reported:
            return
        self.reported = True
        for end in self.sockets.values():
            end.close()
        self.on_end(*self.status, self.limit_hit)

    # -- signals and limits ---------------------------------------------------------

    def deliver_signal(self, number: int) -> None:
        """Deliver a signal from the client to the job's process group."""
        if not self.ended and self.pid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                self._signal(number)

    def _limit(self, which: str) -> None:
        if not self.ended and not self.limit_hit:
            self.limit_hit = which
            log.warn("job process {pid} hit its {which} limit; ending it", pid=self.pid,
                     which=which)
            self.kill_group()

    def _check_memory(self) -> None:
        if self.pid is not None and group_rss(self.pid) > self.limits.memory:
            self._limit("memory")

    def kill_group(self, sig: int = signal.SIGTERM) -> None:
        """Signal the job's process group; KILL it if it outlives the grace period."""
        if self.ended or self.pid is None:
            return
        try:
            self._signal(sig)
        except ProcessLookupError:
            return
        if sig != signal.SIGKILL:
            self._timers.append(self.reactor.callLater(KILL_GRACE, self._force))

    def _force(self) -> None:
        if not self.ended and self.pid is not None:
            log.warn("job process group {pid} outlived SIGTERM; sending SIGKILL", pid=self.pid)
            with contextlib.suppress(ProcessLookupError):
                self._signal(signal.SIGKILL)

    def _signal(self, number: int) -> None:
        """Signal the job's process group, or in a sandbox every process of the job."""
        if self.isolation is not None:
            self.isolation.signal(number)
        elif self.pid is not None:
            os.killpg(self.pid, number)
