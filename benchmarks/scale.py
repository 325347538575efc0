"""Scale simulation: N workers answer one announcement; connect-backs per job, time to start.

The workers are real rexnet Worker objects (announcement checks, load delay, crowd estimate,
TAKEN handling, TLS connect-back, spawning the job) living in one process in a network
namespace, on one multicast group; the client is a real `rexnet exec -v` in another
namespace.  Four corrections make one process stand in for N machines:

- the announcement is verified once and the result shared (N machines verify in parallel;
  one process verifying N times would spread the workers over N signature checks);
- one socket (FanOut) hands each datagram to the workers 20 at a time, an announcement to
  the earliest due first, and lets the reactor run between turns: the first connect-backs
  leave when due instead of after the process has handed the announcement to all N (on
  1,000 sockets they left 50-150 ms late, and the TAKEN with them);
- each "machine" hears a datagram when the kernel received it (SO_TIMESTAMPNS on a socket
  of the process's own on the group, class Arrivals), not when this process got round to
  that worker: a worker's delay counts from the announcement's arrival (SimWorker._announce
  resets the timer); a timer due after the job's TAKEN arrived counts as cancelled, and
  one due before it as fired even if the process ran it late; the crowd sees the TAKEN's
  time of arrival;
- a job's first connect-back leaves as from a machine of its own (Arrivals.shift): the
  crowd acts on the TAKEN earlier by the time that connect-back lost beyond an idle
  reactor's (its timer ran late, or its connect(2) waited for a reactor turn serving
  the other workers: 2-25 ms of the 3-30 ms between the first connect-back and the crowd
  hearing TAKEN on this shared 2-core machine, benchmarks/scale_trace.py), and later by a
  real worker's signature check of the TAKEN; a later connect-back of the job waits to
  know (HOLD).
- the final TAKEN's count is what a client on its own machine would have counted: on N
  machines a storm's connect-backs reach the client's port within a millisecond, where it
  counts them accepted or in its accept queue (rexnet.client.connectback.waiting), while
  this one process sends them over 100-200 ms, mostly after the client chose; so a worker
  learns from the job's connect-backs due (on their machines) before the job's first TAKEN
  reached them and before its final TAKEN left (Arrivals.reached), if that says more.
- a resent announcement is judged (ConnectBacks.resent: has the client waited far longer
  than the crowd's first answer takes?) at the moment it reached the host (class Seen),
  not when this process got round to it: in a storm that was 100-400 ms later, every
  resend looked late and shrank the crowd of the workers served last (scale_trace.py).
  --raw leaves these four out.
  What stays unfaithful makes the figures worse, not better: the connect-backs' TLS
  handshakes share this process's CPU, and the client shares the machine with them.

Run by benchmarks/bench.py; alone (as root, from the repository):

    .venv/bin/python benchmarks/scale.py [--workers N] [--jobs J] [--no-fixed]
    .venv/bin/python benchmarks/scale.py --model MS [--early MS] [--workers N] [--jobs J]

SCALE_LOG=FILE keeps the simulated workers' lines (cb: a connect-back, its job, worker,
ms from the announcement it was due, how late it left and when, its window and what let
it go, SimWorker.why; narrowed: a resend narrowed a waiting connect-back and shrank its
worker's crowd, when it reached the host and when it was judged; taken: a job's first
TAKEN, ms from the announcement a real worker acts on it, raw: reached the host, and
when); SCALE_TRACE=FILE the client's SYNs and datagrams (tcpdump; scale_trace.py).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import random
import re
import resource
import statistics
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

GROUP = "239.77.9.9"
PORT = 3010
SO_TIMESTAMPNS = 35  # (Linux; not in the socket module)
HOLD = 0.2  # seconds a simulated connect-back may wait to know its job's TAKEN


# -- the simulated workers (inside the namespace) --------------------------------------


class Arrivals:
    """When each datagram reached the simulated workers' "host": kernel receive times
    (SO_TIMESTAMPNS) from a socket of its own on the group, in the reactor's clock.

    Jobs are named by their first job id: a client that announces again under a new id
    (its early TAKEN's connection failed) announces the same connect-back port.
    """

    def __init__(self, reactor: Any) -> None:
        import socket

        self.reactor = reactor
        sock = self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        sock.bind(("", PORT))
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
                        socket.inet_aton(GROUP) + socket.inet_aton("0.0.0.0"))
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        sock.setblocking(False)
        self.arrived: dict[bytes, float] = {}  # datagram: when it first came
        self.first: dict[bytes, float] = {}  # job id: when it was first announced
        self.taken: dict[bytes, float] = {}  # job id: when its first TAKEN came
        self.names: dict[bytes, bytes] = {}  # job id: the job's first id
        self.ports: dict[int, tuple[bytes, float]] = {}  # port: (first id, when)
        # the first connect-back of each job (by its first id): when due, run, connecting
        self.due: dict[bytes, float] = {}
        self.ran: dict[bytes, float] = {}
        self.syn: dict[bytes, float] = {}
        self.stack = 0.0  # seconds from a timer's run to its connect(2) in an idle reactor
        self.last = 0.0  # when the last connect(2) was
        self.verify = 0.0  # seconds a real worker takes to check a TAKEN (set by serve)
        self.raw = False  # no corrections (see shift())
        self.dues: dict[bytes, list[float]] = {}  # job id: when its connect-backs are due
        self.counted: dict[bytes, int] = {}  # a final TAKEN: what its client would count

    def going(self, job_id: bytes, due: float) -> None:
        """A connect-back of JOB_ID due at DUE leaves now (its connect(2) comes next turn)."""
        name = self.names.get(job_id, job_id)
        self.due[name] = min(self.due.get(name, due), due)
        self.ran.setdefault(name, self.reactor.seconds())

    def connecting(self, port: int) -> None:
        """A connect(2) to PORT (a job's connect-back port) now."""
        self.last = time.time()
        name = self.ports.get(port, (b"", 0.0))[0]
        if name in self.ran and name not in self.syn:
            self.syn[name] = self.last

    def shift(self, job_id: bytes) -> float:
        """Seconds to add to when a TAKEN of JOB_ID reached the host, to have it when a
        real worker acts on it: plus its signature check, minus the time the job's first
        connect-back left late (timer and connect(2)) beyond an idle host's (self.stack),
        which N machines would not have lost."""
        name = self.names.get(job_id, job_id)
        if self.raw or name not in self.syn:
            return 0.0
        return self.verify - max(0.0, self.syn[name] - self.due[name] - self.stack)

    def drain(self) -> None:
        import socket

        from rexnet.protocol import wire

        offset = time.time() - self.reactor.seconds()
        while True:
            try:
                data, ancillary, _flags, _addr = self.sock.recvmsg(8192, 1024)
            except BlockingIOError:
                return
            at = self.reactor.seconds()
            for level, kind, raw in ancillary:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                    sec, nsec = struct.unpack("qq", raw[:16])
                    at = sec + nsec / 1e9 - offset
            self.arrived.setdefault(data, at)
            try:
                message = wire.decode_datagram(data).message
            except wire.WireError:
                continue
            if isinstance(message, wire.Announce) and message.job_id not in self.names:
                earlier = self.ports.get(message.port)
                name = earlier[0] if earlier and at - earlier[1] < 5.0 else message.job_id
                self.names[message.job_id] = name
                self.ports.setdefault(message.port, (name, at))
                self.first.setdefault(name, at)
            elif isinstance(message, wire.Taken) and message.job_id not in self.taken:
                self.taken[message.job_id] = at
                name = self.names.get(message.job_id, message.job_id)
                if name in self.first and not any(
                        self.names.get(j) == name for j in self.taken if j != message.job_id):
                    print(f"taken {name.hex()} answered {message.answered} early "
                          f"{int(getattr(message, 'early', False))} after "
                          f"{(at + self.shift(name) - self.first[name]) * 1000:.2f} ms raw "
                          f"{(at - self.first[name]) * 1000:.2f} at {at:.6f}", flush=True)

    def at(self, data: bytes) -> float:
        """When DATA first reached the host."""
        self.drain()
        return self.arrived.get(data, self.reactor.seconds())

    def heard(self, data: bytes, job_id: bytes) -> float:
        """When a real worker would act on DATA, a TAKEN of JOB_ID (see shift())."""
        return self.at(data) + self.shift(job_id)

    def taken_at(self, job_id: bytes) -> float | None:
        """When a real worker would act on the job's first TAKEN (None: not come yet)."""
        self.drain()
        taken = self.taken.get(job_id)
        return None if taken is None else taken + self.shift(job_id)

    def reached(self, data: bytes, job_id: bytes) -> int:
        """How many connect-backs of JOB_ID a client on its own machine would have counted
        when it sent DATA, its final TAKEN: those due before the job's first TAKEN
        reached their machines (they fired) and before DATA left."""
        if data not in self.counted:
            first = self.taken_at(job_id)
            sent = self.at(data)
            until = sent if first is None else min(first, sent)
            self.counted[data] = sum(1 for due in self.dues.get(job_id, ()) if due < until)
        return self.counted[data]

    def job(self, job_id: bytes) -> str:
        return self.names.get(job_id, job_id).hex()

    def since(self, job_id: bytes, when: float) -> float:
        """Milliseconds from the job's first announcement to WHEN."""
        first = self.first.get(self.names.get(job_id, job_id), when)
        return (when - first) * 1000


class Seen:
    """REACTOR as a worker sees it while it judges a datagram that reached its machine
    AT (reactor time): seconds() says AT (SimWorker._announce)."""

    def __init__(self, reactor: Any, at: float) -> None:
        self.reactor = reactor
        self.at = at

    def seconds(self) -> float:
        return self.at

    def __getattr__(self, name: str) -> Any:
        return getattr(self.reactor, name)


class Draw:
    """A worker's jitter, drawn one announcement ahead (FanOut orders by it)."""

    def __init__(self) -> None:
        self.value = random.random()

    def __call__(self) -> float:
        value, self.value = self.value, random.random()
        return value


class FanOut:
    """One socket for every simulated worker.  Each datagram is handed to them CHUNK at a
    time, an announcement to the earliest due first, and the reactor runs between turns:
    due timers fire (the first connect-backs leave when due) and the next datagram is
    read, as on N machines working in parallel, rather than after the process has handed
    an announcement to all N."""

    CHUNK = 20

    def __init__(self, reactor: Any, workers: list[Any]) -> None:
        from twisted.internet.protocol import DatagramProtocol

        self.reactor = reactor
        self.workers = workers
        self.queue: collections.deque[tuple[bytes, tuple[str, int], Any]] = collections.deque()
        self.pumping = False
        fanout = self

        class Protocol(DatagramProtocol):
            def datagramReceived(self, data: bytes, addr: Any) -> None:
                fanout.received(data, addr)

        self.protocol = Protocol()

    def received(self, data: bytes, addr: tuple[str, int]) -> None:
        from rexnet.protocol import wire

        try:
            announce = isinstance(wire.decode_datagram(data).message, wire.Announce)
        except wire.WireError:
            announce = False
        order = sorted(self.workers, key=lambda w: w.due()) if announce else self.workers
        self.queue.append((data, addr, iter(order)))
        if not self.pumping:
            self.pumping = True
            self.reactor.callLater(0, self.pump)

    def pump(self) -> None:
        budget = self.CHUNK
        while self.queue and budget:
            data, addr, workers = self.queue[0]
            for worker in workers:
                worker.datagram(data, addr[0], addr[1])
                budget -= 1
                if not budget:
                    break
            else:
                self.queue.popleft()
        if self.queue:
            self.reactor.callLater(0, self.pump)
        else:
            self.pumping = False


def serve(keyfile: str, count: int, fixed: bool, raw: bool = False) -> None:
    """Run COUNT workers on GROUP:PORT until killed; print one line per connect-back.
    RAW: without the corrections of Arrivals.shift()."""
    from twisted.internet import reactor, tcp

    from rexnet.client.connectback import BACKLOG
    from rexnet.net.announce import AnnounceChecker, Rejected
    from rexnet.protocol import wire
    from rexnet.security.credentials import load_credential
    from rexnet.security.tls import connecting_options
    from rexnet.worker.load import Crowd, HostLoad, spread_ms
    from rexnet.worker.service import Worker, WorkerSettings

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))
    cred = load_credential(Path(keyfile), "worker")
    shared = AnnounceChecker(cred)
    decoded: dict[bytes, Any] = {}
    checked: dict[int, Any] = {}

    class SharedChecker:
        """One verification per datagram, the result shared by every simulated worker."""

        def decode(self, data: bytes) -> wire.Datagram | None:
            if data not in decoded:
                decoded[data] = shared.decode(data)
            return decoded[data]  # type: ignore[no-any-return]

        def _once(self, key: int, check: Any, *args: Any) -> Any:
            if key not in checked:
                try:
                    checked[key] = check(*args)
                except Rejected as e:
                    checked[key] = e
            result = checked[key]
            if isinstance(result, Rejected):
                raise result
            return result

        def check_announce(self, dgram: wire.Datagram, host: str) -> Any:
            return self._once(id(dgram), shared.check_announce, dgram, host)

        def check_taken(self, dgram: wire.Datagram, client: Any) -> Any:
            return self._once(id(dgram), shared.check_taken, dgram, client)

        def check_status(self, dgram: wire.Datagram, host: str) -> Any:
            return shared.check_status(dgram, host)

    idle = HostLoad(loadavg=0.0, cpus=2, free_memory=1 << 30)
    tls = connecting_options(cred)
    checker = SharedChecker()
    arrivals = Arrivals(reactor)
    arrivals.raw, arrivals.verify = raw, verify_seconds(cred)
    do_connect = tcp.BaseClient.doConnect

    def connect_timed(self: Any) -> None:
        arrivals.connecting(self.realAddress[1])
        do_connect(self)

    tcp.BaseClient.doConnect = connect_timed  # type: ignore[method-assign]

    class FixedCrowd(Crowd):
        """The delay before crowds were learnt: everyone within 1 ms."""

        def observe(self, *args: Any, **kwargs: Any) -> None:
            pass

        def steer(self, *args: Any, **kwargs: Any) -> None:
            pass

        def unanswered(self, *args: Any, **kwargs: Any) -> bool:
            return False

    class SimWorker(Worker):
        """A Worker on a "machine" of its own: it hears each datagram when the kernel
        received it, and its timers fire when they are due (see the module's docstring)."""

        draw: Draw
        held: dict[bytes, tuple[str, int]]  # connect-backs waiting for their job's TAKEN
        narrowed: set[bytes]  # jobs whose connect-back a resent announcement narrowed
        shrunk = False  # a resent announcement shrank its crowd (ConnectBacks.resent)

        def due(self) -> float:
            """When it would answer an announcement now (idle, at speed 1), in ms."""
            return self.draw.value * spread_ms(self.crowd.size(reactor.seconds()))

        def datagram(self, data: bytes, host: str, port: int) -> None:
            self._data = data
            super().datagram(data, host, port)

        def _announce(self, dgram: wire.Datagram, host: str) -> None:
            before = set(self.pending)
            job = dgram.message.job_id  # type: ignore[union-attr]
            waiting = self.pending.get(job)
            drawn = None if waiting is None else (waiting.heard, waiting.delay)
            crowd = self.crowd.size(reactor.seconds())
            if waiting is not None and not arrivals.raw:
                # a resend: judged when it reached the "machine", not when this process
                # got round to it (100-400 ms later in a storm: every resend looked late)
                self.connect_backs.reactor = Seen(reactor, arrivals.at(self._data))
            try:
                super()._announce(dgram, host)
            finally:
                self.connect_backs.reactor = reactor
            if waiting is not None and drawn != (waiting.heard, waiting.delay):
                # a resend narrowed it, and the crowd (ConnectBacks.resent)
                self.narrowed.add(job)
                self.shrunk = True
                due = waiting.heard + waiting.delay
                dues = arrivals.dues.get(job, [])
                if drawn is not None and sum(drawn) in dues:
                    dues[dues.index(sum(drawn))] = due
                if waiting.call is not None and waiting.call.active():
                    waiting.call.reset(max(0.0, due - reactor.seconds()))
                print(f"narrowed {arrivals.job(job)} {self.settings.name} crowd {crowd:.1f} "
                      f"to {self.crowd.size(reactor.seconds()):.1f}, window "
                      f"{waiting.spread:.2f} ms; resend heard "
                      f"{arrivals.since(job, arrivals.at(self._data)):.2f} ms, judged at "
                      f"{arrivals.since(job, reactor.seconds()):.2f}", flush=True)
            new = set(self.pending) - before
            if new:
                heard = arrivals.at(self._data)
                now = reactor.seconds()
                for job_id in new:
                    pending = self.pending[job_id]
                    pending.heard = heard
                    arrivals.dues.setdefault(job_id, []).append(heard + pending.delay)
                    if pending.call is not None and pending.call.active():
                        pending.call.reset(max(0.0, heard + pending.delay - now))

        def _taken(self, dgram: wire.Datagram, taken: wire.Taken) -> None:
            heard = arrivals.heard(self._data, taken.job_id)
            if not taken.early and not arrivals.raw:  # what the client would have counted
                counted = min(arrivals.reached(self._data, taken.job_id),
                              taken.answered + BACKLOG)
                taken = dataclasses.replace(taken, answered=max(taken.answered, counted))
            # (also one settled already: it learns the crowd from this TAKEN all the same)
            pending = self.connect_backs.find(taken.job_id)
            target = self.held.pop(taken.job_id, None)
            if (pending is not None and target is not None
                    and pending.heard + pending.delay <= heard):  # due before it: it went
                self._go(pending, *target)
            if pending is not None:
                call = pending.call
                if (call is not None and call.active()
                        and pending.heard + pending.delay <= heard):
                    # due before the TAKEN reached the "machine": it would have fired
                    call.cancel()
                    pending.call = None
                    call.f(*call.a, **call.kw)  # type: ignore[attr-defined]
                was = pending.heard  # the crowd learns as if the TAKEN were read at once
                pending.heard -= heard - reactor.seconds()
            super()._taken(dgram, taken)
            if pending is not None:
                pending.heard = was
            if self.settings.name == "sim0":
                early = "early " if getattr(taken, "early", False) else ""
                print(f"crowd {self.crowd.size(reactor.seconds()):.1f} after {early}TAKEN "
                      f"{taken.answered}", flush=True)

        def _connect_back(self, pending: Any, host: str, port: int) -> None:
            due = pending.heard + pending.delay
            taken = arrivals.taken_at(pending.job_id)
            if taken is not None and taken < due:
                # the TAKEN reached this "machine" before its timer was due: a real worker
                # would have cancelled; this process had not got round to it yet
                pending.call = None
                self.release(pending)
                return
            name = arrivals.names.get(pending.job_id, pending.job_id)
            if (taken is None and not arrivals.raw and reactor.seconds() - due < HOLD
                    and due > arrivals.due.get(name, due)):
                # another connect-back of the job left: whether this one would have gone
                # depends on when its TAKEN comes (a late first one delayed it: shift())
                self.held[pending.job_id] = (host, port)
                reactor.callLater(0.0005, self._hold, pending)
                return
            self._go(pending, host, port)

        def _hold(self, pending: Any) -> None:
            target = self.held.pop(pending.job_id, None)
            if target is not None and self.pending.get(pending.job_id) is pending:
                self._connect_back(pending, *target)

        def _go(self, pending: Any, host: str, port: int) -> None:
            due = pending.heard + pending.delay
            arrivals.going(pending.job_id, due)
            print(f"cb {arrivals.job(pending.job_id)} {self.settings.name} "
                  f"{arrivals.since(pending.job_id, due):.2f} late "
                  f"{(reactor.seconds() - due) * 1000:.2f} at {time.time():.6f} spread "
                  f"{pending.spread:.2f} why {self.why(pending, due)}", flush=True)
            super()._connect_back(pending, host, port)

        def why(self, pending: Any, due: float) -> str:
            """What let this connect-back go (benchmarks/scale_trace.py attributes a job's
            extra ones): a resent announcement narrowed its window; it answered the job
            announced again under a new id; it was due before the job's TAKEN reached its
            machine (the window's trade; -shrunk: after a resend shrank this worker's
            crowd, and so its window, in this job or an earlier one); no TAKEN had come
            within HOLD; or none known yet (due before the job's first connect-back left)."""
            if pending.job_id in self.narrowed:
                return "resend"
            if arrivals.names.get(pending.job_id, pending.job_id) != pending.job_id:
                return "reopen"
            taken = arrivals.taken_at(pending.job_id)
            if taken is not None and due < taken:  # (shrunk: by a resend, some job before)
                return "before-taken-shrunk" if self.shrunk else "before-taken"
            if taken is not None:
                return "after-taken"
            return "held" if reactor.seconds() - due >= HOLD else "untold"

    workers: list[SimWorker] = []
    for i in range(count):
        settings = WorkerSettings(cred, ("true",), f"sim{i}", slots=2,
                                  listen=("0.0.0.0", PORT), groups=(GROUP,))
        draw = Draw()
        worker = SimWorker(settings, reactor, sample=lambda: idle, jitter=draw,
                           checker=checker,  # type: ignore[arg-type]
                           tls=tls, crowd=FixedCrowd() if fixed else None)
        worker.draw, worker.held, worker.narrowed = draw, {}, set()
        workers.append(worker)
    port = reactor.listenMulticast(PORT, FanOut(reactor, workers).protocol,  # type: ignore[attr-defined]
                                   listenMultiple=True)
    port.joinGroup(GROUP)
    if not raw:
        # N machines would not take the client's CPU handing out an announcement (1,000
        # checks, ~50 ms here): the client comes first; what this costs the workers'
        # timers and connect(2)s Arrivals.shift takes off
        os.nice(10)
    reactor.callWhenRunning(probe_stack, reactor, workers[0], arrivals, count)
    reactor.run()  # type: ignore[attr-defined]


def probe_stack(reactor: Any, worker: Any, arrivals: Arrivals, count: int) -> None:
    """Time a connect-back from its timer's run to its connect(2) while the reactor is
    idle (Arrivals.stack: what a worker alone on its machine takes), then say ready."""
    from twisted.internet.protocol import Factory, Protocol

    from rexnet.worker.connectback import Pending

    class Close(Protocol):
        def connectionMade(self) -> None:
            assert self.transport is not None
            self.transport.loseConnection()

    port = reactor.listenTCP(0, Factory.forProtocol(Close), interface="127.0.0.1")
    took: list[float] = []

    def one() -> None:
        if took and arrivals.last:
            took[-1] = arrivals.last - took[-1]
        if len(took) == 7:
            arrivals.stack = statistics.median(took)
            port.stopListening()
            print(f"ready {count} (connect-back to connect(2) {arrivals.stack * 1e6:.0f} us, "
                  f"TAKEN checked in {arrivals.verify * 1e6:.0f} us)", flush=True)
            return
        arrivals.last = 0.0
        took.append(reactor.seconds())
        worker.connect_backs.connect(Pending(b"probe", None, 0.0, 0.0),  # type: ignore[arg-type]
                                     "127.0.0.1", port.getHost().port, Protocol)
        reactor.callLater(0.02, one)

    reactor.callLater(0.1, one)


def verify_seconds(cred: Any) -> float:
    """How long checking a TAKEN's signature takes here (the median of 9 rounds of 50)."""
    from rexnet.protocol import wire

    key = cred.key
    data = wire.encode_datagram(wire.Taken(bytes(16), 0, 1, True), cred.app_id, key)
    dgram = wire.decode_datagram(data)
    public = key.public_key()
    rounds = []
    for _ in range(9):
        start = time.perf_counter()
        for _ in range(50):
            public.verify(dgram.signature, dgram.signed_part)
        rounds.append((time.perf_counter() - start) / 50)
    return statistics.median(rounds)


# -- the driver (root namespace: starts the namespaces and processes) -------------------


@dataclass
class ScaleResult:
    workers: int
    mode: str
    connect_backs: list[int]  # per job, in order
    start_ms: list[float]  # client's time from announcing to a started job
    crowd: float = 1.0  # the crowd the first simulated worker believed in at the end
    cancel_ms: list[float] = field(default_factory=list)  # first connect-back due to TAKEN
    sent_ms: list[float] = field(default_factory=list)  # first connect-back sent to TAKEN

    def steady(self) -> tuple[list[int], list[float]]:
        """Jobs after the first (the first teaches the workers the crowd)."""
        return self.connect_backs[1:], self.start_ms[1:]

    def settled(self) -> tuple[list[int], list[float]]:
        """The second half of the jobs (the windows have settled)."""
        half = len(self.connect_backs) // 2
        return self.connect_backs[half:], self.start_ms[half:]


START = re.compile(r"first of \d+ to connect back, after ([0-9.]+) ms")


def run_scale(bed: Any, keys: Any, workers: int, jobs: int, fixed: bool, raw: bool = False
              ) -> ScaleResult:
    """Start WORKERS simulated workers in a new namespace of BED, run JOBS jobs one after
    another from another namespace, and count connect-backs per job (RAW: without the
    corrections of Arrivals.shift())."""
    from cluster import REXNET, Proc

    tag = f"{workers}{'f' if fixed else 'c'}"
    lan = bed.add_subnet(f"s{tag}")
    sim = bed.add_host(f"sim{tag}", [lan])
    client = bed.add_host(f"cli{tag}", [lan])
    argv = [sys.executable, str(Path(__file__).resolve()), "--serve", str(keys.worker),
            "--workers", str(workers)] + (["--fixed"] if fixed else []) + (
                ["--raw"] if raw else [])
    proc = Proc(argv, popen=sim.popen)
    dump = None
    try:
        proc.wait_for(rf"ready {workers}", timeout=120)
        if os.environ.get("SCALE_TRACE"):  # the client's packets, its kernel's times
            with open(os.environ["SCALE_TRACE"], "w") as out:  # (for scale_trace.py)
                dump = client.popen(
                    ["tcpdump", "-i", client.iface(), "-n", "-tt", "-l", "-q",
                     "--time-stamp-precision=micro", f"udp and src host {client.addr()} "
                     "or tcp[tcpflags] & (tcp-syn|tcp-ack) == tcp-syn"],
                    stdout=out, stderr=subprocess.DEVNULL)
            time.sleep(1.0)
        starts: list[float] = []
        for _ in range(jobs):
            # --no-agent: every job is announced to the whole crowd (an agent would reuse
            # a warm channel and announce nothing)
            done = client.run([REXNET, "exec", "--no-agent", "-v", "--timeout", "30", "-a",
                               f"{GROUP}:{PORT}", str(keys.client)], timeout=60, text=True)
            match = START.search(done.stderr)
            if done.returncode != 0 or not match:
                raise RuntimeError(f"scale job failed: {done.stderr[-500:]}")
            starts.append(float(match.group(1)))
            time.sleep(0.2)
        time.sleep(1.0)  # late connect-backs (a lost TAKEN) still count
    finally:
        proc.stop()
        if dump is not None:
            dump.terminate()
            dump.wait(10)
    crowd = 1.0
    first_cb: dict[str, float] = {}
    first_sent: dict[str, float] = {}  # when the first connect-back left, per job
    cancel_ms: list[float] = []  # first connect-back due to its TAKEN heard, per job
    sent_ms: list[float] = []  # first connect-back sent to its TAKEN heard, per job
    order: list[str] = []
    counts: dict[str, int] = {}
    lines = proc.output.splitlines()
    if os.environ.get("SCALE_LOG"):  # the simulated workers' lines, to study
        Path(os.environ["SCALE_LOG"]).write_text(proc.output)
    for line in lines:
        if line.startswith("cb "):
            _, job, _name, since, _, late = line.split()[:6]
            first_cb[job] = min(first_cb.get(job, float(since)), float(since))
            first_sent[job] = min(first_sent.get(job, 1e9), float(since) + float(late))
            if job not in counts:
                order.append(job)
            counts[job] = counts.get(job, 0) + 1
        elif line.startswith("crowd "):
            crowd = float(line.split()[1])
    for line in lines:
        if line.startswith("taken "):
            words = line.split()
            if words[1] in first_cb:
                cancel_ms.append(float(words[7]) - first_cb[words[1]])
                sent_ms.append(float(words[7]) - first_sent[words[1]])
    return ScaleResult(workers, "fixed 1 ms jitter" if fixed else "crowd-scaled window",
                       [counts[j] for j in order], starts, crowd, cancel_ms, sent_ms)


def summary(result: ScaleResult) -> str:
    cbs, starts = result.steady()
    late, late_starts = result.settled()
    half = len(result.connect_backs) - len(late) + 1
    return (f"{result.workers} workers, {result.mode}: first job {result.connect_backs[0]} "
            f"connect-backs, {result.start_ms[0]:.1f} ms; jobs 2-{len(result.start_ms)}: "
            f"{statistics.mean(cbs):.3f} connect-backs per job (max {max(cbs)}; jobs 2-4: "
            f"{statistics.mean(cbs[:3]):.3f}), "
            f"start {statistics.median(starts):.1f} ms median "
            f"({min(starts):.1f}-{max(starts):.1f}); jobs {half}-{len(result.start_ms)}: "
            f"{statistics.mean(late):.3f} per job, start {statistics.median(late_starts):.1f} "
            f"ms median; crowd learnt {result.crowd:.0f}; "
            f"first connect-back due to TAKEN {statistics.median(result.cancel_ms or [0]):.1f} "
            f"ms, sent to TAKEN {statistics.median(result.sent_ms or [0]):.1f} ms; per job "
            f"{' '.join(map(str, result.connect_backs))}")


def model(workers: int, jobs: int, cancel_ms: float, seed: int = 1,
          early_ms: float | None = None) -> tuple[float, float]:
    """The same rules without processes: WORKERS idle workers draw their delays with
    rexnet.worker.load's window and crowd estimate; those that fire before the TAKEN (CANCEL_MS
    after the first) connect back; the TAKEN's count is what fired by 0.8 CANCEL_MS.
    With EARLY_MS, the client's early TAKEN comes EARLY_MS after the first connect-back
    and cancels what has not fired; the final TAKEN counts what fired before it, and every
    worker steers its window by that count and when the early TAKEN came (Crowd.steer),
    as rexnet.worker.connectback does.
    Returns (connect-backs per job, median first answer in ms) over jobs after the first."""
    import random

    from rexnet.worker.load import IDLE_MS, Crowd, spread_ms

    rng = random.Random(seed)
    crowds = [Crowd() for _ in range(workers)]
    fired: list[int] = []
    firsts: list[float] = []
    for job in range(jobs):
        now = float(job)
        spreads = [spread_ms(c.size(now)) for c in crowds]
        delays = [IDLE_MS + rng.random() * s for s in spreads]
        first = min(delays)
        taken = first + cancel_ms
        if early_ms is None:
            count = sum(1 for d in delays if d < first + 0.8 * cancel_ms)
            for crowd, s in zip(crowds, spreads, strict=True):
                crowd.observe(count, now, s, taken - IDLE_MS)
            fired.append(sum(1 for d in delays if d < taken))
        else:
            early = first + early_ms
            count = sum(1 for d in delays if d < early)
            for crowd, s in zip(crowds, spreads, strict=True):
                crowd.steer(count, now, s, early - IDLE_MS)
            fired.append(count)
        firsts.append(first)
    return statistics.mean(fired[1:]), statistics.median(firsts[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=1000)
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--model", type=float, metavar="MS",
                        help="no processes: the statistical model, with a TAKEN that "
                        "comes MS after the first connect-back")
    parser.add_argument("--early", type=float, metavar="MS",
                        help="with --model: an early TAKEN MS after the first connect-back")
    parser.add_argument("--no-fixed", action="store_true",
                        help="only the crowd-scaled window (not the fixed 1 ms one)")
    parser.add_argument("--serve", metavar="KEYFILE", help=argparse.SUPPRESS)
    parser.add_argument("--fixed", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--raw", action="store_true",
                        help="no corrections for the first connect-back's lateness in this "
                        "one process, nor for the workers' signature check of the TAKEN")
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.workers, args.fixed, args.raw)
        return
    if args.model is not None:
        per_job, first = model(args.workers, args.jobs, args.model, early_ms=args.early)
        early = "" if args.early is None else f", early TAKEN {args.early:g} ms"
        print(f"model: {args.workers} workers, TAKEN {args.model:g} ms after the first "
              f"connect-back{early}: {per_job:.3f} connect-backs per job, first answer "
              f"{first:.1f} ms after the announcement (jobs 2-{args.jobs})")
        return
    import tempfile

    from conftest import make_keys
    from netbed import NetBed, require_netns

    require_netns()
    with tempfile.TemporaryDirectory() as tmp, NetBed() as bed:
        keys = make_keys(Path(tmp), "scale")
        for fixed in (False,) if args.no_fixed else (False, True):
            print(summary(run_scale(bed, keys, args.workers, args.jobs, fixed, args.raw)),
                  flush=True)


if __name__ == "__main__":
    main()
