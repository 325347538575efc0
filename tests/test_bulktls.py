"""Bulk TLS writes (rexnet.net.bulktls): the same bytes through real OpenSSL with mutual
TLS, in far fewer writes to the TCP transport; run in memory with twisted.test.iosim."""

from __future__ import annotations

import os

import pytest
from conftest import Keys
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.test.iosim import IOPump, connectedServerAndClient

from rexnet.net.bulktls import SEND_PIECE, bulk_writes, tls_layer
from rexnet.security.credentials import load_credential
from rexnet.security.tls import check_peer, connecting_options, listening_options

ADDRESS = IPv4Address("TCP", "127.0.0.1", 3010)


class Sink(Protocol):
    def __init__(self) -> None:
        self.received = bytearray()
        self.deliveries = 0
        self.ended: object = None

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        self.deliveries += 1

    def connectionLost(self, reason: object = None) -> None:
        self.ended = reason


def pair(keys: Keys) -> tuple[Sink, Sink, IOPump]:
    """A client-credential listener and a worker-credential connector over real TLS."""
    client_cred = load_credential(keys.client, "client")
    worker_cred = load_credential(keys.worker, "worker")
    server, client = Sink(), Sink()
    clock = Clock()
    server_factory = TLSMemoryBIOFactory(listening_options(client_cred), False,
                                         Factory.forProtocol(lambda: server), clock=clock)
    client_factory = TLSMemoryBIOFactory(connecting_options(worker_cred), True,
                                         Factory.forProtocol(lambda: client), clock=clock)
    _, _, pump = connectedServerAndClient(
        lambda: server_factory.buildProtocol(ADDRESS),
        lambda: client_factory.buildProtocol(ADDRESS), clock=clock)
    return server, client, pump


def count_writes(tls: TLSMemoryBIOProtocol) -> list[int]:
    """The sizes of the TLS layer's writes to its TCP transport, from now on."""
    sizes: list[int] = []
    below = tls.transport
    assert below is not None
    write = below.write

    def counting(data: bytes) -> None:
        sizes.append(len(data))
        write(data)

    below.write = counting  # type: ignore[method-assign]
    return sizes


@pytest.mark.parametrize("bulk", [True, False], ids=["bulk", "twisted"])
def test_bulk_writes_carry_the_same_bytes_in_fewer_transport_writes(
        keys: Keys, bulk: bool) -> None:
    server, client, pump = pair(keys)
    tls = tls_layer(client.transport)
    assert tls is not None
    if bulk:
        assert bulk_writes(client.transport)
    payload = os.urandom(3 * SEND_PIECE + 12345)
    client.transport.write(payload[:1000])  # type: ignore[union-attr]  # before the handshake
    pump.flush()
    sizes = count_writes(tls)
    client.transport.write(payload[1000:])  # type: ignore[union-attr]
    pump.flush()

    assert bytes(server.received) == payload
    peer = server.transport.getPeerCertificate()  # type: ignore[union-attr]
    assert check_peer(peer, load_credential(keys.client, "client"), None)[1] is None
    if bulk:  # one drain of the send BIO per piece
        assert len(sizes) == 4, sizes
    else:  # Twisted's own: one write per 16 KiB record
        assert len(sizes) >= (len(payload) - 1000) // 16384, len(sizes)


def test_both_directions_after_bulk_writes(keys: Keys) -> None:
    server, client, pump = pair(keys)
    assert bulk_writes(client.transport) and bulk_writes(server.transport)
    pump.flush()
    up, down = os.urandom(SEND_PIECE * 2 + 1), os.urandom(SEND_PIECE - 1)
    client.transport.write(up)  # type: ignore[union-attr]
    server.transport.write(down)  # type: ignore[union-attr]
    pump.flush()
    assert bytes(server.received) == up and bytes(client.received) == down


def test_transports_without_tls_are_left_alone() -> None:
    transport = StringTransport()
    assert tls_layer(transport) is None
    assert bulk_writes(transport) is False
    transport.write(b"plain")
    assert transport.value() == b"plain"


@pytest.mark.parametrize("bulk", [True, False], ids=["bulk", "twisted"])
def test_received_records_reach_the_protocol_in_large_pieces(keys: Keys, bulk: bool) -> None:
    server, client, pump = pair(keys)
    if bulk:
        assert bulk_writes(server.transport)
    pump.flush()
    payload = os.urandom(3 * SEND_PIECE + 777)
    client.transport.write(payload)  # type: ignore[union-attr]
    pump.flush()
    assert bytes(server.received) == payload
    records = len(payload) // 16384
    if bulk:
        assert server.deliveries <= len(payload) // SEND_PIECE + 2, server.deliveries
    else:
        assert server.deliveries >= records


def test_the_bytes_before_a_tls_shutdown_arrive_before_the_end(keys: Keys) -> None:
    server, client, pump = pair(keys)
    assert bulk_writes(server.transport) and bulk_writes(client.transport)
    pump.flush()
    payload = os.urandom(SEND_PIECE + 5)
    client.transport.write(payload)  # type: ignore[union-attr]
    client.transport.loseConnection()  # type: ignore[union-attr]
    pump.flush()
    assert bytes(server.received) == payload
    assert server.ended is not None and client.ended is not None
