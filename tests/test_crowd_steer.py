"""Crowd.steer: the connect-back window settles within a job or two of the first storm.

Unit tests on explicit times (and a real Worker on a fake clock): a storm's count and the
early TAKEN's delay size the window at once; near the target the window moves by small
steps; a first answer far later than the crowd would give shrinks it at once; what one
TAKEN can do is bounded.  A seeded model of N workers drawing from their windows checks
the connect-backs per job after the first.  benchmarks/scale.py measures it end to end.
"""

from __future__ import annotations

import random
import statistics
from pathlib import Path
from typing import Any

import pytest
from conftest import Keys
from test_crowd import Announcer
from twisted.internet import defer
from twisted.internet.task import Clock

from rexnet.worker.load import (
    CROWD_MAX,
    ELAPSED_MAX_MS,
    IDLE_MS,
    JITTER_MS,
    STEER_GAIN,
    Crowd,
    HostLoad,
    crowd_for,
    spread_ms,
    target_extra,
)
from rexnet.worker.service import Worker, WorkerSettings


def expected_extra(workers: int, spread: float, took: float) -> float:
    """Extra connect-backs per job: the others drawing within TOOK ms of the first."""
    first = spread / (workers + 1)
    return min((workers - 1) * took / max(spread - first, 1e-9), workers - 1.0)


def run_jobs(workers: int, took: float, jobs: int, seed: int = 7
             ) -> tuple[list[int], list[float]]:
    """WORKERS idle workers, each with its own Crowd, answer JOBS announcements one second
    apart; the early TAKEN reaches them TOOK ms after the first connect-back, and the final
    TAKEN says how many had connected back by then.  Connect-backs and first answers (ms
    after the announcement) per job."""
    rng = random.Random(seed)
    crowds = [Crowd() for _ in range(workers)]
    counts: list[int] = []
    firsts: list[float] = []
    for job in range(jobs):
        now = float(job)
        spreads = [spread_ms(c.size(now)) for c in crowds]
        delays = [IDLE_MS + rng.random() * s for s in spreads]
        first = min(delays)
        early = first + took
        count = sum(d < early for d in delays)
        for crowd, spread in zip(crowds, spreads, strict=True):
            crowd.steer(count, now, spread, early - IDLE_MS)
        counts.append(count)
        firsts.append(first)
    return counts, firsts


def test_a_storm_sizes_the_window_at_once() -> None:
    """Every window (1 ms) was over before the early TAKEN came 3 ms later: the count is
    the crowd, and the delay less the first draw how long a TAKEN takes."""
    crowd = Crowd()
    crowd.steer(1000, 0.0, JITTER_MS, 3.0)
    assert crowd.known(0.0) == 1000
    window = spread_ms(crowd.size(0.0))
    took = 3.0 - JITTER_MS / 1001
    assert window == pytest.approx(999 * 1001 / 1000 * took / target_extra(1000))
    assert expected_extra(1000, window, took) == pytest.approx(target_extra(1000), rel=0.01)


def test_a_storm_within_the_window_sizes_it_from_the_count() -> None:
    """Nine extra connect-backs while a 2 ms window was still open (the early TAKEN came
    after 1 ms): the window grows by 9 / target at once."""
    crowd = Crowd()
    crowd.steer(10, 0.0, 2.0, 1.0)
    assert spread_ms(crowd.size(0.0)) == pytest.approx(2.0 * 9 / target_extra(10))
    assert crowd.known(0.0) == 10  # at least


@pytest.mark.parametrize("workers", [1000, 100])
@pytest.mark.parametrize("took", [1.0, 4.0])
def test_windows_settle_after_the_first_job(workers: int, took: float) -> None:
    counts, firsts = run_jobs(workers, took, 40)
    assert counts[0] == workers  # the first job: every window is 1 ms
    assert statistics.mean(counts[1:4]) <= 1.05  # jobs 2-4
    assert statistics.mean(counts[1:]) <= 1.05
    assert max(counts[1:]) <= 3
    # about took / target after the idle delay: the price of one connect-back per job
    assert statistics.median(firsts[1:]) - IDLE_MS <= 3 * took / target_extra(workers)


def test_a_small_cluster_pays_little_start_time() -> None:
    counts, firsts = run_jobs(2, 2.0, 60)
    assert statistics.median(firsts[1:]) - IDLE_MS <= 8.0
    assert statistics.mean(counts[1:]) <= 1.4


def test_near_the_target_the_window_moves_by_small_steps() -> None:
    crowd = Crowd()
    crowd.steer(1000, 0.0, JITTER_MS, 3.0)
    window = spread_ms(crowd.size(0.0))
    eps = target_extra(1000)
    crowd.steer(1, 0.0, window, 20.0)  # one connect-back: a little narrower
    assert spread_ms(crowd.size(0.0)) == pytest.approx(window * 2 ** (-STEER_GAIN * eps))
    window = spread_ms(crowd.size(0.0))
    crowd.steer(2, 0.0, window, 20.0)  # one extra: wider, by less than double
    assert spread_ms(crowd.size(0.0)) == pytest.approx(
        window * 2 ** (STEER_GAIN * (1 - eps)))
    assert crowd.known(0.0) == 1000  # steering does not change the crowd


def test_one_takens_reach_is_bounded_and_an_honest_one_repairs_it() -> None:
    """A client credential holder's TAKEN (any count, an early TAKEN as late as it likes)
    widens everyone's window at most to spread_ms(CROWD_MAX); the next honest job, whose
    first answer comes far later than such a crowd's would, shrinks it at once."""
    crowd = Crowd()
    crowd.steer(10**9, 0.0, JITTER_MS, 1e9)
    assert crowd.size(0.0) <= CROWD_MAX and crowd.known(0.0) == CROWD_MAX
    # the delay it sized from was bounded: the cap, not 1e9 ms, with count CROWD_MAX
    assert spread_ms(crowd.size(0.0)) <= spread_ms(CROWD_MAX)
    capped = Crowd()
    capped.steer(50, 0.0, JITTER_MS, ELAPSED_MAX_MS)
    huge = Crowd()
    huge.steer(50, 0.0, JITTER_MS, 1e9)
    assert huge.size(0.0) == capped.size(0.0)
    # two real workers: the first answered after a third of the window
    window = spread_ms(crowd.size(1.0))
    crowd.steer(1, 1.0, window, window / 3)
    assert crowd.known(1.0) <= 4
    assert spread_ms(crowd.size(1.0)) <= 0.01 * window


def test_an_honest_late_first_answer_is_not_mistaken() -> None:
    """A first answer within a few times the crowd's mean only steers."""
    crowd = Crowd()
    crowd.steer(1000, 0.0, JITTER_MS, 3.0)
    window = spread_ms(crowd.size(0.0))
    crowd.steer(1, 0.0, window, 4 * window / 1001)
    assert crowd.known(0.0) == 1000
    assert spread_ms(crowd.size(0.0)) == pytest.approx(
        window * 2 ** (-STEER_GAIN * target_extra(1000)))


def idle_worker(keys: Keys) -> tuple[Clock, Worker]:
    """A real Worker with 4 slots on an idle host and a fake clock, drawing mid-window."""
    from rexnet.security.credentials import load_credential

    clock = Clock()
    settings = WorkerSettings(load_credential(Path(keys.worker), "worker"), ("true",), "w",
                              slots=4)
    idle = HostLoad(loadavg=0.0, cpus=2, free_memory=1 << 30)
    return clock, Worker(settings, clock, sample=lambda: idle, jitter=lambda: 0.5)


def test_a_worker_sizes_its_window_from_the_first_storm(keys: Keys) -> None:
    """A real Worker on a fake clock: its connect-back is under way, the early TAKEN
    comes 3 ms after its 1 ms window closed, the final one says 1000 answered."""
    clock, w = idle_worker(keys)
    client = Announcer(keys)
    job, data = client.announce()
    w.datagram(data, "192.0.2.7", 5000)
    pending = w.pending[job]
    assert pending.call is not None
    pending.call.cancel()
    connecting: defer.Deferred[None] = defer.Deferred()
    pending.call, pending.connecting = None, connecting  # its timer fired: TCP under way
    clock.advance((IDLE_MS + 4.0) / 1000)
    w.datagram(client.taken(job, 1, early=True), "192.0.2.7", 5000)
    clock.advance(0.002)  # the final TAKEN's delay does not count
    w.datagram(client.taken(job, 1000), "192.0.2.7", 5000)
    connecting.addErrback(lambda f: f.trap(defer.CancelledError))
    took = 4.0 - JITTER_MS / 1001
    assert w.crowd.size(clock.seconds()) == pytest.approx(
        crowd_for(999 * 1001 / 1000 * took / target_extra(1000)), rel=1e-6)
    job2, data2 = client.announce()
    w.datagram(data2, "192.0.2.7", 5000)
    assert w.pending[job2].spread == pytest.approx(spread_ms(w.crowd.size(clock.seconds())))


def test_an_unanswered_resend_repairs_a_window_widened_by_a_lie() -> None:
    crowd = Crowd()
    crowd.steer(10**6, 0.0, JITTER_MS, 1e9)  # a lying client: as wide as it gets
    window = spread_ms(crowd.size(0.0))
    # announced again 750 ms on: a crowd of CROWD_MAX would have answered by ~96 ms, but
    # not 8 times that late: wait
    assert not crowd.unanswered(0.0, window, 750.0)
    assert crowd.unanswered(0.0, window, 1550.0)  # the next resend: much narrower
    assert crowd.known(0.0) == pytest.approx(window / 1550.0)
    assert spread_ms(crowd.size(0.0)) < window / 10


def test_an_honest_resend_changes_nothing() -> None:
    crowd = Crowd()
    crowd.steer(1000, 0.0, JITTER_MS, 5.0)
    window = spread_ms(crowd.size(0.0))
    for elapsed in (50.0, 150.0, 350.0, 750.0):  # the client's resends
        assert not crowd.unanswered(0.0, window, elapsed)
    assert spread_ms(crowd.size(0.0)) == window


def resend_after(keys: Keys, client_ms: int, worker_s: float) -> tuple[Worker, float, float]:
    """A real Worker on a fake clock, its crowd widened by a lie, answers an announcement;
    the client announces the job again CLIENT_MS later by its own clock (the signed
    timestamp), and the worker reads that WORKER_S seconds after the first.  The delay
    left on its connect-back before and after the resend, in seconds."""
    from rexnet.net.announce import now_ms
    from rexnet.protocol import wire
    clock, w = idle_worker(keys)
    client = Announcer(keys)
    w.crowd.steer(CROWD_MAX, 0.0, JITTER_MS, ELAPSED_MAX_MS)  # a lie taught it before
    job = (99).to_bytes(16, "big")
    first = now_ms() - max(client_ms, 0)

    def announce(seq: int, ts: int) -> bytes:
        ann = wire.Announce(job, seq, ts, 4000, ("192.0.2.7",))
        return wire.encode_datagram(ann, client.cred.app_id, client.cred.key,
                                    client.cred.cert_der)

    w.datagram(announce(0, first), "192.0.2.7", 5000)
    pending = w.pending[job]
    assert pending.call is not None
    before = pending.call.getTime() - clock.seconds()
    assert before > 100.0  # half of a window of minutes
    clock.advance(worker_s)
    w.datagram(announce(4, first + client_ms), "192.0.2.7", 5000)
    assert pending.call is not None and pending.call.active()
    after = pending.call.getTime() - clock.seconds()
    pending.call.cancel()
    return w, before, after


def test_a_worker_narrows_a_waiting_connect_back_when_the_client_announces_again(
        keys: Keys) -> None:
    w, before, after = resend_after(keys, 1600, 1.6)
    assert after < 0.1 * before
    assert w.pending[(99).to_bytes(16, "big")].spread == pytest.approx(
        spread_ms(w.crowd.size(1.6)))


@pytest.mark.parametrize(("client_ms", "worker_s", "why"), [
    (50, 1.6, "a resend sent 50 ms on, read 1.6 s on by a busy worker"),
    (-1000, 1.6, "the client's clock stepped back"),
    (1600, 0.05, "the client says 1.6 s, the worker heard the first 50 ms ago"),
])
def test_a_resend_narrows_only_when_both_clocks_say_it_came_late(
        keys: Keys, client_ms: int, worker_s: float, why: str) -> None:
    w, before, after = resend_after(keys, client_ms, worker_s)
    assert after == pytest.approx(before - worker_s), why  # the same timer, unmoved
    assert w.crowd.size(0.0) == pytest.approx(crowd_for(spread_ms(CROWD_MAX))), why


def test_a_connect_back_promised_without_the_clients_time_takes_it_from_the_first_resend(
        ) -> None:
    """A promise made with no client timestamp (an announcement answered from the
    waitlist): the first resend is judged by the worker's clock alone and sets the
    client's to agree; later ones are judged by both."""
    from types import SimpleNamespace

    from rexnet.worker.connectback import ConnectBacks, Target
    from rexnet.worker.metrics import NO_METRICS
    clock = Clock()
    backs = ConnectBacks(clock, None, NO_METRICS, lambda *a: None,  # type: ignore[arg-type]
                         lambda: 0.5)
    backs.crowd.steer(CROWD_MAX, 0.0, JITTER_MS, ELAPSED_MAX_MS)
    client: Any = SimpleNamespace(cert=b"client")
    job = bytes(16)
    pending = backs.promise(job, client, 0.0, 1.0, Target("192.0.2.7", 4000, "test"))
    assert pending.sent == 0.0 and pending.call is not None
    due = pending.call.getTime()
    assert due > 100.0
    clock.advance(0.01)
    assert backs.resent(job, client, 10_000)  # 10 ms on: not late
    assert pending.sent == pytest.approx(10_000.0 - 10.0)
    clock.advance(1.6)
    assert backs.resent(job, client, 10_050)  # read 1.6 s on, sent 50 ms on
    assert pending.call.getTime() == due  # not narrowed
    assert backs.resent(job, client, 11_610)  # sent 1.61 s on as well
    assert pending.call.getTime() - clock.seconds() < 0.1 * due  # narrowed
    assert pending.sent == 11_610.0
    pending.call.cancel()
