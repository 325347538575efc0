"""Certificates carried in datagrams and trailers, checked against trusted application CAs.

One checker serves a process that trusts one or several applications (a worker: its own;
a cproxy: those it is given with --trust): a certificate counts when the CA of the
datagram's application id issued it, it names an expected role in its subject and its
DNS-ID, its key is Ed25519, it is valid now and it is not in the revocation list.  The
parsed certificates are cached (bounded); validity and revocation are checked every time.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from rexnet.security.credentials import CertInfo, app_id_of, check_validity, identity, issued_by
from rexnet.security.tls import Revocations

CERT_CACHE = 1024


class Rejected(Exception):
    """A datagram that must be dropped and complained about; the message says why."""


@dataclass(frozen=True)
class CheckedCert:
    """A certificate that chains to a trusted CA, with what it says."""

    public_key: Ed25519PublicKey
    info: CertInfo
    cert: x509.Certificate

    def verify(self, signature: bytes, data: bytes) -> bool:
        try:
            self.public_key.verify(signature, data)
        except InvalidSignature:
            return False
        return True


class CertChecker:
    """Checks certificates against the CAS (by application id) and REVOKED."""

    def __init__(self, cas: Iterable[x509.Certificate],
                 revoked: Revocations | None = None) -> None:
        self.cas: dict[bytes, x509.Certificate] = {}
        for ca in cas:
            self.cas.setdefault(app_id_of(ca), ca)
        self.revoked = revoked
        self._cache: OrderedDict[bytes, CheckedCert] = OrderedDict()

    def trusts(self, app_id: bytes | None) -> bool:
        return app_id in self.cas

    def check(self, der: bytes, app_id: bytes, roles: tuple[str, ...]) -> CheckedCert:
        """The checked certificate DER of one of ROLES in application APP_ID, or Rejected."""
        ca = self.cas.get(app_id)
        if ca is None:
            raise Rejected("datagram of an application not trusted here")
        digest = hashlib.sha256(app_id + der).digest()
        checked = self._cache.get(digest)
        if checked is None:
            checked = self._parse(der, ca)
            self._cache[digest] = checked
            if len(self._cache) > CERT_CACHE:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(digest)
        if checked.info.role not in roles:
            raise Rejected(f"certificate of role {checked.info.role!r}, not a "
                           f"{' or '.join(roles)} credential")
        problem = check_validity(checked.cert)
        if problem:
            raise Rejected(f"{checked.info.role} certificate {problem}")
        reason = self.revoked.reason(checked.cert) if self.revoked is not None else None
        if reason:
            raise Rejected(reason)
        return checked

    @staticmethod
    def _parse(der: bytes, ca: x509.Certificate) -> CheckedCert:
        try:
            cert = x509.load_der_x509_certificate(der)
            info = CertInfo.of(cert)  # parses the subject: may fail on crafted DER
            names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
            dns = names.value.get_values_for_type(x509.DNSName)
            key = cert.public_key()
        except x509.ExtensionNotFound:
            raise Rejected("certificate without a rexnet identity") from None
        except Exception:  # cryptography parses lazily: any damage, one complaint
            raise Rejected("unreadable certificate") from None
        if not issued_by(cert, ca):
            raise Rejected("certificate not issued by the application CA")
        if identity(info.role, info.app) not in dns or info.app != CertInfo.of(ca).app:
            raise Rejected("certificate whose identity does not match its subject")
        if not isinstance(key, Ed25519PublicKey):
            raise Rejected("certificate key is not Ed25519")
        return CheckedCert(key, info, cert)
