"""Where the user's agent listens and logs, and the checks on its directory.  Standard
library only: the launcher imports this module."""

from __future__ import annotations

import os
import stat


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


def log_path(socket_path: str) -> str:
    """Where the agent at SOCKET_PATH logs (as rexnet.agent.server writes it)."""
    return socket_path.removesuffix(".sock") + ".log"
