"""rexnet's signed datagrams (UDP, version 1): announce, taken, alert, status, job call.
No I/O.

Layout::

    "RXN" | version u8 | kind u8 | app_id (16 bytes)
    | body_len u16 | body (JSON object, UTF-8)
    | cert_len u16 | cert (DER, may be empty)
    | signature (64 bytes, Ed25519 over everything before it)
    [ "RLY" | port u16 ]   (a relay's trailer, outside the signed part)

The decoder is bounded: a datagram longer than MAX_DATAGRAM, or anything malformed,
raises WireError and nothing else.  The signature is checked by the receiver
(rexnet.net.announce), over Datagram.signed_part.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, ClassVar, Protocol

from rexnet.protocol.fields import (
    WireError,
    dump_json,
    float_field,
    get_field,
    hex_id_field,
    int_field,
    load_json,
    placement,
    str_field,
    str_list_field,
)

MAGIC = b"RXN"
VERSION = 1
MAX_DATAGRAM = 4096
MAX_BODY = 1024
MAX_CERT = 2048
SIG_LEN = 64
APP_ID_LEN = 16
MAX_ADDRS = 8

_DGRAM_HEAD = struct.Struct("!3sBB16sH")
_U16 = struct.Struct("!H")


class Kind(IntEnum):
    ANNOUNCE = 1
    TAKEN = 2
    ALERT = 3
    STATUS = 4
    STATUS_REPLY = 5
    JOB_CALL = 12


@dataclass(frozen=True)
class Announce:
    """A client asks workers of its application to connect back to ADDRS:PORT.

    Optional (sent when not the default): the job takes CPUS slots, needs MEM bytes of
    free memory, and may run only on the WORKERS named (none: on any).
    """

    KIND: ClassVar[Kind] = Kind.ANNOUNCE
    job_id: bytes
    seq: int
    ts_ms: int
    port: int
    addrs: tuple[str, ...]
    cpus: int = 1
    mem: int = 0
    workers: tuple[str, ...] = ()

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"job": self.job_id.hex(), "seq": self.seq, "ts": self.ts_ms,
                                "port": self.port, "addrs": list(self.addrs)}
        if self.cpus != 1:
            body["cpus"] = self.cpus
        if self.mem:
            body["mem"] = self.mem
        if self.workers:
            body["workers"] = list(self.workers)
        return body

    @classmethod
    def from_body(cls, obj: dict[str, Any]) -> Announce:
        addrs = str_list_field(obj, "addrs", MAX_ADDRS, 45)
        for addr in addrs:
            try:
                ipaddress.ip_address(addr)
            except ValueError:
                raise WireError("field 'addrs' holds a non-IP address") from None
        return cls(hex_id_field(obj, "job"), int_field(obj, "seq", 0, 0xFFFF),
                   int_field(obj, "ts", 0, 2**63 - 1), int_field(obj, "port", 1, 0xFFFF),
                   addrs, *placement(obj))


@dataclass(frozen=True)
class Taken:
    """A client tells workers that its job JOB_ID has a worker: cancel connect-backs.

    EARLY: sent when the first connection was accepted, before its TLS handshake: cancel
    only the connect-backs not yet begun (the client re-announces under a new job id if
    that connection is not verified soon; rexnet.client.connectback)."""

    KIND: ClassVar[Kind] = Kind.TAKEN
    job_id: bytes
    ts_ms: int
    answered: int = 0  # connect-backs the client had when it chose (0: not said)
    early: bool = False

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"job": self.job_id.hex(), "ts": self.ts_ms}
        if self.answered:
            body["answered"] = self.answered
        if self.early:
            body["early"] = 1
        return body

    @classmethod
    def from_body(cls, obj: dict[str, Any]) -> Taken:
        answered = int_field(obj, "answered", 0, 0xFFFFFF) if "answered" in obj else 0
        early = int_field(obj, "early", 0, 1) == 1 if "early" in obj else False
        return cls(hex_id_field(obj, "job"), int_field(obj, "ts", 0, 2**63 - 1), answered,
                   early)


ALERT_EVENTS = ("job-started", "job-finished", "complaint", "worker-status")


@dataclass(frozen=True)
class Alert:
    """A worker's or client's report to crat: a job started or finished, or a complaint.

    FIELDS carries the event's details (job, worker, client, addresses, status, duration,
    bytes, what went wrong): short strings and numbers only.
    """

    KIND: ClassVar[Kind] = Kind.ALERT
    ts_ms: int
    event: str
    fields: tuple[tuple[str, str | int | float], ...] = ()

    def body(self) -> dict[str, Any]:
        return {"ts": self.ts_ms, "event": self.event, "fields": dict(self.fields)}

    @classmethod
    def from_body(cls, obj: dict[str, Any]) -> Alert:
        event = str_field(obj, "event", 32)
        if event not in ALERT_EVENTS:
            raise WireError("unknown alert event")
        raw = get_field(obj, "fields", dict)
        if len(raw) > 24:
            raise WireError("too many alert fields")
        fields = []
        for key, value in sorted(raw.items()):
            ok_value = (isinstance(value, str) and len(value) <= 256) or (
                isinstance(value, int | float) and not isinstance(value, bool)
                and -1e15 < value < 1e15)
            if not (isinstance(key, str) and 0 < len(key) <= 32 and ok_value):
                raise WireError("bad alert field")
            fields.append((key, value))
        return cls(int_field(obj, "ts", 0, 2**63 - 1), event, tuple(fields))


@dataclass(frozen=True)
class StatusQuery:
    """A client asks every worker of its application to report to PORT (from ADDRS)."""

    KIND: ClassVar[Kind] = Kind.STATUS
    nonce: bytes
    ts_ms: int
    port: int
    addrs: tuple[str, ...]

    def body(self) -> dict[str, Any]:
        return {"nonce": self.nonce.hex(), "ts": self.ts_ms, "port": self.port,
                "addrs": list(self.addrs)}

    @classmethod
    def from_body(cls, obj: dict[str, Any]) -> StatusQuery:
        ann = Announce.from_body({"job": obj.get("nonce"), "seq": 0, "ts": obj.get("ts"),
                                  "port": obj.get("port"), "addrs": obj.get("addrs")})
        return cls(ann.job_id, ann.ts_ms, ann.port, ann.addrs)


@dataclass(frozen=True)
class StatusReply:
    """A worker's answer to a StatusQuery (signed by the worker)."""

    KIND: ClassVar[Kind] = Kind.STATUS_REPLY
    nonce: bytes
    ts_ms: int
    worker: str
    version: str
    load: float
    cpus: int
    speed: float
    slots: int
    running: int
    free_memory: int
    jobs_run: int
    uptime: float
    used: int = -1
    """Slots in use (jobs count their --cpus; -1: not said, count running)."""
    delay_ms: float = -1.0
    """The delay an announcement would earn now, before jitter (-1: not said)."""
    queued: int = 0  # jobs waiting in the worker's queue for a slot

    def body(self) -> dict[str, Any]:
        body = {k: v for k, v in self.__dict__.items()}
        body["nonce"] = self.nonce.hex()
        return body

    @classmethod
    def from_body(cls, o: dict[str, Any]) -> StatusReply:
        return cls(hex_id_field(o, "nonce"), int_field(o, "ts_ms", 0, 2**63 - 1),
                   str_field(o, "worker"), str_field(o, "version", 64), float_field(o, "load"),
                   int_field(o, "cpus", 0, 1 << 20), float_field(o, "speed"),
                   int_field(o, "slots", 0, 1 << 20), int_field(o, "running", 0, 1 << 20),
                   int_field(o, "free_memory", 0, 2**62), int_field(o, "jobs_run", 0, 2**62),
                   float_field(o, "uptime"),
                   int_field(o, "used", -1, 1 << 20) if "used" in o else -1,
                   float_field(o, "delay_ms") if "delay_ms" in o else -1.0,
                   int_field(o, "queued", 0, 1 << 20) if "queued" in o else 0)

    @property
    def slots_used(self) -> int:
        """Slots in use (jobs count their CPUs), or the running jobs if not said."""
        return self.running if self.used < 0 else self.used


@dataclass(frozen=True)
class JobCall:
    """A client asks the worker that has detached job JOB (every worker: JOB empty) to
    connect back to ADDRS:PORT, where it says what it wants (a JOB_REQUEST frame)."""

    KIND: ClassVar[Kind] = Kind.JOB_CALL
    nonce: bytes
    ts_ms: int
    port: int
    addrs: tuple[str, ...]
    job: str = ""

    def body(self) -> dict[str, Any]:
        return {"nonce": self.nonce.hex(), "ts": self.ts_ms, "port": self.port,
                "addrs": list(self.addrs), "job": self.job}

    @classmethod
    def from_body(cls, obj: dict[str, Any]) -> JobCall:
        query = StatusQuery.from_body(obj)
        job = str_field(obj, "job", 64)
        if not all(c in "0123456789abcdef" for c in job):
            raise WireError("field 'job' is not a job id")
        return cls(query.nonce, query.ts_ms, query.port, query.addrs, job)


DatagramMessage = Announce | Taken | Alert | StatusQuery | StatusReply | JobCall
_DATAGRAM_TYPES: dict[int, Any] = {
    t.KIND: t for t in (Announce, Taken, Alert, StatusQuery, StatusReply, JobCall)
}


@dataclass(frozen=True)
class Datagram:
    """A decoded datagram; the signature is NOT yet checked (see signed_part)."""

    message: DatagramMessage
    app_id: bytes
    cert_der: bytes
    signed_part: bytes
    signature: bytes
    # set by a relay: cproxy's port to connect back to (at the datagram's source), or 0
    # from a tunnel (connect back to the client's signed address)
    relay_port: int | None = None


RELAY_MAGIC = b"RLY"
_RELAY = struct.Struct("!3sH")


def split_relay(data: bytes) -> tuple[bytes, int | None]:
    """(the signed datagram, the relay port of its trailer or None).

    A relay appends ``"RLY" | port u16`` after the signature: outside the signed part, so
    signatures stay valid across relays. It can only send a worker to the relay's own
    address (the datagram's source) at that port, or with port 0 (a tunnel) to the
    address the client signed.
    """
    if len(data) > _RELAY.size and data[-_RELAY.size : -2] == RELAY_MAGIC:
        return data[: -_RELAY.size], _RELAY.unpack(data[-_RELAY.size :])[1]
    return data, None


def with_relay(dgram: Datagram, port: int) -> bytes:
    """DGRAM as a relay listening on PORT re-emits it (replacing any earlier trailer)."""
    return dgram.signed_part + dgram.signature + _RELAY.pack(RELAY_MAGIC, port)


class Signer(Protocol):
    def sign(self, data: bytes) -> bytes: ...


def encode_datagram(
    message: DatagramMessage, app_id: bytes, signer: Signer, cert_der: bytes = b""
) -> bytes:
    body = dump_json(message.body())
    if len(app_id) != APP_ID_LEN or len(body) > MAX_BODY or len(cert_der) > MAX_CERT:
        raise WireError("datagram fields exceed their bounds")
    signed = (
        _DGRAM_HEAD.pack(MAGIC, VERSION, message.KIND, app_id, len(body))
        + body + _U16.pack(len(cert_der)) + cert_der
    )
    signature = signer.sign(signed)
    if len(signature) != SIG_LEN:
        raise WireError("signature has the wrong length")
    return signed + signature


def peek_app_id(data: bytes) -> bytes | None:
    """The application id of a datagram, cheaply, or None if it is not one of ours."""
    if len(data) < _DGRAM_HEAD.size or data[:3] != MAGIC:
        return None
    return bytes(data[5:21])


def decode_datagram(data: bytes) -> Datagram:
    """Parse a datagram; raise WireError if it is malformed or out of bounds."""
    if len(data) > MAX_DATAGRAM:
        raise WireError(f"datagram of {len(data)} bytes exceeds {MAX_DATAGRAM}")
    if len(data) < _DGRAM_HEAD.size + 2 + SIG_LEN:
        raise WireError("datagram too short")
    magic, version, kind, app_id, body_len = _DGRAM_HEAD.unpack_from(data)
    if magic != MAGIC:
        raise WireError("not a rexnet datagram")
    if version != VERSION:
        raise WireError(f"unsupported datagram version {version}")
    message_type = _DATAGRAM_TYPES.get(kind)
    if message_type is None:
        raise WireError(f"unknown datagram kind {kind}")
    if body_len > MAX_BODY:
        raise WireError("datagram body too long")
    offset = _DGRAM_HEAD.size
    body = data[offset : offset + body_len]
    offset += body_len
    if len(data) < offset + 2 + SIG_LEN:
        raise WireError("datagram truncated")
    (cert_len,) = _U16.unpack_from(data, offset)
    offset += 2
    relay_port = None
    end = offset + cert_len + SIG_LEN
    if len(data) == end + _RELAY.size:
        data, relay_port = split_relay(data)
    if cert_len > MAX_CERT or len(data) != end:
        raise WireError("datagram length does not match its fields")
    cert_der = bytes(data[offset : offset + cert_len])
    offset += cert_len
    message = message_type.from_body(load_json(bytes(body)))
    return Datagram(message, bytes(app_id), cert_der, bytes(data[:offset]),
                    bytes(data[offset:]), relay_port)

