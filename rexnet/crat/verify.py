"""The checks that make an alert *verified*: its certificate, its time, its signature.

An alert is believed when its embedded certificate was issued by one of the trusted
application CAs, is a worker or client credential of that CA's application and is valid
now, its timestamp is within FRESH_MS of crat's clock, it is not a copy of one seen
before, and its Ed25519 signature checks.  Each failed check raises Unverified with a
reason for people and a KIND to count.  No I/O; time is given.
"""

from __future__ import annotations

import datetime
import hashlib
from collections import OrderedDict
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from rexnet.net.announce import verify_signature
from rexnet.protocol import wire
from rexnet.security.credentials import (
    ROLES,
    CertInfo,
    app_id_of,
    check_validity,
    identity,
    issued_by,
)

FRESH_MS = 5 * 60 * 1000
"""An alert whose timestamp is further than this from crat's clock is marked unverified."""
REPLAY_ENTRIES = 100_000


@dataclass(frozen=True)
class TrustedCA:
    """An application CA whose workers and clients crat believes."""

    cert: x509.Certificate
    app: str
    app_id: bytes

    @classmethod
    def of(cls, cert: x509.Certificate) -> TrustedCA:
        return cls(cert, CertInfo.of(cert).app, app_id_of(cert))


@dataclass(frozen=True)
class Sender:
    """A certificate that passed the checks that do not depend on time."""

    key: Ed25519PublicKey
    info: CertInfo
    cert: x509.Certificate


class Unverified(Exception):
    """An alert that cannot be believed; the message says why, KIND sums it up."""

    def __init__(self, reason: str, kind: str | None = None) -> None:
        super().__init__(reason)
        self.kind = kind or reason


class SeenAlerts:
    """Digests of verified alerts, kept until they could no longer pass as fresh."""

    def __init__(self, entries: int = REPLAY_ENTRIES) -> None:
        self.entries = entries
        self._seen: OrderedDict[bytes, int] = OrderedDict()

    def seen(self, digest: bytes, now_ms: int) -> bool:
        while self._seen and next(iter(self._seen.values())) < now_ms:
            self._seen.popitem(last=False)
        return digest in self._seen

    def add(self, digest: bytes, expires_ms: int) -> None:
        while len(self._seen) >= self.entries:
            self._seen.popitem(last=False)
        self._seen[digest] = expires_ms

    def __len__(self) -> int:
        return len(self._seen)


def check_certificate(cert_der: bytes, app_id: bytes,
                      trusted: dict[bytes, TrustedCA]) -> Sender | str:
    """The holder of CERT_DER if it passes the checks that do not depend on time, else
    why not.  May raise anything on crafted DER: the caller counts that as unreadable."""
    cert = x509.load_der_x509_certificate(cert_der)
    info = CertInfo.of(cert)
    ca = trusted.get(app_id)
    if ca is None or not issued_by(cert, ca.cert):
        return "certificate not issued by a trusted CA"
    if info.app != ca.app:
        return f"certificate names application {info.app!r}, its CA is {ca.app!r}'s"
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        dns = names.value.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        dns = []
    if info.role not in ROLES:
        return f"certificate of role {info.role!r}, not a worker or client credential"
    if identity(info.role, ca.app) not in dns:
        return f"certificate lacks the name {identity(info.role, ca.app)}"
    key = cert.public_key()
    if not isinstance(key, Ed25519PublicKey):
        return "certificate key is not Ed25519"
    return Sender(key, info, cert)


def check_alert(dgram: wire.Datagram, alert: wire.Alert, sender: Sender, now: float,
                replays: SeenAlerts) -> None:
    """Raise Unverified unless SENDER's certificate is valid at NOW, the alert is fresh,
    not a replay and signed by SENDER; then remember it in REPLAYS."""
    problem = check_validity(sender.cert, datetime.datetime.fromtimestamp(now, datetime.UTC))
    if problem:
        raise Unverified(f"certificate {problem}", "certificate not valid now")
    now_ms = int(now * 1000)
    off = alert.ts_ms - now_ms
    if abs(off) > FRESH_MS:
        raise Unverified(f"stale: sent {abs(off) / 1000:.0f} s "
                         f"{'ahead of' if off > 0 else 'before'} crat's clock", "stale")
    # the cheap checks first: a flood of copies costs no signature check
    digest = hashlib.sha256(dgram.signed_part + dgram.signature).digest()
    if replays.seen(digest, now_ms):
        raise Unverified("replay of an alert already received")
    if not verify_signature(sender.key, dgram):
        raise Unverified("bad signature")
    replays.add(digest, alert.ts_ms + FRESH_MS)


def claims(der: bytes) -> CertInfo | None:
    """What an unverified certificate claims (for the record), if it can be read."""
    if not der:
        return None
    try:
        return CertInfo.of(x509.load_der_x509_certificate(der))
    except Exception:
        return None
