"""Where a relayed datagram may send a worker: the relay trailer, authenticated.

A worker must never connect back to a place a forged trailer names.  The rule, in
``connect_back_allowed``:

- no trailer: the datagram's source must be an address the client signed (checked with
  the announcement);
- a tunnel's trailer (unsigned, port 0): the worker connects to the address the client
  signed, so the trailer can redirect nothing;
- a signed relay trailer (rexnet.protocol.relaytrailer): its certificate is a relay
  credential of the application (issued by its CA, valid, not revoked), its signature
  covers this datagram, and the datagram came from the address it names;
- an unsigned trailer with a port (a cproxy without a relay credential, or an older one):
  only from an address the worker's configuration names as a relay.

Pure functions: the caller gives the certificate checker and the configured relays.
"""

from __future__ import annotations

from collections.abc import Collection

from rexnet.net.certcheck import CertChecker, Rejected
from rexnet.protocol import relaytrailer, wire
from rexnet.security.credentials import Credential


def connect_back_allowed(dgram: wire.Datagram, trailer: relaytrailer.SignedTrailer | None,
                         source: str, certs: CertChecker,
                         relays: Collection[str] = ()) -> None:
    """Nothing if DGRAM (from SOURCE, decoded by relaytrailer.decode_relayed with its
    TRAILER) may make a worker connect where it says; Rejected saying why if not."""
    if trailer is not None:
        relay = certs.check(trailer.cert_der, dgram.app_id, ("relay",))
        if not relay.verify(trailer.signature, trailer.signed_bytes(dgram.signature)):
            raise Rejected(f"bad signature on the relay trailer of {relay.info.name!r}")
        if trailer.addr != source:
            raise Rejected(f"relay trailer of {relay.info.name!r} names {trailer.addr}, but "
                           f"the datagram came from {source}")
    elif dgram.relay_port and source not in relays:
        raise Rejected(f"unsigned relay trailer from {source}, which is not a configured "
                       "relay")


def relayed(dgram: wire.Datagram, port: int, addr: str, relay: Credential | None) -> bytes:
    """DGRAM as a relay listening on ADDR:PORT re-emits it: with a signed trailer when it
    holds a RELAY credential, else with the unsigned one (wire.with_relay)."""
    if relay is None:
        return wire.with_relay(dgram, port)
    return relaytrailer.append(dgram, port, addr, relay.cert_der, relay.key)
