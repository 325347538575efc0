"""The launcher <-> agent messages: JSON without the json module, a bounded decoder, fuzzed."""

from __future__ import annotations

import json
import math
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rexnet.protocol import agentwire
from rexnet.protocol.agentwire import AgentWireError, Decoder, Exec, Signal, Winch, dumps, loads
from rexnet.protocol.request import ExecRequest

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(), inner, max_size=5),
    max_leaves=20)

EXEC = {"keyfile": "k", "keypath": "/k", "args": ["a"], "announce": [], "alerts": [],
        "timeout": 30.0, "verbose": False, "tty": False, "raw": False, "term": "", "rows": 0,
        "cols": 0, "fds": [[3, "r"]], "env": [["A", "1"]], "netns": 1, "revoked": ""}
REQUEST = ExecRequest(keyfile="k", keypath="/k", args=("a",), fds=((3, "r"),),
                      env=(("A", "1"),))


def same(a: object, b: object) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    return a == b


@given(JSON)
def test_dumps_writes_what_json_reads_and_loads_reads_it_back(value: object) -> None:
    text = dumps(value)
    assert json.loads(text) == value
    assert loads(text) == json.loads(text)


@given(st.text(max_size=200))
def test_loads_accepts_only_what_json_accepts_and_agrees(text: str) -> None:
    try:
        ours = loads(text)
    except ValueError:
        return
    assert ours == json.loads(text)


@given(JSON, st.integers(0, 50), st.sampled_from(["", " ", "]", "}", ",", '"', "\\", "x",
                                                  "0", "-", "e", "\\u12", "\x01"]))
def test_mangled_json_is_read_like_json_or_refused(value: object, at: int, junk: str) -> None:
    text = json.dumps(value)
    text = text[:at] + junk + text[at:]
    try:
        theirs = json.loads(text)
    except ValueError:
        theirs = ValueError
    try:
        ours = loads(text)
    except ValueError:
        ours = ValueError
    if theirs is ValueError or agentwire.depth(theirs) > agentwire.MAX_DEPTH or not _finite(
            theirs):  # (ours refuses a number out of range, e.g. 1e400, at any depth)
        assert ours is ValueError or ours == theirs
    else:
        assert ours == theirs


def _finite(value: object) -> bool:
    """Whether every number in VALUE (at any depth) is finite."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    if isinstance(value, list):
        return all(_finite(v) for v in value)
    return True


@pytest.mark.parametrize("text", ["1e400", "[1e400]", '{"a": {"b": -1e400}}'])
def test_a_number_out_of_range_is_refused_at_any_depth(text: str) -> None:
    with pytest.raises(ValueError, match="out of range"):
        loads(text)


def test_strings_escape_controls_quotes_and_lone_surrogates() -> None:
    text = dumps({"a": 'q"\\\n\x01\udcff\U0001f600'})
    assert json.loads(text) == {"a": 'q"\\\n\x01\udcff\U0001f600'}
    assert loads('"\\ud83d\\ude00"') == "\U0001f600"
    for bad in ('"\\x"', '"\x01"', "01", "1.", "-", "[1,]", "{1:2}", "nul", "[" * 20 + "]" * 20):
        with pytest.raises(ValueError):
            loads(bad)


def test_a_message_round_trips_in_any_chunks() -> None:
    messages = [Exec(REQUEST, 1), Signal(2), Winch(3, 4)]
    data = b"".join(m.encode() for m in messages)
    assert json.loads(data[4:4 + struct.unpack("!I", data[:4])[0]]) == {
        "op": "exec", **EXEC, "cwd": "", "cwd_required": False, "cpus": 1, "mem": 0,
        "workers": [], "queue_timeout": 0.0}
    for size in (1, 7, len(data)):
        for loads_with in (None, json.loads):
            decoder = Decoder(loads_with)
            got = []
            for i in range(0, len(data), size):
                got += decoder.feed(data[i:i + size])
            assert got == messages


@given(st.builds(
    ExecRequest, keyfile=st.text(), keypath=st.text(),
    args=st.lists(st.text().filter(lambda t: "\0" not in t), max_size=5).map(tuple),
    announce=st.lists(st.text(max_size=20).filter(lambda t: "\0" not in t),
                      max_size=3).map(tuple),
    timeout=st.floats(0.001, 1e9), verbose=st.booleans(), raw=st.booleans(),
    rows=st.integers(0, 0xFFFF), cols=st.integers(0, 0xFFFF),
    fds=st.dictionaries(st.integers(3, 255), st.sampled_from(["r", "w", "rw"]),
                        max_size=4).map(lambda d: tuple(d.items())),
    env=st.lists(st.tuples(st.text(min_size=1, max_size=10).filter(
        lambda t: "=" not in t and "\0" not in t), st.text().filter(lambda t: "\0" not in t)),
        max_size=4).map(tuple)),
    st.integers(0, 2**32))
def test_every_request_the_builder_can_make_round_trips(req: ExecRequest,
                                                       netns: int) -> None:
    req.check()
    (got,) = Decoder().feed(Exec(req, netns).encode())
    assert got == Exec(req, netns)


def test_the_decoder_refuses_a_long_message_from_its_header() -> None:
    with pytest.raises(AgentWireError, match="too long"):
        Decoder().feed(struct.pack("!I", agentwire.MAX_MESSAGE + 1))


@pytest.mark.parametrize("message", [
    {"op": "exec", **EXEC, "fds": [[2, "r"]]},
    {"op": "exec", **EXEC, "fds": [[3, "x"]]},
    {"op": "exec", **EXEC, "timeout": 0},
    {"op": "exec", **EXEC, "args": "a"},
    {"op": "exec", **EXEC, "env": [["A"]]},
    {"op": "exec", **EXEC, "tty": 1},
    {"op": "exec", **EXEC, "timeout": 10**400},
    {"op": "exec", **EXEC, "fds": [[3, "r"], [3, "w"]]},
    {"op": "exec", **EXEC, "env": [["A=B", "1"]]},
    {"op": "exec", **EXEC, "tty": True, "fds": [[3, "r"]]},
    {"op": "signal", "number": 0},
    {"op": "signal", "number": True},
    {"op": "exit", "status": 256, "message": ""},
    {"op": "winch", "rows": -1, "cols": 2},
    {"op": "launch"},
    ["op", "stop"],
])
def test_malformed_messages_are_refused(message: object) -> None:
    body = json.dumps(message).encode()
    with pytest.raises(AgentWireError):
        Decoder(json.loads).feed(struct.pack("!I", len(body)) + body)


@settings(max_examples=300)
@given(st.binary(max_size=300))
def test_any_bytes_give_messages_or_an_agent_wire_error(data: bytes) -> None:
    for loads_with in (None, json.loads):
        decoder = Decoder(loads_with)
        try:
            for message in decoder.feed(data):
                assert isinstance(message, agentwire.Message)
                assert agentwire.KINDS[message.OP] is type(message)
        except AgentWireError:
            pass


@given(st.dictionaries(st.sampled_from(sorted(EXEC)), JSON, max_size=4))
def test_exec_messages_with_wrong_fields_are_refused_never_crash(changes: dict) -> None:
    body = dumps({"op": "exec", **EXEC, **changes}).encode()
    try:
        (message,) = Decoder().feed(struct.pack("!I", len(body)) + body)
    except AgentWireError:
        return
    assert isinstance(message, Exec)  # what passes is well-typed, and within bounds
    request = message.request
    for name, kind in Exec.SCHEMA.items():
        if name != "netns":
            value = getattr(request, name)
            assert isinstance(value, tuple if kind is list else kind)
    assert isinstance(request.timeout, float) and 0 < request.timeout <= 1e9
    assert all(isinstance(a, str) for a in request.args)
    assert all(3 <= fd <= 255 and mode in ("r", "w", "rw") for fd, mode in request.fds)
    assert all(isinstance(n, str) and isinstance(v, str) for n, v in request.env)
    request.check()
