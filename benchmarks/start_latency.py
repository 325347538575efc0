"""Start latency of a trivial job between two namespaces: rexnet against ssh, same run.

Run as root from the repository (installs openssh-server with apt if it is missing):

    .venv/bin/python benchmarks/start_latency.py [N]

Prints the median, min and max of N (default 20) runs of each, and rexnet/peer ratios:
- `rexnet exec … true` (cold: a new process, announcement and TLS connection every time);
- `ssh host true` as an ordinary user whose shell reads no rc files, default key exchange
  and curve25519, and through a warm ControlMaster;
- the interpreter's own start (`python -I -S -c pass`) and `import twisted.internet.reactor`,
  the floors of a Python client.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from cluster import exec_argv, start_worker  # noqa: E402
from netbed import Host, NetBed, require_netns  # noqa: E402

from rexnet.security.credentials import keygen  # noqa: E402

USER = "rexbench"


def timed(argv: list[str], n: int) -> list[float]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        done = subprocess.run(argv, capture_output=True)
        times.append((time.perf_counter() - t0) * 1000)
        if done.returncode != 0:
            raise SystemExit(f"{argv} failed: {done.stderr.decode()}")
    return times


def ensure_sshd() -> None:
    if not shutil.which("sshd") and not Path("/usr/sbin/sshd").exists():
        subprocess.run(["apt-get", "install", "-y", "-qq", "openssh-server"], check=True,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    if subprocess.run(["id", USER], capture_output=True).returncode != 0:
        subprocess.run(["useradd", "-m", "-s", "/bin/sh", USER], check=True)
        # no password, but not locked: sshd (without PAM) refuses locked accounts
        subprocess.run(["usermod", "-p", "*", USER], check=True)
    Path("/run/sshd").mkdir(exist_ok=True)


def start_sshd(host: Host, work: Path, keyfile: Path | None = None) -> list[str]:
    """sshd on HOST:2222 for USER; returns the ssh argv prefix that logs in (with KEYFILE,
    made if missing; default WORK/user)."""
    user = keyfile or work / "user"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", work / "host"],
                   check=True)
    if not user.exists():
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", user],
                       check=True)
    keys = work / "authorized_keys"
    keys.write_text(Path(f"{user}.pub").read_text())
    keys.chmod(0o644)
    work.chmod(0o755)
    config = work / "sshd_config"
    config.write_text(f"Port 2222\nHostKey {work / 'host'}\nAuthorizedKeysFile {keys}\n"
                      "StrictModes no\nUsePAM no\nPidFile none\nPrintMotd no\n"
                      "PasswordAuthentication no\nMaxStartups 200\nMaxSessions 64\n")
    host.popen(["/usr/sbin/sshd", "-D", "-f", str(config)], stdout=subprocess.DEVNULL,
               stderr=subprocess.DEVNULL)
    time.sleep(1.0)
    return ["ssh", "-F", "/dev/null", "-i", str(user), "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "LogLevel=ERROR", "-p", "2222", f"{USER}@{host.addr()}"]


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    require_netns()
    ensure_sshd()
    rows: list[tuple[str, list[float]]] = []
    with tempfile.TemporaryDirectory() as tmp, NetBed() as bed:
        work = Path(tmp)
        work.chmod(0o755)  # sshd reads the authorized keys as the user
        _, worker_key, client_key = keygen("bench", work)
        lan = bed.add_subnet("lan")
        client, worker = bed.add_host("client", [lan]), bed.add_host("worker", [lan])
        start_worker(worker_key, ["true"], "0.0.0.0:3010", "w", popen=worker.popen)
        (work / "ssh").mkdir()
        ssh = start_sshd(worker, work / "ssh")
        unicast = client.argv(exec_argv(client_key, [f"{worker.addr()}:3010"]))
        timed(unicast, 2)
        timed(client.argv([*ssh, "true"]), 2)
        rows.append(("rexnet exec → true (cold)", timed(unicast, n)))
        rows.append(("ssh host true", timed(client.argv([*ssh, "true"]), n)))
        rows.append(("ssh host true (curve25519)", timed(client.argv(
            [*ssh[:1], "-o", "KexAlgorithms=curve25519-sha256", *ssh[1:], "true"]), n)))
        control = str(work / "ssh" / "control")
        master = client.popen([*ssh[:1], "-M", "-S", control, "-N", *ssh[1:]])
        time.sleep(1.0)
        rows.append(("ssh ControlMaster host true (warm)", timed(client.argv(
            [*ssh[:1], "-S", control, *ssh[1:], "true"]), n)))
        master.terminate()
        rows.append(("python -I -S -c pass (interpreter floor)",
                     timed(client.argv([sys.executable, "-I", "-S", "-c", "pass"]), n)))
        rows.append(("python -c 'import twisted.internet.reactor'", timed(client.argv(
            [sys.executable, "-c", "import twisted.internet.reactor"]), n)))
    rexnet = statistics.median(rows[0][1])
    print(f"start latency between two namespaces, {n} runs each (ms)\n")
    print("| what | median | min | max | rexnet/this |\n| --- | --- | --- | --- | --- |")
    for name, times in rows:
        median = statistics.median(times)
        print(f"| {name} | {median:.1f} | {min(times):.1f} | {max(times):.1f} | "
              f"{rexnet / median:.2f} |")


if __name__ == "__main__":
    main()
