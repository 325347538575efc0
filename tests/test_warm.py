"""The warm pool's choice (unit tests with a fake clock; tests/test_agent.py shows it end to
end with real workers): reuse a channel only while its worker is still the best choice; and a
worker that is full after all answers a warm START with BUSY (real worker)."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass

from cluster import exec_argv, loopback_address, start_worker
from conftest import Keys
from twisted.internet.task import Clock

import rexnet
from rexnet.client.warm import FRESH, IDLE, WarmPool
from rexnet.protocol import wire


@dataclass(eq=False)
class Link:
    """The parts of a ClientChannel the pool reads and writes."""

    hello: wire.Hello | None
    heard_at: float = 0.0
    won_load: float = 0.0
    won_others: int = 0
    own_at_hello: int = 0
    jobs: int = 0
    exited: bool = False
    closed: bool = False
    parked: object = None

    def close(self) -> None:
        self.closed = True


def hello(worker: str, load: float, running: int = 0, slots: int = 4) -> wire.Hello:
    return wire.Hello(worker, "0", load, 0.0, slots, running)


def won(pool: WarmPool, clock: Clock, worker: str, load: float, running: int = 0) -> Link:
    """A channel whose worker just won an announcement, ran one job and reported again."""
    link = Link(hello(worker, load, running), heard_at=clock.seconds())
    pool.started(link)  # type: ignore[arg-type]
    link.exited = True
    assert pool.park("key", link)  # type: ignore[arg-type]
    return link


def test_the_least_loaded_fresh_channel_of_the_key_is_taken() -> None:
    clock = Clock()
    pool = WarmPool(clock)
    busy = won(pool, clock, "a", 0.5)
    idle = won(pool, clock, "b", 0.1)
    assert pool.take("other") is None
    assert pool.take("key") is idle and idle.parked is None
    assert pool.take("key") is busy
    assert pool.take("key") is None


def test_a_stale_report_is_not_trusted() -> None:
    clock = Clock()
    pool = WarmPool(clock)
    link = won(pool, clock, "a", 0.1)
    clock.advance(FRESH + 0.1)
    assert pool.take("key") is None
    link.heard_at = clock.seconds()  # the worker's next HELLO
    assert pool.take("key") is link


def test_a_worker_loaded_since_it_won_is_passed_over() -> None:
    clock = Clock()
    pool = WarmPool(clock)
    link = won(pool, clock, "a", 0.1)
    link.hello = hello("a", 0.35, running=1)  # another client's job runs there now
    assert pool.take("key") is None
    link.hello = hello("a", 0.1 + pool.margin)  # or its host got busier
    assert pool.take("key") is None
    link.hello = hello("a", 0.3, running=0)  # a little busier, nothing else: still best
    assert pool.take("key") is link


def test_a_full_worker_is_passed_over() -> None:
    clock = Clock()
    pool = WarmPool(clock, margin=10)
    link = won(pool, clock, "a", 0.1, running=4)
    link.won_others = 4
    assert pool.take("key") is None


def test_an_executor_discounts_its_own_jobs() -> None:
    clock = Clock()
    pool = WarmPool(clock, discount_own=True)
    mine = [Link(hello("a", 0.1), heard_at=0.0) for _ in range(3)]
    for link in mine:
        pool.started(link)  # type: ignore[arg-type]
    done = mine[0]
    done.exited = True
    done.hello = hello("a", 0.6, running=2)  # its report counts our two other jobs
    pool.heard(done)  # type: ignore[arg-type]
    assert done.own_at_hello == 2
    assert pool.park("key", done)  # type: ignore[arg-type]
    assert pool.take("key") is done
    plain = WarmPool(clock)  # without the discount, the same report means "busier"
    other = Link(hello("a", 0.1))
    plain.started(other)  # type: ignore[arg-type]
    other.hello, other.exited = hello("a", 0.6, running=2), True
    assert plain.park("key", other)  # type: ignore[arg-type]
    assert plain.take("key") is None


def test_idle_channels_are_capped_per_worker_and_closed_when_idle_too_long() -> None:
    clock = Clock()
    pool = WarmPool(clock, per_worker=2)
    first, second = won(pool, clock, "a", 0.1), won(pool, clock, "a", 0.1)
    third = Link(hello("a", 0.1), heard_at=clock.seconds())
    assert not pool.park("key", third)  # type: ignore[arg-type]
    clock.advance(IDLE + 1)
    assert first.closed and second.closed and not pool.idle


def test_a_lost_channel_leaves_the_pool() -> None:
    clock = Clock()
    pool = WarmPool(clock)
    link = won(pool, clock, "a", 0.1)
    pool.lost(link)  # type: ignore[arg-type]
    assert pool.take("key") is None and not clock.getDelayedCalls()


def test_a_full_worker_answers_a_warm_start_with_busy_and_the_job_is_announced(
        keys: Keys) -> None:
    addr = f"{loopback_address()}:3010"
    worker = start_worker(keys.worker, ["sh", "-c"], addr, "single", "--allow-args",
                          "--slots", "1")
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
            pool.usable = lambda channel, now: True  # type: ignore[method-assign]
            done = ex.submit(["echo two"]).result()
            blocker.wait(10)
        assert done.stdout == b"two\n" and done.returncode == 0
        assert any("has no free slot: announcing the job" in s for s in said), said
        worker.wait_for(r"no free slot for the next job on a warm channel")
    finally:
        worker.stop()
