"""The wire formats (rexnet.protocol.wire): byte layout, round trips, bounds and fuzzing.

Decoders must be bounded and total: whatever the bytes, decode_datagram and
FrameDecoder.feed either return well-formed messages or raise WireError.
"""

from __future__ import annotations

import hashlib
import json
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rexnet.protocol import wire

APP_ID = bytes(range(0xA0, 0xB0))
JOB_ID = bytes(range(16))


class HashSigner:
    """A deterministic stand-in for an Ed25519 key: 64 bytes that depend on the data."""

    def __init__(self) -> None:
        self.signed: list[bytes] = []

    def sign(self, data: bytes) -> bytes:
        self.signed.append(data)
        return hashlib.sha512(data).digest()


class ShortSigner:
    def sign(self, data: bytes) -> bytes:
        return bytes(63)


def raw_datagram(
    body: bytes,
    *,
    kind: int = wire.Kind.ANNOUNCE,
    cert: bytes = b"",
    version: int = wire.VERSION,
    body_len: int | None = None,
    cert_len: int | None = None,
) -> bytes:
    """A datagram built by hand, so that any field can be wrong."""
    head = struct.pack("!3sBB16sH", wire.MAGIC, version, kind, APP_ID,
                       len(body) if body_len is None else body_len)
    tail = struct.pack("!H", len(cert) if cert_len is None else cert_len) + cert
    return head + body + tail + bytes(wire.SIG_LEN)


def raw_frame(kind: int, payload: bytes, stream: int = 0) -> bytes:
    return struct.pack("!BBI", kind, stream, len(payload)) + payload


def json_bytes(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def good_announce_body(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"job": JOB_ID.hex(), "seq": 1, "ts": 1_700_000_000_000,
                            "port": 4000, "addrs": ["192.0.2.1"]}
    body.update(changes)
    return body


# -- strategies -----------------------------------------------------------------------

job_ids = st.binary(min_size=16, max_size=16)
app_ids = st.binary(min_size=16, max_size=16)
certs = st.binary(max_size=wire.MAX_CERT)
streams = st.integers(0, wire.MAX_STREAM)
numbers = st.floats(min_value=-1e12, max_value=1e12, exclude_min=True, exclude_max=True,
                    allow_nan=False)

announces = st.builds(
    wire.Announce,
    job_id=job_ids,
    seq=st.integers(0, 0xFFFF),
    ts_ms=st.integers(0, 2**63 - 1),
    port=st.integers(1, 0xFFFF),
    addrs=st.lists(st.ip_addresses().map(str), max_size=wire.MAX_ADDRS).map(tuple),
)
takens = st.builds(wire.Taken, job_id=job_ids, ts_ms=st.integers(0, 2**63 - 1),
                   answered=st.integers(0, 0xFFFFFF), early=st.booleans())
messages: st.SearchStrategy[wire.DatagramMessage] = st.one_of(announces, takens)

frames: st.SearchStrategy[wire.Frame] = st.one_of(
    st.builds(wire.Data, streams, st.binary(max_size=3000)),
    st.builds(wire.Eof, streams),
    st.builds(wire.Window, streams, st.integers(0, 2**32 - 1)),
    st.builds(wire.Hello, st.text(max_size=256), st.text(max_size=64), numbers, numbers,
              st.integers(0, 1 << 20), st.integers(0, 1 << 20)),
    st.builds(wire.Start, st.lists(st.text(max_size=40), max_size=20).map(tuple)),
    st.builds(
        wire.Start,
        st.lists(st.text(max_size=40), max_size=5).map(tuple),
        st.lists(st.tuples(st.text("ABCXYZ_", min_size=1, max_size=8),
                           st.text(max_size=20).filter(lambda v: "\0" not in v)),
                 max_size=5).map(tuple),
        st.booleans(), st.text(max_size=20), st.integers(0, 0xFFFF), st.integers(0, 0xFFFF),
        st.lists(st.tuples(st.integers(3, 255), st.sampled_from(wire.FD_MODES)),
                 max_size=4).map(tuple)),
    st.builds(wire.Started, st.text(max_size=64)),
    st.builds(wire.Started, st.text(max_size=64),
              st.lists(st.text(max_size=30), max_size=5).map(tuple)),
    st.builds(wire.Shut, streams),
    st.builds(wire.Signal, st.integers(1, 64)),
    st.builds(wire.Winsize, st.integers(0, 0xFFFF), st.integers(0, 0xFFFF)),
    st.just(wire.Ping()),
    st.builds(wire.Exit, st.none(), st.integers(1, 127), st.sampled_from(wire.LIMITS)),
    st.just(wire.Busy()),
    st.builds(wire.Exit, st.integers(0, 255), st.none()),
    st.builds(wire.Exit, st.none(), st.integers(1, 127)),
    st.builds(wire.Error, st.text(max_size=64), st.text(max_size=1024)),
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)


def json_objects(keys: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    """JSON objects whose keys are often the ones a decoder looks for."""
    return st.dictionaries(st.sampled_from(keys) | st.text(max_size=8), json_values,
                           max_size=len(keys) + 1)


@st.composite
def mutated(draw: st.DrawFn, data: bytes) -> bytes:
    """DATA with a few bytes flipped, inserted or deleted, or cut short."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        pos = draw(st.integers(0, max(len(out) - 1, 0)))
        if op == "flip" and out:
            out[pos] ^= draw(st.integers(1, 255))
        elif op == "insert":
            out.insert(pos, draw(st.integers(0, 255)))
        elif op == "delete" and out:
            del out[pos]
        elif op == "truncate":
            del out[pos:]
    return bytes(out)


def feed_in_pieces(data: bytes, cuts: list[int]) -> tuple[list[wire.Frame], wire.FrameDecoder]:
    decoder = wire.FrameDecoder()
    got: list[wire.Frame] = []
    start = 0
    for cut in [*sorted(cuts), len(data)]:
        got += decoder.feed(data[start:cut])
        start = cut
    return got, decoder


# -- datagram layout ------------------------------------------------------------------


def test_announce_datagram_layout() -> None:
    ann = wire.Announce(JOB_ID, 3, 1_700_000_000_123, 4242, ("192.0.2.1", "2001:db8::1"))
    cert = b"\x30\x03\x02\x01\x05"
    signer = HashSigner()

    data = wire.encode_datagram(ann, APP_ID, signer, cert)

    body = (b'{"addrs":["192.0.2.1","2001:db8::1"],"job":"000102030405060708090a0b0c0d0e0f",'
            b'"port":4242,"seq":3,"ts":1700000000123}')
    assert data[0:3] == b"RXN"
    assert data[3] == 1  # version
    assert data[4] == 1  # kind: ANNOUNCE
    assert data[5:21] == APP_ID
    assert data[21:23] == len(body).to_bytes(2, "big")
    assert data[23 : 23 + len(body)] == body
    cert_at = 23 + len(body)
    assert data[cert_at : cert_at + 2] == b"\x00\x05"
    assert data[cert_at + 2 : cert_at + 7] == cert
    assert len(data) == cert_at + 7 + 64
    assert signer.signed == [data[:-64]]
    assert data[-64:] == hashlib.sha512(data[:-64]).digest()


def test_taken_datagram_layout() -> None:
    data = wire.encode_datagram(wire.Taken(JOB_ID, 5), APP_ID, HashSigner())

    body = b'{"job":"000102030405060708090a0b0c0d0e0f","ts":5}'
    assert data[:5] == b"RXN\x01\x02"
    assert data[21:23] == len(body).to_bytes(2, "big")
    assert data[23 : 23 + len(body)] == body
    assert data[23 + len(body) : 25 + len(body)] == b"\x00\x00"  # no certificate
    assert len(data) == 25 + len(body) + 64


def test_early_taken_body() -> None:
    data = wire.encode_datagram(wire.Taken(JOB_ID, 5, 1, early=True), APP_ID, HashSigner())
    assert b'"early":1' in data
    assert wire.decode_datagram(data).message == wire.Taken(JOB_ID, 5, 1, True)
    final = wire.encode_datagram(wire.Taken(JOB_ID, 5, 3), APP_ID, HashSigner())
    assert b"early" not in final  # as before: older workers read it unchanged


def test_decode_splits_signed_part_and_signature() -> None:
    ann = wire.Announce(JOB_ID, 0, 1, 80, ("10.0.0.1",))
    data = wire.encode_datagram(ann, APP_ID, HashSigner(), b"cert")

    dgram = wire.decode_datagram(data)

    assert dgram.message == ann
    assert dgram.app_id == APP_ID
    assert dgram.cert_der == b"cert"
    assert dgram.signed_part == data[:-64]
    assert dgram.signature == data[-64:]
    assert wire.peek_app_id(data) == APP_ID


@pytest.mark.parametrize("data", [b"", b"RXN", b"XYZ" + bytes(40), bytes(100)])
def test_peek_app_id_of_foreign_bytes_is_none(data: bytes) -> None:
    assert wire.peek_app_id(data) is None


def test_encode_datagram_enforces_bounds() -> None:
    ann = wire.Announce(JOB_ID, 0, 1, 80, ())
    with pytest.raises(wire.WireError):
        wire.encode_datagram(ann, APP_ID[:15], HashSigner())
    with pytest.raises(wire.WireError):
        wire.encode_datagram(ann, APP_ID, HashSigner(), bytes(wire.MAX_CERT + 1))
    with pytest.raises(wire.WireError):
        wire.encode_datagram(ann, APP_ID, ShortSigner())
    too_many = wire.Announce(JOB_ID, 0, 1, 80, ("2001:db8::1234:5678:9abc",) * 40)
    with pytest.raises(wire.WireError):
        wire.encode_datagram(too_many, APP_ID, HashSigner())


@given(messages, app_ids, certs)
def test_datagram_round_trip(message: wire.DatagramMessage, app_id: bytes, cert: bytes) -> None:
    data = wire.encode_datagram(message, app_id, HashSigner(), cert)
    assert len(data) <= wire.MAX_DATAGRAM

    dgram = wire.decode_datagram(data)

    assert dgram.message == message
    assert dgram.app_id == app_id == wire.peek_app_id(data)
    assert dgram.cert_der == cert
    assert dgram.signed_part + dgram.signature == data
    assert dgram.signature == hashlib.sha512(dgram.signed_part).digest()


# -- datagram bounds and malformed datagrams ------------------------------------------


def test_oversized_datagram_is_refused() -> None:
    data = wire.encode_datagram(wire.Taken(JOB_ID, 1), APP_ID, HashSigner())
    with pytest.raises(wire.WireError, match="exceeds"):
        wire.decode_datagram(data + bytes(wire.MAX_DATAGRAM + 1 - len(data)))


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(raw_datagram(b"{}", body_len=wire.MAX_BODY + 1), id="body-len-over-max"),
        pytest.param(raw_datagram(json_bytes(good_announce_body()),
                                  cert_len=wire.MAX_CERT + 1), id="cert-len-over-max"),
        pytest.param(raw_datagram(json_bytes(good_announce_body()), cert_len=1),
                     id="cert-len-too-big-for-datagram"),
        pytest.param(raw_datagram(json_bytes(good_announce_body()), version=2), id="version"),
        pytest.param(raw_datagram(json_bytes(good_announce_body()), kind=3), id="kind"),
        pytest.param(b"XYZ" + raw_datagram(json_bytes(good_announce_body()))[3:], id="magic"),
        pytest.param(raw_datagram(json_bytes(good_announce_body()))[:-1], id="truncated"),
        pytest.param(raw_datagram(json_bytes(good_announce_body())) + b"\0", id="trailing"),
        pytest.param(raw_datagram(b"{}", body_len=500), id="body-len-past-end"),
        pytest.param(b"RXN\x01\x01" + APP_ID, id="header-only"),
    ],
)
def test_malformed_datagram_framing(data: bytes) -> None:
    with pytest.raises(wire.WireError):
        wire.decode_datagram(data)


def test_hand_built_datagram_decodes() -> None:
    """raw_datagram builds real datagrams: the refusals above are about the bad field."""
    dgram = wire.decode_datagram(raw_datagram(json_bytes(good_announce_body()), cert=b"c"))
    assert dgram.message == wire.Announce(JOB_ID, 1, 1_700_000_000_000, 4000, ("192.0.2.1",))
    assert dgram.cert_der == b"c"


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"\xff\xfe{}",
        b"[]",
        b"null",
        b'"job"',
        b"{" * 600,
        b'{"seq": ' + b"9" * 1000 + b"}",
        json_bytes({}),
        json_bytes(good_announce_body(seq=True)),
        json_bytes(good_announce_body(seq=1.0)),
        json_bytes(good_announce_body(seq="1")),
        json_bytes(good_announce_body(seq=-1)),
        json_bytes(good_announce_body(seq=0x10000)),
        json_bytes(good_announce_body(ts=-1)),
        json_bytes(good_announce_body(ts=2**63)),
        json_bytes(good_announce_body(port=0)),
        json_bytes(good_announce_body(port=0x10000)),
        json_bytes(good_announce_body(port=False)),
        json_bytes(good_announce_body(port=None)),
        json_bytes(good_announce_body(job="zz" * 16)),
        json_bytes(good_announce_body(job="00" * 15)),
        json_bytes(good_announce_body(job="00" * 17)),
        json_bytes(good_announce_body(job=123)),
        json_bytes(good_announce_body(addrs="192.0.2.1")),
        json_bytes(good_announce_body(addrs=["example.org"])),
        json_bytes(good_announce_body(addrs=[1])),
        json_bytes(good_announce_body(addrs=["192.0.2.1"] * (wire.MAX_ADDRS + 1))),
        json_bytes(good_announce_body(addrs=["1" * 46])),
    ],
)
def test_malformed_announce_body(body: bytes) -> None:
    with pytest.raises(wire.WireError):
        wire.decode_datagram(raw_datagram(body))


@pytest.mark.parametrize(
    "body",
    [{}, {"job": JOB_ID.hex()}, {"job": JOB_ID.hex(), "ts": True},
     {"job": JOB_ID.hex(), "ts": "1"}, {"job": None, "ts": 1},
     {"job": JOB_ID.hex(), "ts": 1, "early": 2}, {"job": JOB_ID.hex(), "ts": 1, "early": True},
     {"job": JOB_ID.hex(), "ts": 1, "early": "1"}],
)
def test_malformed_taken_body(body: dict[str, Any]) -> None:
    with pytest.raises(wire.WireError):
        wire.decode_datagram(raw_datagram(json_bytes(body), kind=wire.Kind.TAKEN))


# -- datagram fuzzing -----------------------------------------------------------------


def check_decoded(data: bytes) -> None:
    """Decode DATA; only WireError may escape, and a success must describe DATA."""
    try:
        dgram = wire.decode_datagram(data)
    except wire.WireError:
        return
    assert isinstance(dgram.message, wire.Announce | wire.Taken)
    assert dgram.signed_part + dgram.signature == data
    assert len(dgram.signature) == wire.SIG_LEN
    assert len(data) <= wire.MAX_DATAGRAM


@given(st.binary(max_size=wire.MAX_DATAGRAM + 16))
def test_fuzz_datagram_arbitrary_bytes(data: bytes) -> None:
    check_decoded(data)


@given(st.binary(max_size=300))
def test_fuzz_datagram_arbitrary_bytes_after_a_valid_header(tail: bytes) -> None:
    check_decoded(b"RXN\x01" + bytes([1 + len(tail) % 2]) + APP_ID + tail)


@given(st.data(), messages, certs)
def test_fuzz_datagram_mutated(data: st.DataObject, message: wire.DatagramMessage,
                               cert: bytes) -> None:
    good = wire.encode_datagram(message, APP_ID, HashSigner(), cert[:64])
    check_decoded(data.draw(mutated(good)))


@given(st.sampled_from(list(wire.Kind)), json_objects(["job", "seq", "ts", "port", "addrs"]))
def test_fuzz_datagram_json_bodies(kind: wire.Kind, body: dict[str, Any]) -> None:
    check_decoded(raw_datagram(json.dumps(body).encode()[: wire.MAX_BODY], kind=kind))


# -- frame layout ---------------------------------------------------------------------


def test_frame_header_layout() -> None:
    assert wire.FRAME_HEADER.size == 6
    assert wire.encode_frame(wire.Data(3, b"xyz")) == b"\x00\x03\x00\x00\x00\x03xyz"
    assert wire.encode_frame(wire.Eof(2)) == b"\x01\x02\x00\x00\x00\x00"
    assert (wire.encode_frame(wire.Window(1, 0x01020304))
            == b"\x02\x01\x00\x00\x00\x04\x01\x02\x03\x04")
    body = b'{"job":"j1"}'
    assert wire.encode_frame(wire.Started("j1")) == b"\x0c\x00" + struct.pack("!I", 12) + body
    assert wire.encode_frame(wire.Busy()) == b"\x0d\x00\x00\x00\x00\x02{}"
    assert wire.encode_frame(wire.Exit(3, None)).endswith(b'{"code":3,"signal":null}')


def test_encode_frame_enforces_bounds() -> None:
    with pytest.raises(wire.WireError):
        wire.encode_frame(wire.Data(0, bytes(wire.MAX_FRAME + 1)))
    with pytest.raises(wire.WireError):
        wire.encode_frame(wire.Start(("x" * 60_000, "y" * 60_000)))


@given(frames)
def test_frame_round_trip(frame: wire.Frame) -> None:
    decoder = wire.FrameDecoder()
    assert decoder.feed(wire.encode_frame(frame)) == [frame]
    assert decoder.buffered == 0


@given(st.lists(frames, max_size=8), st.data())
def test_frames_fed_in_random_pieces(sent: list[wire.Frame], data: st.DataObject) -> None:
    stream = b"".join(wire.encode_frame(f) for f in sent)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=20))

    got, decoder = feed_in_pieces(stream, cuts)

    assert got == sent
    assert decoder.buffered == 0


@settings(max_examples=30)
@given(st.lists(frames, min_size=1, max_size=4))
def test_frames_fed_one_byte_at_a_time(sent: list[wire.Frame]) -> None:
    stream = b"".join(wire.encode_frame(f) for f in sent)

    got, decoder = feed_in_pieces(stream, list(range(1, len(stream))))

    assert got == sent
    assert decoder.buffered == 0


def test_partial_frame_is_held_until_complete() -> None:
    decoder = wire.FrameDecoder()
    encoded = wire.encode_frame(wire.Data(1, b"hello"))
    assert decoder.feed(encoded[:8]) == []
    assert decoder.buffered == 8
    assert decoder.feed(encoded[8:] + encoded[:3]) == [wire.Data(1, b"hello")]
    assert decoder.buffered == 3


# -- frame bounds and malformed frames ------------------------------------------------


def test_frame_longer_than_max_frame_refused_at_its_header() -> None:
    decoder = wire.FrameDecoder()
    with pytest.raises(wire.WireError, match="exceeds"):
        decoder.feed(struct.pack("!BBI", wire.FrameKind.DATA, 1, wire.MAX_FRAME + 1))
    assert decoder.buffered <= wire.FRAME_HEADER.size


def test_frame_header_claiming_4_gib_refused() -> None:
    decoder = wire.FrameDecoder()
    with pytest.raises(wire.WireError):
        decoder.feed(b"\x00\x00\xff\xff\xff\xff" + bytes(100))
    assert decoder.buffered < 200


def test_data_frame_of_max_frame_is_accepted() -> None:
    decoder = wire.FrameDecoder()
    assert decoder.feed(struct.pack("!BBI", wire.FrameKind.DATA, 1, wire.MAX_FRAME)) == []
    chunk = bytes(wire.MAX_DATA_CHUNK)
    got: list[wire.Frame] = []
    for _ in range(wire.MAX_FRAME // len(chunk)):
        got += decoder.feed(chunk)
    assert got == [wire.Data(1, bytes(wire.MAX_FRAME))]
    assert decoder.buffered == 0


@pytest.mark.parametrize("kind", [wire.FrameKind.HELLO, wire.FrameKind.START,
                                  wire.FrameKind.EOF, wire.FrameKind.WINDOW, 99])
def test_control_frame_longer_than_max_control_refused_at_its_header(kind: int) -> None:
    decoder = wire.FrameDecoder()
    with pytest.raises(wire.WireError, match="control frame too long"):
        decoder.feed(struct.pack("!BBI", kind, 0, wire.MAX_CONTROL + 1))
    assert decoder.buffered <= wire.FRAME_HEADER.size


def test_control_frame_of_max_control_is_buffered() -> None:
    decoder = wire.FrameDecoder()
    header = struct.pack("!BBI", wire.FrameKind.ERROR, 0, wire.MAX_CONTROL)
    assert decoder.feed(header + b'{"reason":') == []
    assert decoder.buffered == len(header) + 10


def hello(**changes: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {"worker": "w1", "version": "0.1", "load": 0.5, "delay_ms": 52.0,
                           "slots": 4, "running": 1}
    obj.update(changes)
    return obj


H, S, ST, X, E = (wire.FrameKind.HELLO, wire.FrameKind.START, wire.FrameKind.STARTED,
                  wire.FrameKind.EXIT, wire.FrameKind.ERROR)


@pytest.mark.parametrize(
    ("kind", "payload"),
    [
        (wire.FrameKind.EOF, b"x"),
        (wire.FrameKind.WINDOW, b"\0\0\0"),
        (wire.FrameKind.WINDOW, b"\0\0\0\0\0"),
        (3, b"{}"),
        (99, b"{}"),
        (H, b"not json"),
        (H, b"\xc3\x28"),
        (H, b"[" * 60_000),
        (H, b'{"slots": ' + b"1" * 5000 + b"}"),
        (H, json_bytes(hello(slots=True))),
        (H, json_bytes(hello(slots=-1))),
        (H, json_bytes(hello(slots=(1 << 20) + 1))),
        (H, json_bytes(hello(running=2.0))),
        (H, json_bytes(hello(load="1"))),
        (H, json_bytes(hello(load=True))),
        (H, json_bytes(hello(load=1e12))),
        (H, json_bytes(hello(delay_ms=-1e12))),
        (H, b'{"worker":"w","version":"v","load":NaN,"delay_ms":1,"slots":1,"running":0}'),
        (H, b'{"worker":"w","version":"v","load":1,"delay_ms":Infinity,"slots":1,"running":0}'),
        (H, json_bytes(hello(worker="w" * 257))),
        (H, json_bytes(hello(version=1))),
        (S, json_bytes({"args": "ls"})),
        (S, json_bytes({"args": ["ls", 1]})),
        (S, json_bytes({"tty": 1})),
        (S, json_bytes({"fds": [[2, "r"]]})),
        (S, json_bytes({"fds": [[3, "x"]]})),
        (S, json_bytes({"env": [["A=B", "c"]]})),
        (S, json_bytes({"env": [["A", "c", "d"]]})),
        (ST, json_bytes({"job": "j" * 65})),
        (X, json_bytes({"code": 0, "signal": 9})),
        (X, json_bytes({})),
        (X, json_bytes({"code": None, "signal": None})),
        (X, json_bytes({"code": 256, "signal": None})),
        (X, json_bytes({"code": -1})),
        (X, json_bytes({"code": True})),
        (X, json_bytes({"signal": 0})),
        (X, json_bytes({"signal": 128})),
        (X, json_bytes({"signal": 9.0})),
        (E, json_bytes({"reason": "r" * 65, "message": "m"})),
        (E, json_bytes({"reason": "r", "message": "m" * 1025})),
        (E, json_bytes({"reason": "r"})),
    ],
)
def test_malformed_frame(kind: int, payload: bytes) -> None:
    with pytest.raises(wire.WireError):
        wire.FrameDecoder().feed(raw_frame(kind, payload))


@pytest.mark.parametrize(
    ("body", "expected"),
    [({"code": 0, "signal": None}, wire.Exit(0, None)),
     ({"code": 255}, wire.Exit(255, None)),
     ({"signal": 9}, wire.Exit(None, 9)),
     ({"code": None, "signal": 127}, wire.Exit(None, 127))],
)
def test_exit_with_exactly_one_of_code_and_signal(body: dict[str, Any],
                                                  expected: wire.Exit) -> None:
    assert wire.FrameDecoder().feed(raw_frame(X, json_bytes(body))) == [expected]


def test_bad_frame_after_good_ones_still_raises() -> None:
    decoder = wire.FrameDecoder()
    with pytest.raises(wire.WireError):
        decoder.feed(wire.encode_frame(wire.Busy()) + raw_frame(99, b"{}"))


# -- frame fuzzing --------------------------------------------------------------------


def check_feed(decoder: wire.FrameDecoder, data: bytes) -> None:
    """Feed DATA; only WireError may escape, and whatever comes out is a frame."""
    before = decoder.buffered
    try:
        got = decoder.feed(data)
    except wire.WireError:
        return
    assert all(isinstance(f, wire.Data | wire.Eof | wire.Shut | wire.Window | wire.FileData
                          | wire.FileWindow | wire.Control) for f in got)
    assert decoder.buffered <= before + len(data)
    assert decoder.buffered <= wire.FRAME_HEADER.size + wire.MAX_FRAME


@given(st.lists(st.binary(max_size=2000), max_size=5))
def test_fuzz_frame_decoder_arbitrary_bytes(chunks: list[bytes]) -> None:
    decoder = wire.FrameDecoder()
    for chunk in chunks:
        check_feed(decoder, chunk)


@given(st.data(), st.lists(frames, min_size=1, max_size=4))
def test_fuzz_frame_decoder_mutated(data: st.DataObject, sent: list[wire.Frame]) -> None:
    stream = b"".join(wire.encode_frame(f) for f in sent)
    check_feed(wire.FrameDecoder(), data.draw(mutated(stream)))


@given(st.sampled_from([k for k in wire.FrameKind if k >= wire.FrameKind.HELLO]),
       json_objects(["worker", "version", "load", "delay_ms", "slots", "running", "args",
                     "job", "code", "signal", "reason", "message"]))
def test_fuzz_control_frame_json_bodies(kind: wire.FrameKind, body: dict[str, Any]) -> None:
    check_feed(wire.FrameDecoder(), raw_frame(kind, json.dumps(body).encode()))


def test_printable_escapes_what_a_terminal_would_obey() -> None:
    from rexnet.protocol.text import printable

    assert printable("alpha-1.example") == "alpha-1.example"
    assert printable("a\x1b[2Jb\x07\r\n\x9b\x7f\u2028\\") == (
        "a\\x1b[2Jb\\x07\\r\\n\\x9b\\x7f\\u2028\\\\")
    assert printable("é漢字") == "é漢字"
    assert printable("x" * 300, limit=10) == "x" * 10 + "..."
