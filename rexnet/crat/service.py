"""crat's UDP socket and the service that feeds its datagrams to a Crat."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable, Sequence
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.internet.interfaces import IListeningPort

from rexnet.crat.core import SUMMARY_INTERVAL, Crat, CratError, host_port
from rexnet.net.announce import DatagramReceiver
from rexnet.security.revocation import RevokedFile

RECEIVE_BUFFER = 4 << 20


def bind_udp(host: str, port: int) -> socket.socket:
    """A UDP socket bound to HOST:PORT, with a large receive buffer; CratError if not."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    with contextlib.suppress(OSError):  # room for a burst: a flood must not fill the queue
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise CratError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.setblocking(False)
    return sock


def revocation_in_force(lists: Sequence[RevokedFile]) -> str:
    """What the start-up line says of the revocation lists in force."""
    if not lists:
        return "no revocation list (give --revoked APP.revoked)"
    return "revocation lists: " + ", ".join(
        f"{revoked.path} ({len(revoked.current.serials)} revoked)" for revoked in lists)


class CratService(Service):
    """Feeds the datagrams of a bound UDP socket to a Crat; summarises drops."""

    def __init__(self, crat: Crat, sock: socket.socket, reactor: Any,
                 closing: Sequence[Callable[[], None]] = ()) -> None:
        self.crat = crat
        self.sock = sock
        self.reactor = reactor
        self.closing = list(closing)
        self.port: IListeningPort | None = None
        self.summary = task.LoopingCall(crat.tick)
        self.summary.clock = reactor

    def startService(self) -> None:
        super().startService()
        receiver = DatagramReceiver(self.crat.datagram)
        receiver.noisy = False
        self.port = self.reactor.adoptDatagramPort(self.sock.fileno(), self.sock.family,
                                                   receiver)
        host, port = self.sock.getsockname()[:2]
        self.sock.close()  # the reactor holds its own copy
        self.summary.start(SUMMARY_INTERVAL, now=False)
        apps = ", ".join(sorted(ca.app for ca in self.crat.trusted.values())) or "nothing"
        self.crat.log.info("crat listening on {address}, trusting {apps}; {revocation}",
                           address=host_port(host, port), apps=apps,
                           revocation=revocation_in_force(self.crat.revoked))

    def stopService(self) -> defer.Deferred[Any]:
        super().stopService()
        if self.summary.running:
            self.summary.stop()
        self.crat.tick()
        stopped = self.port.stopListening() if self.port is not None else None
        done: defer.Deferred[Any] = stopped if stopped is not None else defer.succeed(None)

        def close(result: object) -> object:
            for action in self.closing:
                action()
            return result

        return done.addBoth(close)
