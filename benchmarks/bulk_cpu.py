"""Where 1 GiB in and back out through `cat` spends its CPU, rexnet against ssh aes128-gcm.

Run as root from the repository:

    .venv/bin/python benchmarks/bulk_cpu.py [--runs N] [--size MIB] [--only rexnet|ssh]
                                            [--hold SECONDS]

Builds bench.py's bed (client, w1, w2; a worker and an sshd on each), then alternates
rexnet (through the agent) and `ssh -c aes128-gcm@openssh.com` round trips, and for each
prints the user and system CPU seconds per GiB of every process that took part, by role:
the harness (this process, which feeds and reads the pipes), agent, launcher, worker, the
job, the sandbox's helpers; ssh, sshd, the remote `cat`. Processes are sampled from /proc
every 20 ms (a process that ends loses at most its last 20 ms). --hold keeps the bed up
after the runs, printing the agent's and worker's pids (for perf or strace).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import GIB, agent_pid, build, stream
from cluster import REXNET
from netbed import NetBed, require_netns, sweep_stale
from start_latency import ensure_sshd

TICK = os.sysconf("SC_CLK_TCK")


NETNS: set[str] = set()  # the bed's network namespaces (ours only: others share the machine)


def _stat(pid: int) -> tuple[str, float, float] | None:
    try:
        if pid != os.getpid() and os.readlink(f"/proc/{pid}/ns/net") not in NETNS:
            return None
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    comm = text[text.index("(") + 1:text.rindex(")")]
    return f"{comm}|{cmd[:120]}", int(fields[11]) / TICK, int(fields[12]) / TICK


class Sampler:
    """CPU of every process on the machine, sampled until stopped: per pid the last seen
    (name, user, system), and what each had at the start (0 for those born since)."""

    def __init__(self) -> None:
        self.start = self._all()
        self.last = dict(self.start)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def _all() -> dict[int, tuple[str, float, float]]:
        got = {}
        for name in os.listdir("/proc"):
            if name.isdigit() and (s := _stat(int(name))):
                got[int(name)] = s
        return got

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.last.update(self._all())

    def stop(self) -> dict[int, tuple[str, float, float]]:
        self._stop.set()
        self._thread.join()
        self.last.update(self._all())
        spent = {}
        for pid, (name, user, system) in self.last.items():
            _, u0, s0 = self.start.get(pid, (name, 0.0, 0.0))
            if user - u0 + system - s0 > 0.005:
                spent[pid] = (name, user - u0, system - s0)
        return spent


ROLES = [  # (role, test on "comm|cmdline"), the first that matches
    ("harness", lambda n: str(os.getpid()) == n),
    ("agent", lambda n: "agent" in n.split("|")[1] and "rexnet" in n),
    ("worker", lambda n: "rexnet" in n and " worker" in n.split("|")[1]),
    ("launcher", lambda n: "rexnet" in n.split("|")[1] and " exec " in n.split("|")[1]),
    ("sshd", lambda n: n.startswith("sshd|")),
    ("ssh", lambda n: n.startswith("ssh|")),
    ("cat", lambda n: n.startswith("cat|")),
]


def role(pid: int, name: str) -> str:
    if pid == os.getpid():
        return "harness"
    for label, test in ROLES[1:]:
        if test(name):
            return label
    return name.split("|")[0]


def measure(fn: object, size: int) -> tuple[float, dict[str, tuple[float, float]]]:
    sampler = Sampler()
    rate = fn()  # type: ignore[operator]
    spent = sampler.stop()
    by_role: dict[str, tuple[float, float]] = {}
    for pid, (name, user, system) in spent.items():
        r = role(pid, name)
        u, s = by_role.get(r, (0.0, 0.0))
        by_role[r] = (u + user * GIB / size, s + system * GIB / size)
    return rate, by_role


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--size", type=int, default=1024, help="MiB each way")
    parser.add_argument("--only", choices=["rexnet", "ssh"])
    parser.add_argument("--one-way", action="store_true", help="`cat > /dev/null`")
    parser.add_argument("--hold", type=float, default=0.0)
    args = parser.parse_args()
    size = args.size << 20
    require_netns()
    sweep_stale()
    ensure_sshd()
    with tempfile.TemporaryDirectory() as tmp, NetBed() as bed:
        work = Path(tmp)
        work.chmod(0o755)
        b = build(bed, work)
        try:
            job = "cat > /dev/null" if args.one_way else "cat"
            back = not args.one_way
            rex = b.rex(job, agent=True)
            gcm = [*b.ssh_to(b.workers[0], "-c", "aes128-gcm@openssh.com"), job]
            stream(rex, 1 << 20, back, b.agent_env)  # the agent up
            for pid in (agent_pid(b), b.worker_procs[0].pid):
                NETNS.add(os.readlink(f"/proc/{pid}/ns/net"))
            print(f"agent {agent_pid(b)} worker {b.worker_procs[0].pid}", flush=True)
            fns = {"rexnet": lambda: stream(rex, size, back, b.agent_env),
                   "ssh": lambda: stream(gcm, size, back)}
            if args.only:
                fns = {args.only: fns[args.only]}
            results: dict[str, list[tuple[float, dict[str, tuple[float, float]]]]] = {}
            for _ in range(args.runs):
                for name, fn in fns.items():
                    results.setdefault(name, []).append(measure(fn, size))
            for name, runs in results.items():
                print(f"{name}: MB/s {', '.join(f'{r:.0f}' for r, _ in runs)}; "
                      "CPU s per GiB, median user+sys (user/sys):")
                roles = sorted({r for _, by in runs for r in by},
                               key=lambda r: -statistics.median(
                                   sum(by.get(r, (0, 0))) for _, by in runs))
                total = [sum(sum(v) for v in by.values()) for _, by in runs]
                for r in roles:
                    us = [by.get(r, (0.0, 0.0)) for _, by in runs]
                    print(f"  {r:12} {statistics.median(sum(x) for x in us):6.2f} "
                          f"({statistics.median(u for u, _ in us):.2f}/"
                          f"{statistics.median(s for _, s in us):.2f})")
                print(f"  {'all':12} {statistics.median(total):6.2f}")
            if args.hold:
                print("holding", flush=True)
                time.sleep(args.hold)
        finally:
            if b.agent:
                b.client.run([REXNET, "agent", "--stop"], env=b.agent_env)


if __name__ == "__main__":
    main()
