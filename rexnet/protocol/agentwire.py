"""The launcher <-> agent protocol over the agent's Unix socket.  Standard library only:
the launcher imports this module, and nothing heavy.

Messages are ``length u32 | JSON object`` (at most MAX_MESSAGE bytes, nesting at most
MAX_DEPTH), one typed Message each: the object's "op" names the kind, its other members
are the message's fields. The launcher's first message, Exec (an ExecRequest and the
launcher's network namespace), carries its descriptors (0, 1, 2 and any --fd, in that
order) with SCM_RIGHTS. Launcher to agent: Exec, Signal, Winch, Stop. Agent to launcher:
Say (a line for stderr), Exit (the status to exit with, and an error message if rexnet
failed), Stopped. The decoder is bounded: a longer message, a malformed one or an unknown
kind raises AgentWireError. JSON is written and read here by a small strict encoder and
parser (`dumps`, `loads`): the json module imports re, which alone costs the launcher a
few milliseconds of start-up; the agent reads with json.loads.
"""

from __future__ import annotations

import struct

from rexnet.protocol.record import Record
from rexnet.protocol.request import ExecRequest

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, ClassVar, Self

MAX_MESSAGE = 1 << 20
MAX_DEPTH = 8
MAX_FDS = 3 + 64
HEADER = struct.Struct("!I")

Json = dict[str, object]
Kind = type | tuple[type, ...]


class AgentWireError(ValueError):
    """Bytes that are not a well-formed agent message."""


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
        body = dumps({"op": self.OP, **self.fields()}).encode()
        if len(body) > MAX_MESSAGE:
            raise AgentWireError("message too long")
        return HEADER.pack(len(body)) + body

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


class Decoder:
    """Messages from a byte stream; holds at most one message's bytes. LOADS parses a
    message's JSON (the agent passes json.loads; by default, this module's loads)."""

    def __init__(self, loads: Callable[[str], object] | None = None) -> None:
        self._buffer = bytearray()
        self._loads = loads or globals()["loads"]

    def feed(self, data: bytes) -> list[Message]:
        self._buffer += data
        out = []
        while len(self._buffer) >= HEADER.size:
            (length,) = HEADER.unpack_from(self._buffer)
            if length > MAX_MESSAGE:
                raise AgentWireError("message too long")
            if len(self._buffer) < HEADER.size + length:
                break
            body = bytes(self._buffer[HEADER.size: HEADER.size + length])
            del self._buffer[: HEADER.size + length]
            try:
                obj = self._loads(body.decode("utf-8"))
            except (UnicodeDecodeError, ValueError, RecursionError):
                raise AgentWireError("message is not UTF-8 JSON") from None
            if depth(obj) > MAX_DEPTH:
                raise AgentWireError("message nested too deeply")
            out.append(check(obj))
        return out


# -- JSON without the json module ---------------------------------------------------

_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t",
            "\b": "\\b", "\f": "\\f"}
_UNESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n",
              "r": "\r", "t": "\t"}


def _string(text: str) -> str:
    out = []
    for c in text:
        if c in _ESCAPES:
            out.append(_ESCAPES[c])
        elif c < " " or "\ud800" <= c <= "\udfff":  # control characters, lone surrogates
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def dumps(obj: object) -> str:
    """OBJ (dicts with str keys, lists, tuples, str, int, float, bool, None) as JSON."""
    if obj is None:
        return "null"
    if obj is True:
        return "true"
    if obj is False:
        return "false"
    if isinstance(obj, str):
        return _string(obj)
    if isinstance(obj, int):
        return str(int(obj))
    if isinstance(obj, float):
        if obj != obj or obj in (float("inf"), float("-inf")):
            raise ValueError("JSON has no NaN or infinity")
        return repr(obj)
    if isinstance(obj, list | tuple):
        return "[" + ",".join(dumps(v) for v in obj) + "]"
    if isinstance(obj, dict):
        return "{" + ",".join(f"{_string(str(k))}:{dumps(v)}" for k, v in obj.items()) + "}"
    raise TypeError(f"cannot write {type(obj).__name__} as JSON")


def depth(obj: object) -> int:
    if isinstance(obj, dict):
        return 1 + max((depth(v) for v in obj.values()), default=0)
    if isinstance(obj, list):
        return 1 + max((depth(v) for v in obj), default=0)
    return 0


_WS = " \t\n\r"
_NUMBER = set("0123456789+-.eE")


def loads(text: str) -> object:
    """Strict JSON (RFC 8259) to Python, nesting at most MAX_DEPTH; ValueError else."""
    value, end = _value(text, _skip(text, 0), 0)
    if _skip(text, end) != len(text):
        raise ValueError("extra data after the JSON value")
    return value


def _skip(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WS:
        i += 1
    return i


def _value(text: str, i: int, level: int) -> tuple[object, int]:
    if level > MAX_DEPTH:
        raise ValueError("nested too deeply")
    if i >= len(text):
        raise ValueError("truncated JSON")
    c = text[i]
    if c == "{":
        obj: dict[str, object] = {}
        i = _skip(text, i + 1)
        if text[i:i + 1] == "}":
            return obj, i + 1
        while True:
            if text[i:i + 1] != '"':
                raise ValueError("object key is not a string")
            key, i = _str(text, i + 1)
            i = _skip(text, i)
            if text[i:i + 1] != ":":
                raise ValueError("no ':' after an object key")
            obj[key], i = _value(text, _skip(text, i + 1), level + 1)
            i = _skip(text, i)
            if text[i:i + 1] == "}":
                return obj, i + 1
            if text[i:i + 1] != ",":
                raise ValueError("no ',' between object members")
            i = _skip(text, i + 1)
    if c == "[":
        items: list[object] = []
        i = _skip(text, i + 1)
        if text[i:i + 1] == "]":
            return items, i + 1
        while True:
            item, i = _value(text, i, level + 1)
            items.append(item)
            i = _skip(text, i)
            if text[i:i + 1] == "]":
                return items, i + 1
            if text[i:i + 1] != ",":
                raise ValueError("no ',' between array items")
            i = _skip(text, i + 1)
    if c == '"':
        return _str(text, i + 1)
    for word, value in (("true", True), ("false", False), ("null", None)):
        if text.startswith(word, i):
            return value, i + len(word)
    end = i
    while end < len(text) and text[end] in _NUMBER:
        end += 1
    return _number(text[i:end]), end


def _number(token: str) -> int | float:
    body = token[1:] if token.startswith("-") else token
    digits = body.split(".")[0].split("e")[0].split("E")[0]
    if not digits.isdigit() or not digits.isascii() or (len(digits) > 1 and
                                                         digits[0] == "0"):
        raise ValueError(f"bad number {token[:20]!r}")
    if token.lstrip("-").isdigit():
        if len(token) > 4000:
            raise ValueError("number too long")
        return int(token)
    rest = body[len(digits):]
    if rest.startswith(".") and not rest[1:2].isdigit():
        raise ValueError(f"bad number {token[:20]!r}")
    if rest[:1] in ("e", "E") or "e" in rest or "E" in rest:
        exp = rest.split("e")[-1].split("E")[-1].lstrip("+-")
        if not exp.isdigit():
            raise ValueError(f"bad number {token[:20]!r}")
    try:
        value = float(token)
    except ValueError:
        raise ValueError(f"bad number {token[:20]!r}") from None
    if value in (float("inf"), float("-inf")):
        raise ValueError("number out of range")
    return value


def _str(text: str, i: int) -> tuple[str, int]:
    out = []
    start = i
    while True:
        if i >= len(text):
            raise ValueError("unterminated string")
        c = text[i]
        if c == '"':
            out.append(text[start:i])
            return "".join(out), i + 1
        if c < " ":
            raise ValueError("control character in a string")
        if c != "\\":
            i += 1
            continue
        out.append(text[start:i])
        e = text[i + 1:i + 2]
        if e == "u":
            code = text[i + 2:i + 6]
            if len(code) != 4 or not all(h in "0123456789abcdefABCDEF" for h in code):
                raise ValueError("bad \\u escape")
            value = int(code, 16)
            i += 6
            low = text[i + 2:i + 6] if text[i:i + 2] == "\\u" else ""
            if (0xD800 <= value <= 0xDBFF and len(low) == 4
                    and all(h in "0123456789abcdefABCDEF" for h in low)
                    and 0xDC00 <= int(low, 16) <= 0xDFFF):  # a surrogate pair
                value = 0x10000 + ((value - 0xD800) << 10) + (int(low, 16) - 0xDC00)
                i += 6
            out.append(chr(value))
        elif e in _UNESCAPES:
            out.append(_UNESCAPES[e])
            i += 2
        else:
            raise ValueError("bad escape in a string")
        start = i
