"""Where a warm `rexnet exec true` spends its time: the launcher -> agent -> worker ->
sandbox helper -> init -> job -> back round trip cut into hops, from kernel tracepoints
(ftrace: syscalls and sched events, timestamps of the kernel's monotonic clock; a few
microseconds per event, unlike strace or perf trace, which stretch the path they time),
and each process's CPU per job.

Run as root from the repository, on bench.py's bed (the same worker options):

    .venv/bin/python benchmarks/roundtrip.py [--runs N] [--launcher python|native]

Prints the median, min and max of each hop over N traced runs (a hop is the time from
one process's send to the next one's, e.g. "worker: START in -> to helper" includes the
worker's reactor turn; "helper: woken" is the wait for the helper to be scheduled), then
the CPU each process used per job over N more runs (/proc utime+stime; the helper's
includes its inits and jobs, which it reaps).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench  # noqa: E402
import psutil  # noqa: E402
from cluster import LAUNCHERS  # noqa: E402
from netbed import NetBed, require_netns  # noqa: E402

TRACING = Path("/sys/kernel/tracing")
EVENTS = ["sched/sched_process_fork", "sched/sched_process_exec", "sched/sched_process_exit",
          *(f"syscalls/{e}" for e in (
              "sys_enter_connect", "sys_enter_sendmsg", "sys_exit_recvmsg", "sys_enter_sendto",
              "sys_exit_recvfrom", "sys_enter_exit_group"))]
LINE = re.compile(r"^\s*(.+?)-(\d+)\s+\[\d+\]\s+\S+\s+([\d.]+): (\w+)(.*)$")
CHILD = re.compile(r"child_pid=(\d+)")
Event = tuple[float, str, int, str, str]  # ms, comm, pid, what, the rest

HOPS = [
    ("launcher: connected -> request sent", "L_conn", "L_send"),
    ("agent: woken, request read", "L_send", "A_in"),
    ("agent: request -> START sent", "A_in", "A_start"),
    ("worker: START in (wire, woken)", "A_start", "W_in"),
    ("worker: START in -> to helper", "W_in", "W_helper"),
    ("helper: woken", "W_helper", "H_in"),
    ("helper: request -> to init", "H_in", "H_init"),
    ("init: request -> job exec'd", "H_init", "J_exec"),
    ("job: exec -> exit", "J_exec", "J_exit"),
    ("init/helper: job exit -> to worker", "J_exit", "H_out"),
    ("worker: woken, status read", "H_out", "W_status"),
    ("worker: status -> EXIT sent", "W_status", "W_exit"),
    ("agent: EXIT in (wire, woken)", "W_exit", "A_exit"),
    ("agent: EXIT -> status to launcher", "A_exit", "A_out"),
    ("launcher: status in -> exit", "A_out", "L_exit"),
    ("total: request sent -> status in", "L_send", "L_in"),
]


SAVED: dict[str, str] = {}  # the tracing settings found, put back after


def trace(enable: bool) -> None:
    """Turn the EVENTS on (tracing stays off until traced() starts it) or off."""
    (TRACING / "tracing_on").write_text("0")
    if enable:
        clock = (TRACING / "trace_clock").read_text()
        SAVED["trace_clock"] = clock[clock.index("[") + 1:clock.index("]")]
        SAVED["buffer_size_kb"] = (TRACING / "buffer_size_kb").read_text().split()[0]
        (TRACING / "trace_clock").write_text("mono")
        (TRACING / "buffer_size_kb").write_text("8192")
    for event in EVENTS:
        (TRACING / "events" / event / "enable").write_text("1" if enable else "0")
    if not enable:
        (TRACING / "trace").write_text("")
        for name, value in SAVED.items():
            (TRACING / name).write_text(value)


def traced(argv: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run ARGV with tracing on: its pid and the trace."""
    (TRACING / "trace").write_text("")
    (TRACING / "tracing_on").write_text("1")
    try:
        proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL)
        proc.wait()
    finally:
        (TRACING / "tracing_on").write_text("0")
    return proc.pid, (TRACING / "trace").read_text()


def events(text: str) -> list[Event]:
    found = []
    for line in text.splitlines():
        m = LINE.match(line)
        if m:
            found.append((float(m.group(3)) * 1000, m.group(1).strip(), int(m.group(2)),
                          m.group(4), m.group(5)))
    return found


def marks(evs: list[Event], launcher: int, agent: int, worker: int, helper: int
          ) -> dict[str, float] | None:
    """The times of one run's steps (the launcher's pid LAUNCHER), None if one is missing."""
    it: Iterator[Event] = iter(evs)
    got: dict[str, float] = {}

    def first(name: str, pid: int, what: str) -> bool:
        for t, _, p, w, _ in it:
            if w == what and p == pid:
                got[name] = t
                return True
        return False

    job = -1
    steps = [("L_conn", launcher, "sys_connect"), ("L_send", launcher, "sys_sendmsg"),
             ("A_in", agent, "sys_recvmsg"), ("A_start", agent, "sys_sendto"),
             ("W_in", worker, "sys_recvfrom"), ("W_helper", worker, "sys_sendmsg"),
             ("H_in", helper, "sys_recvmsg"), ("H_init", helper, "sys_sendmsg")]
    if not all(first(*step) for step in steps):
        return None
    for _, c, _, w, detail in it:  # the job: the init's child, once it has exec'd
        if w == "sched_process_fork" and c == "rexnet-init" and (m := CHILD.search(detail)):
            job = int(m.group(1))
            break
    for t, _, p, w, _ in it:
        if w == "sched_process_exec" and p == job:
            got["J_exec"] = t
            break
    steps = [("J_exit", job, "sched_process_exit"), ("H_out", helper, "sys_sendmsg"),
             ("W_status", worker, "sys_recvmsg"), ("W_exit", worker, "sys_sendto"),
             ("A_exit", agent, "sys_recvfrom")]
    if job < 0 or "J_exec" not in got or not all(first(*step) for step in steps):
        return None
    # the agent reads records until EXIT's, then writes the status: the last read before it
    rest = list(it)
    out = next((e for e in rest if e[2] == agent and e[3] == "sys_sendto"), None)
    if out is None:
        return None
    got["A_exit"] = max([got["A_exit"]] + [t for t, _, p, w, _ in rest
                                           if p == agent and w == "sys_recvfrom" and t < out[0]])
    got["A_out"] = out[0]
    it = iter(rest)
    if not (first("L_in", launcher, "sys_recvfrom") and first("L_exit", launcher,
                                                              "sys_exit_group")):
        return None
    return got


def cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--launcher", choices=sorted(LAUNCHERS), default="native")
    args = parser.parse_args()
    require_netns()
    if not (TRACING / "events" / "syscalls").is_dir():
        sys.exit(f"no syscall tracepoints under {TRACING}")
    with tempfile.TemporaryDirectory() as tmp, NetBed() as bed:
        work = Path(tmp)
        work.chmod(0o755)
        b = bench.build(bed, work)
        argv = [LAUNCHERS[args.launcher] if a == bench.REXNET else a
                for a in b.rex("true", agent=True)]
        try:
            for _ in range(5):
                bench.run_ms(argv, b.agent_env)
            agent, worker = bench.agent_pid(b), b.worker_procs[0].pid
            helpers = [p.pid for p in psutil.Process(worker).children()
                       if "sandboxd" in " ".join(p.cmdline())]
            assert agent is not None
            if not helpers:
                sys.exit("the worker runs no sandbox helper (not root?): no hops to time")
            helper = helpers[0]
            hops: dict[str, list[float]] = {name: [] for name, _, _ in HOPS}
            missed = 0
            trace(True)
            try:
                runs = [traced(argv, b.agent_env) for _ in range(args.runs)]
            finally:
                trace(False)
            for pid, text in runs:
                got = marks(events(text), pid, agent, worker, helper)
                if got is None:
                    missed += 1
                    continue
                for name, start, end in HOPS:
                    hops[name].append(got[end] - got[start])
            pids = {"agent": agent, "worker": worker, "helper": helper}
            before = {k: cpu(p) for k, p in pids.items()}
            for _ in range(args.runs):
                bench.run_ms(argv, b.agent_env)
            used = {k: (cpu(pids[k]) - v) * 1000 / args.runs for k, v in before.items()}
        finally:
            b.client.run([bench.REXNET, "agent", "--stop"], env=b.agent_env)
    print(f"\nwarm `rexnet exec true`, {args.launcher} launcher: {args.runs - missed} traced "
          f"runs ({missed} not matched)\n\n| hop | median ms | min | max |\n"
          "| --- | --- | --- | --- |")
    for name, times in hops.items():
        if times:
            print(f"| {name} | {statistics.median(times):.3f} | {min(times):.3f} | "
                  f"{max(times):.3f} |")
    print("\n" + ", ".join(f"{k} {v:.2f} ms" for k, v in used.items()) + " of CPU per job")


if __name__ == "__main__":
    main()
