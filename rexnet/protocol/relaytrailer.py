"""The signed relay trailer: how a cproxy tells workers where to connect back.  No I/O.

A cproxy re-emits a client's datagram unchanged and appends, after its signature::

    block | block_len u16 | "RLS"

    block = version u8 (1) | port u16 | addr_len u8 | addr (ASCII IP)
            | cert_len u16 | cert (DER, the relay's certificate) | signature (64 bytes)

The signature (Ed25519, by the relay credential's key) covers DOMAIN, the datagram's own
signature and the block before the signature: it binds the trailer to that one datagram
and says "connect back to ADDR:PORT", where ADDR is the relay's own address the datagram
was sent from.  A worker checks the certificate (issued by the application CA, role
relay, valid, not revoked), the signature, and that the datagram came from ADDR (see
rexnet.net.trailers).  The older unsigned trailer (``"RLY" | port``, wire.with_relay)
stays for tunnels (port 0: connect back to the address the client signed).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import struct
from dataclasses import dataclass

from rexnet.protocol import wire

MAGIC = b"RLS"
VERSION = 1
DOMAIN = b"rexnet relay trailer v1\0"
_TAIL = struct.Struct("!H3s")
_HEAD = struct.Struct("!BHB")
_U16 = struct.Struct("!H")
MAX_ADDR = 45
MAX_BLOCK = _HEAD.size + MAX_ADDR + _U16.size + wire.MAX_CERT + wire.SIG_LEN
MAX_RELAYED = wire.MAX_DATAGRAM + MAX_BLOCK + _TAIL.size


@dataclass(frozen=True)
class SignedTrailer:
    """A relay's signed trailer (the signature is NOT yet checked)."""

    port: int
    addr: str
    cert_der: bytes
    signature: bytes

    def signed_bytes(self, datagram_signature: bytes) -> bytes:
        """What the relay signs: DOMAIN, the datagram's signature, the block's fields."""
        return DOMAIN + datagram_signature + _fields(self.port, self.addr, self.cert_der)


def _fields(port: int, addr: str, cert_der: bytes) -> bytes:
    raw = addr.encode("ascii")
    return _HEAD.pack(VERSION, port, len(raw)) + raw + _U16.pack(len(cert_der)) + cert_der


def append(dgram: wire.Datagram, port: int, addr: str, cert_der: bytes,
           signer: wire.Signer) -> bytes:
    """DGRAM as the relay listening on ADDR:PORT re-emits it (any earlier trailer gone)."""
    ipaddress.ip_address(addr)  # ValueError: only addresses are signed, never names
    if not 0 < port < 65536 or len(cert_der) > wire.MAX_CERT:
        raise wire.WireError("relay trailer fields exceed their bounds")
    fields = _fields(port, addr, cert_der)
    signature = signer.sign(DOMAIN + dgram.signature + fields)
    if len(signature) != wire.SIG_LEN:
        raise wire.WireError("signature has the wrong length")
    block = fields + signature
    return dgram.signed_part + dgram.signature + block + _TAIL.pack(len(block), MAGIC)


def _parse_block(block: bytes) -> SignedTrailer:
    if len(block) < _HEAD.size + _U16.size + wire.SIG_LEN:
        raise wire.WireError("relay trailer too short")
    version, port, addr_len = _HEAD.unpack_from(block)
    if version != VERSION:
        raise wire.WireError(f"unsupported relay trailer version {version}")
    offset = _HEAD.size
    if addr_len > MAX_ADDR or port == 0:
        raise wire.WireError("bad relay trailer address")
    try:
        addr = block[offset : offset + addr_len].decode("ascii")
        ipaddress.ip_address(addr)
    except ValueError:
        raise wire.WireError("relay trailer address is not an IP address") from None
    offset += addr_len
    if len(block) < offset + _U16.size:
        raise wire.WireError("relay trailer truncated")
    (cert_len,) = _U16.unpack_from(block, offset)
    offset += _U16.size
    if cert_len > wire.MAX_CERT or len(block) != offset + cert_len + wire.SIG_LEN:
        raise wire.WireError("relay trailer length does not match its fields")
    cert_der = bytes(block[offset : offset + cert_len])
    return SignedTrailer(port, addr, cert_der, bytes(block[offset + cert_len :]))


def decode_relayed(data: bytes) -> tuple[wire.Datagram, SignedTrailer | None]:
    """A datagram with its signed relay trailer, if it has one (then its relay_port is the
    trailer's port); WireError if malformed or out of bounds (MAX_RELAYED in all)."""
    if len(data) > MAX_RELAYED:
        raise wire.WireError(f"relayed datagram of {len(data)} bytes exceeds {MAX_RELAYED}")
    if len(data) > _TAIL.size and data[-3:] == MAGIC:
        size, _ = _TAIL.unpack_from(data, len(data) - _TAIL.size)
        end = len(data) - _TAIL.size - size
        if end > 0 and size <= MAX_BLOCK:
            try:
                trailer = _parse_block(data[end : len(data) - _TAIL.size])
                dgram = wire.decode_datagram(data[:end])
            except wire.WireError:
                pass  # not a trailer after all: a signature may end in "RLS" by chance
            else:
                if dgram.relay_port is None:
                    return dataclasses.replace(dgram, relay_port=trailer.port), trailer
    return wire.decode_datagram(data), None
