"""Workers behind NAT: an outbound, mutually authenticated link to a cproxy (as HTCondor's
CCB). The cproxy sends the announcements it relays down the link; the worker connects back
through the cproxy's relay port, outbound again, so nothing needs to reach it from outside.

The cproxy side holds a client credential of the application (its identity is checked by
the worker like a client's); the worker presents its worker credential.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger

from rexnet.net.datalink import DatagramLink
from rexnet.security.credentials import CertInfo, Credential

log = Logger()


class WorkerRegistration:
    """The worker's end: datagrams from the cproxy are handled as if heard locally."""

    def __init__(self, reactor: Any, credential: Credential, deliver: Any) -> None:
        self.reactor = reactor
        self.credential = credential
        self.deliver = deliver  # worker.datagram(data, host, port)
        self.links: set[DatagramLink] = set()

    def accepts(self, info: CertInfo) -> bool:
        return info.app == self.credential.app and info.role == "client"

    def from_link(self, origin: DatagramLink, data: bytes) -> None:
        host, _, port = origin.peer.rpartition(":")
        self.deliver(data, host, int(port) if port.isdigit() else 0)


class RegisteredWorkers:
    """The cproxy's end: the links of the workers registered with it."""

    def __init__(self, reactor: Any, credential: Credential) -> None:
        self.reactor = reactor
        self.credential = credential
        self.links: set[DatagramLink] = set()

    def accepts(self, info: CertInfo) -> bool:
        return info.app == self.credential.app and info.role == "worker"

    def from_link(self, origin: DatagramLink, data: bytes) -> None:
        """Workers send nothing down their registration."""

    def send(self, data: bytes) -> None:
        for link in list(self.links):
            link.send(data)
