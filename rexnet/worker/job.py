"""One running job on a worker: its process, descriptors, terminal and limits."""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import socket
import threading
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
from rexnet.net.tuning import HANDOVER
from rexnet.protocol import wire
from rexnet.worker.load import group_rss
from rexnet.worker.spawn import set_winsize

KILL_GRACE = 2.0
OUTPUT_GRACE = 1.0  # how long a job's leftover processes may hold its output after it exits
EOF_HOLD = 0.01  # s an output's EOF waits for the job's end (to go with EXIT, one record)
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
        self._held: list[int] = []  # outputs at their end whose EOF waits (EOF_HOLD)
        self._memory: LoopingCall | None = None
        self.isolation: Isolation | None = None  # set by a sandbox before the spawn
        self.apart: dict[int, DataDial] = {}  # streams on data connections of their own
        self.may: set[int] = set()  # the streams the client offered to hand over
        self.asked = False  # APART(1, 0) sent: stdout is no longer read in the reactor
        self.out_sent = 0  # stdout's bytes sent in-band
        self._host = ""
        self._gates: dict[int, threading.Event] = {}

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
            self._data_apart()
            channel.ins[0] = InStream(channel, 0, pipes[0])
            for fd in (1, 2):
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

    def _data_apart(self) -> None:
        """Whether to take START's offer of stdin and stdout on data connections of their
        own once they prove big (rexnet.net.jobdata): only if the client is reachable
        directly (not through a cproxy). Nothing is dialled yet."""
        start, channel = self.start, self.channel
        channel.on_apart = None
        pending = getattr(channel, "pending", None)
        if (not start.data_token or start.detach or channel.peer_cert is None
                or pending is None or getattr(pending, "relayed", True)):
            return
        self._host = getattr(channel.transport.getPeer(), "host", "")  # type: ignore[union-attr]
        if self._host:
            self.may = {fd for fd, s in ((0, STDIN), (1, STDOUT)) if s in start.data_streams}
            channel.on_apart = self._apart_received

    def _dial(self, fd: int, port: int, gate: threading.Event | None = None) -> None:
        """Move stream FD onto its data connection (the client's PORT)."""
        pipe = self.transport.pipes[fd]  # type: ignore[union-attr]
        self.apart[fd] = DataDial(
            self.reactor, self.channel.credential, self.channel.revoked,  # type: ignore[attr-defined]
            (self._host, port), bytes.fromhex(self.start.data_token), self.channel.peer_cert,
            STDIN if fd == 0 else STDOUT, pipe.fileno(),
            functools.partial(self._apart_ended, fd), gate)

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        self.channel.outs[childFD].write(data)
        if childFD == 1 and 1 in self.may and not self.asked:
            self.out_sent += len(data)
            if self.out_sent >= HANDOVER:  # stdout is big: hand it over
                self.asked = True
                self.channel.outs[1].detach()  # the reactor reads no more of it
                self.channel.send(wire.Apart(1, 0))

    def _apart_received(self, frame: wire.Apart) -> None:
        """APART from the client: stdin's in-band part ends here (dial frame.port), or
        the answer to our APART(1, 0) (0: stdout stays in-band)."""
        pipes = getattr(self.transport, "pipes", {})
        if frame.stream == 0 and 0 in self.may and 0 not in self.apart and frame.port:
            channel = self.channel
            if 0 not in pipes or self.ended:  # the job closed its stdin, or ended: no dial
                channel.ins[0] = ApartInput(channel, 0)
                return
            gate = threading.Event()
            self._gates[0] = gate
            self._dial(0, frame.port, gate)
            channel.ins[0] = ApartInput(channel, 0)
            pipes[0].unregisterProducer()
            pipes[0].loseConnection()  # once written: childConnectionLost opens the gate
        elif frame.stream == 1 and self.asked and 1 not in self.apart and not self.reported:
            if frame.port == 0:  # the client keeps stdout in-band (or its reader is gone)
                self.may.discard(1)
                if self.channel.outs[1].closed:  # SHUT came: as OutStream.stop would
                    pipes[1].stopProducing()
                else:
                    self.channel.outs[1].attach(pipes[1])
                return
            self._dial(1, frame.port)
            pipes[1].loseConnection()  # the thread has its own copy
        else:
            raise wire.WireError(f"unexpected APART of stream {frame.stream}")

    @property
    def sides(self) -> tuple[bool, bool]:
        """STARTED's (stdin_apart, stdout_apart): the streams it would hand over."""
        return 0 in self.may, 1 in self.may

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

    def childConnectionLost(self, childFD: int) -> None:
        if childFD in self.apart:
            if childFD in self._gates:
                self._gates[childFD].set()  # every in-band byte is in the job's pipe
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
            if self.status is None:  # the process's end most likely follows: its EOF goes
                if not self._held:   # with EXIT, one wake-up of the client for both
                    self._timers.append(self.reactor.callLater(EOF_HOLD, self._release))
                self._held.append(fd)
                return
            self.channel.outs[fd].close()
            self._maybe_end()

    def _release(self) -> None:
        """The held EOFs go (EOF_HOLD passed, or the process ended)."""
        held, self._held = self._held, []
        for fd in held:
            self.channel.outs[fd].close()

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
        self._release()  # before EXIT
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


class ApartInput(InStream):
    """Stdin on the channel once it is handed over (APART): DATA and EOF are errors."""

    def __init__(self, channel: Channel, stream: int) -> None:
        super().__init__(channel, stream, None)

    def data(self, payload: bytes) -> None:
        raise wire.WireError("stdin on the channel after it was handed over")

    def end(self) -> None:
        raise wire.WireError("stdin's EOF on the channel after it was handed over")
