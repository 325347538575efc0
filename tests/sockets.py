"""Looking at another process's sockets and pipes from a test (root): its descriptors are
copied into this process with pidfd_getfd(2), so getsockopt and fcntl see the real ones."""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import socket
from collections.abc import Iterator
from typing import Any

import psutil

SYS_PIDFD_GETFD = 438  # the same number on every Linux architecture
F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)
_libc = ctypes.CDLL(None, use_errno=True)


@contextlib.contextmanager
def borrowed(pid: int, fd: int) -> Iterator[int]:
    """A copy of descriptor FD of process PID, closed afterwards."""
    pidfd = os.pidfd_open(pid)
    try:
        mine = _libc.syscall(SYS_PIDFD_GETFD, pidfd, fd, 0)
        if mine < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"pidfd_getfd({pid}, {fd}): {os.strerror(err)}")
    finally:
        os.close(pidfd)
    try:
        yield mine
    finally:
        os.close(mine)


def nodelay(pid: int, fd: int) -> bool:
    """Whether TCP_NODELAY is set on the TCP socket FD of process PID."""
    with borrowed(pid, fd) as mine:
        sock = socket.socket(fileno=os.dup(mine))
        try:
            return bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        finally:
            sock.close()


def pipe_size(pid: int, fd: int) -> int:
    """The capacity of the pipe FD of process PID."""
    with borrowed(pid, fd) as mine:
        return int(fcntl.fcntl(mine, F_GETPIPE_SZ))


def established(pid: int) -> list[Any]:
    """The established TCP connections of process PID."""
    return [c for c in psutil.Process(pid).net_connections("tcp")
            if c.status == psutil.CONN_ESTABLISHED]


def owner_of(address: tuple[str, int]) -> tuple[int, int]:
    """(pid, fd) of the established TCP socket whose local address is ADDRESS."""
    for conn in psutil.net_connections("tcp"):
        if conn.status == psutil.CONN_ESTABLISHED and tuple(conn.laddr) == tuple(address) \
                and conn.pid is not None:
            return conn.pid, conn.fd
    raise LookupError(f"no process has an established socket at {address}")


def connected_tcp(pid: int) -> dict[int, tuple[Any, Any, bool]]:
    """fd -> (local address, peer address, TCP_NODELAY) of every connected TCP socket of
    process PID, in whatever network namespace it runs."""
    found: dict[int, tuple[Any, Any, bool]] = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            if not os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:"):
                continue
            with borrowed(pid, int(name)) as mine:
                sock = socket.socket(fileno=os.dup(mine))
                try:
                    if sock.family not in (socket.AF_INET, socket.AF_INET6) or \
                            sock.type != socket.SOCK_STREAM:
                        continue
                    try:
                        peer = sock.getpeername()
                    except OSError:
                        continue  # a listening socket
                    found[int(name)] = (sock.getsockname(), peer, bool(
                        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)))
                finally:
                    sock.close()
        except FileNotFoundError:
            continue  # closed meanwhile
    return found
