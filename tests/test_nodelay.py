"""No stalls (issue P11): TCP_NODELAY on both ends of a real job's channel, and the job's
and the launcher's pipes widened, checked on the real descriptors of the real processes."""

from __future__ import annotations

import os
import select
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from cluster import REXNET, TWISTD, Proc, exec_argv, loopback_address, start_worker
from conftest import Keys
from netbed import NetBed
from sockets import connected_tcp, established, nodelay, owner_of, pipe_size
from twisted.internet import tcp
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import CertificateOptions
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from zope.interface import implementer

from rexnet.net import tuning
from rexnet.net.pipes import WRITE_BUFFER, PipeWriter

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 and not os.environ.get("CI"),
    reason="reading another process's sockets (pidfd_getfd) needs root")


def test_widen_pipe_grows_a_pipe_and_leaves_other_descriptors_alone(tmp_path: Path) -> None:
    r, w = os.pipe()
    try:
        assert tuning.widen_pipe(w) == tuning.PIPE_SIZE
        assert pipe_size(os.getpid(), r) == tuning.PIPE_SIZE  # one pipe, both ends
        assert tuning.widen_pipe(r, 4096) == tuning.PIPE_SIZE  # never shrinks
    finally:
        os.close(r)
        os.close(w)
    with open(tmp_path / "file", "wb") as f:
        assert tuning.widen_pipe(f.fileno()) == 0
    a, b = socket.socketpair()
    with a, b:
        assert tuning.widen_pipe(a.fileno()) == 0


def test_tune_connection_ignores_transports_without_a_socket() -> None:
    assert tuning.tune_connection(StringTransport()) is False


def test_tune_connection_reaches_the_tcp_socket_under_a_tls_wrapper() -> None:
    """What wrapClientTLS gives a protocol: a TLS wrapper over the TCP connection."""
    with socket.create_server(("127.0.0.1", 0)) as server, \
            socket.create_connection(server.getsockname()) as mine:
        connection = tcp.Connection(mine, Protocol(), MemoryReactor())
        tls = TLSMemoryBIOFactory(CertificateOptions(), True, Factory())
        wrapper = TLSMemoryBIOProtocol(tls, Protocol())
        wrapper.transport = connection
        assert not mine.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        assert tuning.tune_connection(wrapper) is True
        assert mine.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        assert connection.bufferSize == tuning.TRANSPORT_BUFFER  # reads and send buffer
        assert connection.SEND_LIMIT == tuning.TRANSPORT_BUFFER  # one send() per buffer
        assert tcp.Connection.SEND_LIMIT == 128 * 1024  # the class keeps Twisted's


@implementer(IPushProducer)
class Source:
    """A push producer that records whether it was asked to pause."""

    paused = False

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        pass


def test_a_pipe_writer_holds_its_producer_back_only_past_its_buffer() -> None:
    """A channel stream's sink pauses the stream (so holds back the peer's credit) once
    WRITE_BUFFER bytes wait, not at Twisted's 64 KiB; the reactor is never run, so every
    byte written waits in the writer."""
    r, w = os.pipe()
    try:
        writer = PipeWriter(MemoryReactor(), None, "in", w)
        source = Source()
        writer.registerProducer(source, True)
        writer.write(b"x" * (WRITE_BUFFER - 1024))
        assert not source.paused, "paused below WRITE_BUFFER"
        writer.write(b"x" * 2048)
        assert source.paused
        assert pipe_size(os.getpid(), w) == tuning.PIPE_SIZE
    finally:
        os.close(r)
        os.close(w)


def test_the_kernel_tls_probe_agrees_with_the_kernels_list() -> None:
    """kTLS (and so splice/sendfile of encrypted bytes) is there only where the kernel lists
    the "tls" upper layer protocol; the probe says why not, and never raises."""
    try:
        listed = Path("/proc/sys/net/ipv4/tcp_available_ulp").read_text().split()
    except OSError:
        pytest.skip("this kernel does not list its upper layer protocols")
    problem = tuning.kernel_tls()
    if "tls" in listed:
        assert problem == ""
    else:
        assert problem.startswith("no kernel TLS: "), problem


def read_exactly(fd: int, n: int, timeout: float = 30.0) -> bytes:
    got = b""
    deadline = time.monotonic() + timeout
    while len(got) < n:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        assert ready, f"only {got!r} back in {timeout} s"
        chunk = os.read(fd, n - len(got))
        assert chunk, f"EOF after {got!r}"
        got += chunk
    return got


@pytest.fixture
def cat_worker(keys: Keys) -> Iterator[tuple[Proc, str]]:
    addr = f"{loopback_address()}:3010"
    # without the sandbox: the test reads the job's pipes as the worker's child (a
    # sandboxed job is the sandbox helper's)
    proc = start_worker(keys.worker, ["cat"], addr, "catter", "--no-sandbox")
    yield proc, addr
    proc.stop()


@needs_root
@pytest.mark.parametrize("agent", [True, False], ids=["agent", "no-agent"])
def test_a_running_jobs_channel_and_pipes_are_tuned(
    keys: Keys, cat_worker: tuple[Proc, str], agent: bool
) -> None:
    worker, addr = cat_worker
    stdin_r, stdin_w = os.pipe()
    stdout_r, stdout_w = os.pipe()
    options = () if agent else ("--no-agent",)
    client = subprocess.Popen(exec_argv(keys.client, [addr], *options), stdin=stdin_r,
                              stdout=stdout_w, stderr=subprocess.PIPE)
    os.close(stdin_r)
    os.close(stdout_w)
    try:
        # past the handover (tuning.HANDOVER): stdin and stdout move onto connections
        # of their own (rexnet.net.jobdata)
        head = b"x" * (tuning.HANDOVER + 4096) + b"ping\n"
        writer = threading.Thread(target=os.write, args=(stdin_w, head), daemon=True)
        writer.start()
        assert read_exactly(stdout_r, len(head)) == head  # the job runs: its channel is up
        writer.join()
        os.write(stdin_w, b"more\n")  # stdout's connection comes with its next bytes
        assert read_exactly(stdout_r, 5) == b"more\n"

        # the worker's end of the job channel and of its stdin and stdout connections,
        # and the client's (agent's or launcher's)
        deadline = time.monotonic() + 5
        while len(channels := established(worker.pid)) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(channels) == 3, channels
        for ours in channels:
            assert nodelay(worker.pid, ours.fd), "TCP_NODELAY not set on the worker's socket"
            client_pid, client_fd = owner_of(tuple(ours.raddr))
            assert client_pid == client.pid if not agent else client_pid != client.pid
            assert nodelay(client_pid, client_fd), "TCP_NODELAY not set on the client's socket"

        # the job's pipes (`cat`'s stdin and stdout) and the launcher's, widened
        jobs = psutil.Process(worker.pid).children()
        assert len(jobs) == 1, jobs
        assert pipe_size(jobs[0].pid, 0) == tuning.PIPE_SIZE
        assert pipe_size(jobs[0].pid, 1) == tuning.PIPE_SIZE
        assert pipe_size(os.getpid(), stdin_w) == tuning.PIPE_SIZE
        assert pipe_size(os.getpid(), stdout_r) == tuning.PIPE_SIZE
    finally:
        os.close(stdin_w)
        rest = b""
        while chunk := os.read(stdout_r, 65536):
            rest += chunk
        os.close(stdout_r)
        status = client.wait(30)
        err = client.stderr.read().decode() if client.stderr else ""
    assert status == 0, err
    assert rest == b""


def test_cproxy_splices_and_registration_links_are_tuned(
        bed: NetBed, keys: Keys, tmp_path: Path) -> None:
    """Both legs of the cproxy's splice of a running job, and the registration link at both
    ends (the tunnel's links are the same DatagramLink), have TCP_NODELAY set."""
    a, b = bed.add_subnet("a"), bed.add_subnet("b")
    client, proxy, far = (bed.add_host("client", [a]), bed.add_host("proxy", [a, b]),
                          bed.add_host("far", [b]))
    subprocess.run([REXNET, "keygen", "--issue", "relay", "--name", "cproxy", "--dir",
                    str(tmp_path), str(keys.ca)], check=True, capture_output=True)
    relay = Proc([TWISTD, "-n", "--pidfile=", "cproxy", "--listen", "0.0.0.0:3010",
                  "--register", "0.0.0.0:5010", "--credential",
                  str(tmp_path / f"{keys.app}.cproxy.relay")], popen=proxy.popen)
    relay.wait_for("cproxy listening on")
    worker = start_worker(keys.worker, ["cat"], "0.0.0.0:3010", "far",
                          "--register", f"{proxy.addr(b)}:5010", popen=far.popen)
    worker.wait_for("link up with", timeout=20)
    job = client.popen(exec_argv(keys.client, [f"{a.broadcast}:3010"]),
                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert job.stdin is not None and job.stdout is not None
    job.stdin.write(b"through the splice\n")
    job.stdin.flush()
    assert job.stdout.readline() == b"through the splice\n"

    # the worker: its registration link and the job's channel (through the relay)
    at_worker = connected_tcp(worker.pid)
    assert {peer[1] for _, peer, _ in at_worker.values()} >= {5010}, at_worker
    assert len(at_worker) == 2 and all(on for _, _, on in at_worker.values()), at_worker
    # the cproxy: the registration link, and the two legs of the job's splice
    at_relay = connected_tcp(relay.pid)
    assert len(at_relay) == 3 and all(on for _, _, on in at_relay.values()), at_relay
    job.stdin.close()
    assert job.stdout.read() == b""
    assert job.wait(30) == 0, job.stderr.read() if job.stderr else ""
