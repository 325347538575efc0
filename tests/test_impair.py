"""The userspace netem's scheduling (tests/impair.py DelayLine), on a fake clock.

That it really delays and drops frames between namespaces is shown in test_netbed.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from impair import DelayLine


def fixed(*draws: float) -> Callable[[], float]:
    values: Iterator[float] = iter(draws)
    return lambda: next(values)


def never() -> float:
    return 1.0


def test_frames_come_out_after_the_delay_in_order() -> None:
    line = DelayLine(0, 50, rng=never)
    assert line.next_due() is None
    assert line.offer(b"a", 10.000) and line.offer(b"b", 10.010) and line.offer(b"c", 10.010)
    assert line.next_due() == pytest.approx(10.050)
    assert line.pop_due(10.049) == []
    assert line.pop_due(10.050) == [b"a"]
    assert line.next_due() == pytest.approx(10.060)
    assert line.pop_due(11.0) == [b"b", b"c"]
    assert line.next_due() is None
    assert line.counters() == {"frames": 3, "lost": 0, "overflow": 0, "delivered": 3,
                               "waiting": 0, "unsent": 0}


def test_zero_delay_delivers_at_once() -> None:
    line = DelayLine(0, 0, rng=never)
    line.offer(b"x", 5.0)
    assert line.pop_due(5.0) == [b"x"]


def test_a_frame_is_lost_when_the_draw_is_below_the_loss() -> None:
    line = DelayLine(10, 0, rng=fixed(0.05, 0.5, 0.0999, 0.1))
    kept = [line.offer(frame, 0.0) for frame in (b"1", b"2", b"3", b"4")]
    assert kept == [False, True, False, True]
    assert line.pop_due(0.0) == [b"2", b"4"]
    assert line.counters()["lost"] == 2


def test_full_loss_and_no_loss() -> None:
    all_lost, none_lost = DelayLine(100, 0), DelayLine(0, 0)
    assert not any(all_lost.offer(b"f", 0.0) for _ in range(100))
    assert all(none_lost.offer(b"f", 0.0) for _ in range(100))


def test_loss_is_near_its_rate() -> None:
    line = DelayLine(10, 0)
    for _ in range(10_000):
        line.offer(b"f", 0.0)
    assert 800 < line.lost < 1200


def test_a_full_queue_drops_new_frames_and_counts_them() -> None:
    line = DelayLine(0, 50, limit=2, rng=never)
    assert [line.offer(f, 0.0) for f in (b"1", b"2", b"3")] == [True, True, False]
    assert line.counters()["overflow"] == 1
    assert line.pop_due(0.05) == [b"1", b"2"]
    assert line.offer(b"4", 0.06)  # room again


@pytest.mark.parametrize("args", [(-1, 0), (101, 0), (0, -5)])
def test_bad_settings_are_refused(args: tuple[float, float]) -> None:
    with pytest.raises(ValueError):
        DelayLine(*args)
    with pytest.raises(ValueError):
        DelayLine(0, 0, limit=0)
