"""What relays (cproxy, rexnet-tunnel) check before they carry a datagram, and how they
complain.

A relay carries a datagram only when it is signed by a credential of an application it
trusts, of the role that sends that kind (announcements, TAKENs, early or final, and
status queries by clients; status replies by workers; alerts by either), valid and not
revoked, and, but for alerts, fresh; job calls are not carried.  Whatever fails is
dropped, counted and complained about: at most one log line a second per source and
COMPLAINT_RATE lines a second in all (rexnet.net.complaints).
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.logger import Logger

from rexnet.net.announce import FRESH_MS, now_ms
from rexnet.net.certcheck import CertChecker, CheckedCert, Rejected
from rexnet.protocol import wire

SIGNERS: dict[wire.Kind, tuple[str, ...]] = {
    wire.Kind.ANNOUNCE: ("client",), wire.Kind.TAKEN: ("client",),
    wire.Kind.STATUS: ("client",), wire.Kind.STATUS_REPLY: ("worker",),
    wire.Kind.ALERT: ("worker", "client"),
}
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
        what = kind.name.lower().replace("_", " ")
        if kind not in SIGNERS:
            raise Rejected(f"a {what} is not carried by relays")
        signer = self.certs.check(dgram.cert_der, dgram.app_id, SIGNERS[kind])
        if not signer.verify(dgram.signature, dgram.signed_part):
            raise Rejected(f"bad signature on {what}")
        if kind != wire.Kind.ALERT and abs(self.now() - dgram.message.ts_ms) > FRESH_MS:
            raise Rejected(f"stale {what} (check the clocks)")
        return signer
