"""rexnet-tunnel: joins the announce domains of sites over mutually authenticated TLS links.

Each site runs one tunnel process holding all of that site's links (one --listen and any
number of --connect). Datagrams of the application heard in the local groups go out on
every link; datagrams from a link are emitted into the local groups and flooded to the
other links. A cache of datagram digests drops anything seen before, so any topology (a
chain, a ring) delivers each datagram to each site once, without loops. Emitted
announcements carry a tunnel trailer (wire.with_relay port 0), replacing any other: workers
connect back to the address the client signed, so the sites must route unicast to each
other.

A tunnel carries only what it can check (rexnet.net.relaycheck): datagrams of its
application signed by a valid, unrevoked credential of the right role, fresh, within the
rate limits of their source (a local address or a link) and of all sources together.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from twisted.application.service import Service
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from rexnet.net.alerts import CRAT_PORT
from rexnet.net.announce import DatagramReceiver, RateLimiter
from rexnet.net.certcheck import CertChecker, Rejected
from rexnet.net.complaints import Complaints
from rexnet.net.datalink import DatagramLink
from rexnet.net.relaycheck import GLOBAL_BURST, GLOBAL_RATE, RelayVerifier
from rexnet.protocol import relaytrailer, wire
from rexnet.security.credentials import CertInfo, Credential
from rexnet.security.tls import Revocations

SEEN = 20_000

log = Logger()


def digest(dgram: wire.Datagram) -> bytes:
    return hashlib.sha256(dgram.signed_part + dgram.signature).digest()[:16]


class Tunnel:
    """Floods one application's datagrams between the local groups and the links."""

    def accepts(self, info: CertInfo) -> bool:
        """Tunnel peers hold a credential of the same application (relay, worker or
        client)."""
        return info.app == self.credential.app and info.role in ("relay", "worker", "client")

    def __init__(self, reactor: Any, credential: Credential,
                 groups: Sequence[tuple[str, int]], revoked: Revocations | None = None
                 ) -> None:
        self.reactor = reactor
        self.credential = credential
        self.groups = list(groups)
        self.revoked = revoked
        self.links: set[DatagramLink] = set()
        self.seen: OrderedDict[bytes, None] = OrderedDict()
        self.verifier = RelayVerifier(CertChecker([credential.ca_cert], revoked))
        self.limiter = RateLimiter()
        self.all_sources = RateLimiter(GLOBAL_RATE, GLOBAL_BURST, 1)
        self.complain = Complaints(reactor.seconds, who="tunnel")
        self.emitted = 0
        self.carried = 0
        self.dropped = 0
        self.send_local: Any = None  # set by the service: send(data, target)

    def _first_time(self, data: bytes, source: str) -> wire.Datagram | None:
        """The datagram if it is ours, checked, and new; None (counted, complained about
        when it claims to be ours) if not."""
        now = self.reactor.seconds()
        if wire.peek_app_id(data) != self.credential.app_id:
            return None
        if not self.limiter.allow(source, now) or not self.all_sources.allow("", now):
            self.dropped += 1
            return None
        try:
            dgram, _ = relaytrailer.decode_relayed(data)  # any trailer is dropped below
            key = digest(dgram)
            if key in self.seen:
                return None
            self.verifier.check(dgram)
        except (Rejected, wire.WireError) as e:
            self.dropped += 1
            self.complain(source, str(e))
            return None
        self.seen[key] = None
        if len(self.seen) > SEEN:
            self.seen.popitem(last=False)
        return dgram

    def from_group(self, data: bytes, host: str, port: int) -> None:
        """Heard locally: carry it to every other site (unless it came from one)."""
        dgram = self._first_time(data, host)
        if dgram is not None:
            bare = dgram.signed_part + dgram.signature
            for link in list(self.links):
                link.send(bare)
                self.carried += 1

    def from_link(self, origin: DatagramLink, data: bytes) -> None:
        """From another site: emit it here, and pass it on to the remaining links."""
        dgram = self._first_time(data, f"link {origin.peer}")
        if dgram is None:
            return
        local = wire.with_relay(dgram, 0)  # whatever trailer it had: connect to the client
        kind = dgram.message.KIND
        for host, port in self.groups:
            self.send_local(local, (host, CRAT_PORT if kind == wire.Kind.ALERT else port))
            self.emitted += 1
        bare = dgram.signed_part + dgram.signature
        for link in list(self.links):
            if link is not origin:
                link.send(bare)


class TunnelGroups(Service):
    """Listens on the local groups (and their crat port) and emits into them."""

    def __init__(self, tunnel: Tunnel) -> None:
        self.tunnel = tunnel
        self.ports: list[Any] = []

    def startService(self) -> None:
        super().startService()
        reactor = self.tunnel.reactor
        ports = sorted({port for _, port in self.tunnel.groups} | {CRAT_PORT})
        for port in ports:
            listening = reactor.listenMulticast(port, DatagramReceiver(self.tunnel.from_group),
                                                listenMultiple=True)
            listening.setBroadcastAllowed(True)
            for group, _ in self.tunnel.groups:
                if ipaddress.ip_address(group).is_multicast:
                    listening.joinGroup(group)
            self.ports.append(listening)
        sender = self.ports[0]

        def send(data: bytes, target: tuple[str, int]) -> None:
            try:
                sender.write(data, target)
            except OSError as e:
                log.warn("cannot emit to {t[0]}:{t[1]}: {e}", t=target, e=e.strerror)

        self.tunnel.send_local = send
        log.info("tunnel for {app} on groups {groups}", app=self.tunnel.credential.app,
                 groups=", ".join(f"{h}:{p}" for h, p in self.tunnel.groups))

    def stopService(self) -> Any:
        super().stopService()
        for port in self.ports:
            port.stopListening()
        for link in list(self.tunnel.links):
            link.transport.abortConnection()  # type: ignore[union-attr]


def link_factory(tunnel: Tunnel) -> Factory[DatagramLink]:
    return DatagramLink.factory_for(tunnel)
