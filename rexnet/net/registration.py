"""Workers behind NAT: an outbound, mutually authenticated link to a cproxy (as HTCondor's
CCB). The cproxy sends the announcements it relays down the link; the worker connects back
through the cproxy's relay port, outbound again, so nothing needs to reach it from outside.

The cproxy side holds a relay credential of the application (``rexnet keygen --issue
relay``: it can sign relay trailers, never run a job or take one); the worker presents its
worker credential. Each side refuses a peer whose certificate is expired or revoked, at
the handshake and while the link lasts (rexnet.net.datalink).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.logger import Logger

from rexnet.net.datalink import DatagramLink
from rexnet.security.credentials import CertInfo, Credential
from rexnet.security.tls import Revocations, connecting_options

log = Logger()


def registration_options(credential: Credential) -> IOpenSSLClientConnectionCreator:
    """The worker's TLS options for its link to a cproxy: the peer must be a relay."""
    return connecting_options(credential, "relay")


class WorkerRegistration:
    """The worker's end: datagrams from the cproxy are handled as if heard locally."""

    def __init__(self, reactor: Any, credential: Credential, deliver: Any,
                 revoked: Revocations | None = None) -> None:
        self.reactor = reactor
        self.credential = credential
        self.deliver = deliver  # worker.datagram(data, host, port)
        self.revoked = revoked
        self.links: set[DatagramLink] = set()

    def accepts(self, info: CertInfo) -> bool:
        return info.app == self.credential.app and info.role == "relay"

    def from_link(self, origin: DatagramLink, data: bytes) -> None:
        host, _, port = origin.peer.rpartition(":")
        self.deliver(data, host, int(port) if port.isdigit() else 0)


class RegisteredWorkers:
    """The cproxy's end: the links of the workers registered with it."""

    def __init__(self, reactor: Any, credential: Credential,
                 revoked: Revocations | None = None) -> None:
        self.reactor = reactor
        self.credential = credential
        self.revoked = revoked
        self.links: set[DatagramLink] = set()

    def accepts(self, info: CertInfo) -> bool:
        return info.app == self.credential.app and info.role == "worker"

    def from_link(self, origin: DatagramLink, data: bytes) -> None:
        """Workers send nothing down their registration."""

    def send(self, data: bytes) -> None:
        for link in list(self.links):
            link.send(data)

    def send_each(self, build: Callable[[str], bytes]) -> None:
        """Send each link BUILD(our address on that link): what a signed trailer names."""
        for link in list(self.links):
            link.send(build(link.transport.getHost().host))  # type: ignore[union-attr]
