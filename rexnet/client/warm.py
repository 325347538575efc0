"""Warm channels: authenticated links to workers kept idle for the same client's next jobs.

A job's client asks its worker (START with keep) to keep the channel open after EXIT; the
worker then waits for the next START on it and sends a fresh HELLO (its load) every second.
The pool holds such idle channels for one client process (the agent, or an Executor) and
hands one out only while its worker is still the best choice: its load report is fresh,
it has a free slot, it runs no more jobs than when it won an announcement (when it was
the quickest of all workers to answer), and its load figure has not grown by REUSE_MARGIN
since. A pool that spreads many jobs of its own (an Executor: DISCOUNT_OWN) leaves its
own running jobs out of both counts, as they come and go (a report counts no more of them
than the jobs it says run: those queued there or on their way are not in it), prefers the
worker with the smallest share of its slots taken (other clients' jobs as reported, and
its own busy channels there); and when none of its workers
is such a choice (they are busy, mostly with its own jobs), it sends the job to the one
with the fewest jobs queued per slot that reported lately (announcing
would only bring a queued worker's later answer and a handshake; a worker whose queue is
full answers BUSY, and the job is announced), unless another worker it heard from has a
free slot as it counts them (room): then the job announces, and that worker's answer
brings the pool one more channel. Otherwise the job is announced as usual
and the workers compete again. A channel is never shared: the pool gives it to one job at
a time, and pools are per client process (per user).

More jobs in flight than the cluster holds (slots and queue places): a DISCOUNT_OWN pool
hands a channel its job just left straight to the first of its jobs still looking for a
worker (HUNGRY: one that announced HUNGRY_AFTER times unanswered, or that waits), instead
of parking it; and with QUEUE_ON_WARM, once a worker queued one of its jobs or answered
BUSY (SATURATED: every slot taken), a job that finds no channel waits up to
SATURATED_WAIT for one of the pool's own before it announces: an announcement would only
be answered when a place frees, by then given to the pool's own next job, and every
resend costs each worker a signature check. (A job that a free worker answers at once is
not handed anything: it brings one more channel; nor is one while another worker has
room; where the channel's worker is full, the first job that waits announces at once.)

A job's choice costs no more than the idle channels of its key: the pool keeps them by key,
and counts its running jobs and idle channels per worker as records change (Warm.pool).
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

from rexnet.net.alerts import AlertSender
from rexnet.protocol import wire

if TYPE_CHECKING:
    from rexnet.security.credentials import Credential

IDLE = 25.0  # seconds an idle channel is kept (the worker keeps it 30 s)
FRESH = 3.0  # a load report older than this is not trusted
REUSE_MARGIN = 0.5  # load growth since the worker won after which the job is announced
PER_WORKER = 32  # idle channels kept per worker
SATURATED_WAIT = 3.0  # seconds a job waits for one of the pool's channels before announcing
HUNGRY_AFTER = 3  # announcements unanswered (150 ms) before a job takes a channel handed over

Offer = Callable[[Any], bool]
"""A hungry job: given a channel, True if it took it (it still looked for a worker)."""

log = Logger()


class Link(Protocol):
    """What the pool needs of a channel (a rexnet.client.channel.ClientChannel)."""

    @property
    def closed(self) -> bool: ...

    def close(self) -> None: ...


class KeptAlertSender(AlertSender):
    """An AlertSender that jobs share: its UDP port stays open until the pool closes."""

    def stop(self) -> None:
        pass

    def close(self) -> None:
        super().stop()


@dataclass(eq=False)
class Warm:
    """The pool's record of one channel: its worker's last report, how the worker stood
    when it won, and the channel's jobs. The pool never writes the channel itself."""

    link: Link
    worker: str = "?"
    load: float = 0.0
    running: int = 0
    slots: int = 1
    queued: int = 0  # jobs in its queue when it last reported (0 while a slot is free)
    wait_ms: float = 0.0  # its expected wait for a slot then
    heard_at: float | None = None  # when the last HELLO came (None: none yet)
    own_at_hello: int = 0  # this client's jobs the last HELLO counted (at most its running)
    won_load: float = 0.0  # the worker's load when it won an announcement
    won_others: int = 0  # other clients' jobs on the worker then
    jobs: int = 0  # jobs started on this channel
    busy: bool = False  # it runs (or just ran) one of this client's jobs
    exited: bool = False  # that job has exited
    key: Hashable = None  # idle: which jobs it may serve
    expiry: IDelayedCall | None = None  # idle: when it is closed
    seq: int = 0  # the order in which the pool made its records (ties go to the older)
    pool: WarmPool | None = field(default=None, repr=False)  # whose counts it is in

    @property
    def idle(self) -> bool:
        return self.expiry is not None

    @property
    def running_job(self) -> bool:
        """Whether it runs one of this client's jobs (counted in its worker's jobs)."""
        return self.busy and not self.exited

    def __setattr__(self, name: str, value: Any) -> None:
        pool = self.__dict__.get("pool") if name in _COUNTED else None
        if pool is None or self.__dict__.get(name, _UNSET) == value:  # no change to count
            object.__setattr__(self, name, value)
            return
        pool._uncount(self)
        object.__setattr__(self, name, value)
        pool._count(self)

    def update(self, **changes: Any) -> None:
        """Set several fields with one recount (a job's turn changes two or three)."""
        pool = self.__dict__.get("pool")
        if pool is not None:
            pool._uncount(self)
        self.__dict__.update(changes)
        if pool is not None:
            pool._count(self)


_UNSET = object()

_COUNTED = frozenset({"busy", "exited", "worker", "key", "expiry"})
"""The fields of Warm that the pool's counts and index are made of."""


class WarmPool:
    """Idle warm channels of one client process, by key (credential and announce targets)."""

    def __init__(self, reactor: Any, idle: float = IDLE, fresh: float = FRESH,
                 margin: float = REUSE_MARGIN, per_worker: int = PER_WORKER,
                 discount_own: bool = False, queue_on_warm: bool | None = None) -> None:
        """QUEUE_ON_WARM (default: DISCOUNT_OWN): when no warm channel's worker is a good
        choice, queue the job at the known worker with the fewest jobs queued per slot
        instead of announcing it (faster under overload, but a worker the pool does not
        know yet is not found while its known ones stay busy)."""
        self.reactor = reactor
        self.idle_for = idle
        self.fresh = fresh
        self.margin = margin
        self.per_worker = per_worker
        self.discount_own = discount_own
        self.queue_on_warm = discount_own if queue_on_warm is None else queue_on_warm
        self.records: dict[Link, Warm] = {}
        self._made = 0  # records made so far (Warm.seq)
        self._running: Counter[str] = Counter()  # this client's jobs per worker (no zeros)
        self._busy: Counter[str] = Counter()  # its busy channels per worker (see taken)
        self._idle_of: Counter[str] = Counter()  # idle channels per worker (no zeros)
        self._idle_by_key: dict[Hashable, dict[Link, Warm]] = {}  # idle records by key
        self.reused = 0
        self.idle_events = IdleEvents(self)  # the owner of its idle channels' events
        self._alerts: dict[tuple[bytes, tuple[tuple[str, int], ...]], KeptAlertSender] = {}
        self.hungry: dict[Hashable, deque[Offer]] = {}  # jobs looking for a worker, by key
        self._saturated: dict[Hashable, float] = {}  # when a job last met a full worker
        self._waits: dict[Offer, IDelayedCall] = {}  # hungry jobs' SATURATED_WAIT
        self._reports: dict[str, tuple[float, int, int]] = {}  # per worker (DISCOUNT_OWN):
        # its latest report's time, other clients' jobs then, its slots

    def alerts(self, credential: Credential, targets: Sequence[tuple[str, int]]
               ) -> AlertSender:
        """One alert sender (one UDP port) for all jobs of CREDENTIAL to TARGETS."""
        key = (credential.cert_der, tuple(targets))
        if key not in self._alerts:
            self._alerts[key] = KeptAlertSender(self.reactor, credential, targets)
        return self._alerts[key]

    @property
    def idle(self) -> list[Warm]:
        """The records of the idle channels."""
        return sorted((w for idle in self._idle_by_key.values() for w in idle.values()),
                      key=lambda w: w.seq)

    def record(self, link: Link) -> Warm:
        """The pool's record of LINK (a new one if it has none)."""
        warm = self.records.get(link)
        if warm is None:
            self._made += 1
            warm = self.records[link] = Warm(link, seq=self._made)
            warm.pool = self
            self._count(warm)
        return warm

    def _count(self, warm: Warm) -> None:
        """Add WARM to the counts and the idle index."""
        if warm.running_job:
            self._running[warm.worker] += 1
        if warm.busy:
            self._busy[warm.worker] += 1
        if warm.idle:
            self._idle_of[warm.worker] += 1
            self._idle_by_key.setdefault(warm.key, {})[warm.link] = warm

    def _uncount(self, warm: Warm) -> None:
        """Take WARM out of the counts and the idle index."""
        if warm.running_job:
            _less(self._running, warm.worker)
        if warm.busy:
            _less(self._busy, warm.worker)
        if warm.idle:
            _less(self._idle_of, warm.worker)
            idle = self._idle_by_key[warm.key]
            del idle[warm.link]
            if not idle:
                del self._idle_by_key[warm.key]

    def own(self, worker: str) -> int:
        """How many of this client's jobs run on WORKER now (0 unless DISCOUNT_OWN)."""
        return self._running[worker] if self.discount_own else 0

    def heard(self, link: Link, hello: wire.Hello) -> None:
        """LINK's worker reported its load: note it, and how much of it was this client's."""
        warm = self.record(link)
        warm.worker, warm.load = hello.worker, hello.load
        warm.running, warm.slots = hello.running, hello.slots
        warm.queued, warm.wait_ms = hello.queued, hello.wait_ms
        warm.heard_at = self.reactor.seconds()
        if self.discount_own:  # ours the report can count: started ones, not those queued
            warm.own_at_hello = min(self.own(hello.worker), hello.running)  # or in flight
            self._reports[hello.worker] = (warm.heard_at, hello.running - warm.own_at_hello,
                                           hello.slots)

    def started(self, link: Link) -> None:
        """A job of this client started on LINK (fresh or warm)."""
        warm = self.record(link)
        if warm.heard_at is not None and not warm.busy:
            if not warm.jobs:  # a fresh channel: its worker just won an announcement
                # its load and other clients' jobs, less ours as its report counted them
                # (ours that started there since are not in it: never below 0)
                warm.won_load = max(warm.load - warm.own_at_hello / max(warm.slots, 1), 0.0)
                warm.won_others = max(warm.running - warm.own_at_hello, 0)
            warm.update(busy=True, exited=False)
        else:
            warm.exited = False
        warm.jobs += 1

    def exited(self, link: Link) -> None:
        """The job on LINK exited (its channel may be parked once its output is written)."""
        self.record(link).exited = True

    def usable(self, warm: Warm, now: float) -> bool:
        """Whether WARM's worker is still the best choice for a job (with DISCOUNT_OWN,
        less this client's jobs that ran there when it reported)."""
        if warm.heard_at is None or warm.link.closed or now - warm.heard_at > self.fresh:
            return False
        mine = warm.own_at_hello if self.discount_own else 0
        # its slots now: its report, less our jobs then, plus ours now (0, 0 without
        # DISCOUNT_OWN): our jobs that ended since the report freed their slots
        return (warm.running - mine + self.own(warm.worker) < warm.slots
                and warm.running - mine <= warm.won_others
                and warm.load - mine / max(warm.slots, 1) - warm.won_load < self.margin)

    def taken(self, warm: Warm) -> int:
        """Places taken at WARM's worker as this pool knows: other clients' jobs when it
        reported, and this client's now (its busy channels there: a job running, queued,
        its START on the way, or its channel not yet parked)."""
        return max(warm.running - warm.own_at_hello, 0) + self._busy[warm.worker]

    def queue_usable(self, warm: Warm, now: float) -> bool:
        """With DISCOUNT_OWN (a pool that overloads the cluster with its own jobs): whether
        WARM's worker reported lately. (Whose jobs fill its slots is not told apart: this
        client's queued jobs are not counted as its own until they start.)"""
        return (self.queue_on_warm and warm.heard_at is not None and not warm.link.closed
                and now - warm.heard_at <= self.fresh)

    def queued_per_slot(self, warm: Warm) -> float:
        """Jobs queued at WARM's worker per slot, as reported or as the places taken there
        (see taken) say."""
        return max(warm.queued, self.taken(warm) - warm.slots) / max(warm.slots, 1)

    def _busiest_last(self, warm: Warm) -> tuple[float, float, int]:
        """Usable channels' order: (DISCOUNT_OWN) the smallest share of slots taken first,
        then the least loaded host, then the older record."""
        share = self.taken(warm) / max(warm.slots, 1) if self.discount_own else 0.0
        return share, warm.load, warm.seq

    def take(self, key: Hashable,
             distrust: Callable[[Link], str | None] = lambda link: None) -> Link | None:
        """The idle channel of KEY whose worker is least loaded, if one is still a good
        choice (see usable); it leaves the pool. DISTRUST(link) says why a channel's worker
        is no longer to be trusted (its certificate expired or was revoked since the
        handshake), or None: such a channel is closed, with a logged complaint, and the
        next best is tried."""
        now = self.reactor.seconds()
        mine = list(self._idle_by_key.get(key, {}).values())
        free = sorted((w for w in mine if self.usable(w, now)), key=self._busiest_last)
        if not free:
            free = sorted((w for w in mine if self.queue_usable(w, now)),
                          key=lambda w: (self.queued_per_slot(w), *self._busiest_last(w)))
            if free and self.taken(free[0]) >= free[0].slots and self.room(now, free[0].worker):
                return None  # queue only when every worker it knows is full: announce
        for best in free:
            problem = distrust(best.link)
            if problem is not None:
                log.warn("closed the warm channel to worker {worker}: {problem}",
                         worker=best.worker, problem=problem)
                self.lost(best.link)
                best.link.close()
                continue
            self._unpark(best, busy=True, exited=False)  # this client's job from now
            self.reused += 1
            return best.link
        return None

    # -- more jobs than places ----------------------------------------------------------

    def want(self, key: Hashable, offer: Offer) -> None:
        """A job of KEY looks for a worker in vain so far: OFFER it the next channel a job
        of KEY leaves (a DISCOUNT_OWN pool only)."""
        if self.discount_own and offer not in self.hungry.get(key, ()):
            self.hungry.setdefault(key, deque()).append(offer)

    def wait(self, key: Hashable, offer: Offer, announce: Callable[[], None]) -> bool:
        """A job of KEY is about to announce: True if it should rather wait for one of
        the pool's channels (SATURATED; OFFER gets it) and call ANNOUNCE only after
        SATURATED_WAIT; False if it announces now."""
        if not self.saturated(key):
            return False
        self.want(key, offer)
        self._waits[offer] = self.reactor.callLater(SATURATED_WAIT, self._waited, offer,
                                                    announce)
        return True

    def _waited(self, offer: Offer, announce: Callable[[], None]) -> None:
        del self._waits[offer]
        announce()

    def unwant(self, key: Hashable, offer: Offer) -> None:
        """The job found its worker, or ended."""
        wait = self._waits.pop(offer, None)
        if wait is not None and wait.active():
            wait.cancel()
        waiting = self.hungry.get(key)
        if waiting is not None and offer in waiting:
            waiting.remove(offer)
            if not waiting:
                del self.hungry[key]

    def full(self, key: Hashable) -> None:
        """A job of KEY met a full worker: QUEUED (every slot taken) or, on a warm channel,
        BUSY (its queue full too)."""
        self._saturated[key] = self.reactor.seconds()

    def room(self, now: float, but: str) -> bool:
        """Whether a worker other than BUT that reported lately (DISCOUNT_OWN) has a free
        slot as this pool counts them (see taken): a job that announces will find it."""
        return any(worker != but and now - at <= self.fresh
                   and others + self._busy[worker] < slots
                   for worker, (at, others, slots) in self._reports.items())

    def saturated(self, key: Hashable) -> bool:
        """Whether a job of KEY should wait for one of the pool's channels rather than
        announce: with QUEUE_ON_WARM, one of its jobs met a full worker lately and its own
        jobs run (one of their channels will come back)."""
        since = self._saturated.get(key)
        if not self.queue_on_warm or since is None:
            return False
        if self.reactor.seconds() - since > self.fresh:
            del self._saturated[key]
            return False
        return bool(self._running)

    def _hand_over(self, key: Hashable, warm: Warm,
                   distrust: Callable[[Link], str | None]) -> bool | None:
        """Give WARM's channel to the first hungry job of KEY that takes it: True if one
        did, None if none did (or its worker is not a choice for a job that announces),
        False if the channel's worker is no longer trusted."""
        waiting = self.hungry.get(key)
        if not waiting or warm.link.closed:
            return None
        if not self.queue_on_warm and not (warm.heard_at is not None and warm.queued == 0
                                           and warm.running < warm.slots):
            return None  # the announcement may find a free worker: let it
        problem = distrust(warm.link)
        if problem is not None:
            log.warn("closed the warm channel to worker {worker}: {problem}",
                     worker=warm.worker, problem=problem)
            return False
        # a free slot at another worker: a job that announces will find it (and the pool
        # one more channel); this one goes only to a job that waits (SATURATED_WAIT)
        waits_only = self.queue_on_warm and self.room(self.reactor.seconds(), warm.worker)
        if waits_only and self.taken(warm) >= warm.slots:  # it would queue here: the first
            first = next((self._waits[o] for o in waiting if o in self._waits), None)
            if first is not None:  # job that waits announces now instead
                first.reset(0)
            return None
        handed = None
        for offer in list(waiting):
            if waits_only and offer not in self._waits:
                continue
            waiting.remove(offer)
            warm.busy, warm.exited = True, False
            if offer(warm.link):
                self.reused += 1
                handed = True
                break
            warm.busy = False  # that job found its worker meanwhile
        if not waiting:
            self.hungry.pop(key, None)
        return handed

    def park(self, key: Hashable, link: Link,
             distrust: Callable[[Link], str | None] = lambda link: None) -> bool:
        """Keep LINK (its job ended, the worker keeps it open) for a later job of KEY, or
        hand it to a job of KEY still looking for a worker (DISTRUST as for take); False
        if the pool has enough of that worker's channels (then close it)."""
        warm = self.record(link)
        warm.busy = False
        handed = self._hand_over(key, warm, distrust)
        if handed is not None:
            return handed
        if link.closed or self._idle_of[warm.worker] >= self.per_worker:
            return False
        warm.update(key=key, expiry=self.reactor.callLater(self.idle_for, self._expire, link))
        return True

    def parked(self, link: Link) -> bool:
        """Whether LINK is idle in this pool."""
        warm = self.records.get(link)
        return warm is not None and warm.idle

    def _expire(self, link: Link) -> None:
        warm = self.records.get(link)
        if warm is not None and warm.idle:
            warm.expiry = None
            self.lost(link)
            link.close()

    def _unpark(self, warm: Warm, **changes: Any) -> None:
        """WARM is idle no more (with CHANGES to its other fields, in the same recount)."""
        if warm.expiry is not None and warm.expiry.active():
            warm.expiry.cancel()
        warm.update(expiry=None, **changes)

    def lost(self, link: Link) -> None:
        """LINK's connection is gone, or its job failed: it is of no further use."""
        warm = self.records.pop(link, None)
        if warm is not None:
            self._unpark(warm)
            self._uncount(warm)
            warm.pool = None

    def close(self) -> None:
        """Close every idle channel."""
        for warm in self.idle:
            self.lost(warm.link)
            warm.link.close()
        for sender in self._alerts.values():
            sender.close()
        self._alerts.clear()


def _less(counts: Counter[str], name: str) -> None:
    """One less of NAME in COUNTS (no zeros kept)."""
    counts[name] -= 1
    if counts[name] <= 0:
        del counts[name]


class IdleEvents:
    """What an idle channel's events do while it waits in POOL (its owner, in the sense of
    rexnet.client.channel.ChannelEvents): load reports are noted, a loss ends its record,
    anything else (late frames of its last job) is ignored."""

    def __init__(self, pool: WarmPool) -> None:
        self.pool = pool

    def hello(self, link: Link, hello: wire.Hello) -> None:
        self.pool.heard(link, hello)

    def lost(self, link: Link, problem: str) -> None:
        self.pool.lost(link)

    def connected(self, link: Link) -> None:
        pass

    def verified(self, link: Link) -> None:
        pass

    def refused(self, link: Link, problem: str) -> None:
        pass

    def started(self, link: Link, started: wire.Started) -> None:
        pass

    def exited(self, link: Link, exit: wire.Exit) -> None:
        pass

    def error(self, link: Link, error: wire.Error) -> None:
        pass

    def busy(self, link: Link) -> None:
        pass

    def queued(self, link: Link, queued: wire.Queued) -> None:
        pass

    def unexpected(self, link: Link, frame: wire.Frame) -> None:
        pass
