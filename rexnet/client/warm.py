"""Warm channels: authenticated links to workers kept idle for the same client's next jobs.

A job's client asks its worker (START with keep) to keep the channel open after EXIT; the
worker then waits for the next START on it and sends a fresh HELLO (its load) every second.
The pool holds such idle channels for one client process (the agent, or an Executor) and
hands one out only while its worker is still the best choice: its load report is fresh,
it has a free slot, it runs no more jobs than when it won an announcement (when it was
the quickest of all workers to answer), and its load figure has not grown by REUSE_MARGIN
since. A pool that spreads many jobs of its own (an Executor: DISCOUNT_OWN) leaves its
own running jobs out of both counts, as they come and go. Otherwise the job is
announced as usual and the workers compete again. A channel is never shared: the pool
gives it to one job at a time, and pools are per client process (per user).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import IDelayedCall

from rexnet.net.alerts import AlertSender

if TYPE_CHECKING:
    from rexnet.client.channel import ClientChannel
    from rexnet.security.credentials import Credential

IDLE = 25.0  # seconds an idle channel is kept (the worker keeps it 30 s)
FRESH = 3.0  # a load report older than this is not trusted
REUSE_MARGIN = 0.5  # load growth since the worker won after which the job is announced
PER_WORKER = 32  # idle channels kept per worker


class KeptAlertSender(AlertSender):
    """An AlertSender that jobs share: its UDP port stays open until the pool closes."""

    def stop(self) -> None:
        pass

    def close(self) -> None:
        super().stop()


@dataclass
class Idle:
    channel: ClientChannel
    key: Hashable
    worker: str
    expiry: IDelayedCall


class WarmPool:
    """Idle warm channels of one client process, by key (credential and announce targets)."""

    def __init__(self, reactor: Any, idle: float = IDLE, fresh: float = FRESH,
                 margin: float = REUSE_MARGIN, per_worker: int = PER_WORKER,
                 discount_own: bool = False) -> None:
        self.reactor = reactor
        self.idle_for = idle
        self.fresh = fresh
        self.margin = margin
        self.per_worker = per_worker
        self.discount_own = discount_own
        self.idle: dict[ClientChannel, Idle] = {}
        self.busy: dict[ClientChannel, str] = {}  # channels running this client's jobs
        self.reused = 0
        self._alerts: dict[tuple[bytes, tuple[tuple[str, int], ...]], KeptAlertSender] = {}

    def alerts(self, credential: Credential, targets: Sequence[tuple[str, int]]
               ) -> AlertSender:
        """One alert sender (one UDP port) for all jobs of CREDENTIAL to TARGETS."""
        key = (credential.cert_der, tuple(targets))
        if key not in self._alerts:
            self._alerts[key] = KeptAlertSender(self.reactor, credential, targets)
        return self._alerts[key]

    def own(self, worker: str) -> int:
        """How many of this client's jobs run on WORKER now (0 unless DISCOUNT_OWN)."""
        if not self.discount_own:
            return 0
        return sum(name == worker and not channel.exited
                   for channel, name in self.busy.items())

    def heard(self, channel: ClientChannel) -> None:
        """CHANNEL's worker reported its load: note how much of it was this client's."""
        if self.discount_own and channel.hello is not None:
            channel.own_at_hello = self.own(channel.hello.worker)

    def own_share(self, channel: ClientChannel) -> float:
        """The part of CHANNEL's worker's load figure that is this client's own jobs."""
        hello = channel.hello
        return self.own(hello.worker) / max(hello.slots, 1) if hello else 0.0

    def started(self, channel: ClientChannel) -> None:
        """A job of this client started on CHANNEL (fresh or warm)."""
        if channel.hello is not None and channel not in self.busy:
            if not channel.jobs:  # a fresh channel: its worker just won an announcement
                channel.won_load = channel.hello.load - self.own_share(channel)
                channel.won_others = channel.hello.running - self.own(channel.hello.worker)
            self.busy[channel] = channel.hello.worker
        channel.jobs += 1

    def usable(self, channel: ClientChannel, now: float) -> bool:
        """Whether CHANNEL's worker is still the best choice for a job (with DISCOUNT_OWN,
        less this client's jobs that ran there when it reported)."""
        hello = channel.hello
        if hello is None or channel.closed or now - channel.heard_at > self.fresh:
            return False
        mine = channel.own_at_hello if self.discount_own else 0
        return (hello.running < hello.slots and hello.running - mine <= channel.won_others
                and hello.load - mine / max(hello.slots, 1) - channel.won_load < self.margin)

    def take(self, key: Hashable) -> ClientChannel | None:
        """The idle channel of KEY whose worker is least loaded, if one is still a good
        choice (see usable); it leaves the pool."""
        now = self.reactor.seconds()
        best = min((i for i in self.idle.values()
                    if i.key == key and self.usable(i.channel, now)),
                   key=lambda i: i.channel.hello.load if i.channel.hello else 0.0,
                   default=None)
        if best is None:
            return None
        self._remove(best.channel)
        self.reused += 1
        return best.channel

    def park(self, key: Hashable, channel: ClientChannel) -> bool:
        """Keep CHANNEL (its job ended, the worker keeps it open) for a later job of KEY;
        False if the pool has enough of that worker's channels (then close it)."""
        self.busy.pop(channel, None)
        worker = channel.hello.worker if channel.hello else "?"
        if channel.closed or sum(i.worker == worker for i in self.idle.values()) >= \
                self.per_worker:
            return False
        channel.parked = self
        expiry = self.reactor.callLater(self.idle_for, self._expire, channel)
        self.idle[channel] = Idle(channel, key, worker, expiry)
        return True

    def _expire(self, channel: ClientChannel) -> None:
        if channel in self.idle:
            del self.idle[channel]
            channel.parked = None
            channel.close()

    def _remove(self, channel: ClientChannel) -> None:
        idle = self.idle.pop(channel, None)
        channel.parked = None
        if idle is not None and idle.expiry.active():
            idle.expiry.cancel()

    def lost(self, channel: ClientChannel) -> None:
        """CHANNEL's connection is gone, or its job failed: it is of no further use."""
        self.busy.pop(channel, None)
        self._remove(channel)

    def close(self) -> None:
        """Close every idle channel."""
        for channel in list(self.idle):
            self._remove(channel)
            channel.close()
        for sender in self._alerts.values():
            sender.close()
        self._alerts.clear()
