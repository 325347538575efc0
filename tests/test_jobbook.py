"""The worker's JobBook keeps finished jobs for --keep-finished seconds and at most
MAX_FINISHED of them, forgetting the oldest finished first (without a scan of them all
at each job's end: the count is kept as jobs end and are forgotten); running jobs stay."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import pytest
from conftest import Keys
from twisted.internet.task import Clock

from rexnet.security.credentials import load_credential
from rexnet.worker import detached
from rexnet.worker.detached import JobBook


def book(keys: Keys, tmp_path: Path, clock: Clock) -> JobBook:
    worker = load_credential(keys.worker, "worker")
    return JobBook(clock, worker, str(tmp_path), 1 << 20, keep=60.0, wall=lambda: 1000.0)


def test_the_oldest_finished_jobs_are_forgotten_beyond_the_bound_running_ones_kept(
        keys: Keys, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(detached, "MAX_FINISHED", 3)
    clock = Clock()
    jobs = book(keys, tmp_path, clock)
    client = load_credential(keys.client, "client").cert
    for n in range(7):
        jobs.started(f"j{n}", client, "true", cast(Any, None), None)
    for n in (1, 2, 3, 4, 5):  # j0 and j6 still run
        jobs.ended(f"j{n}", 0, None)
    assert list(jobs.jobs) == ["j0", "j3", "j4", "j5", "j6"]
    assert jobs.finished == 3
    clock.advance(60)  # kept long enough: the finished ones go
    assert list(jobs.jobs) == ["j0", "j6"] and jobs.finished == 0
    jobs.ended("j6", 1, None)
    jobs.ended("j0", None, 9)
    assert [(j, b.status) for j, b in jobs.jobs.items()] == [("j0", 137), ("j6", 1)]
    assert jobs.finished == 2
    jobs.stop()
    assert not jobs.jobs and jobs.finished == 0
