"""Connect-backs a worker has promised: each waits the delay its load earned, holds a
slot until settled, and is cancelled when the client's TAKEN says another worker won
(also once connected, while its TLS handshake is unfinished); the client's early TAKEN,
sent as it accepts a first connection, cancels those not yet begun."""

from __future__ import annotations

import typing
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from twisted.internet import defer
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IDelayedCall, IOpenSSLClientConnectionCreator
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from rexnet.net.announce import ClientCert
from rexnet.protocol import wire
from rexnet.worker.load import IDLE_MS, Crowd, base_ms, connect_back_delay, spread_ms
from rexnet.worker.metrics import NoMetrics

CONNECT_TIMEOUT = 5.0  # seconds for TCP; the TLS handshake has its own (worker.machine)
TRIED_JOBS = 10_000  # job ids remembered, so that resent announcements are not answered
RECENT_JOBS = 64  # connect-backs settled before a TAKEN taught the crowd, kept for it

log = Logger()


@dataclass(eq=False)
class Pending:
    """A connect-back this worker has promised: it holds a slot until settled."""

    job_id: bytes
    client: ClientCert
    load: float
    delay: float
    call: IDelayedCall | None = None
    heard: float = 0.0  # when the announcement came (reactor time)
    sent: float = 0.0  # ... by the client's clock (its Announce.ts_ms; 0: not known)
    spread: float = 0.0  # the width of the random part of DELAY, in ms
    base: float = IDLE_MS  # the part of DELAY its load, speed and wait set (ms: base_ms,
    # without a queued answer's window: lateness is judged past it, see waited())
    speed: float = 1.0  # the worker's speed when it promised
    connecting: defer.Deferred[Any] | None = None
    connected: bool = False  # TCP is up: the client will say over TLS whether we won
    channel: Any = None  # the channel protocol, once TCP is up (rexnet.worker.channel)
    slots: int = 1  # the slots it holds (the announcement's cpus)
    mem: int = 0  # the free memory the announcement asked for, reserved meanwhile
    queued: bool = False  # answered with every slot busy: it holds a queue place, no slot
    ahead: int = 0  # when queued: the jobs that were queued before it
    wait: float = 0.0  # when queued: the expected wait for a slot, in seconds
    learnt: bool = False  # a TAKEN for it taught the crowd already
    early: bool = False  # the client's early TAKEN came
    early_ms: float = 0.0  # when: ms after the earliest moment we could answer (base)
    relayed: bool = False  # answered through a cproxy: the client is not reachable directly


def waited(pending: Pending, now: float, sent_ms: int) -> float:
    """Milliseconds past the earliest moment a worker as loaded as ours could answer
    PENDING's announcement (its base delay) that its client announced again (at SENT_MS
    by its clock; we read it at NOW): by our clock and by the client's, whichever says
    less.  Before that, silence says the crowd is loaded, not that the window is wide."""
    ours = (now - pending.heard) * 1000
    return min(ours, sent_ms - pending.sent) - pending.base


class Target(NamedTuple):
    """Where a worker answers an announcement (or a status query), and why there."""

    host: str
    port: int
    why: str

    @property
    def relayed(self) -> bool:
        """A cproxy's port: no further connection (a job's stdin) reaches the client."""
        return self.why.startswith(RELAYED)


RELAYED = "relayed by"


def connect_back_target(dgram: wire.Datagram, addrs: tuple[str, ...], port: int,
                        source: str) -> Target:
    """Where to answer: the client itself, a cproxy that relayed it (at the source, on
    the relay's port), or, through a tunnel, the first address the client signed.

    The one place that reads the relay trailer for the answer's address: a check of the
    trailer (who may relay) belongs before this, in the announcement's checks.
    """
    if dgram.relay_port:
        return Target(source, dgram.relay_port,
                      f"{RELAYED} {source} (a cproxy: the port is its trailer's)")
    if dgram.relay_port == 0 and source not in addrs and addrs:
        return Target(addrs[0], port, f"carried by a tunnel from {source}: the first "
                      "address the client signed")
    return Target(source, port, "the announcement's source, a client address it signed")


class Capacity(typing.Protocol):
    """What hasten needs of a worker's settings."""

    @property
    def slots(self) -> int: ...

    @property
    def speed(self) -> float: ...


class ConnectBacks:
    """The promised connect-backs of one worker.

    When a promise is due, DUE(pending, host, port) is called (the worker opens the
    channel with connect()); a TAKEN for the job cancels it unless TCP is already up.
    """

    def __init__(self, reactor: Any, tls: IOpenSSLClientConnectionCreator,
                 metrics: NoMetrics, due: Callable[[Pending, str, int], None],
                 jitter: Callable[[], float], crowd: Crowd | None = None) -> None:
        self.reactor = reactor
        self.tls = tls
        self.metrics = metrics
        self.due = due
        self.jitter = jitter
        self.crowd = crowd if crowd is not None else Crowd()
        self.pending: dict[bytes, Pending] = {}
        self.tried: OrderedDict[bytes, None] = OrderedDict()
        self.recent: OrderedDict[bytes, Pending] = OrderedDict()  # see find()
        self.freed: Callable[[], None] = lambda: None  # a failed or cancelled one let go

    def find(self, job_id: bytes) -> Pending | None:
        """The connect-back promised for JOB_ID, or one settled before a TAKEN taught the
        crowd (cancelled by an early TAKEN, or its connection refused or closed by the
        client before the TAKEN came): the job's next TAKEN will."""
        return self.pending.get(job_id) or self.recent.get(job_id)

    def answered(self, job_id: bytes) -> bool:
        """Whether this worker already promised (or made) a connect-back for JOB_ID."""
        return job_id in self.tried

    def resent(self, job_id: bytes, client: ClientCert, sent_ms: int = 0) -> bool:
        """Whether JOB_ID was answered already (an announcement again, not to answer).
        CLIENT announcing it again (at SENT_MS by its clock: Announce.ts_ms) has accepted
        nobody yet: if our connect-back waits still and the crowd's window proves far too
        wide for that (Crowd.unanswered: judged past our own base delay), it is drawn
        again as if the announcement came now: its base delay again (load, speed, what
        is left of a queue's wait), so that the workers keep their order by load, and a
        random part from the narrower window.  How long the client has waited is the
        shorter of what our clock and the client's say (waited()): a resend read late
        here (a busy worker) is not taken for one sent late."""
        pending = self.pending.get(job_id)
        if (pending is None or pending.early or pending.call is None
                or not pending.call.active() or pending.client.cert != client.cert):
            return self.answered(job_id)
        now = self.reactor.seconds()
        if not pending.sent:  # promised without the client's time (from the waitlist): our
            # clock alone this time; the client's too from now on, set to agree with ours
            pending.sent = sent_ms - (now - pending.heard) * 1000
        if not self.crowd.unanswered(now, pending.spread, waited(pending, now, sent_ms)):
            return True
        pending.wait = max(pending.wait - (now - pending.heard), 0.0)
        pending.spread = spread_ms(self.crowd.size(now))
        pending.base = base_ms(pending.load, pending.speed, wait=pending.wait)
        pending.heard, pending.sent = now, float(sent_ms)
        pending.delay = (base_ms(pending.load, pending.speed, pending.spread, pending.wait,
                                 pending.queued) + self.jitter() * pending.spread) / 1000
        pending.call.reset(pending.delay)
        log.info("job {job} announced again, unanswered: the connect-back window narrows "
                 "to {ms:.0f} ms", job=job_id.hex()[:12], ms=pending.spread)
        return True

    def promise(self, job_id: bytes, client: ClientCert, load: float, speed: float,
                target: Target, queued: bool = False, ahead: int = 0,
                wait: float = 0.0, sent_ms: int = 0) -> Pending:
        """Connect back to TARGET after the delay LOAD and SPEED earn in today's crowd
        (QUEUED: for a place in the queue, with AHEAD jobs before it, later by its WAIT),
        for an announcement the client sent at SENT_MS by its clock (0: not known)."""
        now = self.reactor.seconds()
        crowd = self.crowd.size(now)
        delay = connect_back_delay(load, speed, self.jitter, crowd, wait, queued)
        spread = spread_ms(crowd)
        pending = Pending(job_id, client, load, delay, heard=now, sent=float(sent_ms),
                          spread=spread, base=base_ms(load, speed, wait=wait),
                          speed=speed, queued=queued, ahead=ahead, wait=wait)
        self.pending[job_id] = pending
        self.tried[job_id] = None
        if len(self.tried) > TRIED_JOBS:
            self.tried.popitem(last=False)
        pending.call = self.reactor.callLater(delay, self._due, pending, target)
        return pending

    def _due(self, pending: Pending, target: Target) -> None:
        pending.call = None
        pending.relayed = target.relayed
        log.info("connecting back for job {job} of {client} to {host}:{port} ({why})",
                 job=pending.job_id.hex()[:12], client=pending.client.info.name,
                 host=target.host, port=target.port, why=target.why)
        self.due(pending, target.host, target.port)

    def connect(self, pending: Pending, host: str, port: int,
                channel: Callable[[], Protocol]) -> None:
        """Open the TLS connection of PENDING to HOST:PORT, with a CHANNEL protocol."""
        endpoint_type = TCP6ClientEndpoint if ":" in host else TCP4ClientEndpoint
        endpoint = wrapClientTLS(
            self.tls, endpoint_type(self.reactor, host, port, timeout=CONNECT_TIMEOUT)
        )

        def build() -> Protocol:
            pending.connected = True
            made = pending.channel = channel()
            return made

        factory = Factory.forProtocol(build)
        factory.noisy = False  # no "Starting factory" log line per connect-back
        pending.connecting = endpoint.connect(factory)

        def failed(reason: Failure) -> None:
            if not reason.check(defer.CancelledError):
                log.info("connect-back to {host}:{port} failed: {why}", host=host, port=port,
                         why=reason.getErrorMessage())
                self.metrics.connect_back("failed")
            self.release(pending)
            self.freed()

        pending.connecting.addErrback(failed)

    def hasten(self, settings: Capacity, busy: int, load: Callable[[], float]) -> int:
        """A worker of SETTINGS (slots, speed) has BUSY slots: into those free, the oldest
        connect-backs promised for a queue place and not begun yet go now, after the delay
        an answer with a free slot gets (not the expected wait they were drawn with: the
        slot would idle until then, or until the client announced again; a stopping
        worker has none left).  LOAD() gives its load figure.  How many were hastened."""
        now = self.reactor.seconds()
        free, speed = settings.slots - busy, settings.speed
        waiting = sorted((p for p in self.pending.values() if p.queued and p.slots == 1
                          and p.call is not None and p.call.active()), key=lambda p: p.heard)
        figure = load() if waiting and free > 0 else 0.0
        for pending in waiting[:max(free, 0)]:
            assert pending.call is not None
            pending.queued, pending.ahead, pending.wait, pending.load = False, 0, 0.0, figure
            crowd = self.crowd.size(now)
            spread = spread_ms(crowd)
            delay = connect_back_delay(figure, speed, self.jitter, crowd)
            if delay < pending.call.getTime() - now:
                pending.delay = now - pending.heard + delay
                pending.base = (now - pending.heard) * 1000 + base_ms(figure, speed, spread)
                pending.call.reset(delay)
        return min(len(waiting), max(free, 0))

    def taken(self, pending: Pending, answered: int, early: bool = False) -> None:
        """A checked TAKEN for PENDING's job: learn the crowd (once); cancel unless
        connected and verified (a channel whose handshake is unfinished gives up after a
        short grace).  An early TAKEN (the client accepted a first connection, maybe ours)
        cancels only a connect-back not yet begun; the final TAKEN's count then says how
        many were under way (Crowd.steer)."""
        now = self.reactor.seconds()
        if early:
            if not pending.early:
                pending.early = True
                pending.early_ms = (now - pending.heard) * 1000 - pending.base
        elif not pending.learnt:
            pending.learnt = True
            if pending.early:  # ANSWERED: those under way when the early TAKEN came
                self.crowd.steer(answered, now, pending.spread, pending.early_ms)
            else:  # a client without early TAKENs
                self.crowd.observe(answered, now, pending.spread,
                                   (now - pending.heard) * 1000 - pending.base)
        if self.recent.get(pending.job_id) is pending:  # settled already (cancelled by the
            if pending.learnt:  # early TAKEN, failed, refused, won): it was kept to learn
                del self.recent[pending.job_id]
            return
        if early and (pending.connected or pending.connecting is not None):
            return  # the client's final TAKEN, or TLS, will tell
        if pending.connected:
            if pending.channel is not None and not pending.channel.verified:
                pending.channel.taken()
            return  # the client will tell us over TLS
        self._cancel(pending)
        self.metrics.connect_back("lost")
        log.info("connect-back for job {job} cancelled: taken by another worker",
                 job=pending.job_id.hex()[:12])

    def _cancel(self, pending: Pending) -> None:
        if pending.call is not None and pending.call.active():
            pending.call.cancel()
        if pending.connecting is not None:
            pending.connecting.cancel()
        self.release(pending)

    def release(self, pending: Pending) -> None:
        """PENDING no longer holds a slot (won, lost or failed); if no TAKEN taught the
        crowd yet, the job's next one will (see find())."""
        if self.pending.get(pending.job_id) is pending:
            del self.pending[pending.job_id]
            if not pending.learnt:
                self.recent[pending.job_id] = pending
                if len(self.recent) > RECENT_JOBS:
                    self.recent.popitem(last=False)

    def cancel_waiting(self) -> None:
        """The worker is stopping: no connect-back that has not started will."""
        for pending in list(self.pending.values()):
            if pending.call is not None and pending.call.active():
                pending.call.cancel()
            self.release(pending)
