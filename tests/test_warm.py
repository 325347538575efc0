"""The warm pool's choice (unit tests with a fake clock; tests/test_agent.py shows it end to
end with real workers): reuse a channel only while its worker is still the best choice; and a
worker that is full after all answers a warm START with BUSY (real worker)."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass

from cluster import exec_argv, loopback_address, start_worker
from conftest import Keys
from hypothesis import example, given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock

import rexnet
from rexnet.client.warm import FRESH, IDLE, WarmPool
from rexnet.protocol import wire


@dataclass(eq=False)
class Link:
    """What the pool needs of a channel: to see whether it is closed, and to close it."""

    closed: bool = False

    def close(self) -> None:
        self.closed = True


def hello(worker: str, load: float, running: int = 0, slots: int = 4) -> wire.Hello:
    return wire.Hello(worker, "0", load, 0.0, slots, running)


def won(pool: WarmPool, worker: str, load: float, running: int = 0) -> Link:
    """A channel whose worker just won an announcement, ran one job and reported again."""
    link = Link()
    pool.heard(link, hello(worker, load, running))
    pool.started(link)
    pool.exited(link)
    assert pool.park("key", link)
    return link


def test_the_least_loaded_fresh_channel_of_the_key_is_taken() -> None:
    clock = Clock()
    pool = WarmPool(clock)
    busy = won(pool, "a", 0.5)
    idle = won(pool, "b", 0.1)
    assert pool.take("other") is None
    assert pool.take("key") is idle and not pool.parked(idle)
    assert pool.take("key") is busy
    assert pool.take("key") is None


def test_a_stale_report_is_not_trusted() -> None:
    clock = Clock()
    pool = WarmPool(clock)
    link = won(pool, "a", 0.1)
    clock.advance(FRESH + 0.1)
    assert pool.take("key") is None
    pool.heard(link, hello("a", 0.1))  # the worker's next HELLO
    assert pool.take("key") is link


def test_a_worker_loaded_since_it_won_is_passed_over() -> None:
    clock = Clock()
    pool = WarmPool(clock)
    link = won(pool, "a", 0.1)
    pool.heard(link, hello("a", 0.35, running=1))  # another client's job runs there now
    assert pool.take("key") is None
    pool.heard(link, hello("a", 0.1 + pool.margin))  # or its host got busier
    assert pool.take("key") is None
    pool.heard(link, hello("a", 0.3, running=0))  # a little busier, nothing else: still best
    assert pool.take("key") is link


def test_a_full_worker_is_passed_over() -> None:
    clock = Clock()
    pool = WarmPool(clock, margin=10)
    won(pool, "a", 0.1, running=4)  # all 4 slots busy with other clients' jobs
    assert pool.records and pool.take("key") is None


def test_an_executor_discounts_its_own_jobs() -> None:
    clock = Clock()
    pool = WarmPool(clock, discount_own=True)
    mine = [Link() for _ in range(3)]
    for link in mine:
        pool.heard(link, hello("a", 0.1))
        pool.started(link)
    done = mine[0]
    pool.exited(done)
    pool.heard(done, hello("a", 0.6, running=2))  # its report counts our two other jobs
    assert pool.record(done).own_at_hello == 2
    assert pool.park("key", done)
    assert pool.take("key") is done
    plain = WarmPool(clock)  # without the discount, the same report means "busier"
    other = Link()
    plain.heard(other, hello("a", 0.1))
    plain.started(other)
    plain.heard(other, hello("a", 0.6, running=2))
    plain.exited(other)
    assert plain.park("key", other)
    assert plain.take("key") is None


def test_an_executor_counts_the_slots_its_own_jobs_freed_since_the_report() -> None:
    """An idle channel's worker reported every slot busy with this client's jobs; one of
    them ended since: a slot is free, and the channel is taken (rather than the job queued
    at a worker that has a free slot, or announced)."""
    clock = Clock()
    pool = WarmPool(clock, discount_own=True, queue_on_warm=False)
    idle, *runs = [Link() for _ in range(3)]
    for link in (idle, *runs):
        pool.heard(link, hello("a", 0.1, slots=2))
    for link in runs:
        pool.started(link)
    pool.heard(idle, hello("a", 1.1, running=2, slots=2))  # both slots ours
    assert pool.park("key", idle)
    assert pool.take("key") is None  # full: both our jobs run
    pool.exited(runs[0])
    pool.record(runs[0]).busy = False  # its job ended (its channel is being parked)
    assert pool.take("key") is idle


def test_a_fresh_channel_never_counts_fewer_than_no_other_clients_jobs() -> None:
    """A fresh channel's worker reported no job; one of ours started there on another
    channel before this one's job: other clients' jobs are 0 then, not -1, and a later
    report of our own jobs alone keeps the channel usable."""
    clock = Clock()
    pool = WarmPool(clock, discount_own=True)
    fresh, other = Link(), Link()
    pool.heard(fresh, hello("a", 0.1))
    pool.heard(other, hello("a", 0.1))
    pool.started(other)  # ours, on another channel, first
    pool.started(fresh)
    assert pool.record(fresh).won_others == 0
    pool.exited(fresh)
    pool.heard(fresh, hello("a", 0.35, running=1))  # the report: our other job only
    assert pool.park("key", fresh)
    assert pool.take("key") is fresh


def test_idle_channels_are_capped_per_worker_and_closed_when_idle_too_long() -> None:
    clock = Clock()
    pool = WarmPool(clock, per_worker=2)
    first, second = won(pool, "a", 0.1), won(pool, "a", 0.1)
    third = Link()
    pool.heard(third, hello("a", 0.1))
    assert not pool.park("key", third)
    clock.advance(IDLE + 1)
    assert first.closed and second.closed and not pool.idle


def test_a_lost_channel_leaves_the_pool() -> None:
    clock = Clock()
    pool = WarmPool(clock)
    link = won(pool, "a", 0.1)
    pool.lost(link)
    assert pool.take("key") is None and not clock.getDelayedCalls() and not pool.records


def test_the_pool_keeps_its_own_record_and_never_writes_the_channel() -> None:
    clock = Clock()
    pool = WarmPool(clock)
    link = won(pool, "a", 0.2, running=1)
    record = pool.record(link)
    assert (record.worker, record.load, record.running, record.jobs) == ("a", 0.2, 1, 1)
    assert (record.won_load, record.won_others) == (0.2, 1)
    assert vars(link) == {"closed": False}


def test_a_full_worker_answers_a_warm_start_with_busy_and_the_job_is_announced(
        keys: Keys) -> None:
    addr = f"{loopback_address()}:3010"
    worker = start_worker(keys.worker, ["sh", "-c"], addr, "single", "--allow-args",
                          "--slots", "1", "--queue", "0")  # (with a queue: test_queue)
    said: list[str] = []
    try:
        with rexnet.Executor(keys.client, [addr], 1, log=said.append) as ex:
            pool = ex._pool
            assert ex.submit(["echo one"]).result().stdout == b"one\n"
            blocker = subprocess.Popen(
                exec_argv(keys.client, [addr], "--no-agent", "--", "sleep 2 # blocker"),
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            worker.wait_for(r"started for client .*blocker")
            # as if the pool had not heard yet that the worker is full (a race of < 1 s)
            pool.usable = lambda warm, now: True  # type: ignore[method-assign]
            done = ex.submit(["echo two"]).result()
            blocker.wait(10)
        assert done.stdout == b"two\n" and done.returncode == 0
        assert any("has no free slot: announcing the job" in s for s in said), said
        worker.wait_for(r"no free slot for the next job on a warm channel")
    finally:
        worker.stop()


def counted(pool: WarmPool) -> tuple[dict[str, int], dict[str, int], dict[object, set[int]]]:
    """The pool's counts and idle index as its records say they should be."""
    running: dict[str, int] = {}
    idle: dict[str, int] = {}
    by_key: dict[object, set[int]] = {}
    for w in pool.records.values():
        if w.busy and not w.exited:
            running[w.worker] = running.get(w.worker, 0) + 1
        if w.idle:
            idle[w.worker] = idle.get(w.worker, 0) + 1
            by_key.setdefault(w.key, set()).add(id(w))
    return running, idle, by_key


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["heard", "started", "exited", "park", "take",
                                           "lost", "expire", "unbusy"]),
                          st.integers(0, 2), st.sampled_from(["a", "b"]),
                          st.sampled_from(["k1", "k2"])), max_size=60),
       st.booleans())
@example([("heard", 0, "a", "k1"), ("started", 0, "a", "k1"), ("lost", 0, "a", "k1")], True)
@example([("heard", 0, "a", "k1"), ("started", 0, "a", "k1"), ("exited", 0, "a", "k1"),
          ("park", 0, "a", "k1"), ("heard", 0, "b", "k1"), ("expire", 0, "a", "k1"),
          ("expire", 0, "a", "k1")], False)
def test_the_pools_counts_follow_its_records(steps: list[tuple[str, int, str, str]],
                                             discount_own: bool) -> None:
    """Whatever happens to its channels (a worker renamed by a HELLO too), the pool's
    per-worker counts and its idle channels by key are what its records say."""
    clock = Clock()
    pool = WarmPool(clock, per_worker=2, discount_own=discount_own)
    links = [Link() for _ in range(3)]
    for what, n, worker, key in steps:
        link = links[n]
        if what == "heard":
            pool.heard(link, hello(worker, 0.1 * n, running=n % 3))
        elif what == "started":
            pool.started(link)
        elif what == "exited":
            pool.exited(link)
        elif what == "park" and not pool.parked(link):
            pool.park(key, link)
        elif what == "take":
            pool.take(key)
        elif what == "lost":
            pool.lost(link)
        elif what == "expire":
            clock.advance(IDLE / 2)
        elif what == "unbusy" and link in pool.records:
            pool.record(link).busy = False
        running, idle, by_key = counted(pool)
        assert dict(pool._running) == running
        assert dict(pool._idle_of) == idle
        assert {k: {id(w) for w in v.values()} for k, v in pool._idle_by_key.items()} == by_key


def test_an_executor_does_not_queue_at_a_full_worker_while_another_has_a_free_slot() -> None:
    """Worker a runs two of the pool's jobs in its two slots and queues a third; one of
    them ends (its channel is parked) and a's report counts the two that run. The slot
    it freed went to the queued job: a is full, and the next job goes to b, whose slot
    is free (then, b full too, to a's queue), although a's host is the less loaded: the
    pool counts no more of its jobs in a report than the report says run."""
    clock = Clock()
    pool = WarmPool(clock, discount_own=True)
    at_a = [Link() for _ in range(3)]
    for link in at_a:
        pool.heard(link, hello("a", 0.1, slots=2))
        pool.record(link).update(busy=True, exited=False)  # taken: START sent
    to_b = Link()
    pool.heard(to_b, hello("b", 0.3, slots=1))
    pool.started(to_b)
    pool.exited(to_b)
    assert pool.park("key", to_b)
    done = at_a[0]
    pool.exited(done)
    pool.heard(done, hello("a", 1.1, running=2, slots=2))  # ours: the queued one started
    assert pool.record(done).own_at_hello == 2
    assert pool.park("key", done)
    assert pool.taken(pool.record(done)) == 2
    assert pool.take("key") is to_b
    assert pool.take("key") is done  # b is full now too: the job queues at a

def test_an_executor_spreads_its_jobs_over_the_free_slots() -> None:
    """Two workers with free slots: the one with the smaller share of its slots taken by
    the pool's jobs gets the next, whatever the order the pool met them in."""
    clock = Clock()
    pool = WarmPool(clock, discount_own=True)
    first = won(pool, "a", 0.1)
    second = won(pool, "b", 0.1)
    busy = Link()
    pool.heard(busy, hello("a", 0.1))
    pool.started(busy)
    assert pool.take("key") is second
    assert pool.take("key") is first
