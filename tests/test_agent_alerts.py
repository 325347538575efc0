"""A warm job's alerts go after the messages the job's owner waits on (P11 #3): the
client's job-finished alert after the launcher has its status, the worker's after EXIT;
each is still sent, signed, once, also when the agent is stopped right after the job.
Real launchers, agent, worker and TLS on loopback; the alerts land on a UDP socket that
stands in for crat."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator

import pytest
from cluster import REXNET, Proc, loopback_address, run_exec, start_worker
from conftest import Keys
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from rexnet.net.announce import verify_signature
from rexnet.protocol import wire


@pytest.fixture(scope="module")
def crat() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    yield sock
    sock.close()


@pytest.fixture(scope="module")
def worker(keys: Keys, crat: socket.socket) -> Iterator[str]:
    addr = f"{loopback_address()}:3010"
    proc: Proc = start_worker(keys.worker, ["sh", "-c"], addr, "alerting", "--allow-args",
                              "--alerts", f"127.0.0.1:{crat.getsockname()[1]}")
    yield addr
    proc.stop()


def alerts(sock: socket.socket, wanted: int, timeout: float = 5.0) -> list[wire.Alert]:
    """The job-finished alerts that reach SOCK within TIMEOUT (more than WANTED: a moment
    longer, to see any extra), each with a good signature of the certificate it carries."""
    found: list[wire.Alert] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(deadline - time.monotonic(), 0.01))
        try:
            data = sock.recv(65536)
        except TimeoutError:
            break
        dgram = wire.decode_datagram(data)
        key = x509.load_der_x509_certificate(dgram.cert_der).public_key()
        assert isinstance(key, Ed25519PublicKey) and verify_signature(key, dgram)
        if isinstance(dgram.message, wire.Alert) and dgram.message.event == "job-finished":
            found.append(dgram.message)
            if len(found) >= wanted:
                deadline = min(deadline, time.monotonic() + 0.5)
    return found


def test_each_side_sends_its_job_finished_alert_once_even_if_the_agent_stops_at_once(
        keys: Keys, worker: str, crat: socket.socket, agent_sockets: object,
        launcher: str) -> None:
    port = crat.getsockname()[1]
    warmup = run_exec(keys.client, [worker], "--alerts", f"127.0.0.1:{port}", "--",
                      "true", rexnet=launcher)  # starts the agent and its warm channel
    assert warmup.returncode == 0, warmup.stderr
    alerts(crat, 2)
    done = run_exec(keys.client, [worker], "--alerts", f"127.0.0.1:{port}", "--", "exit 3",
                    rexnet=launcher)
    stop = subprocess.run([REXNET, "agent", "--stop"], capture_output=True, timeout=30)
    assert done.returncode == 3, done.stderr
    assert stop.returncode == 0 and b"stopped the agent" in stop.stderr, stop.stderr
    found = alerts(crat, 2)
    by_client = [a for a in found if "worker_addr" in dict(a.fields)]
    by_worker = [a for a in found if "worker_addr" not in dict(a.fields)]
    assert len(by_client) == 1 and len(by_worker) == 1, found
    client, work = dict(by_client[0].fields), dict(by_worker[0].fields)
    assert client["status"] == work["status"] == 3
    assert client["job"] == work["job"] and client["worker"] == work["worker"] == "alerting"
