"""The worker (cexec's cservice): hears announcements, connects back, runs jobs."""

from __future__ import annotations

import os
import random
import uuid
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.logger import Logger

from rexnet.net.alerts import AlertSender
from rexnet.net.announce import AnnounceChecker, ClientCert, RateLimiter, Rejected, now_ms
from rexnet.net.complaints import COMPLAINT_RATE, Complaints
from rexnet.net.tuning import send_now
from rexnet.protocol import wire
from rexnet.security.credentials import CertInfo
from rexnet.security.tls import connecting_options
from rexnet.version import __version__
from rexnet.worker.calls import JobCalls
from rexnet.worker.channel import WorkerChannel
from rexnet.worker.connectback import ConnectBacks, Pending, Target, connect_back_target
from rexnet.worker.datagrams import AnnounceSocket
from rexnet.worker.detached import JobBook
from rexnet.worker.files import send_back
from rexnet.worker.job import KILL_GRACE, JobProcess
from rexnet.worker.jobbooks import JobBooks
from rexnet.worker.jobqueue import JobQueue, Waitlist
from rexnet.worker.load import Crowd, HostLoad, connect_back_delay, load_figure, sample_host
from rexnet.worker.machine import Refusal
from rexnet.worker.metrics import NO_METRICS, Metrics, NoMetrics
from rexnet.worker.placement import client_refusal, place, refusal_before_queue
from rexnet.worker.settings import Running, WorkerSettings
from rexnet.worker.spawn import spawn

__all__ = ["COMPLAINT_RATE", "GLOBAL_BURST", "GLOBAL_RATE", "Complaints", "Running", "Worker",
           "WorkerSettings"]

STATUS_INTERVAL = 5.0  # seconds between worker-status alerts
GLOBAL_RATE = 2000.0  # datagrams per second checked, all sources together
GLOBAL_BURST = 4000.0
MAX_WARM = 64  # idle warm channels a worker keeps at most
SAMPLE_AGE = 1.0  # s a host sample serves HELLOs (of it, its load average: moved every 5 s)
QUEUED_LINE = 1.0  # s: a job expected to wait this long in the queue gets a line of its
#                    own at once; every queued job's started line says how long it waited

log = Logger()


class Worker:
    """Decides which announcements to answer, and runs the jobs it wins.

    SOCKET is the announcement socket it shares with the other workers of its address
    (replies go out there); METRICS, when given, collects its figures (--metrics);
    CHECKER, TLS and CROWD replace the ones made from the settings (benchmarks share them)."""

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
            lambda: len(self.running), self.load)
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
        self.queue = JobQueue(settings.queue_places)  # jobs waiting for a slot
        self.waitlist = Waitlist()  # announcements heard with no slot or place free
        self._admitting = False
        self.connect_backs.freed = self._admit
        self.bookkeeping = JobBooks(self)  # its log lines, metrics, alerts, book rows

    @property
    def pending(self) -> dict[bytes, Pending]:
        """The promised connect-backs, by job id."""
        return self.connect_backs.pending

    @property
    def crowd(self) -> Crowd:  # the crowd its connect-back window is spread for
        return self.connect_backs.crowd

    @property
    def busy(self) -> int:
        """Slots in use: running jobs and connect-backs that reserved slots (by CPUs)."""
        return sum(r.slots for r in self.running.values()) + sum(
            p.slots for p in self.pending.values() if not p.queued)

    @property
    def queued(self) -> int:
        """Queue places taken: queued jobs and the connect-backs that reserved a place."""
        return len(self.queue) + sum(1 for p in self.pending.values() if p.queued)

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

    def has_room(self, start: wire.Start | None = None) -> bool:
        """Whether a warm channel's job (START) can start now or wait in the queue (its
        client is authenticated already: connect-backs that reserved places do not keep it
        out, so the queue holds at most twice its places). A job for other workers, or of
        more CPUs than this worker has, has no room here."""
        if start is not None and ((start.workers and self.settings.name not in start.workers)
                                  or start.cpus > self.settings.slots):
            return False
        return self.free_slot(start) or len(self.queue) < self.queue.places

    def load(self, figures: HostLoad | None = None) -> float:
        """The load figure: run-queue per CPU, and slots busy or wanted by queued jobs."""
        return load_figure(figures or self.sample(), self.busy + self.queued, self.settings.slots)

    def expected_wait(self, ahead: int) -> float:
        """Seconds a job with AHEAD queued jobs before it would wait for a slot."""
        now = self.reactor.seconds()
        ran = [now - r.started for r in self.running.values()]
        ran += [0.0] * (self.busy - len(self.running))  # reserved slots: jobs not yet begun
        return self.queue.wait(ahead, self.settings.slots, ran)

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
        self.alerts.send("worker-status", worker=s.name, load=round(self.load(figures), 4),
                         cpus=figures.cpus, speed=s.speed, slots=s.slots,
                         running=len(self.running), queued=self.queued,
                         free_memory=figures.free_memory, jobs_run=self.jobs_run)

    def _status(self, dgram: wire.Datagram, host: str) -> None:
        query, _ = self.checker.check_status(dgram, host)
        s, figures = self.settings, self.sample()
        load = load_figure(figures, self.busy, s.slots)
        reply = wire.StatusReply(
            query.nonce, now_ms(), s.name, __version__, round(self.load(figures), 4),
            figures.cpus, s.speed, s.slots, len(self.running), figures.free_memory,
            self.jobs_run, round(self.reactor.seconds() - self.started_at, 1), self.busy,
            round(connect_back_delay(load, s.speed, lambda: 0.0) * 1000, 3), self.queued)
        data = wire.encode_datagram(reply, s.credential.app_id, s.credential.key,
                                    s.credential.cert_der)
        target = connect_back_target(dgram, query.addrs, query.port, host)
        self.socket.reply(data, (target.host, target.port))

    def _announce(self, dgram: wire.Datagram, host: str) -> None:
        ann, client = self.checker.check_announce(dgram, host)
        if self.connect_backs.resent(ann.job_id, client, ann.ts_ms):
            return  # a resend of a job we already answered (see resent)
        why = ("it is not for this worker" if ann.cpus > self.settings.slots or (
            ann.workers and self.settings.name not in ann.workers)
            else self.fits(1, ann.mem, ()) if ann.mem else None)
        if why is not None:
            log.debug("not answering job from {client}: {why}", client=client.info.name, why=why)
            return
        target = connect_back_target(dgram, ann.addrs, ann.port, host)
        plain = ann.cpus == 1 and not ann.mem  # the waitlist keeps plain jobs only
        if plain and (ann.job_id in self.waitlist or not self._answer(
                ann.job_id, client, target, sent_ms=ann.ts_ms)):
            self.waitlist.note(ann.job_id, client, target, self.reactor.seconds())
            self._answer_waiting()  # (in its turn, if a place is free)
        elif not plain:
            self._answer(ann.job_id, client, target, ann.cpus, ann.mem, ann.ts_ms)

    def _answer(self, job_id: bytes, client: ClientCert, target: Target, cpus: int = 1,
                mem: int = 0, sent_ms: int = 0) -> bool:
        """Promise a connect-back for CPUS free slots, or for a queue place; False if
        neither is free.  SENT_MS: the announcement's time by the client's clock."""
        if self.settings.slots - self.busy >= cpus:
            pending = self.connect_backs.promise(job_id, client, self.load(),
                                                 self.settings.speed, target,
                                                 sent_ms=sent_ms)
        elif cpus == 1 and not mem and self.queued < self.queue.places:
            # answer later, by the wait for a slot (a job that asks for more CPUs or for
            # memory goes only where that is free now)
            ahead = self.queued
            full = load_figure(self.sample(), self.busy, self.settings.slots)
            pending = self.connect_backs.promise(job_id, client, full, self.settings.speed,
                                                 target, queued=True, ahead=ahead,
                                                 wait=self.expected_wait(ahead),
                                                 sent_ms=sent_ms)
        else:
            return False
        pending.slots, pending.mem = cpus, mem
        return True

    def _answer_waiting(self) -> None:
        """Places freed: answer the oldest announcements heard while there were none."""
        now = self.reactor.seconds()
        while self.waitlist and self._idle is None and (
                self.free_slot() or self.queued < self.queue.places):
            entry = self.waitlist.pop(now)
            if entry is None:
                break
            if not self.connect_backs.answered(entry.job_id):
                self._answer(entry.job_id, entry.client, entry.target)

    def _taken(self, dgram: wire.Datagram, taken: wire.Taken) -> None:
        pending = self.connect_backs.find(taken.job_id)
        if pending is None:
            waiting = self.waitlist.get(taken.job_id)
            if waiting is not None:  # the job found a worker elsewhere: forget it
                self.checker.check_taken(dgram, waiting.client)
                self.waitlist.drop(taken.job_id)
            return  # nothing to cancel (and no certificate to check it with)
        self.checker.check_taken(dgram, pending.client)
        self.connect_backs.taken(pending, taken.answered, taken.early)
        self._admit()  # a slot it reserved may be free

    def _connect_back(self, pending: Pending, host: str, port: int) -> None:
        s = self.settings
        self.connect_backs.connect(
            pending, host, port, lambda: WorkerChannel(self, pending, s.credential, s.revoked,
                                                       s.files))

    def release(self, pending: Pending) -> None:
        self.connect_backs.release(pending)
        self._admit()

    # -- the queue ------------------------------------------------------------------------

    def wait_turn(self, channel: WorkerChannel, start: wire.Start, pending: Pending | None
                  ) -> wire.Queued | Refusal | None:
        """Whether START on CHANNEL (a fresh channel's PENDING connect-back, or a warm
        channel's None) runs now (None), waits in the queue (the QUEUED frame to send),
        or is refused. A connect-back that reserved a slot keeps it; anything else runs
        now only if no job is queued before it."""
        reserved = pending is not None and not pending.queued
        if pending is not None:
            self.connect_backs.release(pending)  # its slot or place passes to the job
        refusal = refusal_before_queue(self.settings, start)
        if refusal is not None:
            if refusal.reason == "args" and self.settings.arg_policy.allows_args:
                self.complain(channel.peer_address(),  # an argument outside the patterns
                              f"client {CertInfo.of(channel.peer_cert).name}: {refusal.message}")
            self._admit()
            return refusal
        if self.free_slot(start) and (reserved or not self.queue):
            return None
        now = self.reactor.seconds()
        position = self.queue.add(channel, start, now)
        wait = self.expected_wait(position - 1)
        channel.queued_at = (now, position)  # for its started line
        if wait >= QUEUED_LINE:
            log.info("job from {client} ({peer}) queued at position {position}, expected "
                     "wait {wait:.1f} s", client=channel.client_name,
                     peer=channel.peer_address(), position=position, wait=wait)
        return wire.Queued(position, round(wait * 1000, 1))

    def leave_queue(self, channel: WorkerChannel) -> None:
        """CHANNEL's client gave up its place (or went away)."""
        channel.queued_at = None
        if self.queue.remove(channel):
            log.info("a queued job from {peer} left the queue", peer=channel.peer_address())
            self._answer_waiting()

    def _admit(self) -> None:
        """Start queued jobs while slots are free (not while the worker stops)."""
        if self._admitting:
            return
        self._admitting = True
        try:
            while self.queue and self.free_slot() and self._idle is None:
                waiting = self.queue.pop()
                assert waiting is not None
                waiting.channel.admit()
            self.connect_backs.hasten(self.settings, self.busy, self.load)  # place -> slot
            self._answer_waiting()
        finally:
            self._admitting = False

    # -- jobs (for the channels: rexnet.worker.machine.JobHost) --------------------------

    def hello(self, pending: Pending | None) -> wire.Hello:
        """Who this worker is and its load: when it answered PENDING (a fresh channel), or
        now (a warm channel's report, from a sample at most SAMPLE_AGE old)."""
        s = self.settings
        if pending is None:
            now = self.reactor.seconds()
            if self._sampled is None or now - self._sampled[0] > SAMPLE_AGE:
                self._sampled = (now, self.sample())
            full = not self.free_slot()
            return wire.Hello(s.name, __version__, round(self.load(self._sampled[1]), 4), 0.0,
                              s.slots, len(self.running), self.queued if full else 0,
                              round(self.expected_wait(self.queued) * 1000, 1) if full else 0.0)
        return wire.Hello(s.name, __version__, round(pending.load, 4),
                          round(pending.delay * 1000, 3), s.slots, len(self.running),
                          pending.ahead, round(pending.wait * 1000, 1))

    def client_refusal(self, cert: Any) -> str | None:  # (for the channels' machine)
        return client_refusal(cert, self.settings.revoked)

    def start_job(self, channel: WorkerChannel, start: wire.Start, warm: bool
                  ) -> Running | Refusal:
        """Run START's job on CHANNEL, or say why not."""
        s = self.settings
        client = channel.client_name
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
            self.reactor.callLater(0, self._admit)  # the slot stays free
            return Refusal("spawn", f"cannot start {argv[0]}: {e.strerror}")
        running = self.running[job] = Running(job, output or channel, proto, client, argv,
                                              self.reactor.seconds(), start.keep,
                                              max(start.cpus, 1), start.get)
        peer, command = channel.peer_address(), " ".join(argv)
        booked = self.book.started(job, channel.peer_cert, command, proto, output, client)
        self.jobs_run += 1
        channel.send(wire.Started(job, refused, (cwd or os.getcwd())
                                  if s.commands.enabled else "", output is not None, *proto.sides))
        send_now(channel.transport)  # before the alert and the log line: the client prepares
        queued, channel.queued_at = channel.queued_at, None
        self.bookkeeping.started(job, client, peer, argv, command, warm=warm, tty=start.tty,
                                 detached=output is not None,
                                 cwd=cwd if cwd and cwd != s.chdir else "",
                                 queued=queued and (self.reactor.seconds() - queued[0],
                                                    queued[1]))
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
        channel = running.channel
        books = partial(self.bookkeeping.ended, running, code, sig, limit,
                        sum(s.received for s in channel.ins.values()),
                        sum(s.sent for s in channel.outs.values()))
        if isinstance(channel, WorkerChannel) and channel.job_dir is None:
            self._exit(running, code, sig, limit, books)  # its client waits for EXIT, not books
            return
        books()  # first: a detached job's watchers read them; files go back after them
        returned = defer.succeed(None)
        if (isinstance(channel, WorkerChannel) and channel.job_dir is not None and running.get
                and not channel.closed):
            returned = send_back(channel.lane(), channel.job_dir, running.get, self.settings.files,
                                 lambda problem: self.complain(channel.peer_address(), problem))
        returned.addBoth(lambda _: self._exit(running, code, sig, limit))

    def _exit(self, running: Running, code: int | None, sig: int | None, limit: str,
              books: Callable[[], None] | None = None) -> None:
        """EXIT, then keep or close the channel; BOOKS once EXIT is with the kernel."""
        channel = running.channel
        if isinstance(channel, WorkerChannel):
            channel.job_files_done()
        channel.send(wire.Exit(code, sig, limit))
        channel.job_ended(keep=running.keep and not limit and self._idle is None
                          and len(self.warm) < MAX_WARM)
        if books is not None:
            send_now(getattr(channel, "transport", None))
            books()
        if not self.running and self._idle is not None and not self._idle.called:
            self._idle.callback(None)
        self._admit()

    def stop_all(self) -> defer.Deferred[None]:
        """End every job (the worker is stopping): their clients are told the worker is
        lost; fires when the jobs are gone (or after the kill grace period)."""
        self.connect_backs.cancel_waiting()
        self.bookkeeping.flush()  # the running jobs' started lines, before their ends
        for channel in list(self.warm):
            channel.close()
        self._idle = defer.Deferred()  # no queued job starts from now on
        while (waiting := self.queue.pop()) is not None:
            waiting.channel.send(wire.Error("stopping", f"worker {self.settings.name} is "
                                            "stopping; the queued job was not started"))
            waiting.channel.close()
        if not self.running:
            self.book.stop()
            self._idle.callback(None)
            return self._idle
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
