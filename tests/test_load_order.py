"""A client's resend hastens a waiting connect-back but keeps the workers' order by load.

Fake-clock unit tests of the scheduling rule (ConnectBacks.resent): several workers, each
with its own ConnectBacks and Crowd on one Clock, answer one announcement; the client
announces again (resends at 50 ms, 150 ms, ... by its signed clock).  The jitter draws
are chosen against the order, so that only the load can put the less-loaded worker first.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from twisted.internet.task import Clock

from rexnet.worker.connectback import ConnectBacks, Pending, Target
from rexnet.worker.load import (
    CROWD_MAX,
    ELAPSED_MAX_MS,
    JITTER_MS,
    LOAD_MS,
    Crowd,
    spread_ms,
)
from rexnet.worker.metrics import NO_METRICS

JOB = bytes(16)
CLIENT: Any = SimpleNamespace(cert=b"client")
SENT_MS = 1_000_000  # the first announcement's time by the client's clock


def workers(clock: Clock, loads: list[float], draws: list[tuple[float, float]],
            lied: bool = False) -> list[tuple[ConnectBacks, Pending]]:
    """One ConnectBacks per LOADS entry, with its DRAWS (0..1) for the random part of its
    promise and then of a narrowed one, each promising a connect-back for JOB at time 0;
    LIED: a client's TAKEN widened their windows first (as wide as one TAKEN can)."""
    made = []
    for load, draw in zip(loads, draws, strict=True):
        backs = ConnectBacks(clock, None, NO_METRICS, lambda *a: None,  # type: ignore[arg-type]
                             iter([*draw, *[draw[1]] * 8]).__next__)
        if lied:
            backs.crowd.steer(CROWD_MAX, 0.0, JITTER_MS, ELAPSED_MAX_MS)
        pending = backs.promise(JOB, CLIENT, load, 1.0, Target("192.0.2.7", 4000, "test"),
                                sent_ms=SENT_MS)
        made.append((backs, pending))
    return made


def resend(made: list[tuple[ConnectBacks, Pending]], after_ms: int) -> None:
    """The client announces JOB again AFTER_MS later by both clocks; each worker hears it."""
    for backs, _ in made:
        assert backs.resent(JOB, CLIENT, SENT_MS + after_ms)


def due(made: list[tuple[ConnectBacks, Pending]]) -> list[float]:
    """When each worker's connect-back fires (seconds on the clock)."""
    times = []
    for _, pending in made:
        assert pending.call is not None and pending.call.active()
        times.append(pending.call.getTime())
    return times


def test_a_resend_before_the_loaded_crowd_could_answer_keeps_the_order() -> None:
    """The machine's load average gives both workers a delay past the first resend (50 ms):
    the resend says only that the crowd is loaded; the less-loaded worker answers first
    (on main both windows narrowed to ~1 ms from the resend: a coin flip)."""
    clock = Clock()
    made = workers(clock, [1.25, 1.75], [(0.99, 0.99), (0.0, 0.0)])  # 55 ms and 75 ms
    before = due(made)
    clock.advance(0.05)
    resend(made, 50)
    after = due(made)
    assert after == before  # nothing narrowed: the load part is still running
    assert after[0] < after[1]
    assert made[0][0].crowd.size(0.05) == made[1][0].crowd.size(0.05) == 1.0


def test_a_resend_that_narrows_a_wide_window_keeps_the_order_by_load() -> None:
    """A lie widened both windows to minutes; a resend late past their load delays
    narrows them, and of equal draws the less-loaded worker's answers first (on main
    both came at the same moment: the load was dropped)."""
    clock = Clock()
    made = workers(clock, [0.0, 0.25], [(0.5, 0.5), (0.5, 0.5)], lied=True)
    before = due(made)
    assert min(before) > 100.0
    clock.advance(1.6)
    resend(made, 1600)
    after = due(made)
    assert max(after) - 1.6 < 0.1 * min(before)  # hastened
    assert after[0] < after[1]  # ... in load order
    spread = made[0][1].spread
    assert spread == pytest.approx(spread_ms(made[0][0].crowd.size(1.6)))
    assert made[1][1].spread >= spread  # it waited less past its own delay
    assert after[1] - after[0] >= LOAD_MS * 0.25 / 1000


@pytest.mark.parametrize("load", [0.0, 0.5, 1.5, 3.0])
def test_a_narrowed_connect_back_waits_its_load_delay_again(load: float) -> None:
    """As if the announcement came at the resend: its base delay and a narrow draw."""
    clock = Clock()
    [(backs, pending)] = workers(clock, [load], [(0.5, 0.5)], lied=True)
    clock.advance(10.0)
    resend([(backs, pending)], 10_000)
    [when] = due([(backs, pending)])
    assert when - 10.0 == pytest.approx((5.0 + LOAD_MS * load + 0.5 * pending.spread) / 1000)
    assert pending.base == pytest.approx(5.0 + LOAD_MS * load)


def test_a_loaded_worker_judges_lateness_past_its_own_delay() -> None:
    """The same resend narrows an idle worker's wide window but not yet that of a worker
    whose load delay it has not passed by LATE_FACTOR times the crowd's first answer;
    a later resend does."""
    clock = Clock()
    made = workers(clock, [0.0, 20.0], [(0.5, 0.5)] * 2, lied=True)  # 5 ms and 805 ms
    wide = made[1][1].spread
    clock.advance(1.0)
    resend(made, 1000)  # 995 ms past 5 ms, 195 ms past 805 ms: 8 first answers is 768
    assert made[0][1].spread < wide
    assert made[1][1].spread == wide
    lied = Crowd()
    lied.steer(CROWD_MAX, 0.0, JITTER_MS, ELAPSED_MAX_MS)
    assert made[1][0].crowd.size(1.0) == lied.size(1.0)
    clock.advance(1.35)
    resend(made, 2350)
    assert made[1][1].spread < wide


def test_a_queued_answer_under_a_wide_window_is_still_narrowed() -> None:
    """A worker with every slot busy answers after the whole window (minutes, after a lie)
    and its expected wait: a late resend narrows it as before; judged past its load and
    wait, not past that window."""
    clock = Clock()
    backs = ConnectBacks(clock, None, NO_METRICS, lambda *a: None,  # type: ignore[arg-type]
                         lambda: 0.5)
    backs.crowd.steer(CROWD_MAX, 0.0, JITTER_MS, ELAPSED_MAX_MS)
    pending = backs.promise(JOB, CLIENT, 1.0, 1.0, Target("192.0.2.7", 4000, "test"),
                            queued=True, wait=0.5, sent_ms=SENT_MS)
    [before] = due([(backs, pending)])
    assert before > 100.0
    clock.advance(1.6)
    resend([(backs, pending)], 1600)
    [after] = due([(backs, pending)])
    assert after - 1.6 < 0.1 * before
    spread = pending.spread
    # its load delay, no wait left (0.5 s is over), the narrow window, half of it drawn
    assert after - 1.6 == pytest.approx((5.0 + LOAD_MS + 1.5 * spread) / 1000)
