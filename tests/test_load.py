"""The load figure and the connect-back delay (rexnet.worker.load).

An idle worker answers within a couple of milliseconds; each unit of load per CPU adds
LOAD_MS; a worker of speed S waits 1/S as long; jitter adds at most JITTER_MS.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rexnet.worker.load import (
    IDLE_MS,
    JITTER_MS,
    LOAD_MS,
    HostLoad,
    connect_back_delay,
    load_figure,
)


def no_jitter() -> float:
    return 0.0


def max_jitter() -> float:
    return 1.0


def host(loadavg: float = 0.0, cpus: int = 4) -> HostLoad:
    return HostLoad(loadavg=loadavg, cpus=cpus, free_memory=1 << 30)


loads = st.floats(0, 1000, allow_nan=False)
speeds = st.floats(0.01, 1000)
jitters = st.floats(0, 1, exclude_max=True)


# -- load_figure ----------------------------------------------------------------------


def test_idle_host_has_no_load() -> None:
    assert load_figure(host(0.0), busy=0, slots=4) == 0.0


def test_load_is_run_queue_per_cpu_plus_busy_share_of_slots() -> None:
    assert load_figure(host(2.0, cpus=4), busy=1, slots=4) == pytest.approx(0.75)
    assert load_figure(host(8.0, cpus=8), busy=0, slots=2) == pytest.approx(1.0)
    assert load_figure(host(0.0), busy=2, slots=2) == pytest.approx(1.0)


def test_load_figure_tolerates_odd_host_figures() -> None:
    assert load_figure(host(-3.0), busy=0, slots=4) == 0.0
    assert load_figure(host(2.0, cpus=0), busy=0, slots=4) == pytest.approx(2.0)
    assert load_figure(host(0.0), busy=1, slots=0) == pytest.approx(1.0)


@given(st.floats(0, 100), st.floats(0, 100), st.integers(1, 256), st.integers(0, 64),
       st.integers(1, 64))
def test_load_figure_grows_with_run_queue(a: float, b: float, cpus: int, busy: int,
                                          slots: int) -> None:
    low, high = sorted((a, b))
    assert (load_figure(host(low, cpus), busy, slots)
            <= load_figure(host(high, cpus), busy, slots))


@given(st.floats(0, 100), st.integers(1, 256), st.integers(0, 64), st.integers(0, 64),
       st.integers(1, 64))
def test_load_figure_grows_with_busy_slots(loadavg: float, cpus: int, a: int, b: int,
                                           slots: int) -> None:
    low, high = sorted((a, b))
    assert (load_figure(host(loadavg, cpus), low, slots)
            <= load_figure(host(loadavg, cpus), high, slots))


@given(st.floats(0, 100), st.integers(1, 256), st.integers(1, 256), st.integers(0, 64),
       st.integers(1, 64))
def test_load_figure_shrinks_with_more_cpus(loadavg: float, a: int, b: int, busy: int,
                                            slots: int) -> None:
    few, many = sorted((a, b))
    assert (load_figure(host(loadavg, many), busy, slots)
            <= load_figure(host(loadavg, few), busy, slots))


# -- connect_back_delay ---------------------------------------------------------------


def test_idle_worker_answers_within_a_couple_of_milliseconds() -> None:
    assert connect_back_delay(0.0, 1.0, no_jitter) == pytest.approx(IDLE_MS / 1000)
    assert connect_back_delay(0.0, 1.0, max_jitter) == pytest.approx((IDLE_MS + JITTER_MS) / 1000)
    assert 0.0005 <= connect_back_delay(0.0, 1.0, max_jitter) <= 0.010


def test_each_unit_of_load_adds_load_ms() -> None:
    idle = connect_back_delay(0.0, 1.0, no_jitter)
    assert connect_back_delay(1.0, 1.0, no_jitter) - idle == pytest.approx(LOAD_MS / 1000)
    assert connect_back_delay(2.5, 1.0, no_jitter) - idle == pytest.approx(2.5 * LOAD_MS / 1000)
    # Far above network jitter (well under a millisecond on a LAN), unlike cexec's 0.1 ms:
    # one busy CPU out of one answers at least 10 ms later.
    one_cpu_busy = load_figure(host(1.0, cpus=1), busy=0, slots=4)
    assert connect_back_delay(one_cpu_busy, 1.0, no_jitter) - idle >= 0.010


def test_negative_load_counts_as_idle() -> None:
    assert connect_back_delay(-5.0, 1.0, no_jitter) == connect_back_delay(0.0, 1.0, no_jitter)


@given(loads, speeds)
def test_speed_divides_the_delay(load: float, speed: float) -> None:
    base = connect_back_delay(load, 1.0, no_jitter)
    assert connect_back_delay(load, speed, no_jitter) == pytest.approx(base / speed)


def test_twice_as_fast_answers_in_half_the_time() -> None:
    slow = connect_back_delay(0.8, 1.0, no_jitter)
    assert connect_back_delay(0.8, 2.0, no_jitter) == pytest.approx(slow / 2)


@given(loads, speeds, jitters)
def test_jitter_adds_at_most_jitter_ms(load: float, speed: float, jitter: float) -> None:
    base = connect_back_delay(load, speed, no_jitter)
    delay = connect_back_delay(load, speed, lambda: jitter)
    assert base <= delay <= base + JITTER_MS / 1000 + 1e-12


def test_default_jitter_is_bounded() -> None:
    base = connect_back_delay(0.3, 1.5, no_jitter)
    for _ in range(200):
        assert base <= connect_back_delay(0.3, 1.5) < base + JITTER_MS / 1000


@given(loads, loads, speeds, jitters)
def test_delay_grows_with_load(a: float, b: float, speed: float, jitter: float) -> None:
    low, high = sorted((a, b))
    assert (connect_back_delay(low, speed, lambda: jitter)
            <= connect_back_delay(high, speed, lambda: jitter))


@given(loads, speeds, speeds, jitters)
def test_delay_shrinks_with_speed(load: float, a: float, b: float, jitter: float) -> None:
    slow, fast = sorted((a, b))
    assert (connect_back_delay(load, fast, lambda: jitter)
            <= connect_back_delay(load, slow, lambda: jitter))


@given(loads, loads, speeds)
def test_more_loaded_worker_answers_later_despite_jitter(a: float, b: float,
                                                         speed: float) -> None:
    """A load difference worth more than the jitter always orders the answers."""
    low, high = sorted((a, b))
    if (high - low) * LOAD_MS / speed > JITTER_MS + 1e-6:
        assert (connect_back_delay(low, speed, max_jitter)
                < connect_back_delay(high, speed, no_jitter))
