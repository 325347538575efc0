"""The job channel's frames (inside mutual TLS) and FrameDecoder.  No I/O.

Layout::

    kind u8 | stream u8 | length u32 | payload

DATA frames carry raw bytes of one stream (a file descriptor number); every other kind
carries a small JSON object.  The decoder is bounded: a frame longer than MAX_FRAME (or a
control frame longer than MAX_CONTROL), or anything malformed, raises WireError and
nothing else.
"""

from __future__ import annotations

import struct
from dataclasses import MISSING, dataclass, fields
from enum import IntEnum
from typing import Any, ClassVar

from rexnet.protocol.fields import (
    MAX_PATH,
    WireError,
    dump_json,
    float_field,
    int_field,
    load_json,
    placement,
    str_field,
    str_list_field,
)
from rexnet.protocol.jobframes import (
    FileData,
    FileWindow,
    JobList,
    JobRequest,
    JobState,
    PutFile,
    file_list,
    pattern_list,
)

FRAME_HEADER = struct.Struct("!BBI")
MAX_FRAME = 1 << 20
MAX_CONTROL = 64 * 1024
MAX_DATA_CHUNK = 64 * 1024
MAX_STREAM = 255
MAX_WAIT_MS = 1e9  # about eleven days: a bound on a worker's estimate of a queue's wait

_U32 = struct.Struct("!I")


class FrameKind(IntEnum):
    DATA = 0
    EOF = 1
    WINDOW = 2
    SHUT = 3
    APART = 4
    HELLO = 10
    START = 11
    STARTED = 12
    BUSY = 13
    EXIT = 14
    ERROR = 15
    SIGNAL = 16
    WINSIZE = 17
    PING = 18
    QUEUED = 19
    PUT_FILE = PutFile.KIND
    FILE_DATA = FileData.KIND
    FILE_WINDOW = FileWindow.KIND
    JOB_REQUEST = JobRequest.KIND
    JOB_LIST = JobList.KIND
    JOB_STATE = JobState.KIND


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
class Apart:
    """STREAM's in-band part ends here; the rest moves on the job's data connection
    (rexnet.net.jobdata). Client to worker: stdin (0), dial PORT. Worker to client:
    stdout (1), PORT 0 asks for the port; the client's answer carries it (0: stay in-band).
    """

    stream: int
    port: int


@dataclass(frozen=True)
class Window:
    """The receiver has consumed CREDIT more bytes of STREAM: the sender may send them."""

    stream: int
    credit: int


@dataclass(frozen=True)
class Hello:
    """Worker to client, right after the handshake: who it is and why it answered.

    A worker with every slot busy answers too, if its queue has room: QUEUED jobs wait
    ahead of this one and WAIT_MS is its estimate of the wait for a slot (0: none).
    """

    KIND: ClassVar[FrameKind] = FrameKind.HELLO
    worker: str
    version: str
    load: float
    delay_ms: float
    slots: int
    running: int
    queued: int = 0
    wait_ms: float = 0.0

    @classmethod
    def from_json(cls, o: dict[str, Any]) -> Hello:
        return cls(str_field(o, "worker"), str_field(o, "version", 64), float_field(o, "load"),
                   float_field(o, "delay_ms"), int_field(o, "slots", 0, 1 << 20),
                   int_field(o, "running", 0, 1 << 20),
                   int_field(o, "queued", 0, 1 << 20) if "queued" in o else 0,
                   _wait_field(o))


def _wait_field(o: dict[str, Any]) -> float:
    wait = float_field(o, "wait_ms") if "wait_ms" in o else 0.0
    if not 0.0 <= wait <= MAX_WAIT_MS:
        raise WireError("field 'wait_ms' is out of range")
    return wait



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
    CWD is the client's working directory (or --cwd's): a command worker runs the job
    there if it has that directory; with CWD_REQUIRED (--cwd) it refuses the job if not.
    CPUS (slots the job takes), MEM (bytes of free memory it needs) and WORKERS (names, if
    only those may run it) repeat the announcement's request, for a warm channel's START.
    DETACH asks for a detached job (its output kept on the worker; EXIT comes at once).
    PUT names the files (name, size) that follow START (PUT_FILE frames) into a fresh
    job directory, the job's working directory; GET the patterns of the files sent back
    from it before EXIT (a job directory also when PUT is empty).
    DATA_TOKEN (64 hex digits, 32 random bytes) and DATA_STREAMS ("i" stdin, "o" stdout,
    or both) offer to move those streams, once they prove big, onto data connections of
    their own (rexnet.net.jobdata; APART frames hand them over): the worker says in
    STARTED which it would take, and presents the token on each; "" and "": no offer (an
    older peer ignores them and the streams stay on the channel).
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
    cwd: str = ""
    cwd_required: bool = False
    cpus: int = 1
    mem: int = 0
    workers: tuple[str, ...] = ()
    detach: bool = False
    put: tuple[tuple[str, int], ...] = ()
    get: tuple[str, ...] = ()
    data_token: str = ""
    data_streams: str = ""

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
        args = str_list_field(o, "args", 4096, 65536) if "args" in o else ()
        cwd = str_field(o, "cwd", MAX_PATH) if "cwd" in o else ""
        required = o.get("cwd_required", False)
        if not isinstance(required, bool) or "\0" in cwd or (cwd and not cwd.startswith("/")):
            raise WireError("field 'cwd' is not an absolute path")
        detach = o.get("detach", False)
        if not isinstance(detach, bool):
            raise WireError("field 'detach' is not a boolean")
        return cls(args, tuple(env), tty,
                   str_field(o, "term", 64) if "term" in o else "",
                   int_field(o, "rows", 0, 0xFFFF) if "rows" in o else 0,
                   int_field(o, "cols", 0, 0xFFFF) if "cols" in o else 0, tuple(fds), keep,
                   cwd, required, *placement(o),
                   detach, file_list(o["put"]) if "put" in o else (),
                   pattern_list(o["get"]) if "get" in o else (), *_data_offer(o))


def _data_offer(o: dict[str, Any]) -> tuple[str, str]:
    """START's optional (data_token, data_streams): both or none."""
    if not any(k in o for k in ("data_token", "data_streams")):
        return "", ""
    token = str_field(o, "data_token", 64)
    if len(token) != 64 or any(c not in "0123456789abcdef" for c in token):
        raise WireError("field 'data_token' is not 64 lowercase hex digits")
    streams = str_field(o, "data_streams", 2)
    if streams not in ("i", "o", "io"):
        raise WireError("field 'data_streams' is not i, o or io")
    return token, streams


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
    cwd: str = ""  # the directory the job runs in, when the worker says (a command worker)
    detached: bool = False  # a detached job: EXIT follows at once, the job runs on
    stdin_apart: bool = False  # the worker would take stdin apart (APART) once it is big
    stdout_apart: bool = False  # ... and send stdout apart

    @classmethod
    def from_json(cls, o: dict[str, Any]) -> Started:
        refused = str_list_field(o, "refused_env", MAX_ENV, 256) if "refused_env" in o else ()
        flags = [o.get(k, False) for k in ("detached", "stdin_apart", "stdout_apart")]
        if not all(isinstance(flag, bool) for flag in flags):
            raise WireError("field 'detached', 'stdin_apart' or 'stdout_apart' is not a "
                            "boolean")
        return cls(str_field(o, "job", 64), refused,
                   str_field(o, "cwd", MAX_PATH) if "cwd" in o else "", *flags)


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
        code = int_field(o, "code", 0, 255) if o.get("code") is not None else None
        sig = int_field(o, "signal", 1, 127) if o.get("signal") is not None else None
        if (code is None) == (sig is None):
            raise WireError("EXIT needs exactly one of code and signal")
        limit = str_field(o, "limit", 16) if "limit" in o else ""
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
        return cls(str_field(o, "reason", 64), str_field(o, "message", 1024))


@dataclass(frozen=True)
class Signal:
    """Client to worker: deliver signal NUMBER to the job's process group."""

    KIND: ClassVar[FrameKind] = FrameKind.SIGNAL
    number: int

    @classmethod
    def from_json(cls, o: dict[str, Any]) -> Signal:
        return cls(int_field(o, "number", 1, 64))


@dataclass(frozen=True)
class Winsize:
    """Client to worker: the client's terminal is now ROWS x COLS."""

    KIND: ClassVar[FrameKind] = FrameKind.WINSIZE
    rows: int
    cols: int

    @classmethod
    def from_json(cls, o: dict[str, Any]) -> Winsize:
        return cls(int_field(o, "rows", 0, 0xFFFF), int_field(o, "cols", 0, 0xFFFF))


@dataclass(frozen=True)
class Ping:
    """Either side, when it has sent nothing for a while: I am still here."""

    KIND: ClassVar[FrameKind] = FrameKind.PING

    @classmethod
    def from_json(cls, o: dict[str, Any]) -> Ping:
        return cls()


@dataclass(frozen=True)
class Queued:
    """Worker to client, after START: every slot is busy; the job waits in the worker's
    queue at POSITION (1: next), for about WAIT_MS. STARTED follows when a slot frees."""

    KIND: ClassVar[FrameKind] = FrameKind.QUEUED
    position: int
    wait_ms: float = 0.0

    @classmethod
    def from_json(cls, o: dict[str, Any]) -> Queued:
        return cls(int_field(o, "position", 1, 1 << 20), _wait_field(o))


Control = (Hello | Start | Started | Busy | Exit | Error | Signal | Winsize | Ping | PutFile
           | JobRequest | JobList | JobState | Queued)
Frame = Data | Eof | Shut | Apart | Window | FileData | FileWindow | Control
_CONTROL_TYPES: dict[int, Any] = {
    t.KIND: t for t in (Hello, Start, Started, Busy, Exit, Error, Signal, Winsize, Ping,
                        PutFile, JobRequest, JobList, JobState, Queued)
}
RAW_KINDS = (FrameKind.DATA, FrameKind.FILE_DATA)  # up to MAX_FRAME; the rest MAX_CONTROL


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
    if isinstance(frame, Apart):
        return FRAME_HEADER.pack(FrameKind.APART, frame.stream, 4) + _U32.pack(frame.port)
    if isinstance(frame, FileData):
        if len(frame.payload) > MAX_FRAME:
            raise WireError("file data frame too long")
        return FRAME_HEADER.pack(FrameKind.FILE_DATA, 0, len(frame.payload)) + frame.payload
    if isinstance(frame, FileWindow):
        return FRAME_HEADER.pack(FrameKind.FILE_WINDOW, 0, 4) + frame.encode()
    body = dump_json(frame.body() if isinstance(frame, JobList | JobState) else
                     {f.name: getattr(frame, f.name) for f in fields(frame)
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
    if kind == FrameKind.APART:
        if len(payload) != 4 or stream not in (0, 1) or _U32.unpack(payload)[0] > 0xFFFF:
            raise WireError("APART frame of the wrong size, stream or port")
        return Apart(stream, _U32.unpack(payload)[0])
    if kind == FrameKind.FILE_DATA:
        return FileData(payload)
    if kind == FrameKind.FILE_WINDOW:
        return FileWindow.decode(payload)
    control = _CONTROL_TYPES.get(kind)
    if control is None:
        raise WireError(f"unknown frame kind {kind}")
    if len(payload) > MAX_CONTROL:
        raise WireError("control frame too long")
    result: Frame = control.from_json(load_json(payload))
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
            if kind not in RAW_KINDS and length > MAX_CONTROL:
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
