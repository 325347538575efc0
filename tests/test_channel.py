"""Flow control and framing of the job channel (rexnet.net.channel), over string transports.

The TLS layer is left out: a channel is connected to a StringTransport and marked
verified by hand, as handshakeCompleted would after checking the peer's certificate.
Sources and sinks of streams are StringTransports too; their producerState and
producer registration show what the channel asked of them.
"""

from __future__ import annotations

import pytest
from conftest import Keys
from twisted.internet.testing import StringTransport

from rexnet.net.channel import (
    GRANT_STEP,
    MAX_OVERRUN,
    STREAM_WINDOW,
    WINDOW,
    Channel,
    InStream,
    OutStream,
)
from rexnet.protocol import wire
from rexnet.security.credentials import Credential, load_credential


class Peer(Channel):
    """A channel that records the control frames it receives."""

    def __init__(self, credential: Credential) -> None:
        super().__init__(credential)
        self.controls: list[wire.Frame] = []

    def controlReceived(self, frame: wire.Frame) -> None:
        self.controls.append(frame)


@pytest.fixture(scope="module")
def credential(keys: Keys) -> Credential:
    return load_credential(keys.worker, "worker")


@pytest.fixture
def transport() -> StringTransport:
    return StringTransport()


@pytest.fixture
def channel(credential: Credential, transport: StringTransport) -> Peer:
    peer = Peer(credential)
    peer.makeConnection(transport)
    peer.verified = True
    return peer


def sent(transport: StringTransport) -> list[wire.Frame]:
    """The frames written to TRANSPORT since the last call."""
    decoder = wire.FrameDecoder()
    frames = decoder.feed(transport.value())
    assert decoder.buffered == 0
    transport.clear()
    return frames


def deliver(channel: Channel, *frames: wire.Frame) -> None:
    channel.dataReceived(b"".join(wire.encode_frame(f) for f in frames))


WIDEN = wire.Window(0, STREAM_WINDOW - WINDOW)  # the receiver's widening of stream 0
WIDE_OVERRUN = STREAM_WINDOW + wire.MAX_FRAME  # what the peer may send once it is widened


def data_chunks(total: int, stream: int) -> list[wire.Frame]:
    chunk = wire.MAX_DATA_CHUNK
    return [wire.Data(stream, bytes(min(chunk, total - start)))
            for start in range(0, total, chunk)]


def out_stream(channel: Channel, stream: int = 1) -> tuple[OutStream, StringTransport]:
    out = OutStream(channel, stream)
    channel.outs[stream] = out
    source = StringTransport()
    out.attach(source)
    return out, source


def in_stream(channel: Channel, stream: int = 0) -> tuple[InStream, StringTransport]:
    sink = StringTransport()
    inbound = InStream(channel, stream, sink)
    channel.ins[stream] = inbound
    return inbound, sink


def assert_closed_with_protocol_error(channel: Channel, transport: StringTransport) -> None:
    errors = [f for f in sent(transport) if isinstance(f, wire.Error)]
    assert [e.reason for e in errors] == ["protocol"]
    assert channel.closed
    assert transport.disconnected  # aborted, not a graceful close


# -- the channel itself ---------------------------------------------------------------


def test_channel_registers_as_streaming_producer_of_its_transport(
    channel: Peer, transport: StringTransport
) -> None:
    assert transport.producer is channel
    assert transport.streaming is True


def test_frames_before_verification_are_refused(credential: Credential) -> None:
    transport = StringTransport()
    peer = Peer(credential)
    peer.makeConnection(transport)

    peer.dataReceived(wire.encode_frame(wire.Started("job")))

    assert peer.controls == []
    assert peer.closed and transport.disconnected
    assert transport.value() == b""  # nothing at all goes to an unauthenticated peer


def test_control_frames_reach_the_subclass_in_order(channel: Peer) -> None:
    frames: list[wire.Frame] = [wire.Started("j1"), wire.Busy(), wire.Exit(0, None)]
    stream = b"".join(wire.encode_frame(f) for f in frames)

    for i in range(len(stream)):
        channel.dataReceived(stream[i : i + 1])

    assert channel.controls == frames


def test_garbage_closes_with_protocol_error(channel: Peer, transport: StringTransport) -> None:
    channel.dataReceived(b"\x63\x00\x00\x00\x00\x02{}")  # unknown kind 99

    assert_closed_with_protocol_error(channel, transport)
    deliver(channel, wire.Started("late"))
    assert channel.controls == []
    assert transport.value() == b""


def test_frames_after_a_fatal_one_are_not_handled(channel: Peer,
                                                  transport: StringTransport) -> None:
    deliver(channel, wire.Started("a"), wire.Data(7, b"no such stream"), wire.Started("b"))

    assert channel.controls == [wire.Started("a")]
    assert_closed_with_protocol_error(channel, transport)


def test_base_channel_refuses_control_frames(credential: Credential,
                                             transport: StringTransport) -> None:
    plain = Channel(credential)
    plain.makeConnection(transport)
    plain.verified = True

    deliver(plain, wire.Started("job"))

    assert_closed_with_protocol_error(plain, transport)


def test_nothing_is_sent_once_closed(channel: Peer, transport: StringTransport) -> None:
    channel.close()
    channel.send(wire.Busy())
    assert transport.value() == b""
    assert transport.disconnecting and not transport.disconnected


# -- OutStream ------------------------------------------------------------------------


def test_out_stream_sends_data_in_bounded_chunks(channel: Peer,
                                                 transport: StringTransport) -> None:
    out, _ = out_stream(channel, 1)
    payload = bytes(range(256)) * 1000

    out.write(payload)

    frames = sent(transport)
    assert all(isinstance(f, wire.Data) and f.stream == 1 for f in frames)
    assert all(len(f.payload) <= wire.MAX_DATA_CHUNK for f in frames if isinstance(f, wire.Data))
    assert b"".join(f.payload for f in frames if isinstance(f, wire.Data)) == payload
    assert out.credit == WINDOW - len(payload)


def test_out_stream_writes_one_read_to_the_transport_at_once(channel: Peer,
                                                            transport: StringTransport
                                                            ) -> None:
    """A read of many chunks goes to the TLS layer in one write (one pass, one copy)."""
    writes: list[bytes] = []
    write = transport.write

    def counting(data: bytes) -> None:
        writes.append(data)
        write(data)

    transport.write = counting  # type: ignore[method-assign]
    out, _ = out_stream(channel, 3)
    payload = bytes(range(256)) * 1024  # 256 KiB: 4 frames

    out.write(payload)
    out.write(b"")  # nothing to send: nothing written

    assert len(writes) == 1
    frames = sent(transport)
    assert [len(f.payload) for f in frames if isinstance(f, wire.Data)] == [
        wire.MAX_DATA_CHUNK] * 4
    assert b"".join(f.payload for f in frames if isinstance(f, wire.Data)) == payload


def test_a_channel_that_routes_its_frames_gets_data_as_frames(credential: Credential) -> None:
    """A subclass overriding send (as a detached job's OutputLog does) sees every DATA
    frame, not bytes written past it to the transport."""

    class Routing(Peer):
        def __init__(self, credential: Credential) -> None:
            super().__init__(credential)
            self.routed: list[wire.Frame] = []

        def send(self, frame: wire.Frame) -> None:
            self.routed.append(frame)

    transport = StringTransport()
    routing = Routing(credential)
    routing.makeConnection(transport)
    routing.verified = True
    out, _ = out_stream(routing, 1)
    payload = bytes(range(256)) * 600

    out.write(payload)

    assert transport.value() == b""
    assert all(isinstance(f, wire.Data) and len(f.payload) <= wire.MAX_DATA_CHUNK
               for f in routing.routed)
    assert b"".join(f.payload for f in routing.routed if isinstance(f, wire.Data)) == payload


def test_source_paused_when_credit_is_used_up(channel: Peer) -> None:
    out, source = out_stream(channel)

    out.write(bytes(WINDOW - 1))
    assert source.producerState == "producing"
    out.write(b"x")

    assert out.credit == 0
    assert source.producerState == "paused"


def test_window_grant_resumes_the_source(channel: Peer) -> None:
    out, source = out_stream(channel, 1)
    out.write(bytes(WINDOW))

    deliver(channel, wire.Window(1, GRANT_STEP))

    assert out.credit == GRANT_STEP
    assert source.producerState == "producing"


def test_grant_smaller_than_the_overshoot_keeps_the_source_paused(channel: Peer) -> None:
    out, source = out_stream(channel, 1)
    out.write(bytes(WINDOW + 10))  # a read that was already under way

    deliver(channel, wire.Window(1, 10))
    assert source.producerState == "paused"
    deliver(channel, wire.Window(1, 1))
    assert source.producerState == "producing"


def test_grant_for_another_stream_does_not_resume(channel: Peer) -> None:
    out, source = out_stream(channel, 1)
    out.write(bytes(WINDOW))

    deliver(channel, wire.Window(2, GRANT_STEP))

    assert source.producerState == "paused"


def test_credit_never_exceeds_the_window(channel: Peer) -> None:
    out, source = out_stream(channel, 1)

    deliver(channel, wire.Window(1, 2**32 - 1))
    assert out.credit == STREAM_WINDOW
    out.write(bytes(STREAM_WINDOW))

    assert source.producerState == "paused"


def test_source_attached_without_credit_starts_paused(channel: Peer) -> None:
    out = OutStream(channel, 1)
    out.write(bytes(WINDOW))
    source = StringTransport()

    out.attach(source)

    assert source.producerState == "paused"


def test_congested_link_pauses_sources_until_it_drains(channel: Peer,
                                                       transport: StringTransport) -> None:
    _, source = out_stream(channel, 1)
    assert transport.producer is not None

    transport.producer.pauseProducing()
    assert source.producerState == "paused"
    transport.producer.resumeProducing()
    assert source.producerState == "producing"


def test_congestion_and_credit_both_must_clear(channel: Peer,
                                               transport: StringTransport) -> None:
    out, source = out_stream(channel, 1)
    out.write(bytes(WINDOW))
    channel.pauseProducing()

    deliver(channel, wire.Window(1, GRANT_STEP))
    assert source.producerState == "paused"
    channel.resumeProducing()
    assert source.producerState == "producing"


def test_shut_for_an_out_stream_stops_its_source(channel: Peer,
                                                 transport: StringTransport) -> None:
    out, source = out_stream(channel, 1)

    deliver(channel, wire.Shut(1))

    assert source.producerState == "stopped"
    assert out.closed
    out.write(b"late output")
    assert sent(transport) == []


def test_close_sends_one_eof(channel: Peer, transport: StringTransport) -> None:
    out, _ = out_stream(channel, 2)
    out.write(b"bye")

    out.close()
    out.close()
    out.write(b"after close")

    assert sent(transport) == [wire.Data(2, b"bye"), wire.Eof(2)]


# -- InStream -------------------------------------------------------------------------


def test_in_stream_registers_as_streaming_producer_of_its_sink(channel: Peer) -> None:
    inbound, sink = in_stream(channel)
    assert sink.producer is inbound
    assert sink.streaming is True


def test_data_goes_to_the_sink(channel: Peer) -> None:
    inbound, sink = in_stream(channel, 0)

    deliver(channel, wire.Data(0, b"hello "), wire.Data(0, b"world"))

    assert sink.value() == b"hello world"
    assert inbound.received == 11


def test_credit_is_granted_in_grant_step_batches(channel: Peer,
                                                 transport: StringTransport) -> None:
    in_stream(channel, 0)

    deliver(channel, wire.Data(0, bytes(GRANT_STEP - 1)))
    assert sent(transport) == [WIDEN]  # once, at the stream's first data
    deliver(channel, wire.Data(0, b"x"))
    assert sent(transport) == [wire.Window(0, GRANT_STEP)]

    deliver(channel, *data_chunks(3 * GRANT_STEP, 0))
    assert sent(transport) == [wire.Window(0, GRANT_STEP)] * 3


def test_credit_is_held_while_the_sink_is_paused(channel: Peer,
                                                 transport: StringTransport) -> None:
    inbound, sink = in_stream(channel, 0)
    assert sink.producer is not None

    sink.producer.pauseProducing()
    deliver(channel, *data_chunks(2 * GRANT_STEP + 5, 0))
    assert sent(transport) == [WIDEN]  # widening is not credit for taken bytes
    assert len(sink.value()) == 2 * GRANT_STEP + 5

    sink.producer.resumeProducing()
    assert sent(transport) == [wire.Window(0, 2 * GRANT_STEP + 5)]
    assert inbound.outstanding == 0


def test_resume_with_nothing_outstanding_grants_nothing(channel: Peer,
                                                        transport: StringTransport) -> None:
    inbound, _ = in_stream(channel, 0)
    inbound.pauseProducing()
    inbound.resumeProducing()
    assert sent(transport) == []


def test_dropped_sink_releases_credit(channel: Peer, transport: StringTransport) -> None:
    inbound, sink = in_stream(channel, 0)
    inbound.pauseProducing()
    deliver(channel, wire.Data(0, b"kept"))

    inbound.stopProducing()  # the sink's reader went away
    deliver(channel, *data_chunks(GRANT_STEP, 0))

    assert sink.value() == b"kept"
    frames = sent(transport)
    assert frames[0] == WIDEN
    assert sum(f.credit for f in frames[1:] if isinstance(f, wire.Window)) == GRANT_STEP + 4


def test_paused_sink_tolerates_a_full_window_and_one_frame(channel: Peer,
                                                           transport: StringTransport) -> None:
    inbound, _ = in_stream(channel, 0)
    inbound.pauseProducing()

    deliver(channel, *data_chunks(WIDE_OVERRUN, 0))

    assert not channel.closed
    assert inbound.outstanding == WIDE_OVERRUN


def test_overrunning_the_window_raises_wire_error(channel: Peer) -> None:
    inbound, _ = in_stream(channel, 0)
    inbound.pauseProducing()
    inbound.data(b"x")  # widens the window
    inbound.data(bytes(WIDE_OVERRUN - 1))

    with pytest.raises(wire.WireError, match="overran"):
        inbound.data(b"x")


def test_a_stream_is_held_to_the_first_window_until_widened(channel: Peer) -> None:
    """The first DATA may not exceed what every peer starts with."""
    inbound, _ = in_stream(channel, 0)
    with pytest.raises(wire.WireError, match="overran"):
        inbound.data(bytes(MAX_OVERRUN + 1))


def test_widening_reaches_a_sender_and_is_capped(channel: Peer,
                                                 transport: StringTransport) -> None:
    """A sender's credit grows to STREAM_WINDOW with the receiver's widening, and no
    further; one that never hears it keeps WINDOW (an older receiver)."""
    out, source = out_stream(channel, 0)
    out.write(bytes(WINDOW))
    assert source.producerState == "paused"
    deliver(channel, WIDEN)
    assert out.credit == STREAM_WINDOW - WINDOW and source.producerState == "producing"
    deliver(channel, wire.Window(0, WINDOW), WIDEN)  # a second widening is capped
    assert out.credit == STREAM_WINDOW


def test_overrunning_the_window_closes_with_protocol_error(
    channel: Peer, transport: StringTransport
) -> None:
    inbound, sink = in_stream(channel, 0)
    inbound.pauseProducing()

    deliver(channel, *data_chunks(WIDE_OVERRUN + wire.MAX_DATA_CHUNK, 0))

    assert_closed_with_protocol_error(channel, transport)
    assert len(sink.value()) == WIDE_OVERRUN  # the excess never reached the sink


def test_eof_ends_the_in_stream(channel: Peer, transport: StringTransport) -> None:
    inbound, sink = in_stream(channel, 0)
    deliver(channel, wire.Data(0, b"last"), wire.Eof(0))

    assert inbound.eof
    assert sink.value() == b"last"
    assert sink.producer is None and sink.disconnecting

    deliver(channel, wire.Data(0, b"after eof"))
    assert_closed_with_protocol_error(channel, transport)


def test_data_on_a_stream_never_opened_is_a_protocol_error(
    channel: Peer, transport: StringTransport
) -> None:
    deliver(channel, wire.Data(5, b"?"))
    assert_closed_with_protocol_error(channel, transport)
