"""Mutual TLS options built from a credential, and the peer check done after handshakes.

The rexnet client is the TLS *server* (workers connect back to it); the worker is the
TLS client.  Both sides require a certificate chaining to the application CA, and both
check the peer's role with service-identity once the handshake completes.
"""

from __future__ import annotations

from cryptography import x509
from OpenSSL import crypto
from service_identity import VerificationError
from service_identity.cryptography import verify_certificate_hostname
from twisted.internet import ssl
from twisted.internet._sslverify import IOpenSSLTrustRoot
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator

from rexnet.credentials import Credential


def _private_certificate(cred: Credential) -> ssl.PrivateCertificate:
    # types-pyOpenSSL predates Ed25519 support in from_cryptography_key.
    key = ssl.KeyPair(crypto.PKey.from_cryptography_key(cred.key))  # type: ignore[arg-type]
    cert = ssl.Certificate(crypto.X509.from_cryptography(cred.cert))
    return ssl.PrivateCertificate.fromCertificateAndKeyPair(cert, key)


def _trust_root(cred: Credential) -> IOpenSSLTrustRoot:
    return ssl.trustRootFromCertificates([ssl.Certificate(crypto.X509.from_cryptography(
        cred.ca_cert))])


def listening_options(cred: Credential) -> ssl.CertificateOptions:
    """For the side that accepts connections (the rexnet client): demand a peer cert."""
    mine = _private_certificate(cred)
    return ssl.CertificateOptions(
        privateKey=mine.privateKey.original,
        certificate=mine.original,
        trustRoot=_trust_root(cred),
        raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
    )


def connecting_options(cred: Credential) -> IOpenSSLClientConnectionCreator:
    """For the side that connects (the worker): check the peer's role, present ours."""
    return ssl.optionsForClientTLS(
        cred.peer_identity(),
        trustRoot=_trust_root(cred),
        clientCertificate=_private_certificate(cred),
        extraCertificateOptions={"raiseMinimumTo": ssl.TLSVersion.TLSv1_2},
    )


def check_peer(peer: object, cred: Credential) -> tuple[x509.Certificate | None, str | None]:
    """(certificate, None) if PEER (a pyOpenSSL X509) is the role we expect, else a reason."""
    if peer is None:
        return None, "peer presented no certificate"
    if not isinstance(peer, crypto.X509):
        return None, "peer certificate of an unknown type"
    cert = peer.to_cryptography()
    try:
        verify_certificate_hostname(cert, cred.peer_identity())
    except VerificationError:
        return None, f"peer certificate is not a {cred.peer_identity()} credential"
    return cert, None
