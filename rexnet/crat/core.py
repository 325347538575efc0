"""crat: receives the signed ALERT datagrams of workers and clients and records them.

The core (Crat) is sans-IO: it is handed datagrams as (bytes, source host, port) and time
by a clock; what it records goes to sinks (the JSONL file) and to the log.  Each alert is
marked *verified* when its embedded certificate was issued by one of the trusted CAs,
is currently valid, is a worker or client certificate of that CA's application, its
timestamp is within FRESH_MS of now, it is not a copy of one seen before, and its
Ed25519 signature checks.  Anything else is recorded as *unverified* with the reason; datagrams
that are not rexnet datagrams at all are *garbage*.

Rate limits keep a flood from crowding verified alerts out of the log: verified alerts
get a generous token bucket per source address; unverified alerts and garbage share a
small global budget (and smaller buckets per source).  What is dropped is counted and
summarised in one log line per SUMMARY_INTERVAL.  Nothing here raises on bad input.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import socket
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger

from rexnet.net.announce import DatagramReceiver, RateLimiter, verify_signature
from rexnet.protocol import wire
from rexnet.security.credentials import (
    ROLES,
    CertInfo,
    app_id_of,
    check_validity,
    identity,
    issued_by,
    load_pem_certificates,
)

FRESH_MS = 5 * 60 * 1000
"""An alert whose timestamp is further than this from crat's clock is marked unverified."""
VERIFIED_RATE, VERIFIED_BURST = 200.0, 400.0
"""Token bucket of verified alerts, per source address."""
UNVERIFIED_RATE, UNVERIFIED_BURST = 20.0, 50.0
"""Token bucket shared by every unverified alert and garbage datagram."""
SOURCE_RATE, SOURCE_BURST = 5.0, 10.0
"""Token bucket of unverified alerts and garbage, per source address."""
RATE_SOURCES = 4096
CERT_CACHE = 1024
REPLAY_ENTRIES = 100_000
RECENT = 1000
MAX_REASONS = 64  # distinct reasons counted; any more are counted as "other"
SUMMARY_INTERVAL = 10.0
SUMMARY_SOURCES = 65_536
RECEIVE_BUFFER = 4 << 20

# the fields of an alert shown first in its log line, in this order; then the rest, sorted
_FIRST_FIELDS = ("job", "status", "signal", "limit", "duration", "bytes_in", "bytes_out",
                 "worker", "client", "what")

Record = dict[str, Any]
Sink = Callable[[Record], None]


class CratError(Exception):
    """crat cannot start: the message says why, in one line."""


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


@dataclass
class Counts:
    """What crat has seen since it started (for the log and the dashboard)."""

    received: int = 0
    garbage: int = 0
    ignored: int = 0  # well-formed rexnet datagrams other than alerts
    verified: int = 0
    unverified: int = 0
    dropped_verified: int = 0
    dropped_unverified: int = 0  # unverified alerts and garbage over their budget
    sink_errors: int = 0
    errors: int = 0  # crat's own bugs
    reasons: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        return {**{k: v for k, v in self.__dict__.items() if k != "reasons"},
                "reasons": dict(self.reasons.most_common(20))}


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


class _Drops:
    """Datagrams dropped since the last summary, and from how many sources."""

    def __init__(self) -> None:
        self.count = 0
        self.sources: set[str] = set()
        self.more_sources = False

    def add(self, host: str) -> None:
        self.count += 1
        if len(self.sources) < SUMMARY_SOURCES:
            self.sources.add(host)
        elif host not in self.sources:
            self.more_sources = True

    def describe(self) -> str:
        count = len(self.sources)
        more = "more than " if self.more_sources else ""
        return f"{more}{count} source{'' if count == 1 and not more else 's'}"


def host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def iso_time(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).isoformat(
        timespec="milliseconds")


def readable(value: object, quote: bool = True) -> str:
    """VALUE for a log line: control characters escaped; quoted (unless not QUOTE) if it
    is empty or has spaces, quotes, '=' or escapes, so that 'key=value' stays unambiguous."""
    text = str(value)
    escaped = "".join(c if c.isprintable() else f"\\u{ord(c):04x}" for c in text)
    if quote and (not escaped or escaped != text or any(c in text for c in ' "=\\')):
        return json.dumps(text)
    return escaped


class Crat:
    """Checks, rate-limits and records alerts (sans-IO: TIME comes from CLOCK, in seconds)."""

    def __init__(
        self,
        trusted: Iterable[x509.Certificate],
        clock: Callable[[], float],
        sinks: Sequence[Sink] = (),
        log: Logger | None = None,
        recent: int = RECENT,
    ) -> None:
        self.trusted: dict[bytes, TrustedCA] = {}
        for cert in trusted:
            ca = TrustedCA.of(cert)
            self.trusted.setdefault(ca.app_id, ca)
        self.clock = clock
        self.sinks = list(sinks)
        self.log = log or Logger()
        self.counts = Counts()
        self.recent: deque[Record] = deque(maxlen=recent)
        self.replays = SeenAlerts(REPLAY_ENTRIES)
        self._certs: OrderedDict[bytes, Sender | str] = OrderedDict()
        self._verified_limit = RateLimiter(VERIFIED_RATE, VERIFIED_BURST, RATE_SOURCES)
        self._source_limit = RateLimiter(SOURCE_RATE, SOURCE_BURST, RATE_SOURCES)
        self._global_limit = RateLimiter(UNVERIFIED_RATE, UNVERIFIED_BURST, 1)
        self._dropped_unverified = _Drops()
        self._dropped_verified = _Drops()
        self._sink_failed = False

    # -- the datagram path ------------------------------------------------------------

    def datagram(self, data: bytes, host: str, port: int) -> None:
        """Handle one datagram from HOST:PORT; never raises."""
        try:
            self._datagram(data, host, port)
        except Exception:  # a bug must not stop crat from hearing the next alert
            self.counts.errors += 1
            if self._allow_unverified(host, self.clock()):
                self.log.failure("crat: unexpected error handling a datagram from {source}",
                                 source=host_port(host, port))

    def _datagram(self, data: bytes, host: str, port: int) -> None:
        self.counts.received += 1
        now = self.clock()
        source = host_port(host, port)
        try:
            dgram = wire.decode_datagram(data)
        except wire.WireError as e:
            self.counts.garbage += 1
            if self._allow_unverified(host, now):
                self.log.warn("garbage from {source}: {why}", source=source,
                              why=readable(e, quote=False))
            return
        alert = dgram.message
        if not isinstance(alert, wire.Alert):
            self.counts.ignored += 1
            return
        sender: Sender | None = None
        reason: str | None = None
        try:
            sender = self._sender(dgram)
            self._check(dgram, alert, sender, now)
        except Unverified as e:
            reason = str(e)
            self._count_reason(e.kind)
        if reason is None:
            self.counts.verified += 1
            if not self._verified_limit.allow(host, now):
                self.counts.dropped_verified += 1
                self._dropped_verified.add(host)
                return
        else:
            self.counts.unverified += 1
            if not self._allow_unverified(host, now):
                return
        self._emit(self._record(now, source, dgram, alert, sender, reason))

    def _count_reason(self, kind: str) -> None:
        reasons = self.counts.reasons
        if kind not in reasons and len(reasons) >= MAX_REASONS:
            kind = "other"
        reasons[kind] += 1

    def _allow_unverified(self, host: str, now: float) -> bool:
        if self._source_limit.allow(host, now) and self._global_limit.allow("*", now):
            return True
        self.counts.dropped_unverified += 1
        self._dropped_unverified.add(host)
        return False

    # -- checks -----------------------------------------------------------------------

    def _sender(self, dgram: wire.Datagram) -> Sender:
        """The certificate's holder if it passes the checks that do not depend on time;
        else raise Unverified.  Results, good and bad, are cached by digest."""
        if not dgram.cert_der:
            raise Unverified("no certificate")
        digest = hashlib.sha256(dgram.app_id + dgram.cert_der).digest()
        cached = self._certs.get(digest)
        if cached is None:
            try:
                cached = self._check_cert(dgram)
            except Exception:  # crafted DER can upset the parser in many ways
                cached = "unreadable certificate"
            self._certs[digest] = cached
            if len(self._certs) > CERT_CACHE:
                self._certs.popitem(last=False)
        else:
            self._certs.move_to_end(digest)
        if isinstance(cached, str):
            raise Unverified(cached)
        return cached

    def _check_cert(self, dgram: wire.Datagram) -> Sender | str:
        cert = x509.load_der_x509_certificate(dgram.cert_der)
        info = CertInfo.of(cert)
        ca = self.trusted.get(dgram.app_id)
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

    def _check(self, dgram: wire.Datagram, alert: wire.Alert, sender: Sender,
               now: float) -> None:
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
        if self.replays.seen(digest, now_ms):
            raise Unverified("replay of an alert already received")
        if not verify_signature(sender.key, dgram):
            raise Unverified("bad signature")
        self.replays.add(digest, alert.ts_ms + FRESH_MS)

    # -- records ----------------------------------------------------------------------

    def _record(self, now: float, source: str, dgram: wire.Datagram, alert: wire.Alert,
                sender: Sender | None, reason: str | None) -> Record:
        claims = sender.info if sender is not None else self._claims(dgram.cert_der)
        return {
            "received": iso_time(now),
            "source": source,
            "verified": reason is None,
            "reason": reason,
            "app": claims.app if claims else None,
            "role": claims.role if claims else None,
            "sender": claims.name if claims else None,
            "event": alert.event,
            "ts": alert.ts_ms,
            "fields": dict(alert.fields),
        }

    @staticmethod
    def _claims(der: bytes) -> CertInfo | None:
        """What an unverified certificate claims (for the record), if it can be read."""
        if not der:
            return None
        try:
            return CertInfo.of(x509.load_der_x509_certificate(der))
        except Exception:
            return None

    def _emit(self, record: Record) -> None:
        self.recent.append(record)
        fields: dict[str, Any] = record["fields"]
        order = [k for k in _FIRST_FIELDS if k in fields] + sorted(
            k for k in fields if k not in _FIRST_FIELDS)
        details = " ".join(f"{readable(k)}={readable(fields[k])}" for k in order)
        who = " ".join(readable(record[k] or "?") for k in ("app", "role", "sender"))
        if record["verified"]:
            # periodic worker-status reports go to the JSONL file and the dashboard only
            emit = self.log.debug if record["event"] == "worker-status" else self.log.info
            emit("alert [verified] {who}: {event} {details} (from {source})",
                 who=who, event=record["event"], details=details, source=record["source"],
                 record=record)
        else:
            self.log.warn("alert [UNVERIFIED: {reason}] {who}: {event} {details} "
                          "(from {source})", reason=readable(record["reason"]), who=who,
                          event=record["event"], details=details, source=record["source"],
                          record=record)
        for sink in self.sinks:
            try:
                sink(record)
            except Exception as e:
                self.counts.sink_errors += 1
                if not self._sink_failed:  # say it once, not once per alert
                    self._sink_failed = True
                    self.log.error("crat: cannot record alerts: {error}", error=e)

    # -- periodic summary -------------------------------------------------------------

    def tick(self) -> None:
        """Log what was dropped since the last tick (call every SUMMARY_INTERVAL)."""
        drops = self._dropped_unverified
        if drops.count:
            self.log.warn("dropped {count} unverified/garbage datagrams from {sources} "
                          "(over the rate limit)", count=drops.count,
                          sources=drops.describe())
            self._dropped_unverified = _Drops()
        drops = self._dropped_verified
        if drops.count:
            self.log.warn("dropped {count} verified alerts from {sources} sending more "
                          "than {rate:g} a second", count=drops.count,
                          sources=drops.describe(), rate=VERIFIED_RATE)
            self._dropped_verified = _Drops()

    def stats(self) -> dict[str, Any]:
        """Counts and the trusted applications, for a dashboard."""
        return {"counts": self.counts.as_dict(),
                "trusted": sorted(ca.app for ca in self.trusted.values()),
                "recent": len(self.recent)}


# -- adapters -----------------------------------------------------------------------


class JsonlSink:
    """Appends each record to a file as one JSON object a line, flushed per line."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.file: IO[str] = open(path, "a", encoding="utf-8")  # noqa: SIM115
        except OSError as e:
            raise CratError(f"cannot write alerts to {path}: {e.strerror}") from None

    def __call__(self, record: Record) -> None:
        self.file.write(json.dumps(record, separators=(",", ":")) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def bind_udp(host: str, port: int) -> socket.socket:
    """A UDP socket bound to HOST:PORT, with a large receive buffer; CratError if not."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    with contextlib.suppress(OSError):  # room for a burst: a flood must not fill the queue
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise CratError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.setblocking(False)
    return sock


class CratService(Service):
    """Feeds the datagrams of a bound UDP socket to a Crat; summarises drops."""

    def __init__(self, crat: Crat, sock: socket.socket, reactor: Any,
                 closing: Sequence[Callable[[], None]] = ()) -> None:
        self.crat = crat
        self.sock = sock
        self.reactor = reactor
        self.closing = list(closing)
        self.port: IListeningPort | None = None
        self.summary = task.LoopingCall(crat.tick)
        self.summary.clock = reactor

    def startService(self) -> None:
        super().startService()
        receiver = DatagramReceiver(self.crat.datagram)
        receiver.noisy = False
        self.port = self.reactor.adoptDatagramPort(self.sock.fileno(), self.sock.family,
                                                   receiver)
        host, port = self.sock.getsockname()[:2]
        self.sock.close()  # the reactor holds its own copy
        self.summary.start(SUMMARY_INTERVAL, now=False)
        apps = ", ".join(sorted(ca.app for ca in self.crat.trusted.values())) or "nothing"
        self.crat.log.info("crat listening on {address}, trusting {apps}",
                           address=host_port(host, port), apps=apps)

    def stopService(self) -> defer.Deferred[Any]:
        super().stopService()
        if self.summary.running:
            self.summary.stop()
        self.crat.tick()
        stopped = self.port.stopListening() if self.port is not None else None
        done: defer.Deferred[Any] = stopped if stopped is not None else defer.succeed(None)

        def close(result: object) -> object:
            for action in self.closing:
                action()
            return result

        return done.addBoth(close)


def read_ca_certificate(path: Path) -> x509.Certificate:
    """The application CA certificate of a trust FILE; CratError saying what is wrong.

    FILE is a credential (APP.worker or APP.client: crat takes its last certificate, the
    CA's) or a PEM file holding the CA certificate alone.  An APP.ca file is refused: it
    holds the CA's private key, which must stay with the administrator.
    """
    if path.name.endswith(".ca"):
        raise CratError(
            f"{path} holds the application CA's private key, which must stay with the "
            "administrator: trust APP.worker, APP.client or the CA certificate alone "
            f"(openssl x509 -in {path} -out {path.name}.pem)")
    try:
        size = path.stat().st_size
        if size > 64 * 1024:
            raise CratError(f"{path} is too large to be a rexnet credential or certificate")
        data = path.read_bytes()
    except OSError as e:
        raise CratError(f"cannot read {path}: {e.strerror}") from None
    try:
        certs = load_pem_certificates(data)
    except ValueError:
        raise CratError(f"{path} holds no PEM certificate (give APP.worker, APP.client or "
                        "the application's CA certificate)") from None
    ca = certs[-1]
    has_key = b"PRIVATE KEY-----" in data
    try:
        info = CertInfo.of(ca)
    except ValueError:
        info = CertInfo("", "", "")
    if info.role != "ca" or not issued_by(ca, ca):
        raise CratError(f"{path} does not end with an application CA certificate "
                        "(give APP.worker, APP.client or the CA certificate)")
    if has_key and len(certs) == 1:
        raise CratError(
            f"{path} holds the application CA's private key, which must stay with the "
            "administrator: trust APP.worker, APP.client or the CA certificate alone")
    problem = check_validity(ca)
    if problem:
        raise CratError(f"{path}: the CA certificate of {info.app} {problem}")
    return ca


def open_jsonl(path: str) -> JsonlSink:
    return JsonlSink(Path(os.path.abspath(path)))
