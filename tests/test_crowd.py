"""The connect-back window widens with the crowd of workers that answer one announcement.

Unit tests on a fake clock: the width formula, the crowd estimate's decay and bound, and a
real Worker (real credentials, real signed datagrams) learning the crowd from a client's
TAKEN.  benchmarks/scale.py shows the effect with 1,000 workers end to end.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import Keys
from twisted.internet import defer
from twisted.internet.task import Clock

from rexnet.net.announce import now_ms
from rexnet.protocol import wire
from rexnet.security.credentials import load_credential
from rexnet.worker.load import (
    CROWD_HALF_LIFE,
    CROWD_MAX,
    CROWD_WEIGHT,
    FIRST_DRAW_BIAS,
    IDLE_MS,
    JITTER_MS,
    Crowd,
    HostLoad,
    connect_back_delay,
    crowd_for,
    spread_ms,
    target_extra,
)
from rexnet.worker.service import Worker, WorkerSettings

HANDSHAKE_MS = 2.0  # first connect-back to TAKEN heard, as measured between namespaces


def wasted_per_job(workers: int) -> float:
    """Expected extra connect-backs per job for WORKERS equally idle workers."""
    return min((workers - 1) * HANDSHAKE_MS / spread_ms(workers), workers - 1)


def test_a_lone_worker_keeps_the_old_jitter() -> None:
    assert spread_ms(1) == JITTER_MS
    assert spread_ms(0) == JITTER_MS
    assert connect_back_delay(0.0, 1.0, lambda: 1.0, crowd=1.0) == pytest.approx(
        (IDLE_MS + JITTER_MS) / 1000)


def test_small_clusters_start_about_as_fast() -> None:
    # the expected first answer is spread / (N + 1) after the idle delay
    assert spread_ms(2) / 3 <= 0.5
    assert spread_ms(4) / 5 <= 2.0


def test_a_thousand_workers_waste_few_connect_backs() -> None:
    assert wasted_per_job(1000) <= 0.05
    assert spread_ms(1000) / 1001 <= 60.0  # and the first answers within about 50 ms
    assert wasted_per_job(2) <= 1  # never worse than today's everyone-answers


def test_spread_grows_with_the_crowd() -> None:
    widths = [spread_ms(n) for n in (1, 2, 10, 100, 1000)]
    assert widths == sorted(widths) and widths[-1] > 1000 * widths[0]


def test_a_count_is_a_floor_and_fades_with_time() -> None:
    crowd = Crowd()
    assert crowd.size(0.0) == 1.0
    crowd.observe(1000, 10.0)  # the first storm: at least 1000 answered
    assert crowd.size(10.0) == 1000.0
    assert crowd.size(10.0 + CROWD_HALF_LIFE) == pytest.approx(1 + 999 / 2)
    assert crowd.size(10.0 + 40 * CROWD_HALF_LIFE) == pytest.approx(1.0)
    crowd.observe(0, 20.0)  # a client that does not say teaches nothing
    assert crowd._at == 10.0


def first_answer(workers: float, spread: float) -> float:
    """When the first of WORKERS answers, typically (ms after the idle delay)."""
    return spread / workers / FIRST_DRAW_BIAS


def test_the_first_answer_tells_the_crowd() -> None:
    crowd = Crowd()
    crowd.observe(1000, 0.0)
    spread = spread_ms(1000)
    # one connect-back, and the TAKEN came when the first of 1000 would answer: stay
    crowd.observe(1, 1.0, spread, first_answer(1000, spread))
    assert crowd.size(1.0) == pytest.approx(1000, rel=1e-3)
    # it came sooner, as the first of 4000 would: believe more workers, a step at a time
    crowd.observe(1, 2.0, spread, first_answer(4000, spread))
    assert crowd.size(2.0) == pytest.approx(1000 * 4 ** CROWD_WEIGHT, rel=1e-3)
    # a TAKEN later than the whole window says only its count
    crowd.observe(3, 3.0, 1.0, 5.0)
    assert 3 <= crowd.size(3.0) < 1000


def test_crowd_is_bounded() -> None:
    crowd = Crowd()
    crowd.observe(10**9, 0.0)
    assert crowd.size(0.0) == CROWD_MAX
    crowd.observe(1, 0.0, spread_ms(CROWD_MAX), 1e-9)
    assert crowd.size(0.0) == CROWD_MAX


class Announcer:
    """Signed ANNOUNCE and TAKEN datagrams of one client, fresh by the real clock."""

    def __init__(self, keys: Keys) -> None:
        self.cred = load_credential(Path(keys.client), "client")
        self.jobs = 0

    def announce(self) -> tuple[bytes, bytes]:
        self.jobs += 1
        job = self.jobs.to_bytes(16, "big")
        ann = wire.Announce(job, 0, now_ms(), 4000, ("192.0.2.7",))
        return job, wire.encode_datagram(ann, self.cred.app_id, self.cred.key,
                                         self.cred.cert_der)

    def taken(self, job: bytes, answered: int, early: bool = False) -> bytes:
        return wire.encode_datagram(wire.Taken(job, now_ms(), answered, early),
                                    self.cred.app_id, self.cred.key)


@pytest.fixture
def worker(keys: Keys) -> tuple[Worker, Clock]:
    clock = Clock()
    settings = WorkerSettings(load_credential(Path(keys.worker), "worker"), ("true",), "w",
                              slots=4)
    idle = HostLoad(loadavg=0.0, cpus=2, free_memory=1 << 30)
    return Worker(settings, clock, sample=lambda: idle, jitter=lambda: 1.0), clock


def test_worker_widens_its_window_after_a_crowded_taken(
    keys: Keys, worker: tuple[Worker, Clock]
) -> None:
    w, clock = worker
    client = Announcer(keys)
    job, data = client.announce()
    w.datagram(data, "192.0.2.7", 5000)
    first = w.pending[job].delay
    assert first == pytest.approx((IDLE_MS + JITTER_MS) / 1000)
    w.datagram(client.taken(job, 1000), "192.0.2.7", 5000)
    assert job not in w.pending  # cancelled, and the crowd learnt
    job2, data2 = client.announce()
    w.datagram(data2, "192.0.2.7", 5000)
    spread = spread_ms(1000)
    assert w.pending[job2].delay == pytest.approx((IDLE_MS + spread) / 1000)
    # the next TAKEN comes when the first of 1000 would have answered: the crowd holds
    clock.advance((IDLE_MS + first_answer(1000, spread)) / 1000)
    w.datagram(client.taken(job2, 1), "192.0.2.7", 5000)
    assert job2 not in w.pending
    assert w.crowd.size(clock.seconds()) == pytest.approx(1000, rel=1e-3)


def test_a_forged_taken_teaches_nothing(keys: Keys, other_keys: Keys,
                                        worker: tuple[Worker, Clock]) -> None:
    w, _ = worker
    client, stranger = Announcer(keys), Announcer(other_keys)
    job, data = client.announce()
    w.datagram(data, "192.0.2.7", 5000)
    forged = wire.encode_datagram(wire.Taken(job, now_ms(), 1000), client.cred.app_id,
                                  stranger.cred.key)
    w.datagram(forged, "192.0.2.7", 5000)
    assert job in w.pending
    assert w.crowd.size(0.0) == 1.0


def test_early_taken_cancels_what_has_not_begun_and_the_final_one_teaches_the_crowd(
    keys: Keys, worker: tuple[Worker, Clock]
) -> None:
    """The client's early TAKEN (a first connection accepted) cancels a connect-back not
    yet begun; the crowd is learnt when the final TAKEN says how many had answered by
    then: N drawing from a window of S ms, about N * t / S by t."""
    w, clock = worker
    client = Announcer(keys)
    job, data = client.announce()
    w.datagram(data, "192.0.2.7", 5000)
    clock.advance(IDLE_MS / 1000 + 0.0005)  # 0.5 ms into its 1 ms window: not due yet
    w.datagram(client.taken(job, 1, early=True), "192.0.2.7", 5000)
    assert job not in w.pending and w.crowd.size(clock.seconds()) == 1.0
    w.datagram(client.taken(job, 400), "192.0.2.7", 5000)  # 400 had answered by 0.5 ms
    # a storm: the window is sized at once, 399 extra connect-backs -> the target
    sized = crowd_for(JITTER_MS * 399 / target_extra(400))
    assert w.crowd.size(clock.seconds()) == pytest.approx(sized)
    w.datagram(client.taken(job, 400), "192.0.2.7", 5000)  # once only
    assert w.crowd.size(clock.seconds()) == pytest.approx(sized)


def test_early_taken_leaves_a_connect_back_under_way(
    keys: Keys, worker: tuple[Worker, Clock]
) -> None:
    """A connect-back that has begun may be the connection the client accepted: only the
    final TAKEN (or TLS) settles it."""
    w, _ = worker
    client = Announcer(keys)
    job, data = client.announce()
    w.datagram(data, "192.0.2.7", 5000)
    pending = w.pending[job]
    connecting: defer.Deferred[None] = defer.Deferred()
    pending.call, pending.connecting = None, connecting  # its timer fired: TCP under way
    w.datagram(client.taken(job, 1, early=True), "192.0.2.7", 5000)
    assert w.pending.get(job) is pending and not connecting.called
    w.datagram(client.taken(job, 2), "192.0.2.7", 5000)
    assert job not in w.pending
    assert connecting.called  # cancelled: another worker won
    connecting.addErrback(lambda f: f.trap(defer.CancelledError))


def test_a_connect_back_settled_before_the_takens_still_learns_from_the_final_one(
    keys: Keys, worker: tuple[Worker, Clock]
) -> None:
    """A connect-back the client refused (over its handshake cap) or closed is settled
    before any TAKEN comes: the final TAKEN still teaches the crowd."""
    w, clock = worker
    client = Announcer(keys)
    job, data = client.announce()
    w.datagram(data, "192.0.2.7", 5000)
    clock.advance(0.002)
    w.release(w.pending[job])  # its connection was refused
    w.datagram(client.taken(job, 1, early=True), "192.0.2.7", 5000)
    assert w.crowd.size(clock.seconds()) == 1.0
    w.datagram(client.taken(job, 300), "192.0.2.7", 5000)
    assert w.crowd.size(clock.seconds()) == pytest.approx(
        crowd_for(JITTER_MS * 299 / target_extra(300)))
    assert not w.connect_backs.recent
