"""The client side of a job: announce, accept the first authenticated worker, stream.

Usable from Python: ``ClientJob(reactor, credential, targets).run()`` returns a
Deferred that fires with a JobResult or fails with a JobFailed subclass; ``run()`` (bytes in,
bytes out, optional re-dispatch) and ``run_streaming()`` (a producer and consumers) wrap it.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from twisted.internet import defer, process
from twisted.internet.interfaces import IConsumer, IDelayedCall, IListeningPort, IPushProducer
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from rexnet.client.warm import WarmPool
from rexnet.net.alerts import AlertSender
from rexnet.net.announce import DatagramSender, now_ms, source_address
from rexnet.net.channel import Channel, InStream, OutStream
from rexnet.net.pipes import PipeReader
from rexnet.protocol import exitcodes, wire
from rexnet.security.credentials import CertInfo, Credential
from rexnet.security.tls import VERIFY_ERROR, Revocations, listening_options

RESEND_DELAYS = (0.05, 0.1, 0.2, 0.4, 0.8, 1.6)
RESEND_MAX = 2.0
HANDSHAKE_TIMEOUT = 10.0
DEFAULT_TIMEOUT = 30.0

log = Logger()


class JobFailed(Exception):
    """The job could not run or finish for a reason of rexnet's; see exit_code.

    run() fills in what the client knows when the job failed: the worker that had it (if
    one did), the output received before the failure (stdout, stderr, output_bytes) and how
    many times the job was dispatched (attempts).
    """

    exit_code = exitcodes.WORKER_LOST
    worker: str | None = None
    stdout: bytes = b""
    stderr: bytes = b""
    output_bytes = 0
    attempts = 1


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


class OutputLimit(JobFailed):
    """The job wrote more than run()'s max_output on stdout or stderr: the client kept the
    first max_output bytes, closed that stream (the job's further writes fail, as into a
    closed pipe) and holds what the job did next in ``result``."""

    exit_code = exitcodes.MEMORY_LIMIT

    def __init__(self, message: str, result: CompletedJob) -> None:
        super().__init__(message)
        self.result = result


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


class JobStreams(typing.Protocol):
    """Where a ClientJob's streams go: StdioStreams (descriptors), ProducerStreams
    (Twisted producers and consumers) or BytesStreams (bytes in, buffers out)."""

    def prepare(self, channel: Channel) -> None:
        """Be ready for the job's output (a worker was chosen; the job has not started)."""

    def start_input(self) -> None:
        """The job started: send its input."""

    def finish(self) -> defer.Deferred[Any]:
        """The job ended (or failed): stop input; fire once the output is delivered."""
        ...


class StdioStreams:
    """Connects the client's descriptors to a job channel's streams.

    Descriptors 0, 1 and 2 always (in a terminal, 1 carries the terminal's output and 2 is
    unused); further descriptors by FDS: "r" the job reads it, "w" the job writes it,
    "rw" both. LOCAL maps a stream to the descriptor that serves it here (the agent's
    copies of its launcher's descriptors); by default the stream's own number.
    """

    def __init__(self, reactor: Any, tty: bool = False, fds: dict[int, str] | None = None,
                 local: dict[int, int] | None = None) -> None:
        self.reactor = reactor
        self.local = dict(local or {})
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
            target = self.local.get(fd, fd)
            if fd in self.inputs:  # read-write: a second descriptor for the writer
                target = os.dup(target)
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
                reader = PipeReader(self.reactor, self, ("in", fd), self.local.get(fd, fd))
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
                socket.socket(fileno=os.dup(self.local.get(fd, fd))).shutdown(socket.SHUT_WR)
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

    def abort(self) -> None:
        """Stop using the descriptors at once, written or not (the agent lets go of its
        launcher's descriptors when the job ends or the launcher goes away)."""
        for reader in self._readers.values():
            reader.stopReading()
        for writer in self._writers.values():
            writer.stopReading()
            writer.stopWriting()
        for fd in self._dups:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._dups = []

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
        streams: JobStreams | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        say: Callable[[str], None] = lambda message: None,
        now: Callable[[], int] = now_ms,
        alerts: AlertSender | None = None,
        pool: WarmPool | None = None,
        logger: Logger | None = None,
    ) -> None:
        self.reactor = reactor
        self.pool = pool
        self.log = logger or log
        self.reused = False
        self.alerts = alerts or AlertSender(reactor, credential, [])
        self.credential = credential
        self.targets = list(targets)
        self.request = request = request or wire.Start()
        if pool is not None:  # ask the worker to keep the channel for our next job
            self.request = replace(request, keep=True)
        self.streams: JobStreams = streams or StdioStreams(reactor, request.tty,
                                                           dict(request.fds))
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
        self.revoked: Revocations | None = None  # workers whose certificates are revoked
        # called with the worker's name and the job's id once the job runs there
        self.on_started: Callable[[str, str], None] | None = None

    # -- setting up -------------------------------------------------------------------

    def run(self) -> defer.Deferred[JobResult]:
        """Run the job on a warm channel if the pool has a good one, else announce it."""
        channel = self.pool.take(self.pool_key) if self.pool is not None else None
        if channel is not None:
            self._reuse(channel)
        else:
            self._look()
        return self.result

    @property
    def pool_key(self) -> tuple[bytes, tuple[tuple[str, int], ...]]:
        """Warm channels serve jobs of the same credential and announce targets."""
        return self.credential.cert_der, tuple(self.targets)

    def _reuse(self, channel: ClientChannel) -> None:
        self.reused = True
        channel.job = self
        channel.exited = False
        channel.ins.clear()
        channel.outs.clear()
        self.channels.add(channel)
        self.chosen = channel
        channel.send(self.request)  # the streams are prepared once the worker says STARTED

    def warm_refused(self, channel: ClientChannel, why: str) -> None:
        """The warm channel's worker cannot take the job after all: announce it."""
        self.channels.discard(channel)
        channel.close()
        self.chosen = None
        self.reused = False
        self.say(f"warm channel to worker {channel.hello.worker if channel.hello else '?'} "
                 f"{why}: announcing the job")
        self._look()

    def _look(self) -> None:
        addrs = {a for a in (source_address(t) for t in self.targets) if a}
        if not addrs:
            self._fail(NoWorker("no announce target can be reached from this host: "
                                + ", ".join(f"{h}:{p}" for h, p in self.targets)))
            return
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
        taken = wire.encode_datagram(wire.Taken(self.job_id, self.now(), self.answered),
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
        if hello and self.reused:
            why = (f"reused warm channel (its load {hello.load:.2f} reported "
                   f"{(self.reactor.seconds() - channel.heard_at) * 1000:.0f} ms before, "
                   f"{hello.running}/{hello.slots} slots busy)")
        elif hello:
            why = (f"first of {self.answered} to connect back, after "
                   f"{(self.reactor.seconds() - self._t0) * 1000:.1f} ms; its load "
                   f"{hello.load:.2f}, delay {hello.delay_ms:.1f} ms, "
                   f"{hello.running}/{hello.slots} slots busy")
        else:
            why = "first to connect back"
        self.say(f"job {started.job} runs on worker {name} ({channel.peer_address()}): {why}")
        if started.refused_env:
            self.log.warn("worker {name} did not accept the environment variable(s) "
                          "{names} (see its --accept-env)", name=name,
                          names=", ".join(started.refused_env))
        if self.pool is not None:
            self.pool.started(channel)
        if self.on_started is not None:
            self.on_started(name, started.job)
        if self.reused:
            self.streams.prepare(channel)
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
        if self.pool is None:
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
        self.log.warn("complaint: connection from {peer} refused: {problem}",
                      peer=channel.peer_address(), problem=problem)
        self.alerts.send("complaint", what=f"connection refused: {problem}",
                         source=channel.peer_address(), client=self.credential.name)

    def channel_lost(self, channel: ClientChannel) -> None:
        self.channels.discard(channel)
        if (channel is self.chosen and self.reused and self.started is None
                and not self.result.called):
            self.warm_refused(channel, "was lost before the job started")
            return
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
        if self.pool is not None and self.chosen is not None and self.chosen.parked is None:
            self.pool.lost(self.chosen)  # the job failed: its channel closes below
        self._stop_looking()
        self.alerts.stop()
        if self._udp is not None and self._udp.transport is not None:
            self._udp.transport.stopListening()
        for channel in list(self.channels):
            channel.close(abort=True)

    def abandon(self) -> None:
        """The job's owner went away (the agent's launcher died): end it, as a client that
        dies would (its worker ends the job's processes)."""
        if self.chosen is not None and self.chosen.parked is None:
            self.chosen.close(abort=True)
        self._fail(Interrupted("the job's launcher went away", exitcodes.WORKER_LOST))

    def _succeed(self, result: JobResult) -> None:
        if not self.result.called:
            chosen = self.chosen
            if (self.pool is not None and chosen is not None and chosen.exited
                    and not chosen.closed):
                self.channels.discard(chosen)
                if not self.pool.park(self.pool_key, chosen):
                    chosen.close()
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
        self.revoked = job.revoked
        self.job = job
        self.hello: wire.Hello | None = None
        self.heard_at = 0.0  # when the last HELLO came
        self.won_load = 0.0  # the worker's load when it won (see rexnet.client.warm)
        self.won_others = 0  # other clients' jobs on the worker then
        self.own_at_hello = 0  # this client's jobs there when the last HELLO came
        self.jobs = 0  # jobs started on this channel
        self.parked: WarmPool | None = None  # idle in this pool, between jobs
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
        if isinstance(frame, wire.Hello):
            self.hello = frame
            self.heard_at = self.job.reactor.seconds()
            pool = self.parked or self.job.pool
            if pool is not None:
                pool.heard(self)
        elif self.parked is not None or self.job.result.called:
            return  # idle between jobs: late frames of the last job
        elif self is not self.job.chosen:
            return  # a worker that lost the race: ignore it while it closes
        elif isinstance(frame, wire.Started) and self.job.started is None:
            self.job.job_started(self, frame)
        elif isinstance(frame, wire.Exit) and not self.exited:
            self.exited = True
            self.job.job_exited(self, frame)
        elif isinstance(frame, wire.Error):
            self.job.job_error(self, frame)
        elif isinstance(frame, wire.Busy) and self.job.reused and self.job.started is None:
            self.job.warm_refused(self, "has no free slot")
        else:
            super().controlReceived(frame)

    def lost(self, reason: Failure) -> None:
        if self.parked is not None:
            self.parked.lost(self)
            return
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        if not self.verified and not self.closed_by_us:
            why = getattr(self.transport, VERIFY_ERROR, None) or tls_reason(reason)
            self.job.auth_failed(self, f"TLS handshake failed: {why}")
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


# -- the Python API: bytes or producers and consumers instead of descriptors ------------

DEFAULT_ANNOUNCE = "255.255.255.255"
INPUT_CHUNK = 64 * 1024


@implementer(IPushProducer)
class BytesProducer:
    """Produces DATA for one consumer, in the manner of twisted.web's IBodyProducer:
    startProducing(consumer) writes while not paused and returns a Deferred that fires once
    everything is written (never, after stopProducing)."""

    def __init__(self, data: bytes, chunk: int = INPUT_CHUNK) -> None:
        self.data = memoryview(data)
        self.chunk = chunk
        self.position = 0
        self.paused = False
        self.stopped = False
        self._busy = False
        self._consumer: Any = None
        self._done: defer.Deferred[None] | None = None

    def startProducing(self, consumer: IConsumer) -> defer.Deferred[None]:
        self._consumer = consumer
        self._done = defer.Deferred()
        self._produce()
        return self._done

    def _produce(self) -> None:
        if self._busy or self._consumer is None:
            return
        self._busy = True
        try:
            while not self.paused and not self.stopped and self.position < len(self.data):
                chunk = self.data[self.position : self.position + self.chunk].tobytes()
                self.position += len(chunk)
                self._consumer.write(chunk)
        finally:
            self._busy = False
        done = self._done
        if (self.position >= len(self.data) and not self.stopped and done is not None
                and not done.called):
            done.callback(None)

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self._produce()

    def stopProducing(self) -> None:
        self.stopped = True


@implementer(IConsumer)
class OutputBuffer:
    """Collects a stream in memory, at most LIMIT bytes (None: no bound); past the limit it
    keeps the first LIMIT bytes, sets ``truncated`` and calls OVERFLOW once."""

    def __init__(self, limit: int | None = None,
                 overflow: Callable[[], None] = lambda: None) -> None:
        self.limit = limit
        self.overflow = overflow
        self.chunks: list[bytes] = []
        self.size = 0
        self.truncated = False

    def write(self, data: bytes) -> None:
        if self.truncated:
            return
        if self.limit is not None and self.size + len(data) > self.limit:
            data = data[: self.limit - self.size]
            self.truncated = True
        if data:
            self.chunks.append(data)
            self.size += len(data)
        if self.truncated:
            self.overflow()

    def getvalue(self) -> bytes:
        if len(self.chunks) > 1:
            self.chunks = [b"".join(self.chunks)]
        return self.chunks[0] if self.chunks else b""

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        pass

    def unregisterProducer(self) -> None:
        pass


class ConsumerSink:
    """The sink of an InStream (write, registerProducer, unregisterProducer,
    loseConnection) that hands the bytes to an IConsumer, or drops them if there is none.

    The consumer gets the stream as its producer, so it can pause it (the worker's side
    then pauses within the stream's window). It is never closed: the job's Deferred firing
    says the output is complete."""

    def __init__(self, consumer: IConsumer | None) -> None:
        self.consumer = consumer
        self.ended = False
        self._registered = False

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        if self.consumer is not None and not self._registered:
            try:
                self.consumer.registerProducer(producer, streaming)
            except RuntimeError:  # the consumer has a producer already: no flow control
                return
            self._registered = True

    def unregisterProducer(self) -> None:
        if self._registered and self.consumer is not None:
            self._registered = False
            self.consumer.unregisterProducer()

    def write(self, data: bytes) -> None:
        if self.consumer is not None:
            self.consumer.write(data)

    def loseConnection(self) -> None:
        self.ended = True
        self.unregisterProducer()


@implementer(IConsumer)
class StreamInput:
    """The consumer a stdin producer writes to: the job's stream 0. The producer is paced
    by the stream's credit from its first write (or from registerProducer)."""

    def __init__(self, out: OutStream, producer: Any) -> None:
        self.out = out
        self.producer = producer
        self._attached = False

    def _attach(self) -> None:
        if not self._attached and not self.out.closed:
            self._attached = True
            self.out.attach(self.producer)

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        if not streaming:
            raise ValueError("rexnet takes push producers (IPushProducer) for a job's stdin")
        self.producer = producer
        self._attach()

    def unregisterProducer(self) -> None:
        if self.out.source is self.producer:
            self.out.source = None

    def write(self, data: bytes) -> None:
        self._attach()
        self.out.write(data)


class ProducerStreams:
    """A job's stdin from a Twisted push producer, its stdout and stderr to consumers.

    STDIN follows twisted.web's IBodyProducer: an IPushProducer with
    ``startProducing(consumer)`` returning a Deferred that fires once all input is written
    (twisted.web.client.FileBodyProducer fits); then the job reads EOF. None: empty stdin.
    STDOUT and STDERR are IConsumers (None discards); see ConsumerSink.
    """

    def __init__(self, stdin: Any = None, stdout: IConsumer | None = None,
                 stderr: IConsumer | None = None) -> None:
        self.stdin = stdin
        self.sinks = {1: ConsumerSink(stdout), 2: ConsumerSink(stderr)}
        self.channel: Channel | None = None
        self._input: OutStream | None = None
        self._input_done = False

    def prepare(self, channel: Channel) -> None:
        self.channel = channel
        for fd, sink in self.sinks.items():
            channel.ins[fd] = InStream(channel, fd, sink)

    def start_input(self) -> None:
        assert self.channel is not None
        out = self._input = OutStream(self.channel, 0)
        self.channel.outs[0] = out
        if self.stdin is None:
            self._input_done = True
            out.close()
            return

        def finished(result: object) -> None:
            self._input_done = True
            out.source = None
            if isinstance(result, Failure) and not out.closed:
                log.warn("the job's input failed: {why}; the job reads EOF",
                         why=result.getErrorMessage())
            out.close()

        try:
            written = self.stdin.startProducing(StreamInput(out, self.stdin))
        except Exception:
            log.failure("the job's input could not start; the job reads EOF")
            finished(None)
            return
        written.addBoth(finished)

    def finish(self) -> defer.Deferred[Any]:
        out = self._input
        if self.stdin is not None and out is not None and not self._input_done:
            self._input_done = True
            if not out.closed:  # the job ended first, or failed: stop reading the input
                out.closed = True
                out.source = None
                self.stdin.stopProducing()
        for sink in self.sinks.values():
            sink.unregisterProducer()
        return defer.succeed(None)


class BytesStreams(ProducerStreams):
    """A job's stdin from bytes; its stdout and stderr collected into OutputBuffers of at
    most MAX_OUTPUT bytes each (None: unbounded). A stream that overflows is closed, as a
    pipe whose reader went away: the job's further writes to it fail."""

    def __init__(self, stdin: bytes = b"", max_output: int | None = None) -> None:
        self.stdout = OutputBuffer(max_output, lambda: self._overflow(1))
        self.stderr = OutputBuffer(max_output, lambda: self._overflow(2))
        self.overflowed: list[int] = []
        super().__init__(BytesProducer(stdin) if stdin else None, self.stdout, self.stderr)

    def _overflow(self, fd: int) -> None:
        self.overflowed.append(fd)
        stream = self.channel.ins.get(fd) if self.channel is not None else None
        if stream is not None and self.channel is not None:
            stream.drop_sink()
            self.channel.send(wire.Shut(fd))


@dataclass(frozen=True)
class CompletedJob:
    """A finished job, like subprocess.CompletedProcess.

    ``returncode`` is the status a shell would show (128+N when signal N killed the job, as
    ``rexnet exec`` exits with); ``signal`` is N. ``worker`` named the worker it ran on,
    ``attempts`` says how many times it was dispatched (more than 1 after a re-dispatch).
    """

    args: tuple[str, ...]
    returncode: int
    stdout: bytes
    stderr: bytes
    worker: str
    address: str = ""
    job: str = ""
    signal: int | None = None
    attempts: int = 1

    def check_returncode(self) -> None:
        """Raise subprocess.CalledProcessError if the status is not 0."""
        if self.returncode:
            raise subprocess.CalledProcessError(self.returncode, list(self.args), self.stdout,
                                                self.stderr)


def client_credential(credential: Credential | str | os.PathLike[str]) -> Credential:
    """A client credential, or the path of one to load (CredentialError if it is refused)."""
    if isinstance(credential, Credential):
        return credential
    from pathlib import Path

    from rexnet.security.credentials import load_credential

    return load_credential(Path(credential), "client")


def revocations_beside(credential: Credential | str | os.PathLike[str],
                       loaded: Credential) -> Revocations | None:
    """APP.revoked beside CREDENTIAL's file, if it is a path and there is one (the default
    of `rexnet exec`); CredentialError if that list cannot be read."""
    if isinstance(credential, Credential):
        return None
    from pathlib import Path

    from rexnet.security.revocation import open_list

    return open_list(None, Path(credential), loaded.app)


Target = str | tuple[str, int]


def announce_targets(announce: Sequence[Target] | None = None) -> list[tuple[str, int]]:
    """Targets from "ADDR[:PORT]" texts (or pairs); none: $GROUP, else the broadcast address,
    as `rexnet exec` does. ValueError for a bad address."""
    from rexnet.net.announce import parse_target

    texts: list[Target] = list(announce) if announce else [
        os.environ.get("GROUP") or DEFAULT_ANNOUNCE]
    return [(t[0], int(t[1])) if isinstance(t, tuple) else parse_target(t) for t in texts]


def _env_pairs(env: Mapping[str, str] | Sequence[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    items = env.items() if isinstance(env, Mapping) else env
    return tuple((str(k), str(v)) for k, v in items)


def _failure_details(error: JobFailed, job: ClientJob, streams: JobStreams,
                     attempt: int) -> None:
    """What the client knows about a failed job, on the error (see JobFailed)."""
    chosen = job.chosen
    if chosen is not None:
        error.worker = chosen.hello.worker if chosen.hello else CertInfo.of(
            chosen.peer_cert).name
        error.output_bytes = sum(chosen.ins[fd].received for fd in (1, 2)
                                 if fd in chosen.ins)
    if isinstance(streams, BytesStreams):
        error.stdout = streams.stdout.getvalue()
        error.stderr = streams.stderr.getvalue()
    error.attempts = attempt


async def _dispatch(
    reactor: Any,
    credential: Credential | str | os.PathLike[str],
    args: Sequence[str],
    make_streams: Callable[[], JobStreams],
    announce: Sequence[Target] | None,
    timeout: float,
    env: Mapping[str, str] | Sequence[tuple[str, str]],
    retries: int,
    say: Callable[[str], None] | None,
    alerts: Sequence[Target] | None,
    on_started: Callable[[str, str], None] | None,
    pool: WarmPool | None = None,
    revoked: Revocations | None = None,
) -> tuple[JobResult, JobStreams, int]:
    """Run one job, again on WorkerLost before any output (up to RETRIES more times)."""
    from rexnet.net.alerts import CRAT_PORT, crat_targets
    from rexnet.net.announce import parse_target

    cred = client_credential(credential)
    if revoked is None:
        revoked = revocations_beside(credential, cred)
    targets = announce_targets(announce)
    alert_to = crat_targets(targets) if alerts is None else [
        (t[0], int(t[1])) if isinstance(t, tuple) else parse_target(t, CRAT_PORT)
        for t in alerts]
    if retries < 0 or timeout <= 0:
        raise ValueError("retries must be >= 0 and timeout positive")
    tell = say or (lambda message: log.info("{message}", message=message))
    request = wire.Start(tuple(args), _env_pairs(env))
    attempt = 0
    while True:
        attempt += 1
        streams = make_streams()
        sender = (pool.alerts(cred, alert_to) if pool is not None
                  else AlertSender(reactor, cred, alert_to))
        job = ClientJob(reactor, cred, targets, request, streams, timeout, say=tell,
                        alerts=sender, pool=pool)
        job.revoked = revoked
        job.on_started = on_started
        try:
            result = await job.run()
        except JobFailed as error:
            _failure_details(error, job, streams, attempt)
            if isinstance(error, WorkerLost) and error.output_bytes == 0 and attempt <= retries:
                tell(f"{error}; the job had written no output: dispatching it again "
                     f"(attempt {attempt + 1} of {retries + 1})")
                continue
            raise
        return result, streams, attempt


def run(
    reactor: Any,
    credential: Credential | str | os.PathLike[str],
    args: Sequence[str] = (),
    stdin: bytes = b"",
    announce: Sequence[Target] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    env: Mapping[str, str] | Sequence[tuple[str, str]] = (),
    max_output: int | None = None,
    retries: int = 0,
    say: Callable[[str], None] | None = None,
    alerts: Sequence[Target] | None = None,
    on_started: Callable[[str, str], None] | None = None,
    pool: WarmPool | None = None,
    revoked: Revocations | None = None,
) -> defer.Deferred[CompletedJob]:
    """Run one job with STDIN as its input; fires with a CompletedJob (its status, stdout,
    stderr and worker) or fails with a JobFailed subclass (NoWorker, AuthFailed, JobRefused,
    WorkerLost, LimitHit; OutputLimit past MAX_OUTPUT bytes on stdout or stderr).

    ARGS are the extra arguments (the worker must run with --allow-args); ANNOUNCE is where
    to announce ("ADDR[:PORT]", as `rexnet exec --announce`; default $GROUP, else the
    broadcast address); TIMEOUT bounds the search for a worker; ENV asks for variables the
    worker may accept. With RETRIES, a job whose worker is lost before the client received
    any of its output runs again (on whichever worker answers next); one that produced
    output fails with WorkerLost, never silently rerun. SAY gets progress messages (default:
    Twisted's log); ON_STARTED(worker, job_id) is called when the job runs somewhere;
    ALERTS are crat addresses (default: the announce targets on port 3011). POOL keeps the
    job's channel warm afterwards, and runs it on a warm channel if one is a good choice
    (see rexnet.client.warm). REVOKED lists workers to refuse
    (rexnet.security.revocation.open_list; by default APP.revoked beside CREDENTIAL's file,
    if there is one, as for `rexnet exec`).
    """

    async def go() -> CompletedJob:
        result, streams, attempts = await _dispatch(
            reactor, credential, args, lambda: BytesStreams(stdin, max_output), announce,
            timeout, env, retries, say, alerts, on_started, pool, revoked)
        assert isinstance(streams, BytesStreams)
        completed = CompletedJob(tuple(args), result.status, streams.stdout.getvalue(),
                                 streams.stderr.getvalue(), result.worker, result.address,
                                 result.job, result.signal, attempts)
        if streams.overflowed:
            which = " and ".join("stdout" if fd == 1 else "stderr"
                                 for fd in sorted(set(streams.overflowed)))
            error = OutputLimit(f"job {result.job} on worker {result.worker} wrote more than "
                                f"{max_output} bytes on {which}; the rest was discarded",
                                completed)
            error.worker, error.attempts = result.worker, attempts
            error.stdout, error.stderr = completed.stdout, completed.stderr
            raise error
        return completed

    return defer.Deferred.fromCoroutine(go())


def run_streaming(
    reactor: Any,
    credential: Credential | str | os.PathLike[str],
    args: Sequence[str] = (),
    stdin: Any = None,
    stdout: IConsumer | None = None,
    stderr: IConsumer | None = None,
    announce: Sequence[Target] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    env: Mapping[str, str] | Sequence[tuple[str, str]] = (),
    retries: int = 0,
    say: Callable[[str], None] | None = None,
    alerts: Sequence[Target] | None = None,
    on_started: Callable[[str, str], None] | None = None,
    pool: WarmPool | None = None,
    revoked: Revocations | None = None,
) -> defer.Deferred[JobResult]:
    """Run one job streaming: STDIN is a push producer with startProducing(consumer) (as
    twisted.web's IBodyProducer; None: empty input), STDOUT and STDERR are IConsumers that
    may pause the stream (None: discarded). Fires with a JobResult once every byte of
    output was written to the consumers, or fails as run() does. RETRIES (as for run())
    needs STDIN None: a producer cannot be replayed. POOL (a rexnet.client.warm.WarmPool) lets
    jobs reuse warm channels, as for run()."""
    if retries and stdin is not None:
        return defer.fail(ValueError("retries need stdin=None: a producer cannot be replayed"))
    if stdin is not None and not callable(getattr(stdin, "startProducing", None)):
        return defer.fail(TypeError("stdin must be a push producer with "
                                    "startProducing(consumer), as twisted.web's "
                                    "IBodyProducer (FileBodyProducer, BytesProducer)"))

    async def go() -> JobResult:
        result, _, _ = await _dispatch(
            reactor, credential, args, lambda: ProducerStreams(stdin, stdout, stderr),
            announce, timeout, env, retries, say, alerts, on_started, pool, revoked)
        return result

    return defer.Deferred.fromCoroutine(go())
