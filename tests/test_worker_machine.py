"""The worker's job channel as a state machine (rexnet.worker.machine), in process.

A real Worker (with a Clock for its reactor) and its real WorkerChannel, connected to a
StringTransport whose peer presented a client certificate; frames are fed as bytes and
read back from the transport. Only the job's process is a stand-in (the worker's
start_job is overridden so that nothing is spawned on a Clock). Every transition:

    verifying -> awaiting_start | closed (refused, lost, handshake timeout, TAKEN + grace)
    awaiting_start -> starting | closed (deadline, BUSY, ERROR, close, lost, protocol error)
    starting -> running | closed (refused job, no slot on a warm channel)
    running -> warm_idle | closed (finish, ERROR, close, lost, protocol error)
    warm_idle -> starting | closed (deadline, BUSY, ERROR, close, lost, protocol error)
    closed: only its loss is handled
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest
from conftest import Keys
from OpenSSL import crypto
from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure

from rexnet.net.channel import STREAM_WINDOW, WINDOW, InStream
from rexnet.protocol import wire
from rexnet.security.credentials import (
    CertInfo,
    Credential,
    app_id_of,
    issue,
    load_ca,
    load_credential,
)
from rexnet.security.revocation import Revoked
from rexnet.version import __version__
from rexnet.worker.channel import WorkerChannel
from rexnet.worker.connectback import Pending
from rexnet.worker.load import HostLoad
from rexnet.worker.machine import (
    HANDSHAKE_TIMEOUT,
    START_TIMEOUT,
    TAKEN_GRACE,
    WARM_IDLE,
    Refusal,
)
from rexnet.worker.metrics import Metrics
from rexnet.worker.service import Running, Worker, WorkerSettings

IDLE = HostLoad(loadavg=0.0, cpus=2, free_memory=1 << 30)


class PeerTransport(StringTransport):
    """A StringTransport whose peer presented CERT in a (pretend) TLS handshake."""

    def __init__(self, cert: Any) -> None:
        super().__init__()
        self.cert = cert

    def getPeerCertificate(self) -> Any:
        return self.cert

    def unregisterProducer(self) -> None:  # a TLS transport may be closed without one
        self.producer = None


@dataclass
class FakeProcess:
    """Stands in for a JobProcess: records what the channel asks of the job."""

    signals: list[int] = field(default_factory=list)
    sizes: list[tuple[int, int]] = field(default_factory=list)
    kills: int = 0
    ended: bool = False
    let_go_calls: int = 0

    def deliver_signal(self, number: int) -> None:
        self.signals.append(number)

    def resize(self, rows: int, cols: int) -> None:
        self.sizes.append((rows, cols))

    def kill_group(self) -> None:
        self.kills += 1

    def let_go(self) -> None:
        """The channel is gone: the job's data connections go too (rexnet.net.jobdata)."""
        self.let_go_calls += 1


class Revocations:
    """A revocation list that can grow while a channel is warm (rexnet's Revoked inside)."""

    def __init__(self) -> None:
        self.listed = Revoked()

    def reason(self, cert: Any) -> str | None:
        return self.listed.reason(cert)


class Host(Worker):
    """The real Worker, but a job is a FakeProcess (a Clock cannot run processes)."""

    def __init__(self, settings: WorkerSettings, clock: Clock, metrics: Metrics) -> None:
        super().__init__(settings, clock, sample=lambda: IDLE, metrics=metrics)
        self.starts: list[tuple[wire.Start, bool]] = []
        self.refusal: Refusal | None = None
        self.sink = StringTransport()  # the job's stdin

    def start_job(self, channel: WorkerChannel, start: wire.Start, warm: bool
                  ) -> Running | Refusal:
        self.starts.append((start, warm))
        if self.refusal is not None:
            return self.refusal
        job = f"job{len(self.starts)}"
        self.sink = StringTransport()
        channel.ins[0] = InStream(channel, 0, self.sink)
        running = self.running[job] = Running(job, channel, cast(Any, FakeProcess()), "c",
                                              keep=start.keep)
        channel.send(wire.Started(job, ()))
        return running

    def end(self, job: str, code: int = 0) -> None:
        """The job's process ended and its output is sent (as JobProcess reports it)."""
        self.running[job].process.ended = True
        self._ended(job, code, None, "")


@dataclass
class Bed:
    keys: Keys
    clock: Clock
    worker: Host
    metrics: Metrics
    client: Credential
    revoked: Revocations

    def channel(self, cert: Any = None) -> tuple[WorkerChannel, PeerTransport]:
        """A connect-back whose TLS handshake with CERT (the client's) just completed."""
        pending = Pending(b"j" * 16, cast(Any, None), 0.25, 0.012, heard=self.clock.seconds())
        self.worker.pending[pending.job_id] = pending
        s = self.worker.settings
        channel = WorkerChannel(self.worker, pending, s.credential, s.revoked)
        transport = PeerTransport(crypto.X509.from_cryptography(cert or self.client.cert))
        channel.makeConnection(transport)
        channel.handshakeCompleted()
        return channel, transport

    def connect_backs(self, outcome: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "rexnet_connect_backs_total", {"app": self.keys.app, "outcome": outcome})
        return value or 0.0

    def refused(self, reason: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "rexnet_jobs_refused_total", {"app": self.keys.app, "reason": reason})
        return value or 0.0


@pytest.fixture
def bed(keys: Keys) -> Bed:
    clock = Clock()
    clock.advance(1000.0)
    metrics = Metrics()
    revoked = Revocations()
    settings = WorkerSettings(load_credential(keys.worker, "worker"), ("true",), "w", slots=1,
                              revoked=revoked)
    return Bed(keys, clock, Host(settings, clock, metrics), metrics,
               load_credential(keys.client, "client"), revoked)


def sent(transport: StringTransport) -> list[wire.Frame]:
    """The frames written so far (and forget them)."""
    frames = list(wire.FrameDecoder().feed(transport.value()))
    transport.clear()
    return frames


def feed(channel: WorkerChannel, *frames: wire.Frame) -> None:
    channel.dataReceived(b"".join(wire.encode_frame(f) for f in frames))


def lose(channel: WorkerChannel) -> None:
    channel.connectionLost(Failure(ConnectionLost("gone")))


def messages(logs: Sequence[dict[str, Any]]) -> list[str]:
    return [formatEvent(e) for e in logs]


def running(bed: Bed, keep: bool = False) -> tuple[WorkerChannel, PeerTransport, FakeProcess]:
    channel, transport = bed.channel()
    feed(channel, wire.Start(keep=keep))
    sent(transport)
    job = bed.worker.running[channel.core.job or ""]
    return channel, transport, cast(FakeProcess, job.process)


def warm(bed: Bed) -> tuple[WorkerChannel, PeerTransport]:
    channel, transport, _ = running(bed, keep=True)
    bed.worker.end(channel.core.job or "")
    assert sent(transport)[0] == wire.Exit(0, None, "")
    return channel, transport


# -- verifying ---------------------------------------------------------------------------

def test_a_verified_client_is_greeted_with_the_load_the_worker_answered_with(bed: Bed) -> None:
    _channel, transport = bed.channel()
    assert sent(transport) == [wire.Hello("w", __version__, 0.25, 12.0, 1, 0)]
    bed.clock.advance(1.0)
    assert sent(transport) == [wire.Ping()]  # the heartbeat runs


def test_a_refused_client_is_complained_about_and_nothing_is_sent(bed: Bed,
                                                                  other_keys: Keys) -> None:
    stranger = load_credential(other_keys.client, "client")
    with capturedLogs() as logs:
        channel, transport = bed.channel(stranger.cert)
        lose(channel)
    assert transport.value() == b"" and transport.disconnected
    text = messages(logs)
    assert any("authentication failed: peer certificate is not a" in m for m in text), text
    assert bed.worker.complain.count == 2  # and "TLS with client failed" (one line a second)
    assert bed.metrics.registry.get_sample_value(
        "rexnet_auth_failures_total", {"app": bed.keys.app}) == 1.0
    assert channel.pending.job_id not in bed.worker.pending  # its slot is free again


def handshaking(bed: Bed) -> tuple[WorkerChannel, PeerTransport]:
    """A connect-back whose TCP is up and whose TLS handshake has not finished."""
    pending = Pending(b"h" * 16, cast(Any, None), 0.25, 0.012, heard=bed.clock.seconds())
    bed.worker.pending[pending.job_id] = pending
    s = bed.worker.settings
    channel = WorkerChannel(bed.worker, pending, s.credential, s.revoked)
    pending.connected, pending.channel = True, channel
    transport = PeerTransport(None)
    channel.makeConnection(transport)
    return channel, transport


def test_a_silent_peer_is_closed_after_the_handshake_timeout(bed: Bed) -> None:
    channel, transport = handshaking(bed)
    bed.clock.advance(HANDSHAKE_TIMEOUT - 0.1)
    assert not transport.disconnected and bed.worker.busy == 1
    with capturedLogs() as logs:
        bed.clock.advance(0.1)
        lose(channel)
    assert transport.disconnected and transport.value() == b""
    assert bed.worker.pending == {}  # its slot is free
    text = messages(logs)
    assert any("no TLS handshake within 8 s on a connect-back" in m for m in text), text
    assert not any("TLS with client failed" in m for m in text)  # one complaint, not two
    assert bed.metrics.registry.get_sample_value(
        "rexnet_auth_failures_total", {"app": bed.keys.app}) == 1.0


def test_a_handshake_in_time_is_not_cut_short(bed: Bed) -> None:
    channel, transport = handshaking(bed)
    bed.clock.advance(HANDSHAKE_TIMEOUT - 0.2)
    transport.cert = crypto.X509.from_cryptography(bed.client.cert)
    channel.handshakeCompleted()
    bed.clock.advance(1.0)  # past the handshake's deadline (the heartbeat allows 3 s)
    assert not transport.disconnected
    assert sent(transport)[0] == wire.Hello("w", __version__, 0.25, 12.0, 1, 0)


def test_taken_before_the_handshake_finishes_gives_up_after_a_grace(bed: Bed) -> None:
    channel, transport = handshaking(bed)
    pending = channel.pending
    with capturedLogs() as logs:
        bed.worker.connect_backs.taken(pending, 2)
        bed.clock.advance(TAKEN_GRACE - 0.1)
        assert not transport.disconnected  # the handshake may still finish: we may be
        bed.clock.advance(0.1)             # the one the client chose
        lose(channel)
    assert transport.disconnected and bed.worker.pending == {}
    text = messages(logs)
    assert any("cancelled: taken by another worker before its TLS handshake finished" in m
               for m in text), text
    assert bed.worker.complain.count == 0 and bed.connect_backs("lost") == 1.0


def test_taken_then_the_handshake_finishing_in_the_grace_keeps_the_channel(bed: Bed) -> None:
    channel, transport = handshaking(bed)
    bed.worker.connect_backs.taken(channel.pending, 1)
    transport.cert = crypto.X509.from_cryptography(bed.client.cert)
    channel.handshakeCompleted()  # the client chose us: its TAKEN overtook our handshake
    bed.clock.advance(TAKEN_GRACE * 2)
    assert not transport.disconnected
    feed(channel, wire.Start())
    assert wire.Started("job1", ()) in sent(transport)


def test_taken_for_a_verified_channel_changes_nothing(bed: Bed) -> None:
    channel, transport = bed.channel()
    channel.pending.connected, channel.pending.channel = True, channel
    bed.worker.connect_backs.taken(channel.pending, 2)
    bed.clock.advance(TAKEN_GRACE * 2)
    assert not transport.disconnected and channel.pending.job_id in bed.worker.pending


# -- awaiting_start ---------------------------------------------------------------------

def test_start_runs_the_job_and_frees_the_promised_slot(bed: Bed) -> None:
    channel, transport = bed.channel()
    sent(transport)
    feed(channel, wire.Start(args=()))
    assert sent(transport) == [wire.Started("job1", ())]
    assert bed.worker.starts == [(wire.Start(), False)]
    assert bed.worker.pending == {} and bed.worker.busy == 1
    assert bed.connect_backs("won") == 1.0


@pytest.mark.parametrize("frame", [wire.Signal(2), wire.Winsize(24, 80)])
def test_signals_before_start_are_a_protocol_error(bed: Bed, frame: wire.Frame) -> None:
    channel, transport = bed.channel()
    sent(transport)
    feed(channel, frame, wire.Start())
    name = type(frame).__name__
    assert sent(transport) == [wire.Error("protocol", f"unexpected {name} frame")]
    assert transport.disconnected and bed.worker.starts == []
    bed.clock.advance(START_TIMEOUT * 2)
    assert sent(transport) == []  # no deadline, no heartbeat on a closed channel


def test_input_before_start_is_a_protocol_error(bed: Bed) -> None:
    channel, transport = bed.channel()
    sent(transport)
    feed(channel, wire.Data(0, b"early"))
    assert sent(transport) == [wire.Error("protocol", "data on stream 0, which is not open")]
    assert transport.disconnected


def test_no_start_within_the_deadline_aborts_with_a_complaint(bed: Bed) -> None:
    channel, transport = bed.channel()
    feed(channel, wire.Ping())
    with capturedLogs() as logs:
        for _ in range(int(START_TIMEOUT) - 1):  # the client answers pings, but no START
            bed.clock.advance(1.0)
            feed(channel, wire.Ping())
        assert not transport.disconnected
        bed.clock.advance(1.0)
    assert transport.disconnected
    assert any("client sent no job in time" in m for m in messages(logs))


def test_busy_from_the_client_closes_the_channel_gracefully(bed: Bed) -> None:
    channel, transport = bed.channel()
    feed(channel, wire.Busy())
    assert transport.disconnecting and not transport.disconnected
    assert bed.connect_backs("lost") == 1.0
    lose(channel)
    assert bed.worker.pending == {}


def test_an_error_from_the_client_closes_the_channel(bed: Bed) -> None:
    channel, transport = bed.channel()
    with capturedLogs() as logs:
        feed(channel, wire.Error("interrupted", "the user gave up"))
    assert transport.disconnecting
    assert any("ended the job: the user gave up" in m for m in messages(logs))


def test_a_frame_a_worker_never_gets_is_a_protocol_error(bed: Bed) -> None:
    channel, transport = bed.channel()
    sent(transport)
    feed(channel, wire.Started("x", ()))
    assert sent(transport) == [wire.Error("protocol", "unexpected Started frame")]
    assert transport.disconnected


# -- starting ---------------------------------------------------------------------------

def test_a_refused_start_says_why_and_closes(bed: Bed) -> None:
    bed.worker.refusal = Refusal("spawn", "cannot start true: no such file")
    channel, transport = bed.channel()
    sent(transport)
    feed(channel, wire.Start())
    assert sent(transport) == [wire.Error("spawn", "cannot start true: no such file")]
    assert transport.disconnecting and bed.refused("spawn") == 1.0


def test_a_start_the_worker_refuses_whatever_its_load_is_refused_at_once(bed: Bed) -> None:
    channel, transport = bed.channel()
    sent(transport)
    feed(channel, wire.Start(args=("x",)))  # this worker has no --allow-args
    [error] = sent(transport)
    assert isinstance(error, wire.Error) and error.reason == "args"
    assert "--allow-args" in error.message and bed.worker.starts == []
    assert transport.disconnecting and bed.refused("args") == 1.0


# -- running ----------------------------------------------------------------------------

def test_signals_sizes_and_input_reach_the_running_job(bed: Bed) -> None:
    channel, transport, process = running(bed)
    feed(channel, wire.Signal(2), wire.Winsize(50, 132), wire.Data(0, b"input"), wire.Eof(0))
    assert process.signals == [2] and process.sizes == [(50, 132)]
    assert bed.worker.sink.value() == b"input" and bed.worker.sink.disconnecting
    # the stream's first data widens its window (rexnet.net.channel); no other answer
    assert sent(transport) == [wire.Window(0, STREAM_WINDOW - WINDOW)]


def test_a_second_start_while_running_is_a_protocol_error_and_ends_the_job(bed: Bed) -> None:
    channel, transport, process = running(bed)
    feed(channel, wire.Start())
    assert sent(transport) == [wire.Error("protocol", "unexpected Start frame")]
    assert transport.disconnected and len(bed.worker.starts) == 1
    lose(channel)
    assert process.kills == 1


def test_busy_while_running_is_a_protocol_error(bed: Bed) -> None:
    channel, transport, _ = running(bed)
    feed(channel, wire.Busy())
    assert sent(transport) == [wire.Error("protocol", "unexpected Busy frame")]


def test_the_client_going_away_ends_the_jobs_process_group(bed: Bed) -> None:
    channel, transport, process = running(bed)
    with capturedLogs() as logs:
        lose(channel)
    assert process.kills == 1 and process.let_go_calls == 1  # its data connections too
    assert any("went away; ending the job's process group" in m for m in messages(logs))
    bed.worker.end(channel.core.job or "")  # its end comes later: nothing more is sent
    assert sent(transport) == []


def test_an_error_from_the_client_while_running_closes_then_ends_the_job(bed: Bed) -> None:
    channel, transport, process = running(bed)
    feed(channel, wire.Error("interrupted", "bye"))
    assert transport.disconnecting and process.kills == 0
    lose(channel)
    assert process.kills == 1


def test_a_job_not_kept_closes_after_its_exit(bed: Bed) -> None:
    channel, transport, _ = running(bed, keep=False)
    bed.worker.end(channel.core.job or "", 3)
    assert sent(transport) == [wire.Exit(3, None, "")]
    assert transport.disconnecting and bed.worker.warm == set()


@pytest.mark.parametrize("keep", [True, False], ids=["kept", "closed"])
def test_exit_is_written_before_the_jobs_books_which_are_kept_once(bed: Bed,
                                                                   keep: bool) -> None:
    """The client waits for EXIT (and a kept channel's HELLO), not for the worker's books:
    the job's log line, job-finished alert, metrics and row come after them, once."""
    channel, transport, _ = running(bed, keep=keep)
    job = channel.core.job or ""
    events: list[str] = []
    write = transport.write

    def writing(data: bytes) -> None:
        events.extend(type(f).__name__ for f in wire.FrameDecoder().feed(data))
        write(data)

    transport.write = writing  # type: ignore[method-assign]
    bed.worker.alerts.send = lambda event, **fields: events.append(event)  # type: ignore
    bed.worker.book.ended = lambda *args: events.append("booked")  # type: ignore
    with capturedLogs() as logs:
        bed.worker.end(job, 0)
    events += ["logged" for e in logs if "ended: exit 0" in formatEvent(e)]
    assert events == ((["Exit", "Hello"] if keep else ["Exit"])
                      + ["job-finished", "booked", "logged"])
    assert bed.metrics.registry.get_sample_value(
        "rexnet_jobs_finished_total", {"app": bed.keys.app, "exit_class": "ok"}) == 1.0


def test_the_worker_stopping_aborts_a_running_channel(bed: Bed) -> None:
    channel, transport, _ = running(bed)
    channel.close(abort=True)
    assert transport.disconnected


# -- warm_idle --------------------------------------------------------------------------

def test_a_kept_channel_waits_reporting_the_load_every_second(bed: Bed) -> None:
    channel, transport = warm(bed)
    assert bed.worker.warm == {channel}
    for _ in range(3):
        bed.clock.advance(1.0)
        feed(channel, wire.Ping())
    hellos = [f for f in sent(transport) if isinstance(f, wire.Hello)]
    assert len(hellos) == 3 and all(h.delay_ms == 0.0 and h.running == 0 for h in hellos)


def test_late_signals_and_input_of_the_last_job_are_dropped(bed: Bed) -> None:
    channel, transport = warm(bed)
    feed(channel, wire.Signal(2), wire.Winsize(1, 1), wire.Data(0, b"late"), wire.Eof(0))
    assert not transport.disconnecting and not transport.disconnected
    assert bed.worker.warm == {channel}


def test_start_on_a_warm_channel_runs_the_next_job(bed: Bed) -> None:
    channel, transport = warm(bed)
    feed(channel, wire.Start(keep=True))
    assert [f for f in sent(transport) if not isinstance(f, wire.Hello)] == [
        wire.Started("job2", ())]
    assert bed.worker.starts[-1] == (wire.Start(keep=True), True)
    assert bed.worker.warm == set() and bed.connect_backs("warm") == 1.0
    bed.clock.advance(5.0)  # no more load reports while the job runs
    assert not any(isinstance(f, wire.Hello) for f in sent(transport))


def test_start_on_a_warm_channel_with_no_free_slot_and_no_queue_is_busy(bed: Bed) -> None:
    bed.worker.queue.places = 0  # --queue 0
    channel, transport = warm(bed)
    bed.channel()  # another client's connect-back holds the only slot
    sent(transport)
    with capturedLogs() as logs:
        feed(channel, wire.Start())
    assert sent(transport) == [wire.Busy()]
    assert transport.disconnecting and len(bed.worker.starts) == 1
    assert any("no free slot for the next job on a warm channel" in m for m in messages(logs))


def test_start_on_a_warm_channel_from_a_since_revoked_client_is_refused(bed: Bed) -> None:
    channel, transport = warm(bed)
    bed.revoked.listed = Revoked(frozenset({bed.client.cert.serial_number}))
    sent(transport)
    feed(channel, wire.Start())
    [error] = sent(transport)
    assert isinstance(error, wire.Error) and error.reason == "auth"
    assert error.message.startswith("the client's client certificate")
    assert error.message.endswith("is revoked")
    assert transport.disconnecting and len(bed.worker.starts) == 1
    assert bed.refused("auth") == 1.0


def test_start_on_a_warm_channel_from_a_since_expired_client_is_refused(bed: Bed) -> None:
    import time

    ca = load_ca(Path(bed.keys.ca))
    lifetime = datetime.timedelta(days=1)
    born = datetime.datetime.now(datetime.UTC) - lifetime + datetime.timedelta(seconds=1.5)
    key, cert = issue(ca.key, ca.cert, "client", "brief", 1, now=born)
    brief = Credential(Path("brief"), key, cert, ca.cert, CertInfo.of(cert), app_id_of(ca.cert))
    channel, transport = bed.channel(brief.cert)
    assert sent(transport)  # valid at the handshake: greeted
    feed(channel, wire.Start(keep=True))
    bed.worker.end(channel.core.job or "")
    time.sleep(max(0.0, (cert.not_valid_after_utc - datetime.datetime.now(datetime.UTC))
                   .total_seconds()) + 0.1)
    sent(transport)
    feed(channel, wire.Start())
    [error] = sent(transport)
    assert isinstance(error, wire.Error) and error.reason == "auth"
    assert error.message.startswith("the client's certificate expired on ")


def test_a_warm_channel_idle_too_long_is_closed(bed: Bed) -> None:
    channel, transport = warm(bed)
    for _ in range(int(WARM_IDLE) - 1):
        bed.clock.advance(1.0)
        feed(channel, wire.Ping())
    assert not transport.disconnecting
    bed.clock.advance(1.0)
    assert transport.disconnecting and bed.worker.warm == set()
    sent(transport)
    bed.clock.advance(5.0)
    assert not any(isinstance(f, wire.Hello) for f in sent(transport))  # reports stopped


def test_busy_on_a_warm_channel_closes_it(bed: Bed) -> None:
    channel, transport = warm(bed)
    feed(channel, wire.Busy())
    assert transport.disconnecting and bed.worker.warm == set()


def test_an_unexpected_frame_on_a_warm_channel_is_a_protocol_error(bed: Bed) -> None:
    channel, transport = warm(bed)
    sent(transport)
    feed(channel, wire.Exit(0, None, ""))
    assert wire.Error("protocol", "unexpected Exit frame") in sent(transport)
    assert transport.disconnected and bed.worker.warm == set()


def test_the_worker_stopping_closes_its_warm_channels(bed: Bed) -> None:
    _channel, transport = warm(bed)
    done = bed.worker.stop_all()
    assert transport.disconnecting and bed.worker.warm == set()
    assert done.called


def test_a_lost_warm_channel_is_forgotten(bed: Bed) -> None:
    channel, _transport = warm(bed)
    assert bed.clock.getDelayedCalls()  # its deadline, load reports and heartbeat
    lose(channel)
    assert bed.worker.warm == set()
    assert bed.clock.getDelayedCalls() == []  # all stopped


# -- closed -----------------------------------------------------------------------------

def test_a_closed_channel_ignores_what_still_comes(bed: Bed) -> None:
    channel, _transport, process = running(bed)
    feed(channel, wire.Error("interrupted", "bye"))
    job = channel.core.job or ""
    feed(channel, wire.Start(), wire.Signal(9))  # not delivered: the channel is closing
    bed.worker.end(job)  # the job's end after the close
    channel.close()
    assert process.signals == [] and len(bed.worker.starts) == 1
    lose(channel)
    assert process.kills == 0  # it had ended already


def test_the_indexed_transitions_answer_as_automats_own_lookup() -> None:
    """The worker's machine looks transitions up in a dict (rexnet.protocol.transitions):
    every (state, input) gives what Automat's scan gives, and a pair it lacks raises
    Automat's NoTransition as before."""
    from automat import NoTransition
    from automat._core import Automaton

    from rexnet.worker.machine import WorkerMachine

    automaton = WorkerMachine.__automat_automaton__
    assert automaton.outputForInput is not Automaton.outputForInput.__get__(automaton)
    transitions = list(automaton.allTransitions())
    assert len(transitions) > 20
    for state, symbol, _, _ in transitions:
        assert (automaton.outputForInput(state, symbol)
                == Automaton.outputForInput(automaton, state, symbol))
    state = transitions[0][0]
    with pytest.raises(NoTransition):
        automaton.outputForInput(state, "no-such-input")


def test_a_warm_channel_reads_its_clients_name_once(bed: Bed) -> None:
    """The client's name is parsed from its certificate once per channel, not per job, and
    is the certificate's; a channel whose certificate changed reads it again."""
    channel, _ = bed.channel()
    name = CertInfo.of(channel.peer_cert).name
    assert name and channel.client_name == name
    parsed = channel._client
    assert channel.client_name == name and channel._client is parsed
    worker_cert = bed.worker.settings.credential.cert
    channel.peer_cert = worker_cert
    assert channel.client_name == CertInfo.of(worker_cert).name != name
