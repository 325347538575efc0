"""The job channel: frames over mutual TLS, streams with credit-based flow control.

Each direction of each stream (a file descriptor of the job) has a window of
WINDOW bytes: the sender stops reading its source when the window is used up and
reads again when the receiver returns credit (WINDOW frames), which it does only
once its sink has taken the bytes.  So a slow reader on one side pauses the producer
on the other, memory stays bounded, and control frames (exit status, errors) never
wait behind data.

A receiver widens a stream's window to STREAM_WINDOW when the stream's first DATA
arrives, with one WINDOW frame of the difference (issue P11: a 1 MiB window covered only
~8 ms of a bulk transfer, so a process of the pipeline that lost its CPU for longer
stalled the link). Every peer starts from WINDOW; a sender caps its credit at
STREAM_WINDOW, and an older one at WINDOW, so either side may be older.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import interfaces
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from rexnet.net.bulktls import bulk_writes
from rexnet.net.heartbeat import Heartbeat
from rexnet.net.tuning import tune_connection
from rexnet.protocol import wire
from rexnet.security.credentials import Credential
from rexnet.security.tls import Revocations, check_peer

WINDOW = 1 << 20  # the credit both sides start a stream with (the protocol's)
STREAM_WINDOW = 4 << 20  # what a receiver widens a stream's window to
GRANT_STEP = WINDOW // 4
MAX_OVERRUN = WINDOW + wire.MAX_FRAME  # before the widening

log = Logger()


class OutStream:
    """Local bytes of one stream going to the peer, paced by the peer's credit."""

    def __init__(self, channel: Channel, stream: int) -> None:
        self.channel = channel
        self.stream = stream
        self.credit = WINDOW
        self.source: interfaces.IPushProducer | None = None
        self._source_paused = False
        self.closed = False
        self.sent = 0

    def attach(self, source: interfaces.IPushProducer) -> None:
        """SOURCE is paused while the window is used up or the link is congested."""
        self.source = source
        self._update()

    def write(self, data: bytes) -> None:
        if self.closed:
            return
        self.channel.send_data(self.stream, data)
        self.credit -= len(data)
        self.sent += len(data)
        self._update()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.channel.send(wire.Eof(self.stream))

    def detach(self) -> None:
        """Stop reading the source and forget it (its stream is handed over, APART); a
        later attach resumes it as credit allows."""
        if self.source is not None and not self._source_paused:
            self.source.pauseProducing()
        self.source = None
        self._source_paused = True

    def stop(self) -> None:
        """The peer's reader is gone: read no more from the source."""
        self.closed = True
        if self.source is not None:
            self.source.stopProducing()
            self.source = None

    def grant(self, credit: int) -> None:
        self.credit = min(self.credit + credit, STREAM_WINDOW)
        self._update()

    def _update(self) -> None:
        """Pause or resume the source to match credit and link congestion."""
        if self.source is None:
            return
        want_paused = self.credit <= 0 or self.channel.congested
        if want_paused and not self._source_paused:
            self._source_paused = True
            self.source.pauseProducing()
        elif not want_paused and self._source_paused:
            self._source_paused = False
            self.source.resumeProducing()


@implementer(interfaces.IPushProducer)
class InStream:
    """Bytes of one stream from the peer going to a local sink; returns credit once taken.

    The sink is a Twisted consumer (a pipe writer); this object registers itself as
    the sink's producer so the sink's own buffer limit holds credit back.
    """

    def __init__(
        self, channel: Channel, stream: int, sink: Any | None, close_on_eof: bool = True
    ) -> None:
        self.channel = channel
        self.close_on_eof = close_on_eof
        self.stream = stream
        self.sink = sink
        self.outstanding = 0  # bytes received and not yet credited back
        self.held = False  # the sink asked us to pause
        self.received = 0
        self.eof = False
        self.overrun = MAX_OVERRUN  # the most the peer may have sent uncredited
        if sink is not None:
            sink.registerProducer(self, True)

    def data(self, payload: bytes) -> None:
        self.outstanding += len(payload)
        self.received += len(payload)
        if self.outstanding > self.overrun:
            raise wire.WireError(f"peer overran the window of stream {self.stream}")
        if self.overrun == MAX_OVERRUN:  # the stream carries data: widen its window
            self.overrun = STREAM_WINDOW + wire.MAX_FRAME
            self.channel.send(wire.Window(self.stream, STREAM_WINDOW - WINDOW))
        if self.sink is not None:
            self.sink.write(payload)
        self._maybe_grant()

    def end(self) -> None:
        self.eof = True
        if self.sink is not None:
            self.sink.unregisterProducer()
            if self.close_on_eof:
                self.sink.loseConnection()
            self.sink = None

    def drop_sink(self) -> None:
        """The sink went away (its reader closed): discard what still comes."""
        self.sink = None
        self.held = False
        self._maybe_grant()

    def _maybe_grant(self) -> None:
        if not self.held and self.outstanding >= GRANT_STEP:
            self.channel.send(wire.Window(self.stream, self.outstanding))
            self.outstanding = 0

    # IPushProducer, called by the sink
    def pauseProducing(self) -> None:
        self.held = True

    def resumeProducing(self) -> None:
        self.held = False
        if self.outstanding:
            self.channel.send(wire.Window(self.stream, self.outstanding))
            self.outstanding = 0

    def stopProducing(self) -> None:
        self.drop_sink()


@implementer(interfaces.IPushProducer, interfaces.IHandshakeListener)
class Channel(Protocol):
    """A framed, authenticated link to the peer of a job; subclasses handle control frames.

    No frame is accepted or sent before the TLS handshake completes and the peer's
    certificate shows the expected role of the same application.
    """

    credential: Credential
    revoked: Revocations | None = None  # set by subclasses that check revocation

    def __init__(self, credential: Credential) -> None:
        self.credential = credential
        self.decoder = wire.FrameDecoder()
        self.outs: dict[int, OutStream] = {}
        self.ins: dict[int, InStream] = {}
        self.peer_cert: Any = None
        self.verified = False
        self.congested = False
        self.closed = False
        self.heartbeat: Heartbeat | None = None
        self.files: Any = None  # a rexnet.net.files.FileLane when the job sends files
        self.on_apart: Callable[[wire.Apart], None] | None = None  # the job's handovers

    # -- TLS --------------------------------------------------------------------------

    def connectionMade(self) -> None:
        tune_connection(self.transport)  # TCP_NODELAY: no frame waits for a delayed ACK
        bulk_writes(self.transport)  # TLS records written 256 KiB at a time, not 16 KiB
        self.transport.registerProducer(self, True)  # type: ignore[union-attr]

    def handshakeCompleted(self) -> None:
        peer = self.transport.getPeerCertificate()  # type: ignore[union-attr]
        cert, problem = check_peer(peer, self.credential, self.revoked)
        if problem:
            self.refused(problem)
            self.transport.abortConnection()  # type: ignore[union-attr]
            return
        self.peer_cert = cert
        self.verified = True
        self.peerVerified()

    def peer_address(self) -> str:
        peer = self.transport.getPeer()  # type: ignore[union-attr]
        return f"{getattr(peer, 'host', '?')}:{getattr(peer, 'port', '?')}"

    # -- frames -----------------------------------------------------------------------

    def send(self, frame: wire.Frame) -> None:
        if not self.closed:
            if self.heartbeat is not None:
                self.heartbeat.sent()
            self.transport.write(wire.encode_frame(frame))  # type: ignore[union-attr]

    def send_data(self, stream: int, data: bytes) -> None:
        """DATA frames of at most MAX_DATA_CHUNK bytes carrying DATA, written to the
        transport at once: one copy of the bytes (the frames joined) and one pass through
        TLS, where a frame at a time sliced, framed and encrypted each piece apart.
        A subclass that routes frames itself (overrides `send`: a detached job's
        OutputLog) gets them as frames, through `send`."""
        chunk = wire.MAX_DATA_CHUNK
        if type(self).send is not Channel.send:
            for start in range(0, len(data), chunk):
                self.send(wire.Data(stream, data[start : start + chunk]))
            return
        if self.closed or not data:
            return
        if self.heartbeat is not None:
            self.heartbeat.sent()
        header = wire.FRAME_HEADER.pack
        kind = wire.FrameKind.DATA
        with memoryview(data) as view:
            parts: list[bytes | memoryview] = []
            for start in range(0, len(data), chunk):
                piece = view[start : start + chunk]
                parts += (header(kind, stream, len(piece)), piece)
            self.transport.write(b"".join(parts))  # type: ignore[union-attr]

    def start_heartbeat(self, clock: IReactorTime) -> None:
        """Ping the peer when idle; give up on a silent peer (rexnet.net.heartbeat)."""
        if self.heartbeat is None:
            self.heartbeat = Heartbeat(clock, lambda: self.send(wire.Ping()), self._peer_silent)
        self.heartbeat.start()

    def _peer_silent(self, seconds: float) -> None:
        log.warn("peer {peer} silent for {s:.0f} s: connection considered lost",
                 peer=self.peer_address(), s=seconds)
        self.close(abort=True)

    def dataReceived(self, data: bytes) -> None:
        if not self.verified:
            self.protocolError("data before the peer was verified")
            return
        if self.heartbeat is not None:
            self.heartbeat.heard()
        try:
            for frame in self.decoder.feed(data):
                if self.closed:
                    return
                self.frameReceived(frame)
        except wire.WireError as e:
            self.protocolError(str(e))

    def frameReceived(self, frame: wire.Frame) -> None:
        if isinstance(frame, wire.Data):
            stream = self.ins.get(frame.stream)
            if stream is None or stream.eof:
                raise wire.WireError(f"data on stream {frame.stream}, which is not open")
            stream.data(frame.payload)
        elif isinstance(frame, wire.Window):
            out = self.outs.get(frame.stream)
            if out is not None:
                out.grant(frame.credit)
        elif isinstance(frame, wire.Eof):
            inbound = self.ins.get(frame.stream)
            if inbound is not None:
                inbound.end()
        elif isinstance(frame, wire.Shut):
            out = self.outs.get(frame.stream)
            if out is not None:
                out.stop()
        elif isinstance(frame, wire.Apart):
            if self.on_apart is None:
                raise wire.WireError("APART for a stream that was not offered apart")
            self.on_apart(frame)
        elif isinstance(frame, wire.PutFile | wire.FileData | wire.FileWindow):
            if self.files is None:
                raise wire.WireError(f"unexpected {type(frame).__name__} frame")
            self.files.frame(frame)
        elif not isinstance(frame, wire.Ping):
            self.controlReceived(frame)

    def protocolError(self, problem: str) -> None:
        log.warn("protocol error from {peer}: {problem}", peer=self.peer_address(),
                 problem=problem)
        if self.verified:  # nothing is sent to a peer that is not authenticated
            self.send(wire.Error("protocol", problem[:200]))
        self.close(abort=True)

    def close(self, abort: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        if abort:
            self.transport.abortConnection()  # type: ignore[union-attr]
        else:
            # TLS shuts down only once no producer is registered: without this the
            # connection (and its descriptor) stayed open until the peer process exited
            self.transport.unregisterProducer()  # type: ignore[union-attr]
            self.transport.loseConnection()  # type: ignore[union-attr]

    # -- congestion of the TLS link (IPushProducer, called by the transport) ------------

    def pauseProducing(self) -> None:
        self.congested = True
        for out in self.outs.values():
            out._update()

    def resumeProducing(self) -> None:
        self.congested = False
        for out in list(self.outs.values()):
            out._update()
        if self.files is not None:
            self.files.resume()

    def stopProducing(self) -> None:
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.closed = True
        if self.heartbeat is not None:
            self.heartbeat.stop()
        self.lost(reason)

    # -- for subclasses -------------------------------------------------------------

    def refused(self, problem: str) -> None:
        """The peer failed the identity check (logged by the subclass as a complaint)."""

    def peerVerified(self) -> None:
        """Both sides are authenticated: job frames may flow."""

    def controlReceived(self, frame: wire.Frame) -> None:
        raise wire.WireError(f"unexpected {type(frame).__name__} frame")

    def lost(self, reason: Failure) -> None:
        """The connection is gone."""
