"""crat (rexnet.crat.core, rexnet.crat.tap): verifying, rate-limiting and recording alerts.

The core runs on a fake clock with real credentials: an alert is verified only when its
certificate comes from a trusted CA, names a worker or client of that CA's application,
is valid, signed the datagram, and the alert is fresh and not a replay.  Floods of garbage
and unverified alerts are capped and never crowd out verified ones.  Then a real crat
process hears the alerts of real workers and clients, on loopback and across namespaces.
"""

from __future__ import annotations

import datetime
import json
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cluster import TWISTD, Proc, loopback_address, run_exec, start_worker
from conftest import Keys
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from netbed import NetBed
from test_exec import impostor
from twisted.application.service import MultiService
from twisted.logger import ILogObserver, Logger, formatEvent
from twisted.python import usage
from zope.interface import provider

from rexnet.crat import tap as crat_tap
from rexnet.crat.core import (
    CERT_CACHE,
    MAX_REASONS,
    UNVERIFIED_BURST,
    UNVERIFIED_RATE,
    VERIFIED_BURST,
    Crat,
    CratError,
    readable,
)
from rexnet.crat.service import CratService
from rexnet.crat.sinks import JsonlSink
from rexnet.crat.trust import read_ca_certificate
from rexnet.crat.verify import FRESH_MS, SeenAlerts
from rexnet.net.alerts import CRAT_PORT
from rexnet.protocol import exitcodes, wire
from rexnet.security.credentials import CA, Credential, identity, issue, load_ca, load_credential

SOURCE = "192.0.2.7"


class FakeClock:
    """A settable clock in seconds, for Crat; it starts at the real time, around which the
    test credentials are valid."""

    def __init__(self) -> None:
        self.seconds = time.time()

    def __call__(self) -> float:
        return self.seconds

    @property
    def ms(self) -> int:
        return int(self.seconds * 1000)


@dataclass(frozen=True)
class Creds:
    ca: CA
    worker: Credential
    client: Credential
    other_worker: Credential
    other_client: Credential


@pytest.fixture(scope="module")
def creds(keys: Keys, other_keys: Keys) -> Creds:
    return Creds(load_ca(keys.ca), load_credential(keys.worker, "worker"),
                 load_credential(keys.client, "client"),
                 load_credential(other_keys.worker, "worker"),
                 load_credential(other_keys.client, "client"))


@dataclass
class Bench:
    """A Crat on a fake clock, with what it recorded and logged."""

    crat: Crat
    clock: FakeClock
    records: list[dict[str, Any]]
    events: list[dict[str, Any]]

    @property
    def lines(self) -> list[str]:
        return [formatEvent(e) for e in self.events]

    def feed(self, data: bytes, host: str = SOURCE, port: int = 40000) -> None:
        self.crat.datagram(data, host, port)

    def one(self, data: bytes, host: str = SOURCE) -> dict[str, Any]:
        """Feed DATA and return the one record it made."""
        before = len(self.records)
        self.feed(data, host)
        assert len(self.records) == before + 1, self.lines
        return self.records[-1]


def bench(creds: Creds, *trusted: x509.Certificate, recent: int = 1000) -> Bench:
    clock = FakeClock()
    records: list[dict[str, Any]] = []
    events: list[dict[str, Any]] = []

    @provider(ILogObserver)
    def observe(event: dict[str, Any]) -> None:
        events.append(event)

    log = Logger(namespace="rexnet.crat.core", observer=observe)
    crat = Crat(trusted or [creds.worker.ca_cert], clock, [records.append], log, recent)
    return Bench(crat, clock, records, events)


@pytest.fixture
def b(creds: Creds) -> Bench:
    return bench(creds)


def alert(
    cred: Credential,
    event: str = "job-finished",
    *,
    ts: int | None = None,
    fields: dict[str, str | int | float] | None = None,
    signer: wire.Signer | None = None,
    cert: bytes | None = None,
    app_id: bytes | None = None,
) -> bytes:
    """An ALERT as CRED's holder sends it now; keyword arguments make it wrong."""
    fields = {"job": "abc123", "status": 0} if fields is None else fields
    return wire.encode_datagram(
        wire.Alert(int(time.time() * 1000) if ts is None else ts, event,
                   tuple(sorted(fields.items()))),
        cred.app_id if app_id is None else app_id,
        cred.key if signer is None else signer,
        cred.cert_der if cert is None else cert,
    )


def custom_cert(ca: CA, *, app: str, role: str, name: str = "evil",
                dns: tuple[str, ...] | None = None) -> tuple[Ed25519PrivateKey, bytes]:
    """A certificate the application CA really signed, but naming the wrong things."""
    key = Ed25519PrivateKey.generate()
    now = datetime.datetime.now(datetime.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, app),
                         x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
                         x509.NameAttribute(NameOID.COMMON_NAME, name)])
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca.cert.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1)))
    names = dns if dns is not None else (identity(role, app),)
    if names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
    cert = builder.sign(ca.key, None)
    return key, cert.public_bytes(serialization.Encoding.DER)


# -- verified and unverified alerts -----------------------------------------------------


def test_a_workers_alert_is_verified(b: Bench, creds: Creds) -> None:
    record = b.one(alert(creds.worker, ts=b.clock.ms - 7, fields={
        "job": "abc", "status": 0, "duration": 1.5, "bytes_in": 10, "worker": "w1"}))
    assert record == {
        "received": datetime.datetime.fromtimestamp(b.clock.seconds, datetime.UTC).isoformat(
            timespec="milliseconds"),
        "source": f"{SOURCE}:40000", "verified": True, "reason": None, "app": "testapp",
        "role": "worker", "sender": "worker",
        "serial": f"{creds.worker.cert.serial_number:X}",  # which certificate signed it
        "event": "job-finished", "ts": b.clock.ms - 7,
        "fields": {"job": "abc", "status": 0, "duration": 1.5, "bytes_in": 10, "worker": "w1"},
    }
    assert b.lines == [f"alert [verified] testapp worker worker: job-finished job=abc status=0 "
                       f"duration=1.5 bytes_in=10 worker=w1 (from {SOURCE}:40000)"]
    assert b.events[0]["log_level"].name == "info"
    assert b.events[0]["record"] is record
    assert list(b.crat.recent) == [record]
    assert b.crat.counts.verified == 1 and b.crat.counts.received == 1


def test_a_clients_alert_is_verified(b: Bench, creds: Creds) -> None:
    record = b.one(alert(creds.client, "complaint", fields={"what": "no worker answered"}))
    assert record["verified"] and record["role"] == "client" and record["sender"] == "client"
    assert b.lines[0].startswith(
        'alert [verified] testapp client client: complaint what="no worker answered"')


def test_a_client_credential_file_trusts_the_same_ca(creds: Creds) -> None:
    b = bench(creds, creds.client.ca_cert)
    assert b.one(alert(creds.worker))["verified"]


def test_alerts_of_an_untrusted_application(b: Bench, creds: Creds) -> None:
    record = b.one(alert(creds.other_worker))
    assert not record["verified"]
    assert record["reason"] == "certificate not issued by a trusted CA"
    assert (record["app"], record["role"], record["sender"]) == ("otherapp", "worker", "worker")
    assert b.lines[0].startswith("alert [UNVERIFIED: \"certificate not issued by a trusted CA\"]"
                                 " otherapp worker worker: job-finished job=abc123 status=0")
    assert b.events[0]["log_level"].name == "warn"
    # claiming our application id does not help
    assert b.one(alert(creds.other_worker, app_id=creds.worker.app_id))["reason"] == (
        "certificate not issued by a trusted CA")


def test_trusting_two_applications(creds: Creds) -> None:
    b = bench(creds, creds.worker.ca_cert, creds.other_client.ca_cert)
    assert b.one(alert(creds.worker))["verified"]
    assert b.one(alert(creds.other_client))["app"] == "otherapp"
    assert b.records[-1]["verified"]


def test_a_forged_signature(b: Bench, creds: Creds) -> None:
    record = b.one(alert(creds.worker, signer=Ed25519PrivateKey.generate()))
    assert not record["verified"] and record["reason"] == "bad signature"
    assert record["sender"] == "worker"
    # the same certificate, someone else's signature over a changed body
    good = alert(creds.worker, fields={"job": "x", "status": 0})
    tampered = good.replace(b'"status":0', b'"status":1')
    assert tampered != good
    assert b.one(tampered)["reason"] == "bad signature"


def test_no_certificate(b: Bench, creds: Creds) -> None:
    assert b.one(alert(creds.worker, cert=b""))["reason"] == "no certificate"
    assert b.records[-1]["sender"] is None


def test_an_unreadable_certificate(b: Bench, creds: Creds) -> None:
    record = b.one(alert(creds.worker, cert=b"\x30\x03junk"))
    assert record["reason"] == "unreadable certificate" and record["app"] is None


@pytest.mark.parametrize(("what", "app", "role", "dns", "reason"), [
    ("another application's name", "otherapp", "worker", None,
     "certificate names application 'otherapp', its CA is 'testapp''s"),
    ("the client's DNS-ID on a worker", "testapp", "worker", ("client.testapp.rexnet",),
     "certificate lacks the name worker.testapp.rexnet"),
    ("no DNS-ID", "testapp", "worker", (), "certificate lacks the name worker.testapp.rexnet"),
    ("another application's DNS-ID", "testapp", "client", ("client.otherapp.rexnet",),
     "certificate lacks the name client.testapp.rexnet"),
    ("role ca", "testapp", "ca", None, "certificate of role 'ca', not a worker or client "
     "credential"),
    ("role admin", "testapp", "admin", None, "certificate of role 'admin', not a worker or "
     "client credential"),
])
def test_a_certificate_of_the_trusted_ca_naming_the_wrong_things(
        b: Bench, creds: Creds, what: str, app: str, role: str,
        dns: tuple[str, ...] | None, reason: str) -> None:
    key, der = custom_cert(creds.ca, app=app, role=role, dns=dns)
    record = b.one(alert(creds.worker, signer=key, cert=der))
    assert not record["verified"], what
    assert record["reason"] == reason


def test_an_expired_certificate(b: Bench, creds: Creds) -> None:
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=10)
    key, cert = issue(creds.ca.key, creds.ca.cert, "worker", "old", days=1, now=past)
    der = cert.public_bytes(serialization.Encoding.DER)
    record = b.one(alert(creds.worker, signer=key, cert=der))
    assert record["reason"].startswith("certificate expired on ")
    assert record["sender"] == "old"


def test_validity_follows_the_clock_even_when_the_certificate_is_cached(
        b: Bench, creds: Creds) -> None:
    assert b.one(alert(creds.worker, fields={"n": 1}))["verified"]
    b.clock.seconds += 3651 * 86400  # beyond the credential's 3650 days
    late = alert(creds.worker, ts=b.clock.ms, fields={"n": 2})
    assert b.one(late)["reason"].startswith("certificate expired on ")


def test_a_replay_is_unverified(b: Bench, creds: Creds) -> None:
    data = alert(creds.worker, ts=b.clock.ms)
    assert b.one(data)["verified"]
    b.clock.seconds += 1
    again = b.one(data, host="198.51.100.9")
    assert not again["verified"] and again["reason"] == "replay of an alert already received"
    # the same event sent again a millisecond later is a new alert
    assert b.one(alert(creds.worker, ts=b.clock.ms - 999))["verified"]


def test_the_replay_cache_is_bounded_and_forgets() -> None:
    seen = SeenAlerts(entries=3)
    for n in range(5):
        seen.add(bytes([n]), expires_ms=1000 + n)
    assert len(seen) == 3
    assert not seen.seen(b"\0", 0) and seen.seen(b"\4", 0)
    assert seen.seen(b"\3", 1003) and not seen.seen(b"\3", 1004) and len(seen) == 1


def test_a_replay_after_the_freshness_window_is_stale(b: Bench, creds: Creds) -> None:
    data = alert(creds.worker)
    assert b.one(data)["verified"]
    b.clock.seconds += FRESH_MS / 1000 + 1
    assert b.one(data)["reason"].startswith("stale: ")
    assert b.one(alert(creds.worker, ts=b.clock.ms))["verified"]
    assert len(b.crat.replays) == 1  # the first one was forgotten


def test_forged_copies_do_not_spoil_the_real_alert(b: Bench, creds: Creds) -> None:
    """Only verified alerts enter the replay cache: a forgery sent first changes nothing."""
    real = alert(creds.worker)
    forged = real[:-64] + bytes(64)
    assert b.one(forged)["reason"] == "bad signature"
    assert b.one(real)["verified"]


@pytest.mark.parametrize(("offset_ms", "reason"), [
    (-FRESH_MS - 1000, "stale: sent 301 s before crat's clock"),
    (FRESH_MS + 60_000, "stale: sent 360 s ahead of crat's clock"),
    (-FRESH_MS + 1000, None),
    (FRESH_MS - 1000, None),
])
def test_stale_alerts(b: Bench, creds: Creds, offset_ms: int, reason: str | None) -> None:
    record = b.one(alert(creds.worker, ts=b.clock.ms + offset_ms))
    assert record["reason"] == reason
    assert record["verified"] is (reason is None)


@pytest.mark.parametrize("data", [
    b"", b"hello", b"RXN\x01garbage", b"RXN" + bytes(200), b"\xff" * 5000,
])
def test_garbage_is_counted_and_logged_never_recorded(b: Bench, data: bytes) -> None:
    b.feed(data)
    assert b.records == []
    assert b.crat.counts.garbage == 1
    assert b.lines[0].startswith(f"garbage from {SOURCE}:40000: ")


def test_a_truncated_alert_is_garbage(b: Bench, creds: Creds) -> None:
    b.feed(alert(creds.worker)[:-1])
    assert b.crat.counts.garbage == 1 and b.records == []


def test_other_datagrams_are_ignored(b: Bench, creds: Creds) -> None:
    ann = wire.Announce(bytes(16), 0, b.clock.ms, 4000, (SOURCE,))
    b.feed(wire.encode_datagram(ann, creds.client.app_id, creds.client.key,
                                creds.client.cert_der))
    assert b.crat.counts.ignored == 1 and b.records == [] and b.lines == []


def test_ipv6_sources(b: Bench, creds: Creds) -> None:
    b.feed(alert(creds.worker), host="2001:db8::7", port=5)
    assert b.records[-1]["source"] == "[2001:db8::7]:5"


def test_log_lines_escape_what_senders_write(b: Bench, creds: Creds) -> None:
    nasty = "x\nalert [verified] testapp worker boss: job-finished\u2028 \x1b[31m"
    record = b.one(alert(creds.worker, fields={"what": nasty, "a=b": "c d"}))
    assert record["fields"]["what"] == nasty  # kept as is in the record (JSON escapes it)
    line = b.lines[0]
    assert "\n" not in line and "\u2028" not in line and "\x1b" not in line
    assert '"a=b"="c d"' in line
    assert readable("plain") == "plain"
    assert readable("") == '""'


def test_reasons_are_counted_by_kind_and_bounded(b: Bench, creds: Creds) -> None:
    for n in range(200):  # forgeries with ever different timestamps: all stale
        b.clock.seconds += 1
        b.feed(alert(creds.worker, ts=n, signer=Ed25519PrivateKey.generate()))
    assert b.crat.counts.reasons == {"stale": 200}
    for n in range(MAX_REASONS + 5):
        b.crat._count_reason(f"reason {n}")
    assert len(b.crat.counts.reasons) == MAX_REASONS + 1  # and "other"
    assert b.crat.counts.reasons["other"] == 6


def test_the_recent_records_are_bounded(creds: Creds) -> None:
    b = bench(creds, recent=5)
    for n in range(12):
        b.feed(alert(creds.worker, fields={"n": n}))
    assert [r["fields"]["n"] for r in b.crat.recent] == list(range(7, 12))
    assert len(b.records) == 12


def test_the_certificate_cache_is_bounded(b: Bench, creds: Creds) -> None:
    for n in range(CERT_CACHE + 50):
        b.clock.seconds += 1  # stay within the budget of unverified alerts
        b.feed(alert(creds.worker, cert=b"\x30\x03" + n.to_bytes(4, "big")))
    assert len(b.crat._certs) <= CERT_CACHE
    assert b.one(alert(creds.worker, ts=b.clock.ms))["verified"]


def test_a_failing_sink_is_reported_once_and_changes_nothing(creds: Creds) -> None:
    b = bench(creds)

    def broken(record: dict[str, Any]) -> None:
        raise OSError(28, "No space left on device")

    b.crat.sinks.insert(0, broken)
    for n in range(3):
        b.feed(alert(creds.worker, fields={"n": n}))
    assert len(b.records) == 3 and len(b.crat.recent) == 3
    assert b.crat.counts.sink_errors == 3
    assert sum("cannot record alerts" in line for line in b.lines) == 1


def test_stats_for_the_dashboard(b: Bench, creds: Creds) -> None:
    b.feed(alert(creds.worker))
    b.feed(alert(creds.other_worker))
    b.feed(b"junk")
    stats = b.crat.stats()
    assert stats["trusted"] == ["testapp"] and stats["recent"] == 2
    counts = stats["counts"]
    assert (counts["received"], counts["verified"], counts["unverified"], counts["garbage"]) == (
        3, 1, 1, 1)
    assert counts["reasons"] == {"certificate not issued by a trusted CA": 1}
    json.dumps(stats)


# -- floods ---------------------------------------------------------------------------


def test_a_flood_cannot_crowd_out_verified_alerts(b: Bench, creds: Creds) -> None:
    """5000 garbage, foreign, forged and replayed datagrams from 1000 sources over 5 s,
    with 25 verified alerts among them: every verified one is recorded and logged, the
    rest is capped."""
    captured = alert(creds.worker, fields={"job": "captured"})
    b.feed(captured, host="10.0.0.1")
    forged_cert = alert(creds.worker, signer=Ed25519PrivateKey.generate())
    other = alert(creds.other_worker)
    junk = [b"RXN\x01" + bytes(60), other, forged_cert, b"\x00" * 100, captured]
    verified_sent = ["captured"]
    for n in range(5000):
        b.clock.seconds += 0.001
        if n % 200 == 100:
            data = alert(creds.worker, ts=b.clock.ms, fields={"job": f"j{n}", "status": 0})
            verified_sent.append(f"j{n}")
            b.feed(data, host=f"10.0.0.{n % 5 + 1}")
        b.feed(junk[n % len(junk)], host=f"203.0.{n % 1000 // 250}.{n % 250}")
    verified = [r for r in b.records if r["verified"]]
    assert [r["fields"]["job"] for r in verified] == verified_sent
    logged = [line for line in b.lines if line.startswith("alert [verified]")]
    assert len(logged) == len(verified_sent)
    elapsed = 5.0
    cap = UNVERIFIED_BURST + UNVERIFIED_RATE * elapsed + 1
    unverified = [r for r in b.records if not r["verified"]]
    garbage_lines = [line for line in b.lines if line.startswith("garbage from")]
    assert 0 < len(unverified) + len(garbage_lines) <= cap
    counts = b.crat.counts
    assert counts.received == 5000 + len(verified_sent)
    assert counts.reasons["replay of an alert already received"] == 1000
    assert counts.dropped_unverified == 5000 - len(unverified) - len(garbage_lines)
    assert counts.dropped_verified == 0
    b.events.clear()
    b.crat.tick()
    (summary,) = b.lines
    match = re.fullmatch(rf"dropped {counts.dropped_unverified} unverified/garbage datagrams "
                         r"from (\d+) sources \(over the rate limit\)", summary)
    assert match and 850 <= int(match[1]) <= 1000, summary  # most sources lost some
    b.events.clear()
    b.crat.tick()  # nothing new dropped: nothing said
    assert b.lines == []


def test_one_source_cannot_use_up_the_unverified_budget(b: Bench, creds: Creds) -> None:
    for _ in range(100):
        b.feed(b"junk", host="203.0.113.1")
    b.feed(b"junk", host="203.0.113.2")
    garbage_lines = [line for line in b.lines if line.startswith("garbage from")]
    assert len(garbage_lines) <= 11  # the per-source burst, and the other source's one
    assert garbage_lines[-1].startswith("garbage from 203.0.113.2:")


def test_a_verified_sender_over_its_rate_is_capped_and_summarised(
        b: Bench, creds: Creds) -> None:
    sent = int(VERIFIED_BURST) + 100
    for n in range(sent):
        b.feed(alert(creds.worker, fields={"n": n}))
    assert len(b.records) == VERIFIED_BURST
    assert b.crat.counts.dropped_verified == 100
    b.events.clear()
    b.crat.tick()
    assert b.lines == ["dropped 100 verified alerts from 1 source sending more than 200 a "
                       "second"]
    b.clock.seconds += 1  # the bucket refills
    b.feed(alert(creds.worker, fields={"n": -1}))
    assert b.records[-1]["fields"] == {"n": -1}


# -- fuzzing --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_crat(creds: Creds) -> Bench:
    return bench(creds)


def _mutate(data: bytes, index: int, value: int, cut: int) -> bytes:
    index %= len(data)
    changed = data[:index] + bytes([value]) + data[index + 1:]
    return changed[: len(changed) - cut]


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture],
          deadline=None)
@given(st.one_of(
    st.binary(max_size=wire.MAX_DATAGRAM + 16),
    st.tuples(st.integers(0, 10_000), st.integers(0, 255), st.integers(0, 3)),
))
def test_fuzzed_datagrams_are_only_counted(fuzz_crat: Bench, creds: Creds,
                                           case: bytes | tuple[int, int, int]) -> None:
    crat = fuzz_crat.crat
    data = case if isinstance(case, bytes) else _mutate(alert(creds.worker), *case)
    before = crat.counts.received
    crat.datagram(data, SOURCE, 1)  # must not raise
    c = crat.counts
    assert c.received == before + 1
    assert c.received == c.garbage + c.ignored + c.verified + c.unverified
    assert c.errors == 0


# -- the JSONL file and the trust files ---------------------------------------------------


def test_jsonl_appends_one_object_a_line(tmp_path: Path) -> None:
    path = tmp_path / "alerts.jsonl"
    path.write_text('{"old":1}\n')
    sink = JsonlSink(path)
    sink({"a": "line\nbreak", "n": 1})
    assert path.read_text().splitlines()[1] == '{"a":"line\\nbreak","n":1}'  # flushed
    sink({"b": 2})
    sink.close()
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"old": 1}, {"a": "line\nbreak", "n": 1}, {"b": 2}]


def test_an_unwritable_jsonl_file(tmp_path: Path) -> None:
    with pytest.raises(CratError, match=r"cannot write alerts to .*nodir/x: No such file"):
        JsonlSink(tmp_path / "nodir" / "x")
    with pytest.raises(CratError, match="Is a directory"):
        JsonlSink(tmp_path)


def test_trust_files(keys: Keys, creds: Creds, tmp_path: Path) -> None:
    assert read_ca_certificate(keys.worker) == creds.ca.cert
    assert read_ca_certificate(keys.client) == creds.ca.cert
    pem = tmp_path / "testapp-ca.pem"
    pem.write_bytes(creds.ca.cert.public_bytes(serialization.Encoding.PEM))
    pem.chmod(0o644)  # a certificate is no secret
    assert read_ca_certificate(pem) == creds.ca.cert


def test_trust_files_refused(keys: Keys, tmp_path: Path) -> None:
    with pytest.raises(CratError, match="private key, which must stay with the administrator"):
        read_ca_certificate(keys.ca)
    renamed = tmp_path / "ca.pem"
    shutil.copy(keys.ca, renamed)
    with pytest.raises(CratError, match="private key, which must stay with the administrator"):
        read_ca_certificate(renamed)
    junk = tmp_path / "junk"
    junk.write_text("hello\n")
    with pytest.raises(CratError, match="holds no PEM certificate"):
        read_ca_certificate(junk)
    with pytest.raises(CratError, match=r"cannot read .*missing: No such file"):
        read_ca_certificate(tmp_path / "missing")
    leaf = tmp_path / "leaf.pem"
    leaf.write_bytes(keys.worker.read_bytes().split(b"-----END CERTIFICATE-----")[0]
                     + b"-----END CERTIFICATE-----\n")
    with pytest.raises(CratError, match="does not end with an application CA certificate"):
        read_ca_certificate(leaf)


# -- the tap --------------------------------------------------------------------------


def parse(*args: str) -> crat_tap.Options:
    options = crat_tap.Options()
    options.parseOptions(list(args))
    return options


def test_options(keys: Keys) -> None:
    options = parse("--trust", str(keys.ca_pem))
    assert options["listen_addr"] == ("0.0.0.0", CRAT_PORT)
    assert options["trust"] == [str(keys.ca_pem)] and options["jsonl"] is None
    options = parse("--listen", "127.0.0.1", "--trust", "a", "--trust", "b", "--jsonl", "f")
    assert options["listen_addr"] == ("127.0.0.1", CRAT_PORT)
    assert options["trust"] == ["a", "b"] and options["jsonl"] == "f"
    assert parse("--trust", "a", "--listen", "[::1]:0")["listen_addr"] == ("::1", 0)


@pytest.mark.parametrize(("args", "message"), [
    ((), "give --trust at least once"),
    (("--trust", "a", "--listen", "host:x"), "bad port"),
    (("--trust", "a", "extra"), "Wrong number of arguments"),
])
def test_bad_options(args: tuple[str, ...], message: str) -> None:
    with pytest.raises(usage.UsageError, match=message):
        parse(*args)


def test_make_service(keys: Keys, tmp_path: Path) -> None:
    addr = loopback_address()
    config = parse("--listen", f"{addr}:0", "--trust", str(keys.ca_pem), "--trust",
                   str(keys.ca_pem), "--jsonl", str(tmp_path / "a.jsonl"))
    top = crat_tap.makeService(config)
    assert isinstance(top, MultiService)
    (service,) = list(top)
    assert isinstance(service, CratService)
    try:
        assert service.sock.getsockname()[0] == addr
        assert next(iter(service.crat.trusted.values())).app == "testapp"
        assert len(service.crat.trusted) == 1  # the same CA twice
        assert (tmp_path / "a.jsonl").exists()
    finally:
        service.sock.close()
        for close in service.closing:
            close()


def test_make_service_errors(keys: Keys, tmp_path: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    cases = [
        (("--trust", str(keys.ca)), exitcodes.CREDENTIAL, "private key"),
        (("--trust", str(keys.worker)), exitcodes.CREDENTIAL, "holds a private key"),
        (("--trust", str(keys.ca_pem), "--jsonl", str(tmp_path / "no" / "f")), exitcodes.USAGE,
         "cannot write alerts to"),
    ]
    for args, code, message in cases:
        with pytest.raises(SystemExit) as exit:
            crat_tap.makeService(parse("--listen", f"{loopback_address()}:0", *args))
        assert exit.value.code == code
        err = capsys.readouterr().err
        assert err.startswith("crat: ") and message in err and err.count("\n") == 1


def twistd(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([TWISTD, *map(str, args)], capture_output=True, text=True,
                          timeout=60, cwd=cwd, stdin=subprocess.DEVNULL)


def test_twistd_knows_crat(tmp_path: Path) -> None:
    listed = twistd("--help", cwd=tmp_path)
    assert any(line.split()[:1] == ["crat"] for line in listed.stdout.splitlines())
    helped = twistd("crat", "--help", cwd=tmp_path)
    assert helped.returncode == 0, helped.stderr
    for word in ("--listen", "--trust", "--jsonl", "private key", "is refused"):
        assert word in helped.stdout


@pytest.mark.parametrize("what", ["ca file", "unwritable jsonl", "busy port"])
def test_twistd_crat_refuses_with_one_line(keys: Keys, tmp_path: Path, what: str) -> None:
    addr = f"{loopback_address()}:{CRAT_PORT}"
    busy = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    busy.bind((addr.split(":")[0], CRAT_PORT))
    args, code, message = {
        "ca file": (("--trust", keys.ca), exitcodes.CREDENTIAL, "private key"),
        "unwritable jsonl": (("--trust", keys.ca_pem, "--jsonl", tmp_path / "no" / "f"),
                             exitcodes.USAGE, "cannot write alerts to"),
        "busy port": (("--trust", keys.ca_pem), exitcodes.USAGE,
                      f"cannot listen on {addr}: Address already in use"),
    }[what]
    try:
        done = twistd("-n", "--pidfile=", "crat", "--listen", addr, *args, cwd=tmp_path)
    finally:
        busy.close()
    assert done.returncode == code, done.stdout + done.stderr
    assert done.stderr.startswith("crat: ") and message in done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stdout + done.stderr


# -- a real crat, real workers and clients ------------------------------------------------

SHELL = ["sh", "-c"]


def crat_argv(listen: str, jsonl: Path, *trust: Path | str) -> list[str]:
    argv = [TWISTD, "-n", "--pidfile=", "crat", "--listen", listen, "--jsonl", str(jsonl)]
    for path in trust:
        argv += ["--trust", str(path)]
    return argv


def start_crat(listen: str, jsonl: Path, *trust: Path | str,
               popen: Callable[..., subprocess.Popen[bytes]] = subprocess.Popen) -> Proc:
    proc = Proc(crat_argv(listen, jsonl, *trust), popen=popen)
    proc.wait_for(r"crat listening on")
    return proc


def stop(proc: Proc) -> int:
    """Stop PROC (SIGTERM) and close its output pipe; its exit status."""
    status = proc.stop()
    if proc.process.stdout is not None:
        proc.process.stdout.close()
    return status


def records(path: Path) -> list[dict[str, Any]]:
    """The records of a JSONL file so far (a line still being written is left out)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().split("\n")[:-1]]


def wait_for_record(path: Path, match: Callable[[dict[str, Any]], bool],
                    timeout: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        found = [r for r in records(path) if match(r)]
        if found:
            return found[0]
        if time.monotonic() > deadline:
            raise AssertionError(f"no such record in {path}: {records(path)}")
        time.sleep(0.05)


@dataclass
class Site:
    crat: Proc
    crat_addr: str
    jsonl: Path
    worker: Proc
    worker_addr: str


@pytest.fixture
def site(keys: Keys, tmp_path: Path) -> Iterator[Site]:
    """crat and a worker sending it alerts, on loopback."""
    crat_addr = f"{loopback_address()}:{CRAT_PORT}"
    jsonl = tmp_path / "alerts.jsonl"
    crat = start_crat(crat_addr, jsonl, keys.ca_pem)
    worker_addr = f"{loopback_address()}:3010"
    try:
        worker = start_worker(keys.worker, SHELL, worker_addr, "w1", "--allow-args",
                              "--alerts", crat_addr)
    except BaseException:
        stop(crat)
        raise
    yield Site(crat, crat_addr, jsonl, worker, worker_addr)
    stop(worker)
    stop(crat)


def test_a_real_job_is_reported_to_crat(keys: Keys, site: Site) -> None:
    done = run_exec(keys.client, [site.worker_addr], "--alerts", site.crat_addr, "--",
                    "cat; exit 3", input=b"x" * 1000)
    assert done.returncode == 3, done.stderr
    assert done.stdout == b"x" * 1000

    def of(role: str, event: str) -> Callable[[dict[str, Any]], bool]:
        return lambda r: r["role"] == role and r["event"] == event

    started = wait_for_record(site.jsonl, of("worker", "job-started"))
    finished = wait_for_record(site.jsonl, of("worker", "job-finished"))
    by_client = wait_for_record(site.jsonl, of("client", "job-finished"))
    for record in (started, finished, by_client):
        assert record["verified"] and record["reason"] is None, record
        assert record["app"] == "testapp"
    job = started["fields"]["job"]
    assert started["sender"] == "worker" and started["fields"]["worker"] == "w1"
    assert started["fields"]["client"] == "client"
    assert finished["fields"]["job"] == job and finished["fields"]["status"] == 3
    assert finished["fields"]["bytes_in"] == 1000 and finished["fields"]["bytes_out"] == 1000
    assert 0 <= finished["fields"]["duration"] < 30
    assert by_client["sender"] == "client" and by_client["fields"]["job"] == job
    assert by_client["fields"]["status"] == 3 and by_client["fields"]["worker"] == "w1"
    assert by_client["fields"]["bytes_in"] == 1000 and by_client["fields"]["bytes_out"] == 1000
    site.crat.wait_for(rf"alert \[verified\] testapp worker worker: job-finished job={job} "
                       r"status=3 duration=[\d.]+ bytes_in=1000 bytes_out=1000")
    site.crat.wait_for(rf"alert \[verified\] testapp client client: job-finished job={job}")


def test_a_workers_complaint_reaches_crat(keys: Keys, site: Site) -> None:
    host, port = site.worker_addr.split(":")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(b"RXN\x01garbage", (host, int(port)))
    complaint = wait_for_record(site.jsonl, lambda r: r["event"] == "complaint")
    assert complaint["verified"] and complaint["role"] == "worker", complaint
    assert complaint["fields"]["what"].startswith("announcement refused: malformed datagram")
    site.crat.wait_for(r"alert \[verified\] testapp worker worker: complaint "
                       r"what=\"announcement refused: malformed datagram")


def test_a_clients_auth_failure_complaint_reaches_crat(keys: Keys, other_keys: Keys,
                                                       site: Site) -> None:
    """A worker of another application connects back to our client: the client refuses it
    and complains to crat."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((loopback_address(), 0))
    sock.settimeout(10)
    thread = threading.Thread(target=impostor, args=(sock, other_keys.worker, b"\0" * 64))
    thread.start()
    target = f"{sock.getsockname()[0]}:{sock.getsockname()[1]}"
    try:
        done = run_exec(keys.client, [target], "--timeout", "2", "--alerts", site.crat_addr)
    finally:
        thread.join(15)
        sock.close()
    assert done.returncode == exitcodes.AUTH_FAILED, done.stderr
    refused = wait_for_record(site.jsonl, lambda r: r["event"] == "complaint"
                              and r["fields"]["what"].startswith("connection refused"))
    assert refused["verified"] and refused["role"] == "client", refused
    failed = wait_for_record(site.jsonl, lambda r: r["event"] == "complaint"
                             and "failed authentication" in r["fields"]["what"])
    assert failed["verified"] and failed["role"] == "client", failed


def test_forged_and_foreign_alerts_are_unverified(keys: Keys, other_keys: Keys,
                                                  site: Site) -> None:
    host, port = site.crat_addr.split(":")
    other = load_credential(other_keys.worker, "worker")
    mine = load_credential(keys.worker, "worker")
    now = int(time.time() * 1000)
    foreign = alert(other, ts=now, fields={"job": "foreign"})
    forged = alert(mine, ts=now, fields={"job": "forged"}, signer=Ed25519PrivateKey.generate())
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for data in (foreign, forged, b"junk"):
            s.sendto(data, (host, int(port)))
    wait_for_record(site.jsonl, lambda r: r["fields"].get("job") == "forged"
                    and r["reason"] == "bad signature" and not r["verified"])
    wait_for_record(site.jsonl, lambda r: r["fields"].get("job") == "foreign"
                    and not r["verified"] and r["app"] == "otherapp")
    site.crat.wait_for(r"alert \[UNVERIFIED: \"bad signature\"\] testapp worker worker: "
                       r"job-finished job=forged")
    site.crat.wait_for(r"garbage from 127\.[\d.]+:\d+: ")


def test_jobs_do_not_need_crat(keys: Keys) -> None:
    nobody = f"{loopback_address()}:{CRAT_PORT}"  # nothing listens there
    addr = f"{loopback_address()}:3010"
    worker = start_worker(keys.worker, SHELL, addr, "lonely", "--allow-args",
                          "--alerts", nobody)
    try:
        for _ in range(3):  # the ICMP errors of one job must not upset the next
            t0 = time.monotonic()
            done = run_exec(keys.client, [addr], "--alerts", nobody, "--", "echo ok")
            assert done.returncode == 0 and done.stdout == b"ok\n", done.stderr
            assert time.monotonic() - t0 < 5
        assert "Traceback" not in worker.output
    finally:
        stop(worker)


def test_crat_stops_cleanly_and_keeps_its_file(keys: Keys, tmp_path: Path) -> None:
    addr = f"{loopback_address()}:{CRAT_PORT}"
    jsonl = tmp_path / "a.jsonl"
    proc = start_crat(addr, jsonl, keys.ca_pem)
    mine = load_credential(keys.worker, "worker")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(alert(mine, ts=int(time.time() * 1000)), (addr.split(":")[0], CRAT_PORT))
    wait_for_record(jsonl, lambda r: r["verified"])
    assert stop(proc) in (0, -signal.SIGTERM)  # twistd re-raises it
    assert "Traceback" not in proc.output
    proc = start_crat(addr, jsonl, keys.ca_pem)  # appends to the same file
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(alert(mine, ts=int(time.time() * 1000) + 1), (addr.split(":")[0], CRAT_PORT))
    deadline = time.monotonic() + 10
    while len(records(jsonl)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(records(jsonl)) == 2
    stop(proc)


# -- across hosts (network namespaces) -------------------------------------------------


def test_crat_on_a_third_host_hears_the_default_targets(bed: NetBed, keys: Keys,
                                                        tmp_path: Path) -> None:
    """Workers on 0.0.0.0 broadcast alerts to 255.255.255.255:3011; clients send them to
    their announce targets on port 3011: a crat anywhere on the LAN hears both.  Without a
    crat, jobs run just the same."""
    lan = bed.add_subnet("lan")
    client, w1, crat_host = (bed.add_host(name, [lan]) for name in ("client", "w1", "crat"))
    start_worker(keys.worker, SHELL, "0.0.0.0:3010", "w1", "--allow-args", popen=w1.popen)

    def job(script: str) -> subprocess.CompletedProcess[bytes]:
        return run_exec(keys.client, ["255.255.255.255:3010"], "--", script, wrap=client.argv)

    alone = job("echo alone")
    assert alone.returncode == 0 and alone.stdout == b"alone\n", alone.stderr
    jsonl = tmp_path / "alerts.jsonl"
    crat = start_crat(f"0.0.0.0:{CRAT_PORT}", jsonl, keys.ca_pem,
                      popen=crat_host.popen)
    done = job("echo heard; exit 5")
    assert done.returncode == 5 and done.stdout == b"heard\n", done.stderr
    started = wait_for_record(jsonl, lambda r: r["event"] == "job-started")
    job_id = started["fields"]["job"]

    def finished(role: str) -> Callable[[dict[str, Any]], bool]:
        return lambda r: (r["event"] == "job-finished" and r["role"] == role
                          and r["fields"]["job"] == job_id)

    by_worker = wait_for_record(jsonl, finished("worker"))
    by_client = wait_for_record(jsonl, finished("client"))
    assert started["verified"] and by_worker["verified"] and by_client["verified"]
    assert started["source"].startswith(f"{w1.addr()}:")
    assert by_client["source"].startswith(f"{client.addr()}:")
    assert by_worker["fields"]["status"] == 5 and by_client["fields"]["status"] == 5
    assert not any(r["fields"].get("job") not in (None, job_id) for r in records(jsonl)), (
        "the job that ran before crat started cannot have been heard")
    crat.wait_for(rf"alert \[verified\] testapp worker worker: job-started job={job_id} "
                  r".*worker=w1")
    # stopping crat changes nothing for the jobs
    assert stop(crat) in (0, -signal.SIGTERM)
    after = job("echo after")
    assert after.returncode == 0 and after.stdout == b"after\n", after.stderr
