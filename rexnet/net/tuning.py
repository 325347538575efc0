"""Socket and pipe tuning for every connection and job (issue P11: no stalls).

Every TCP connection rexnet makes or accepts (job channels, warm channels, the cproxy's
splices, tunnel and registration links) calls `tune_connection` in its connectionMade:

- TCP_NODELAY: the channel writes small frames (WINDOW credit, EXIT) that must not wait
  for the peer's delayed ACK behind Nagle's algorithm; with it off, both directions of a
  bulk transfer stalled at zero credit for 10-120 ms at a time;
- a TRANSPORT_BUFFER transport bufferSize: the size of each socket read, and how much
  the transport buffers before it pauses its producer (Twisted's default is 64 KiB);
- a SEND_LIMIT of TRANSPORT_BUFFER: the most one send() hands the kernel (Twisted's
  128 KiB cut a full buffer into several sends, each a turn of the reactor).

`widen_pipe` grows a job's pipes (and those of the launcher the agent serves) to
PIPE_SIZE, so a pipe holds more than a few reads' worth; where the kernel refuses
(not a pipe, over /proc/sys/fs/pipe-max-size, the user's pipe quota spent) the pipe
keeps its size, quietly. Per job that is at most a few pipes of PIPE_SIZE in the kernel
and TRANSPORT_BUFFER (plus the channel's window) in the process: bounded.

`send_now` hands a message the peer waits on (START, EXIT, the launcher's status) to the
kernel at once, before the bookkeeping that follows it (issue P11, item 3). It reads two
private attributes of Twisted's (tests/test_send_now.py names them).
"""

from __future__ import annotations

import fcntl
import socket
from typing import Any

from twisted.internet import abstract
from twisted.logger import Logger

from rexnet.net.bulktls import tls_layer

PIPE_SIZE = 1 << 20
# a job's stdin or stdout moves onto a data connection of its own (rexnet.net.jobdata)
# only once this much of it went in-band: a short job costs no port, thread or handshake
HANDOVER = 1 << 20
TRANSPORT_BUFFER = 256 * 1024
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)

log = Logger()


def tcp_transport(transport: Any) -> abstract.FileDescriptor | None:
    """The TCP connection under TRANSPORT: itself, or what a TLS wrapper (or the cproxy's
    splice) writes to; None when there is no socket under it (test transports)."""
    for _ in range(4):
        if isinstance(transport, abstract.FileDescriptor):
            return transport if isinstance(getattr(transport, "socket", None),
                                           socket.socket) else None
        transport = vars(transport).get("transport") if hasattr(transport, "__dict__") else None
        if transport is None:
            return None
    return None


def tune_connection(transport: Any) -> bool:
    """TCP_NODELAY and a TRANSPORT_BUFFER bufferSize on TRANSPORT's TCP connection.

    Returns whether a TCP socket was found and tuned (False for in-memory transports)."""
    connection = tcp_transport(transport)
    if connection is None:
        return False
    sock: socket.socket = connection.socket  # type: ignore[attr-defined]
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError as e:  # a socket that is already gone: nothing to tune
        log.debug("cannot set TCP_NODELAY: {e}", e=e)
        return False
    connection.bufferSize = TRANSPORT_BUFFER
    connection.SEND_LIMIT = TRANSPORT_BUFFER
    return True


def send_now(transport: Any) -> bool:
    """Hand what TRANSPORT holds to the kernel now, not on the reactor's next turns: for a
    message the peer waits on (START, a job's EXIT, the launcher's exit status) when more
    work (the job's bookkeeping) follows it in this turn. Twisted's TLS transport keeps
    small writes until the next turn (to make one record of them) and the socket until
    the one after; both are flushed here. What the socket cannot take waits for the
    reactor, as usual; a transport with no socket under it (tests' transports), or one
    closing, is left alone. Whether a write was made."""
    tls = tls_layer(transport)
    if tls is not None and not tls.disconnecting:  # (closing: its loseConnection flushed)
        aggregator = getattr(tls, "_aggregator", None)  # BufferingTLSTransport's small writes
        if aggregator is not None:
            aggregator.flush()
    connection = tcp_transport(transport)
    if (connection is None or not connection.connected or connection.disconnecting
            or not (connection.dataBuffer or getattr(connection, "_tempDataBuffer", None))):
        return False
    connection.doWrite()  # an error stays for the reactor's own doWrite to find
    return True


def widen_pipe(fd: int, size: int = PIPE_SIZE) -> int:
    """Grow the pipe FD to SIZE bytes where the kernel allows; returns its size (0 when FD is
    not a pipe: a file, a terminal or a socket keeps what it is)."""
    try:
        current = fcntl.fcntl(fd, F_GETPIPE_SZ)
    except OSError:
        return 0
    if current >= size:
        return int(current)
    try:
        return int(fcntl.fcntl(fd, F_SETPIPE_SZ, size))
    except OSError:  # EPERM: over pipe-max-size or the user's quota; keep the pipe as it is
        return int(current)


TCP_ULP = getattr(socket, "TCP_ULP", 31)


def kernel_tls() -> str:
    """Whether this kernel offers TLS in the kernel (kTLS, the "tls" upper layer protocol),
    and so sendfile/splice of encrypted data: '' if it does, else why not.

    Probed as the kernel sees it, with setsockopt(SOL_TCP, TCP_ULP, "tls") on a connected
    loopback socket pair (no traffic leaves the process). The channel's TLS runs in
    pyOpenSSL over memory BIOs, which kTLS cannot take over; this probe says what a kTLS
    data path would find here (issue P11: this kernel has no tls module)."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        with socket.create_connection(listener.getsockname(), timeout=2) as sock:
            peer, _ = listener.accept()
            peer.close()
            sock.setsockopt(socket.SOL_TCP, TCP_ULP, b"tls")
    except OSError as e:
        return f"no kernel TLS: {e.strerror or e}"
    finally:
        listener.close()
    return ""
