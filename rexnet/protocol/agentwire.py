"""The launcher <-> agent protocol over the agent's Unix socket.  Standard library only:
the launcher imports this module where its fast path does not do (rexnet.cli.quick).

Messages are ``length u32 | JSON object`` (at most MAX_MESSAGE bytes, nesting at most
MAX_DEPTH), one typed Message each: the object's "op" names the kind, its other members
are the message's fields. The launcher's first message, Exec (an ExecRequest and the
launcher's network namespace), carries its descriptors (0, 1, 2 and any --fd, in that
order) with SCM_RIGHTS. Launcher to agent: Exec, Signal, Winch, Stop. Agent to launcher:
Say (a line for stderr), Exit (the status to exit with, and an error message if rexnet
failed), Stopped. The decoder is bounded: a longer message, a malformed one or an unknown
kind raises AgentWireError. The framing and the JSON (written and read without the json
module, which imports re) are rexnet.protocol.agentjson's, which the launcher's fast path
uses alone; the agent reads with json.loads.
"""

from __future__ import annotations

import struct

from rexnet.protocol.agentjson import (
    MAX_DEPTH,
    MAX_MESSAGE,
    AgentWireError,
    Frames,
    depth,
    dumps,
    frame,
    loads,
)
from rexnet.protocol.record import Record
from rexnet.protocol.request import ExecRequest

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, ClassVar, Self

__all__ = ["MAX_DEPTH", "MAX_MESSAGE", "AgentWireError", "Decoder", "depth", "dumps", "loads"]

MAX_FDS = 3 + 64
HEADER = struct.Struct("!I")

Json = dict[str, object]
Kind = type | tuple[type, ...]


def _typed(obj: Json, schema: dict[str, Kind]) -> None:
    """AgentWireError unless OBJ has every field of SCHEMA with the right JSON type (a
    bool is no number)."""
    for name, kind in schema.items():
        value = obj.get(name)
        if not isinstance(value, kind) or (isinstance(value, bool) and bool not in (
                kind if isinstance(kind, tuple) else (kind,))):
            raise AgentWireError(f"field {name!r} missing or of the wrong type")


class Message(Record):
    """One agent message; SCHEMA gives its fields' JSON types (all required)."""

    OP: ClassVar[str] = ""
    SCHEMA: ClassVar[dict[str, Kind]] = {}

    def fields(self) -> Json:
        return {name: getattr(self, name) for name in self.__fields__}

    def encode(self) -> bytes:
        return frame({"op": self.OP, **self.fields()})

    @classmethod
    def decode(cls, obj: Json) -> Self:
        """The message in OBJ (a JSON object of kind OP), or AgentWireError."""
        _typed(obj, cls.SCHEMA)
        message = cls(**{name: obj[name] for name in cls.SCHEMA})
        message.check()
        return message

    def check(self) -> None:
        """AgentWireError if a field is out of range."""


class Exec(Message):
    """Launcher to agent, with its descriptors: run REQUEST (NETNS: the launcher's network
    namespace, which the agent must share; 0 if unknown)."""

    OP = "exec"
    SCHEMA = {"keyfile": str, "keypath": str, "args": list, "announce": list,
              "alerts": list, "timeout": (int, float), "revoked": str, "verbose": bool,
              "tty": bool, "raw": bool, "term": str, "rows": int, "cols": int, "fds": list,
              "env": list, "netns": int}
    request: ExecRequest
    netns: int = 0

    def fields(self) -> Json:
        # --detach, --put and --get run without the agent (the launcher does not read
        # them): only SCHEMA's and PLACEMENT's fields travel
        return {**{name: getattr(self.request, name) for name in ExecRequest.__fields__
                   if name in self.SCHEMA or name in PLACEMENT}, "netns": self.netns}

    @classmethod
    def decode(cls, obj: Json) -> Self:
        _typed(obj, cls.SCHEMA)
        o: dict[str, Any] = obj
        lists = [_strings(o[name]) for name in ("args", "announce", "alerts")]
        if lists[0] is None or lists[1] is None or lists[2] is None:
            raise AgentWireError("args, announce or alerts are not lists of short strings")
        if not all(isinstance(p, list) and len(p) == 2 and type(p[0]) is int
                   and isinstance(p[1], str) for p in o["fds"]):
            raise AgentWireError("fds is not a list of [descriptor 3-255, mode] pairs")
        if not all(isinstance(p, list) and len(p) == 2 and _strings(p) for p in o["env"]):
            raise AgentWireError("env is not a list of [name, value] pairs")
        try:
            timeout = float(o["timeout"])
        except OverflowError:
            raise AgentWireError("timeout out of range") from None
        request = ExecRequest(
            keyfile=o["keyfile"], keypath=o["keypath"], args=lists[0], announce=lists[1],
            alerts=lists[2], timeout=timeout, revoked=o["revoked"], verbose=o["verbose"],
            tty=o["tty"], raw=o["raw"], term=o["term"], rows=o["rows"], cols=o["cols"],
            fds=tuple((fd, mode) for fd, mode in o["fds"]),
            env=tuple((name, value) for name, value in o["env"]), **_placement(o))
        try:
            request.check()
        except ValueError as e:
            raise AgentWireError(str(e)) from None
        return cls(request, o["netns"])


PLACEMENT: dict[str, Kind] = {"cwd": str, "cwd_required": bool, "cpus": int, "mem": int,
                              "workers": list, "queue_timeout": (int, float)}
"""Exec's optional fields (a launcher older than them does not send them)."""


def _placement(o: dict[str, Any]) -> dict[str, Any]:
    """The optional fields of an Exec that O has, typed (AgentWireError if not)."""
    given = {name: o[name] for name in PLACEMENT if name in o}
    _typed(given, {name: PLACEMENT[name] for name in given})
    if "workers" in given:
        workers = _strings(given["workers"])
        if workers is None:
            raise AgentWireError("workers is not a list of short strings")
        given["workers"] = workers
    if "queue_timeout" in given:
        try:
            given["queue_timeout"] = float(given["queue_timeout"])
        except OverflowError:
            raise AgentWireError("queue_timeout out of range") from None
    return given


def _strings(value: object) -> tuple[str, ...] | None:
    """VALUE as a tuple if it is a list of strings, else None."""
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    return None


class Signal(Message):
    """Launcher to agent: deliver signal NUMBER to the job."""

    OP = "signal"
    SCHEMA = {"number": int}
    number: int

    def check(self) -> None:
        if not 1 <= self.number <= 64:
            raise AgentWireError("signal number out of range")


class Winch(Message):
    """Launcher to agent: the terminal is now ROWS x COLS."""

    OP = "winch"
    SCHEMA = {"rows": int, "cols": int}
    rows: int
    cols: int

    def check(self) -> None:
        if not (0 <= self.rows <= 0xFFFF and 0 <= self.cols <= 0xFFFF):
            raise AgentWireError("window size out of range")


class Stop(Message):
    """`rexnet agent --stop` to agent: stop."""

    OP = "stop"


class Say(Message):
    """Agent to launcher: TEXT for stderr."""

    OP = "say"
    SCHEMA = {"text": str}
    text: str


class Exit(Message):
    """Agent to launcher: exit with STATUS, after writing MESSAGE (if any) on stderr."""

    OP = "exit"
    SCHEMA = {"status": int, "message": str}
    status: int
    message: str = ""

    def check(self) -> None:
        if not 0 <= self.status <= 255:
            raise AgentWireError("exit status out of range")


class Stopped(Message):
    """Agent to `rexnet agent --stop`: the agent (process PID) is stopping."""

    OP = "stopped"
    SCHEMA = {"pid": int}
    pid: int


KINDS: dict[str, type[Message]] = {m.OP: m for m in (Exec, Signal, Winch, Stop, Say, Exit,
                                                     Stopped)}


def check(obj: object) -> Message:
    """The message in OBJ (parsed JSON), or AgentWireError."""
    if not isinstance(obj, dict):
        raise AgentWireError("message is not a JSON object")
    kind = KINDS.get(obj.get("op"))  # type: ignore[arg-type]
    if kind is None:
        raise AgentWireError("unknown message kind")
    return kind.decode(obj)


class Decoder(Frames):
    """Messages from a byte stream; holds at most one message's bytes. LOADS parses a
    message's JSON (the agent passes json.loads; by default, agentjson's loads)."""

    def feed(self, data: bytes) -> list[Message]:
        return [check(obj) for obj in self.values(data)]
