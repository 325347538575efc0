"""Slot time used under overload: more concurrent jobs than slots (P11 #4).

Run from the repository (or from bench.py, in the client's namespace of its bed):

    .venv/bin/python benchmarks/slot_fill.py [CLIENTS [SECONDS [QUEUE]]]   # loopback
    .venv/bin/python benchmarks/slot_fill.py --clients KEY TARGET N SECONDS SLOTS
    .venv/bin/python benchmarks/slot_fill.py --executor KEY JOBS WIDTH ARG TARGET...

On loopback it starts a worker (`sleep`, 4 slots, --allow-args; QUEUE is its --queue,
0 for the behaviour before queues) and then:

- N concurrent clients, each one job of `sleep SECONDS`, every one announced at once from
  one process (real ClientJobs on one reactor: no warm channels, every job announces,
  authenticates and waits for its turn as a separate `rexnet exec` would). Slot time used
  is N * SECONDS / (4 slots * the time from the first announcement to the last result);
  the ideal is 100% less the jobs' start and end costs;
- the Executor (warm channels) on two workers of 4 slots each running `true`, with 8, 16
  and 64 jobs in flight: jobs/s should not drop when more jobs are in flight than slots.

Prints a markdown table; `--clients` and `--executor` print one JSON object (for bench.py).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, cast

from twisted.python.failure import Failure

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

SLOTS = 4


def fill(key: str, target: str, clients: int, seconds: float, slots: int) -> dict[str, Any]:
    """Run CLIENTS concurrent one-job clients against TARGET (SLOTS slots running
    `sleep`); the share of slot time used, failures and the time taken."""
    from twisted.internet import defer, reactor

    from rexnet.client.api import run

    out: dict[str, Any] = {}

    starts: list[float] = []

    async def all_jobs() -> None:
        t0 = time.perf_counter()
        jobs = [run(reactor, key, [f"{seconds:g}"], announce=[target], timeout=600.0,
                    say=lambda message: None,
                    on_started=lambda worker, job: starts.append(time.perf_counter()))
                for _ in range(clients)]
        made = time.perf_counter() - t0
        done = await defer.DeferredList(jobs, consumeErrors=True)
        end = time.perf_counter()
        elapsed = end - t0
        failed = [str(cast(Failure, r).value) for ok, r in done if not ok]
        work = (clients - len(failed)) * seconds
        first = min(starts, default=end)
        # the share from the first job's start: the slots' own use, without the one
        # client process's setting up of every job (its key, socket and announcement)
        out.update(clients=clients, seconds=seconds, slots=slots, elapsed=elapsed,
                   failed=len(failed), first_failure=failed[0] if failed else "",
                   used=work / (slots * elapsed), made=made, first_start=first - t0,
                   used_from_first_start=work / (slots * max(end - first, 1e-9)))

    def go() -> None:
        finished = defer.Deferred.fromCoroutine(all_jobs())
        finished.addErrback(lambda f: out.update(error=f.getTraceback()))
        finished.addBoth(lambda _: reactor.stop())  # type: ignore[attr-defined]

    reactor.callWhenRunning(go)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]
    return out


def executor(key: str, jobs: int, width: int, args: list[str], targets: list[str]
             ) -> dict[str, Any]:
    """Jobs per second of the Executor with WIDTH jobs in flight (after a warm-up), each
    job the workers' command with ARGS."""
    import rexnet

    with rexnet.Executor(key, targets, width) as ex:
        list(ex.map(args, [b""] * width))
        t0 = time.perf_counter()
        done = list(ex.map(args, [b""] * jobs))
        rate = jobs / (time.perf_counter() - t0)
    return {"width": width, "jobs": jobs, "rate": rate,
            "failed": sum(d.returncode != 0 for d in done)}


def main() -> None:
    args = sys.argv[1:]
    if args[:1] == ["--clients"]:
        key, target, n, length, slots = args[1:6]
        print(json.dumps(fill(key, target, int(n), float(length), int(slots))))
        return
    if args[:1] == ["--executor"]:
        key, jobs, width, arg, *targets = args[1:]
        print(json.dumps(executor(key, int(jobs), int(width), [arg] if arg else [], targets)))
        return
    import subprocess

    from cluster import loopback_address, start_worker

    from rexnet.security.credentials import keygen

    clients = int(args[0]) if args else 200
    seconds = float(args[1]) if len(args) > 1 else 0.2
    queue = ["--queue", args[2]] if len(args) > 2 else []
    with tempfile.TemporaryDirectory() as tmp:
        _, worker_key, client_key = keygen("fill", Path(tmp))
        addr = f"{loopback_address()}:3010"
        sleeper = start_worker(worker_key, ["sleep"], addr, "sleeper", "--slots", str(SLOTS),
                               "--allow-args", *queue)
        try:
            me = [sys.executable, __file__]
            got = json.loads(subprocess.run(
                [*me, "--clients", str(client_key), addr, str(clients), str(seconds),
                 str(SLOTS)], capture_output=True, text=True, check=True).stdout)
        finally:
            sleeper.stop()
        targets = [f"{loopback_address()}:3010", f"{loopback_address()}:3010"]
        trues = [start_worker(worker_key, ["true"], t, f"t{i}", "--slots", str(SLOTS), *queue)
                 for i, t in enumerate(targets)]
        try:
            rates = [json.loads(subprocess.run(
                [*me, "--executor", str(client_key), "500", str(width), "", *targets],
                capture_output=True, text=True, check=True).stdout) for width in (8, 16, 64)]
        finally:
            for w in trues:
                w.stop()
    print("| what | figure |\n| --- | --- |")
    print(f"| {clients} concurrent {seconds:g} s jobs on {SLOTS} slots: slot time used | "
          f"{got['used']:.0%} ({got['elapsed']:.1f} s, ideal "
          f"{clients * seconds / SLOTS:.1f} s; {got['failed']} failed) |")
    for r in rates:
        print(f"| Executor, `true` on 2x{SLOTS} slots, {r['width']} in flight | "
              f"{r['rate']:.0f} jobs/s ({r['failed']} failed) |")


if __name__ == "__main__":
    main()
