"""A TLS link carrying datagrams between two rexnet processes (tunnels, registrations).

Frames are wire frames: DATA (stream 0) holds one datagram, PING keeps the link alive.
The owner decides which peers it accepts (by the certificate's app and role) and what to
do with datagrams; the TLS options ensure the peer's certificate chains to the CA.
"""

from __future__ import annotations

from typing import Any
from typing import Protocol as TypingProtocol

from twisted.internet import interfaces
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from rexnet.net.tuning import tune_connection
from rexnet.protocol import wire
from rexnet.security.credentials import CertInfo

PING_INTERVAL = 1.0
DEAD_AFTER = 5.0

log = Logger()


class LinkOwner(TypingProtocol):
    reactor: Any
    links: set[DatagramLink]

    def accepts(self, info: CertInfo) -> bool: ...

    def from_link(self, origin: DatagramLink, data: bytes) -> None: ...


@implementer(interfaces.IHandshakeListener)
class DatagramLink(Protocol):
    """A TLS link that carries datagrams as DATA frames (tunnels, worker registration)."""

    def __init__(self, owner: LinkOwner) -> None:
        self.owner = owner
        self.decoder = wire.FrameDecoder()
        self.verified = False
        self.peer = "?"
        self._beat: LoopingCall | None = None
        self._heard = 0.0

    def connectionMade(self) -> None:
        tune_connection(self.transport)

    def handshakeCompleted(self) -> None:
        transport: Any = self.transport
        cert = transport.getPeerCertificate()
        info = CertInfo.of(cert.to_cryptography()) if cert is not None else None
        address = transport.getPeer()
        self.peer = f"{address.host}:{address.port}"
        if info is None or not self.owner.accepts(info):
            log.warn("complaint: link peer {peer} refused: {who} is not accepted here",
                     peer=self.peer, who=info)
            transport.abortConnection()
            return
        self.verified = True
        self._heard = self.owner.reactor.seconds()
        self._beat = LoopingCall(self._ping)
        self._beat.clock = self.owner.reactor
        self._beat.start(PING_INTERVAL, now=False)
        self.owner.links.add(self)
        log.info("link up with {peer} ({name})", peer=self.peer, name=info.name)

    def _ping(self) -> None:
        if self.owner.reactor.seconds() - self._heard > DEAD_AFTER:
            log.warn("link peer {peer} silent: dropping the link", peer=self.peer)
            self.transport.abortConnection()  # type: ignore[union-attr]
        else:
            self.transport.write(wire.encode_frame(wire.Ping()))  # type: ignore[union-attr]

    def send(self, data: bytes) -> None:
        self.transport.write(wire.encode_frame(wire.Data(0, data)))  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        if not self.verified:
            self.transport.abortConnection()  # type: ignore[union-attr]
            return
        self._heard = self.owner.reactor.seconds()
        try:
            frames = self.decoder.feed(data)
        except wire.WireError as e:
            log.warn("complaint: bad frame from link peer {peer}: {e}", peer=self.peer, e=e)
            self.transport.abortConnection()  # type: ignore[union-attr]
            return
        for frame in frames:
            if isinstance(frame, wire.Data) and len(frame.payload) <= wire.MAX_DATAGRAM:
                self.owner.from_link(self, frame.payload)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._beat is not None and self._beat.running:
            self._beat.stop()
        if self in self.owner.links:
            self.owner.links.discard(self)
            log.info("link with {peer} down", peer=self.peer)

    @classmethod
    def factory_for(cls, owner: LinkOwner) -> Factory[DatagramLink]:
        made = Factory.forProtocol(lambda: cls(owner))
        made.noisy = False
        return made
