"""cproxy: carries announcements from one network to another and splices connect-backs.

A relay sees no job data: it re-emits each datagram unchanged but for a trailer naming
its own address and port (outside the client's signature; signed by the relay's
credential when it holds one, see rexnet.net.trailers), and splices each TCP connection a
worker makes to that port through to the client (or to the previous relay of a chain).
TLS stays end to end between worker and client.

It carries only what it can check (rexnet.net.relaycheck): datagrams of the applications
whose CA it trusts, signed by a valid, unrevoked credential of the right role, fresh; a
job's port splices only to the address the client signed (or to the relay a verified
trailer names). Junk never takes a table entry; each source has a quota of entries.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.interfaces import IAddress, IDelayedCall, IListeningPort
from twisted.logger import Logger
from twisted.protocols import portforward

from rexnet.net.addresses import local_addresses
from rexnet.net.alerts import CRAT_PORT
from rexnet.net.announce import DatagramReceiver, RateLimiter, source_address
from rexnet.net.certcheck import CertChecker, Rejected
from rexnet.net.complaints import Complaints
from rexnet.net.relaycheck import GLOBAL_BURST, GLOBAL_RATE, RelayVerifier
from rexnet.net.trailers import connect_back_allowed, relayed
from rexnet.net.tuning import tune_connection
from rexnet.protocol import relaytrailer, wire
from rexnet.security.credentials import Credential

JOB_IDLE = 60.0  # seconds a job's relay port stays open after its last announcement
TAKEN_LINGER = 5.0  # ... and after its TAKEN
QUERY_IDLE = 10.0
MAX_ENTRIES = 1024  # jobs (TCP ports) and, apart, status queries (UDP ports)
MAX_PER_SOURCE = 64  # entries one source address may hold in each table
MAX_SPLICES_PER_JOB = 16  # connections through one job's port at once
MAX_SPLICES = 2048  # ... and through all of them (4 descriptors each: see cproxy.service)
SEEN = 10_000

log = Logger()


@dataclass
class Entry:
    """A relay port for one job (TCP) or one status query (UDP)."""

    upstream: tuple[str, int]
    port: IListeningPort
    source: str  # who asked for it (its quota)
    signer: bytes  # the DER certificate of the client that signed the announcement
    expiry: IDelayedCall | None = None
    taken: bool = False
    splices: int = 0

    @property
    def number(self) -> int:
        """The port number the relay listens on for this entry."""
        return int(self.port.getHost().port)  # type: ignore[attr-defined]


class TunedProxyClient(portforward.ProxyClient):
    """The splice's leg towards the client (or the previous relay)."""

    def connectionMade(self) -> None:
        tune_connection(self.transport)
        super().connectionMade()


class TunedProxyClientFactory(portforward.ProxyClientFactory):
    noisy = False
    protocol = TunedProxyClient


class Splice(portforward.ProxyServer):
    """One worker's connection through a job's port, counted while it lasts."""

    relay: Relay
    entry: Entry
    clientProtocolFactory = TunedProxyClientFactory

    def connectionMade(self) -> None:
        self.relay.counters.spliced += 1
        tune_connection(self.transport)
        super().connectionMade()

    def connectionLost(self, reason: Any = None) -> None:
        self.relay.splices -= 1
        self.entry.splices -= 1
        super().connectionLost(reason)


class JobPortFactory(portforward.ProxyFactory):
    """A job's port: splices to the upstream, at most MAX_SPLICES_PER_JOB at once (and
    MAX_SPLICES through all ports)."""

    noisy = False
    protocol = Splice

    def __init__(self, relay: Relay, job_id: bytes, upstream: tuple[str, int]) -> None:
        super().__init__(*upstream)
        self.relay = relay
        self.job_id = job_id

    def buildProtocol(self, addr: IAddress | None) -> Splice | None:
        relay = self.relay
        entry = relay.jobs.get(self.job_id)
        if entry is None or entry.splices >= MAX_SPLICES_PER_JOB or \
                relay.splices >= MAX_SPLICES:
            relay.counters.refused_splices += 1
            relay.complain(str(getattr(addr, "host", "?")),
                           "connection to a job port refused: too many at once")
            return None
        splice = Splice()
        splice.factory = self
        splice.relay, splice.entry = relay, entry
        entry.splices += 1
        relay.splices += 1
        return splice




@dataclass
class RelayCounters:
    relayed: dict[str, int] = field(default_factory=lambda: {
        "announce": 0, "taken": 0, "status": 0, "status-reply": 0, "alert": 0})
    dropped: int = 0
    spliced: int = 0
    refused_splices: int = 0


class Relay:
    """The relay's logic: which datagram goes where, and the ports it opens for them."""

    def __init__(self, reactor: Any, downstream: Sequence[tuple[str, int]],
                 certs: CertChecker, credential: Credential | None = None,
                 bind: str = "", send: Callable[[bytes, tuple[str, int]], None] | None = None
                 ) -> None:
        """CERTS: the trusted CAs and revocations; CREDENTIAL: a relay credential, to sign
        the trailers of its application's datagrams; BIND: where job ports listen; SEND:
        where datagrams go out (default: an Outbound socket RelayService opens)."""
        self.reactor = reactor
        self.downstream = list(downstream)
        self.crat_downstream = sorted({(host, CRAT_PORT) for host, _ in downstream})
        self.certs = certs
        self.verifier = RelayVerifier(certs)
        self.credential = credential
        self.bind = bind
        self.limiter = RateLimiter()
        self.all_sources = RateLimiter(GLOBAL_RATE, GLOBAL_BURST, 1)
        self.complain = Complaints(reactor.seconds, who="cproxy")
        self.jobs: OrderedDict[bytes, Entry] = OrderedDict()
        self.queries: OrderedDict[bytes, Entry] = OrderedDict()
        self.quota: dict[str, Counter[str]] = {"jobs": Counter(), "queries": Counter()}
        self.seen: OrderedDict[bytes, None] = OrderedDict()
        self.counters = RelayCounters()
        self.own_addresses: set[str] = set()
        self.splices = 0
        self._sources: dict[tuple[str, int], str] = {}
        self.send = send if send is not None else Outbound()
        self.registered: Any = None  # workers registered from behind NAT, if enabled

    def datagram(self, data: bytes, host: str, port: int) -> None:
        now = self.reactor.seconds()
        if host in self.own_addresses or not self.limiter.allow(host, now) or \
                not self.all_sources.allow("", now):
            self.counters.dropped += 1
            return
        if not self.certs.trusts(wire.peek_app_id(data)):
            self.counters.dropped += 1  # not ours to carry: no complaint
            return
        try:
            dgram, trailer = relaytrailer.decode_relayed(data)
            if dgram.signature in self.seen:
                return  # our own re-emission, or a loop through other relays
            self.verifier.check(dgram)
            self._carry(dgram, trailer, host, dgram.cert_der)
        except (Rejected, wire.WireError) as e:
            self.counters.dropped += 1
            self.complain(host, str(e))

    def _carry(self, dgram: wire.Datagram, trailer: relaytrailer.SignedTrailer | None,
               host: str, signer: bytes) -> None:
        self.seen[dgram.signature] = None
        if len(self.seen) > SEEN:
            self.seen.popitem(last=False)
        message = dgram.message
        if isinstance(message, wire.Announce):
            upstream = self._upstream(dgram, trailer, host, message.addrs, message.port)
            entry = self._job(message.job_id, upstream, host, signer)
            if entry is not None:
                self._emit(dgram, entry.number, "announce")
        elif isinstance(message, wire.Taken):
            job = self.jobs.get(message.job_id)
            if job is None:
                return  # not a job we carried: nobody beyond us waits for it
            if job.signer != signer:
                raise Rejected("TAKEN signed by another client than the announcement")
            job.taken = True
            self._expire_in(job, self.jobs, message.job_id, TAKEN_LINGER)
            self._emit_raw(dgram.signed_part + dgram.signature, "taken")
        elif isinstance(message, wire.StatusQuery):
            upstream = self._upstream(dgram, trailer, host, message.addrs, message.port)
            entry = self._query(message.nonce, upstream, host, signer)
            if entry is not None:
                self._emit(dgram, entry.number, "status")
        elif isinstance(message, wire.Alert):
            self.counters.relayed["alert"] += 1
            for target in self.crat_downstream:
                self.send(dgram.signed_part + dgram.signature, target)

    def _upstream(self, dgram: wire.Datagram, trailer: relaytrailer.SignedTrailer | None,
                  host: str, addrs: tuple[str, ...], port: int) -> tuple[str, int]:
        """Where a job's port splices to: the client at an address it signed, or the relay
        (before us in a chain) that a verified trailer names."""
        connect_back_allowed(dgram, trailer, host, self.certs)
        if trailer is not None:
            return trailer.addr, trailer.port
        if dgram.relay_port == 0 and addrs:  # through a tunnel: the client's own address
            return addrs[0], port
        if host not in addrs:
            raise Rejected(f"sent from {host}, which the client did not sign")
        return host, port

    def source_for(self, target: tuple[str, int]) -> str:
        """The address of ours datagrams to TARGET leave from (what we sign)."""
        if target not in self._sources:
            self._sources[target] = source_address(target) or self.bind or "0.0.0.0"
        return self._sources[target]

    def _emit(self, dgram: wire.Datagram, port: int, what: str) -> None:
        credential = self.credential
        if credential is not None and dgram.app_id != credential.app_id:
            credential = None  # another application's: an unsigned trailer
        self.counters.relayed[what] += 1
        for target in self.downstream:
            self.send(relayed(dgram, port, self.source_for(target), credential), target)
        if self.registered is not None:
            self.registered.send_each(
                lambda local: relayed(dgram, port, local, credential))

    def _emit_raw(self, data: bytes, what: str) -> None:
        self.counters.relayed[what] += 1
        for target in self.downstream:
            self.send(data, target)
        if self.registered is not None:
            self.registered.send(data)

    def _admit(self, table: str, entries: OrderedDict[bytes, Entry], source: str) -> bool:
        """Whether SOURCE may open one more entry in TABLE (complaint if not)."""
        if len(entries) >= MAX_ENTRIES:
            why = f"the {table} table is full ({MAX_ENTRIES})"
        elif self.quota[table][source] >= MAX_PER_SOURCE:
            why = f"{source} already holds {MAX_PER_SOURCE} {table}"
        else:
            return True
        self.counters.dropped += 1
        self.complain(source, f"not relayed: {why}")
        return False

    def _added(self, table: str, entry: Entry) -> None:
        self.quota[table][entry.source] += 1

    # -- per-job TCP ports ------------------------------------------------------------

    def _job(self, job_id: bytes, upstream: tuple[str, int], source: str, signer: bytes
             ) -> Entry | None:
        entry = self.jobs.get(job_id)
        if entry is not None and entry.signer != signer:
            raise Rejected("announcement of a job relayed for another client")
        if entry is None:
            if not self._admit("jobs", self.jobs, source):
                return None
            factory = JobPortFactory(self, job_id, upstream)
            port = self.reactor.listenTCP(0, factory, interface=self.bind)
            entry = Entry(upstream, port, source, signer)
            self.jobs[job_id] = entry
            self._added("jobs", entry)
            log.info("relaying job {job} from {up[0]}:{up[1]} on port {port}",
                     job=job_id.hex()[:12], up=upstream, port=entry.number)
        if not entry.taken:
            self._expire_in(entry, self.jobs, job_id, JOB_IDLE)
        return entry

    # -- per-query UDP ports ------------------------------------------------------------

    def _query(self, nonce: bytes, upstream: tuple[str, int], source: str, signer: bytes
               ) -> Entry | None:
        entry = self.queries.get(nonce)
        if entry is not None and entry.signer != signer:
            raise Rejected("status query relayed for another client")
        if entry is None:
            if not self._admit("queries", self.queries, source):
                return None

            def reply(data: bytes, host: str, port: int) -> None:
                try:
                    dgram = wire.decode_datagram(data)
                    if not isinstance(dgram.message, wire.StatusReply) or \
                            dgram.message.nonce != nonce:
                        raise Rejected("not an answer to the status query relayed here")
                    self.verifier.check(dgram)
                except (Rejected, wire.WireError) as e:
                    self.counters.dropped += 1
                    self.complain(host, str(e))
                    return
                self.counters.relayed["status-reply"] += 1
                self.send(data, upstream)

            port = self.reactor.listenUDP(0, DatagramReceiver(reply), interface=self.bind)
            entry = Entry(upstream, port, source, signer)
            self.queries[nonce] = entry
            self._added("queries", entry)
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
            quota = self.quota["jobs" if table is self.jobs else "queries"]
            quota[entry.source] -= 1
            if quota[entry.source] <= 0:
                del quota[entry.source]
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


class Outbound:
    """Where a relay sends datagrams: the unbound UDP socket its service opens at start
    (until then, and after an error, datagrams are dropped with a log line)."""

    def __init__(self) -> None:
        self.sender: DatagramReceiver | None = None

    def attach(self, sender: DatagramReceiver) -> None:
        self.sender = sender

    def __call__(self, data: bytes, target: tuple[str, int]) -> None:
        transport = self.sender.transport if self.sender is not None else None
        if transport is None:
            log.warn("cannot relay to {t[0]}:{t[1]}: not listening yet", t=target)
            return
        try:
            transport.write(data, target)  # type: ignore[attr-defined]
        except OSError as e:
            log.warn("cannot relay to {t[0]}:{t[1]}: {e}", t=target, e=e.strerror)


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
        if isinstance(self.relay.send, Outbound):
            self.relay.send.attach(sender)
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

