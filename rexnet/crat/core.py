"""crat: receives the signed ALERT datagrams of workers and clients and records them.

The core (Crat) is sans-IO: it is handed datagrams as (bytes, source host, port) and time
by a clock; what it records goes to sinks (rexnet.crat.sinks, the dashboard) and to the
log.  Each alert is marked *verified* when it passes the checks of rexnet.crat.verify;
anything else is recorded as *unverified* with the reason (a certificate listed in one of
the revocation lists crat was given makes its alerts unverified: "... is revoked");
datagrams that are not rexnet datagrams at all are *garbage*.

Rate limits keep a flood from crowding verified alerts out of the log: verified alerts
get a generous token bucket per source address; unverified alerts and garbage share a
small global budget (and smaller buckets per source).  What is dropped is counted and
summarised in one log line per SUMMARY_INTERVAL.  The recent records are kept in two
bounded lists, verified and not, so that junk never pushes a verified record out.  Nothing
here raises on bad input.
"""

from __future__ import annotations

import datetime
import hashlib
import json
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from twisted.logger import Logger

from rexnet.crat.verify import (
    REPLAY_ENTRIES,
    SeenAlerts,
    Sender,
    TrustedCA,
    Unverified,
    check_alert,
    check_certificate,
    claims,
)
from rexnet.net.announce import RateLimiter
from rexnet.protocol import wire
from rexnet.security.revocation import RevokedFile

VERIFIED_RATE, VERIFIED_BURST = 200.0, 400.0
"""Token bucket of verified alerts, per source address."""
UNVERIFIED_RATE, UNVERIFIED_BURST = 20.0, 50.0
"""Token bucket shared by every unverified alert and garbage datagram."""
SOURCE_RATE, SOURCE_BURST = 5.0, 10.0
"""Token bucket of unverified alerts and garbage, per source address."""
RATE_SOURCES = 4096
CERT_CACHE = 1024
RECENT = 1000
MAX_REASONS = 64  # distinct reasons counted; any more are counted as "other"
SUMMARY_INTERVAL = 10.0
SUMMARY_SOURCES = 65_536

# the fields of an alert shown first in its log line, in this order; then the rest, sorted
_FIRST_FIELDS = ("job", "status", "signal", "limit", "duration", "bytes_in", "bytes_out",
                 "worker", "client", "what")

Record = dict[str, Any]
Sink = Callable[[Record], None]


class CratError(Exception):
    """crat cannot start: the message says why, in one line."""


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
        revoked: Sequence[RevokedFile] = (),
    ) -> None:
        self.trusted: dict[bytes, TrustedCA] = {}
        for cert in trusted:
            ca = TrustedCA.of(cert)
            self.trusted.setdefault(ca.app_id, ca)
        self.clock = clock
        self.sinks = list(sinks)
        self.log = log or Logger()
        self.counts = Counts()
        self.revoked = list(revoked)
        self.recent: deque[Record] = deque(maxlen=recent)  # verified records
        self.recent_unverified: deque[Record] = deque(maxlen=recent)
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
            self._check_revoked(sender)
            check_alert(dgram, alert, sender, now, self.replays)
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
                cached = check_certificate(dgram.cert_der, dgram.app_id, self.trusted)
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

    def _check_revoked(self, sender: Sender) -> None:
        """Raise Unverified if a revocation list names SENDER's certificate (the lists
        re-read their files when these change)."""
        for revoked in self.revoked:
            reason = revoked.reason(sender.cert)
            if reason:
                raise Unverified(reason, "revoked")

    # -- records ----------------------------------------------------------------------

    def _record(self, now: float, source: str, dgram: wire.Datagram, alert: wire.Alert,
                sender: Sender | None, reason: str | None) -> Record:
        claimed = sender.info if sender is not None else claims(dgram.cert_der)
        return {
            "received": iso_time(now),
            "source": source,
            "verified": reason is None,
            "reason": reason,
            "app": claimed.app if claimed else None,
            "role": claimed.role if claimed else None,
            "sender": claimed.name if claimed else None,
            "serial": f"{sender.cert.serial_number:X}" if sender is not None else None,
            "event": alert.event,
            "ts": alert.ts_ms,
            "fields": dict(alert.fields),
        }

    def _emit(self, record: Record) -> None:
        (self.recent if record["verified"] else self.recent_unverified).append(record)
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
                "recent": len(self.recent) + len(self.recent_unverified)}
