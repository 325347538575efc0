"""`make demo`: a two-worker cluster on loopback, a real job through it, all cleaned up.

Makes credentials, starts two workers on 127.0.0.2 and 127.0.0.3 (announced to by
unicast: nothing is broadcast), compresses a file through the cluster with gzip, checks
the result, runs a few jobs at once to show both workers used, and stops everything.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

BIN = Path(sys.executable).parent
ADDRESSES = ("127.0.0.2", "127.0.0.3")
CRAT_ADDRESS = "127.0.0.4"


def free_udp_port(hosts: tuple[str, ...]) -> int:
    """A UDP port free on every one of HOSTS."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind((hosts[0], 0))
            port = int(probe.getsockname()[1])
        try:
            for host in hosts[1:]:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other:
                    other.bind((host, port))
        except OSError:
            continue
        return port
    raise SystemExit("demo: no free UDP port on loopback")


def step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def wait_listening(log: Path, proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if "listening on" in log.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    raise SystemExit(f"demo: worker did not start; its log:\n{log.read_text()}")


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="rexnet-demo-") as tmp:
        work = Path(tmp)
        os.environ["REXNET_AGENT_SOCKET"] = str(work / "agent.sock")  # the demo's own agent
        step("rexnet keygen demo")
        subprocess.run([BIN / "rexnet", "keygen", "demo", "--dir", work], check=True)

        port = free_udp_port(ADDRESSES)
        crat_port = free_udp_port((CRAT_ADDRESS,))
        crat_at = f"{CRAT_ADDRESS}:{crat_port}"
        targets = [f"{addr}:{port}" for addr in ADDRESSES]
        workers: list[subprocess.Popen[bytes]] = []
        try:
            step(f"twistd crat --listen {crat_at} --trust demo.ca.pem --jsonl alerts.jsonl")
            crat_log = work / "crat.log"
            with crat_log.open("wb") as out:
                workers.append(subprocess.Popen(
                    [BIN / "twistd", "-n", "--pidfile=", "crat", "--listen", crat_at,
                     "--trust", work / "demo.ca.pem", "--jsonl", work / "alerts.jsonl"],
                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
            wait_listening(crat_log, workers[-1])
            for name, addr, speed in (("alpha", ADDRESSES[0], "1"), ("beta", ADDRESSES[1], "1")):
                step(f"twistd rexnet-worker --name {name} --listen {addr}:{port} "
                     "demo.worker gzip -c")
                log = work / f"{name}.log"
                with log.open("wb") as out:
                    proc = subprocess.Popen(
                        [BIN / "twistd", "-n", "--pidfile=", "rexnet-worker", "--name", name,
                         "--listen", f"{addr}:{port}", "--speed", speed, "--slots", "2",
                         "--alerts", crat_at,
                         work / "demo.worker", "gzip", "-c"],
                        stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
                workers.append(proc)
                wait_listening(log, proc)
                print(f"   pid {proc.pid}, ready")

            source = work / "words.txt"
            source.write_bytes(b"".join(
                f"{i} {hashlib.sha256(str(i).encode()).hexdigest()}\n".encode()
                for i in range(200_000)))
            announce = [arg for t in targets for arg in ("--announce", t)]
            step(f"rexnet status {' '.join(announce)} demo.client")
            subprocess.run([BIN / "rexnet", "status", *announce, work / "demo.client"])
            announce += ["--alerts", crat_at]
            step(f"rexnet exec -v {' '.join(announce)} demo.client < words.txt > words.gz")
            t0 = time.monotonic()
            with source.open("rb") as stdin, (work / "words.gz").open("wb") as stdout:
                done = subprocess.run([BIN / "rexnet", "exec", "-v", *announce,
                                       work / "demo.client"], stdin=stdin, stdout=stdout,
                                      stderr=subprocess.PIPE)
            elapsed = time.monotonic() - t0
            sys.stdout.write(done.stderr.decode())
            if done.returncode != 0:
                print(f"demo: the job failed with status {done.returncode}")
                return 1
            original = source.read_bytes()
            packed = (work / "words.gz").read_bytes()
            ok = gzip.decompress(packed) == original
            print(f"   {len(original):,} bytes in, {len(packed):,} bytes of gzip out, "
                  f"{elapsed * 1000:.0f} ms; gunzip gives back the input: {ok}")
            if not ok:
                return 1

            step("six jobs at once: where do they run?")
            def one(_: int) -> str:
                run = subprocess.run([BIN / "rexnet", "exec", "-v", *announce,
                                      work / "demo.client"], input=b"x" * 100000,
                                     capture_output=True)
                line = run.stderr.decode()
                return line.split("runs on worker ")[1].split()[0] if run.returncode == 0 \
                    else f"failed ({run.returncode})"
            with ThreadPoolExecutor(6) as pool:
                placed = Counter(pool.map(one, range(6)))
            for name, count in sorted(placed.items()):
                print(f"   {name}: {count} job(s)")

            step(f"rexnet exec -v {' '.join(announce)} demo.client  (twice, through the agent)")
            for _ in range(2):
                t0 = time.monotonic()
                run = subprocess.run([BIN / "rexnet", "exec", "-v", *announce,
                                      work / "demo.client"], capture_output=True)
                said = run.stderr.decode().strip().split("runs on worker ", 1)[-1]
                print(f"   {(time.monotonic() - t0) * 1000:.0f} ms: {said}")

            step("what crat logged (signed alerts, verified against the CA)")
            time.sleep(0.3)
            for line in crat_log.read_text().splitlines():
                if "alert [" in line and "job-finished" in line:
                    print("  ", line.split("] ", 1)[-1][:150])
                    break
            records = (work / "alerts.jsonl").read_text().splitlines()
            print(f"   alerts.jsonl holds {len(records)} records")
        finally:
            step("stopping crat, the workers and the agent")
            subprocess.run([BIN / "rexnet", "agent", "--stop"], capture_output=True)
            for proc in workers:
                proc.terminate()
            for proc in workers:
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            print("   stopped; credentials and logs removed with", tmp)
    print("\ndemo finished: OK")
    return 0


if __name__ == "__main__":
    os.environ.pop("GROUP", None)
    sys.exit(main())
