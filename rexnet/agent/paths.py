"""Where the user's agent listens and logs, and the checks on its directory.  The
launcher's fast path imports this module: builtins and posix only (os costs it some 1.5 ms
of start-up), os where only the agent or an unusual path needs it."""

from __future__ import annotations

import posix

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any

S_IFMT, S_IFDIR, S_IFLNK = 0o170000, 0o040000, 0o120000  # as stat's


def netns_id() -> int:
    """This process's network namespace (the inode of /proc/self/ns/net; 0 if unknown)."""
    try:
        return posix.stat("/proc/self/ns/net").st_ino
    except OSError:
        return 0


def socket_path(environ: Mapping[str, str] | None = None) -> str:
    """$REXNET_AGENT_SOCKET, else $XDG_RUNTIME_DIR/rexnet/agent-NETNS.sock, else
    /tmp/rexnet-UID/agent-NETNS.sock: one agent per user and network namespace. ENVIRON:
    os.environ unless given (the launcher passes its own, to spare importing os)."""
    if environ is None:
        import os

        environ = os.environ
    explicit = environ.get("REXNET_AGENT_SOCKET")
    if explicit:
        return abspath(explicit)
    runtime = environ.get("XDG_RUNTIME_DIR")
    base = (runtime if runtime.endswith("/") else f"{runtime}/") + "rexnet" if runtime else (
        f"/tmp/rexnet-{posix.getuid()}")  # os.path.join's
    return f"{base}/agent-{netns_id()}.sock"


def normpath(path: str) -> str:
    """os.path.normpath(PATH) (posixpath's), without importing os."""
    if not path:
        return "."
    initial = 2 if path.startswith("//") and not path.startswith("///") else (
        1 if path.startswith("/") else 0)
    parts: list[str] = []
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part != ".." or (not initial and not parts) or (parts and parts[-1] == ".."):
            parts.append(part)
        elif parts:
            parts.pop()
    return "/" * initial + "/".join(parts) or "."


def abspath(path: str) -> str:
    """os.path.abspath(PATH) (posixpath's); OSError if it is relative and the working
    directory is gone."""
    if not path.startswith("/"):
        cwd = posix.getcwd()
        path = (cwd if cwd.endswith("/") else cwd + "/") + path
    return normpath(path)


def dirname(path: str) -> str:
    """os.path.dirname(PATH) (posixpath's), without importing os."""
    head = path[: path.rfind("/") + 1]
    if head and head != "/" * len(head):
        head = head.rstrip("/")
    return head


class UnsafeDirectory(Exception):
    """The socket's directory belongs to someone else or others may reach into it."""


def directory_problem(path: str) -> str | None:
    """Why the directory of the socket PATH must not be trusted (lstat: it must be a real
    directory, not a symbolic link, owned by this uid, mode 0700 or stricter), or None if
    it may. A missing directory raises FileNotFoundError (nothing listens there yet)."""
    directory = dirname(path) or "."
    info = posix.lstat(directory)  # not stat: a symbolic link is refused, not followed
    uid = posix.getuid()
    if info.st_mode & S_IFMT == S_IFLNK:
        return f"{directory} is a symbolic link; remove it or set REXNET_AGENT_SOCKET"
    if info.st_mode & S_IFMT != S_IFDIR or info.st_uid != uid:
        return (f"{directory} is not a directory of this user (uid {uid}; it belongs to uid "
                f"{info.st_uid}); remove it or set REXNET_AGENT_SOCKET")
    if info.st_mode & 0o077:
        return (f"{directory} has mode {info.st_mode & 0o7777:04o}, not 0700: others "
                "may reach its socket; chmod 700 it")
    return None


def safe_directory(path: str) -> None:
    """Make the socket's directory (mode 0700) or check that it is ours and private."""
    import os

    directory = dirname(path) or "."
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
    import sys

    raw = sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, 12)  # struct ucred: 3 ints
    return int.from_bytes(raw[4:8], sys.byteorder, signed=True)


def log_path(socket_path: str) -> str:
    """Where the agent at SOCKET_PATH logs (as rexnet.agent.server writes it)."""
    return socket_path.removesuffix(".sock") + ".log"
