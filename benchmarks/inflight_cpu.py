"""Jobs/s and CPU per job at several numbers of jobs in flight (P11 item 4): two workers
on loopback (`sh -c`, --allow-args, 8 slots each, as make bench's bed), one Executor,
each job `sh -c true`; the widths alternated round by round.

    .venv/bin/python benchmarks/inflight_cpu.py [JOBS [ROUNDS [WIDTH...]]]

Each Executor is fresh and warmed up with WIDTH jobs (as slot_fill.py --executor, which
bench.py runs). Prints one line per run: width, jobs/s, the client's CPU ms per job (this
process), the workers' and everything below them (worker_cpu.breakdown), and what the
workers logged in the timed part: connect-backs, jobs started on fresh channels, jobs
queued; then the medians by width.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from cluster import Proc, loopback_address, worker_argv  # noqa: E402
from worker_cpu import breakdown  # noqa: E402

import rexnet  # noqa: E402
from rexnet.security.credentials import keygen  # noqa: E402


def below(pids: list[int]) -> tuple[float, float]:
    """CPU seconds so far: the worker processes' own, and theirs with all below them."""
    parts = [breakdown(pid) for pid in pids]
    return (sum(sum(p["worker"]) for p in parts),
            sum(sum(sum(v) for v in p.values()) for p in parts))


def main() -> None:
    args = sys.argv[1:]
    jobs = int(args.pop(0)) if args else 1000
    rounds = int(args.pop(0)) if args else 3
    widths = [int(a) for a in args] or [8, 16, 64]
    results: dict[int, list[tuple[float, float, float, float]]] = {w: [] for w in widths}
    with tempfile.TemporaryDirectory() as tmp:
        _, worker_key, client_key = keygen("cpu", Path(tmp))
        host = loopback_address()
        addrs = [f"{host}:{3010 + i}" for i in range(2)]
        workers = [Proc(worker_argv(worker_key, ["sh", "-c"], a, f"w{i}", "--slots", "8",
                                    "--allow-args")) for i, a in enumerate(addrs)]
        try:
            for w in workers:
                w.wait_for("listening on|serves cpu")
            pids = [w.pid for w in workers]
            for r in range(rounds):
                order = widths if r % 2 == 0 else widths[::-1]
                for width in order:
                    with rexnet.Executor(client_key, addrs, width) as ex:
                        list(ex.map(["true"], [b""] * width))
                        marks = [len(w.output) for w in workers]
                        me0, b0 = os.times(), below(pids)
                        t0 = time.perf_counter()
                        done = list(ex.map(["true"], [b""] * jobs))
                        elapsed = time.perf_counter() - t0
                        me1, b1 = os.times(), below(pids)
                        log = "".join(w.output[m:] for w, m in zip(workers, marks, strict=True))
                    assert all(d.returncode == 0 for d in done)
                    client = (me1.user + me1.system - me0.user - me0.system) * 1000 / jobs
                    own, work = ((b - a) * 1000 / jobs for a, b in zip(b0, b1, strict=True))
                    results[width].append((jobs / elapsed, client, own, work))
                    fresh = sum(" started for " in line and "warm channel" not in line
                                for line in log.splitlines())
                    print(f"width {width}: {jobs / elapsed:.0f} jobs/s, client "
                          f"{client:.3f} ms/job, workers {own:.3f}, workers and below {work:.3f}"
                          f"; connect-backs {log.count('connecting back for job')}, fresh "
                          f"channels' jobs {fresh}, queued {log.count('in the queue')}",
                          flush=True)
        finally:
            for w in workers:
                w.stop()
    for width, runs in results.items():
        rate, client, own, work = (statistics.median(x) for x in zip(*runs, strict=True))
        print(f"median width {width}: {rate:.0f} jobs/s, client {client:.3f}, workers "
              f"{own:.3f}, workers and below {work:.3f} ms/job")


if __name__ == "__main__":
    main()
