"""Dispatch latency of `rexnet exec` running `true` between two network namespaces.

Run as root from the repository:  .venv/bin/python benchmarks/dispatch_latency.py [N]

Prints the median, min and max wall time of N (default 20) cold `rexnet exec` runs (a new
Python process, a new announcement and a new TLS connection each time), next to the time
of the bare interpreter start-up and of `python -c 'import twisted.internet.reactor'` in
the same namespace: the floor a Python client cannot go below without an agent (issue P5).
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from cluster import exec_argv, start_worker  # noqa: E402
from netbed import NetBed, require_netns  # noqa: E402

from rexnet.credentials import keygen  # noqa: E402


def timed(argv: list[str], n: int) -> list[float]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        done = subprocess.run(argv, capture_output=True)
        times.append((time.perf_counter() - t0) * 1000)
        if done.returncode != 0:
            raise SystemExit(f"{argv} failed: {done.stderr.decode()}")
    return times


def row(name: str, times: list[float]) -> str:
    return (f"| {name} | {statistics.median(times):.1f} | {min(times):.1f} | "
            f"{max(times):.1f} |")


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    require_netns()
    import tempfile

    with tempfile.TemporaryDirectory() as tmp, NetBed() as bed:
        _, worker_key, client_key = keygen("bench", Path(tmp))
        lan = bed.add_subnet("lan")
        client, worker = bed.add_host("client", [lan]), bed.add_host("worker", [lan])
        start_worker(worker_key, ["true"], "0.0.0.0:3010", "w", popen=worker.popen)
        unicast = client.argv(exec_argv(client_key, [f"{worker.addr()}:3010"]))
        broadcast = client.argv(exec_argv(client_key, ["255.255.255.255:3010"]))
        timed(unicast, 2)  # warm the page cache
        rows = [
            row("`rexnet exec` → `true`, unicast announce", timed(unicast, n)),
            row("`rexnet exec` → `true`, broadcast announce", timed(broadcast, n)),
            row("`python -I -S -c pass` (interpreter floor)",
                timed(client.argv([sys.executable, "-I", "-S", "-c", "pass"]), n)),
            row("`python -c 'import twisted.internet.reactor'`",
                timed(client.argv([sys.executable, "-c", "import twisted.internet.reactor"]), n)),
        ]
    print(f"dispatch latency between two namespaces, {n} runs each (ms)\n")
    print("| what | median | min | max |\n| --- | --- | --- | --- |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
