"""Start latency of `rexnet exec true` through the agent (warm) and without it (cold), next
to ssh (plain, curve25519, ControlMaster) on the same two namespaces, in the same run.

Run as root from the repository (installs openssh-server with apt if it is missing):

    .venv/bin/python benchmarks/agent_latency.py [N]

Prints the median, min and max of N (default 30) runs of each, and ratios to the warm
agent. The warm rows (the native launcher, the Python launcher `rexnet-py` for `python -I
-S`, the Python launcher as pip's console script would start it, ssh ControlMaster and the
interpreter's floor) are taken alternately, run by run, so that the load of the shared
machine falls on all alike. Also the floors of a Python launcher: the venv's `python -c
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

from cluster import LAUNCHERS, REXNET, exec_argv, loopback_address, start_worker  # noqa: E402
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


def alternate(n: int, commands: list[list[str]]) -> list[list[float]]:
    """Run each of COMMANDS N times, round-robin; the samples of each."""
    samples: list[list[float]] = [[] for _ in commands]
    for _ in range(n):
        for i, argv in enumerate(commands):
            samples[i] += timed(argv, 1)
    return samples


def warm_launchers(client_key: Path, target: str, wrap: Callable[[list[str]], list[str]]
                   ) -> list[tuple[str, list[str]]]:
    """`rexnet exec true` through the agent with each launcher there is."""
    argv = exec_argv(client_key, [target])  # the worker runs `true`
    pip_style = [sys.executable, "-P", "-c", "import sys; from rexnet.cli.launcher import main; "
                 "sys.exit(main())", *argv[1:]]  # what pip's console script runs: with site
    found = [(f"rexnet exec → true, {name} launcher (warm)", wrap([path, *argv[1:]]))
             for name, path in sorted(LAUNCHERS.items()) if os.path.exists(path)]
    return [*found, ("rexnet exec → true, pip's console script (site, finalization; warm)",
                     wrap(pip_style))]


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
        control = str(work / "ssh" / "control")
        master = client.popen([*ssh[:1], "-M", "-S", control, "-N", *ssh[1:]])
        time.sleep(1.0)
        warm = [*warm_launchers(client_key, f"{worker.addr()}:3010", client.argv),
                ("ssh ControlMaster host true (warm)",
                 client.argv([*ssh[:1], "-S", control, *ssh[1:], "true"])),
                ("python -I -S -c pass (interpreter floor)",
                 client.argv([sys.executable, "-I", "-S", "-c", "pass"]))]
        for _, argv in warm:
            timed(argv, 2)
        rows = [(name, times) for (name, _), times in
                zip(warm, alternate(n, [argv for _, argv in warm]), strict=True)]
        master.terminate()
        rows += [("rexnet exec → true, starting the agent (first run)", first),
                 ("rexnet exec --no-agent → true (cold)", timed(cold, max(n // 3, 5))),
                 ("ssh host true", timed(client.argv([*ssh, "true"]), n)),
                 ("ssh host true (curve25519)", timed(client.argv(
                     [*ssh[:1], "-o", "KexAlgorithms=curve25519-sha256", *ssh[1:], "true"]),
                     n))]
        rows += floors(n, client.argv)[1:]
        subprocess.run(stop, capture_output=True)
        # without `ip netns exec` in front: loopback in this namespace
        addr = f"{loopback_address()}:3010"
        local = start_worker(worker_key, ["true"], addr, "lo")
        try:
            here = [*warm_launchers(client_key, addr, list),
                    ("python -I -S -c pass (interpreter floor)",
                     [sys.executable, "-I", "-S", "-c", "pass"])]
            for _, argv in here:
                timed(argv, 3)
            loopback = [(name, times) for (name, _), times in
                        zip(here, alternate(n, [argv for _, argv in here]), strict=True)]
            loopback += floors(n)[1:]
        finally:
            subprocess.run([REXNET, "agent", "--stop"], capture_output=True)
            local.stop()
    table(f"between two namespaces (every command under ip netns exec), {n} runs", rows)
    table(f"loopback, no namespaces, {n} runs", loopback)


if __name__ == "__main__":
    main()
