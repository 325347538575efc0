"""Start latency of `rexnet exec true` through the agent (warm) and without it (cold), next
to ssh (plain, curve25519, ControlMaster) on the same two namespaces, in the same run.

Run as root from the repository (installs openssh-server with apt if it is missing):

    .venv/bin/python benchmarks/agent_latency.py [N]

Prints the median, min and max of N (default 30) runs of each, and ratios to the warm
agent. Also the floors of a Python launcher: `python -I -S -c pass`, the venv's `python -c
pass` (with site) and `python -P -c 'import rexnet.cli.launcher'` (-P: the installed package,
not a source tree in the current directory), and `/bin/true` (what a native
launcher would start in). Every command runs through
`ip netns exec` (the same cost for all), so a loopback run without namespaces follows.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "tests"))
sys.path.insert(0, str(ROOT))

from cluster import REXNET, exec_argv, loopback_address, start_worker  # noqa: E402
from netbed import NetBed, require_netns  # noqa: E402
from start_latency import ensure_sshd, start_sshd, timed  # noqa: E402

from rexnet.security.credentials import keygen  # noqa: E402


def table(title: str, rows: list[tuple[str, list[float]]]) -> None:
    base = statistics.median(rows[0][1])
    print(f"\n{title}\n\n| what | median ms | min | max | this/agent |\n| --- | --- | --- | --- "
          "| --- |")
    for name, times in rows:
        median = statistics.median(times)
        print(f"| {name} | {median:.1f} | {min(times):.1f} | {max(times):.1f} | "
              f"{median / base:.2f} |")


def floors(n: int, wrap: Callable[[list[str]], list[str]] = list
           ) -> list[tuple[str, list[float]]]:
    python = sys.executable
    return [("python -I -S -c pass (interpreter floor)",
             timed(wrap([python, "-I", "-S", "-c", "pass"]), n)),
            ("python -c pass (venv, with site)", timed(wrap([python, "-c", "pass"]), n)),
            ("python -P -c 'import rexnet.cli.launcher' (installed, compiled)",
             timed(wrap([python, "-P", "-c", "import rexnet.cli.launcher"]), n)),
            ("/bin/true (the floor of a native launcher)", timed(wrap(["/bin/true"]), n))]


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 30
    require_netns()
    ensure_sshd()
    with tempfile.TemporaryDirectory() as tmp, NetBed() as bed:
        work = Path(tmp)
        work.chmod(0o755)  # sshd reads the authorized keys as the user
        os.environ["XDG_RUNTIME_DIR"] = str(work / "run")  # this run's own agents
        _, worker_key, client_key = keygen("bench", work)
        lan = bed.add_subnet("lan")
        client, worker = bed.add_host("client", [lan]), bed.add_host("worker", [lan])
        start_worker(worker_key, ["true"], "0.0.0.0:3010", "w", popen=worker.popen)
        (work / "ssh").mkdir()
        ssh = start_sshd(worker, work / "ssh")
        agent = client.argv(exec_argv(client_key, [f"{worker.addr()}:3010"]))
        cold = client.argv(exec_argv(client_key, [f"{worker.addr()}:3010"], "--no-agent"))
        timed(agent, 3)  # starts the agent, warms its channel
        timed(client.argv([*ssh, "true"]), 2)
        stop = client.argv([REXNET, "agent", "--stop"])
        first: list[float] = []
        for _ in range(max(n // 3, 5)):  # no agent runs: the launcher starts one
            subprocess.run(stop, capture_output=True)
            first += timed(agent, 1)
        rows = [("rexnet exec → true, through the agent (warm)", timed(agent, n)),
                ("rexnet exec → true, starting the agent (first run)", first),
                ("rexnet exec --no-agent → true (cold)", timed(cold, max(n // 3, 5))),
                ("ssh host true", timed(client.argv([*ssh, "true"]), n)),
                ("ssh host true (curve25519)", timed(client.argv(
                    [*ssh[:1], "-o", "KexAlgorithms=curve25519-sha256", *ssh[1:], "true"]), n))]
        control = str(work / "ssh" / "control")
        master = client.popen([*ssh[:1], "-M", "-S", control, "-N", *ssh[1:]])
        time.sleep(1.0)
        rows.append(("ssh ControlMaster host true (warm)", timed(client.argv(
            [*ssh[:1], "-S", control, *ssh[1:], "true"]), n)))
        master.terminate()
        rows += floors(n, client.argv)
        subprocess.run(stop, capture_output=True)
        # without `ip netns exec` in front: loopback in this namespace
        addr = f"{loopback_address()}:3010"
        local = start_worker(worker_key, ["true"], addr, "lo")
        try:
            argv = exec_argv(client_key, [addr])
            timed(argv, 3)
            loopback = [("rexnet exec → true, through the agent (warm)", timed(argv, n)),
                        *floors(n)]
        finally:
            subprocess.run([REXNET, "agent", "--stop"], capture_output=True)
            local.stop()
    table(f"between two namespaces (every command under ip netns exec), {n} runs", rows)
    table(f"loopback, no namespaces, {n} runs", loopback)


if __name__ == "__main__":
    main()
