"""A client job's connect-back port (ConnectBackFactory) and its TAKENs (Takens).

A TAKEN goes to the announce targets twice.  The early one leaves as soon as the first
connect-back is accepted, before its TLS handshake: the crowd hears within a TCP
handshake of the first connect-back rather than a TLS handshake later, which is what
keeps 1,000 workers near one connect-back per job (benchmarks/scale.py).  Every
millisecond from the accept to that TAKEN widens each worker's connect-back window (and
so the start time) at scale, so it leaves from the port's buildProtocol, before the
connection's TLS layer is built (in a fresh client process its first build costs a
millisecond or more), already signed: Takens.prepare signs it as the job is announced.
Workers cancel on it only the connect-backs they have not begun.  The final one leaves
when a worker is verified, for every job id the job was announced under.

Anyone who can open a TCP connection to the port could send the early TAKEN off, and so
cancel the honest workers' connect-backs.  That is bounded: one early TAKEN per job; if
its connection is lost before it is verified, or is not verified within EARLY_GRACE, the
job is announced again at once under a new job id (which every worker answers afresh),
and from then on TAKEN waits for a verified worker.  Such a connection delays a job by
at most EARLY_GRACE and costs it the connect-backs of a job without the early TAKEN.

The final TAKEN's count is what the crowd sizes its connect-back window from (rexnet.worker
.load.Crowd.steer), so it counts every connect-back that reached the port: those accepted
and those still in the kernel's accept queue (waiting()).  The port's backlog (BACKLOG)
holds a first job's storm, where Twisted's default of 50 dropped the rest of 1,000 SYNs
and told the crowd it was a tenth of its size.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from rexnet.client.channel import ChannelEvents, ClientChannel
from rexnet.net.datalink import Refused
from rexnet.protocol import wire
from rexnet.security.credentials import Credential
from rexnet.security.tls import Revocations

MAX_HANDSHAKES = 32  # connect-backs of one job in their TLS handshake at once
PER_SOURCE = 4  # ... from one address
BACKLOG = 4096  # connect-backs the kernel completes before we accept them (rexnet.worker.load
# .CROWD_MAX: as many as a TAKEN can make a worker believe; the kernel caps it at
# net.core.somaxconn, 4096 by default since Linux 5.4, 128 before)
EARLY_GRACE = 0.5  # seconds the early TAKEN's connection has to be verified
PREPARED_FOR = 5.0  # seconds a pre-signed early TAKEN is used (its timestamp must be fresh)


def waiting(port: Any) -> int:
    """Connections in the accept queue of the listening PORT (Linux TCP_INFO of a
    listening socket: tcpi_unacked; 0 where that cannot be read), at most BACKLOG."""
    try:
        info = port.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 32)
        return min(max(struct.unpack_from("I", info, 24)[0], 0), BACKLOG)
    except (AttributeError, OSError, struct.error):
        return 0


class Core(Protocol):
    """What the port needs of its job (rexnet.client.jobcore.JobCore)."""

    channels: set[ClientChannel]
    answered: int
    log: Logger
    events: ChannelEvents
    credential: Credential
    reactor: Any
    revoked: Revocations | None

    def accepted(self, channel: ClientChannel) -> None:
        """A connect-back is accepted, its TLS layer not yet built (the early TAKEN)."""


class ConnectBackFactory(Factory):
    """The job's connect-back port: a ClientChannel per connection, but at most
    MAX_HANDSHAKES unauthenticated connections at once (PER_SOURCE from one address), so a
    flood of silent connections cannot exhaust the client's descriptors or memory while
    real workers still get through."""

    noisy = False

    def __init__(self, core: Core) -> None:
        self.core = core
        self.refused = 0

    def buildProtocol(self, addr: Any) -> ClientChannel | Refused:  # type: ignore[override]
        core = self.core
        host = getattr(addr, "host", "?")
        pending = [c for c in core.channels if not c.verified]
        if (len(pending) >= MAX_HANDSHAKES
                or sum(c.peer_address().rsplit(":", 1)[0] == host for c in pending)
                >= PER_SOURCE):
            self.refused += 1
            core.answered += 1  # a worker answered all the same: TAKEN tells the crowd's size
            if self.refused == 1:  # once per job: the flood itself is not logged per packet
                core.log.warn("complaint: connect-backs from {host} refused: too many "
                              "connections still in their TLS handshake", host=host)
            return Refused()
        channel = ClientChannel(core.events, core.credential, core.reactor, core.revoked)
        channel.factory = self
        core.accepted(channel)
        return channel


class Takens:
    """A job's TAKENs (see the module's docstring): SEND(data) puts a datagram on the
    announce targets; REOPEN(why) announces the job again under a new job id."""

    def __init__(self, reactor: Any, credential: Credential, now: Callable[[], int],
                 send: Callable[[bytes], None], reopen: Callable[[str], None]) -> None:
        self.reactor = reactor
        self.credential = credential
        self.now = now
        self.send = send
        self.reopen = reopen
        self.early: ClientChannel | None = None  # the connection the early TAKEN was for
        self._grace: IDelayedCall | None = None
        # the early TAKEN signed ahead: (job id, answered, when signed, datagram)
        self._prepared: tuple[bytes, int, float, bytes] | None = None

    def _encode(self, job_id: bytes, answered: int, early: bool) -> bytes:
        return wire.encode_datagram(wire.Taken(job_id, self.now(), answered, early),
                                    self.credential.app_id, self.credential.key)

    def _taken(self, job_id: bytes, answered: int, early: bool = False) -> None:
        self.send(self._encode(job_id, answered, early))

    def prepare(self, job_id: bytes, answered: int) -> None:
        """Sign the early TAKEN of JOB_ID ahead (the job was just announced), for when the
        first connect-back is accepted with ANSWERED connect-backs counted."""
        if self.early is None:
            self._prepared = (job_id, answered, self.reactor.seconds(),
                              self._encode(job_id, answered, True))

    def accepted(self, channel: ClientChannel, job_id: bytes, answered: int) -> None:
        """A connect-back is accepted (its TLS handshake not begun): the first of the job
        sends the early TAKEN (the prepared one if it still fits), and has EARLY_GRACE to
        be verified."""
        if self.early is not None:
            return
        self.early = channel
        prepared, self._prepared = self._prepared, None
        if (prepared is not None and prepared[:2] == (job_id, answered)
                and self.reactor.seconds() - prepared[2] < PREPARED_FOR):
            self.send(prepared[3])
        else:
            self._taken(job_id, answered, early=True)
        self._grace = self.reactor.callLater(EARLY_GRACE, self._expired)

    def _expired(self) -> None:
        self._grace = None
        self.reopen(f"the first connection ({self.early.peer_address() if self.early else '?'})"
                    f" was not verified within {EARLY_GRACE * 1000:.0f} ms")

    def lost(self, channel: ClientChannel) -> None:
        """CHANNEL's connection is gone: if it was the early TAKEN's, unverified, reopen."""
        if channel is self.early and self.stop():
            self.reopen(f"the first connection ({channel.peer_address()}) was lost before "
                        "it was verified")

    def chosen(self, job_ids: list[bytes], answered: int) -> None:
        """A worker is verified: the final TAKEN, for every job id announced."""
        self.stop()
        for job_id in job_ids:
            self._taken(job_id, answered)

    def stop(self) -> bool:
        """No reopening from now on; whether the grace was still running."""
        running = self._grace is not None and self._grace.active()
        if running:
            self._grace.cancel()  # type: ignore[union-attr]
        self._grace = None
        return running
