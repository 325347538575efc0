"""CPU per trivial job of the worker process itself (not its jobs, not its sandbox helper),
on loopback: one worker (`true`, 32 slots, sandboxed when run as root), an Executor with
WIDTH jobs at a time on warm channels.

Run from the repository; to compare two checkouts, run each one's own venv from its own
root, alternating (A B A B ...), and compare the ratios pair by pair:

    .venv/bin/python benchmarks/worker_cpu.py [JOBS] [WIDTH] [--json] [WORKER OPTIONS...]

Prints one line: jobs/s, the worker process's CPU ms per job, its sandbox helpers' CPU ms
per job. --json starts the worker with twistd --logger rexnet.logs.json_logger (as the
systemd unit does); the default is twistd's text log.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import psutil  # noqa: E402
from cluster import Proc, loopback_address, worker_argv  # noqa: E402

import rexnet  # noqa: E402
from rexnet.security.credentials import keygen  # noqa: E402


def own_cpu(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def helpers_cpu(pid: int) -> float:
    return sum(own_cpu(c.pid) for c in psutil.Process(pid).children()
               if "sandboxd" in " ".join(c.cmdline()))


def main() -> None:
    args = sys.argv[1:]
    json_log = "--json" in args
    args = [a for a in args if a != "--json"]
    jobs = int(args.pop(0)) if args else 2000
    width = int(args.pop(0)) if args else 8
    with tempfile.TemporaryDirectory() as tmp:
        _, worker_key, client_key = keygen("cpu", Path(tmp))
        addr = f"{loopback_address()}:3010"
        argv = worker_argv(worker_key, ["true"], addr, "w1", "--slots", "32", *args)
        if json_log:
            argv.insert(argv.index("rexnet-worker"), "--logger=rexnet.logs.json_logger")
        worker = Proc(argv)
        try:
            worker.wait_for("listening on|serves cpu")
            with rexnet.Executor(client_key, [addr], width) as ex:
                list(ex.map([], [b""] * (width * 4)))  # warm channels, imports
                cpu, helpers = own_cpu(worker.pid), helpers_cpu(worker.pid)
                t0 = time.perf_counter()
                done = list(ex.map([], [b""] * jobs))
                elapsed = time.perf_counter() - t0
                cpu, helpers = own_cpu(worker.pid) - cpu, helpers_cpu(worker.pid) - helpers
            assert all(d.returncode == 0 for d in done)
        finally:
            worker.stop()
    print(f"{jobs / elapsed:.0f} jobs/s, worker {cpu * 1000 / jobs:.3f} ms CPU/job, "
          f"sandbox helpers {helpers * 1000 / jobs:.3f} ms CPU/job")


if __name__ == "__main__":
    main()
