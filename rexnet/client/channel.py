"""The client's end of a job channel (the TLS server side of the connect-back): a thin
adapter that turns the connection's events and control frames into calls on its owner
(ChannelEvents: a job's state machine, or the warm pool while the channel is idle)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Protocol

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

from rexnet.net.channel import Channel
from rexnet.protocol import wire
from rexnet.security.credentials import Credential
from rexnet.security.tls import VERIFY_ERROR, Revocations

HANDSHAKE_TIMEOUT = 10.0


class ChannelEvents(Protocol):
    """What a ClientChannel tells its owner."""

    def connected(self, channel: ClientChannel) -> None:
        """A worker connected back (TLS handshake under way)."""

    def verified(self, channel: ClientChannel) -> None:
        """Both sides are authenticated."""

    def refused(self, channel: ClientChannel, problem: str) -> None:
        """The peer failed authentication (or never finished its handshake)."""

    def hello(self, channel: ClientChannel, hello: wire.Hello) -> None:
        """The worker reported its load (channel.hello and channel.heard_at are set)."""

    def started(self, channel: ClientChannel, started: wire.Started) -> None:
        """STARTED: the job runs."""

    def exited(self, channel: ClientChannel, exit: wire.Exit) -> None:
        """EXIT: the job ended with this status."""

    def error(self, channel: ClientChannel, error: wire.Error) -> None:
        """ERROR from the worker."""

    def busy(self, channel: ClientChannel) -> None:
        """BUSY: the worker has no free slot for the job after all."""

    def queued(self, channel: ClientChannel, queued: wire.Queued) -> None:
        """QUEUED: every slot is busy; the job waits in the worker's queue."""

    def unexpected(self, channel: ClientChannel, frame: wire.Frame) -> None:
        """A control frame a worker has no business sending to a client."""

    def lost(self, channel: ClientChannel, problem: str) -> None:
        """The connection is gone; PROBLEM says why the TLS handshake failed if the peer
        was never verified, else it is empty."""


class ClientChannel(Channel):
    """The client's end of a job channel (the TLS server side)."""

    def __init__(self, events: ChannelEvents, credential: Credential, clock: IReactorTime,
                 revoked: Revocations | None = None) -> None:
        super().__init__(credential)
        self.events = events
        self.clock = clock
        self.revoked = revoked
        self.hello: wire.Hello | None = None
        self.heard_at = 0.0  # when the last HELLO came
        self._timer: IDelayedCall | None = None

    def attach(self, events: ChannelEvents) -> None:
        """From now on, tell EVENTS (the next job's machine, or a pool)."""
        self.events = events

    def connectionMade(self) -> None:
        super().connectionMade()
        self._timer = self.clock.callLater(HANDSHAKE_TIMEOUT, self._silent)
        self.events.connected(self)

    def _silent(self) -> None:
        self._timer = None
        if not self.verified:
            self.events.refused(self, "no TLS handshake in time")
            self.close(abort=True)

    def peerVerified(self) -> None:
        self._cancel_timer()
        self.events.verified(self)

    def refused(self, problem: str) -> None:
        self.events.refused(self, problem)

    def controlReceived(self, frame: wire.Frame) -> None:
        if isinstance(frame, wire.Hello):
            self.hello = frame
            self.heard_at = self.clock.seconds()
            self.events.hello(self, frame)
        elif isinstance(frame, wire.Started):
            self.events.started(self, frame)
        elif isinstance(frame, wire.Exit):
            self.events.exited(self, frame)
        elif isinstance(frame, wire.Error):
            self.events.error(self, frame)
        elif isinstance(frame, wire.Busy):
            self.events.busy(self)
        elif isinstance(frame, wire.Queued):
            self.events.queued(self, frame)
        else:
            self.events.unexpected(self, frame)

    def lost(self, reason: Failure) -> None:
        self._cancel_timer()
        problem = ""
        if not self.verified:
            why = getattr(self.transport, VERIFY_ERROR, None) or tls_reason(reason)
            problem = f"TLS handshake failed: {why}"
        self.events.lost(self, problem)

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def send_start(self, start: wire.Start, data: tuple[str, str] | None = None) -> None:
        """Send START (with DATA, the (data_streams, data_token) it offers), see
        start_bytes."""
        if self.closed:
            return
        encoded = start_bytes(start, data)
        if self.heartbeat is not None:
            self.heartbeat.sent()
        self.transport.write(encoded)  # type: ignore[union-attr]


STARTS_KEPT = 64
_encoded: dict[tuple[int, str], tuple[wire.Start, bytes, int]] = {}
"""By (id(frame), data_streams): the frame kept with its bytes and where a token goes."""
_TOKEN_KEY = b'"data_token":"'  # (a quote inside a JSON string is escaped: only the key)
_TOKEN_DIGITS = 64


def start_bytes(start: wire.Start, data: tuple[str, str] | None = None) -> bytes:
    """START's bytes, or with DATA = (data_streams, data_token) those of START offering
    them; encoded once per frame object (and data_streams) while it is among the last
    STARTS_KEPT (an Executor sends one request's frame for each of its jobs, the agent
    one for each launcher of the same command line): each job's own token is set into
    the bytes kept, which have a placeholder of its length (the frame's length stays)."""
    streams, token = data or ("", "")
    kept = _encoded.get((id(start), streams))
    if kept is None or kept[0] is not start:
        if len(_encoded) >= STARTS_KEPT:
            _encoded.clear()
        if not data:
            kept = (start, wire.encode_frame(start), -1)
        else:
            encoded = wire.encode_frame(replace(start, data_streams=streams,
                                                data_token="0" * _TOKEN_DIGITS))
            kept = (start, encoded, encoded.index(_TOKEN_KEY) + len(_TOKEN_KEY))
        _encoded[id(start), streams] = kept
    at = kept[2]
    if at < 0:
        return kept[1]
    if len(token) != _TOKEN_DIGITS:  # (not the length the worker takes: as it is)
        return wire.encode_frame(replace(start, data_streams=streams, data_token=token))
    return b"".join((kept[1][:at], token.encode(), kept[1][at + _TOKEN_DIGITS:]))


def tls_reason(reason: Failure) -> str:
    """A short reason from an OpenSSL error or a plain connection failure."""
    value: Any = reason.value
    errors = getattr(value, "args", ())
    if errors and isinstance(errors[0], list) and errors[0]:
        last = errors[0][-1]
        if isinstance(last, tuple) and len(last) == 3:
            return str(last[2])
    return reason.getErrorMessage()[:200]


class Later(Protocol):
    """The inputs the core itself gives its machine (rexnet.client.machine.JobInputs)."""

    def timed_out(self) -> None: ...

    def queue_timed_out(self) -> None: ...

    def unreachable(self) -> None: ...

    def reuse(self, channel: ClientChannel) -> None: ...

    def drained(self) -> None: ...
