"""More jobs in flight than places (rexnet.client.warm, rexnet.client.trust): a channel a
job leaves goes to a job still looking for a worker; a saturated pool's jobs wait for one
of its channels before they announce; the warm check of a worker's certificate keeps what
it parsed, and still sees a revocation or an expiry at the next job. Unit tests with a fake
clock; tests/test_executor_overflow.py shows it with real workers."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from cryptography import x509
from test_warm import Link, hello
from twisted.internet.task import Clock

from rexnet.client.trust import TrustCache
from rexnet.client.warm import FRESH, SATURATED_WAIT, Offer, WarmPool
from rexnet.security import revocation
from rexnet.security.credentials import keygen, load_credential


def running(pool: WarmPool, worker: str = "a", queued: int = 0, busy: int = 0) -> Link:
    """A channel that runs one of the pool's jobs on WORKER (its report: BUSY of 4 slots
    taken, QUEUED jobs waiting)."""
    link = Link()
    pool.heard(link, hello(worker, 0.1, busy))
    pool.record(link).queued = queued
    pool.started(link)
    return link


def hungry(taken: list[object], answer: bool = True) -> Offer:
    def offer(link: object) -> bool:
        if answer:
            taken.append(link)
        return answer
    return offer


def never() -> None:
    raise AssertionError("the job announced")


def test_a_channel_its_job_left_goes_to_the_first_job_still_looking() -> None:
    pool = WarmPool(Clock(), discount_own=True)
    link = running(pool)
    first: list[object] = []
    second: list[object] = []
    gone = hungry([], answer=False)  # found its worker meanwhile: passed over
    pool.want("key", gone)
    pool.want("key", hungry(first))
    pool.want("key", hungry(second))
    pool.exited(link)
    assert pool.park("key", link)
    assert first == [link] and not second and not pool.parked(link)
    assert pool.record(link).busy and pool.reused == 1  # it runs that job now
    assert len(pool.hungry["key"]) == 1


def test_without_a_job_looking_the_channel_is_parked() -> None:
    pool = WarmPool(Clock(), discount_own=True)
    other: list[object] = []
    pool.want("other key", hungry(other))
    link = running(pool)
    pool.exited(link)
    assert pool.park("key", link) and pool.parked(link) and not other


def test_a_pool_that_does_not_discount_its_own_jobs_hands_nothing_over() -> None:
    pool = WarmPool(Clock())  # the agent's: its jobs are many users' commands
    taken: list[object] = []
    pool.want("key", hungry(taken))
    assert not pool.hungry


def test_rexnet_parallel_hands_over_only_a_worker_with_a_free_slot() -> None:
    """A pool that announces what its channels cannot take (queue_on_warm=False) lets the
    announcement find a free worker rather than queue at a full one."""
    pool = WarmPool(Clock(), discount_own=True, queue_on_warm=False)
    taken: list[object] = []
    pool.want("key", hungry(taken))
    full = running(pool, "a", queued=2, busy=4)
    pool.exited(full)
    assert pool.park("key", full) and not taken and pool.parked(full)
    free = running(pool, "b", busy=1)
    pool.exited(free)
    assert pool.park("key", free) and taken == [free]


def test_a_worker_no_longer_trusted_is_not_handed_over() -> None:
    pool = WarmPool(Clock(), discount_own=True)
    taken: list[object] = []
    pool.want("key", hungry(taken))
    link = running(pool)
    pool.exited(link)
    assert not pool.park("key", link, lambda link: "worker certificate is revoked")
    assert not taken and len(pool.hungry["key"]) == 1  # the job still looks


def test_a_saturated_pool_waits_for_its_own_channels_before_announcing() -> None:
    clock = Clock()
    pool = WarmPool(clock, discount_own=True)
    link = running(pool)
    announced: list[str] = []
    assert not pool.saturated("key")
    pool.full("key")  # a warm START met BUSY: slots and queue full
    assert pool.saturated("key") and not pool.saturated("other key")
    first: list[object] = []
    assert pool.wait("key", hungry(first), lambda: announced.append("late"))
    clock.advance(SATURATED_WAIT - 0.1)
    assert not announced
    clock.advance(0.1)
    assert announced == ["late"]  # a worker unknown to the pool may have room
    second: list[object] = []
    offer = hungry(second)
    assert pool.wait("key", offer, never)
    pool.exited(link)
    assert pool.park("key", link) and first == [link]  # announcing, it still looked
    pool.unwant("key", offer)  # the second job found a worker: its wait is cancelled
    clock.advance(SATURATED_WAIT)
    assert not second and announced == ["late"]


def test_saturation_passes_and_needs_the_pools_own_jobs() -> None:
    clock = Clock()
    pool = WarmPool(clock, discount_own=True)
    pool.full("key")
    assert not pool.saturated("key")  # none of its jobs runs: nothing would come back
    link = running(pool)
    assert pool.saturated("key")
    clock.advance(FRESH + 0.1)
    assert not pool.saturated("key")
    parallel = WarmPool(clock, discount_own=True, queue_on_warm=False)
    running(parallel)
    parallel.full("key")
    assert not parallel.saturated("key")  # rexnet parallel always announces
    assert link


def test_a_job_that_ends_while_waiting_leaves_no_timer_behind() -> None:
    clock = Clock()
    pool = WarmPool(clock, discount_own=True)
    running(pool)
    pool.full("key")
    offer = hungry([])
    assert pool.wait("key", offer, never)
    pool.unwant("key", offer)
    assert not clock.getDelayedCalls() and "key" not in pool.hungry


# -- the warm check of the worker's certificate ------------------------------------------


@pytest.fixture()
def worker_cert(tmp_path: Path) -> x509.Certificate:
    _, worker_key, _ = keygen("trust", tmp_path)
    return load_credential(worker_key, "worker").cert


def test_the_check_sees_a_revocation_at_the_next_job(tmp_path: Path,
                                                     worker_cert: x509.Certificate) -> None:
    now = [time.monotonic()]
    listed = tmp_path / "trust.revoked"
    revoked = revocation.RevokedFile(listed, clock=lambda: now[0], required=False)
    cache = TrustCache()
    cert = worker_cert
    assert cache.problem(cert, revoked) is None
    assert cache.problem(cert, revoked) is None
    listed.write_text(f"{revocation.serial_hex(cert)} worker w1 2026-12-01\n")
    now[0] += revocation.RECHECK + 0.1
    problem = cache.problem(cert, revoked)
    assert problem is not None and "is revoked" in problem


def test_the_check_sees_the_end_of_the_validity_window(worker_cert: x509.Certificate
                                                       ) -> None:
    now = [time.time()]
    cache = TrustCache(clock=lambda: now[0])
    assert cache.problem(worker_cert, None) is None
    now[0] += 3 * 365 * 86400 * 40  # long after any credential keygen makes
    problem = cache.problem(worker_cert, None)
    assert problem is not None and problem.startswith("its certificate expired")


def test_while_another_worker_has_room_a_job_that_announces_is_not_handed_a_channel(
) -> None:
    """Worker b has free slots as the pool counts them: a job that announces will find it
    (and the pool one more channel), so a's channel is parked, not handed to it; a job
    that waits (SATURATED_WAIT) is still handed one where a slot is free; one that would
    queue at a full worker rather announces at once, and so does a job that would take
    a channel to a full worker's queue."""
    clock = Clock()
    pool = WarmPool(clock, discount_own=True)
    link = running(pool, "a")
    running(pool, "b")
    announcing: list[object] = []
    pool.want("key", hungry(announcing))
    pool.exited(link)
    assert pool.park("key", link) and pool.parked(link) and not announcing
    assert pool.take("key") is link
    pool.full("key")  # a's queue took one of the pool's jobs: it waits, not announces
    waiting: list[object] = []
    assert pool.wait("key", hungry(waiting), never)
    pool.exited(link)
    assert pool.park("key", link) and waiting == [link]  # a has a free slot
    crowd = [running(pool, "a") for _ in range(4)]  # a: 5 of the pool's jobs, 4 slots
    announced: list[str] = []
    assert pool.wait("key", hungry([]), lambda: announced.append("now"))
    pool.exited(crowd[0])
    assert pool.park("key", crowd[0]) and pool.parked(crowd[0])
    clock.advance(0)
    assert announced == ["now"]
    assert pool.take("key") is None  # a is full (its queue would take it), b is not
