"""rexnet.net.tuning.send_now: what a peer waits on goes to the kernel at once, not on the
reactor's next turns. Twisted's TLS transport keeps small writes for a turn (through real
OpenSSL with mutual TLS, in memory with twisted.test.iosim and a Clock), and a socket
transport keeps its buffer until the reactor finds the socket writable (a real socket,
with the reactor not running)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any, cast

import pytest
from cluster import exec_argv, loopback_address, start_worker
from conftest import Keys
from test_bulktls import Sink, pair
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from rexnet.net.bulktls import tls_layer
from rexnet.net.tuning import send_now
from rexnet.protocol import wire
from rexnet.worker.job import EOF_HOLD, JobProcess


def test_a_small_tls_write_reaches_the_peer_without_a_turn_of_the_reactor(keys: Keys) -> None:
    server, client, pump = pair(keys)
    pump.flush()  # the handshake
    assert client.transport is not None
    client.transport.write(b"EXIT")
    pump.flush(advanceClock=False)
    assert server.received == b""  # Twisted keeps it for the next turn (the clock's)
    assert not send_now(client.transport)  # an in-memory transport: no socket to write
    pump.flush(advanceClock=False)
    assert server.received == b"EXIT"  # the TLS record was made and handed below at once


def test_without_it_the_small_write_waits_for_the_reactors_turn(keys: Keys) -> None:
    server, client, pump = pair(keys)
    pump.flush()
    assert client.transport is not None
    client.transport.write(b"EXIT")
    pump.flush(advanceClock=False)
    assert server.received == b""
    pump.flush()  # (advances the clock: the next turn)
    assert server.received == b"EXIT"


@pytest.fixture
def adopted() -> Iterator[tuple[Protocol, socket.socket]]:
    """A Twisted socket transport on one end of a real socket pair, in a reactor of its
    own that never runs (so only what send_now writes reaches the other end; the global
    reactor may run in another thread of this process, for the Python API's tests), and
    the other end."""
    from twisted.internet.epollreactor import EPollReactor

    reactor = EPollReactor()
    mine, theirs = socket.socketpair()
    proto = Protocol()
    reactor.adoptStreamConnection(mine.fileno(), socket.AF_UNIX,
                                  Factory.forProtocol(lambda: proto))
    mine.close()  # the transport has its own copy
    theirs.setblocking(False)
    yield proto, theirs
    reactor.removeAll()
    proto.transport.socket.close()  # type: ignore[union-attr]
    reactor.waker.connectionLost(None)  # type: ignore[union-attr]
    theirs.close()


def test_the_socket_transports_buffer_goes_to_the_kernel_at_once(
        adopted: tuple[Protocol, socket.socket]) -> None:
    proto, theirs = adopted
    assert proto.transport is not None
    proto.transport.write(b"exit 0")
    with pytest.raises(BlockingIOError):
        theirs.recv(100)  # kept for the reactor's next turn
    assert send_now(proto.transport)
    assert theirs.recv(100) == b"exit 0"
    assert not send_now(proto.transport)  # nothing left to write


def test_a_closing_transport_is_left_to_the_reactor(
        adopted: tuple[Protocol, socket.socket]) -> None:
    proto, theirs = adopted
    assert proto.transport is not None
    proto.transport.write(b"bye")
    proto.transport.loseConnection()
    assert not send_now(proto.transport)
    with pytest.raises(BlockingIOError):
        theirs.recv(100)


def test_a_transport_without_a_socket_is_left_alone() -> None:
    assert not send_now(None)
    assert not send_now(Sink().transport)


def test_the_private_attributes_it_reads_still_exist(keys: Keys) -> None:
    """send_now flushes BufferingTLSTransport._aggregator and reads
    FileDescriptor._tempDataBuffer (Twisted's): a release that renames one makes it
    flush less, silently; this test names the attribute instead."""
    from twisted.internet import abstract

    _, client, _ = pair(keys)
    tls = tls_layer(client.transport)
    assert tls is not None
    assert callable(getattr(getattr(tls, "_aggregator", None), "flush", None)), (
        "twisted.protocols.tls.BufferingTLSTransport has no _aggregator.flush: "
        "rexnet/net/tuning.py send_now flushes it")
    assert isinstance(getattr(abstract.FileDescriptor(), "_tempDataBuffer", None), list), (
        "twisted.internet.abstract.FileDescriptor has no _tempDataBuffer: "
        "rexnet/net/tuning.py send_now reads it")


def test_a_workers_job_lines_keep_their_order_for_short_and_long_jobs(keys: Keys) -> None:
    """Through a real worker: `sleep 2` logs started (while it runs), then ended; `true`,
    over within rexnet.worker.jobbooks.LINE_HOLD, one line that says both, in that
    order."""
    addr = f"{loopback_address()}:3010"
    worker = start_worker(keys.worker, ["sh", "-c"], addr, "booked", "--allow-args")
    env = {**os.environ, "REXNET_NO_AGENT": "1"}  # one process: the job's own client
    try:
        done = subprocess.run([*exec_argv(keys.client, [addr]), "--", "true"], env=env,
                              capture_output=True, timeout=60)
        assert done.returncode == 0, done.stderr
        short = worker.wait_for(r"job (\w+) started for client .*'true'\], ended after "
                                r"[0-9.]+ s: exit 0")
        long = subprocess.Popen([*exec_argv(keys.client, [addr]), "--", "sleep 2"], env=env)
        started = worker.wait_for(r"job (\w+) started for client .*'sleep 2'")
        assert long.poll() is None
        assert long.wait(timeout=60) == 0
        worker.wait_for(rf"job {started[1]} ended")
        lines = re.findall(r"job (\w+) (started|ended)", worker.output)
        assert {job for job, _ in lines} == {short[1], started[1]}
        assert [what for j, what in lines if j == started[1]] == ["started", "ended"]
        assert [what for j, what in lines if j == short[1]] == ["started"]  # its one line
    finally:
        worker.stop()


class _Out:
    def __init__(self, fd: int, said: list[str]) -> None:
        self.fd, self.said = fd, said

    def close(self) -> None:
        self.said.append(f"EOF {self.fd}")


def _job_with_outputs(said: list[str]) -> tuple[JobProcess, Clock]:
    """A job's protocol on a channel that notes its outputs' EOFs, with stdout and stderr
    open, and a Clock for its timers."""
    clock = Clock()
    channel = SimpleNamespace(ins={}, outs={1: _Out(1, said), 2: _Out(2, said)})
    proto = JobProcess(cast(Any, channel), clock,
                       lambda code, sig, limit: said.append(f"EXIT {code}"), wire.Start())
    proto.open_outputs = {1, 2}
    return proto, clock


def test_outputs_at_their_end_wait_a_little_for_the_jobs_end_to_go_with_exit() -> None:
    said: list[str] = []
    proto, clock = _job_with_outputs(said)
    proto.childConnectionLost(1)
    proto.childConnectionLost(2)
    assert said == []  # held: the process's end comes next (a `true`)
    proto.processEnded(Failure(ProcessDone(0)))
    assert said == ["EOF 1", "EOF 2", "EXIT 0"]  # in this order, in one turn
    clock.advance(EOF_HOLD)
    assert said == ["EOF 1", "EOF 2", "EXIT 0"]  # and once

    said.clear()  # a job that closes its outputs and runs on: its EOFs go after EOF_HOLD
    proto, clock = _job_with_outputs(said)
    proto.childConnectionLost(2)
    clock.advance(EOF_HOLD / 2)
    proto.childConnectionLost(1)
    clock.advance(EOF_HOLD / 2)
    assert said == ["EOF 2", "EOF 1"]
    proto.processEnded(Failure(ProcessTerminated(exitCode=3)))
    assert said == ["EOF 2", "EOF 1", "EXIT 3"]
