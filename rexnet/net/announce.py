"""Announcements: making them (client), checking them (worker), and the UDP adapters.

A worker acts on an announcement only when it is well-formed, for its application,
fresh (timestamp within FRESH_MS), signed by a client certificate issued by the
application CA, not a replay (nonce cache), sent from an address the client signed (or
relayed with a trailer that may say where to connect: rexnet.net.trailers), and the
sender is within its rate limit.
"""

from __future__ import annotations

import hashlib
import ipaddress
import socket
import time
from collections import OrderedDict
from collections.abc import Callable, Collection
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from twisted.internet.protocol import DatagramProtocol

from rexnet.net.certcheck import CertChecker, Rejected  # Rejected: also known by this module
from rexnet.net.trailers import connect_back_allowed
from rexnet.protocol import relaytrailer, wire
from rexnet.security.credentials import CertInfo, Credential, check_validity, identity, issued_by
from rexnet.security.tls import Revocations

DEFAULT_PORT = 3010
FRESH_MS = 30_000
REPLAY_ENTRIES = 100_000
CERT_CACHE = 1024
RATE = 200.0  # datagrams per second per source address
BURST = 400.0
RATE_SOURCES = 4096


def now_ms() -> int:
    return int(time.time() * 1000)


def parse_target(
    text: str, default_port: int = DEFAULT_PORT, any_port: bool = False
) -> tuple[str, int]:
    """'HOST[:PORT]' (or '[V6]:PORT') as (host, port); ValueError with a clear message.

    ANY_PORT allows port 0 (for addresses to listen on: any free port).
    """
    host, port = text, default_port
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not (rest.startswith(":") and rest[1:].isdigit())):
            raise ValueError(f"bad address {text!r}: use [V6ADDR]:PORT")
        if rest:
            port = int(rest[1:])
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
        if not port_text.isdigit():
            raise ValueError(f"bad port in {text!r}")
        port = int(port_text)
    if not host or not (0 if any_port else 1) <= port < 65536:
        raise ValueError(f"bad address {text!r}: use HOST[:PORT]")
    return host, port


def source_key(address: str) -> str:
    """The rate-limited unit an address belongs to: an IPv4 address itself, an IPv6
    address's /64 (one host usually holds a whole /64, so per-address buckets would let it
    act as unlimited sources); an IPv4-mapped IPv6 address counts as its IPv4 address."""
    if ":" not in address:
        return address
    try:
        ip = ipaddress.IPv6Address(address.split("%", 1)[0])
    except ValueError:
        return address
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))


class RateLimiter:
    """A token bucket per source (an IPv4 address or an IPv6 /64: see source_key), for a
    bounded number of sources."""

    def __init__(self, rate: float = RATE, burst: float = BURST,
                 sources: int = RATE_SOURCES) -> None:
        self.rate, self.burst, self.sources = rate, burst, sources
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def allow(self, source: str, now: float) -> bool:
        source = source_key(source)
        tokens, last = self._buckets.pop(source, (self.burst, now))
        tokens = min(self.burst, tokens + max(now - last, 0.0) * self.rate)
        allowed = tokens >= 1.0
        self._buckets[source] = (tokens - 1.0 if allowed else tokens, now)
        if len(self._buckets) > self.sources:
            self._buckets.popitem(last=False)
        return allowed


class ReplayCache:
    """Remembers (job, seq) pairs until their timestamp leaves the freshness window."""

    def __init__(self, entries: int = REPLAY_ENTRIES) -> None:
        self.entries = entries
        self._seen: OrderedDict[tuple[bytes, int], int] = OrderedDict()

    def add(self, key: tuple[bytes, int], expires_ms: int, now: int) -> bool:
        """Record KEY; False if it was already there (a replay)."""
        while self._seen and next(iter(self._seen.values())) < now:
            self._seen.popitem(last=False)
        if key in self._seen:
            return False
        while self._seen and len(self._seen) >= self.entries:
            self._seen.popitem(last=False)
        self._seen[key] = expires_ms
        return True


@dataclass(frozen=True)
class ClientCert:
    """A client certificate that passed the chain check, with what it says."""

    public_key: Ed25519PublicKey
    info: CertInfo
    cert: x509.Certificate


def verify_signature(key: Ed25519PublicKey, dgram: wire.Datagram) -> bool:
    try:
        key.verify(dgram.signature, dgram.signed_part)
    except InvalidSignature:
        return False
    return True


class AnnounceChecker:
    """Checks datagrams for one application (sans-IO: time comes from NOW_MS)."""

    def __init__(self, credential: Credential, now: Callable[[], int] = now_ms,
                 revoked: Revocations | None = None, relays: Collection[str] = ()) -> None:
        """RELAYS: addresses whose unsigned relay trailers are believed (see
        rexnet.net.trailers); signed ones are checked against the CA and REVOKED."""
        self.credential = credential
        self.now = now
        self.revoked = revoked
        self.relays = relays
        self.replays = ReplayCache()
        self._certs: OrderedDict[bytes, ClientCert] = OrderedDict()
        self._relay_certs = CertChecker([credential.ca_cert], revoked)
        # the signed trailer of the datagram decode() returned last (checked with it)
        self._trailer: tuple[wire.Datagram, relaytrailer.SignedTrailer] | None = None

    def client_cert(self, der: bytes, role: str = "client") -> ClientCert:
        """The checked certificate of ROLE in DER (cached by digest)."""
        digest = hashlib.sha256(der + role.encode()).digest()
        cached = self._certs.get(digest)
        if cached is not None:
            self._certs.move_to_end(digest)
            self._check_current(cached)
            return cached
        try:
            cert = x509.load_der_x509_certificate(der)
            info = CertInfo.of(cert)  # parses the subject: may fail on crafted DER
        except (ValueError, TypeError, x509.InvalidVersion):
            raise Rejected("unreadable certificate") from None
        if not issued_by(cert, self.credential.ca_cert):
            raise Rejected("certificate not issued by the application CA")
        try:
            names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
            dns = names.value.get_values_for_type(x509.DNSName)
        except x509.ExtensionNotFound:
            dns = []
        if info.role != role or identity(role, self.credential.app) not in dns:
            raise Rejected(f"certificate of role {info.role!r}, not a {role} credential")
        key = cert.public_key()
        if not isinstance(key, Ed25519PublicKey):
            raise Rejected(f"{role} certificate key is not Ed25519")
        checked = ClientCert(key, info, cert)
        self._certs[digest] = checked
        if len(self._certs) > CERT_CACHE:
            self._certs.popitem(last=False)
        self._check_current(checked)
        return checked

    def _check_current(self, checked: ClientCert) -> None:
        """Checks that can change while a certificate sits in the cache: expiry and the
        revocation list."""
        problem = check_validity(checked.cert)
        if problem:
            raise Rejected(f"{checked.info.role} certificate {problem}")
        reason = self.revoked.reason(checked.cert) if self.revoked is not None else None
        if reason:
            raise Rejected(reason)

    def decode(self, data: bytes) -> wire.Datagram | None:
        """The datagram if it is for our application, None if for another; or Rejected."""
        if wire.peek_app_id(data) not in (None, self.credential.app_id):
            return None
        try:
            dgram, trailer = relaytrailer.decode_relayed(data)
        except wire.WireError as e:
            raise Rejected(f"malformed datagram: {e}") from None
        self._trailer = (dgram, trailer) if trailer is not None else None
        return dgram

    def check_announce(self, dgram: wire.Datagram, source: str) -> tuple[wire.Announce, ClientCert]:
        """Check an ANNOUNCE from SOURCE; return it with its client, or raise Rejected."""
        ann = dgram.message
        if not isinstance(ann, wire.Announce):
            raise Rejected("not an announcement")
        client = self._check_request(dgram, source, ann.ts_ms, ann.addrs, (ann.job_id, ann.seq),
                                     "announcement")
        return ann, client

    def check_status(self, dgram: wire.Datagram, source: str
                     ) -> tuple[wire.StatusQuery, ClientCert]:
        """Check a STATUS query from SOURCE, as strictly as an announcement."""
        query = dgram.message
        if not isinstance(query, wire.StatusQuery):
            raise Rejected("not a status query")
        client = self._check_request(dgram, source, query.ts_ms, query.addrs,
                                     (query.nonce, -1), "status query")
        return query, client

    def check_job_call(self, dgram: wire.Datagram, source: str
                       ) -> tuple[wire.JobCall, ClientCert]:
        """Check a JOB_CALL from SOURCE, as strictly as an announcement."""
        call = dgram.message
        if not isinstance(call, wire.JobCall):
            raise Rejected("not a job call")
        client = self._check_request(dgram, source, call.ts_ms, call.addrs,
                                     (call.nonce, -2), "job call")
        return call, client

    def _check_request(self, dgram: wire.Datagram, source: str, ts_ms: int,
                       addrs: tuple[str, ...], key: tuple[bytes, int], what: str) -> ClientCert:
        """Freshness, client certificate, signature, signed source, replay: in that order,
        so that nothing unsigned reaches the replay cache."""
        now = self.now()
        if abs(now - ts_ms) > FRESH_MS:
            raise Rejected(f"stale {what} (check the clocks of client and worker)")
        client = self.client_cert(dgram.cert_der)
        if not verify_signature(client.public_key, dgram):
            raise Rejected(f"bad signature on {what}")
        if source not in addrs and dgram.relay_port is None:
            raise Rejected(f"{what} sent from {source}, which the client did not sign")
        trailer = self._trailer[1] if self._trailer and self._trailer[0] is dgram else None
        connect_back_allowed(dgram, trailer, source, self._relay_certs, self.relays)
        if not self.replays.add(key, ts_ms + FRESH_MS, now):
            raise Rejected(f"replayed {what}")
        return client

    def check_status_reply(self, dgram: wire.Datagram, nonce: bytes) -> wire.StatusReply:
        """Check a worker's answer to our status query NONCE."""
        reply = dgram.message
        if not isinstance(reply, wire.StatusReply) or reply.nonce != nonce:
            raise Rejected("not an answer to our status query")
        worker = self.client_cert(dgram.cert_der, "worker")
        if not verify_signature(worker.public_key, dgram):
            raise Rejected("bad signature on status reply")
        return reply

    def check_taken(self, dgram: wire.Datagram, client: ClientCert) -> wire.Taken:
        """Check a TAKEN signed by CLIENT (the sender of the announcement it answers)."""
        taken = dgram.message
        if not isinstance(taken, wire.Taken):
            raise Rejected("not a TAKEN message")
        if abs(self.now() - taken.ts_ms) > FRESH_MS:
            raise Rejected("stale TAKEN message")
        if not verify_signature(client.public_key, dgram):
            raise Rejected("bad signature on TAKEN")
        return taken


class DatagramReceiver(DatagramProtocol):
    """Hands every datagram to a callback as (bytes, source host, source port)."""

    def __init__(self, handler: Callable[[bytes, str, int], None]) -> None:
        self.handler = handler

    def datagramReceived(self, datagram: bytes, addr: tuple[str, int]) -> None:  # type: ignore[override]
        self.handler(datagram, addr[0], addr[1])


class DatagramSender(DatagramProtocol):
    """Sends datagrams to targets; a failed send is reported, never raised."""

    def __init__(self, on_error: Callable[[tuple[str, int], OSError], None]) -> None:
        self.on_error = on_error

    def send(self, data: bytes, target: tuple[str, int]) -> None:
        try:
            self.transport.write(data, target)  # type: ignore[union-attr]
        except OSError as e:
            self.on_error(target, e)


def source_address(target: tuple[str, int]) -> str | None:
    """The local address the kernel would send to TARGET from (nothing is sent)."""
    family = socket.AF_INET6 if ":" in target[0] else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        try:
            s.connect(target)
        except OSError:
            return None
        return str(s.getsockname()[0])
