"""The client's early TAKEN under attack, with real processes on loopback.

A client sends TAKEN as it accepts the first connect-back, before the TLS handshake
(rexnet.client.connectback): anyone who sees the announcement can open that first
connection and so cancel the honest workers' connect-backs.  The job must still start
promptly: the client announces again under a new job id when that connection is not
verified within EARLY_GRACE, and replaying the old TAKENs changes nothing.
"""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest
from cluster import Proc, exec_argv, loopback_address, start_worker
from conftest import Keys

from rexnet.client.connectback import EARLY_GRACE
from rexnet.protocol import wire


class Eavesdropper:
    """The client's announce target: forwards every datagram to the worker, but opens a
    silent TCP connection to the client's connect-back port as soon as it sees the first
    announcement (before the worker can answer), and replays every TAKEN it saw once the
    job is announced again."""

    def __init__(self, worker: tuple[str, int]) -> None:
        self.worker = worker
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", 0))
        self.udp.settimeout(0.2)
        self.address = f"127.0.0.1:{self.udp.getsockname()[1]}"
        self.silent: socket.socket | None = None
        self.jobs: list[bytes] = []  # job ids announced, in order
        self.takens: list[wire.Taken] = []
        self._seen: list[bytes] = []  # TAKEN datagrams, to replay
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data, _ = self.udp.recvfrom(8192)
            except TimeoutError:
                continue
            message = wire.decode_datagram(data).message
            self.udp.sendto(data, self.worker)
            if isinstance(message, wire.Announce) and message.job_id not in self.jobs:
                self.jobs.append(message.job_id)
                if self.silent is None:  # first: connect, and never say a word
                    self.silent = socket.create_connection(("127.0.0.1", message.port))
                else:  # announced again: replay the TAKENs of the first id
                    for old in self._seen:
                        for _ in range(3):
                            self.udp.sendto(old, self.worker)
            elif isinstance(message, wire.Taken):
                self.takens.append(message)
                self._seen.append(data)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.udp.close()


@pytest.fixture
def slow_worker(keys: Keys) -> Iterator[tuple[Proc, str]]:
    """A worker that answers after 50 ms (speed 0.1): the eavesdropper is always first."""
    addr = f"{loopback_address()}:3010"
    worker = start_worker(keys.worker, ["cat"], addr, "w-early", "--speed", "0.1")
    yield worker, addr
    worker.stop()


def test_a_silent_first_connection_delays_the_job_by_one_grace_at_most(
        keys: Keys, slow_worker: tuple[Proc, str]) -> None:
    worker, addr = slow_worker
    host, port = addr.rsplit(":", 1)
    spy = Eavesdropper((host, int(port)))
    try:
        argv = exec_argv(keys.client, [spy.address], "--no-agent", "-v", "--timeout", "20")
        t0 = time.monotonic()
        done = subprocess.run(argv, input=b"still runs", capture_output=True, timeout=60)
        took = time.monotonic() - t0
    finally:
        spy.close()
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"still runs"
    assert spy.silent is not None, "the eavesdropper never connected"
    assert b"was not verified within 500 ms: announcing the job again" in done.stderr
    # the early TAKEN (for the first id, at the silent connection) and the final one for
    # both ids; the second id was announced once the grace ran out
    assert len(spy.jobs) == 2
    assert [(t.job_id, t.early) for t in spy.takens[:1]] == [(spy.jobs[0], True)]
    assert {t.job_id for t in spy.takens if not t.early} == set(spy.jobs)
    assert sum(t.early for t in spy.takens) == 1
    assert took < EARLY_GRACE + 4.0, took  # (a process start, the grace, a 50 ms delay)
    # the worker heard the replayed TAKENs of the first id, and ran the job all the same
    worker.wait_for(r"connect-back for job \w+ cancelled: taken by another worker")
    # nothing reached the silent connection: no job data before authentication
    spy.silent.settimeout(2)
    try:
        leaked = spy.silent.recv(65536)
    except OSError:
        leaked = b""
    spy.silent.close()
    assert leaked == b""
