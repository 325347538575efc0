"""The client job's state machine, in process: a MemoryReactorClock (its SSL port, a UDP
port that keeps what is sent, the clock), channels on StringTransports that show a real
peer certificate (the identity check is the real one), and real frames from rexnet.protocol.wire.
Every transition of rexnet.client.machine is taken, including the odd ones."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import Keys
from OpenSSL import crypto
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import ILogObserver, Logger, formatEvent
from twisted.python.failure import Failure
from zope.interface import provider

from rexnet.client import machine
from rexnet.client.channel import HANDSHAKE_TIMEOUT, ClientChannel
from rexnet.client.connectback import BACKLOG, EARLY_GRACE, waiting
from rexnet.client.job import ClientJob
from rexnet.client.jobcore import RESEND
from rexnet.client.pystreams import BytesStreams
from rexnet.client.results import (
    AuthFailed,
    Interrupted,
    JobFailed,
    JobRefused,
    JobResult,
    LimitHit,
    NoWorker,
    WorkerLost,
)
from rexnet.client.warm import WarmPool
from rexnet.net.alerts import AlertSender
from rexnet.protocol import exitcodes, wire
from rexnet.security.credentials import load_credential

TARGET = ("127.0.0.1", 3010)


class UDPPort:
    """A UDP port of the fake reactor: keeps what is sent."""

    def __init__(self, protocol: Any) -> None:
        self.sent: list[tuple[bytes, tuple[str, int]]] = []
        self.listening = True
        protocol.makeConnection(self)

    def write(self, data: bytes, addr: tuple[str, int]) -> None:
        self.sent.append((data, addr))

    def setBroadcastAllowed(self, enabled: bool) -> None:
        pass

    def stopListening(self) -> None:
        self.listening = False


class TCPPort:
    """A listening port of the fake reactor."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.listening = True

    def getHost(self) -> IPv4Address:
        return IPv4Address("TCP", "127.0.0.1", self.port)

    def stopListening(self) -> None:
        self.listening = False


class Reactor(MemoryReactorClock):
    """MemoryReactorClock with listenUDP, and listening ports that have a number."""

    def __init__(self) -> None:
        super().__init__()
        self.udp: list[UDPPort] = []
        self.ports: list[TCPPort] = []

    def listenSSL(self, port: int, factory: Any, contextFactory: Any, backlog: int = 50,
                  interface: str = "") -> TCPPort:
        super().listenSSL(port, factory, contextFactory, backlog, interface)
        self.ports.append(TCPPort(45000 + len(self.ports)))
        return self.ports[-1]

    def listenUDP(self, port: int, protocol: Any, interface: str = "",
                  maxPacketSize: int = 8192) -> UDPPort:
        self.udp.append(UDPPort(protocol))
        return self.udp[-1]


class TLSTransport(StringTransport):
    """A connection whose TLS handshake the test completes: it shows PEER's certificate."""

    def __init__(self, peer: crypto.X509, port: int) -> None:
        super().__init__(peerAddress=IPv4Address("TCP", "127.0.0.2", port))
        self.peer = peer

    def getPeerCertificate(self) -> crypto.X509:
        return self.peer


class HeldStreams(BytesStreams):
    """BytesStreams whose local writing ends only when the test says (as a slow pipe)."""

    def __init__(self) -> None:
        super().__init__(b"")
        self.written: defer.Deferred[None] = defer.Deferred()

    def finish(self) -> defer.Deferred[Any]:
        super().finish()
        return self.written


@dataclass
class Worker:
    """A worker's end of one connect-back: frames in, frames out."""

    channel: ClientChannel
    transport: TLSTransport
    decoder: wire.FrameDecoder = field(default_factory=wire.FrameDecoder)

    def verify(self) -> None:
        self.channel.handshakeCompleted()

    def send(self, *frames: wire.Frame) -> None:
        self.channel.dataReceived(b"".join(wire.encode_frame(f) for f in frames))

    def received(self) -> list[wire.Frame]:
        data = self.transport.value()
        self.transport.clear()
        return [f for f in self.decoder.feed(data) if not isinstance(f, wire.Ping)]

    def lose(self) -> None:
        self.channel.connectionLost(Failure(ConnectionDone("closed")))

    @property
    def aborted(self) -> bool:
        return bool(self.transport.disconnected)


@dataclass
class Bed:
    """One job on the fake reactor, with what it said, logged and did."""

    reactor: Reactor
    job: ClientJob
    streams: BytesStreams
    said: list[str]
    logged: list[str]
    transitions: list[tuple[str, str, str]]
    certs: dict[str, crypto.X509]
    outcome: list[object] = field(default_factory=list)
    ports: int = 40000

    def run(self) -> None:
        self.job.run().addBoth(self.outcome.append)

    @property
    def states(self) -> list[str]:
        return [new for _, _, new in self.transitions]

    def connect(self, who: str = "worker") -> Worker:
        factory = self.reactor.sslServers[-1][1]
        self.ports += 1
        transport = TLSTransport(self.certs[who], self.ports)
        channel = factory.buildProtocol(transport.getPeer())
        channel.makeConnection(transport)
        return Worker(channel, transport)

    def worker(self, name: str = "w1", load: float = 0.1) -> Worker:
        """A worker that connects back, is verified and says HELLO."""
        worker = self.connect()
        worker.verify()
        worker.send(wire.Hello(name, "1", load, 2.0, 4, 0))
        return worker

    def datagrams(self) -> list[object]:
        return [wire.decode_datagram(d).message for port in self.reactor.udp
                for d, _ in port.sent]

    def result(self) -> JobResult:
        assert len(self.outcome) == 1 and isinstance(self.outcome[0], JobResult), self.outcome
        return self.outcome[0]

    def failure(self) -> JobFailed:
        assert len(self.outcome) == 1 and isinstance(self.outcome[0], Failure), self.outcome
        error = self.outcome[0].value
        assert isinstance(error, JobFailed)
        return error


@pytest.fixture(scope="module")
def certs(keys: Keys, other_keys: Keys) -> dict[str, crypto.X509]:
    return {"worker": crypto.X509.from_cryptography(load_credential(keys.worker,
                                                                    "worker").cert),
            "other app": crypto.X509.from_cryptography(load_credential(other_keys.worker,
                                                                       "worker").cert)}


def make_bed(keys: Keys, certs: dict[str, crypto.X509], request: wire.Start | None = None,
             streams: BytesStreams | None = None, pool: WarmPool | None = None,
             reactor: Reactor | None = None, targets: list[tuple[str, int]] | None = None,
             timeout: float = 5.0, alert_targets: list[tuple[str, int]] | None = None) -> Bed:
    reactor = reactor or Reactor()
    credential = load_credential(keys.client, "client")
    said: list[str] = []
    logged: list[str] = []
    started: list[tuple[str, str]] = []
    streams = streams or BytesStreams(b"input")
    job = ClientJob(reactor, credential, targets or [TARGET], request or wire.Start(("x",)),
                    streams, timeout, say=said.append,
                    alerts=AlertSender(reactor, credential, alert_targets or []), pool=pool,
                    logger=Logger(observer=provider(ILogObserver)(
                        lambda e: logged.append(formatEvent(e)))),
                    on_started=lambda *names: started.append(names))
    bed = Bed(reactor, job, streams, said, logged, [], certs)
    job.trace(lambda old, symbol, new: bed.transitions.append((old, symbol, new)))
    return bed


# -- looking ----------------------------------------------------------------------------


def test_the_job_is_announced_again_with_backoff_until_the_timeout(
        keys: Keys, certs: dict[str, crypto.X509]) -> None:
    bed = make_bed(keys, certs, timeout=1.0)
    bed.run()
    assert bed.transitions == [("idle", "look", "looking")]
    bed.reactor.advance(RESEND(0))
    bed.reactor.advance(RESEND(1))
    announces = bed.datagrams()
    assert [a.seq for a in announces] == [0, 1, 2]  # type: ignore[attr-defined]
    assert all(isinstance(a, wire.Announce) for a in announces)
    bed.reactor.advance(1.0)
    assert isinstance(bed.failure(), NoWorker)
    assert "no worker answered within 1 s (announced to 127.0.0.1:3010)" in str(bed.failure())
    assert bed.states[-1] == "done" and not bed.reactor.udp[0].listening
    assert not bed.reactor.ports[0].listening
    assert announces[0].port == 45000  # type: ignore[attr-defined]
    bed.reactor.advance(10)
    assert len(bed.datagrams()) == len(announces) + 1  # no announcing after the end


def test_no_reachable_target_fails_at_once(keys: Keys,
                                           certs: dict[str, crypto.X509]) -> None:
    bed = make_bed(keys, certs, targets=[("fe80::1", 3010)])  # no scope: no route
    bed.run()
    assert bed.states == ["looking", "done"]
    assert "no announce target can be reached from this host: fe80::1:3010" in str(
        bed.failure())


def test_timeout_while_handshaking_aborts_the_pending_handshake(
        keys: Keys, certs: dict[str, crypto.X509]) -> None:
    bed = make_bed(keys, certs, timeout=1.0)
    bed.run()
    slow = bed.connect()  # TLS under way, never finished
    assert bed.states == ["looking", "handshaking"]
    bed.reactor.advance(1.0)
    assert isinstance(bed.failure(), NoWorker) and slow.aborted
    assert bed.transitions[-1] == ("handshaking", "timed_out", "done")
    slow.lose()  # its loss after the end is no complaint
    # (its early TAKEN's grace ran out first: the job was announced again)
    assert bed.logged == ["complaint: the first connection (127.0.0.2:40001) was not "
                          "verified within 500 ms: announcing the job again"]


def test_failed_handshakes_complain_and_the_job_keeps_looking_until_auth_fails(
        keys: Keys, certs: dict[str, crypto.X509]) -> None:
    bed = make_bed(keys, certs, timeout=30.0)
    bed.run()
    impostor = bed.connect("other app")
    impostor.verify()  # the identity check refuses it
    assert impostor.aborted
    impostor.lose()
    assert bed.transitions[-2:] == [("handshaking", "lost", "handshaking"),
                                    ("handshaking", "none_pending", "looking")]
    silent = bed.connect()
    bed.reactor.advance(HANDSHAKE_TIMEOUT)
    assert silent.aborted
    assert any("refused: peer certificate is not a worker.testapp.rexnet credential" in line
               for line in bed.logged), bed.logged
    assert any("no TLS handshake in time" in line for line in bed.logged), bed.logged
    bed.reactor.advance(30)
    error = bed.failure()
    assert isinstance(error, AuthFailed) and error.exit_code == exitcodes.AUTH_FAILED
    assert "connection(s) failed authentication" in str(error)
    assert not any(f for w in (impostor, silent) for f in w.received())  # nothing leaked


def test_an_unverified_first_connection_costs_one_early_grace_then_a_new_job_id(
        keys: Keys, certs: dict[str, crypto.X509]) -> None:
    """An early TAKEN cancels the honest workers' connect-backs: a connection that never
    finishes its handshake makes the job announced again, under a new id, once."""
    bed = make_bed(keys, certs, timeout=30.0)
    bed.run()
    silent = bed.connect()  # TCP only, as anyone who saw the announcement could
    first: list[Any] = bed.datagrams()
    assert [type(d) for d in first] == [wire.Announce, wire.Taken]
    assert first[1].early and first[1].job_id == first[0].job_id
    bed.reactor.advance(EARLY_GRACE * 0.99)  # (resends of the same job meanwhile)
    assert {d.job_id for d in bed.datagrams()} == {first[0].job_id}  # type: ignore[attr-defined]
    bed.reactor.advance(EARLY_GRACE * 0.02)
    again: Any = bed.datagrams()[-1]
    assert isinstance(again, wire.Announce) and again.job_id != first[0].job_id
    assert any("was not verified within 500 ms: announcing the job again" in line
               for line in bed.logged), bed.logged
    another = bed.connect()  # no second early TAKEN (nor a second reopening)
    bed.reactor.advance(EARLY_GRACE * 2)
    assert sum(isinstance(d, wire.Taken) for d in bed.datagrams()) == 1
    assert len({d.job_id for d in bed.datagrams()}) == 2  # type: ignore[attr-defined]
    assert not silent.aborted and bed.states[-1] == "handshaking"
    another.verify()
    taken: list[Any] = [d for d in bed.datagrams() if isinstance(d, wire.Taken)][1:]
    # the final TAKEN for both ids: workers still waiting under the first id cancel too
    assert sorted(t.job_id for t in taken) == sorted([first[0].job_id, again.job_id])
    assert not any(t.early for t in taken)
    assert silent.aborted and another.received() == [wire.Start(("x",))]


def test_the_early_taken_leaves_at_accept_signed_as_the_job_was_announced(
        keys: Keys, certs: dict[str, crypto.X509]) -> None:
    """The early TAKEN leaves as the port accepts the first connect-back, before the
    connection's TLS layer is built (buildProtocol), and it is the datagram signed when
    the job was announced (its timestamp says so), not one signed on the TAKEN's path."""
    bed = make_bed(keys, certs)
    bed.job.core.takens.now = lambda: int(bed.reactor.seconds() * 1000)
    bed.run()
    bed.reactor.advance(RESEND(0) * 0.6)  # answered before the first resend
    factory = bed.reactor.sslServers[-1][1]
    channel = factory.buildProtocol(IPv4Address("TCP", "127.0.0.2", 40001))
    sent: list[Any] = bed.datagrams()
    assert [type(d) for d in sent] == [wire.Announce, wire.Taken]
    assert (sent[1].early, sent[1].answered, sent[1].job_id) == (True, 1, sent[0].job_id)
    assert sent[1].ts_ms == 0 < int(bed.reactor.seconds() * 1000)
    channel.makeConnection(TLSTransport(certs["worker"], 40001))  # now the TLS layer
    assert len(bed.datagrams()) == 2 and bed.states[-1] == "handshaking"


def test_a_prepared_taken_that_no_longer_fits_is_signed_afresh(
        keys: Keys, certs: dict[str, crypto.X509]) -> None:
    """The prepared TAKEN counts one connect-back; if the count at the accept differs
    (refused connect-backs count too), the early TAKEN is signed as it leaves."""
    bed = make_bed(keys, certs, timeout=30.0)
    takens = bed.job.core.takens
    takens.now = lambda: int(bed.reactor.seconds() * 1000)
    bed.run()
    takens.prepare(bed.job.core.job_id, 5)  # as if 4 connect-backs had been refused
    bed.reactor.advance(0.01)
    bed.connect()
    taken: Any = bed.datagrams()[-1]
    assert isinstance(taken, wire.Taken) and taken.early and taken.answered == 1
    assert taken.ts_ms == 10


def test_a_first_connection_lost_unverified_reannounces_at_once(
        keys: Keys, certs: dict[str, crypto.X509]) -> None:
    bed = make_bed(keys, certs, timeout=30.0)
    bed.run()
    impostor = bed.connect("other app")
    impostor.verify()  # refused by the identity check
    impostor.lose()
    sent: list[Any] = bed.datagrams()
    assert [type(d) for d in sent] == [wire.Announce, wire.Taken, wire.Announce]
    assert len({d.job_id for d in sent}) == 2
    bed.reactor.advance(EARLY_GRACE * 2)  # the grace was stopped: no second reopening
    assert sum(isinstance(d, wire.Announce) and d.seq == 1 for d in bed.datagrams()) == 1
    bed.worker()
    assert bed.states[-1] == "chosen"


def test_the_first_verified_worker_wins_and_the_others_are_told(
        keys: Keys, certs: dict[str, crypto.X509]) -> None:
    bed = make_bed(keys, certs)
    bed.run()
    pending, verified = bed.connect(), bed.connect()
    verified.verify()  # wins: the first verified
    assert bed.transitions[1:4] == [("looking", "connected", "handshaking"),
                                    ("handshaking", "connected", "handshaking"),
                                    ("handshaking", "verified", "chosen")]
    assert verified.received() == [wire.Start(("x",))]
    assert pending.aborted and pending.received() == []
    taken = [d for d in bed.datagrams() if isinstance(d, wire.Taken)]
    # early (as the first connection was accepted, before TLS), then final (verified)
    assert [(t.early, t.answered) for t in taken] == [(True, 1), (False, 2)]
    assert taken[0].job_id == taken[1].job_id
    assert not bed.reactor.ports[0].listening
    late = bed.connect()  # accepted as the port closed
    late.verify()  # a second worker verified after one was chosen: told busy
    assert bed.transitions[4:] == [("chosen", "connected", "chosen"),
                                   ("chosen", "verified", "chosen")]
    assert late.received() == [wire.Busy()] and late.transport.disconnecting
    pending.lose()  # closed by us: no complaint
    late.send(wire.Started("late"))  # a loser's frames are ignored
    late.lose()
    assert not bed.logged and bed.states[-1] == "chosen"


# -- the job on its worker ----------------------------------------------------------------


def test_a_job_runs_and_its_status_comes_back_after_its_output(
        keys: Keys, certs: dict[str, crypto.X509]) -> None:
    streams = HeldStreams()
    bed = make_bed(keys, certs, streams=streams)
    bed.run()
    worker = bed.worker("w1")
    worker.received()
    worker.send(wire.Started("job1"), wire.Data(1, b"out"))
    assert bed.states[-1] == "running"
    assert any("job job1 runs on worker w1 (127.0.0.2:" in s for s in bed.said), bed.said
    worker.send(wire.Exit(3, None))  # EXIT before all output is written locally
    assert bed.states[-1] == "draining" and not bed.outcome
    worker.send(wire.Hello("w1", "1", 0.1, 0.0, 4, 0))  # a late report changes nothing
    streams.written.callback(None)
    result = bed.result()
    assert (result.status, result.worker, result.job) == (3, "w1", "job1")
    assert streams.stdout.getvalue() == b"out" and bed.states[-1] == "done"
    assert worker.transport.disconnecting  # no pool: the channel is closed


def test_the_owner_has_the_result_before_the_job_finished_alert_which_is_sent_once(
        keys: Keys, certs: dict[str, crypto.X509]) -> None:
    """The alert is signed and sent after the result is delivered (an agent's launcher is
    told its status first), and it is still sent, once, even if the owner stops at once."""
    bed = make_bed(keys, certs, alert_targets=[("127.0.0.9", 3011)])

    def alerts() -> list[wire.Alert]:
        return [m for m in bed.datagrams() if isinstance(m, wire.Alert)]

    at_result: list[int] = []
    bed.job.run().addCallback(lambda result: at_result.append(len(alerts())))
    worker = bed.worker("w1")
    worker.send(wire.Started("job1"), wire.Exit(0, None))
    assert at_result == [0]
    (alert,) = alerts()
    assert alert.event == "job-finished" and dict(alert.fields)["job"] == "job1"
    assert dict(alert.fields)["status"] == 0
    worker.send(wire.Hello("w1", "1", 0.1, 0.0, 4, 0))
    bed.reactor.advance(60)
    assert len(alerts()) == 1
    assert not any(port.listening for port in bed.reactor.udp)  # its UDP ports are closed


def test_signals_before_start_are_kept_and_sent_once_the_job_runs(
        keys: Keys, certs: dict[str, crypto.X509]) -> None:
    bed = make_bed(keys, certs, request=wire.Start(("x",), tty=True, rows=24, cols=80))
    bed.run()
    bed.job.resize(50, 132)  # no worker yet: the job starts with the new size
    worker = bed.worker()
    assert worker.received() == [wire.Start(("x",), tty=True, rows=50, cols=132)]
    bed.job.send_signal(2)  # START sent, STARTED not yet: kept
    bed.job.resize(40, 100)
    assert worker.received() == [wire.Winsize(40, 100)]
    worker.send(wire.Started("j"))
    assert wire.Signal(2) in worker.received()
    bed.job.send_signal(15)
    assert worker.received() == [wire.Signal(15)]
    assert ("chosen", "signal", "chosen") in bed.transitions
    assert ("running", "signal", "running") in bed.transitions


@pytest.mark.parametrize("number", [2, 15])
def test_a_signal_before_a_worker_is_chosen_ends_the_job(
        keys: Keys, certs: dict[str, crypto.X509], number: int) -> None:
    bed = make_bed(keys, certs)
    bed.run()
    pending = bed.connect()
    bed.job.send_signal(number)
    error = bed.failure()
    assert isinstance(error, Interrupted) and error.exit_code == 128 + number
    assert bed.transitions[-1] == ("handshaking", "signal", "done") and pending.aborted
    bed.job.run()  # the machine is done: nothing happens
    assert len(bed.reactor.sslServers) == 1


def test_a_signal_before_run_ends_the_job_and_run_does_nothing(
        keys: Keys, certs: dict[str, crypto.X509]) -> None:
    bed = make_bed(keys, certs)
    bed.job.send_signal(2)
    bed.run()
    assert isinstance(bed.failure(), Interrupted) and not bed.reactor.sslServers
    assert bed.transitions == [("idle", "signal", "done"), ("done", "look", "done")]


def test_error_before_started_is_a_refusal(keys: Keys,
                                           certs: dict[str, crypto.X509]) -> None:
    bed = make_bed(keys, certs)
    bed.run()
    worker = bed.worker()
    worker.send(wire.Error("args", "extra arguments are not allowed"))
    error = bed.failure()
    assert isinstance(error, JobRefused) and error.exit_code == exitcodes.REFUSED
    assert "worker 127.0.0.2:" in str(error) and "extra arguments" in str(error)
    assert bed.transitions[-1] == ("chosen", "error", "done")


def test_a_worker_error_racing_the_close_keeps_the_output_and_names_the_error(
        keys: Keys, certs: dict[str, crypto.X509]) -> None:
    bed = make_bed(keys, certs)
    bed.run()
    worker = bed.worker("w1")
    worker.send(wire.Started("j"), wire.Data(1, b"last words"),
                wire.Error("stopping", "the worker is stopping"))
    assert bed.states[-1] == "ending" and not bed.outcome
    worker.send(wire.Data(2, b"more"))
    worker.lose()
    error = bed.failure()
    assert isinstance(error, WorkerLost)
    assert str(error) == "lost worker w1 before the job finished: the worker is stopping"
    assert bed.streams.stdout.getvalue() == b"last words"
    assert bed.streams.stderr.getvalue() == b"more"
    assert bed.transitions[-2:] == [("ending", "worker_lost", "draining"),
                                    ("draining", "drained", "done")]


def test_a_worker_error_then_exit_is_a_lost_worker(keys: Keys,
                                                   certs: dict[str, crypto.X509]) -> None:
    bed = make_bed(keys, certs)
    bed.run()
    worker = bed.worker()
    worker.send(wire.Started("j"), wire.Error("stopping", "first"),
                wire.Error("stopping", "going down"), wire.Exit(None, 15))
    assert str(bed.failure()) == "lost worker: going down"
    assert ("ending", "error", "ending") in bed.transitions


@pytest.mark.parametrize("limit, code", [("time", exitcodes.TIME_LIMIT),
                                         ("memory", exitcodes.MEMORY_LIMIT)])
def test_a_job_ended_for_a_limit(keys: Keys, certs: dict[str, crypto.X509], limit: str,
                                 code: int) -> None:
    bed = make_bed(keys, certs)
    bed.run()
    worker = bed.worker()
    worker.send(wire.Started("j"), wire.Exit(None, 9, limit))
    error = bed.failure()
    assert isinstance(error, LimitHit) and error.exit_code == code
    assert f"it hit its {limit} limit" in str(error)


def test_exit_before_started_still_ends_the_job(keys: Keys,
                                                certs: dict[str, crypto.X509]) -> None:
    bed = make_bed(keys, certs)
    bed.run()
    worker = bed.worker("w1")
    worker.send(wire.Exit(0, None))
    assert bed.result().job == "?"
    assert ("chosen", "exited", "draining") in bed.transitions


def test_the_chosen_worker_lost_before_exit(keys: Keys,
                                           certs: dict[str, crypto.X509]) -> None:
    bed = make_bed(keys, certs)
    bed.run()
    worker = bed.worker("w1")
    worker.lose()
    assert str(bed.failure()) == "lost worker w1 before the job finished"
    assert ("chosen", "worker_lost", "draining") in bed.transitions
    bed2 = make_bed(keys, certs)
    bed2.run()
    worker2 = bed2.worker("w2")
    worker2.send(wire.Started("j"))
    worker2.lose()
    assert isinstance(bed2.failure(), WorkerLost)
    assert ("running", "worker_lost", "draining") in bed2.transitions


@pytest.mark.parametrize("frame", [wire.Start(), wire.Started("again"), wire.Busy()])
def test_a_frame_out_of_place_is_a_protocol_error(
        keys: Keys, certs: dict[str, crypto.X509], frame: wire.Frame) -> None:
    bed = make_bed(keys, certs)
    bed.run()
    worker = bed.worker()
    worker.send(wire.Started("j"))
    worker.received()
    worker.send(frame)
    sent = worker.received()
    assert len(sent) == 1 and isinstance(sent[0], wire.Error)
    assert sent[0].message == f"unexpected {type(frame).__name__} frame"
    assert worker.aborted
    worker.lose()
    assert isinstance(bed.failure(), WorkerLost)


def test_a_second_exit_while_draining_is_a_protocol_error(
        keys: Keys, certs: dict[str, crypto.X509]) -> None:
    streams = HeldStreams()
    reactor = Reactor()
    bed = make_bed(keys, certs, streams=streams, pool=WarmPool(reactor), reactor=reactor)
    bed.run()
    worker = bed.worker()
    worker.send(wire.Started("j"), wire.Exit(0, None), wire.Error("x", "late"))
    worker.received()
    worker.send(wire.Exit(1, None))
    assert worker.aborted and ("draining", "exited", "draining") in bed.transitions
    worker.lose()  # its output drains all the same
    streams.written.callback(None)
    assert bed.result().status == 0


def test_abandon_aborts_the_chosen_channel(keys: Keys,
                                          certs: dict[str, crypto.X509]) -> None:
    bed = make_bed(keys, certs)
    bed.run()
    worker = bed.worker()
    worker.send(wire.Started("j"))
    bed.job.abandon()
    error = bed.failure()
    assert isinstance(error, Interrupted) and error.exit_code == exitcodes.WORKER_LOST
    assert worker.aborted and bed.transitions[-1] == ("running", "abandon", "done")
    bed.job.abandon()  # done: nothing more
    assert len(bed.outcome) == 1


# -- warm channels ----------------------------------------------------------------------


def warm_pool(keys: Keys, certs: dict[str, crypto.X509]) -> tuple[WarmPool, Reactor, Worker]:
    """A pool holding the channel of a first job (its worker idle, with a fresh HELLO)."""
    reactor = Reactor()
    pool = WarmPool(reactor)
    first = make_bed(keys, certs, pool=pool, reactor=reactor)
    first.run()
    worker = first.worker("w1", load=0.1)
    assert worker.received() == [wire.Start(("x",), keep=True)]
    worker.send(wire.Started("j1"), wire.Exit(0, None))
    assert first.result().status == 0 and pool.parked(worker.channel)
    assert not worker.transport.disconnecting
    assert worker.received() == [wire.Data(0, b"input"), wire.Eof(0)]
    worker.send(wire.Hello("w1", "1", 0.1, 0.0, 4, 0))  # idle: its load reports go on
    return pool, reactor, worker


def test_a_warm_channel_runs_the_next_job_and_goes_back_to_the_pool(
        keys: Keys, certs: dict[str, crypto.X509]) -> None:
    pool, reactor, worker = warm_pool(keys, certs)
    bed = make_bed(keys, certs, pool=pool, reactor=reactor)
    bed.run()
    assert bed.transitions == [("idle", "reuse", "reusing")]
    assert worker.received() == [wire.Start(("x",), keep=True)]
    worker.send(wire.Started("j2"), wire.Data(1, b"two"), wire.Exit(0, None))
    assert bed.result().job == "j2" and bed.streams.stdout.getvalue() == b"two"
    assert any("reused warm channel (its load 0.10" in s for s in bed.said), bed.said
    assert pool.parked(worker.channel) and pool.reused == 1
    assert len(reactor.sslServers) == 1  # the second job never announced


def test_busy_on_a_warm_channel_announces_the_job(keys: Keys,
                                                 certs: dict[str, crypto.X509]) -> None:
    pool, reactor, worker = warm_pool(keys, certs)
    bed = make_bed(keys, certs, pool=pool, reactor=reactor)
    bed.run()
    worker.send(wire.Busy())
    assert bed.transitions[-1] == ("reusing", "busy", "looking")
    assert bed.said == ["warm channel to worker w1 has no free slot: announcing the job"]
    assert worker.transport.disconnecting and len(reactor.sslServers) == 2
    worker.lose()  # given up: no effect on the job
    other = bed.worker("w2")
    other.send(wire.Started("j"), wire.Exit(0, None))
    assert bed.result().worker == "w2"


def test_a_warm_channel_that_dies_before_started_announces_the_job(
        keys: Keys, certs: dict[str, crypto.X509]) -> None:
    pool, reactor, worker = warm_pool(keys, certs)
    bed = make_bed(keys, certs, pool=pool, reactor=reactor)
    bed.run()
    bed.job.send_signal(2)  # kept for whichever worker runs the job
    worker.lose()
    assert bed.transitions[-1] == ("reusing", "worker_lost", "looking")
    assert bed.said == ["warm channel to worker w1 was lost before the job started: "
                        "announcing the job"]
    assert not pool.records
    other = bed.worker("w2")
    other.received()
    other.send(wire.Started("j"))
    assert wire.Signal(2) in other.received()


def test_an_idle_channel_lost_leaves_the_pool(keys: Keys,
                                             certs: dict[str, crypto.X509]) -> None:
    pool, _, worker = warm_pool(keys, certs)
    worker.send(wire.Started("stray"), wire.Busy())  # late frames while idle: ignored
    worker.lose()
    assert not pool.records and pool.take(next(iter([None]))) is None


# -- every input in every state -----------------------------------------------------------

SEARCHING = ["idle", "looking", "handshaking"]
ENGAGED = ["chosen", "reusing", "running", "ending", "draining"]


def reach(keys: Keys, certs: dict[str, crypto.X509], state: str) -> tuple[Bed, Worker | None]:
    """A job (with a pool, its output held) brought to STATE; its worker, if it has one."""
    if state == "reusing":
        pool, reactor, worker = warm_pool(keys, certs)
    else:
        reactor = Reactor()
        pool, worker = WarmPool(reactor), None
    bed = make_bed(keys, certs, streams=HeldStreams(), pool=pool, reactor=reactor)
    if state == "idle":
        bed.job.result.addBoth(bed.outcome.append)
    else:
        bed.run()
    if state == "handshaking":
        bed.connect()
    if state in ("chosen", "running", "ending", "draining"):
        worker = bed.worker("w1")
    if state in ("running", "ending", "draining"):
        assert worker is not None
        worker.send(wire.Started("j"))
    if state == "ending":
        assert worker is not None
        worker.send(wire.Error("stopping", "stopping"))
    if state == "draining":
        assert worker is not None
        worker.send(wire.Exit(0, None))
    assert (bed.states or ["idle"])[-1] == state, bed.transitions
    if worker is not None:
        worker.received()
    return bed, worker


@pytest.mark.parametrize("state", SEARCHING + ENGAGED)
def test_abandon_in_every_state(keys: Keys, certs: dict[str, crypto.X509], state: str) -> None:
    bed, worker = reach(keys, certs, state)
    bed.job.abandon()
    error = bed.failure()
    assert isinstance(error, Interrupted) and error.exit_code == exitcodes.WORKER_LOST
    assert bed.transitions[-1] == (state, "abandon", "done")
    assert worker is None or worker.aborted


@pytest.mark.parametrize("state", SEARCHING + ENGAGED)
def test_signal_and_resize_in_every_state(keys: Keys, certs: dict[str, crypto.X509],
                                          state: str) -> None:
    bed, worker = reach(keys, certs, state)
    bed.job.resize(30, 90)
    assert bed.transitions[-1] == (state, "resize", state)
    if worker is not None:
        assert worker.received() == [wire.Winsize(30, 90)]
    bed.job.send_signal(1)
    if state in SEARCHING:
        error = bed.failure()
        assert isinstance(error, Interrupted) and error.exit_code == 129
        assert bed.transitions[-1] == (state, "signal", "done")
        return
    assert worker is not None
    assert bed.transitions[-1] == (state, "signal", state)
    kept = state in ("chosen", "reusing")  # until STARTED
    assert worker.received() == ([] if kept else [wire.Signal(1)])


@pytest.mark.parametrize("state", ENGAGED)
@pytest.mark.parametrize("frame", [wire.Start(), wire.Winsize(1, 1), wire.Busy(),
                                   wire.Started("again")])
def test_frames_out_of_place_in_every_engaged_state(
        keys: Keys, certs: dict[str, crypto.X509], state: str, frame: wire.Frame) -> None:
    bed, worker = reach(keys, certs, state)
    assert worker is not None
    if state == "reusing" and isinstance(frame, wire.Busy | wire.Started):
        return  # awaited there (see the warm tests)
    if state == "chosen" and isinstance(frame, wire.Started):
        return
    worker.send(frame)
    sent = worker.received()
    assert [type(f) for f in sent] == [wire.Error] and worker.aborted, (state, sent)
    assert bed.states[-1] == state


@pytest.mark.parametrize("state", ["chosen", "running", "ending", "draining", "done"])
def test_a_late_worker_is_told_busy_and_its_loss_is_no_complaint(
        keys: Keys, certs: dict[str, crypto.X509], state: str) -> None:
    bed, _ = reach(keys, certs, "draining" if state == "done" else state)
    if state == "done":
        assert isinstance(bed.streams, HeldStreams)
        bed.streams.written.callback(None)
        assert bed.result().status == 0
    late = bed.connect()
    late.verify()
    assert late.received() == [wire.Busy()] if state != "done" else late.aborted
    late.lose()
    assert bed.transitions[-1] == (state, "lost", state) and not bed.logged


@pytest.mark.parametrize("state", SEARCHING[1:] + ENGAGED)
def test_load_reports_reach_the_pool_in_every_state(
        keys: Keys, certs: dict[str, crypto.X509], state: str) -> None:
    bed, worker = reach(keys, certs, state)
    assert bed.job.pool is not None
    other = bed.connect() if state in SEARCHING else worker
    assert other is not None
    if state in SEARCHING:
        other.verify()  # in looking / handshaking it is chosen: report before that
        state = "chosen"
    other.send(wire.Hello("w9", "1", 0.7, 0.0, 4, 1))
    assert bed.transitions[-1] == (state, "hello", state)
    assert bed.job.pool.record(other.channel).load == 0.7


def test_a_warm_channel_refuses_or_ends_the_job_before_started(
        keys: Keys, certs: dict[str, crypto.X509]) -> None:
    bed, worker = reach(keys, certs, "reusing")
    assert worker is not None
    worker.send(wire.Error("revoked", "the client's certificate is revoked"))
    assert isinstance(bed.failure(), JobRefused)
    worker.lose()
    assert bed.transitions[-2:] == [("reusing", "error", "done"),
                                    ("done", "worker_lost", "done")]
    assert bed.job.pool is not None and not bed.job.pool.records
    bed, worker = reach(keys, certs, "reusing")
    assert worker is not None
    worker.send(wire.Exit(0, None))
    assert bed.transitions[-1] == ("reusing", "exited", "draining")


def test_complaints_are_heard_once_a_worker_is_chosen(
        keys: Keys, certs: dict[str, crypto.X509]) -> None:
    bed, _ = reach(keys, certs, "running")
    late = bed.connect("other app")
    late.verify()
    assert bed.transitions[-1] == ("running", "refused", "running")
    assert any("complaint: connection from 127.0.0.2:" in line for line in bed.logged)


def test_every_input_is_defined_in_every_state() -> None:
    """Nothing an untrusted peer sends can leave the machine without a transition."""
    inputs = [n for n in dir(machine.JobInputs) if not n.startswith("_")]
    automaton = machine.JobMachine.__automat_automaton__
    for state in machine.STATES:
        for name in inputs:
            automaton.outputForInput(state, name)  # raises NoTransition if missing


def test_the_diagram_in_the_docstring_names_every_state() -> None:
    doc = machine.__doc__ or ""
    assert all(state.name in doc for state in machine.STATES)
    assert Path(machine.__file__).name == "machine.py"


def test_the_final_taken_counts_connect_backs_still_in_the_accept_queue(
        keys: Keys, certs: dict[str, crypto.X509]) -> None:
    """A first job's storm: the crowd sizes its window from the final TAKEN's count, so
    connect-backs the kernel completed but the client had not accepted when it chose are
    counted too (a real listening socket's accept queue), and the port's backlog holds a
    storm rather than dropping all but 50."""
    bed = make_bed(keys, certs)
    bed.run()
    assert bed.reactor.sslServers[0][3] == BACKLOG
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen(BACKLOG)
        storm = [socket.create_connection(listening.getsockname(), timeout=5)
                 for _ in range(60)]  # more than Twisted's default backlog of 50
        try:
            bed.reactor.ports[0].socket = listening  # type: ignore[attr-defined]
            first, second = bed.connect(), bed.connect()
            first.verify()
        finally:
            for conn in storm:
                conn.close()
    taken = [d for d in bed.datagrams() if isinstance(d, wire.Taken)]
    assert [(t.early, t.answered) for t in taken] == [(True, 1), (False, 2 + 60)]
    assert second.aborted


def test_waiting_is_zero_where_the_queue_cannot_be_read() -> None:
    """A port without a socket (or one whose TCP_INFO fails) adds nothing to the count."""
    assert waiting(TCPPort(1)) == 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        holder = TCPPort(2)
        holder.socket = udp  # type: ignore[attr-defined]
        assert waiting(holder) == 0
