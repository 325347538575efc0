"""The signed relay trailer (rexnet.protocol.relaytrailer) and the worker-side rule of where
a relayed datagram may send a worker (rexnet.net.trailers), issue P10 item 3: a captured
announcement with a forged trailer must not make a worker connect anywhere."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
from conftest import Keys
from hypothesis import given
from hypothesis import strategies as st

from rexnet.net.announce import AnnounceChecker, now_ms
from rexnet.net.certcheck import CertChecker, Rejected
from rexnet.net.trailers import connect_back_allowed, relayed
from rexnet.protocol import relaytrailer, wire
from rexnet.security.credentials import (
    CertInfo,
    Credential,
    app_id_of,
    issue,
    load_ca,
    load_credential,
)
from rexnet.security.revocation import Revoked

RELAY_ADDR = "10.1.0.1"


def credential(keys: Keys, role: str, name: str) -> Credential:
    ca = load_ca(keys.ca)
    key, cert = issue(ca.key, ca.cert, role, name)  # type: ignore[arg-type]
    return Credential(Path(name), key, cert, ca.cert, CertInfo.of(cert), app_id_of(ca.cert))


@pytest.fixture(scope="module")
def relay(keys: Keys) -> Credential:
    return credential(keys, "relay", "gw")


def announcement(keys: Keys, addrs: tuple[str, ...] = ("10.0.0.5",)) -> bytes:
    client = load_credential(keys.client, "client")
    ann = wire.Announce(os.urandom(16), 0, now_ms(), 40000, addrs)
    return wire.encode_datagram(ann, client.app_id, client.key, client.cert_der)


def checker(keys: Keys, revoked: Revoked | None = None) -> CertChecker:
    return CertChecker([load_ca(keys.ca).cert], revoked)


# -- the format ---------------------------------------------------------------------------


def test_a_signed_trailer_round_trips_and_names_the_relay(keys: Keys, relay: Credential
                                                          ) -> None:
    plain = wire.decode_datagram(announcement(keys))
    data = relaytrailer.append(plain, 5555, RELAY_ADDR, relay.cert_der, relay.key)
    dgram, trailer = relaytrailer.decode_relayed(data)
    assert trailer is not None and (trailer.addr, trailer.port) == (RELAY_ADDR, 5555)
    assert dgram.relay_port == 5555 and dgram.signed_part == plain.signed_part
    assert len(data) <= relaytrailer.MAX_RELAYED
    # a trailer replaces any earlier one: the next relay re-signs the bare datagram
    again = relaytrailer.append(dgram, 6666, "10.2.0.1", relay.cert_der, relay.key)
    assert relaytrailer.decode_relayed(again)[1].port == 6666  # type: ignore[union-attr]


def test_plain_and_tunnel_datagrams_have_no_signed_trailer(keys: Keys) -> None:
    data = announcement(keys)
    assert relaytrailer.decode_relayed(data)[1] is None
    tunnel = wire.with_relay(wire.decode_datagram(data), 0)
    dgram, trailer = relaytrailer.decode_relayed(tunnel)
    assert trailer is None and dgram.relay_port == 0


@given(st.binary(max_size=5000))
def test_fuzz_decode_relayed_raises_only_wire_error(data: bytes) -> None:
    with contextlib.suppress(wire.WireError):
        relaytrailer.decode_relayed(data + b"RLS")


@given(st.integers(0, 700), st.binary(min_size=1, max_size=4))
def test_fuzz_damaged_signed_trailers(keys: Keys, relay: Credential, at: int, junk: bytes
                                      ) -> None:
    plain = wire.decode_datagram(announcement(keys))
    data = relaytrailer.append(plain, 5555, RELAY_ADDR, relay.cert_der, relay.key)
    at = len(data) - 1 - at % len(data)
    damaged = data[:at] + junk + data[at + len(junk):]
    try:
        dgram, trailer = relaytrailer.decode_relayed(damaged)
    except wire.WireError:
        return
    # (damage to the signed part is the client signature's business, checked before)
    if trailer is not None and damaged[len(plain.signed_part):] != data[len(plain.signed_part):]:
        with pytest.raises(Rejected):
            connect_back_allowed(dgram, trailer, RELAY_ADDR, checker(keys))


def test_oversized_input_is_refused() -> None:
    with pytest.raises(wire.WireError, match="exceeds"):
        relaytrailer.decode_relayed(b"x" * (relaytrailer.MAX_RELAYED + 1))


# -- the worker's rule --------------------------------------------------------------------


def test_a_genuine_signed_trailer_is_accepted(keys: Keys, relay: Credential) -> None:
    data = relayed(wire.decode_datagram(announcement(keys)), 5555, RELAY_ADDR, relay)
    dgram, trailer = relaytrailer.decode_relayed(data)
    connect_back_allowed(dgram, trailer, RELAY_ADDR, checker(keys))


def test_forged_trailers_are_refused(keys: Keys, relay: Credential, other_keys: Keys
                                     ) -> None:
    plain = wire.decode_datagram(announcement(keys))
    certs = checker(keys)
    # the attack of issue P10 item 3: a captured announcement, an unsigned trailer
    forged = wire.with_relay(plain, 22)
    dgram, trailer = relaytrailer.decode_relayed(forged)
    with pytest.raises(Rejected, match=r"unsigned relay trailer from 10\.9\.9\.9, which is not "
                       "a configured relay"):
        connect_back_allowed(dgram, trailer, "10.9.9.9", certs)
    connect_back_allowed(dgram, trailer, "10.9.9.9", certs, relays={"10.9.9.9"})
    # a genuine signed trailer, replayed from a spoofed source
    genuine = relayed(plain, 5555, RELAY_ADDR, relay)
    dgram, trailer = relaytrailer.decode_relayed(genuine)
    with pytest.raises(Rejected,
                       match=r"names 10\.1\.0\.1, but the datagram came from 10\.9\.9\.9"):
        connect_back_allowed(dgram, trailer, "10.9.9.9", certs)
    # its port changed
    block_start = len(plain.signed_part) + len(plain.signature)
    tampered = bytearray(genuine)
    tampered[block_start + 1 : block_start + 3] = (22).to_bytes(2, "big")
    dgram, trailer = relaytrailer.decode_relayed(bytes(tampered))
    assert dgram.relay_port == 22
    with pytest.raises(Rejected, match="bad signature on the relay trailer of 'gw'"):
        connect_back_allowed(dgram, trailer, RELAY_ADDR, certs)
    # moved onto another announcement
    moved = announcement(keys)[:] + genuine[block_start:]
    dgram, trailer = relaytrailer.decode_relayed(moved)
    with pytest.raises(Rejected, match="bad signature"):
        connect_back_allowed(dgram, trailer, RELAY_ADDR, certs)
    # signed with a client credential, or with another application's relay
    for signer, reason in [(load_credential(keys.client, "client"), "not a relay credential"),
                           (credential(other_keys, "relay", "gw"),
                            "not issued by the application CA")]:
        dgram, trailer = relaytrailer.decode_relayed(relayed(plain, 5555, RELAY_ADDR, signer))
        with pytest.raises(Rejected, match=reason):
            connect_back_allowed(dgram, trailer, RELAY_ADDR, certs)


def test_a_revoked_relay_is_refused(keys: Keys, relay: Credential) -> None:
    data = relayed(wire.decode_datagram(announcement(keys)), 5555, RELAY_ADDR, relay)
    dgram, trailer = relaytrailer.decode_relayed(data)
    revoked = checker(keys, Revoked(frozenset({relay.cert.serial_number})))
    with pytest.raises(Rejected, match=r"relay certificate 'gw' .* is revoked"):
        connect_back_allowed(dgram, trailer, RELAY_ADDR, revoked)


def test_tunnel_trailers_and_plain_datagrams_pass(keys: Keys) -> None:
    plain = wire.decode_datagram(announcement(keys))
    connect_back_allowed(plain, None, "10.0.0.5", checker(keys))
    tunnel = wire.decode_datagram(wire.with_relay(plain, 0))
    connect_back_allowed(tunnel, None, "10.7.7.7", checker(keys))


def test_the_workers_announce_checker_applies_the_rule(keys: Keys, relay: Credential) -> None:
    """AnnounceChecker (what the worker calls) refuses the forged trailer and accepts the
    genuine one, which tells the worker to connect to the relay's port."""
    worker = load_credential(keys.worker, "worker")
    check = AnnounceChecker(worker)
    plain = wire.decode_datagram(announcement(keys))
    forged = check.decode(wire.with_relay(plain, 22))
    assert forged is not None
    with pytest.raises(Rejected, match="unsigned relay trailer"):
        check.check_announce(forged, "10.9.9.9")
    genuine = check.decode(relayed(plain, 5555, RELAY_ADDR, relay))
    assert genuine is not None
    _, client = check.check_announce(genuine, RELAY_ADDR)
    assert genuine.relay_port == 5555 and client.info.role == "client"
