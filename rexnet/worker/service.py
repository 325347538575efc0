"""The worker (cexec's cservice): hears announcements, connects back, runs jobs."""

from __future__ import annotations

import contextlib
import fnmatch
import os
import random
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IDelayedCall, IListeningPort
from twisted.internet.protocol import Factory
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from rexnet.net.alerts import AlertSender
from rexnet.net.announce import (
    AnnounceChecker,
    ClientCert,
    DatagramReceiver,
    RateLimiter,
    Rejected,
    now_ms,
)
from rexnet.net.channel import Channel
from rexnet.protocol import wire
from rexnet.security.credentials import CertInfo, Credential, check_validity
from rexnet.security.hardening import make_undumpable
from rexnet.security.tls import Revocations, connecting_options
from rexnet.version import __version__
from rexnet.worker.job import KILL_GRACE, JobProcess, Limits, spawn
from rexnet.worker.load import (
    IDLE_MS,
    Crowd,
    HostLoad,
    connect_back_delay,
    load_figure,
    sample_host,
    spread_ms,
)
from rexnet.worker.metrics import NO_METRICS, NoMetrics

CONNECT_TIMEOUT = 5.0
START_TIMEOUT = 10.0
TRIED_JOBS = 10_000
COMPLAINT_INTERVAL = 1.0
COMPLAINT_RATE = 20.0  # complaint lines (and alerts) a second, all sources together
STATUS_INTERVAL = 5.0  # seconds between worker-status alerts
GLOBAL_RATE = 2000.0  # datagrams per second checked, all sources together
GLOBAL_BURST = 4000.0
WARM_IDLE = 30.0  # how long a warm channel may wait for its client's next job
WARM_REPORT = 1.0  # seconds between fresh HELLOs (load figures) on an idle warm channel
MAX_WARM = 64  # idle warm channels a worker keeps at most
SAMPLE_AGE = 0.1  # seconds a host sample serves warm channels' reports

log = Logger()


@dataclass(frozen=True)
class WorkerSettings:
    """What a worker serves and how."""

    credential: Credential
    command: tuple[str, ...]
    name: str
    slots: int
    speed: float = 1.0
    allow_args: bool = False
    listen: tuple[str, int] = ("0.0.0.0", 3010)
    groups: tuple[str, ...] = ()
    accept_env: tuple[str, ...] = ()
    alert_targets: tuple[tuple[str, int], ...] = ()
    chdir: str | None = None
    limits: Limits = field(default_factory=Limits)
    revoked: Revocations | None = None  # rexnet.security.revocation.RevokedFile

    def accepts_env(self, name: str) -> bool:
        """Whether a job may set variable NAME (sshd's AcceptEnv patterns)."""
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.accept_env)


@dataclass
class Pending:
    """A connect-back this worker has promised: it holds a slot until settled."""

    job_id: bytes
    client: ClientCert
    load: float
    delay: float
    call: IDelayedCall | None = None
    heard: float = 0.0  # when the announcement came (reactor time)
    spread: float = 0.0  # the width of the random part of DELAY, in ms
    connecting: defer.Deferred[Any] | None = None
    channel: WorkerChannel | None = None


@dataclass
class Running:
    job: str
    channel: WorkerChannel
    process: JobProcess
    client: str
    argv: list[str] = field(default_factory=list)
    started: float = 0.0


def connect_back_target(dgram: wire.Datagram, addrs: tuple[str, ...], port: int,
                        source: str) -> tuple[str, int]:
    """Where to answer: the client itself, a cproxy that relayed it (at the source, on
    the relay's port), or, through a tunnel, the first address the client signed."""
    if dgram.relay_port:
        return source, dgram.relay_port
    if dgram.relay_port == 0 and source not in addrs and addrs:
        return addrs[0], port
    return source, port


class Complaints:
    """Logs complaints about peers (and sends them as alerts): at most one line per source
    per interval, and at most COMPLAINT_RATE lines a second from all sources together, so
    that a flood from many sources cannot flood the log or the network with alerts."""

    def __init__(self, clock: Callable[[], float],
                 alert: Callable[..., None] = lambda event, **fields: None) -> None:
        self.clock = clock
        self.alert = alert
        self._last: OrderedDict[str, tuple[float, int]] = OrderedDict()
        self._all = RateLimiter(COMPLAINT_RATE, COMPLAINT_RATE * 2, 1)
        self.count = 0
        self.logged = 0

    def __call__(self, source: str, what: str) -> None:
        self.count += 1
        now = self.clock()
        last, suppressed = self._last.pop(source, (-1e18, 0))
        if now - last < COMPLAINT_INTERVAL or not self._all.allow("", now):
            self._last[source] = (last, suppressed + 1)
        else:
            log.warn("complaint: {what} (from {source}; {suppressed} more suppressed)",
                     what=what, source=source, suppressed=suppressed)
            self.alert("complaint", what=what, source=source, suppressed=suppressed)
            self.logged += 1
            self._last[source] = (now, 0)
        while len(self._last) > 4096:
            self._last.popitem(last=False)


class Worker:
    """Decides which announcements to answer, and runs the jobs it wins."""

    metrics: NoMetrics = NO_METRICS  # twistd rexnet-worker --metrics sets a real one

    def __init__(
        self,
        settings: WorkerSettings,
        reactor: Any,
        sample: Callable[[], HostLoad] = sample_host,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self.settings = settings
        self.reactor = reactor
        self.sample = sample
        self.jitter = jitter
        self.checker = AnnounceChecker(settings.credential, revoked=settings.revoked)
        self.limiter = RateLimiter()
        self.all_sources = RateLimiter(GLOBAL_RATE, GLOBAL_BURST, 1)
        self.received = 0
        self.alerts = AlertSender(reactor, settings.credential, settings.alert_targets)
        self.complain = Complaints(reactor.seconds, self.alerts.send)
        self.started_at = reactor.seconds()
        self.reply: Callable[[bytes, tuple[str, int]], None] = lambda data, target: None
        self.tls = connecting_options(settings.credential)
        self.pending: dict[bytes, Pending] = {}
        self.running: dict[str, Running] = {}
        self.tried: OrderedDict[bytes, None] = OrderedDict()
        self.jobs_run = 0
        self.rate_limited = 0
        self.warm: set[WorkerChannel] = set()  # idle channels kept for their client's next job
        self._sampled: tuple[float, HostLoad] | None = None  # for warm channels' reports
        self.crowd = Crowd()
        self._idle: defer.Deferred[None] | None = None

    @property
    def busy(self) -> int:
        """Slots in use: running jobs and reserved connect-backs."""
        return len(self.running) + len(self.pending)

    # -- datagrams --------------------------------------------------------------------

    def datagram(self, data: bytes, host: str, port: int) -> None:
        self.received += 1
        now = self.reactor.seconds()
        # per source first, so that a source over its limit spends no global tokens
        if not self.limiter.allow(host, now) or not self.all_sources.allow("", now):
            self.rate_limited += 1
            self.metrics.rate_limited()
            return
        try:
            dgram = self.checker.decode(data)
            if dgram is None:
                return  # another application's traffic
            message = dgram.message
            if isinstance(message, wire.Announce):
                self._announce(dgram, host)
            elif isinstance(message, wire.Taken):
                self._taken(dgram, message)
            elif isinstance(message, wire.StatusQuery):
                self._status(dgram, host)
        except Rejected as e:
            self.complain(host, f"announcement refused: {e}")

    def report_status(self) -> None:
        """A periodic worker-status alert, for crat's view of load over time."""
        try:
            s, figures = self.settings, self.sample()
        except Exception:
            log.failure("cannot read the host's load for a worker-status alert")
            return
        self.alerts.send("worker-status", worker=s.name,
                         load=round(load_figure(figures, self.busy, s.slots), 4),
                         cpus=figures.cpus, speed=s.speed, slots=s.slots,
                         running=len(self.running), free_memory=figures.free_memory,
                         jobs_run=self.jobs_run)

    def _status(self, dgram: wire.Datagram, host: str) -> None:
        query, _ = self.checker.check_status(dgram, host)
        s, figures = self.settings, self.sample()
        reply = wire.StatusReply(
            query.nonce, now_ms(), s.name, __version__,
            round(load_figure(figures, self.busy, s.slots), 4), figures.cpus, s.speed,
            s.slots, len(self.running), figures.free_memory, self.jobs_run,
            round(self.reactor.seconds() - self.started_at, 1))
        data = wire.encode_datagram(reply, s.credential.app_id, s.credential.key,
                                    s.credential.cert_der)
        self.reply(data, connect_back_target(dgram, query.addrs, query.port, host))

    def _announce(self, dgram: wire.Datagram, host: str) -> None:
        ann, client = self.checker.check_announce(dgram, host)
        if ann.job_id in self.tried:
            return  # a resend of a job we already answered
        if self.busy >= self.settings.slots:
            log.debug("no free slot for job from {client}", client=client.info.name)
            return
        load = load_figure(self.sample(), self.busy, self.settings.slots)
        now = self.reactor.seconds()
        crowd = self.crowd.size(now)
        delay = connect_back_delay(load, self.settings.speed, self.jitter, crowd)
        pending = Pending(ann.job_id, client, load, delay, heard=now, spread=spread_ms(crowd))
        self.pending[ann.job_id] = pending
        self.tried[ann.job_id] = None
        if len(self.tried) > TRIED_JOBS:
            self.tried.popitem(last=False)
        host, port = connect_back_target(dgram, ann.addrs, ann.port, host)
        pending.call = self.reactor.callLater(delay, self._connect_back, pending, host, port)

    def _taken(self, dgram: wire.Datagram, taken: wire.Taken) -> None:
        pending = self.pending.get(taken.job_id)
        if pending is None:
            return  # nothing to cancel (and no certificate to check it with)
        self.checker.check_taken(dgram, pending.client)
        now = self.reactor.seconds()
        self.crowd.observe(taken.answered, now, pending.spread,
                           (now - pending.heard) * 1000 - IDLE_MS)
        if pending.channel is not None:
            return  # the client will tell us over TLS
        if pending.call is not None and pending.call.active():
            pending.call.cancel()
        if pending.connecting is not None:
            pending.connecting.cancel()
        self.release(pending)
        self.metrics.connect_back("lost")
        log.info("connect-back for job {job} cancelled: taken by another worker",
                 job=pending.job_id.hex()[:12])

    # -- connect-back -----------------------------------------------------------------

    def _connect_back(self, pending: Pending, host: str, port: int) -> None:
        pending.call = None
        endpoint_type = TCP6ClientEndpoint if ":" in host else TCP4ClientEndpoint
        endpoint = wrapClientTLS(
            self.tls, endpoint_type(self.reactor, host, port, timeout=CONNECT_TIMEOUT)
        )
        factory = Factory.forProtocol(lambda: WorkerChannel(self, pending))
        pending.connecting = endpoint.connect(factory)

        def failed(reason: Failure) -> None:
            if not reason.check(defer.CancelledError):
                log.info("connect-back to {host}:{port} failed: {why}", host=host, port=port,
                         why=reason.getErrorMessage())
                self.metrics.connect_back("failed")
            self.release(pending)

        pending.connecting.addErrback(failed)

    def release(self, pending: Pending) -> None:
        if self.pending.get(pending.job_id) is pending:
            del self.pending[pending.job_id]

    # -- jobs -------------------------------------------------------------------------

    def hello(self, channel: WorkerChannel) -> wire.Hello:
        """Who this worker is and its load now (or, on a fresh channel, when it answered)."""
        s, p = self.settings, channel.pending
        if channel.jobs:
            now = self.reactor.seconds()
            if self._sampled is None or now - self._sampled[0] > SAMPLE_AGE:
                self._sampled = (now, self.sample())
            load = load_figure(self._sampled[1], self.busy, s.slots)
            return wire.Hello(s.name, __version__, round(load, 4), 0.0, s.slots,
                              len(self.running))
        return wire.Hello(s.name, __version__, round(p.load, 4), round(p.delay * 1000, 3),
                          s.slots, len(self.running))

    def start_job(self, channel: WorkerChannel, start: wire.Start) -> None:
        pending = channel.pending
        self.release(pending)
        s = self.settings
        if channel.jobs:  # a warm channel may outlive the client's certificate
            expired = check_validity(channel.peer_cert)
            revoked = s.revoked.reason(channel.peer_cert) if s.revoked is not None else None
            if expired or revoked:
                channel.refuse_job("auth", f"the client's certificate {expired}" if expired
                                   else f"the client's {revoked}")
                return
            self.metrics.connect_back("warm")
        else:
            self.metrics.connect_back("won")
        if channel.jobs and self.busy >= s.slots:
            log.info("no free slot for the next job on a warm channel from {peer}",
                     peer=channel.peer_address())
            channel.send(wire.Busy())  # the client announces instead
            channel.close()
            return
        if start.args and not s.allow_args:
            channel.refuse_job("args", "this worker does not accept extra arguments "
                               "(its administrator can allow them with --allow-args)")
            return
        if start.tty and start.fds:
            channel.refuse_job("fds", "--fd cannot be combined with a terminal (use -T)")
            return
        job = uuid.uuid4().hex[:12]
        client = CertInfo.of(channel.peer_cert).name
        argv = [*s.command, *start.args]
        accepted = {k: v for k, v in start.env if s.accepts_env(k)}
        refused = tuple(k for k, _ in start.env if k not in accepted)
        env = dict(os.environ, **accepted, REXNET_JOB_ID=job, REXNET_WORKER=s.name,
                   REXNET_CLIENT=client)
        if start.tty:
            env["TERM"] = start.term or "dumb"
        proto = JobProcess(channel, self.reactor,
                           lambda code, sig, limit: self._ended(job, code, sig, limit),
                           start, s.limits)
        try:
            spawn(self.reactor, proto, argv, env, s.chdir)
        except OSError as e:
            channel.refuse_job("spawn", f"cannot start {argv[0]}: {e.strerror}")
            return
        self.running[job] = Running(job, channel, proto, client, argv,
                                    self.reactor.seconds())
        self.alerts.send("job-started", job=job, worker=s.name, client=client,
                         client_addr=channel.peer_address(), command=" ".join(argv)[:200])
        self.jobs_run += 1
        self.metrics.job_started()
        channel.job = job
        channel.process = proto
        channel.keep = start.keep
        warm = " on a warm channel" if channel.jobs else ""
        channel.jobs += 1
        channel.send(wire.Started(job, refused))
        log.info("job {job} started for {client} from {peer}{warm}: {argv}{tty}", job=job,
                 client=client, peer=channel.peer_address(), argv=argv, warm=warm,
                 tty=" (in a terminal)" if start.tty else "")

    def _ended(self, job: str, code: int | None, sig: int | None, limit: str) -> None:
        running = self.running.pop(job, None)
        if running is None:
            return
        log.info("job {job} ended: {how}{limit}", job=job,
                 how=f"exit {code}" if sig is None else f"signal {sig}",
                 limit=f" ({limit} limit)" if limit else "")
        channel = running.channel
        bytes_in = sum(s.received for s in channel.ins.values())
        bytes_out = sum(s.sent for s in channel.outs.values())
        self.metrics.job_finished(code, sig, limit, bytes_in, bytes_out)
        self.alerts.send(
            "job-finished", job=job, worker=self.settings.name, client=running.client,
            status=code if sig is None else 128 + sig, signal=sig, limit=limit or None,
            duration=round(self.reactor.seconds() - running.started, 3),
            bytes_in=bytes_in, bytes_out=bytes_out)
        if limit:
            self.complain(channel.peer_address(), f"job {job} hit its {limit} limit")
        channel.send(wire.Exit(code, sig, limit))
        if (channel.keep and not channel.closed and not limit and self._idle is None
                and len(self.warm) < MAX_WARM):
            channel.wait_for_next()
        else:
            channel.close()
        if not self.running and self._idle is not None and not self._idle.called:
            self._idle.callback(None)

    def channel_lost(self, channel: WorkerChannel) -> None:
        self.release(channel.pending)
        self.warm.discard(channel)
        running = self.running.get(channel.job or "")
        if running is not None and not running.process.ended:
            log.warn("client of job {job} went away; ending the job's process group",
                     job=running.job)
            running.process.kill_group()

    def stop_all(self) -> defer.Deferred[None]:
        """End every job (the worker is stopping): their clients are told the worker is
        lost; fires when the jobs are gone (or after the kill grace period)."""
        for pending in list(self.pending.values()):
            if pending.call is not None and pending.call.active():
                pending.call.cancel()
            self.release(pending)
        for channel in list(self.warm):
            channel.close()
        if not self.running:
            return defer.succeed(None)
        self._idle = defer.Deferred()
        for running in list(self.running.values()):
            running.channel.send(wire.Error("stopping", f"worker {self.settings.name} is "
                                            "stopping; the job was ended"))
            running.process.kill_group()
        timeout = self.reactor.callLater(KILL_GRACE + 1.0, self._give_up_waiting)
        self._idle.addBoth(lambda r: timeout.cancel() if timeout.active() else None)
        return self._idle

    def _give_up_waiting(self) -> None:
        for running in list(self.running.values()):
            running.channel.close(abort=True)
        if self._idle is not None and not self._idle.called:
            self._idle.callback(None)


class WorkerChannel(Channel):
    """The worker's end of a job channel."""

    def __init__(self, worker: Worker, pending: Pending) -> None:
        super().__init__(worker.settings.credential)
        self.revoked = worker.settings.revoked
        self.worker = worker
        self.pending = pending
        self.job: str | None = None
        self.process: JobProcess | None = None
        self.keep = False  # the client asked to keep the channel for its next job
        self.jobs = 0  # jobs started on this channel
        self._start_timer: IDelayedCall | None = None
        self._reporter: LoopingCall | None = None
        pending.channel = self

    def peerVerified(self) -> None:
        w = self.worker
        self.send(w.hello(self))
        self._start_timer = w.reactor.callLater(START_TIMEOUT, self._no_start)
        self.start_heartbeat(w.reactor)

    def wait_for_next(self) -> None:
        """The job ended and its client asked to keep the channel: wait, idle, for its
        next START (up to WARM_IDLE seconds), telling it this worker's load meanwhile."""
        w = self.worker
        self.job, self.process = None, None
        self.ins.clear()
        self.outs.clear()
        w.warm.add(self)
        self._start_timer = w.reactor.callLater(WARM_IDLE, self._idle_too_long)
        self._reporter = LoopingCall(self._report)
        self._reporter.clock = w.reactor
        self._reporter.start(WARM_REPORT, now=True)

    def _report(self) -> None:
        try:
            self.send(self.worker.hello(self))
        except Exception:
            log.failure("cannot read the host's load for a warm channel")

    def _idle_too_long(self) -> None:
        self._start_timer = None
        self.close()

    def _stop_waiting(self) -> None:
        self.worker.warm.discard(self)
        if self._reporter is not None and self._reporter.running:
            self._reporter.stop()
        if self._start_timer is not None and self._start_timer.active():
            self._start_timer.cancel()

    def frameReceived(self, frame: wire.Frame) -> None:
        if self.job is None and self.jobs and isinstance(frame, wire.Data | wire.Eof):
            return  # the last job's input, sent before the client saw its EXIT
        super().frameReceived(frame)

    def _no_start(self) -> None:
        self._start_timer = None
        self.worker.complain(self.peer_address(), "client sent no job in time")
        self.close(abort=True)

    def controlReceived(self, frame: wire.Frame) -> None:
        if self.job is None and self.jobs and isinstance(frame, wire.Signal | wire.Winsize):
            return  # meant for the last job, sent before the client saw its EXIT
        if self.job is None:
            self._stop_waiting()
        if isinstance(frame, wire.Start) and self.job is None:
            self.worker.start_job(self, frame)
        elif isinstance(frame, wire.Signal) and self.process is not None:
            self.process.deliver_signal(frame.number)
        elif isinstance(frame, wire.Winsize) and self.process is not None:
            self.process.resize(frame.rows, frame.cols)
        elif isinstance(frame, wire.Busy) and self.job is None:
            self.worker.metrics.connect_back("lost")
            self.close()
        elif isinstance(frame, wire.Error):
            log.warn("client {peer} ended the job: {message}", peer=self.peer_address(),
                     message=frame.message)
            self.close()
        else:
            super().controlReceived(frame)

    def refuse_job(self, reason: str, message: str) -> None:
        log.warn("job refused: {message}", message=message)
        self.worker.metrics.job_refused(reason)
        self.send(wire.Error(reason, message))
        self.close()

    def refused(self, problem: str) -> None:
        self.worker.complain(self.peer_address(), f"authentication failed: {problem}")

    def lost(self, reason: Failure) -> None:
        self._stop_waiting()
        if not self.verified:
            self.worker.metrics.auth_failure()
            self.worker.complain(self.peer_address(),
                                 f"TLS with client failed: {reason.getErrorMessage()}")
        self.worker.channel_lost(self)


class WorkerService(Service):
    """Listens for announcements on UDP (joining multicast groups) for one Worker."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.port: IListeningPort | None = None
        self.receiver: DatagramReceiver | None = None
        self.reporter: LoopingCall | None = None

    def bind(self) -> None:
        """Open the announcement port now (makeService calls this, so that a busy port is
        a one-line error before twistd starts, not a traceback after)."""
        s = self.worker.settings
        host, port = s.listen
        self.receiver = receiver = DatagramReceiver(self.worker.datagram)
        reactor = self.worker.reactor
        if s.groups:
            self.port = reactor.listenMulticast(port, receiver, interface=host, listenMultiple=True)
            for group in s.groups:
                receiver.transport.joinGroup(group)  # type: ignore[union-attr]
        else:
            self.port = reactor.listenUDP(port, receiver, interface=host)

    def startService(self) -> None:
        super().startService()
        make_undumpable()  # after twistd's privilege drop: jobs cannot read our memory
        if self.port is None:
            self.bind()
        s = self.worker.settings
        host = s.listen[0]
        receiver = self.receiver
        reactor = self.worker.reactor

        def reply(data: bytes, target: tuple[str, int]) -> None:
            with contextlib.suppress(OSError):
                receiver.transport.write(data, target)  # type: ignore[union-attr]

        self.worker.reply = reply
        if self.worker.alerts.targets:
            self.reporter = LoopingCall(self.worker.report_status)
            self.reporter.clock = reactor
            self.reporter.start(STATUS_INTERVAL, now=True)
        log.info("worker {name} serves {app} ({command}) with {slots} slots at speed {speed}; "
                 "listening on {host}:{port}", name=s.name, app=s.credential.app,
                 command=" ".join(s.command), slots=s.slots, speed=s.speed, host=host,
                 port=self.port.getHost().port)  # type: ignore[union-attr]

    def stopService(self) -> defer.Deferred[Any]:
        super().stopService()
        w = self.worker
        log.info("worker {name} stopping: {jobs} jobs run; {received} datagrams received, "
                 "{limited} dropped by rate limits, {complaints} complaints",
                 name=w.settings.name, jobs=w.jobs_run, received=w.received,
                 limited=w.rate_limited, complaints=w.complain.count)
        if self.reporter is not None and self.reporter.running:
            self.reporter.stop()
        jobs_gone = self.worker.stop_all()
        jobs_gone.addBoth(lambda result: self.worker.alerts.stop())
        waits = [jobs_gone]
        if self.port is not None:
            stopped = self.port.stopListening()
            waits.append(stopped if stopped is not None else defer.succeed(None))
        return defer.gatherResults(waits)
