"""Bounded (rexnet.client.bounded): the pump of the Executor and rexnet
parallel, driven with plain Deferreds."""

from __future__ import annotations

import sys

import pytest
from twisted.internet import defer
from twisted.python.failure import Failure

from rexnet.client.bounded import Bounded


def test_at_most_limit_jobs_run_and_they_start_in_order() -> None:
    idle: list[int] = []
    bounded = Bounded(2, on_idle=lambda: idle.append(bounded.running))
    pending: dict[int, defer.Deferred[int]] = {}
    started: list[int] = []
    results: list[object] = []

    def job(n: int) -> defer.Deferred[int]:
        started.append(n)
        pending[n] = defer.Deferred()
        return pending[n]

    for n in range(5):
        bounded.run(job, n).addBoth(results.append)
    assert started == [0, 1] and (bounded.running, bounded.waiting) == (2, 3)
    pending[1].callback(10)
    assert started == [0, 1, 2] and results == [10]
    pending[0].errback(Failure(ValueError("no")))
    assert started == [0, 1, 2, 3] and isinstance(results[1], Failure)
    for n in (2, 3):
        pending[n].callback(n)
    assert started == [0, 1, 2, 3, 4] and not idle
    pending[4].callback(4)
    assert idle == [0] and (bounded.running, bounded.waiting) == (0, 0)
    assert results[2:] == [2, 3, 4]


def test_jobs_that_end_at_once_do_not_recurse() -> None:
    """Thousands of jobs failing as they start (no route to the announce target) run one
    after another, not one stack frame deeper each."""
    bounded = Bounded(1)
    gate: defer.Deferred[None] = defer.Deferred()
    failed: list[Failure] = []
    bounded.run(lambda: gate)
    count = sys.getrecursionlimit() * 3
    for _ in range(count):
        bounded.run(lambda: defer.fail(OSError("no route"))).addErrback(failed.append)
    gate.callback(None)  # frees the slot: every waiting job starts and fails
    assert len(failed) == count and bounded.running == 0


def test_a_job_that_raises_is_a_failure_and_frees_its_slot() -> None:
    bounded = Bounded(1)

    def boom() -> defer.Deferred[None]:
        raise RuntimeError("boom")

    got: list[Failure] = []
    bounded.run(boom).addErrback(got.append)
    assert got[0].check(RuntimeError) and bounded.running == 0
    assert bounded.run(lambda: defer.succeed(3)).result == 3


def test_a_limit_below_one_is_refused() -> None:
    with pytest.raises(ValueError):
        Bounded(0)
