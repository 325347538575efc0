"""cproxy's and the datagram link's checks, sans real network (MemoryReactorClock, Clock,
StringTransport): issue P10 items 4, 7 and 14."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from conftest import Keys
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport

from rexnet.net import datalink
from rexnet.net.announce import now_ms
from rexnet.net.certcheck import CertChecker
from rexnet.net.datalink import DatagramLink, GuardedFactory, Refused
from rexnet.net.registration import RegisteredWorkers
from rexnet.protocol import relaytrailer, wire
from rexnet.relay import cproxy
from rexnet.relay.cproxy import Relay
from rexnet.security.credentials import (
    CertInfo,
    Credential,
    app_id_of,
    issue,
    load_ca,
    load_credential,
)
from rexnet.security.revocation import Revoked

CLIENT_ADDR = "10.0.0.5"


def credential(keys: Keys, role: str, name: str) -> Credential:
    ca = load_ca(keys.ca)
    key, cert = issue(ca.key, ca.cert, role, name)  # type: ignore[arg-type]
    return Credential(Path(name), key, cert, ca.cert, CertInfo.of(cert), app_id_of(ca.cert))


def announce(client: Credential, addrs: tuple[str, ...] = (CLIENT_ADDR,),
             job: bytes | None = None) -> bytes:
    ann = wire.Announce(job or os.urandom(16), 0, now_ms(), 40000, addrs)
    return wire.encode_datagram(ann, client.app_id, client.key, client.cert_der)


class NumberedPort:
    def __init__(self, address: IPv4Address) -> None:
        self.address = address
        self.listening = True

    def getHost(self) -> IPv4Address:
        return self.address

    def stopListening(self) -> None:
        self.listening = False


class Reactor(MemoryReactorClock):
    """A memory reactor whose listening ports have numbers (as real ones do)."""

    def listenTCP(self, port: int, factory: Any, backlog: int = 50,
                  interface: str = "") -> Any:
        super().listenTCP(port, factory, backlog, interface)
        return NumberedPort(IPv4Address("TCP", interface or "0.0.0.0",
                                        40000 + len(self.tcpServers)))


class Sent(list[tuple[bytes, tuple[str, int]]]):
    def __call__(self, data: bytes, target: tuple[str, int]) -> None:
        self.append((data, target))


def relay_of(keys: Keys, revoked: Revoked | None = None) -> tuple[Relay, Sent,
                                                                   MemoryReactorClock]:
    reactor = Reactor()
    relay_cred = credential(keys, "relay", "gw")
    sent = Sent()
    relay = Relay(reactor, [("10.1.255.255", 3010)],
                  CertChecker([load_ca(keys.ca).cert], revoked), relay_cred, "10.1.0.1", sent)
    relay._sources[("10.1.255.255", 3010)] = "10.1.0.1"
    return relay, sent, reactor


def test_a_genuine_announcement_is_relayed_with_a_signed_trailer(keys: Keys) -> None:
    relay, sent, reactor = relay_of(keys)
    client = load_credential(keys.client, "client")
    relay.datagram(announce(client), CLIENT_ADDR, 5000)
    assert len(relay.jobs) == 1 and reactor.tcpServers[0][3] == "10.1.0.1"  # bound there
    ((data, target),) = sent
    _, trailer = relaytrailer.decode_relayed(data)
    assert trailer is not None and trailer.addr == "10.1.0.1" and target[1] == 3010
    assert next(iter(relay.jobs.values())).upstream == (CLIENT_ADDR, 40000)


def test_junk_and_forgeries_take_no_entry_and_are_complained_about(
        keys: Keys, other_keys: Keys, caplog: Any) -> None:
    relay, sent, _ = relay_of(keys)
    client = load_credential(keys.client, "client")
    other = load_credential(other_keys.client, "client")
    good = announce(client)
    forged = bytearray(good)
    forged[-1] ^= 1
    stranger = credential(other_keys, "client", "x")
    cases = [
        bytes(forged),  # bad signature
        announce(other),  # another application: not even looked at
        wire.encode_datagram(wire.Announce(os.urandom(16), 0, now_ms(), 1, (CLIENT_ADDR,)),
                             client.app_id, stranger.key, stranger.cert_der),  # look-alike
        announce(client, ("10.9.9.9",)),  # signed for another address than its source
        announce(load_credential(keys.worker, "worker")),  # a worker is not a client
    ]
    for data in cases:
        relay.datagram(data, CLIENT_ADDR, 5000)
    for _ in range(2000):  # a flood of junk carrying our application id
        relay.datagram(good[:21] + os.urandom(300), "10.0.0.66", 5000)
    assert relay.jobs == {} and sent == []
    assert relay.counters.dropped == 2000 + len(cases)
    relay.datagram(good, CLIENT_ADDR, 5000)  # and the real one still gets through
    assert len(relay.jobs) == 1 and len(sent) == 1


def test_a_revoked_client_is_not_relayed(keys: Keys) -> None:
    client = credential(keys, "client", "mallory")
    relay, sent, _ = relay_of(keys, Revoked(frozenset({client.cert.serial_number})))
    relay.datagram(announce(client), CLIENT_ADDR, 5000)
    assert relay.jobs == {} and sent == []


def test_each_source_has_a_quota_and_verified_entries_are_never_evicted(
        keys: Keys, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cproxy, "MAX_PER_SOURCE", 3)
    monkeypatch.setattr(cproxy, "MAX_ENTRIES", 5)
    relay, _, reactor = relay_of(keys)
    client = load_credential(keys.client, "client")
    for _ in range(5):
        relay.datagram(announce(client), CLIENT_ADDR, 5000)
    assert len(relay.jobs) == 3  # the quota of one source
    second = "10.0.0.6"
    for _ in range(5):
        relay.datagram(announce(client, (second,)), second, 5000)
    assert len(relay.jobs) == 5  # the table is full ...
    first = list(relay.jobs)
    relay.datagram(announce(client, ("10.0.0.7",)), "10.0.0.7", 5000)
    assert list(relay.jobs) == first  # ... and nothing was evicted for the newcomer
    reactor.advance(cproxy.JOB_IDLE + 1)  # entries expire on their own; quotas free up
    assert relay.jobs == {} and relay.quota["jobs"] == {}
    relay.datagram(announce(client), CLIENT_ADDR, 5000)
    assert len(relay.jobs) == 1


def test_taken_is_relayed_only_from_the_client_of_the_job(keys: Keys) -> None:
    relay, sent, _ = relay_of(keys)
    client = load_credential(keys.client, "client")
    job = os.urandom(16)
    relay.datagram(announce(client, job=job), CLIENT_ADDR, 5000)
    mallory = credential(keys, "client", "mallory")
    fake = wire.encode_datagram(wire.Taken(job, now_ms()), client.app_id, mallory.key,
                                mallory.cert_der)
    relay.datagram(fake, "10.0.0.66", 5000)
    assert not relay.jobs[job].taken and len(sent) == 1
    real = wire.encode_datagram(wire.Taken(job, now_ms()), client.app_id, client.key,
                                client.cert_der)
    relay.datagram(real, CLIENT_ADDR, 5000)
    assert relay.jobs[job].taken and sent[-1][0] == real


# -- the datagram link: handshake timeout and per-source cap ------------------------------


def owner(keys: Keys) -> RegisteredWorkers:
    reactor = MemoryReactorClock()
    return RegisteredWorkers(reactor, credential(keys, "relay", "gw"))


def test_a_silent_link_peer_is_dropped_after_the_handshake_timeout(keys: Keys) -> None:
    registered = owner(keys)
    factory = GuardedFactory(registered)
    link = factory.buildProtocol(IPv4Address("TCP", "10.0.0.9", 1234))
    assert isinstance(link, DatagramLink)
    transport = StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.9", 1234))
    link.makeConnection(transport)
    registered.reactor.advance(datalink.HANDSHAKE_TIMEOUT - 0.1)
    assert not transport.disconnecting
    registered.reactor.advance(0.2)
    assert transport.disconnecting or transport.disconnected
    link.connectionLost()
    assert factory.sources == {}


def test_a_listener_takes_at_most_per_source_connections_from_one_address(keys: Keys
                                                                         ) -> None:
    factory = GuardedFactory(owner(keys))
    addr = IPv4Address("TCP", "10.0.0.9", 1234)
    links = [factory.buildProtocol(addr) for _ in range(datalink.PER_SOURCE + 5)]
    assert sum(isinstance(link, DatagramLink) for link in links) == datalink.PER_SOURCE
    assert factory.refused == 5
    refused = links[-1]
    assert isinstance(refused, Refused)
    transport = StringTransport()
    refused.makeConnection(transport)
    assert transport.disconnecting  # closed at once
    assert isinstance(factory.buildProtocol(IPv4Address("TCP", "10.0.0.10", 1)), DatagramLink)
    first = links[0]
    assert isinstance(first, DatagramLink)
    first.makeConnection(StringTransport())
    first.connectionLost()
    assert isinstance(factory.buildProtocol(addr), DatagramLink)  # a slot freed


def test_a_kind_relays_do_not_carry_is_dropped_with_a_complaint(keys: Keys) -> None:
    """A signed job call (rexnet jobs' call to detached jobs) is not carried by relays: it
    is dropped and complained about, not a KeyError in the relay's datagram handler."""
    relay, sent, _ = relay_of(keys)
    client = load_credential(keys.client, "client")
    call = wire.encode_datagram(wire.JobCall(os.urandom(16), now_ms(), 40000, (CLIENT_ADDR,)),
                                client.app_id, client.key, client.cert_der)
    relay.datagram(call, CLIENT_ADDR, 5000)
    assert sent == [] and relay.counters.dropped == 1
    relay.datagram(announce(client), CLIENT_ADDR, 5000)  # and the relay carries on
    assert len(sent) == 1
