"""A TLS link carrying datagrams between two rexnet processes (tunnels, registrations).

Frames are wire frames: DATA (stream 0) holds one datagram, PING keeps the link alive.
The owner decides which peers it accepts (by the certificate's app and role) and what to
do with datagrams; the TLS options ensure the peer's certificate chains to the CA; the
link checks that it is valid and not in the owner's revocation list, at the handshake
and again at every ping.  A peer that has not finished its TLS handshake within
HANDSHAKE_TIMEOUT is dropped, and a listener takes at most PER_SOURCE connections from
one address (and MAX_UNVERIFIED not yet verified in all).
"""

from __future__ import annotations

from collections import Counter
from typing import Any
from typing import Protocol as TypingProtocol

from cryptography import x509
from twisted.internet import interfaces
from twisted.internet.interfaces import IAddress, IDelayedCall
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from rexnet.net.heartbeat import Heartbeat
from rexnet.net.tuning import tune_connection
from rexnet.protocol import wire
from rexnet.security.credentials import CertInfo, check_validity
from rexnet.security.tls import Revocations

HANDSHAKE_TIMEOUT = 10.0
PER_SOURCE = 8  # connections a listener takes from one address at once
MAX_UNVERIFIED = 256  # connections still in their handshake, all sources together
RECHECK = 1.0  # seconds between re-checks of the peer's certificate (expiry, revocation)

log = Logger()


class LinkOwner(TypingProtocol):
    reactor: Any
    links: set[DatagramLink]
    revoked: Revocations | None

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
        self.heartbeat: Heartbeat | None = None
        self.peer_cert: x509.Certificate | None = None
        self._checked = 0.0
        self._deadline: IDelayedCall | None = None
        self.on_lost: Any = None  # set by a guarding factory: called once, when lost

    def connectionMade(self) -> None:
        tune_connection(self.transport)
        address: Any = self.transport.getPeer()  # type: ignore[union-attr]
        self.peer = f"{getattr(address, 'host', '?')}:{getattr(address, 'port', '?')}"
        self._deadline = self.owner.reactor.callLater(HANDSHAKE_TIMEOUT, self._too_slow)

    def _too_slow(self) -> None:
        self._deadline = None
        log.warn("complaint: link peer {peer} did not complete its TLS handshake in {s:g} s: "
                 "dropped", peer=self.peer, s=HANDSHAKE_TIMEOUT)
        self.transport.abortConnection()  # type: ignore[union-attr]

    def _refusal(self, info: CertInfo | None) -> str | None:
        """Why the peer is refused now (or None): role and app, validity, revocation."""
        if info is None or self.peer_cert is None:
            return "no certificate"
        if not self.owner.accepts(info):
            return f"{info} is not accepted here"
        problem = check_validity(self.peer_cert)
        if problem:
            return f"its certificate {problem}"
        revoked = self.owner.revoked
        return revoked.reason(self.peer_cert) if revoked is not None else None

    def _still_trusted(self) -> bool:
        """Re-check the peer's certificate (at most every RECHECK seconds, while the link
        is busy or quiet alike); drop the link with a complaint if it is no longer good."""
        now = self.owner.reactor.seconds()
        if now - self._checked < RECHECK or self.peer_cert is None:
            return True
        self._checked = now
        why = self._refusal(CertInfo.of(self.peer_cert))
        if why is None:
            return True
        log.warn("complaint: link peer {peer} dropped: {why}", peer=self.peer, why=why)
        self.transport.abortConnection()  # type: ignore[union-attr]
        return False

    def handshakeCompleted(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None
        transport: Any = self.transport
        cert = transport.getPeerCertificate()
        self.peer_cert = cert.to_cryptography() if cert is not None else None
        info = CertInfo.of(self.peer_cert) if self.peer_cert is not None else None
        why = self._refusal(info)
        if why is not None:
            log.warn("complaint: link peer {peer} refused: {why}", peer=self.peer, why=why)
            transport.abortConnection()
            return
        assert info is not None
        self.verified = True
        self.heartbeat = Heartbeat(self.owner.reactor, self._ping, self._silent)
        self.heartbeat.start()
        self.owner.links.add(self)
        log.info("link up with {peer} ({name})", peer=self.peer, name=info.name)

    def _ping(self) -> None:
        if self._still_trusted():
            self.transport.write(wire.encode_frame(wire.Ping()))  # type: ignore[union-attr]

    def _silent(self, seconds: float) -> None:
        log.warn("link peer {peer} silent: dropping the link", peer=self.peer)
        self.transport.abortConnection()  # type: ignore[union-attr]

    def send(self, data: bytes) -> None:
        if self.heartbeat is not None:
            self.heartbeat.sent()
        self.transport.write(wire.encode_frame(wire.Data(0, data)))  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        if not self.verified:
            self.transport.abortConnection()  # type: ignore[union-attr]
            return
        if self.heartbeat is not None:
            self.heartbeat.heard()
        if not self._still_trusted():
            return
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
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        if self.on_lost is not None:
            self.on_lost, lost = None, self.on_lost
            lost(self)
        if self.heartbeat is not None:
            self.heartbeat.stop()
        if self in self.owner.links:
            self.owner.links.discard(self)
            log.info("link with {peer} down", peer=self.peer)

    @classmethod
    def factory_for(cls, owner: LinkOwner) -> Factory[DatagramLink]:
        """For connecting (and for listeners: GuardedFactory caps them too)."""
        return GuardedFactory(owner, cls)


class Refused(Protocol):
    """A connection over a listener's cap: closed as soon as it is made (returning None
    from buildProtocol would not do under TLS: the TLS wrapper keeps the connection)."""

    def connectionMade(self) -> None:
        self.transport.abortConnection()  # type: ignore[union-attr]


class GuardedFactory(Factory[DatagramLink]):
    """Builds links, taking at most PER_SOURCE connections from one address and
    MAX_UNVERIFIED still unverified; connections beyond are closed at once."""

    noisy = False

    def __init__(self, owner: LinkOwner, link: type[DatagramLink] = DatagramLink,
                 per_source: int = PER_SOURCE, unverified: int = MAX_UNVERIFIED) -> None:
        self.owner = owner
        self.link = link
        self.per_source = per_source
        self.unverified = unverified
        self.sources: Counter[str] = Counter()
        self.live: set[DatagramLink] = set()
        self.refused = 0
        self._complained = -1e18

    def buildProtocol(self, addr: IAddress | None) -> DatagramLink | Refused:  # type: ignore[override]
        host = str(getattr(addr, "host", "?"))
        waiting = sum(1 for link in self.live if not link.verified)
        if self.sources[host] >= self.per_source or waiting >= self.unverified:
            self.refused += 1
            now = self.owner.reactor.seconds()
            if now - self._complained >= 1.0:
                self._complained = now
                log.warn("complaint: link connection from {host} refused: {n} from it already "
                         "({refused} refused so far)", host=host, n=self.sources[host],
                         refused=self.refused)
            return Refused()
        link = self.link(self.owner)
        link.factory = self
        self.sources[host] += 1
        self.live.add(link)

        def lost(gone: DatagramLink) -> None:
            self.live.discard(gone)
            self.sources[host] -= 1
            if self.sources[host] <= 0:
                del self.sources[host]

        link.on_lost = lost
        return link
