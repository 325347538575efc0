"""`rexnet status`: ask every worker of an application how it is (dsh's "full status").

The query is signed like an announcement; each worker answers with a reply signed by its
own credential, which is checked before it is shown.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from twisted.internet import defer

from rexnet.net.announce import AnnounceChecker, DatagramReceiver, Rejected, now_ms, source_address
from rexnet.protocol import wire
from rexnet.protocol.text import printable
from rexnet.security.credentials import Credential
from rexnet.security.tls import Revocations

RESEND_AFTER = 0.3


@dataclass
class Seen:
    """A worker's last answer, where it came from and when."""

    reply: wire.StatusReply
    address: str
    seen_at: float
    answering: bool = True


class StatusQuery:
    """One round of status: send the signed query, collect checked replies for WINDOW s."""

    def __init__(self, reactor: Any, credential: Credential,
                 targets: Sequence[tuple[str, int]], now: Callable[[], int] = now_ms,
                 revoked: Revocations | None = None) -> None:
        """REVOKED: workers whose replies are refused (their certificates are revoked)."""
        self.reactor = reactor
        self.credential = credential
        self.targets = list(targets)
        self.checker = AnnounceChecker(credential, now, revoked)
        self.now = now
        self.complaints: list[str] = []

    def run(self, window: float = 1.0) -> defer.Deferred[list[Seen]]:
        nonce = os.urandom(16)
        replies: dict[tuple[str, str], Seen] = {}

        def received(data: bytes, host: str, port: int) -> None:
            try:
                dgram = self.checker.decode(data)
                if dgram is None:
                    return
                reply = self.checker.check_status_reply(dgram, nonce)
            except Rejected as e:
                self.complaints.append(f"{host}:{port}: {e}")
                return
            replies[(reply.worker, host)] = Seen(reply, host, self.reactor.seconds())

        receiver = DatagramReceiver(received)
        port = self.reactor.listenUDP(0, receiver)
        port.setBroadcastAllowed(True)
        addrs = tuple(sorted({a for a in map(source_address, self.targets) if a}))
        query = wire.StatusQuery(nonce, self.now(), port.getHost().port,
                                 addrs[: wire.MAX_ADDRS])

        def send() -> None:
            data = wire.encode_datagram(
                wire.StatusQuery(nonce, self.now(), query.port, query.addrs),
                self.credential.app_id, self.credential.key, self.credential.cert_der)
            for target in self.targets:
                try:
                    port.write(data, target)
                except OSError as e:
                    self.complaints.append(f"cannot send to {target[0]}:{target[1]}: {e}")

        send()  # one resend covers a lost datagram; workers drop the duplicate as a replay
        resend = self.reactor.callLater(min(RESEND_AFTER, window / 2), send)
        done: defer.Deferred[list[Seen]] = defer.Deferred()

        def finish() -> None:
            if resend.active():
                resend.cancel()
            port.stopListening()
            done.callback(sorted(replies.values(), key=lambda s: (s.reply.worker, s.address)))

        self.reactor.callLater(window, finish)
        return done


def _age(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def table(seen: Sequence[Seen], now: float) -> str:
    """The cluster as a readable table (what workers say about themselves escaped)."""
    head = ("WORKER", "ADDRESS", "LOAD", "CPUS", "SPEED", "SLOTS", "QUEUED", "FREE MEM",
            "JOBS", "UPTIME", "VERSION", "STATE")
    rows = [head]
    for s in seen:
        r = s.reply
        state = "ok" if s.answering else f"not answering ({_age(now - s.seen_at)})"
        rows.append((printable(r.worker), s.address, f"{r.load:.2f}", str(r.cpus), f"{r.speed:g}",
                     f"{r.slots_used}/{r.slots}", str(r.queued),
                     f"{r.free_memory / 2**30:.1f} GiB",
                     str(r.jobs_run), _age(r.uptime), printable(r.version), state))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True))
                     .rstrip() for row in rows)


def as_json(seen: Sequence[Seen]) -> str:
    return json.dumps([
        {**{k: v for k, v in asdict(s.reply).items() if k != "nonce"}, "address": s.address,
         "answering": s.answering, "seen_at": round(s.seen_at, 3)} for s in seen])


def merge(known: dict[tuple[str, str], Seen], fresh: Sequence[Seen]) -> list[Seen]:
    """Update KNOWN with a round of answers; workers that did not answer are marked so."""
    for s in known.values():
        s.answering = False
    for s in fresh:
        known[(s.reply.worker, s.address)] = s
    return sorted(known.values(), key=lambda s: (s.reply.worker, s.address))


def best(seen: Sequence[Seen], cpus: int = 1, mem: int = 0) -> Seen | None:
    """The worker a job (of CPUS slots, needing MEM bytes free) would go to now: of those
    with room for it, the one whose connect-back delay is shortest (dsh's best node)."""
    def delay(s: Seen) -> float:
        r = s.reply
        return r.delay_ms if r.delay_ms >= 0 else r.load / max(r.speed, 0.01)

    fits = [s for s in seen if s.answering and s.reply.slots - s.reply.slots_used >= cpus
            and s.reply.free_memory >= mem]
    return min(fits, key=lambda s: (delay(s), s.reply.worker, s.address), default=None)
