"""The framing and JSON of the launcher <-> agent protocol (rexnet.protocol.agentwire),
with builtins alone (it imports nothing): the launcher's fast path (rexnet.cli.launcher)
reads and writes the agent's messages with this module alone.

A message is ``length u32 (big-endian) | JSON object`` of at most MAX_MESSAGE bytes,
nested at most MAX_DEPTH deep. JSON is written and read here by a small strict encoder
and parser (`dumps`, `loads`): the json module imports re, which alone costs the launcher
a few milliseconds of start-up; the agent reads with json.loads. Frames splits a byte
stream into parsed objects and holds at most one message's bytes.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

MAX_MESSAGE = 1 << 20
MAX_DEPTH = 8
HEADER_SIZE = 4


class AgentWireError(ValueError):
    """Bytes that are not a well-formed agent message."""


def frame(obj: dict[str, object]) -> bytes:
    """OBJ as one message: its JSON behind its length; AgentWireError if it is too long."""
    body = dumps(obj).encode()
    if len(body) > MAX_MESSAGE:
        raise AgentWireError("message too long")
    return len(body).to_bytes(HEADER_SIZE, "big") + body


class Frames:
    """The JSON values of the messages in a byte stream, bounded: holds at most one
    message's bytes; AgentWireError for a message too long, not UTF-8 JSON or nested too
    deeply. LOADS parses a message's JSON (by default, this module's loads)."""

    def __init__(self, loads: Callable[[str], object] | None = None) -> None:
        self._buffer = bytearray()
        self._loads = loads or globals()["loads"]

    @property
    def pending(self) -> int:
        """How many bytes of a message not yet whole it holds."""
        return len(self._buffer)

    def values(self, data: bytes) -> list[object]:
        self._buffer += data
        out = []
        while len(self._buffer) >= HEADER_SIZE:
            length = int.from_bytes(self._buffer[:HEADER_SIZE], "big")
            if length > MAX_MESSAGE:
                raise AgentWireError("message too long")
            if len(self._buffer) < HEADER_SIZE + length:
                break
            body = bytes(self._buffer[HEADER_SIZE: HEADER_SIZE + length])
            del self._buffer[: HEADER_SIZE + length]
            try:
                obj = self._loads(body.decode("utf-8"))
            except (UnicodeDecodeError, ValueError, RecursionError):
                raise AgentWireError("message is not UTF-8 JSON") from None
            if depth(obj) > MAX_DEPTH:
                raise AgentWireError("message nested too deeply")
            out.append(obj)
        return out


# -- JSON without the json module ---------------------------------------------------

_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t",
            "\b": "\\b", "\f": "\\f"}
_UNESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n",
              "r": "\r", "t": "\t"}


def _string(text: str) -> str:
    if text.isascii() and text.isprintable() and '"' not in text and "\\" not in text:
        return f'"{text}"'  # nothing to escape: most of what the launcher sends
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
    """How deep OBJ's lists and dicts nest (0 for a scalar)."""
    if isinstance(obj, dict):
        values: Iterable[object] = obj.values()
    elif isinstance(obj, list):
        values = obj
    else:
        return 0
    deepest = 0
    for value in values:  # (a loop, not max() of a generator: a message's values are
        if isinstance(value, _NESTED):  # mostly scalars, and it is read once a job)
            deepest = max(deepest, depth(value))
    return 1 + deepest


_NESTED = (dict, list)


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
