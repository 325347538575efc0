"""rexnet's wire formats: signed datagrams and the job channel's frames.  No I/O here.

Datagrams (UDP, version 1)::

    "RXN" | version u8 | kind u8 | app_id (16 bytes)
    | body_len u16 | body (JSON object, UTF-8)
    | cert_len u16 | cert (DER, may be empty)
    | signature (64 bytes, Ed25519 over everything before it)

Frames (inside mutual TLS)::

    kind u8 | stream u8 | length u32 | payload

DATA frames carry raw bytes of one stream (a file descriptor number); every other
kind carries a small JSON object.  Decoders are bounded: a datagram longer than
MAX_DATAGRAM, a frame longer than MAX_FRAME (or a control frame longer than
MAX_CONTROL), or anything malformed raises WireError and nothing else.
"""

from __future__ import annotations

import ipaddress
import json
import struct
from dataclasses import MISSING, dataclass, fields
from enum import IntEnum
from typing import Any, ClassVar, Protocol, TypeVar

MAGIC = b"RXN"
VERSION = 1
MAX_DATAGRAM = 4096
MAX_BODY = 1024
MAX_CERT = 2048
SIG_LEN = 64
APP_ID_LEN = 16
MAX_ADDRS = 8

FRAME_HEADER = struct.Struct("!BBI")
MAX_FRAME = 1 << 20
MAX_CONTROL = 64 * 1024
MAX_DATA_CHUNK = 64 * 1024
MAX_STREAM = 255

_DGRAM_HEAD = struct.Struct("!3sBB16sH")
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")


class WireError(ValueError):
    """Input that is not a well-formed rexnet datagram or frame."""


# -- validation helpers ---------------------------------------------------------------

T = TypeVar("T")


def _get(obj: dict[str, Any], key: str, kind: type[T]) -> T:
    value = obj.get(key)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise WireError(f"field {key!r} missing or not {kind.__name__}")
    return value


def _int(obj: dict[str, Any], key: str, lo: int, hi: int) -> int:
    value = _get(obj, key, int)
    if not lo <= value <= hi:
        raise WireError(f"field {key!r} out of range")
    return value


def _str(obj: dict[str, Any], key: str, limit: int = 256) -> str:
    value = _get(obj, key, str)
    if len(value) > limit:
        raise WireError(f"field {key!r} too long")
    return value


def _float(obj: dict[str, Any], key: str) -> float:
    value = obj.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise WireError(f"field {key!r} missing or not a number")
    if not -1e12 < value < 1e12:
        raise WireError(f"field {key!r} out of range")
    return float(value)


def _str_list(obj: dict[str, Any], key: str, count: int, limit: int) -> tuple[str, ...]:
    value = _get(obj, key, list)
    if len(value) > count or not all(isinstance(v, str) and len(v) <= limit for v in value):
        raise WireError(f"field {key!r} is not a list of at most {count} short strings")
    return tuple(value)


def _load_json(data: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise WireError("body is not UTF-8 JSON") from None
    if not isinstance(obj, dict):
        raise WireError("body is not a JSON object")
    return obj


def _dump_json(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


def _hex_id(obj: dict[str, Any], key: str) -> bytes:
    text = _str(obj, key, 32)
    try:
        value = bytes.fromhex(text)
    except ValueError:
        raise WireError(f"field {key!r} is not hex") from None
    if len(value) != 16:
        raise WireError(f"field {key!r} is not 16 bytes")
    return value


# -- datagrams ------------------------------------------------------------------------


class Kind(IntEnum):
    ANNOUNCE = 1
    TAKEN = 2
    ALERT = 3
    STATUS = 4
    STATUS_REPLY = 5


@dataclass(frozen=True)
class Announce:
    """A client asks workers of its application to connect back to ADDRS:PORT."""

    KIND: ClassVar[Kind] = Kind.ANNOUNCE
    job_id: bytes
    seq: int
    ts_ms: int
    port: int
    addrs: tuple[str, ...]

    def body(self) -> dict[str, Any]:
        return {"job": self.job_id.hex(), "seq": self.seq, "ts": self.ts_ms,
                "port": self.port, "addrs": list(self.addrs)}

    @classmethod
    def from_body(cls, obj: dict[str, Any]) -> Announce:
        addrs = _str_list(obj, "addrs", MAX_ADDRS, 45)
        for addr in addrs:
            try:
                ipaddress.ip_address(addr)
            except ValueError:
                raise WireError("field 'addrs' holds a non-IP address") from None
        return cls(_hex_id(obj, "job"), _int(obj, "seq", 0, 0xFFFF),
                   _int(obj, "ts", 0, 2**63 - 1), _int(obj, "port", 1, 0xFFFF), addrs)


@dataclass(frozen=True)
class Taken:
    """A client tells workers that its job JOB_ID has a worker: cancel connect-backs."""

    KIND: ClassVar[Kind] = Kind.TAKEN
    job_id: bytes
    ts_ms: int
    answered: int = 0  # connect-backs the client had when it chose (0: not said)

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"job": self.job_id.hex(), "ts": self.ts_ms}
        if self.answered:
            body["answered"] = self.answered
        return body

    @classmethod
    def from_body(cls, obj: dict[str, Any]) -> Taken:
        answered = _int(obj, "answered", 0, 0xFFFFFF) if "answered" in obj else 0
        return cls(_hex_id(obj, "job"), _int(obj, "ts", 0, 2**63 - 1), answered)


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
        event = _str(obj, "event", 32)
        if event not in ALERT_EVENTS:
            raise WireError("unknown alert event")
        raw = _get(obj, "fields", dict)
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
        return cls(_int(obj, "ts", 0, 2**63 - 1), event, tuple(fields))


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

    def body(self) -> dict[str, Any]:
        body = {k: v for k, v in self.__dict__.items()}
        body["nonce"] = self.nonce.hex()
        return body

    @classmethod
    def from_body(cls, o: dict[str, Any]) -> StatusReply:
        return cls(_hex_id(o, "nonce"), _int(o, "ts_ms", 0, 2**63 - 1), _str(o, "worker"),
                   _str(o, "version", 64), _float(o, "load"), _int(o, "cpus", 0, 1 << 20),
                   _float(o, "speed"), _int(o, "slots", 0, 1 << 20),
                   _int(o, "running", 0, 1 << 20), _int(o, "free_memory", 0, 2**62),
                   _int(o, "jobs_run", 0, 2**62), _float(o, "uptime"))


DatagramMessage = Announce | Taken | Alert | StatusQuery | StatusReply
_DATAGRAM_TYPES: dict[int, Any] = {
    t.KIND: t for t in (Announce, Taken, Alert, StatusQuery, StatusReply)
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
    body = _dump_json(message.body())
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
    message = message_type.from_body(_load_json(bytes(body)))
    return Datagram(message, bytes(app_id), cert_der, bytes(data[:offset]),
                    bytes(data[offset:]), relay_port)


# -- frames ---------------------------------------------------------------------------


class FrameKind(IntEnum):
    DATA = 0
    EOF = 1
    WINDOW = 2
    SHUT = 3
    HELLO = 10
    START = 11
    STARTED = 12
    BUSY = 13
    EXIT = 14
    ERROR = 15
    SIGNAL = 16
    WINSIZE = 17
    PING = 18


@dataclass(frozen=True)
class Data:
    """Bytes of one stream (a file descriptor of the job)."""

    stream: int
    payload: bytes


@dataclass(frozen=True)
class Eof:
    """The sender will send no more data on STREAM."""

    stream: int


@dataclass(frozen=True)
class Shut:
    """The sender will read no more of STREAM: the peer should stop sending it."""

    stream: int


@dataclass(frozen=True)
class Window:
    """The receiver has consumed CREDIT more bytes of STREAM: the sender may send them."""

    stream: int
    credit: int


@dataclass(frozen=True)
class Hello:
    """Worker to client, right after the handshake: who it is and why it answered."""

    KIND: ClassVar[FrameKind] = FrameKind.HELLO
    worker: str
    version: str
    load: float
    delay_ms: float
    slots: int
    running: int

    @classmethod
    def from_json(cls, o: dict[str, Any]) -> Hello:
        return cls(_str(o, "worker"), _str(o, "version", 64), _float(o, "load"),
                   _float(o, "delay_ms"), _int(o, "slots", 0, 1 << 20),
                   _int(o, "running", 0, 1 << 20))


FD_MODES = ("r", "w", "rw")
MAX_ENV = 256


@dataclass(frozen=True)
class Start:
    """Client to the chosen worker: run the job.

    ARGS are appended to the worker's command (if it allows that); ENV holds variables the
    client asks for; TTY asks for a pseudo-terminal of ROWS x COLS with TERM; FDS maps
    further descriptor numbers to "r" (the job reads), "w" (the job writes) or "rw".
    KEEP asks the worker to keep the channel open after EXIT, idle, for the client's next
    START (a warm channel; the worker sends fresh HELLOs while it is idle).
    """

    KIND: ClassVar[FrameKind] = FrameKind.START
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    tty: bool = False
    term: str = ""
    rows: int = 0
    cols: int = 0
    fds: tuple[tuple[int, str], ...] = ()
    keep: bool = False

    @classmethod
    def from_json(cls, o: dict[str, Any]) -> Start:
        env = _pairs(o.get("env", []), MAX_ENV)
        fds = []
        for fd, mode in _pairs(o.get("fds", []), 64):
            if not isinstance(fd, int) or isinstance(fd, bool) or not 3 <= fd <= MAX_STREAM:
                raise WireError("field 'fds' holds a bad descriptor number")
            if mode not in FD_MODES:
                raise WireError("field 'fds' holds a bad mode")
            fds.append((fd, mode))
        for name, value in env:
            if not (isinstance(name, str) and isinstance(value, str) and 0 < len(name) <= 256
                    and len(value) <= 65536 and "=" not in name and "\0" not in name + value):
                raise WireError("field 'env' holds a bad variable")
        tty = o.get("tty", False)
        if not isinstance(tty, bool):
            raise WireError("field 'tty' is not a boolean")
        keep = o.get("keep", False)
        if not isinstance(keep, bool):
            raise WireError("field 'keep' is not a boolean")
        args = _str_list(o, "args", 4096, 65536) if "args" in o else ()
        return cls(args, tuple(env), tty,
                   _str(o, "term", 64) if "term" in o else "",
                   _int(o, "rows", 0, 0xFFFF) if "rows" in o else 0,
                   _int(o, "cols", 0, 0xFFFF) if "cols" in o else 0, tuple(fds), keep)


def _pairs(value: Any, limit: int) -> list[tuple[Any, Any]]:
    if not isinstance(value, list) or len(value) > limit:
        raise WireError(f"expected a list of at most {limit} pairs")
    if not all(isinstance(v, list) and len(v) == 2 for v in value):
        raise WireError("expected pairs")
    return [(a, b) for a, b in value]


@dataclass(frozen=True)
class Started:
    """Worker to client: the job's process runs."""

    KIND: ClassVar[FrameKind] = FrameKind.STARTED
    job: str
    refused_env: tuple[str, ...] = ()

    @classmethod
    def from_json(cls, o: dict[str, Any]) -> Started:
        refused = _str_list(o, "refused_env", MAX_ENV, 256) if "refused_env" in o else ()
        return cls(_str(o, "job", 64), refused)


@dataclass(frozen=True)
class Busy:
    """Client to a worker that lost the race: the job went elsewhere."""

    KIND: ClassVar[FrameKind] = FrameKind.BUSY

    @classmethod
    def from_json(cls, o: dict[str, Any]) -> Busy:
        return cls()


@dataclass(frozen=True)
class Exit:
    """Worker to client: the job ended with exit CODE, or was killed by SIGNAL."""

    KIND: ClassVar[FrameKind] = FrameKind.EXIT
    code: int | None
    signal: int | None
    limit: str = ""  # "time" or "memory" when the worker ended the job for a limit

    @classmethod
    def from_json(cls, o: dict[str, Any]) -> Exit:
        code = _int(o, "code", 0, 255) if o.get("code") is not None else None
        sig = _int(o, "signal", 1, 127) if o.get("signal") is not None else None
        if (code is None) == (sig is None):
            raise WireError("EXIT needs exactly one of code and signal")
        limit = _str(o, "limit", 16) if "limit" in o else ""
        if limit not in LIMITS:
            raise WireError("EXIT names an unknown limit")
        return cls(code, sig, limit)


LIMITS = ("", "time", "memory")


@dataclass(frozen=True)
class Error:
    """Either side: the job cannot go on; REASON is a short token, MESSAGE for people."""

    KIND: ClassVar[FrameKind] = FrameKind.ERROR
    reason: str
    message: str

    @classmethod
    def from_json(cls, o: dict[str, Any]) -> Error:
        return cls(_str(o, "reason", 64), _str(o, "message", 1024))


@dataclass(frozen=True)
class Signal:
    """Client to worker: deliver signal NUMBER to the job's process group."""

    KIND: ClassVar[FrameKind] = FrameKind.SIGNAL
    number: int

    @classmethod
    def from_json(cls, o: dict[str, Any]) -> Signal:
        return cls(_int(o, "number", 1, 64))


@dataclass(frozen=True)
class Winsize:
    """Client to worker: the client's terminal is now ROWS x COLS."""

    KIND: ClassVar[FrameKind] = FrameKind.WINSIZE
    rows: int
    cols: int

    @classmethod
    def from_json(cls, o: dict[str, Any]) -> Winsize:
        return cls(_int(o, "rows", 0, 0xFFFF), _int(o, "cols", 0, 0xFFFF))


@dataclass(frozen=True)
class Ping:
    """Either side, when it has sent nothing for a while: I am still here."""

    KIND: ClassVar[FrameKind] = FrameKind.PING

    @classmethod
    def from_json(cls, o: dict[str, Any]) -> Ping:
        return cls()


Control = Hello | Start | Started | Busy | Exit | Error | Signal | Winsize | Ping
Frame = Data | Eof | Shut | Window | Control
_CONTROL_TYPES: dict[int, Any] = {
    t.KIND: t for t in (Hello, Start, Started, Busy, Exit, Error, Signal, Winsize, Ping)
}


def encode_frame(frame: Frame) -> bytes:
    """The bytes of one frame."""
    if isinstance(frame, Data):
        if len(frame.payload) > MAX_FRAME:
            raise WireError("data frame too long")
        return FRAME_HEADER.pack(FrameKind.DATA, frame.stream, len(frame.payload)) + frame.payload
    if isinstance(frame, Eof):
        return FRAME_HEADER.pack(FrameKind.EOF, frame.stream, 0)
    if isinstance(frame, Shut):
        return FRAME_HEADER.pack(FrameKind.SHUT, frame.stream, 0)
    if isinstance(frame, Window):
        return FRAME_HEADER.pack(FrameKind.WINDOW, frame.stream, 4) + _U32.pack(frame.credit)
    body = _dump_json({f.name: getattr(frame, f.name) for f in fields(frame)
                       if f.default is MISSING or getattr(frame, f.name) != f.default})
    if len(body) > MAX_CONTROL:
        raise WireError("control frame too long")
    return FRAME_HEADER.pack(frame.KIND, 0, len(body)) + body


def _parse(kind: int, stream: int, payload: bytes) -> Frame:
    if kind == FrameKind.DATA:
        return Data(stream, payload)
    if kind in (FrameKind.EOF, FrameKind.SHUT):
        if payload:
            raise WireError("EOF or SHUT frame with a payload")
        return Eof(stream) if kind == FrameKind.EOF else Shut(stream)
    if kind == FrameKind.WINDOW:
        if len(payload) != 4:
            raise WireError("WINDOW frame of the wrong size")
        return Window(stream, _U32.unpack(payload)[0])
    control = _CONTROL_TYPES.get(kind)
    if control is None:
        raise WireError(f"unknown frame kind {kind}")
    if len(payload) > MAX_CONTROL:
        raise WireError("control frame too long")
    result: Frame = control.from_json(_load_json(payload))
    return result


class FrameDecoder:
    """Turns a byte stream into frames; holds at most one frame's bytes beyond a header."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Frame]:
        """Add DATA and return every complete frame; raise WireError on bad input."""
        buf = self._buffer
        buf += data
        frames: list[Frame] = []
        offset = 0
        size = FRAME_HEADER.size
        while len(buf) - offset >= size:
            kind, stream, length = FRAME_HEADER.unpack_from(buf, offset)
            if length > MAX_FRAME:
                raise WireError(f"frame of {length} bytes exceeds {MAX_FRAME}")
            if kind != FrameKind.DATA and length > MAX_CONTROL:
                raise WireError("control frame too long")
            end = offset + size + length
            if len(buf) < end:
                break
            with memoryview(buf) as view:  # one copy of the payload, not two
                payload = bytes(view[offset + size : end])
            frames.append(_parse(kind, stream, payload))
            offset = end
        if offset:
            del buf[:offset]
        return frames

    @property
    def buffered(self) -> int:
        return len(self._buffer)
