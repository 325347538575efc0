"""The launcher <-> agent protocol over the agent's Unix socket.  Standard library only:
the launcher imports this module, and nothing heavy.

Messages are ``length u32 | JSON object`` (at most MAX_MESSAGE bytes); the launcher's
first message, "exec", carries its descriptors (0, 1, 2 and any --fd, in that order)
with SCM_RIGHTS. Launcher to agent: exec, signal, winch, stop. Agent to launcher: say
(a line for stderr), exit (the status to exit with, and an error message if rexnet
failed), stopped. The decoder is bounded: a longer message, a malformed one or an
unknown kind raises AgentWireError.
"""

from __future__ import annotations

import json
import os
import stat
import struct

MAX_MESSAGE = 1 << 20
MAX_FDS = 3 + 64
HEADER = struct.Struct("!I")

# what each message may hold: field -> type (every field required)
KINDS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "exec": {"keyfile": str, "keypath": str, "args": list, "announce": list, "alerts": list,
             "timeout": (int, float), "verbose": bool, "tty": bool, "raw": bool,
             "term": str, "rows": int, "cols": int, "fds": list, "env": list,
             "group": str, "netns": int, "prog": str},
    "signal": {"number": int},
    "winch": {"rows": int, "cols": int},
    "stop": {},
    "say": {"text": str},
    "exit": {"status": int, "message": str},
    "stopped": {"pid": int},
}


class AgentWireError(ValueError):
    """Bytes that are not a well-formed agent message."""


def encode(kind: str, **fields: object) -> bytes:
    body = json.dumps({"op": kind, **fields}, separators=(",", ":")).encode()
    if len(body) > MAX_MESSAGE:
        raise AgentWireError("message too long")
    return HEADER.pack(len(body)) + body


def check(obj: object) -> dict[str, object]:
    """OBJ if it is a well-formed message (known kind, fields of the right types)."""
    if not isinstance(obj, dict):
        raise AgentWireError("message is not a JSON object")
    spec = KINDS.get(obj.get("op"))  # type: ignore[arg-type]
    if spec is None:
        raise AgentWireError("unknown message kind")
    for name, kind in spec.items():
        value = obj.get(name)
        if not isinstance(value, kind) or (isinstance(value, bool) and kind in (int, (int, float))):
            raise AgentWireError(f"field {name!r} missing or of the wrong type")
    op = obj["op"]
    if op == "exec":
        _check_exec(obj)
    elif op == "signal" and not 1 <= obj["number"] <= 64:  # type: ignore[operator]
        raise AgentWireError("signal number out of range")
    elif op == "exit" and not 0 <= obj["status"] <= 255:  # type: ignore[operator]
        raise AgentWireError("exit status out of range")
    elif op == "winch" and not (0 <= obj["rows"] <= 0xFFFF and 0 <= obj["cols"] <= 0xFFFF):  # type: ignore[operator]
        raise AgentWireError("window size out of range")
    return obj


def _strings(value: object, count: int, limit: int) -> bool:
    return (isinstance(value, list) and len(value) <= count
            and all(isinstance(v, str) and len(v) <= limit and "\0" not in v for v in value))


def _check_exec(obj: dict[str, object]) -> None:
    if not (_strings(obj["args"], 4096, 65536) and _strings(obj["announce"], 64, 300)
            and _strings(obj["alerts"], 64, 300)):
        raise AgentWireError("args, announce or alerts are not lists of short strings")
    fds = obj["fds"]
    assert isinstance(fds, list)
    if len(fds) > MAX_FDS - 3 or not all(
            isinstance(p, list) and len(p) == 2 and type(p[0]) is int and 3 <= p[0] <= 255
            and p[1] in ("r", "w", "rw") for p in fds):
        raise AgentWireError("fds is not a list of [descriptor 3-255, mode] pairs")
    env = obj["env"]
    assert isinstance(env, list)
    if len(env) > 256 or not all(isinstance(p, list) and len(p) == 2 and _strings(p, 2, 65536)
                                 for p in env):
        raise AgentWireError("env is not a list of [name, value] pairs")
    for name in ("rows", "cols"):
        if not 0 <= obj[name] <= 0xFFFF:  # type: ignore[operator]
            raise AgentWireError(f"{name} out of range")
    if not 0 < obj["timeout"] <= 1e9:  # type: ignore[operator]
        raise AgentWireError("timeout out of range")


class Decoder:
    """Messages from a byte stream; holds at most one message's bytes."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[dict[str, object]]:
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
                obj = json.loads(body.decode("utf-8"))
            except (UnicodeDecodeError, ValueError, RecursionError):
                raise AgentWireError("message is not UTF-8 JSON") from None
            out.append(check(obj))
        return out


# -- where the agent's socket is -----------------------------------------------------


def netns_id() -> int:
    """This process's network namespace (the inode of /proc/self/ns/net; 0 if unknown)."""
    try:
        return os.stat("/proc/self/ns/net").st_ino
    except OSError:
        return 0


def socket_path() -> str:
    """$REXNET_AGENT_SOCKET, else $XDG_RUNTIME_DIR/rexnet/agent-NETNS.sock, else
    /tmp/rexnet-UID/agent-NETNS.sock: one agent per user and network namespace."""
    explicit = os.environ.get("REXNET_AGENT_SOCKET")
    if explicit:
        return explicit
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = os.path.join(runtime, "rexnet") if runtime else f"/tmp/rexnet-{os.getuid()}"
    return os.path.join(base, f"agent-{netns_id()}.sock")


class UnsafeDirectory(Exception):
    """The socket's directory belongs to someone else or others may write to it."""


def safe_directory(path: str) -> None:
    """Make the socket's directory (mode 0700) or check that it is ours and private."""
    directory = os.path.dirname(path) or "."
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        info = os.lstat(directory)
    except OSError as e:
        raise UnsafeDirectory(f"cannot make {directory}: {e.strerror}") from None
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise UnsafeDirectory(f"{directory} is not a directory of this user (uid "
                              f"{os.getuid()}); remove it or set REXNET_AGENT_SOCKET")
    if info.st_mode & 0o022:
        raise UnsafeDirectory(f"{directory} is writable by others; chmod 700 it")
