"""Announcements (rexnet.net.announce): targets, rate limits, replays and the worker's checks.

AnnounceChecker runs on a fake clock with real credentials: a datagram is acted on
only when fresh, signed by a client of the same application, not a replay, and sent
from an address the client signed.  Anything else is Rejected (or None when it belongs
to another application) -- and nothing else may escape.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from conftest import Keys
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from rexnet.net.announce import (
    DEFAULT_PORT,
    FRESH_MS,
    AnnounceChecker,
    ClientCert,
    RateLimiter,
    Rejected,
    ReplayCache,
    parse_target,
    source_key,
)
from rexnet.protocol import wire
from rexnet.security.credentials import Credential, load_credential

T0 = 1_700_000_000_000
JOB = bytes(range(16))
SOURCE = "192.0.2.7"


class FakeNow:
    """A settable clock in milliseconds, for AnnounceChecker."""

    def __init__(self, ms: int = T0) -> None:
        self.ms = ms

    def __call__(self) -> int:
        return self.ms


@dataclass(frozen=True)
class Creds:
    worker: Credential
    client: Credential
    other_client: Credential
    other_worker: Credential


@pytest.fixture(scope="module")
def creds(keys: Keys, other_keys: Keys) -> Creds:
    return Creds(
        worker=load_credential(keys.worker, "worker"),
        client=load_credential(keys.client, "client"),
        other_client=load_credential(other_keys.client, "client"),
        other_worker=load_credential(other_keys.worker, "worker"),
    )


@pytest.fixture
def clock() -> FakeNow:
    return FakeNow()


@pytest.fixture
def checker(creds: Creds, clock: FakeNow) -> AnnounceChecker:
    return AnnounceChecker(creds.worker, now=clock)


def announcement(
    cred: Credential,
    *,
    ts: int = T0,
    seq: int = 0,
    port: int = 4000,
    addrs: tuple[str, ...] = (SOURCE,),
    signer: wire.Signer | None = None,
    cert: bytes | None = None,
    app_id: bytes | None = None,
) -> bytes:
    """An ANNOUNCE as CRED's holder sends it; keyword arguments make it wrong."""
    return wire.encode_datagram(
        wire.Announce(JOB, seq, ts, port, addrs),
        cred.app_id if app_id is None else app_id,
        cred.key if signer is None else signer,
        cred.cert_der if cert is None else cert,
    )


def taken(cred: Credential, *, ts: int = T0, signer: wire.Signer | None = None) -> bytes:
    """A TAKEN as the client sends it (no certificate)."""
    return wire.encode_datagram(wire.Taken(JOB, ts), cred.app_id,
                                cred.key if signer is None else signer)


def check(checker: AnnounceChecker, data: bytes, source: str = SOURCE) -> wire.Announce:
    dgram = checker.decode(data)
    assert dgram is not None
    ann, _ = checker.check_announce(dgram, source)
    return ann


# -- parse_target ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("example.org", ("example.org", DEFAULT_PORT)),
        ("example.org:80", ("example.org", 80)),
        ("192.0.2.1:65535", ("192.0.2.1", 65535)),
        ("255.255.255.255", ("255.255.255.255", DEFAULT_PORT)),
        ("[2001:db8::1]:3011", ("2001:db8::1", 3011)),
        ("[ff02::1]", ("ff02::1", DEFAULT_PORT)),
        ("2001:db8::1", ("2001:db8::1", DEFAULT_PORT)),
    ],
)
def test_parse_target(text: str, expected: tuple[str, int]) -> None:
    assert parse_target(text) == expected


def test_parse_target_default_port() -> None:
    assert parse_target("host", 9) == ("host", 9)
    assert parse_target("[::1]", 9) == ("::1", 9)
    assert parse_target("host:10", 9) == ("host", 10)


@pytest.mark.parametrize(
    "text",
    ["", ":80", "host:", "host:0", "host:65536", "host:x", "host:-1", "host:+80", "host: 80",
     "[::1]:", "[::1]:0", "[::1]:65536", "[::1]:x", "[::1]80", "[::1]junk", "[::1", "[]",
     "[]:80"],
)
def test_parse_target_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="bad"):
        parse_target(text)


# -- RateLimiter ----------------------------------------------------------------------


def allowed(limiter: RateLimiter, source: str, now: float, times: int) -> int:
    return sum(limiter.allow(source, now) for _ in range(times))


def test_rate_limiter_allows_a_burst_then_refuses() -> None:
    limiter = RateLimiter(rate=2.0, burst=3.0)
    assert allowed(limiter, "a", 0.0, 10) == 3


def test_rate_limiter_refills_at_its_rate() -> None:
    limiter = RateLimiter(rate=2.0, burst=3.0)
    allowed(limiter, "a", 0.0, 3)
    assert not limiter.allow("a", 0.25)  # half a token
    assert allowed(limiter, "a", 0.5, 5) == 1
    assert allowed(limiter, "a", 1.5, 5) == 2


def test_rate_limiter_refill_is_capped_at_the_burst() -> None:
    limiter = RateLimiter(rate=2.0, burst=3.0)
    allowed(limiter, "a", 0.0, 3)
    assert allowed(limiter, "a", 1000.0, 10) == 3


def test_rate_limiter_counts_each_source_apart() -> None:
    limiter = RateLimiter(rate=1.0, burst=2.0)
    assert allowed(limiter, "a", 0.0, 5) == 2
    assert allowed(limiter, "b", 0.0, 5) == 2


def test_rate_limiter_counts_an_ipv6_slash_64_as_one_source() -> None:
    """One host holds a whole /64: 10,000 of its addresses share one bucket, and an
    IPv4-mapped address shares its IPv4 address's."""
    limiter = RateLimiter(rate=1.0, burst=5.0)
    assert sum(limiter.allow(f"2001:db8:1:2::{i:x}", 0.0) for i in range(10_000)) == 5
    assert allowed(limiter, "2001:db8:1:3::1", 0.0, 10) == 5  # the next /64 is another
    assert allowed(limiter, "192.0.2.7", 0.0, 3) == 3
    assert allowed(limiter, "::ffff:192.0.2.7", 0.0, 10) == 2
    assert source_key("fe80::1%eth0") == "fe80::/64" and source_key("bogus:") == "bogus:"


def test_rate_limiter_survives_the_clock_stepping_back() -> None:
    limiter = RateLimiter(rate=1.0, burst=2.0)
    assert limiter.allow("a", 1000.0)
    assert limiter.allow("a", 0.0)  # a backward step does not drain the bucket...
    assert not limiter.allow("a", 0.0)
    assert limiter.allow("a", 1.0)  # ...nor stop the refill


def test_rate_limiter_forgets_the_least_recently_seen_source() -> None:
    limiter = RateLimiter(rate=1.0, burst=1.0, sources=2)
    assert limiter.allow("a", 0.0)
    assert limiter.allow("b", 0.0)
    assert limiter.allow("c", 0.0)  # "a" is forgotten
    assert not limiter.allow("b", 0.0)  # "b" is remembered
    assert limiter.allow("a", 0.0)  # a fresh bucket


@given(
    st.integers(1, 8),
    st.lists(st.tuples(st.sampled_from("abcdefg"), st.floats(0, 2)), max_size=60),
)
def test_rate_limiter_bounds_sources_and_rate(
    sources: int, events: list[tuple[str, float]]
) -> None:
    rate, burst = 2.0, 3.0
    limiter = RateLimiter(rate=rate, burst=burst, sources=sources)
    now = 0.0
    passed: dict[str, int] = {}
    for source, step in events:
        now += step
        if limiter.allow(source, now):
            passed[source] = passed.get(source, 0) + 1
        assert len(limiter._buckets) <= sources
    if sources >= 7:  # nothing forgotten: every source stays within its budget
        for count in passed.values():
            assert count <= burst + rate * now + 1e-9


@given(st.lists(st.floats(0, 1), max_size=80))
def test_rate_limiter_one_source_stays_within_burst_plus_rate(steps: list[float]) -> None:
    rate, burst = 5.0, 4.0
    limiter = RateLimiter(rate=rate, burst=burst)
    now, passed = 0.0, 0
    for step in steps:
        now += step
        passed += limiter.allow("a", now)
        assert passed <= burst + rate * now + 1e-9


# -- ReplayCache ----------------------------------------------------------------------


def test_replay_cache_refuses_a_key_seen_before() -> None:
    cache = ReplayCache()
    assert cache.add((JOB, 0), expires_ms=100, now=0)
    assert not cache.add((JOB, 0), expires_ms=100, now=50)
    assert not cache.add((JOB, 0), expires_ms=100, now=100)  # still within its window
    assert cache.add((JOB, 1), expires_ms=100, now=50)


def test_replay_cache_forgets_expired_keys() -> None:
    cache = ReplayCache()
    assert cache.add((JOB, 0), expires_ms=100, now=0)
    assert cache.add((JOB, 0), expires_ms=200, now=101)


def test_replay_cache_is_bounded() -> None:
    cache = ReplayCache(entries=3)
    for seq in range(4):
        assert cache.add((JOB, seq), expires_ms=10**9, now=0)
    assert cache.add((JOB, 0), expires_ms=10**9, now=0)  # the oldest was dropped
    assert not cache.add((JOB, 3), expires_ms=10**9, now=0)


def test_replay_cache_full_still_refuses_its_oldest_key() -> None:
    cache = ReplayCache(entries=3)
    for seq in range(3):
        assert cache.add((JOB, seq), expires_ms=10**9, now=0)
    for seq in (0, 0, 1, 2):  # a replay neither passes nor evicts anything
        assert not cache.add((JOB, seq), expires_ms=10**9, now=0)


@given(st.integers(1, 5), st.lists(st.integers(0, 8), max_size=60))
def test_replay_cache_remembers_the_last_entries_keys(entries: int, seqs: list[int]) -> None:
    cache = ReplayCache(entries=entries)
    window: list[int] = []  # model: the last ENTRIES distinct keys accepted
    for seq in seqs:
        fresh = seq not in window
        assert cache.add((JOB, seq), expires_ms=10**9, now=0) == fresh
        if fresh:
            window = [*window, seq][-entries:]


# -- AnnounceChecker: the good case ---------------------------------------------------


def test_good_announcement_passes(checker: AnnounceChecker, creds: Creds) -> None:
    data = announcement(creds.client, seq=2, port=4567, addrs=("198.51.100.1", SOURCE))
    dgram = checker.decode(data)
    assert dgram is not None

    ann, client = checker.check_announce(dgram, SOURCE)

    assert ann == wire.Announce(JOB, 2, T0, 4567, ("198.51.100.1", SOURCE))
    assert (client.info.app, client.info.role, client.info.name) == ("testapp", "client",
                                                                       "client")


def test_resend_with_next_seq_passes(checker: AnnounceChecker, creds: Creds) -> None:
    assert check(checker, announcement(creds.client, seq=0)).seq == 0
    assert check(checker, announcement(creds.client, seq=1)).seq == 1


@pytest.mark.parametrize("offset", [-FRESH_MS, FRESH_MS])
def test_announcement_at_the_edge_of_freshness_passes(
    checker: AnnounceChecker, creds: Creds, offset: int
) -> None:
    assert check(checker, announcement(creds.client, ts=T0 + offset)).ts_ms == T0 + offset


# -- AnnounceChecker: refusals --------------------------------------------------------


@pytest.mark.parametrize("offset", [-FRESH_MS - 1, FRESH_MS + 1, -T0])
def test_stale_announcement_refused(checker: AnnounceChecker, creds: Creds,
                                    offset: int) -> None:
    with pytest.raises(Rejected, match="stale"):
        check(checker, announcement(creds.client, ts=T0 + offset))


def test_clock_moves_announcement_out_of_freshness(checker: AnnounceChecker, creds: Creds,
                                                   clock: FakeNow) -> None:
    data = announcement(creds.client)
    clock.ms = T0 + FRESH_MS + 1
    with pytest.raises(Rejected, match="stale"):
        check(checker, data)


def test_replayed_announcement_refused(checker: AnnounceChecker, creds: Creds,
                                       clock: FakeNow) -> None:
    data = announcement(creds.client)
    check(checker, data)
    clock.ms += 1000
    with pytest.raises(Rejected, match="replayed"):
        check(checker, data)


def test_announcement_with_a_flipped_signature_byte_refused(
    checker: AnnounceChecker, creds: Creds
) -> None:
    data = bytearray(announcement(creds.client))
    data[-1] ^= 0x01
    with pytest.raises(Rejected, match="bad signature"):
        check(checker, bytes(data))


def test_announcement_with_a_changed_body_refused(checker: AnnounceChecker,
                                                  creds: Creds) -> None:
    signed = announcement(creds.client, port=4000)
    changed = announcement(creds.client, port=5000)
    forged = changed[:-wire.SIG_LEN] + signed[-wire.SIG_LEN:]
    with pytest.raises(Rejected, match="bad signature"):
        check(checker, forged)


def test_announcement_signed_with_another_key_refused(checker: AnnounceChecker,
                                                      creds: Creds) -> None:
    data = announcement(creds.client, signer=creds.other_client.key)
    with pytest.raises(Rejected, match="bad signature"):
        check(checker, data)


def test_client_of_another_application_refused(checker: AnnounceChecker,
                                               creds: Creds) -> None:
    data = announcement(creds.other_client, app_id=creds.client.app_id)
    with pytest.raises(Rejected, match="not issued by the application CA"):
        check(checker, data)


def test_worker_credential_used_as_client_refused(checker: AnnounceChecker,
                                                  creds: Creds) -> None:
    data = announcement(creds.worker)
    with pytest.raises(Rejected, match="role 'worker'"):
        check(checker, data)


@pytest.mark.parametrize("cert", [b"", b"\x30\x03\x02\x01\x05", b"garbage" * 20])
def test_unreadable_certificate_refused(checker: AnnounceChecker, creds: Creds,
                                        cert: bytes) -> None:
    with pytest.raises(Rejected, match="unreadable certificate"):
        check(checker, announcement(creds.client, cert=cert))


def crafted_certificates(der: bytes, subject: bytes) -> dict[str, bytes]:
    """Client certificate DER with parse traps that only show when fields are read."""
    version = der.index(bytes.fromhex("a003020102")) + 4  # [0] { INTEGER 2 }
    value = der.index(bytes.fromhex("060355040a"), der.index(subject)) + 5  # O=... tag
    return {
        "version 93": der[:version] + b"\x5d" + der[version + 1 :],
        "subject value of a private tag": der[:value] + b"\xc9" + der[value + 1 :],
        "subject value a BIT STRING": der[:value] + b"\x03" + der[value + 1 :],
    }


@pytest.mark.filterwarnings("ignore")
def test_crafted_certificate_refused(checker: AnnounceChecker, creds: Creds) -> None:
    """Malformed parts of an unauthenticated certificate must not escape as other errors."""
    der = creds.client.cert_der
    for name, bad in crafted_certificates(der, creds.client.cert.subject.public_bytes()).items():
        assert bad != der and len(bad) == len(der), name
        with pytest.raises(Rejected):
            checker.client_cert(bad)
        with pytest.raises(Rejected):
            check(checker, announcement(creds.client, cert=bad))


def test_announcement_from_an_unsigned_address_refused(checker: AnnounceChecker,
                                                       creds: Creds) -> None:
    data = announcement(creds.client, addrs=("192.0.2.8", "2001:db8::7"))
    with pytest.raises(Rejected, match="did not sign"):
        check(checker, data)


def test_announcement_of_no_address_refused(checker: AnnounceChecker, creds: Creds) -> None:
    with pytest.raises(Rejected, match="did not sign"):
        check(checker, announcement(creds.client, addrs=()))


def test_other_applications_datagram_is_ignored(checker: AnnounceChecker,
                                                creds: Creds) -> None:
    assert checker.decode(announcement(creds.other_client)) is None
    assert checker.decode(taken(creds.other_client)) is None


def test_refused_announcement_is_not_remembered_as_seen(checker: AnnounceChecker,
                                                        creds: Creds) -> None:
    with pytest.raises(Rejected, match="did not sign"):
        check(checker, announcement(creds.client), source="192.0.2.99")
    assert check(checker, announcement(creds.client)).job_id == JOB


@pytest.mark.parametrize(
    "data",
    [b"", b"x", b"GET / HTTP/1.0\r\n\r\n", bytes(200), b"RXN", b"RXN\x01\x01"],
)
def test_garbage_refused(checker: AnnounceChecker, data: bytes) -> None:
    with pytest.raises(Rejected, match="malformed"):
        checker.decode(data)


@pytest.mark.parametrize("cut", [-1, 1])
def test_truncated_or_padded_datagram_refused(checker: AnnounceChecker, creds: Creds,
                                              cut: int) -> None:
    good = announcement(creds.client)
    data = good[:cut] if cut < 0 else good + bytes(cut)
    with pytest.raises(Rejected, match="malformed"):
        checker.decode(data)


def test_taken_is_not_an_announcement(checker: AnnounceChecker, creds: Creds) -> None:
    dgram = checker.decode(taken(creds.client))
    assert dgram is not None
    with pytest.raises(Rejected, match="not an announcement"):
        checker.check_announce(dgram, SOURCE)


# -- check_taken ----------------------------------------------------------------------


def announced(checker: AnnounceChecker, cred: Credential) -> ClientCert:
    dgram = checker.decode(announcement(cred))
    assert dgram is not None
    return checker.check_announce(dgram, SOURCE)[1]


def test_taken_from_the_announcing_client_passes(checker: AnnounceChecker,
                                                 creds: Creds, clock: FakeNow) -> None:
    client = announced(checker, creds.client)
    clock.ms += 500
    dgram = checker.decode(taken(creds.client, ts=clock.ms))
    assert dgram is not None

    assert checker.check_taken(dgram, client) == wire.Taken(JOB, T0 + 500)


@pytest.mark.parametrize("signer", ["worker", "other_client"])
def test_taken_signed_by_another_key_refused(checker: AnnounceChecker, creds: Creds,
                                             signer: str) -> None:
    client = announced(checker, creds.client)
    dgram = checker.decode(taken(creds.client, signer=getattr(creds, signer).key))
    assert dgram is not None
    with pytest.raises(Rejected, match="bad signature on TAKEN"):
        checker.check_taken(dgram, client)


def test_stale_taken_refused(checker: AnnounceChecker, creds: Creds) -> None:
    client = announced(checker, creds.client)
    dgram = checker.decode(taken(creds.client, ts=T0 - FRESH_MS - 1))
    assert dgram is not None
    with pytest.raises(Rejected, match="stale"):
        checker.check_taken(dgram, client)


def test_announcement_is_not_a_taken(checker: AnnounceChecker, creds: Creds) -> None:
    client = announced(checker, creds.client)
    dgram = checker.decode(announcement(creds.client, seq=1))
    assert dgram is not None
    with pytest.raises(Rejected, match="not a TAKEN"):
        checker.check_taken(dgram, client)


# -- fuzzing --------------------------------------------------------------------------


def decode_and_check(checker: AnnounceChecker, data: bytes) -> str:
    """What the worker's datagram path makes of DATA: only Rejected may escape."""
    try:
        dgram = checker.decode(data)
        if dgram is None:
            return "ignored"
        if isinstance(dgram.message, wire.Announce):
            checker.check_announce(dgram, SOURCE)
            return "accepted"
        return "taken"
    except Rejected:
        return "rejected"


FUZZ = settings(max_examples=200, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(st.binary(max_size=3000))
def test_fuzz_arbitrary_bytes(checker: AnnounceChecker, data: bytes) -> None:
    assert decode_and_check(checker, data) != "accepted"


@FUZZ
@given(st.binary(max_size=3000))
def test_fuzz_arbitrary_bytes_with_our_header(checker: AnnounceChecker, creds: Creds,
                                              tail: bytes) -> None:
    data = b"RXN\x01" + bytes([1 + len(tail) % 2]) + creds.worker.app_id + tail
    assert decode_and_check(checker, data) == "rejected"


@FUZZ
@given(st.data())
@pytest.mark.filterwarnings("ignore")
def test_fuzz_single_byte_changes_are_refused(creds: Creds, data: st.DataObject) -> None:
    good = announcement(creds.client)
    pos = data.draw(st.integers(0, len(good) - 1))
    bad = bytearray(good)
    bad[pos] ^= data.draw(st.integers(1, 255))
    outcome = decode_and_check(AnnounceChecker(creds.worker, now=FakeNow()), bytes(bad))
    # A changed application id makes it someone else's datagram; anything else is refused.
    assert outcome == ("ignored" if 5 <= pos < 21 else "rejected")


@FUZZ
@given(st.data())
@pytest.mark.filterwarnings("ignore")
def test_fuzz_mutated_datagrams(creds: Creds, data: st.DataObject) -> None:
    original = announcement(creds.client)
    good = bytearray(original)
    for _ in range(data.draw(st.integers(1, 6))):
        if not good:
            break
        pos = data.draw(st.integers(0, len(good) - 1))
        op = data.draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        if op == "flip":
            good[pos] ^= data.draw(st.integers(1, 255))
        elif op == "insert":
            good[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del good[pos]
        else:
            del good[max(pos, 1):]
    assume(good != original)  # mutations may cancel out
    outcome = decode_and_check(AnnounceChecker(creds.worker, now=FakeNow()), bytes(good))
    assert outcome in ("ignored", "rejected")
