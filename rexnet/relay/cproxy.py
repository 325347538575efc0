"""cproxy: carries announcements from one network to another and splices connect-backs.

A relay holds no credential and sees no job data: it re-emits each datagram unchanged
but for a trailer naming its own port (outside the signed part, see wire.with_relay),
and splices each TCP connection a worker makes to that port through to the client
(or to the previous relay of a chain). TLS stays end to end between worker and client.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IListeningPort
from twisted.logger import Logger
from twisted.protocols import portforward

from rexnet.net.addresses import local_addresses
from rexnet.net.alerts import CRAT_PORT
from rexnet.net.announce import DatagramReceiver, RateLimiter
from rexnet.protocol import wire

JOB_IDLE = 60.0  # seconds a job's relay port stays open after its last announcement
TAKEN_LINGER = 5.0  # ... and after its TAKEN
QUERY_IDLE = 10.0
MAX_ENTRIES = 1024
SEEN = 10_000

log = Logger()


@dataclass
class Entry:
    """A relay port for one job (TCP) or one status query (UDP)."""

    upstream: tuple[str, int]
    port: IListeningPort
    expiry: IDelayedCall | None = None
    taken: bool = False

    @property
    def number(self) -> int:
        """The port number the relay listens on for this entry."""
        return int(self.port.getHost().port)  # type: ignore[attr-defined]


class QuietProxyFactory(portforward.ProxyFactory):
    noisy = False


@dataclass
class RelayCounters:
    relayed: dict[str, int] = field(default_factory=lambda: {
        "announce": 0, "taken": 0, "status": 0, "status-reply": 0, "alert": 0})
    dropped: int = 0
    spliced: int = 0


class Relay:
    """The relay's logic: which datagram goes where, and the ports it opens for them."""

    def __init__(self, reactor: Any, downstream: Sequence[tuple[str, int]]) -> None:
        self.reactor = reactor
        self.downstream = list(downstream)
        self.crat_downstream = sorted({(host, CRAT_PORT) for host, _ in downstream})
        self.limiter = RateLimiter()
        self.jobs: OrderedDict[bytes, Entry] = OrderedDict()
        self.queries: OrderedDict[bytes, Entry] = OrderedDict()
        self.seen: OrderedDict[bytes, None] = OrderedDict()
        self.counters = RelayCounters()
        self.own_addresses: set[str] = set()
        self.send: Any = None  # set by the service: send(data, target)
        self.registered: Any = None  # workers registered from behind NAT, if enabled

    def datagram(self, data: bytes, host: str, port: int) -> None:
        if host in self.own_addresses or not self.limiter.allow(host, self.reactor.seconds()):
            self.counters.dropped += 1
            return
        try:
            dgram = wire.decode_datagram(data)
        except wire.WireError:
            self.counters.dropped += 1
            return
        signature = dgram.signature
        if signature in self.seen:
            return  # our own re-emission, or a loop through other relays
        self.seen[signature] = None
        if len(self.seen) > SEEN:
            self.seen.popitem(last=False)
        message = dgram.message
        upstream_port = dgram.relay_port
        if isinstance(message, wire.Announce):
            entry = self._job(message.job_id, (host, upstream_port or message.port))
            if entry is not None:
                self._emit(wire.with_relay(dgram, entry.number), "announce")
        elif isinstance(message, wire.Taken):
            job = self.jobs.get(message.job_id)
            if job is not None:
                job.taken = True
                self._expire_in(job, self.jobs, message.job_id, TAKEN_LINGER)
            self._emit(data, "taken")
        elif isinstance(message, wire.StatusQuery):
            entry = self._query(message.nonce, (host, upstream_port or message.port))
            if entry is not None:
                self._emit(wire.with_relay(dgram, entry.number), "status")
        elif isinstance(message, wire.Alert):
            self.counters.relayed["alert"] += 1
            for target in self.crat_downstream:
                self.send(data, target)

    def _emit(self, data: bytes, what: str) -> None:
        self.counters.relayed[what] += 1
        for target in self.downstream:
            self.send(data, target)
        if self.registered is not None:
            self.registered.send(data)

    # -- per-job TCP ports ------------------------------------------------------------

    def _job(self, job_id: bytes, upstream: tuple[str, int]) -> Entry | None:
        entry = self.jobs.get(job_id)
        if entry is None:
            if len(self.jobs) >= MAX_ENTRIES:
                self.counters.dropped += 1
                return None
            factory = QuietProxyFactory(*upstream)
            relay = self

            class Counted(portforward.ProxyServer):
                def connectionMade(self) -> None:
                    relay.counters.spliced += 1
                    super().connectionMade()

            factory.protocol = Counted
            port = self.reactor.listenTCP(0, factory)  # reached from the other network
            entry = Entry(upstream, port)
            self.jobs[job_id] = entry
            log.info("relaying job {job} from {up[0]}:{up[1]} on port {port}",
                     job=job_id.hex()[:12], up=upstream, port=entry.number)
        if not entry.taken:
            self._expire_in(entry, self.jobs, job_id, JOB_IDLE)
        return entry

    # -- per-query UDP ports ------------------------------------------------------------

    def _query(self, nonce: bytes, upstream: tuple[str, int]) -> Entry | None:
        entry = self.queries.get(nonce)
        if entry is None:
            if len(self.queries) >= MAX_ENTRIES:
                self.counters.dropped += 1
                return None

            def reply(data: bytes, host: str, port: int) -> None:
                try:
                    dgram = wire.decode_datagram(data)
                except wire.WireError:
                    self.counters.dropped += 1
                    return
                if isinstance(dgram.message, wire.StatusReply) and \
                        dgram.message.nonce == nonce:
                    self.counters.relayed["status-reply"] += 1
                    self.send(data, upstream)

            port = self.reactor.listenUDP(0, DatagramReceiver(reply))
            entry = Entry(upstream, port)
            self.queries[nonce] = entry
        self._expire_in(entry, self.queries, nonce, QUERY_IDLE)
        return entry

    def _expire_in(self, entry: Entry, table: OrderedDict[bytes, Entry], key: bytes,
                   seconds: float) -> None:
        if entry.expiry is not None and entry.expiry.active():
            entry.expiry.cancel()
        entry.expiry = self.reactor.callLater(seconds, self._expire, table, key)

    def _expire(self, table: OrderedDict[bytes, Entry], key: bytes) -> None:
        entry = table.pop(key, None)
        if entry is not None:
            entry.port.stopListening()  # spliced connections live on until they end

    def stop(self) -> defer.Deferred[Any]:
        stops = []
        for table in (self.jobs, self.queries):
            for key in list(table):
                entry = table.pop(key)
                if entry.expiry is not None and entry.expiry.active():
                    entry.expiry.cancel()
                stops.append(defer.maybeDeferred(entry.port.stopListening))
        return defer.gatherResults(stops)


class RelayService(Service):
    """Listens for datagrams on the announce port and the crat port, for one Relay."""

    def __init__(self, relay: Relay, listen: tuple[str, int], groups: Sequence[str] = ()
                 ) -> None:
        self.relay = relay
        self.listen = listen
        self.groups = tuple(groups)  # multicast groups joined on the listening side
        self.ports: list[IListeningPort] = []

    def _hear(self, port: int, host: str) -> IListeningPort:
        reactor = self.relay.reactor
        if not self.groups:
            listening: IListeningPort = reactor.listenUDP(
                port, DatagramReceiver(self.relay.datagram), interface=host)
            return listening
        listening = reactor.listenMulticast(port, DatagramReceiver(self.relay.datagram),
                                            interface=host, listenMultiple=True)
        for group in self.groups:
            listening.joinGroup(group)  # type: ignore[attr-defined]
        return listening

    def startService(self) -> None:
        super().startService()
        host, port = self.listen
        reactor = self.relay.reactor
        self.ports.append(self._hear(port, host))
        # re-emit from an unbound socket: the kernel picks the other network's address,
        # which is where the workers there will connect back to
        sender = DatagramReceiver(self.relay.datagram)
        self.ports.append(reactor.listenUDP(0, sender))
        self.ports[-1].setBroadcastAllowed(True)  # type: ignore[attr-defined]

        def send(data: bytes, target: tuple[str, int]) -> None:
            try:
                sender.transport.write(data, target)  # type: ignore[union-attr]
            except OSError as e:
                log.warn("cannot relay to {t[0]}:{t[1]}: {e}", t=target, e=e.strerror)

        self.relay.send = send
        self.relay.own_addresses = set(local_addresses())
        if port != CRAT_PORT:
            self.ports.append(self._hear(CRAT_PORT, host))
        log.info("cproxy listening on {host}:{port}, relaying to {targets}", host=host,
                 port=self.ports[0].getHost().port,  # type: ignore[attr-defined]
                 targets=", ".join(f"{h}:{p}" for h, p in self.relay.downstream))

    def stopService(self) -> defer.Deferred[Any]:
        super().stopService()
        stops = [defer.maybeDeferred(p.stopListening) for p in self.ports]
        return defer.gatherResults([*stops, self.relay.stop()])

