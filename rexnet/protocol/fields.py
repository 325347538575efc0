"""Bounded checks of the JSON bodies of datagrams and frames, and WireError.  No I/O."""

from __future__ import annotations

import json
from typing import Any, TypeVar


class WireError(ValueError):
    """Input that is not a well-formed rexnet datagram or frame."""


T = TypeVar("T")


def get_field(obj: dict[str, Any], key: str, kind: type[T]) -> T:
    value = obj.get(key)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise WireError(f"field {key!r} missing or not {kind.__name__}")
    return value


def int_field(obj: dict[str, Any], key: str, lo: int, hi: int) -> int:
    value = get_field(obj, key, int)
    if not lo <= value <= hi:
        raise WireError(f"field {key!r} out of range")
    return value


def str_field(obj: dict[str, Any], key: str, limit: int = 256) -> str:
    value = get_field(obj, key, str)
    if len(value) > limit:
        raise WireError(f"field {key!r} too long")
    return value


def float_field(obj: dict[str, Any], key: str) -> float:
    value = obj.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise WireError(f"field {key!r} missing or not a number")
    if not -1e12 < value < 1e12:
        raise WireError(f"field {key!r} out of range")
    return float(value)


def str_list_field(obj: dict[str, Any], key: str, count: int, limit: int) -> tuple[str, ...]:
    value = get_field(obj, key, list)
    if len(value) > count or not all(isinstance(v, str) and len(v) <= limit for v in value):
        raise WireError(f"field {key!r} is not a list of at most {count} short strings")
    return tuple(value)


def load_json(data: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise WireError("body is not UTF-8 JSON") from None
    if not isinstance(obj, dict):
        raise WireError("body is not a JSON object")
    return obj


def dump_json(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


def hex_id_field(obj: dict[str, Any], key: str) -> bytes:
    text = str_field(obj, key, 32)
    try:
        value = bytes.fromhex(text)
    except ValueError:
        raise WireError(f"field {key!r} is not hex") from None
    if len(value) != 16:
        raise WireError(f"field {key!r} is not 16 bytes")
    return value


MAX_PATH = 4096
MAX_CPUS = 4096
MAX_MEM = 1 << 60
MAX_WORKERS, MAX_WORKER_NAME = 8, 64


def placement(o: dict[str, Any]) -> tuple[int, int, tuple[str, ...]]:
    """The optional (cpus, mem, workers) of an ANNOUNCE's or START's body, bounded: the
    slots a job takes, the bytes of free memory it needs, the workers that may run it."""
    return (int_field(o, "cpus", 1, MAX_CPUS) if "cpus" in o else 1,
            int_field(o, "mem", 0, MAX_MEM) if "mem" in o else 0,
            str_list_field(o, "workers", MAX_WORKERS, MAX_WORKER_NAME) if "workers" in o
            else ())
