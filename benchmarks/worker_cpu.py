"""CPU per trivial job on the worker's side, process by process, on loopback: one worker
(`true`, 32 slots, sandboxed when run as root), an Executor with WIDTH jobs at a time on
warm channels.

Run from the repository; to compare two checkouts, run each one's own venv from its own
root, alternating (A B A B ...), and compare the ratios pair by pair:

    .venv/bin/python benchmarks/worker_cpu.py [JOBS] [WIDTH] [--json] [--sh] [WORKER OPTIONS...]

Prints a line: jobs/s, the worker process's CPU ms per job, its sandbox helpers' CPU ms
per job; and a line of CPU ms per job by part: the worker; the sandbox helper (sandboxd);
its init fork server (rexnet-initsrv); the sandboxes (each job's init and its command,
reaped by the helper); jobs the worker reaped itself (no sandbox); each as user+system
(the kernel splits the two by sampling: their sum is the figure to compare). --json starts the
worker with twistd --logger rexnet.logs.json_logger (as the systemd unit does); the
default is twistd's text log. --sh runs the worker as make bench does (`sh -c`,
--allow-args; each job `sh -c true`). PROFILE=FILE.svg (or .json, speedscope) samples
the worker with py-spy (pip install py-spy into the venv) while the jobs run: its shares
count a thread waiting for a CPU as running (after it woke another process, say), so it
says where the time goes, not the CPU; cProfile with time.process_time says the CPU.
"""

from __future__ import annotations

import os
import signal
import subprocess
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


def own_cpu(pid: int) -> tuple[float, float]:
    times = psutil.Process(pid).cpu_times()
    return float(times.user), float(times.system)


def reaped_cpu(pid: int) -> tuple[float, float]:
    times = psutil.Process(pid).cpu_times()
    return float(times.children_user), float(times.children_system)


def breakdown(pid: int) -> dict[str, tuple[float, float]]:
    """CPU seconds so far (user, system) by part: the worker process; its sandbox helper
    (sandboxd, its clean-up thread included) and the helper's init fork server, each its
    own; the sandboxes (the jobs' inits and their commands, reaped by the helper) - or,
    without a sandbox, the jobs the worker reaped."""
    parts = {"worker": own_cpu(pid), "helper": (0.0, 0.0), "initsrv": (0.0, 0.0),
             "sandboxes": (0.0, 0.0), "jobs": reaped_cpu(pid)}
    for child in psutil.Process(pid).children():
        if "sandboxd" in " ".join(child.cmdline()):
            parts["helper"], parts["sandboxes"] = own_cpu(child.pid), reaped_cpu(child.pid)
            for server in child.children():
                if server.name() == "rexnet-initsrv":
                    parts["initsrv"] = own_cpu(server.pid)
    return parts


def kernel_threads() -> dict[int, tuple[str, float]]:
    """Kernel threads (children of kthreadd) by PID: their name and CPU seconds so far.
    kworkers run the namespaces' and groups' teardown the jobs leave behind (and every
    other process's deferred kernel work on the machine: run it quiet)."""
    tick = os.sysconf("SC_CLK_TCK")
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        name, rest = text[text.index("(") + 1:text.rindex(")")], text.rsplit(")", 1)[1].split()
        if rest[1] == "2":  # ppid kthreadd
            found[int(stat.parent.name)] = (name, (int(rest[11]) + int(rest[12])) / tick)
    return found


def kernel_parts(before: dict[int, tuple[str, float]],
                 after: dict[int, tuple[str, float]]) -> dict[str, tuple[float, int]]:
    """CPU seconds and how many threads ran, by kind (kworker, ksoftirqd, other), threads
    that came and went between the two looks counted from zero."""
    parts: dict[str, tuple[float, int]] = {}
    for pid, (name, cpu) in after.items():
        used = cpu - (before[pid][1] if pid in before else 0.0)
        kind = next((k for k in ("kworker", "ksoftirqd", "rcu") if name.startswith(k)),
                    "other")
        total, count = parts.get(kind, (0.0, 0))
        parts[kind] = (total + used, count + (used > 0))
    return parts


def profiler(pid: int, output: str) -> subprocess.Popen[bytes]:
    """py-spy ($PYSPY, else this venv's, for measuring only) sampling PID into OUTPUT
    until SIGINT (.svg a flame graph, .json speedscope, else collapsed stacks)."""
    spy_path = os.environ.get("PYSPY", str(Path(sys.executable).parent / "py-spy"))
    form = {".svg": "flamegraph", ".json": "speedscope"}.get(Path(output).suffix, "raw")
    spy = subprocess.Popen([spy_path, "record", "-p", str(pid), "-r", "250", "-o", output,
                            "-f", form],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # attached
    return spy


def spawned_kworkers(before: dict[int, tuple[str, float]],
                     after: dict[int, tuple[str, float]]) -> int:
    return sum(1 for pid, (name, _) in after.items()
               if pid not in before and name.startswith("kworker"))


def main() -> None:
    args = sys.argv[1:]
    json_log, shell = "--json" in args, "--sh" in args
    profile = os.environ.get("PROFILE")
    args = [a for a in args if a not in ("--json", "--sh")]
    jobs = int(args.pop(0)) if args else 2000
    width = int(args.pop(0)) if args else 8
    with tempfile.TemporaryDirectory() as tmp:
        _, worker_key, client_key = keygen("cpu", Path(tmp))
        addr = f"{loopback_address()}:3010"
        if shell:  # as make bench's workers: `sh -c`, the job's command its argument
            argv = worker_argv(worker_key, ["sh", "-c"], addr, "w1", "--slots", "32",
                               "--allow-args", *args)
        else:
            argv = worker_argv(worker_key, ["true"], addr, "w1", "--slots", "32", *args)
        command = ["true"] if shell else []
        if json_log:
            argv.insert(argv.index("rexnet-worker"), "--logger=rexnet.logs.json_logger")
        worker = Proc(argv)
        try:
            worker.wait_for("listening on|serves cpu")
            with rexnet.Executor(client_key, [addr], width) as ex:
                list(ex.map(command, [b""] * (width * 4)))  # warm channels, imports
                spy = profiler(worker.pid, profile) if profile else None
                before = breakdown(worker.pid)
                k0, me0 = kernel_threads(), os.times()
                t0 = time.perf_counter()
                done = list(ex.map(command, [b""] * jobs))
                elapsed = time.perf_counter() - t0
                after = breakdown(worker.pid)
                k1, me1 = kernel_threads(), os.times()
                if spy is not None:
                    spy.send_signal(signal.SIGINT)
                    spy.wait()
            assert all(d.returncode == 0 for d in done)
        finally:
            worker.stop()
    ms = {part: [(a - b) * 1000 / jobs for a, b in zip(after[part], before[part], strict=True)]
          for part in after}
    print(f"{jobs / elapsed:.0f} jobs/s, worker {sum(ms['worker']):.3f} ms CPU/job, "
          f"sandbox helpers {sum(ms['helper']) + sum(ms['initsrv']):.3f} ms CPU/job")
    print("CPU ms per job (user+system): " + ", ".join(
        f"{part} {sum(v):.3f} ({v[0]:.2f}+{v[1]:.2f})" for part, v in ms.items())
        + f"; all {sum(map(sum, ms.values())):.3f}")
    client = [(me1.user - me0.user) * 1000 / jobs, (me1.system - me0.system) * 1000 / jobs]
    kernel = kernel_parts(k0, k1)
    print(f"client (this process) {sum(client):.3f} ({client[0]:.2f}+{client[1]:.2f}); "
          "kernel threads, machine-wide: " + ", ".join(
              f"{kind} {cpu * 1000 / jobs:.3f} ({count} ran)"
              for kind, (cpu, count) in sorted(kernel.items()))
          + f"; kworkers started {spawned_kworkers(k0, k1)}")


if __name__ == "__main__":
    main()
