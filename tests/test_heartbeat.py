"""The one heartbeat (rexnet.net.heartbeat), alone with a Clock and in the two links that
use it: the job channel and the datagram link of tunnels and registrations."""

from __future__ import annotations

from typing import Any

from conftest import Keys
from OpenSSL import crypto
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from rexnet.net import heartbeat
from rexnet.net.channel import Channel
from rexnet.net.datalink import DatagramLink
from rexnet.net.heartbeat import Heartbeat
from rexnet.protocol import wire
from rexnet.security.credentials import CertInfo, load_credential
from rexnet.security.tls import Revocations


class Recorder:
    def __init__(self) -> None:
        self.pings = 0
        self.dead: list[float] = []

    def ping(self) -> None:
        self.pings += 1

    def died(self, seconds: float) -> None:
        self.dead.append(seconds)


def beating(clock: Clock) -> tuple[Heartbeat, Recorder]:
    record = Recorder()
    beat = Heartbeat(clock, record.ping, record.died)
    beat.start()
    return beat, record


def test_the_figures_are_one_ping_a_second_and_three_seconds_of_silence() -> None:
    assert (heartbeat.INTERVAL, heartbeat.DEAD_AFTER) == (1.0, 3.0)


def test_a_quiet_link_is_pinged_every_second() -> None:
    clock = Clock()
    beat, record = beating(clock)
    for second in range(1, 4):
        beat.heard()  # the peer answers
        clock.advance(1.0)
        assert record.pings == second
    assert record.dead == []


def test_no_ping_while_the_owner_sends_anyway() -> None:
    clock = Clock()
    beat, record = beating(clock)
    for _ in range(5):
        clock.advance(0.5)
        beat.sent()
        beat.heard()
    assert record.pings == 0 and record.dead == []


def test_a_peer_silent_for_more_than_three_seconds_is_given_up_once() -> None:
    clock = Clock()
    beat, record = beating(clock)
    clock.advance(3.0)
    assert record.dead == []  # three seconds is not yet more than three
    clock.advance(1.0)
    assert record.dead == [4.0]
    assert not beat.running
    clock.advance(10.0)
    assert record.dead == [4.0]


def test_hearing_the_peer_restarts_the_count() -> None:
    clock = Clock()
    beat, record = beating(clock)
    clock.advance(2.5)
    beat.heard()
    clock.advance(3.0)
    assert record.dead == []
    clock.advance(1.0)
    assert record.dead == [4.0]


def test_stop_ends_the_beat() -> None:
    clock = Clock()
    beat, record = beating(clock)
    beat.stop()
    clock.advance(10.0)
    assert record.pings == 0 and record.dead == []
    assert clock.getDelayedCalls() == []


class Verified(Channel):
    def __init__(self) -> None:  # the credential plays no part here
        super().__init__(None)  # type: ignore[arg-type]
        self.verified = True


def frames(transport: StringTransport) -> list[wire.Frame]:
    return list(wire.FrameDecoder().feed(transport.value()))


def test_a_job_channel_pings_and_aborts_a_silent_peer() -> None:
    clock, transport = Clock(), StringTransport()
    channel = Verified()
    channel.makeConnection(transport)
    channel.start_heartbeat(clock)
    clock.advance(1.0)
    assert frames(transport) == [wire.Ping()]
    channel.dataReceived(wire.encode_frame(wire.Ping()))  # heard at t=1
    clock.advance(3.0)
    assert not transport.disconnected
    clock.advance(1.0)  # 4 s after the last frame heard
    assert transport.disconnected and channel.closed


class PeerTransport(StringTransport):
    """A StringTransport whose peer presented CERT in a (pretend) TLS handshake."""

    def __init__(self, cert: Any) -> None:
        super().__init__()
        self.cert = cert

    def getPeerCertificate(self) -> Any:
        return self.cert


class Owner:
    def __init__(self, clock: Clock) -> None:
        self.reactor = clock
        self.links: set[DatagramLink] = set()
        self.revoked: Revocations | None = None

    def accepts(self, info: CertInfo) -> bool:
        return info.role == "worker"

    def from_link(self, origin: DatagramLink, data: bytes) -> None:
        pass


def test_a_datagram_link_uses_the_same_heartbeat(keys: Keys) -> None:
    clock = Clock()
    worker = load_credential(keys.worker, "worker")
    transport = PeerTransport(crypto.X509.from_cryptography(worker.cert))
    link = DatagramLink(Owner(clock))
    link.makeConnection(transport)
    link.handshakeCompleted()
    assert link.verified
    clock.advance(0.5)
    link.send(b"datagram")
    clock.advance(0.5)
    assert frames(transport) == [wire.Data(0, b"datagram")]  # it sent half a second ago
    clock.advance(1.0)
    assert frames(transport)[-1] == wire.Ping()
    link.dataReceived(wire.encode_frame(wire.Ping()))  # heard at t=2
    clock.advance(3.0)
    assert not transport.disconnected
    clock.advance(1.0)
    assert transport.disconnected
