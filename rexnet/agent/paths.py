"""Where the user's agent listens and logs, and the checks on its directory.  Standard
library only: the launcher imports this module."""

from __future__ import annotations

import os
import stat

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


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
        return os.path.abspath(explicit)
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = os.path.join(runtime, "rexnet") if runtime else f"/tmp/rexnet-{os.getuid()}"
    return os.path.join(base, f"agent-{netns_id()}.sock")


class UnsafeDirectory(Exception):
    """The socket's directory belongs to someone else or others may reach into it."""


def directory_problem(path: str) -> str | None:
    """Why the directory of the socket PATH must not be trusted (lstat: it must be a real
    directory, not a symbolic link, owned by this uid, mode 0700 or stricter), or None if
    it may. A missing directory raises FileNotFoundError (nothing listens there yet)."""
    directory = os.path.dirname(path) or "."
    info = os.lstat(directory)  # not stat: a symbolic link is refused, not followed
    uid = os.getuid()
    if stat.S_ISLNK(info.st_mode):
        return f"{directory} is a symbolic link; remove it or set REXNET_AGENT_SOCKET"
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != uid:
        return (f"{directory} is not a directory of this user (uid {uid}; it belongs to uid "
                f"{info.st_uid}); remove it or set REXNET_AGENT_SOCKET")
    if info.st_mode & 0o077:
        return (f"{directory} has mode {stat.S_IMODE(info.st_mode):04o}, not 0700: others "
                "may reach its socket; chmod 700 it")
    return None


def safe_directory(path: str) -> None:
    """Make the socket's directory (mode 0700) or check that it is ours and private."""
    directory = os.path.dirname(path) or "."
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        problem = directory_problem(path)
    except OSError as e:
        raise UnsafeDirectory(f"cannot make {directory}: {e.strerror}") from None
    if problem:
        raise UnsafeDirectory(problem)


def peer_uid(sock: Any) -> int:
    """The uid of the process at the other end of the connected Unix socket SOCK (its
    SO_PEERCRED: for a listening agent, whoever called listen())."""
    import _socket
    import struct

    raw = sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", raw)[1])


def log_path(socket_path: str) -> str:
    """Where the agent at SOCKET_PATH logs (as rexnet.agent.server writes it)."""
    return socket_path.removesuffix(".sock") + ".log"
