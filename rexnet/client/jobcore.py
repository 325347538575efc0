"""What a client job does: announce, talk to workers, run the job's streams, end it.

JobCore holds the job's data and performs its actions; it makes no decision about what
comes next: rexnet.client.machine calls it as the outputs of its transitions, and the
core reports what happens later (a timeout, the output written) as machine inputs.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from twisted.application.internet import backoffPolicy
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IListeningPort
from twisted.logger import Logger
from twisted.python.failure import Failure

from rexnet.client import progress
from rexnet.client.channel import ChannelEvents, ClientChannel, Later
from rexnet.client.connectback import BACKLOG, ConnectBackFactory, Takens, waiting
from rexnet.client.progress import silent
from rexnet.client.results import (
    AuthFailed,
    Interrupted,
    JobFailed,
    JobRefused,
    JobResult,
    LimitHit,
    NoWorker,
    WorkerLost,
)
from rexnet.client.streams import JobStreams, StdioStreams
from rexnet.client.trust import distrust
from rexnet.client.warm import HUNGRY_AFTER, WarmPool
from rexnet.net.alerts import AlertSender
from rexnet.net.announce import DatagramSender, source_address
from rexnet.net.tuning import send_now
from rexnet.protocol import exitcodes, wire
from rexnet.protocol.text import printable
from rexnet.security.credentials import CertInfo, Credential
from rexnet.security.tls import Revocations, shared_listening_options

REFUSAL_CODES = {"command": exitcodes.NOT_ALLOWED, "not-found": 127}
"""Exit statuses of a worker's refusals, by its ERROR's reason (else REFUSED): a program
not allowed, or not found (127, as a shell says)."""
# the announcement is sent again after 50, 100, 200, 400, 800, 1600 ms, then every 1 to
# 3 s (at random: clients that began together drift apart)
RESEND = backoffPolicy(initialDelay=0.05, maxDelay=2.0, factor=2.0, jitter=lambda: 0.0)
RESEND_STEPS = 6  # resends before the delay reaches its maximum

class JobCore:
    """One job's data and actions (see the module's docstring)."""

    machine: Later  # set once the machine is built around this core
    events: ChannelEvents  # what the job's channels tell (routed to the machine)

    def __init__(self, reactor: Any, credential: Credential,
                 targets: Sequence[tuple[str, int]], request: wire.Start,
                 streams: JobStreams, timeout: float, say: Callable[[str], None],
                 now: Callable[[], int], alerts: AlertSender, pool: WarmPool | None,
                 logger: Logger, revoked: Revocations | None,
                 on_started: Callable[[str, str], None] | None,
                 queue_timeout: float | None = None) -> None:
        self.reactor = reactor
        self.credential = credential
        self.targets = list(targets)
        self.request = request
        self.streams = streams
        self.timeout = timeout
        self.say: Callable[[str], None] = lambda message: say(printable(message, 4000))
        self.telling = say is not silent  # whether progress messages are worth making
        self.now = now
        self.alerts = alerts
        self.pool = pool
        self.log = logger
        self.revoked = revoked  # workers whose certificates are revoked
        self.on_started = on_started  # called with the worker's name and the job's id
        self.queue_timeout = queue_timeout  # how long the job may wait in a queue (None: ever)
        self.jitter: Callable[[], float] = random.random
        self.queued_at: float | None = None  # when the worker first said QUEUED
        self.job_ids: list[bytes] = []  # every id it was announced under (see _reopen)
        self.takens = Takens(reactor, credential, now, self._send, self._reopen)
        self.seq = 0
        self.result: defer.Deferred[JobResult] = defer.Deferred()
        self.channels: set[ClientChannel] = set()  # connected, not yet given up
        self.chosen: ClientChannel | None = None
        self.reused = False  # the chosen channel is a warm one
        self.parked = False  # the chosen channel went back to the pool
        self.started: wire.Started | None = None
        self.auth_failures: list[str] = []
        self.answered = 0
        self.worker_error = ""  # the worker's ERROR after the job started
        self.outcome: JobResult | JobFailed | None = None  # decided, not yet delivered
        self._early_signals: list[int] = []
        self._port: IListeningPort | None = None
        self._udp: Any = None
        self._resend: IDelayedCall | None = None
        self._deadline: IDelayedCall | None = None
        self._queue_deadline: IDelayedCall | None = None
        self._addrs: tuple[str, ...] = ()
        self._t0 = reactor.seconds()

    job_id = property(lambda self: self.job_ids[-1], doc="its id in announcements (latest)")

    @property
    def pool_key(self) -> tuple[bytes, tuple[tuple[str, int], ...]]:
        """Warm channels serve jobs of the same credential and announce targets."""
        return self.credential.cert_der, tuple(self.targets)

    # -- looking for a worker ---------------------------------------------------------

    def listen(self) -> bool:
        """Open the connect-back port and announce the job (or wait for one of a saturated
        pool's channels first); False if no announce target can be reached from here."""
        if self.pool is not None and self.pool.wait(
                self.pool_key, self._offered,
                lambda: None if self._listen() else self.machine.unreachable()):
            return True  # waiting for one of the pool's channels first
        return self._listen()

    def _offered(self, link: Any) -> bool:
        """The pool offers a channel its job just left: taken if still looking."""
        if self.chosen is not None or self.channels or self.result.called:
            return False
        self.machine.reuse(link)
        return True

    def _listen(self) -> bool:
        addrs = {a for a in (source_address(t) for t in self.targets) if a}
        if not addrs:
            return False
        self._addrs = tuple(sorted(addrs))[: wire.MAX_ADDRS]
        interface = self._addrs[0] if len(self._addrs) == 1 else ""
        factory = ConnectBackFactory(self)
        self._port = self.reactor.listenSSL(
            0, factory, shared_listening_options(self.credential), interface=interface,
            backlog=BACKLOG,
        )
        if self._udp is None:
            self._udp = DatagramSender(self._send_failed)
            udp_port = self.reactor.listenUDP(0, self._udp)
            udp_port.setBroadcastAllowed(True)
        self._deadline = self.reactor.callLater(self.timeout, self.machine.timed_out)
        if not self.job_ids:  # made as it is first announced (a warm job never needs one)
            self.job_ids.append(os.urandom(16))
        self._announce()
        return True

    def unreachable(self) -> None:
        self.fail(NoWorker("no announce target can be reached from this host: "
                           + ", ".join(f"{h}:{p}" for h, p in self.targets)))

    def _send(self, data: bytes) -> None:
        for target in self.targets:
            self._udp.send(data, target)

    def _reopen(self, why: str) -> None:
        """The early TAKEN's connection failed (rexnet.client.connectback): announce again
        at once, under a new job id."""
        if self.chosen is not None or self._port is None:
            return
        self.log.warn("complaint: {why}: announcing the job again", why=why)
        self.job_ids.append(os.urandom(16))
        if self._resend is not None and self._resend.active():
            self._resend.cancel()
        self._announce()

    def _send_failed(self, target: tuple[str, int], error: OSError) -> None:
        self.say(f"cannot send to {target[0]}:{target[1]}: {error.strerror}")

    def _announce(self) -> None:
        assert self._port is not None
        r = self.request
        ann = wire.Announce(self.job_id, self.seq, self.now(),
                            self._port.getHost().port,  # type: ignore[attr-defined]
                            self._addrs, r.cpus, r.mem, r.workers)
        self._send(wire.encode_datagram(ann, self.credential.app_id, self.credential.key,
                                        self.credential.cert_der))
        delay = RESEND(self.seq)
        if self.seq >= RESEND_STEPS:
            delay *= 0.5 + self.jitter()
        self.seq += 1
        self._resend = self.reactor.callLater(delay, self._announce)
        self.takens.prepare(self.job_id, self.answered + 1)  # signed while workers answer
        if self.seq == HUNGRY_AFTER and self.pool is not None:  # unanswered: the pool's
            self.pool.want(self.pool_key, self._offered)  # next spare channel will do

    def _stop_looking(self) -> None:
        self.takens.stop()
        for call in (self._resend, self._deadline, self._queue_deadline):
            if call is not None and call.active():
                call.cancel()
        if self.pool is not None:
            self.pool.unwant(self.pool_key, self._offered)
        if self._port is not None:
            self._port.stopListening()
            self._port = None

    def time_out(self) -> None:
        """No worker was verified in time."""
        self._deadline = None
        if self.auth_failures:
            self.fail(AuthFailed(
                f"{len(self.auth_failures)} connection(s) failed authentication "
                f"(last: {self.auth_failures[-1]}); is the worker of the same application?"))
        else:
            targets = ", ".join(f"{h}:{p}" for h, p in self.targets)
            self.fail(NoWorker(f"no worker answered within {self.timeout:g} s "
                               f"(announced to {targets}){progress.asked(self.request)}"))

    # -- connections ------------------------------------------------------------------

    def accepted(self, channel: ClientChannel) -> None:
        """The port accepted CHANNEL (before its TLS layer is built): counted, and the
        first of a job still looking sends the early TAKEN (rexnet.client.connectback)."""
        self.answered += 1
        if self.chosen is None and not self.result.called:
            self.takens.accepted(channel, self.job_id, self.answered)

    def connected(self, channel: ClientChannel) -> None:
        self.channels.add(channel)

    def forget(self, channel: ClientChannel) -> None:
        """CHANNEL's connection is gone."""
        self.channels.discard(channel)
        self.takens.lost(channel)
        if self.pool is not None:
            self.pool.lost(channel)

    def heard(self, channel: ClientChannel, hello: wire.Hello) -> None:
        if self.pool is not None:
            self.pool.heard(channel, hello)

    def auth_failed(self, channel: ClientChannel, problem: str) -> None:
        self.auth_failures.append(problem)
        self.log.warn("complaint: connection from {peer} refused: {problem}",
                      peer=channel.peer_address(), problem=problem)
        self.alerts.send("complaint", what=f"connection refused: {problem}",
                         source=channel.peer_address(), client=self.credential.name)

    def turn_away(self, channel: ClientChannel) -> None:
        """A worker verified after another was chosen (or after the end): it is told."""
        self.channels.discard(channel)
        channel.send(wire.Busy())
        channel.close()

    def drop(self, channel: ClientChannel) -> None:
        """A connection that came too late: closed at once."""
        channel.close(abort=True)

    def choose(self, channel: ClientChannel) -> None:
        """CHANNEL's worker is the first verified: it gets the job, the others are told."""
        self.chosen = channel
        self.answered += waiting(self._port)  # reached the port, not accepted yet
        self._stop_looking()
        self.takens.chosen(self.job_ids, self.answered)
        for other in list(self.channels):
            if other is not channel:
                if other.verified:
                    other.send(wire.Busy())
                other.close(abort=not other.verified)
        self.streams.prepare(channel)
        channel.start_heartbeat(self.reactor)
        self._send_start(channel)

    def reuse(self, channel: ClientChannel) -> None:
        """Send the job over a warm channel from the pool (the streams are prepared once
        the worker says STARTED); stop looking if it did."""
        self._stop_looking()
        self.reused = True
        channel.attach(self.events)
        channel.ins.clear()
        channel.outs.clear()
        self.channels.add(channel)
        self.chosen = channel
        self._send_start(channel)

    def _send_start(self, channel: ClientChannel) -> None:
        """START to CHANNEL's worker (StdioStreams offer stdin and stdout apart), at once:
        before the rest of this turn's work."""
        offer = getattr(self.streams, "offer", None)
        channel.send_start(self.request, offer and offer(channel, self.request, self))
        send_now(channel.transport)

    def warm_refused(self, why: str, full: bool = False) -> None:
        """The warm channel's worker cannot take the job after all (FULL: BUSY)."""
        channel = self.chosen
        assert channel is not None
        if full and self.pool is not None:
            self.pool.full(self.pool_key)
        self.channels.discard(channel)
        channel.close()
        self.chosen = None
        self.reused = False
        self.say(f"warm channel to worker {channel.hello.worker if channel.hello else '?'} "
                 f"{why}: announcing the job")

    # -- waiting in a worker's queue ----------------------------------------------------

    def queued(self, queued: wire.Queued) -> None:
        """The chosen worker queued the job (every slot busy): --queue-timeout starts."""
        channel = self.chosen
        assert channel is not None
        if self.queued_at is None:
            self.queued_at = self.reactor.seconds()
            if self.queue_timeout is not None:
                self._queue_deadline = self.reactor.callLater(self.queue_timeout,
                                                              self.machine.queue_timed_out)
        if self.pool is not None:  # every slot taken: the pool's next jobs wait for its own
            self.pool.full(self.pool_key)
        if self.telling:
            self.say(progress.queued(channel, queued))

    def leave_queue(self) -> None:
        """Give up the job's place in the worker's queue (BUSY, then close)."""
        channel = self.chosen
        assert channel is not None
        if self._queue_deadline is not None and self._queue_deadline.active():
            self._queue_deadline.cancel()
        self.channels.discard(channel)
        channel.send(wire.Busy())
        channel.close()

    def queue_time_out(self) -> None:
        """The job waited --queue-timeout in the queue."""
        self._queue_deadline = None
        channel = self.chosen
        assert channel is not None and self.queued_at is not None
        name = channel.hello.worker if channel.hello else channel.peer_address()
        self.leave_queue()
        self.fail(NoWorker(f"the job waited {self.reactor.seconds() - self.queued_at:g} s "
                           f"in the queue of worker {name} without a free slot "
                           f"(--queue-timeout {self.queue_timeout:g})"))

    # -- the job ----------------------------------------------------------------------

    def job_started(self, started: wire.Started) -> None:
        channel = self.chosen
        assert channel is not None
        self.started = started
        if self._queue_deadline is not None and self._queue_deadline.active():
            self._queue_deadline.cancel()
        hello = channel.hello
        name = hello.worker if hello else CertInfo.of(channel.peer_cert).name
        if self.telling:
            now = self.reactor.seconds()
            for line in progress.started(channel, started, name, self.request, self.reused,
                                         None if self.queued_at is None else
                                         now - self.queued_at, self.answered, now - self._t0):
                self.say(line)
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
        if isinstance(self.streams, StdioStreams):
            self.streams.take_apart(started.stdin_apart, started.stdout_apart)
        self.streams.start_input()
        for sig in self._early_signals:
            channel.send(wire.Signal(sig))

    def signal(self, number: int) -> None:
        """Deliver signal NUMBER to the job; before it runs, once it does."""
        assert self.chosen is not None
        if self.started is not None:
            self.chosen.send(wire.Signal(number))
        else:
            self._early_signals.append(number)

    def interrupted(self, number: int) -> None:
        self.fail(Interrupted(f"interrupted by signal {number} before the job started",
                              128 + number))

    def resize_request(self, rows: int, cols: int) -> None:
        """No worker yet: the job will start with the terminal's new size."""
        if self.request.tty:
            self.request = replace(self.request, rows=rows, cols=cols)

    def resize(self, rows: int, cols: int) -> None:
        assert self.chosen is not None
        self.chosen.send(wire.Winsize(rows, cols))

    def protocol_error(self, frame: wire.Frame) -> None:
        """The chosen worker sent a frame that makes no sense now."""
        assert self.chosen is not None
        self.chosen.protocolError(f"unexpected {type(frame).__name__} frame")

    def job_exited(self, exit: wire.Exit) -> None:
        """EXIT: decide the outcome, then write the rest of the output (see drain)."""
        channel = self.chosen
        assert channel is not None
        if self.pool is not None:
            self.pool.exited(channel)
        if self.worker_error:
            channel.close()
            self.drain(WorkerLost(f"lost worker: {self.worker_error}"))
            return
        if exit.limit:
            channel.close()
            error = LimitHit(f"the worker ended the job: it hit its {exit.limit} limit "
                             "(see the worker's --job-timeout / --job-memory)")
            error.exit_code = (exitcodes.TIME_LIMIT if exit.limit == "time"
                               else exitcodes.MEMORY_LIMIT)
            self.drain(error)
            return
        hello = channel.hello
        result = JobResult(exit.code, exit.signal, hello.worker if hello else "?",
                           channel.peer_address(), self.started.job if self.started else "?")
        if self.pool is None:
            channel.close()
        self.drain(result)

    def worker_lost(self) -> None:
        """The chosen worker's connection is gone before EXIT."""
        channel = self.chosen
        assert channel is not None
        self.channels.discard(channel)
        hello = channel.hello
        who = hello.worker if hello else channel.peer_address()
        why = f": {self.worker_error}" if self.worker_error else ""
        if isinstance(self.streams, StdioStreams):  # its data connections cannot end well
            self.streams.close_data_port()
        self.drain(WorkerLost(f"lost worker {who} before the job finished{why}"))

    def refuse(self, error: wire.Error) -> None:
        """The worker answered START with ERROR."""
        assert self.chosen is not None
        address = self.chosen.peer_address()
        refused = JobRefused(f"worker {address}: {error.message}")
        refused.exit_code = REFUSAL_CODES.get(error.reason, exitcodes.REFUSED)
        self.fail(refused)
        self.chosen.close()

    def drain(self, outcome: JobResult | JobFailed) -> None:
        """OUTCOME is decided: write the job's output, then the machine hears drained."""
        self.outcome = outcome

        def written(result: object) -> None:
            if isinstance(result, Failure):
                self.log.failure("the job's output could not be written", result)
            if cut := getattr(self.streams, "truncated", ""):  # stdout apart, cut short
                self.outcome = WorkerLost(f"lost worker: {cut}")
            self.machine.drained()

        self.streams.finish().addBoth(written)

    def deliver(self) -> None:
        outcome = self.outcome
        if isinstance(outcome, JobResult):
            self.succeed(outcome)
        elif outcome is not None:
            self.fail(outcome)

    # -- ending -----------------------------------------------------------------------

    def abandon(self) -> None:
        """The job's owner went away (the agent's launcher died): end it, as a client that
        dies would (its worker ends the job's processes)."""
        if self.chosen is not None and not self.parked:
            self.chosen.close(abort=True)
        self.fail(Interrupted("the job's launcher went away", exitcodes.WORKER_LOST))

    def _cleanup(self, stop_alerts: bool = True) -> None:
        if self.pool is not None and self.chosen is not None and not self.parked:
            self.pool.lost(self.chosen)  # the job failed: its channel closes below
        self._stop_looking()
        if isinstance(self.streams, StdioStreams):
            self.streams.close_data_port()
        if stop_alerts:
            self.alerts.stop()
        if self._udp is not None and self._udp.transport is not None:
            self._udp.transport.stopListening()
        for channel in list(self.channels):
            channel.close(abort=True)

    def succeed(self, result: JobResult) -> None:
        if self.result.called:
            return
        chosen = self.chosen
        alert: dict[str, object] | None = None
        if self.started is None or not self.started.detached:  # (the worker reports it)
            alert = dict(
                job=result.job, worker=result.worker,
                worker_addr=result.address, client=self.credential.name,
                status=result.status, signal=result.signal,
                duration=round(self.reactor.seconds() - self._t0, 3),
                bytes_in=sum(s.sent for s in chosen.outs.values()) if chosen else 0,
                bytes_out=sum(s.received for s in chosen.ins.values()) if chosen else 0)
        if self.pool is not None and chosen is not None and not chosen.closed:
            self.channels.discard(chosen)
            chosen.attach(self.pool.idle_events)  # before a waiting job takes it over
            if self.pool.park(self.pool_key, chosen,
                              lambda link: distrust(link, self.revoked)):
                self.parked = True
            else:
                chosen.close()
        self._cleanup(stop_alerts=False)
        self.result.callback(result)
        # the owner has its result first (an agent's launcher is told its status at once):
        # signing and sending the alert is off the job's round trip, not skipped
        if alert is not None:
            self.alerts.send("job-finished", **alert)
        self.alerts.stop()

    def fail(self, error: JobFailed) -> None:
        if self.result.called:
            return
        self.alerts.send("complaint", what=str(error), client=self.credential.name,
                         job=self.started.job if self.started else None)
        self._cleanup()
        self.result.errback(Failure(error))
