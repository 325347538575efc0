"""The client side of a job: announce, accept the first authenticated worker, stream.

Usable from Python: ``ClientJob(reactor, credential, targets).run()`` returns a
Deferred that fires with a JobResult or fails with a JobFailed subclass.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from twisted.internet import defer, process
from twisted.internet.interfaces import IDelayedCall, IListeningPort
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from rexnet import exitcodes, wire
from rexnet.alerts import AlertSender
from rexnet.announce import DatagramSender, now_ms, source_address
from rexnet.channel import Channel, InStream, OutStream
from rexnet.credentials import CertInfo, Credential
from rexnet.job import PipeReader
from rexnet.tls import listening_options

RESEND_DELAYS = (0.05, 0.1, 0.2, 0.4, 0.8, 1.6)
RESEND_MAX = 2.0
HANDSHAKE_TIMEOUT = 10.0
DEFAULT_TIMEOUT = 30.0

log = Logger()


class JobFailed(Exception):
    """The job could not run or finish for a reason of rexnet's; see exit_code."""

    exit_code = exitcodes.WORKER_LOST


class NoWorker(JobFailed):
    exit_code = exitcodes.NO_WORKER


class AuthFailed(JobFailed):
    exit_code = exitcodes.AUTH_FAILED


class JobRefused(JobFailed):
    exit_code = exitcodes.REFUSED


class WorkerLost(JobFailed):
    exit_code = exitcodes.WORKER_LOST


class LimitHit(JobFailed):
    """The worker ended the job for exceeding --job-timeout or --job-memory."""

    exit_code = exitcodes.TIME_LIMIT


class Interrupted(JobFailed):
    """A signal stopped the client before its job started."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class JobResult:
    """How the job ended, and where it ran."""

    code: int | None
    signal: int | None
    worker: str
    address: str
    job: str

    @property
    def status(self) -> int:
        """The exit status a shell would show: the code, or 128+N for signal N."""
        return self.code if self.signal is None else 128 + self.signal  # type: ignore[return-value]


class StdioStreams:
    """Connects the client's descriptors to a job channel's streams.

    Descriptors 0, 1 and 2 always (in a terminal, 1 carries the terminal's output and 2 is
    unused); further descriptors by FDS: "r" the job reads it, "w" the job writes it,
    "rw" both.
    """

    def __init__(self, reactor: Any, tty: bool = False, fds: dict[int, str] | None = None
                 ) -> None:
        self.reactor = reactor
        self.tty = tty
        self.fds = dict(fds or {})
        self.outputs = [1] if tty else [1, 2]
        self.outputs += [fd for fd, mode in self.fds.items() if "w" in mode]
        self.inputs = [0, *(fd for fd, mode in self.fds.items() if "r" in mode)]
        self._flushed: dict[int, defer.Deferred[None]] = {}
        self._writers: dict[int, process.ProcessWriter] = {}
        self._readers: dict[int, PipeReader] = {}
        self._dups: list[int] = []
        self.channel: Channel | None = None

    def prepare(self, channel: Channel) -> None:
        """Be ready for the job's output (before the job starts)."""
        self.channel = channel
        for fd in self.outputs:
            target = fd
            if fd in self.inputs:  # read-write: a second descriptor for the writer
                target = os.dup(fd)
                self._dups.append(target)
            writer = process.ProcessWriter(self.reactor, self, ("out", fd), target)
            self._writers[fd] = writer
            self._flushed[fd] = defer.Deferred()
            channel.ins[fd] = InStream(channel, fd, writer)

    def start_input(self) -> None:
        """The worker accepted the job: start sending our input descriptors."""
        assert self.channel is not None
        for fd in self.inputs:
            out = OutStream(self.channel, fd)
            self.channel.outs[fd] = out
            try:
                reader = PipeReader(self.reactor, self, ("in", fd), fd)
            except OSError:
                out.close()  # the descriptor is closed: the job reads EOF
                continue
            self._readers[fd] = reader
            out.attach(reader)

    # the ProcessReader/ProcessWriter callbacks
    def childDataReceived(self, name: tuple[str, int], data: bytes) -> None:
        assert self.channel is not None
        self.channel.outs[name[1]].write(data)

    def childConnectionLost(self, name: tuple[str, int], reason: Failure) -> None:
        direction, fd = name
        if direction == "in":
            if self.channel is not None and fd in self.channel.outs:
                self.channel.outs[fd].close()
            return
        stream = self.channel.ins.get(fd) if self.channel else None
        if stream is not None and stream.sink is not None:
            stream.drop_sink()  # our reader went away: discard the rest
            if self.channel is not None:
                self.channel.send(wire.Shut(fd))
        if fd in self.inputs:
            with contextlib.suppress(OSError):
                socket.socket(fileno=os.dup(fd)).shutdown(socket.SHUT_WR)
        flushed = self._flushed.get(fd)
        if flushed is not None and not flushed.called:
            flushed.callback(None)

    def finish(self) -> defer.Deferred[Any]:
        """Fires once every byte of output is written; stops reading input."""
        for reader in self._readers.values():
            if reader.connected:
                reader.stopReading()
                reader.connected = False
        for writer in self._writers.values():
            if writer.connected and not writer.disconnecting:
                writer.unregisterProducer()
                writer.loseConnection()
        done = defer.gatherResults(list(self._flushed.values()))

        def close_dups(result: object) -> object:
            for fd in self._dups:
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._dups = []
            return result

        return done.addBoth(close_dups)

    def descriptors(self) -> list[int]:
        return sorted({0, 1, 2, *self.fds})


class ClientJob:
    """One job: announce it, accept the first authenticated worker, run it there."""

    def __init__(
        self,
        reactor: Any,
        credential: Credential,
        targets: Sequence[tuple[str, int]],
        request: wire.Start | None = None,
        streams: StdioStreams | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        say: Callable[[str], None] = lambda message: None,
        now: Callable[[], int] = now_ms,
        alerts: AlertSender | None = None,
    ) -> None:
        self.reactor = reactor
        self.alerts = alerts or AlertSender(reactor, credential, [])
        self.credential = credential
        self.targets = list(targets)
        self.request = request = request or wire.Start()
        self.streams = streams or StdioStreams(reactor, request.tty, dict(request.fds))
        self.timeout = timeout
        self.say = say
        self.now = now
        self.job_id = os.urandom(16)
        self.seq = 0
        self.result: defer.Deferred[JobResult] = defer.Deferred()
        self.channels: set[ClientChannel] = set()
        self.chosen: ClientChannel | None = None
        self.started: wire.Started | None = None
        self.auth_failures: list[str] = []
        self.answered = 0
        self._port: IListeningPort | None = None
        self._udp: Any = None
        self._resend: IDelayedCall | None = None
        self._deadline: IDelayedCall | None = None
        self._addrs: tuple[str, ...] = ()
        self._early_signals: list[int] = []
        self.worker_error = ""
        self._t0 = reactor.seconds()

    # -- setting up -------------------------------------------------------------------

    def run(self) -> defer.Deferred[JobResult]:
        addrs = {a for a in (source_address(t) for t in self.targets) if a}
        if not addrs:
            self._fail(NoWorker("no announce target can be reached from this host: "
                                + ", ".join(f"{h}:{p}" for h, p in self.targets)))
            return self.result
        self._addrs = tuple(sorted(addrs))[: wire.MAX_ADDRS]
        interface = self._addrs[0] if len(self._addrs) == 1 else ""
        factory = Factory.forProtocol(lambda: ClientChannel(self))
        self._port = self.reactor.listenSSL(
            0, factory, listening_options(self.credential), interface=interface
        )
        self._udp = DatagramSender(self._send_failed)
        udp_port = self.reactor.listenUDP(0, self._udp)
        udp_port.setBroadcastAllowed(True)
        self._deadline = self.reactor.callLater(self.timeout, self._timed_out)
        self._announce()
        return self.result

    def _send_failed(self, target: tuple[str, int], error: OSError) -> None:
        self.say(f"cannot send to {target[0]}:{target[1]}: {error.strerror}")

    def _announce(self) -> None:
        assert self._port is not None
        ann = wire.Announce(self.job_id, self.seq, self.now(),
                            self._port.getHost().port, self._addrs)  # type: ignore[attr-defined]
        data = wire.encode_datagram(ann, self.credential.app_id, self.credential.key,
                                    self.credential.cert_der)
        for target in self.targets:
            self._udp.send(data, target)
        delay = RESEND_DELAYS[self.seq] if self.seq < len(RESEND_DELAYS) else RESEND_MAX
        self.seq += 1
        self._resend = self.reactor.callLater(delay, self._announce)

    def _stop_looking(self) -> None:
        for call in (self._resend, self._deadline):
            if call is not None and call.active():
                call.cancel()
        if self._port is not None:
            self._port.stopListening()
            self._port = None

    # -- workers ----------------------------------------------------------------------

    def worker_verified(self, channel: ClientChannel) -> None:
        if self.chosen is not None or self.result.called:
            channel.send(wire.Busy())
            channel.close()
            return
        self.chosen = channel
        self._stop_looking()
        taken = wire.encode_datagram(wire.Taken(self.job_id, self.now()),
                                     self.credential.app_id, self.credential.key)
        for target in self.targets:
            self._udp.send(taken, target)
        for other in list(self.channels):
            if other is not channel:
                if other.verified:
                    other.send(wire.Busy())
                other.close(abort=not other.verified)
        self.streams.prepare(channel)
        channel.start_heartbeat(self.reactor)
        channel.send(self.request)

    def job_started(self, channel: ClientChannel, started: wire.Started) -> None:
        self.started = started
        hello = channel.hello
        name = hello.worker if hello else CertInfo.of(channel.peer_cert).name
        if hello:
            why = (f"first of {self.answered} to connect back, after "
                   f"{(self.reactor.seconds() - self._t0) * 1000:.1f} ms; its load "
                   f"{hello.load:.2f}, delay {hello.delay_ms:.1f} ms, "
                   f"{hello.running}/{hello.slots} slots busy")
        else:
            why = "first to connect back"
        self.say(f"job {started.job} runs on worker {name} ({channel.peer_address()}): {why}")
        if started.refused_env:
            log.warn("worker {name} did not accept the environment variable(s) {names} "
                     "(see its --accept-env)", name=name, names=", ".join(started.refused_env))
        self.streams.start_input()
        for sig in self._early_signals:
            channel.send(wire.Signal(sig))

    def send_signal(self, number: int) -> None:
        """Deliver signal NUMBER to the job; before the job runs, give up with 128+N."""
        if self.chosen is not None and self.started is not None:
            self.chosen.send(wire.Signal(number))
        elif self.chosen is not None:
            self._early_signals.append(number)
        else:
            self._fail(Interrupted(f"interrupted by signal {number} before the job started",
                                   128 + number))

    def resize(self, rows: int, cols: int) -> None:
        """The client's terminal changed size: tell the job's terminal (before a worker is
        chosen, the job will start with the new size)."""
        if self.chosen is not None:
            self.chosen.send(wire.Winsize(rows, cols))
        elif self.request.tty:
            self.request = replace(self.request, rows=rows, cols=cols)

    def job_exited(self, channel: ClientChannel, exit: wire.Exit) -> None:
        if self.worker_error:
            channel.close()
            lost = WorkerLost(f"lost worker: {self.worker_error}")
            self.streams.finish().addBoth(lambda _: self._fail(lost))
            return
        if exit.limit:
            channel.close()
            seconds = f"{exit.limit} limit"
            error = LimitHit(f"the worker ended the job: it hit its {seconds} "
                             "(see the worker's --job-timeout / --job-memory)")
            error.exit_code = (exitcodes.TIME_LIMIT if exit.limit == "time"
                               else exitcodes.MEMORY_LIMIT)
            self.streams.finish().addBoth(lambda _: self._fail(error))
            return
        hello = channel.hello
        result = JobResult(exit.code, exit.signal, hello.worker if hello else "?",
                           channel.peer_address(), self.started.job if self.started else "?")
        channel.close()
        finished = self.streams.finish()
        finished.addCallback(lambda _: self._succeed(result))

    def job_error(self, channel: ClientChannel, error: wire.Error) -> None:
        if self.started is None:
            self._fail(JobRefused(f"worker {channel.peer_address()}: {error.message}"))
            channel.close()
        else:  # the worker is ending the job (e.g. it is stopping): keep its last output
            self.worker_error = error.message

    def auth_failed(self, channel: ClientChannel, problem: str) -> None:
        self.auth_failures.append(problem)
        log.warn("complaint: connection from {peer} refused: {problem}",
                 peer=channel.peer_address(), problem=problem)
        self.alerts.send("complaint", what=f"connection refused: {problem}",
                         source=channel.peer_address(), client=self.credential.name)

    def channel_lost(self, channel: ClientChannel) -> None:
        self.channels.discard(channel)
        if channel is self.chosen and not self.result.called and not channel.exited:
            hello = channel.hello
            who = hello.worker if hello else channel.peer_address()
            why = f": {self.worker_error}" if self.worker_error else ""
            self.streams.finish().addBoth(lambda _: self._fail(
                WorkerLost(f"lost worker {who} before the job finished{why}")))

    def _timed_out(self) -> None:
        self._deadline = None
        if self.chosen is not None:
            return
        if self.auth_failures:
            self._fail(AuthFailed(
                f"{len(self.auth_failures)} connection(s) failed authentication "
                f"(last: {self.auth_failures[-1]}); is the worker of the same application?"))
        else:
            targets = ", ".join(f"{h}:{p}" for h, p in self.targets)
            self._fail(NoWorker(f"no worker answered within {self.timeout:g} s "
                                f"(announced to {targets})"))

    # -- ending -----------------------------------------------------------------------

    def _cleanup(self) -> None:
        self._stop_looking()
        self.alerts.stop()
        if self._udp is not None and self._udp.transport is not None:
            self._udp.transport.stopListening()
        for channel in list(self.channels):
            channel.close(abort=True)

    def _succeed(self, result: JobResult) -> None:
        if not self.result.called:
            chosen = self.chosen
            self.alerts.send(
                "job-finished", job=result.job, worker=result.worker, worker_addr=result.address,
                client=self.credential.name, status=result.status, signal=result.signal,
                duration=round(self.reactor.seconds() - self._t0, 3),
                bytes_in=sum(s.sent for s in chosen.outs.values()) if chosen else 0,
                bytes_out=sum(s.received for s in chosen.ins.values()) if chosen else 0)
            self._cleanup()
            self.result.callback(result)

    def _fail(self, error: JobFailed) -> None:
        if not self.result.called:
            self.alerts.send("complaint", what=str(error), client=self.credential.name,
                             job=self.started.job if self.started else None)
            self._cleanup()
            self.result.errback(Failure(error))


class ClientChannel(Channel):
    """The client's end of a job channel (the TLS server side)."""

    def __init__(self, job: ClientJob) -> None:
        super().__init__(job.credential)
        self.job = job
        self.hello: wire.Hello | None = None
        self.exited = False
        self._timer: IDelayedCall | None = None

    def connectionMade(self) -> None:
        super().connectionMade()
        self.job.channels.add(self)
        self.job.answered += 1
        self._timer = self.job.reactor.callLater(HANDSHAKE_TIMEOUT, self._silent)

    def _silent(self) -> None:
        self._timer = None
        if not self.verified:
            self.job.auth_failed(self, "no TLS handshake in time")
            self.close(abort=True)

    def peerVerified(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self.job.worker_verified(self)

    def refused(self, problem: str) -> None:
        self.job.auth_failed(self, problem)

    def controlReceived(self, frame: wire.Frame) -> None:
        if isinstance(frame, wire.Hello) and self.hello is None:
            self.hello = frame
        elif self is not self.job.chosen:
            return  # a worker that lost the race: ignore it while it closes
        elif isinstance(frame, wire.Started) and self.job.started is None:
            self.job.job_started(self, frame)
        elif isinstance(frame, wire.Exit) and not self.exited:
            self.exited = True
            self.job.job_exited(self, frame)
        elif isinstance(frame, wire.Error):
            self.job.job_error(self, frame)
        else:
            super().controlReceived(frame)

    def lost(self, reason: Failure) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        if not self.verified and not self.closed_by_us:
            self.job.auth_failed(self, f"TLS handshake failed: {tls_reason(reason)}")
        self.job.channel_lost(self)

    @property
    def closed_by_us(self) -> bool:
        return self.job.chosen is not None and self is not self.job.chosen


def tls_reason(reason: Failure) -> str:
    """A short reason from an OpenSSL error or a plain connection failure."""
    value = reason.value
    errors = getattr(value, "args", ())
    if errors and isinstance(errors[0], list) and errors[0]:
        last = errors[0][-1]
        if isinstance(last, tuple) and len(last) == 3:
            return str(last[2])
    return reason.getErrorMessage()[:200]
