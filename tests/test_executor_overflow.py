"""More jobs in flight than the cluster has places (slots and queue): the Executor's jobs
wait for its own channels instead of announcing into a full cluster, and none fails (real
worker on loopback; the unit tests are tests/test_warm_handover.py and
tests/test_client_handover.py)."""

from __future__ import annotations

from cluster import loopback_address, start_worker
from conftest import Keys

import rexnet


def test_an_executor_with_more_jobs_than_places_keeps_its_channels(keys: Keys) -> None:
    addr = f"{loopback_address()}:3010"
    # one slot and one queue place: 2 places for 6 jobs in flight
    worker = start_worker(keys.worker, ["sleep"], addr, "narrow", "--allow-args",
                          "--slots", "1", "--queue", "1", "--no-sandbox")
    said: list[str] = []
    try:
        with rexnet.Executor(keys.client, [addr], 6, log=said.append) as ex:
            done = list(ex.map(["0.05"], [b""] * 30))
    finally:
        worker.stop()
    assert [d.returncode for d in done] == [0] * 30
    fresh = [s for s in said if "to connect back" in s]
    # the first jobs find the worker by announcing; the others, announcing too, get the
    # channels those leave as they end (a job that met a full queue would wait for one
    # rather than announce again): a place frees as its channel comes back
    assert len(fresh) <= 4, said
