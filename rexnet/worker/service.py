"""The worker (cexec's cservice): hears announcements, connects back, runs jobs."""

from __future__ import annotations

import os
import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.interfaces import IListeningPort, IOpenSSLClientConnectionCreator
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from rexnet.net.alerts import AlertSender
from rexnet.net.announce import AnnounceChecker, RateLimiter, Rejected, now_ms
from rexnet.protocol import wire
from rexnet.security.credentials import CertInfo, Credential, check_validity
from rexnet.security.hardening import make_undumpable
from rexnet.security.tls import Revocations, connecting_options
from rexnet.version import __version__
from rexnet.worker.arguments import ArgPolicy
from rexnet.worker.calls import JobCalls
from rexnet.worker.channel import WorkerChannel
from rexnet.worker.commands import CommandPolicy, CommandRefused
from rexnet.worker.complaints import COMPLAINT_RATE, Complaints
from rexnet.worker.connectback import ConnectBacks, Pending, connect_back_target
from rexnet.worker.datagrams import AnnounceSocket
from rexnet.worker.detached import DEFAULT_KEEP, DEFAULT_OUTPUT, JobBook, OutputLog
from rexnet.worker.environment import EnvPolicy
from rexnet.worker.files import DEFAULT_JOB_FILES, FileSettings, default_state_dir, send_back
from rexnet.worker.job import KILL_GRACE, JobProcess, Limits
from rexnet.worker.keyexposure import jobs_identity, key_warning
from rexnet.worker.load import Crowd, HostLoad, connect_back_delay, load_figure, sample_host
from rexnet.worker.machine import Refusal
from rexnet.worker.metrics import NO_METRICS, Metrics, NoMetrics
from rexnet.worker.spawn import Isolator, spawn

__all__ = ["COMPLAINT_RATE", "GLOBAL_BURST", "GLOBAL_RATE", "Complaints", "Worker",
           "WorkerService", "WorkerSettings"]

STATUS_INTERVAL = 5.0  # seconds between worker-status alerts
GLOBAL_RATE = 2000.0  # datagrams per second checked, all sources together
GLOBAL_BURST = 4000.0
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
    job_env: tuple[tuple[str, str | None], ...] = ()  # --job-env NAME[=VALUE]
    allow_arg: tuple[str, ...] = ()  # --allow-arg PATTERN
    keyfile: str | None = None  # where the credential was read (for the start-up check)
    alert_targets: tuple[tuple[str, int], ...] = ()
    chdir: str | None = None
    limits: Limits = field(default_factory=Limits)
    revoked: Revocations | None = None  # rexnet.security.revocation.RevokedFile
    commands: CommandPolicy = field(default_factory=CommandPolicy)
    """--commands / --any-command: the client names the program (then COMMAND is empty)."""
    sandbox: Isolator | None = None  # rexnet.worker.sandbox.Sandbox (a worker started as root)
    state_dir: str = ""  # detached jobs' output and jobs' directories ("": the default)
    job_files: int = DEFAULT_JOB_FILES  # bytes a job's --put (and --get) files may total
    detached_output: int = DEFAULT_OUTPUT  # bytes of a detached job's output kept
    keep_finished: float = DEFAULT_KEEP  # seconds finished jobs are listed (and kept)

    @property
    def env_policy(self) -> EnvPolicy:
        return EnvPolicy(self.accept_env, self.job_env)

    @property
    def arg_policy(self) -> ArgPolicy:
        return ArgPolicy(self.allow_args, self.allow_arg)

    @property
    def files(self) -> FileSettings:
        """Where this application's job directories and detached output go."""
        root = os.path.join(self.state_dir or default_state_dir(), self.credential.app)
        return FileSettings(root, self.job_files)

    def accepts_env(self, name: str) -> bool:
        """Whether a job may set variable NAME (sshd's AcceptEnv patterns; never a
        loader or interpreter hook: rexnet.worker.environment)."""
        return self.env_policy.accepts(name)


@dataclass
class Running:
    job: str
    channel: WorkerChannel | OutputLog  # an OutputLog for a detached job
    process: JobProcess
    client: str
    argv: list[str] = field(default_factory=list)
    started: float = 0.0
    keep: bool = False  # the client asked to keep the channel for its next job
    slots: int = 1  # the slots it takes (the client's --cpus)
    get: tuple[str, ...] = ()  # the files to send back when the job ends


class Worker:
    """Decides which announcements to answer, and runs the jobs it wins.

    SOCKET is the announcement socket it shares with the other workers of its address
    (replies go out there); METRICS, when given, collects its figures (--metrics);
    CHECKER, TLS and CROWD replace the ones made from the settings (benchmarks share them).
    """

    def __init__(
        self,
        settings: WorkerSettings,
        reactor: Any,
        sample: Callable[[], HostLoad] = sample_host,
        jitter: Callable[[], float] = random.random,
        *,
        socket: AnnounceSocket | None = None,
        metrics: Metrics | None = None,
        checker: AnnounceChecker | None = None,
        tls: IOpenSSLClientConnectionCreator | None = None,
        crowd: Crowd | None = None,
    ) -> None:
        self.settings = settings
        self.reactor = reactor
        self.sample = sample
        self.checker = checker or AnnounceChecker(settings.credential, revoked=settings.revoked)
        self.limiter = RateLimiter()
        self.all_sources = RateLimiter(GLOBAL_RATE, GLOBAL_BURST, 1)
        self.received = 0
        self.foreign = 0  # datagrams of other applications, ignored before any limit
        self.alerts = AlertSender(reactor, settings.credential, settings.alert_targets)
        self.complain = Complaints(reactor.seconds, self.alerts.send)
        self.started_at = reactor.seconds()
        self.socket = socket if socket is not None else AnnounceSocket()
        self.socket.serve(settings.credential.app_id, self.datagram)
        self.metrics: NoMetrics = NO_METRICS if metrics is None else metrics.for_worker(
            settings.credential.app, settings.slots, lambda: self.busy,
            lambda: len(self.running),
            lambda: load_figure(self.sample(), self.busy, settings.slots))
        self.connect_backs = ConnectBacks(
            reactor, tls or connecting_options(settings.credential), self.metrics,
            self._connect_back, jitter, crowd)
        self.running: dict[str, Running] = {}
        self.jobs_run = 0
        self.rate_limited = 0
        self.warm: set[WorkerChannel] = set()  # idle channels kept for their client's next job
        self._sampled: tuple[float, HostLoad] | None = None  # for warm channels' reports
        self._idle: defer.Deferred[None] | None = None
        self.book = JobBook(reactor, settings.credential, settings.files.root,
                            settings.detached_output, settings.keep_finished)
        self.calls = JobCalls(self, tls or connecting_options(settings.credential))

    @property
    def pending(self) -> dict[bytes, Pending]:
        """The promised connect-backs, by job id."""
        return self.connect_backs.pending

    @property
    def crowd(self) -> Crowd:
        return self.connect_backs.crowd

    @property
    def busy(self) -> int:
        """Slots in use: running jobs and reserved connect-backs (each counts its CPUs)."""
        return (sum(r.slots for r in self.running.values())
                + sum(p.slots for p in self.pending.values()))

    def free_slot(self, start: wire.Start | None = None) -> bool:
        """Whether a job fits now: a free slot (START's cpus of them, on a warm channel),
        START's free memory, and this worker among START's workers if it names some."""
        if start is None:
            return self.busy < self.settings.slots
        return self.fits(start.cpus, start.mem, start.workers) is None

    def fits(self, cpus: int, mem: int, workers: tuple[str, ...]) -> str | None:
        """Why a job of CPUS slots needing MEM bytes for WORKERS does not fit, or None."""
        s = self.settings
        if workers and s.name not in workers:
            return f"it is for {', '.join(workers)}"
        if s.slots - self.busy < cpus:
            return f"{cpus} slot(s) asked, {max(s.slots - self.busy, 0)} free"
        if mem:
            free = self.sample().free_memory - sum(p.mem for p in self.pending.values())
            if free < mem:
                return f"{mem} bytes of memory asked, {max(free, 0)} free"
        return None

    # -- datagrams --------------------------------------------------------------------

    def datagram(self, data: bytes, host: str, port: int) -> None:
        self.received += 1
        if wire.peek_app_id(data) not in (None, self.settings.credential.app_id):
            self.foreign += 1  # another application's: it spends none of our limits
            return
        now = self.reactor.seconds()
        # per source first, so that a source over its limit spends no global tokens
        if not self.limiter.allow(host, now) or not self.all_sources.allow("", now):
            self.rate_limited += 1
            self.metrics.rate_limited()
            return
        what = "announcement"
        try:
            dgram = self.checker.decode(data)
            if dgram is None:
                return  # (not reached: another application's traffic is ignored above)
            message = dgram.message
            if isinstance(message, wire.Announce):
                self._announce(dgram, host)
            elif isinstance(message, wire.Taken):
                what = "TAKEN"
                self._taken(dgram, message)
            elif isinstance(message, wire.StatusQuery):
                what = "status query"
                self._status(dgram, host)
            elif isinstance(message, wire.JobCall):
                self.calls.datagram(dgram, host)
        except Rejected as e:
            self.complain(host, f"{what} refused: {e}")

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
        load = load_figure(figures, self.busy, s.slots)
        reply = wire.StatusReply(
            query.nonce, now_ms(), s.name, __version__, round(load, 4), figures.cpus,
            s.speed, s.slots, len(self.running), figures.free_memory, self.jobs_run,
            round(self.reactor.seconds() - self.started_at, 1), self.busy,
            round(connect_back_delay(load, s.speed, lambda: 0.0) * 1000, 3))
        data = wire.encode_datagram(reply, s.credential.app_id, s.credential.key,
                                    s.credential.cert_der)
        target = connect_back_target(dgram, query.addrs, query.port, host)
        self.socket.reply(data, (target.host, target.port))

    def _announce(self, dgram: wire.Datagram, host: str) -> None:
        ann, client = self.checker.check_announce(dgram, host)
        if self.connect_backs.answered(ann.job_id):
            return  # a resend of a job we already answered
        if self.busy >= self.settings.slots:
            log.debug("no free slot for job from {client}", client=client.info.name)
            return
        if ann.cpus != 1 or ann.mem or ann.workers:
            why = self.fits(ann.cpus, ann.mem, ann.workers)
            if why is not None:
                log.debug("not answering job from {client}: {why}", client=client.info.name,
                          why=why)
                return
        load = load_figure(self.sample(), self.busy, self.settings.slots)
        pending = self.connect_backs.promise(
            ann.job_id, client, load, self.settings.speed,
            connect_back_target(dgram, ann.addrs, ann.port, host))
        pending.slots, pending.mem = ann.cpus, ann.mem

    def _taken(self, dgram: wire.Datagram, taken: wire.Taken) -> None:
        pending = self.pending.get(taken.job_id)
        if pending is None:
            return  # nothing to cancel (and no certificate to check it with)
        self.checker.check_taken(dgram, pending.client)
        self.connect_backs.taken(pending, taken.answered)

    def _connect_back(self, pending: Pending, host: str, port: int) -> None:
        s = self.settings
        self.connect_backs.connect(
            pending, host, port, lambda: WorkerChannel(self, pending, s.credential, s.revoked,
                                                       s.files))

    def release(self, pending: Pending) -> None:
        self.connect_backs.release(pending)

    # -- jobs (for the channels: rexnet.worker.machine.JobHost) --------------------------

    def hello(self, pending: Pending | None) -> wire.Hello:
        """Who this worker is and its load: when it answered PENDING (a fresh channel), or
        now (a warm channel's report, from a sample at most SAMPLE_AGE old)."""
        s = self.settings
        if pending is None:
            now = self.reactor.seconds()
            if self._sampled is None or now - self._sampled[0] > SAMPLE_AGE:
                self._sampled = (now, self.sample())
            load = load_figure(self._sampled[1], self.busy, s.slots)
            return wire.Hello(s.name, __version__, round(load, 4), 0.0, s.slots,
                              len(self.running))
        return wire.Hello(s.name, __version__, round(pending.load, 4),
                          round(pending.delay * 1000, 3), s.slots, len(self.running))

    def client_refusal(self, cert: Any) -> str | None:
        """Why a warm channel's client may no longer run jobs (its certificate expired or
        was revoked since the handshake), or None."""
        expired = check_validity(cert)
        if expired:
            return f"the client's certificate {expired}"
        revoked = self.settings.revoked.reason(cert) if self.settings.revoked else None
        return f"the client's {revoked}" if revoked else None

    def start_job(self, channel: WorkerChannel, start: wire.Start, warm: bool
                  ) -> Running | Refusal:
        """Run START's job on CHANNEL, or say why not."""
        s = self.settings
        client = CertInfo.of(channel.peer_cert).name
        if not s.commands.enabled:  # a command worker's policy is its list of programs
            bad_args = s.arg_policy.refusal(start.args)
            if bad_args:
                if start.args and s.arg_policy.allows_args:  # an argument outside the patterns
                    self.complain(channel.peer_address(), f"client {client}: {bad_args}")
                return Refusal("args", bad_args)
        if start.tty and start.fds:
            return Refusal("fds", "--fd cannot be combined with a terminal (use -T)")
        placed = place(s.commands, s.command, start, s.chdir, s.name)
        if isinstance(placed, Refusal):
            return placed
        argv, cwd = placed
        requested = s.env_policy.sort(start.env)
        if requested.forbidden:
            message = requested.forbidden_message()
            self.complain(channel.peer_address(), f"client {client}: {message}")
            return Refusal("env", message)
        job = uuid.uuid4().hex[:12]
        refused = requested.refused
        env = s.env_policy.build(
            requested.accepted,
            {"REXNET_JOB_ID": job, "REXNET_WORKER": s.name, "REXNET_CLIENT": client},
            term=start.term if start.tty else None)
        try:
            output = (self.book.output_log(job, channel.peer_address()) if start.detach
                      else None)
        except OSError as e:
            return Refusal("detach", f"cannot keep the output of a detached job in "
                           f"{s.files.root}: {e.strerror} (see the worker's --state-dir)")
        proto = JobProcess(output or channel, self.reactor,
                           lambda code, sig, limit: self._ended(job, code, sig, limit),
                           start, s.limits)
        if channel.job_dir is not None:  # --put/--get: the job's own directory
            cwd = channel.job_dir.path
        try:
            spawn(self.reactor, proto, argv, env, cwd, s.sandbox)
        except OSError as e:
            return Refusal("spawn", f"cannot start {argv[0]}: {e.strerror}")
        running = self.running[job] = Running(job, output or channel, proto, client, argv,
                                              self.reactor.seconds(), start.keep,
                                              max(start.cpus, 1), start.get)
        booked = self.book.started(job, channel.peer_cert, " ".join(argv), proto, output)
        self.alerts.send("job-started", job=job, worker=s.name, client=client,
                         client_addr=channel.peer_address(), command=" ".join(argv)[:200],
                         **({"detached": 1} if output else {}))
        self.jobs_run += 1
        self.metrics.job_started()
        channel.send(wire.Started(job, refused, (cwd or os.getcwd())
                                  if s.commands.enabled else "", detached=output is not None))
        log.info("job {job} started for {client} from {peer}{warm}: {argv}{tty}{cwd}",
                 job=job, client=client, peer=channel.peer_address(), argv=argv,
                 warm=" on a warm channel" if warm else "",
                 tty=" (in a detached terminal)" if start.tty and output else
                 " (detached)" if output else " (in a terminal)" if start.tty else "",
                 cwd=f" in {cwd}" if cwd and cwd != s.chdir else "")
        if output is None:
            return running
        booked.directory, channel.job_dir = channel.job_dir, None  # the job's from now on
        # the client's part ends here: EXIT at once (once the machine runs), the job runs on
        self.reactor.callLater(0, self._detached, channel, start.keep)
        placeholder = JobProcess(channel, self.reactor, lambda *_: None, start)
        placeholder.ended = True  # the channel's end must not end the detached job
        return replace(running, channel=channel, process=placeholder)

    def _detached(self, channel: WorkerChannel, keep: bool) -> None:
        channel.send(wire.Exit(0, None))
        channel.job_ended(keep=keep and self._idle is None and len(self.warm) < MAX_WARM)

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
        self.book.ended(job, code, sig)
        if isinstance(channel, WorkerChannel) and channel.job_dir is not None:
            returned = defer.succeed(None)
            if running.get and not channel.closed:
                returned = send_back(channel.lane(), channel.job_dir, running.get,
                                     self.settings.files,
                                     lambda problem: self.complain(channel.peer_address(),
                                                                   problem))
            returned.addBoth(lambda _: self._exit(running, code, sig, limit))
        else:
            self._exit(running, code, sig, limit)

    def _exit(self, running: Running, code: int | None, sig: int | None, limit: str) -> None:
        """The job's files are back (if any): EXIT, then keep or close the channel."""
        channel = running.channel
        if isinstance(channel, WorkerChannel):
            channel.job_files_done()
        channel.send(wire.Exit(code, sig, limit))
        channel.job_ended(keep=running.keep and not limit and self._idle is None
                          and len(self.warm) < MAX_WARM)
        if not self.running and self._idle is not None and not self._idle.called:
            self._idle.callback(None)

    def stop_all(self) -> defer.Deferred[None]:
        """End every job (the worker is stopping): their clients are told the worker is
        lost; fires when the jobs are gone (or after the kill grace period)."""
        self.connect_backs.cancel_waiting()
        for channel in list(self.warm):
            channel.close()
        if not self.running:
            self.book.stop()
            return defer.succeed(None)
        self._idle = defer.Deferred()
        for running in list(self.running.values()):
            running.channel.send(wire.Error("stopping", f"worker {self.settings.name} is "
                                            "stopping; the job was ended"))
            running.process.kill_group()
        self._idle.addBoth(lambda result: self.book.stop())
        timeout = self.reactor.callLater(KILL_GRACE + 1.0, self._give_up_waiting)
        self._idle.addBoth(lambda r: timeout.cancel() if timeout.active() else None)
        return self._idle

    def _give_up_waiting(self) -> None:
        for running in list(self.running.values()):
            running.channel.close(abort=True)
        if self._idle is not None and not self._idle.called:
            self._idle.callback(None)


def place(commands: CommandPolicy, command: tuple[str, ...], start: wire.Start,
          chdir: str | None, name: str) -> tuple[list[str], str | None] | Refusal:
    """The argv and directory of START's job: COMMAND and its arguments in CHDIR (a fixed
    COMMAND), or the program START names if COMMANDS allows it, in the client's directory
    when this host has it (else CHDIR, unless the client required its own); or why not."""
    if not commands.enabled:
        if start.cwd_required:
            return Refusal("cwd", f"worker {name} runs its fixed command in its own "
                           "directory: --cwd is for command workers (--commands)")
        return [*command, *start.args], chdir
    if not start.args:
        return Refusal("command", "this worker runs the program the client names: give "
                       "one after --, as in `rexnet exec APP -- cc -c foo.c`")
    program = commands.resolve(start.args[0])
    if isinstance(program, CommandRefused):
        return Refusal(program.reason, program.message)
    cwd = chdir
    if start.cwd:
        if os.path.isdir(start.cwd):
            cwd = start.cwd
        elif start.cwd_required:
            return Refusal("cwd", f"worker {name} has no directory {start.cwd[:300]}")
    return [program, *start.args[1:]], cwd


class WorkerService(Service):
    """Listens for announcements on UDP (joining multicast groups) for one Worker."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.port: IListeningPort | None = None
        self.reporter: LoopingCall | None = None

    @staticmethod
    def warn_about(worker: Worker) -> None:
        """Start-up warnings (after twistd's privilege drop): a key the jobs' user can
        read, and arguments appended unchecked."""
        s = worker.settings
        if s.keyfile is not None:
            exposed = key_warning(s.keyfile, *jobs_identity())
            if exposed:
                log.warn("worker {name}: {warning}", name=s.name, warning=exposed)
        unchecked = s.arg_policy.warning()
        if unchecked:
            log.warn("worker {name}: {warning}", name=s.name, warning=unchecked)

    def bind(self) -> None:
        """Open the announcement port now (makeService calls this, so that a busy port is
        a one-line error before twistd starts, not a traceback after)."""
        s = self.worker.settings
        host, port = s.listen
        socket = self.worker.socket
        reactor = self.worker.reactor
        if s.groups:
            self.port = reactor.listenMulticast(port, socket, interface=host, listenMultiple=True)
            for group in s.groups:
                socket.transport.joinGroup(group)  # type: ignore[union-attr]
        else:
            self.port = reactor.listenUDP(port, socket, interface=host)

    def startService(self) -> None:
        super().startService()
        make_undumpable()  # after twistd's privilege drop: jobs cannot read our memory
        if self.port is None:
            self.bind()
        s = self.worker.settings
        host = s.listen[0]
        reactor = self.worker.reactor
        if self.worker.alerts.targets:
            self.reporter = LoopingCall(self.worker.report_status)
            self.reporter.clock = reactor
            self.reporter.start(STATUS_INTERVAL, now=True)
        self.warn_about(self.worker)  # before "listening on", which says it is ready
        log.info("worker {name} serves {app} ({command}) with {slots} slots at speed {speed}; "
                 "listening on {host}:{port}", name=s.name, app=s.credential.app,
                 command=" ".join(s.command) or (
                     "any command" if s.commands.any
                     else "commands " + ", ".join(s.commands.patterns)),
                 slots=s.slots, speed=s.speed, host=host,
                 port=self.port.getHost().port)  # type: ignore[union-attr]

    def stopService(self) -> defer.Deferred[Any]:
        super().stopService()
        w = self.worker
        log.info("worker {name} stopping: {jobs} jobs run; {received} datagrams received, "
                 "{limited} dropped by rate limits, {complaints} complaints, {foreign} of "
                 "other applications ignored", name=w.settings.name, jobs=w.jobs_run,
                 received=w.received, limited=w.rate_limited, complaints=w.complain.count,
                 foreign=w.foreign)
        if self.reporter is not None and self.reporter.running:
            self.reporter.stop()
        jobs_gone = self.worker.stop_all()
        jobs_gone.addBoth(lambda result: self.worker.alerts.stop())
        waits = [jobs_gone]
        if self.port is not None:
            stopped = self.port.stopListening()
            waits.append(stopped if stopped is not None else defer.succeed(None))
        return defer.gatherResults(waits)
