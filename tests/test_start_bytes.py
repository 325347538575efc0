"""START's bytes with a job's own data token (rexnet.client.channel.start_bytes): made from
bytes kept per frame, with the token set where its placeholder was; always the very bytes
encode_frame gives the frame with that token, which the worker decodes back to it."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from rexnet.client.channel import start_bytes
from rexnet.protocol import wire
from rexnet.protocol.frames import FrameDecoder

TEXT = st.text(max_size=40)
VALUE = st.text(st.characters(blacklist_characters="\0"), max_size=40)  # what a START may hold
STARTS = st.builds(
    wire.Start, args=st.lists(TEXT, min_size=1, max_size=4).map(tuple),
    env=st.lists(st.tuples(st.from_regex(r"[A-Z_]{1,8}", fullmatch=True), VALUE),
                 max_size=3).map(tuple),
    keep=st.booleans(), cwd=st.one_of(st.just(""), st.from_regex(r"/[a-z0-9/]{0,30}",
                                                                   fullmatch=True)),
    workers=st.lists(st.from_regex(r"[a-z]{1,8}", fullmatch=True), max_size=2).map(tuple))
TOKENS = st.binary(min_size=32, max_size=32).map(bytes.hex)


@settings(max_examples=200, deadline=None)
@given(STARTS, st.sampled_from(["i", "o", "io"]), st.lists(TOKENS, min_size=1, max_size=3))
def test_the_bytes_are_encode_frames_with_each_token(start: wire.Start, streams: str,
                                                     tokens: list[str]) -> None:
    assert start_bytes(start) == wire.encode_frame(start)
    for token in tokens:
        offered = replace(start, data_streams=streams, data_token=token)
        data = start_bytes(start, (streams, token))
        assert data == wire.encode_frame(offered)
        assert FrameDecoder().feed(data) == [offered]


def test_a_start_whose_arguments_look_like_the_token_key_is_set_right() -> None:
    start = wire.Start(('"data_token":"' + "0" * 64 + '"',), cwd='"data_token":"')
    token = "ab" * 32
    assert start_bytes(start, ("o", token)) == wire.encode_frame(
        replace(start, data_streams="o", data_token=token))


def test_a_token_of_another_length_is_encoded_as_it_is() -> None:
    start = wire.Start(("true",))
    assert start_bytes(start, ("o", "abc")) == wire.encode_frame(
        replace(start, data_streams="o", data_token="abc"))
