"""Trivial jobs per second across two workers on loopback: the Executor (warm channels) and
`rexnet exec` through the agent, next to the same jobs as local processes in the same run.

Run from the repository:

    .venv/bin/python benchmarks/jobs_per_second.py [JOBS] [MAX_JOBS]

Starts two workers (`true`, 32 slots each) on 127.x addresses and prints:
- Executor: JOBS jobs with MAX_JOBS (default 16) at once, warm channels (the first jobs
  announce; later ones reuse authenticated channels while their workers stay the best);
- the same with a fresh channel per job (announce, TLS handshake) for comparison;
- `rexnet exec` through the agent, one after another (warm) and with --no-agent (cold);
- the peer: `true` as a local subprocess (fork/exec of the same trivial job), MAX_JOBS at
  once from a thread pool - the ceiling of "a trivial job" on this machine.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import psutil  # noqa: E402
from cluster import REXNET, Proc, exec_argv, loopback_address, start_worker  # noqa: E402
from start_latency import timed  # noqa: E402

import rexnet  # noqa: E402
from rexnet.security.credentials import keygen  # noqa: E402


def cpu_seconds(pids: list[int]) -> float:
    """User+system CPU of these processes and their reaped children (the workers' jobs),
    with their sandbox helpers' (which reap the jobs' inits)."""
    total = 0.0
    for pid in pids:
        process = psutil.Process(pid)
        for p in [process, *(c for c in process.children()
                             if "rexnet.worker.sandboxd" in " ".join(c.cmdline()))]:
            t = p.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
    return total


def client_cpu_seconds(readers: list[threading.Thread]) -> float:
    """User+system CPU of this process less its READERS' (the threads that read the
    workers' output here: the harness's work, one log line per job, not the client's)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = cpu_seconds([os.getpid()])
    for thread in readers:
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/self/task/{thread.native_id}/stat").read_text()
            fields = stat.rsplit(")", 1)[1].split()
            total -= (int(fields[11]) + int(fields[12])) / tick
    return total


def executor_rate(key: Path, targets: list[str], jobs: int, max_jobs: int, warm: bool,
                  workers: list[Proc]) -> tuple[float, dict[str, int], int, float, float]:
    with rexnet.Executor(key, targets, max_jobs) as ex:
        pool = ex._pool
        if not warm:  # a pool that never hands out a channel: every job announces
            pool.take = lambda key, distrust=None: None  # type: ignore[method-assign]
            pool.want = lambda key, offer: None  # type: ignore[method-assign]
            pool.wait = lambda key, offer, announce: False  # type: ignore[method-assign]
        list(ex.map([], [b""] * max_jobs))  # warm up (connections, imports)
        pids, readers = [w.pid for w in workers], [w._reader for w in workers]
        me, others = client_cpu_seconds(readers), cpu_seconds(pids)
        t0 = time.perf_counter()
        done = list(ex.map([], [b""] * jobs))
        elapsed = time.perf_counter() - t0
        me, others = client_cpu_seconds(readers) - me, cpu_seconds(pids) - others
        assert all(d.returncode == 0 for d in done)
        return (jobs / elapsed, dict(ex.workers), pool.reused, me * 1000 / jobs,
                others * 1000 / jobs)


def local_rate(jobs: int, max_jobs: int) -> float:
    with concurrent.futures.ThreadPoolExecutor(max_jobs) as pool:
        t0 = time.perf_counter()
        list(pool.map(lambda _: subprocess.run(["true"]), range(jobs)))
        return jobs / (time.perf_counter() - t0)


def main() -> None:
    jobs = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    max_jobs = int(sys.argv[2]) if len(sys.argv) > 2 else 16
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        os.environ["XDG_RUNTIME_DIR"] = str(work)  # this run's own agent
        _, worker_key, client_key = keygen("jps", work)
        targets = [f"{loopback_address()}:3010", f"{loopback_address()}:3010"]
        workers = [start_worker(worker_key, ["true"], addr, f"w{i}", "--slots", "32")
                   for i, addr in enumerate(targets, 1)]
        try:
            rows = []
            rate, placed, reused, mine, theirs = executor_rate(client_key, targets, jobs,
                                                               max_jobs, True, workers)
            rows.append((f"Executor, warm channels ({reused} reused, placed {placed})", rate))
            cold_jobs = max(jobs // 10, 50)
            rate, placed, _, _, _ = executor_rate(client_key, targets, cold_jobs, max_jobs,
                                                  False, workers)
            rows.append((f"Executor, a new channel per job ({cold_jobs} jobs)", rate))
            argv = exec_argv(client_key, targets, "--", "")[:-2]
            timed(argv, 3)
            warm = timed(argv, 50)
            cold = timed([*argv[:2], "--no-agent", *argv[2:]], 10)
            rows.append(("rexnet exec through the agent, one at a time",
                         1000 / statistics.median(warm)))
            rows.append(("rexnet exec --no-agent, one at a time", 1000 / statistics.median(cold)))
            peer = local_rate(jobs, max_jobs)
            rows.append((f"peer: local `true` subprocesses, {max_jobs} at once", peer))
        finally:
            subprocess.run([REXNET, "agent", "--stop"], capture_output=True)
            for w in workers:
                w.stop()
    print(f"trivial jobs across two workers on loopback; {jobs} jobs, {max_jobs} at once\n")
    print("| what | jobs/s | peer/this |\n| --- | --- | --- |")
    for name, rate in rows:
        print(f"| {name} | {rate:.0f} | {peer / rate:.2f} |")
    print(f"\nCPU per job with warm channels: client {mine:.2f} ms (less the threads here that "
          "read the workers' output), workers and jobs "
          f"{theirs:.2f} ms (the machine has {os.cpu_count()} CPUs)")
    print(f"rexnet exec via agent: median {statistics.median(warm):.1f} ms, min "
          f"{min(warm):.1f}, max {max(warm):.1f}; --no-agent: median "
          f"{statistics.median(cold):.1f} ms, min {min(cold):.1f}, max {max(cold):.1f}")


if __name__ == "__main__":
    main()
