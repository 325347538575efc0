"""Mutual TLS options built from a credential, and the peer check done after handshakes.

The rexnet client is the TLS *server* (workers connect back to it); the worker is the
TLS client.  Both sides require a certificate chaining to the application CA, and both
check the peer's role with service-identity once the handshake completes.
"""

from __future__ import annotations

from typing import Any, Protocol

from cryptography import x509
from OpenSSL import SSL, crypto
from service_identity import VerificationError
from service_identity.cryptography import verify_certificate_hostname
from twisted.internet import ssl
from twisted.internet._sslverify import IOpenSSLTrustRoot
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator

from rexnet.security.credentials import Credential, check_validity, identity, issued_by


def _private_certificate(cred: Credential) -> ssl.PrivateCertificate:
    # types-pyOpenSSL predates Ed25519 support in from_cryptography_key.
    key = ssl.KeyPair(crypto.PKey.from_cryptography_key(cred.key))  # type: ignore[arg-type]
    cert = ssl.Certificate(crypto.X509.from_cryptography(cred.cert))
    return ssl.PrivateCertificate.fromCertificateAndKeyPair(cert, key)


def _trust_root(cred: Credential) -> IOpenSSLTrustRoot:
    return ssl.trustRootFromCertificates([ssl.Certificate(crypto.X509.from_cryptography(
        cred.ca_cert))])


VERIFY_ERROR = "rexnet_verify_error"  # attribute of the TLS transport, set on failure


class _ExplainingOptions(ssl.CertificateOptions):
    """CertificateOptions that, when OpenSSL refuses the peer's certificate, note why in
    our own words on the TLS transport (attribute VERIFY_ERROR), for the complaint."""

    ca_cert: x509.Certificate

    def serverConnectionForTLS(self, protocol: Any) -> SSL.Connection:
        connection = super().serverConnectionForTLS(protocol)
        ca_cert = self.ca_cert

        def verify(conn: SSL.Connection, cert: crypto.X509, errno: int, depth: int,
                   ok: int) -> bool:
            if not ok and not hasattr(protocol, VERIFY_ERROR):
                try:  # an exception here would replace OpenSSL's own error
                    why = explain(cert.to_cryptography(), ca_cert, errno)
                except Exception:
                    why = f"peer certificate refused (OpenSSL verification error {errno})"
                setattr(protocol, VERIFY_ERROR, why)
            return bool(ok)

        connection.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, verify)
        return connection


def explain(cert: x509.Certificate, ca_cert: x509.Certificate, errno: int) -> str:
    """Why OpenSSL refused CERT (verification error ERRNO), in a complaint's words."""
    if not issued_by(cert, ca_cert):
        return "peer certificate not issued by the application CA"
    problem = check_validity(cert)
    if problem:
        return f"peer certificate {problem}"
    return f"peer certificate refused (OpenSSL verification error {errno})"


def listening_options(cred: Credential) -> ssl.CertificateOptions:
    """For the side that accepts connections (the rexnet client): demand a peer cert."""
    mine = _private_certificate(cred)
    options = _ExplainingOptions(
        privateKey=mine.privateKey.original,
        certificate=mine.original,
        trustRoot=_trust_root(cred),
        raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
    )
    options.ca_cert = cred.ca_cert
    return options


LISTENING_KEPT = 8  # credentials whose listening options are kept

_listening: dict[int, tuple[Credential, ssl.CertificateOptions]] = {}


def shared_listening_options(cred: Credential) -> ssl.CertificateOptions:
    """listening_options(CRED), made once per credential object while it is among the last
    LISTENING_KEPT (a client makes a listener per job with one credential; the options'
    TLS context, which each connection's verification uses as is, costs ~1.7 ms)."""
    kept = _listening.get(id(cred))
    if kept is not None and kept[0] is cred:
        return kept[1]
    options = listening_options(cred)
    if len(_listening) >= LISTENING_KEPT:
        _listening.clear()
    _listening[id(cred)] = (cred, options)
    return options


def connecting_options(cred: Credential, peer_role: str | None = None
                       ) -> IOpenSSLClientConnectionCreator:
    """For the side that connects (the worker): check the peer's role (PEER_ROLE, by
    default the other side of a job), present ours."""
    return ssl.optionsForClientTLS(
        identity(peer_role, cred.app) if peer_role else cred.peer_identity(),
        trustRoot=_trust_root(cred),
        clientCertificate=_private_certificate(cred),
        extraCertificateOptions={"raiseMinimumTo": ssl.TLSVersion.TLSv1_2},
    )


class Revocations(Protocol):
    def reason(self, cert: x509.Certificate) -> str | None: ...


def check_peer(peer: object, cred: Credential, revoked: Revocations | None = None
               ) -> tuple[x509.Certificate | None, str | None]:
    """(certificate, None) if PEER (a pyOpenSSL X509) is the role we expect, valid now and
    not in the REVOKED list, else a reason."""
    if peer is None:
        return None, "peer presented no certificate"
    if not isinstance(peer, crypto.X509):
        return None, "peer certificate of an unknown type"
    cert = peer.to_cryptography()
    try:
        verify_certificate_hostname(cert, cred.peer_identity())
    except VerificationError:
        return None, f"peer certificate is not a {cred.peer_identity()} credential"
    problem = check_validity(cert)  # OpenSSL checked it too; this says why in our words
    if problem:
        return None, f"peer certificate {problem}"
    reason = revoked.reason(cert) if revoked is not None else None
    if reason:
        return None, f"peer {reason}"
    return cert, None
