"""Warm `rexnet-py exec true` and `rexnet-native exec true` of another checkout (OTHER_BIN,
e.g. a clone of main after `make install`) against this one's, each with its own agent, on
bench.py's namespace bed, alternated run by run with the interpreter's floor.

Run as root from the repository:

    .venv/bin/python benchmarks/launcher_ab.py [--runs N] [--other-worker] OTHER_BIN

Prints, for each command, its median, its ratio to `python -I -S -c pass` and its median
excess over it pair by pair; then the medians of this checkout's run-by-run ratios to the
other's. The worker is this checkout's (the same code on both sides unless it changed);
with --other-worker the other checkout's jobs go to its own worker (OTHER_BIN/twistd, on a
host of its own on the same subnet, the same options), for changes on the worker's side.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench  # noqa: E402
from cluster import LAUNCHERS, Proc, worker_argv  # noqa: E402
from netbed import NetBed, require_netns  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("other", help="the other checkout's .venv/bin")
    parser.add_argument("--runs", type=int, default=60)
    parser.add_argument("--other-worker", action="store_true",
                        help="the other checkout's jobs to its own worker")
    args = parser.parse_args()
    require_netns()
    with tempfile.TemporaryDirectory() as tmp, NetBed() as bed:
        work = Path(tmp)
        work.chmod(0o755)
        b = bench.build(bed, work)
        (work / "other").mkdir(mode=0o700)
        (work / "other").chmod(0o700)
        other_env = dict(os.environ, REXNET_AGENT_SOCKET=str(work / "other" / "agent.sock"))
        warm = b.rex("true", agent=True)
        other_warm = warm
        if args.other_worker:
            host = bed.add_host("w3", [bed.subnets["lan"]])
            argv = worker_argv(b.keys.worker, ["sh", "-c"], "0.0.0.0:3010", host.name,
                               "--allow-args", "--slots", "8", *bench.WORKER_OPTIONS)
            Proc([f"{args.other}/twistd", *argv[1:]], popen=host.popen).wait_for(
                r"listening on")
            other_warm = b.rex("true", agent=True, targets=[host])

        def launcher(path: str, argv: list[str] = warm) -> list[str]:
            return [path if a == bench.REXNET else a for a in argv]

        commands = {
            "python -I -S -c pass": (b.client.argv([sys.executable, "-I", "-S", "-c", "pass"]),
                                     None),
            "other rexnet-py": (launcher(f"{args.other}/rexnet-py", other_warm), other_env),
            "this rexnet-py": (launcher(LAUNCHERS["python"]), b.agent_env),
            "other rexnet-native": (launcher(f"{args.other}/rexnet-native", other_warm),
                                    other_env),
            "this rexnet-native": (launcher(LAUNCHERS["native"]), b.agent_env),
        }
        try:
            for argv, env in commands.values():
                for _ in range(3):  # the agents start, their channels warm up
                    bench.run_ms(argv, env)
            names = list(commands)
            times: dict[str, list[float]] = {name: [] for name in names}
            for i in range(args.runs):
                for name in names if i % 2 == 0 else names[::-1]:
                    times[name].append(bench.run_ms(*commands[name]))
        finally:
            for env in (b.agent_env, other_env):
                b.client.run([bench.REXNET, "agent", "--stop"], env=env)
    floor = times[names[0]]
    for name in names:
        excess = statistics.median(t - f for t, f in zip(times[name], floor, strict=True))
        print(f"| {name} | {statistics.median(times[name]):.2f} ms | "
              f"{statistics.median(times[name]) / statistics.median(floor):.2f}x the floor | "
              f"{excess:+.2f} ms over it, pair by pair |")
    for kind in ("rexnet-py", "rexnet-native"):
        ratios = [t / o for t, o in zip(times[f"this {kind}"], times[f"other {kind}"],
                                        strict=True)]
        print(f"this {kind} / other {kind}: {statistics.median(ratios):.3f} (median of "
              f"{len(ratios)} run-by-run ratios)")


if __name__ == "__main__":
    main()
