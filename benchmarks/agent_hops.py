"""The agent's own share of a warm `rexnet exec true`, hop by hop, from inside it: the agent
runs in the foreground with perf_counter and thread-CPU stamps at its steps (its classes'
methods wrapped, nothing else changed), and N warm jobs go through it on bench.py's bed.

Run as root from the repository, against a checkout's tree (its .venv is used):

    .venv/bin/python benchmarks/agent_hops.py [--runs N] [--native] [--profile FILE] [TREE]

Prints medians (and minimums) in ms: connection accepted -> request read (in the accept's
turn or a later one, and how often in the accept's), request -> START written, START ->
EXIT decoded, EXIT -> status written to the launcher, and the agent's CPU from accept to
START and from EXIT to the status. With --profile, a cProfile of the agent to FILE.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

Stamps = dict[str, Any]


def timed_agent() -> None:
    """The agent (at $REXNET_AGENT_SOCKET), its stamps written to $HOPS_OUT at exit."""
    import signal

    from rexnet.agent import server
    from rexnet.client import jobcore

    jobs: list[Stamps] = []
    cur: Stamps = {}

    def wrap(cls: Any, name: str, after: str) -> None:
        original = getattr(cls, name)

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            result = original(*args, **kwargs)
            cur[after], cur[after + "_cpu"] = time.perf_counter_ns(), time.thread_time_ns()
            return result

        setattr(cls, name, wrapped)

    accept = server.Session.connectionMade

    def connection_made(self: Any) -> None:
        cur.clear()
        cur["accept"], cur["accept_cpu"] = time.perf_counter_ns(), time.thread_time_ns()
        accept(self)
        cur["accepted"] = True

    server.Session.connectionMade = connection_made  # type: ignore[method-assign]
    received = server.Session.dataReceived

    def data_received(self: Any, data: bytes) -> None:
        if "req" not in cur:
            cur["req"], cur["in_accept"] = time.perf_counter_ns(), "accepted" not in cur
        received(self, data)

    server.Session.dataReceived = data_received  # type: ignore[method-assign]
    wrap(jobcore.JobCore, "_send_start", "start")
    finish = server.Session.finish

    def finished(self: Any, status: int, message: str) -> None:
        first = not self.finished
        finish(self, status, message)
        if first and "exit" in cur:
            cur["out"], cur["out_cpu"] = time.perf_counter_ns(), time.thread_time_ns()
            jobs.append(dict(cur))

    server.Session.finish = finished  # type: ignore[method-assign]
    exited: Any = jobcore.JobCore.job_exited

    def job_exited(self: Any, frame: Any) -> None:
        cur["exit"], cur["exit_cpu"] = time.perf_counter_ns(), time.thread_time_ns()
        exited(self, frame)

    jobcore.JobCore.job_exited = job_exited  # type: ignore[method-assign,assignment]

    def dump() -> None:
        Path(os.environ["HOPS_OUT"]).write_text(json.dumps(jobs))

    atexit.register(dump)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    if profile := os.environ.get("HOPS_PROFILE"):
        import cProfile

        profiler = cProfile.Profile()

        def stop_profile() -> None:
            profiler.disable()
            profiler.dump_stats(profile)

        atexit.register(stop_profile)
        profiler.enable()
    from rexnet.cli.main import main

    sys.argv = ["rexnet", "agent", "--foreground", "--socket",
                os.environ["REXNET_AGENT_SOCKET"], "--idle-timeout", "3600"]
    main()


def report(jobs: list[Stamps], walls: list[float]) -> None:
    def hop(label: str, values: list[float]) -> None:
        if values:
            print(f"{label:<36} {statistics.median(values):7.3f} (min {min(values):.3f})")

    def span(a: str, b: str, only: Any = None) -> list[float]:
        return [(j[b] - j[a]) / 1e6 for j in jobs if a in j and b in j
                and (only is None or j.get("in_accept") == only)]

    print(f"jobs {len(jobs)}, wall median {statistics.median(walls):.2f} ms; in ms:")
    hop("accept -> request read", span("accept", "req"))
    hop("  ... in the accept's turn", span("accept", "req", True))
    hop("  ... in a later turn", span("accept", "req", False))
    print(f"{'request read in the accept turn':<36} "
          f"{sum(bool(j.get('in_accept')) for j in jobs) / max(len(jobs), 1):.2f}")
    hop("request -> START written", span("req", "start"))
    hop("START -> EXIT decoded", span("start", "exit"))
    hop("EXIT -> status to the launcher", span("exit", "out"))
    hop("CPU: accept -> START", span("accept_cpu", "start_cpu"))
    hop("CPU: EXIT -> status", span("exit_cpu", "out_cpu"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tree", nargs="?", default=str(Path(__file__).resolve().parent.parent))
    parser.add_argument("--runs", type=int, default=150)
    parser.add_argument("--native", action="store_true", help="rexnet-native, not rexnet-py")
    parser.add_argument("--profile", default="")
    args = parser.parse_args()
    tree = Path(args.tree).resolve()
    sys.path[:0] = [str(tree / "tests"), str(tree / "benchmarks")]
    os.chdir(tree)
    import bench
    from cluster import LAUNCHERS
    from netbed import NetBed, require_netns

    require_netns()
    with tempfile.TemporaryDirectory() as tmp, NetBed() as bed:
        work = Path(tmp)
        work.chmod(0o755)
        b = bench.build(bed, work)
        out = work / "hops.json"
        env = dict(b.agent_env, HOPS_OUT=str(out), HOPS_PROFILE=args.profile)
        with open(work / "agent.log", "w") as log:
            agent = b.client.popen([str(tree / ".venv/bin/python"), __file__, "--agent"],
                                   env=env, stderr=log)
        while not os.path.exists(env["REXNET_AGENT_SOCKET"]):
            time.sleep(0.05)
        launcher = LAUNCHERS["native" if args.native else "python"]
        argv = [launcher if a == bench.REXNET else a for a in b.rex("true", agent=True)]
        walls = [bench.run_ms(argv, b.agent_env) for _ in range(args.runs + 5)][5:]
        agent.terminate()
        agent.wait(10)
        report(json.loads(out.read_text())[5:], walls)


if __name__ == "__main__":
    if sys.argv[1:] == ["--agent"]:
        timed_agent()
    else:
        main()
