"""ClientJob: announce, accept the first authenticated worker, run the job over its channel."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IListeningPort
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from rexnet.client.channel import ClientChannel
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
from rexnet.client.warm import WarmPool
from rexnet.net.alerts import AlertSender
from rexnet.net.announce import DatagramSender, now_ms, source_address
from rexnet.protocol import exitcodes, wire
from rexnet.security.credentials import CertInfo, Credential
from rexnet.security.tls import Revocations, listening_options

RESEND_DELAYS = (0.05, 0.1, 0.2, 0.4, 0.8, 1.6)
RESEND_MAX = 2.0
DEFAULT_TIMEOUT = 30.0

log = Logger()


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
