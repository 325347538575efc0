"""What relays (cproxy, rexnet-tunnel) check before they carry a datagram, and how they
complain.

A relay carries a datagram only when it is signed by a credential of an application it
trusts, of the role that sends that kind (announcements, TAKEN and status queries by
clients; status replies by workers; alerts by either), valid and not revoked, and, but
for alerts, fresh.  Whatever fails is dropped, counted and complained about: at most one
log line a second per source and COMPLAINT_RATE lines a second in all.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from twisted.logger import Logger

from rexnet.net.announce import FRESH_MS, RateLimiter, now_ms
from rexnet.net.certcheck import CertChecker, CheckedCert, Rejected
from rexnet.protocol import wire

SIGNERS: dict[wire.Kind, tuple[str, ...]] = {
    wire.Kind.ANNOUNCE: ("client",), wire.Kind.TAKEN: ("client",),
    wire.Kind.STATUS: ("client",), wire.Kind.STATUS_REPLY: ("worker",),
    wire.Kind.ALERT: ("worker", "client"),
}
COMPLAINT_INTERVAL = 1.0
COMPLAINT_RATE = 20.0
GLOBAL_RATE = 2000.0  # datagrams a second reaching the checks, all sources together
GLOBAL_BURST = 4000.0

log = Logger()


class RelayVerifier:
    """Checks whole datagrams for a relay (sans-IO: time from NOW)."""

    def __init__(self, certs: CertChecker, now: Callable[[], int] = now_ms) -> None:
        self.certs = certs
        self.now = now

    def check(self, dgram: wire.Datagram) -> CheckedCert:
        """The datagram's signer if DGRAM may be carried; Rejected saying why if not."""
        kind = dgram.message.KIND
        signer = self.certs.check(dgram.cert_der, dgram.app_id, SIGNERS[kind])
        what = kind.name.lower().replace("_", " ")
        if not signer.verify(dgram.signature, dgram.signed_part):
            raise Rejected(f"bad signature on {what}")
        if kind != wire.Kind.ALERT and abs(self.now() - dgram.message.ts_ms) > FRESH_MS:
            raise Rejected(f"stale {what} (check the clocks)")
        return signer


class Complaints:
    """Rate-limited complaint lines: one a second per source, COMPLAINT_RATE in all."""

    def __init__(self, clock: Callable[[], float], who: str) -> None:
        self.clock = clock
        self.who = who
        self.count = 0
        self._last: OrderedDict[str, tuple[float, int]] = OrderedDict()
        self._all = RateLimiter(COMPLAINT_RATE, COMPLAINT_RATE * 2, 1)

    def __call__(self, source: str, what: str) -> None:
        self.count += 1
        now = self.clock()
        last, suppressed = self._last.pop(source, (-1e18, 0))
        if now - last < COMPLAINT_INTERVAL or not self._all.allow("", now):
            self._last[source] = (last, suppressed + 1)
        else:
            log.warn("complaint: {who} refused a datagram from {source}: {what} ({n} more "
                     "suppressed)", who=self.who, source=source, what=what, n=suppressed)
            self._last[source] = (now, 0)
        while len(self._last) > 4096:
            self._last.popitem(last=False)
