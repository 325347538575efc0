"""Mutual TLS between a client credential (listening side) and a worker credential
(connecting side), run in memory over real OpenSSL with twisted.test.iosim."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import Keys
from OpenSSL import SSL, crypto
from service_identity import VerificationError
from twisted.internet import ssl
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IHandshakeListener,
    IOpenSSLClientConnectionCreator,
    ISSLTransport,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.test.iosim import connectedServerAndClient
from zope.interface import implementer

from rexnet.security.credentials import Credential, issue, load_ca, load_credential
from rexnet.security.tls import check_peer, connecting_options, listening_options

ADDRESS = IPv4Address("TCP", "127.0.0.1", 3010)


@implementer(IHandshakeListener)
class Recorder(Protocol):
    """Records what one side of a TLS connection saw."""

    def __init__(self) -> None:
        self.handshake_done = False
        self.peer: object = None
        self.received = b""
        self.lost: Failure | None = None

    def handshakeCompleted(self) -> None:
        self.handshake_done = True
        transport = ISSLTransport(self.transport)
        self.peer = transport.getPeerCertificate()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.lost = reason if reason is not None else Failure(ConnectionDone())


def connect(
    listening: ssl.CertificateOptions, connecting: IOpenSSLClientConnectionCreator
) -> tuple[Recorder, Recorder]:
    """Run a TLS handshake in memory; return (listening side, connecting side)."""
    server, client = Recorder(), Recorder()
    clock = Clock()  # TLS writes are flushed on the next "reactor iteration": the pump's
    server_factory = TLSMemoryBIOFactory(
        listening, False, Factory.forProtocol(lambda: server), clock=clock
    )
    client_factory = TLSMemoryBIOFactory(
        connecting, True, Factory.forProtocol(lambda: client), clock=clock
    )
    _, _, pump = connectedServerAndClient(
        lambda: server_factory.buildProtocol(ADDRESS),
        lambda: client_factory.buildProtocol(ADDRESS),
        clock=clock,
    )
    pump.flush()
    if client.handshake_done and client.lost is None:
        client.transport.write(b"ping")  # type: ignore[union-attr]
    if server.handshake_done and server.lost is None:
        server.transport.write(b"pong")  # type: ignore[union-attr]
    pump.flush()
    return server, client


def credential(path: Path, role: str) -> Credential:
    return load_credential(path, role)  # type: ignore[arg-type]


def x509_of(cred: Credential) -> crypto.X509:
    return crypto.X509.from_cryptography(cred.cert)


def ssl_error(side: Recorder) -> bool:
    return side.lost is not None and side.lost.check(SSL.Error) is not None


def test_client_and_worker_of_one_app_authenticate_each_other(keys: Keys) -> None:
    client_cred = credential(keys.client, "client")
    worker_cred = credential(keys.worker, "worker")

    server, client = connect(listening_options(client_cred), connecting_options(worker_cred))

    assert server.handshake_done and client.handshake_done
    assert server.lost is None and client.lost is None
    assert server.received == b"ping" and client.received == b"pong"
    # Each side checks the other's role and gets the peer's certificate back.
    seen_by_client, reason = check_peer(server.peer, client_cred)
    assert reason is None
    assert seen_by_client == worker_cred.cert
    seen_by_worker, reason = check_peer(client.peer, worker_cred)
    assert reason is None
    assert seen_by_worker == client_cred.cert


def test_another_holder_of_the_right_role_is_accepted(keys: Keys, tmp_path: Path) -> None:
    from rexnet.security.credentials import credential_file_bytes, write_private

    ca = load_ca(keys.ca)
    key, cert = issue(ca.key, ca.cert, "worker", "host-7")
    write_private(tmp_path / "w", credential_file_bytes(key, cert, ca.cert))
    worker_cred = credential(tmp_path / "w", "worker")
    client_cred = credential(keys.client, "client")

    server, client = connect(listening_options(client_cred), connecting_options(worker_cred))

    assert server.handshake_done and client.handshake_done
    assert check_peer(server.peer, client_cred) == (cert, None)


def test_worker_credential_on_both_sides_is_refused(keys: Keys) -> None:
    worker_cred = credential(keys.worker, "worker")

    server, client = connect(listening_options(worker_cred), connecting_options(worker_cred))

    # The connecting side wants client.testapp.rexnet, sees worker.testapp.rexnet and
    # aborts during the handshake, so neither side gets to exchange data.
    assert client.lost is not None
    assert client.lost.check(VerificationError) is not None
    assert not client.handshake_done
    assert not server.handshake_done
    assert server.lost is not None
    assert server.received == b"" and client.received == b""


def posing_options(cred: Credential, expect: str) -> IOpenSSLClientConnectionCreator:
    """Connecting options presenting CRED's certificate and expecting EXPECT: a peer that
    skips rexnet's own role choice, as a misbehaving or malicious program might."""
    key = ssl.KeyPair(crypto.PKey.from_cryptography_key(cred.key))  # type: ignore[arg-type]
    mine = ssl.PrivateCertificate.fromCertificateAndKeyPair(ssl.Certificate(x509_of(cred)), key)
    ca = ssl.Certificate(crypto.X509.from_cryptography(cred.ca_cert))
    return ssl.optionsForClientTLS(
        expect, trustRoot=ssl.trustRootFromCertificates([ca]), clientCertificate=mine
    )


@pytest.mark.parametrize("role", ["client", "worker"])
def test_listening_side_refuses_a_peer_of_its_own_role(keys: Keys, role: str) -> None:
    """Same CA, so the handshake completes; check_peer is what refuses the peer."""
    cred = credential(getattr(keys, role), role)

    posing = posing_options(cred, f"{role}.testapp.rexnet")

    server, client = connect(listening_options(cred), posing)

    assert server.handshake_done and client.handshake_done
    cert, reason = check_peer(server.peer, cred)
    assert cert is None
    assert reason == f"peer certificate is not a {cred.peer_identity()} credential"


def test_check_peer_refuses_wrong_roles(keys: Keys) -> None:
    client_cred = credential(keys.client, "client")
    worker_cred = credential(keys.worker, "worker")

    cert, reason = check_peer(x509_of(client_cred), client_cred)
    assert cert is None
    assert reason == "peer certificate is not a worker.testapp.rexnet credential"
    cert, reason = check_peer(x509_of(worker_cred), worker_cred)
    assert cert is None
    assert reason == "peer certificate is not a client.testapp.rexnet credential"


def test_check_peer_refuses_another_applications_peer(keys: Keys, other_keys: Keys) -> None:
    client_cred = credential(keys.client, "client")
    other_worker = credential(other_keys.worker, "worker")

    cert, reason = check_peer(x509_of(other_worker), client_cred)
    assert cert is None
    assert reason == "peer certificate is not a worker.testapp.rexnet credential"


@pytest.mark.parametrize("swap", [False, True], ids=["other-app-worker", "other-app-client"])
def test_two_applications_fail_the_handshake(keys: Keys, other_keys: Keys, swap: bool) -> None:
    listen_keys, connect_keys = (other_keys, keys) if swap else (keys, other_keys)
    client_cred = credential(listen_keys.client, "client")
    worker_cred = credential(connect_keys.worker, "worker")

    server, client = connect(listening_options(client_cred), connecting_options(worker_cred))

    # Each side finds the other's certificate chains to an unknown CA.
    assert not server.handshake_done and not client.handshake_done
    assert ssl_error(server) and ssl_error(client)
    assert server.received == b"" and client.received == b""


def test_listening_side_requires_a_client_certificate(keys: Keys) -> None:
    client_cred = credential(keys.client, "client")
    worker_cred = credential(keys.worker, "worker")
    anonymous = ssl.optionsForClientTLS(
        worker_cred.peer_identity(),
        trustRoot=ssl.trustRootFromCertificates(
            [ssl.Certificate(crypto.X509.from_cryptography(worker_cred.ca_cert))]
        ),
    )

    server, _ = connect(listening_options(client_cred), anonymous)

    assert not server.handshake_done
    assert ssl_error(server)
    assert server.received == b""


def test_check_peer_without_certificate(keys: Keys) -> None:
    cred = credential(keys.client, "client")
    assert check_peer(None, cred) == (None, "peer presented no certificate")


def test_check_peer_with_an_unknown_object(keys: Keys) -> None:
    cred = credential(keys.client, "client")
    assert check_peer(cred.cert, cred) == (None, "peer certificate of an unknown type")
