"""Frames of detached jobs and of files sent with a job (kinds 40-45).  No I/O.

Files (`rexnet exec --put FILE`, `--get PATTERN`) go as PUT_FILE (name, size, mode)
followed by exactly SIZE bytes in FILE_DATA frames, paced by the receiver's FILE_WINDOW
credit as the streams are (one file at a time). A file's name is a plain name: no "/",
not "." or "..", no NUL, so a receiver can only write inside its directory.

A detached job's client (or an admin) reaches it on a channel of its own (the worker
connects back after a signed JOB_CALL datagram): JOB_REQUEST asks to list, print,
attach to or cancel jobs; the worker answers with JOB_LIST, or with the job's stored
output (DATA frames on streams 1 and 2) and then JOB_STATE.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, ClassVar

from rexnet.protocol.fields import WireError, get_field, int_field, str_field

MAX_FILES = 64
"""Files a job may send with --put, and patterns it may name with --get."""
MAX_FILE_NAME = 255
MAX_FILE_SIZE = 1 << 40
JOB_ACTIONS = ("list", "output", "attach", "cancel")
JOB_STATES = ("running", "finished")
MAX_LISTED = 200
"""Rows of one worker's JOB_LIST."""
MAX_JOB_ID = 64
_U32 = struct.Struct("!I")


def check_file_name(name: object, what: str = "file name") -> str:
    """NAME if it is a plain file name that stays in its directory, else WireError."""
    if not isinstance(name, str) or not name:
        raise WireError(f"{what} missing")
    if len(name.encode("utf-8", "surrogatepass")) > MAX_FILE_NAME:
        raise WireError(f"{what} too long")
    if "/" in name or "\0" in name or name in (".", ".."):
        raise WireError(f"{what} {name[:60]!r} would leave the job directory "
                        "(a plain name is needed: no '/', not '..')")
    return name


@dataclass(frozen=True)
class PutFile:
    """A file of SIZE bytes (permission bits MODE) follows in FILE_DATA frames."""

    KIND: ClassVar[int] = 40
    name: str
    size: int
    mode: int = 0o644

    @classmethod
    def from_json(cls, o: dict[str, Any]) -> PutFile:
        return cls(check_file_name(o.get("name")), int_field(o, "size", 0, MAX_FILE_SIZE),
                   int_field(o, "mode", 0, 0o777) if "mode" in o else 0o644)


@dataclass(frozen=True)
class FileData:
    """Bytes of the file being sent (raw, like DATA)."""

    KIND: ClassVar[int] = 41
    payload: bytes


@dataclass(frozen=True)
class FileWindow:
    """The receiver wrote CREDIT more bytes of files: the sender may send them."""

    KIND: ClassVar[int] = 42
    credit: int

    def encode(self) -> bytes:
        return _U32.pack(self.credit)

    @classmethod
    def decode(cls, payload: bytes) -> FileWindow:
        if len(payload) != 4:
            raise WireError("FILE_WINDOW frame of the wrong size")
        return cls(_U32.unpack(payload)[0])


def _job_id(o: dict[str, Any], key: str = "job") -> str:
    job = str_field(o, key, MAX_JOB_ID) if key in o else ""
    if not all(c in "0123456789abcdef" for c in job):
        raise WireError(f"field {key!r} is not a job id")
    return job


@dataclass(frozen=True)
class JobRequest:
    """Client to a worker that connected back for a JOB_CALL: ACTION on JOB (all jobs
    for "list"); SIGNAL for "cancel" (0: SIGTERM)."""

    KIND: ClassVar[int] = 43
    job: str
    action: str
    signal: int = 0

    @classmethod
    def from_json(cls, o: dict[str, Any]) -> JobRequest:
        action = str_field(o, "action", 16)
        if action not in JOB_ACTIONS:
            raise WireError("JOB_REQUEST names an unknown action")
        job = _job_id(o)
        if not job and action != "list":
            raise WireError("JOB_REQUEST needs a job id")
        return cls(job, action, int_field(o, "signal", 0, 64) if "signal" in o else 0)


def _status(o: dict[str, Any], key: str) -> int | None:
    return None if o.get(key) is None else int_field(o, key, 0, 511)


@dataclass(frozen=True)
class JobRow:
    """One job a worker runs or ran: STATUS is None while it runs (128+N: signal N)."""

    job: str
    client: str
    command: str
    state: str
    started: float
    ended: float = 0.0
    status: int | None = None
    dropped: int = 0  # output bytes beyond the worker's --detached-output
    detached: bool = False

    def as_list(self) -> list[Any]:
        return [self.job, self.client, self.command, self.state, self.started, self.ended,
                self.status, self.dropped, self.detached]

    @classmethod
    def from_list(cls, value: Any) -> JobRow:
        if not isinstance(value, list) or len(value) != 9:
            raise WireError("a JOB_LIST row is not a list of 9 fields")
        o = dict(zip(("job", "client", "command", "state", "started", "ended", "status",
                      "dropped", "detached"), value, strict=True))
        state = str_field(o, "state", 16)
        if state not in JOB_STATES:
            raise WireError("a JOB_LIST row names an unknown state")
        times = [o["started"], o["ended"]]
        if not all(isinstance(t, int | float) and not isinstance(t, bool) and 0 <= t < 1e11
                   for t in times):
            raise WireError("a JOB_LIST row has a bad time")
        return cls(_job_id(o), str_field(o, "client", 64), str_field(o, "command", 200),
                   state, float(o["started"]), float(o["ended"]), _status(o, "status"),
                   int_field(o, "dropped", 0, 2**62), get_field(o, "detached", bool))


@dataclass(frozen=True)
class JobList:
    """Worker to client: the jobs WORKER runs and keeps (at most MAX_LISTED)."""

    KIND: ClassVar[int] = 44
    worker: str
    jobs: tuple[JobRow, ...] = ()

    def body(self) -> dict[str, Any]:
        return {"worker": self.worker, "jobs": [row.as_list() for row in self.jobs]}

    @classmethod
    def from_json(cls, o: dict[str, Any]) -> JobList:
        rows = get_field(o, "jobs", list)
        if len(rows) > MAX_LISTED:
            raise WireError(f"JOB_LIST of more than {MAX_LISTED} jobs")
        return cls(str_field(o, "worker"), tuple(JobRow.from_list(r) for r in rows))


@dataclass(frozen=True)
class JobState:
    """Worker to client, after a job's stored output (or a cancel): where JOB stands;
    STATUS is None while it runs; DROPPED output bytes were not kept."""

    KIND: ClassVar[int] = 45
    job: str
    state: str
    status: int | None = None
    dropped: int = 0

    def body(self) -> dict[str, Any]:
        return {"job": self.job, "state": self.state, "status": self.status,
                "dropped": self.dropped}

    @classmethod
    def from_json(cls, o: dict[str, Any]) -> JobState:
        state = str_field(o, "state", 16)
        if state not in JOB_STATES:
            raise WireError("JOB_STATE names an unknown state")
        return cls(_job_id(o), state, _status(o, "status"),
                   int_field(o, "dropped", 0, 2**62) if "dropped" in o else 0)


def file_list(value: Any) -> tuple[tuple[str, int], ...]:
    """START's "put": [[name, size], ...] of distinct plain names; WireError otherwise."""
    if not isinstance(value, list) or len(value) > MAX_FILES:
        raise WireError(f"field 'put' is not a list of at most {MAX_FILES} files")
    out = []
    for item in value:
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[1], int)
                and not isinstance(item[1], bool) and 0 <= item[1] <= MAX_FILE_SIZE):
            raise WireError("field 'put' holds a bad [name, size] pair")
        out.append((check_file_name(item[0]), item[1]))
    if len({name for name, _ in out}) < len(out):
        raise WireError("field 'put' names a file twice")
    return tuple(out)


def pattern_list(value: Any) -> tuple[str, ...]:
    """START's "get": shell patterns of plain names; WireError otherwise."""
    if not isinstance(value, list) or len(value) > MAX_FILES:
        raise WireError(f"field 'get' is not a list of at most {MAX_FILES} patterns")
    return tuple(check_file_name(p, "--get pattern") for p in value)
