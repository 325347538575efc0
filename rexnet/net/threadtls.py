"""Mutual TLS with blocking calls in a thread of its own, for a job's bulk stream (P11 #2).

pyOpenSSL's SSL_read and SSL_write release the GIL, and so do os.read and os.write: a
direction of a job pumped by its own thread runs beside the reactor, on the other core
(benchmarks/prototypes/bulk_pumps.py measured it level with ssh). This module holds what
such a thread needs, and nothing of the reactor:

- `context`: the credential's TLS context, the one the reactor's connections use
  (rexnet.security.tls.listening_options: TLS 1.2+, our certificate, the peer's demanded
  and chained to the application CA); `peer` then checks the peer's role, validity and
  revocation (check_peer) and that it is the certificate the job's channel showed;
- `handshake`, `receive_exact`, `send_all_nb`: the socket non-blocking, every wait
  bounded by a deadline and by the thread's Stopper;
- `send_from` and `receive_into`: the pumps, PIECE bytes at a time, the socket blocking
  (one piece in flight per thread: memory bounded; TCP and blocking writes are the
  back-pressure). A pump blocked in a TLS call is stopped by shutting its socket down.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import threading
import time

from cryptography import x509
from OpenSSL import SSL

from rexnet.security.credentials import Credential
from rexnet.security.tls import Revocations, check_peer, listening_options

PIECE = 256 * 1024

_contexts: dict[bytes, SSL.Context] = {}
_contexts_lock = threading.Lock()


class Stopped(Exception):
    """The thread's owner stopped it."""


class TimedOut(Exception):
    """The peer did not do its part before the deadline."""


class Refused(Exception):
    """The peer is not the one expected (its certificate, its token)."""


class Stopper:
    """Stops a pump thread from another thread: wakes its polls and shuts its socket down.

    The pump thread owns the socket and the wake-up pipe and closes them (close()); a
    stop() after that does nothing, so no descriptor number is touched once reused."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.sock: socket.socket | None = None
        self.stopped = False
        self._closed = False

    def hold(self, sock: socket.socket) -> None:
        """SOCK is the thread's: stop() shuts it down."""
        with self._lock:
            self.sock = sock
            if self.stopped:
                self._shut()

    def stop(self) -> None:
        with self._lock:
            if self._closed or self.stopped:
                return
            self.stopped = True
            os.write(self._wake_w, b"x")
            self._shut()

    def _shut(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)

    def wait(self, fd: int, events: int, deadline: float | None = None) -> None:
        """Until FD is ready for EVENTS; Stopped if stopped, TimedOut at DEADLINE."""
        poller = select.poll()
        poller.register(fd, events | select.POLLERR | select.POLLHUP)
        poller.register(self._wake_r, select.POLLIN)
        while True:
            if self.stopped:
                raise Stopped
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TimedOut
            ready = poller.poll(None if left is None else max(1, int(left * 1000)))
            if any(fd_ == self._wake_r for fd_, _ in ready) or self.stopped:
                raise Stopped
            if ready:
                return

    def close(self) -> None:
        """Called by the thread as it ends."""
        with self._lock:
            self._closed = True
            os.close(self._wake_r)
            os.close(self._wake_w)
            if self.sock is not None:
                self.sock.close()


def context(credential: Credential) -> SSL.Context:
    """The TLS context of CREDENTIAL (made once), for either end of a connection."""
    with _contexts_lock:
        made = _contexts.get(credential.cert_der)
        if made is None:
            made = _contexts[credential.cert_der] = listening_options(credential).getContext()
        return made


def handshake(sock: socket.socket, credential: Credential, server: bool, deadline: float,
              stopper: Stopper) -> SSL.Connection:
    """The TLS handshake on SOCK (made non-blocking), by DEADLINE."""
    sock.setblocking(False)
    conn = SSL.Connection(context(credential), sock)
    if server:
        conn.set_accept_state()
    else:
        conn.set_connect_state()
    while True:
        try:
            conn.do_handshake()
            return conn
        except SSL.WantReadError:
            stopper.wait(sock.fileno(), select.POLLIN, deadline)
        except SSL.WantWriteError:
            stopper.wait(sock.fileno(), select.POLLOUT, deadline)


def peer(conn: SSL.Connection, credential: Credential, revoked: Revocations | None,
         expected: x509.Certificate | None) -> x509.Certificate:
    """The peer's certificate if it has our peer's role, is valid, not revoked and is
    EXPECTED (the certificate of the job's channel); else Refused."""
    cert, problem = check_peer(conn.get_peer_certificate(), credential, revoked)
    if problem or cert is None:
        raise Refused(problem or "no certificate")
    if expected is not None and cert != expected:
        raise Refused("peer certificate is not the one of the job's channel")
    return cert


def receive_exact(conn: SSL.Connection, size: int, deadline: float,
                  stopper: Stopper) -> bytes:
    """SIZE bytes from CONN (non-blocking socket) by DEADLINE; Refused if it ends first."""
    got = b""
    while len(got) < size:
        try:
            got += conn.recv(size - len(got))
        except SSL.WantReadError:
            stopper.wait(conn.fileno(), select.POLLIN, deadline)
        except SSL.ZeroReturnError:
            raise Refused(f"closed after {len(got)} of the token's {size} bytes") from None
    return got


def send_all_nb(conn: SSL.Connection, data: bytes, deadline: float,
                stopper: Stopper) -> None:
    """DATA to CONN (non-blocking socket) by DEADLINE."""
    done = 0
    while done < len(data):
        try:
            done += conn.send(data[done:])
        except SSL.WantWriteError:
            stopper.wait(conn.fileno(), select.POLLOUT, deadline)
        except SSL.WantReadError:
            stopper.wait(conn.fileno(), select.POLLIN, deadline)


def read_some(fd: int, stopper: Stopper) -> bytes:
    """Up to PIECE bytes from FD once it has some (b"" at its end)."""
    while True:
        stopper.wait(fd, select.POLLIN)
        try:
            return os.read(fd, PIECE)
        except BlockingIOError:
            continue


def send_from(fd: int, conn: SSL.Connection, stopper: Stopper, sent: list[int]) -> None:
    """Read FD to its end and send it on CONN (blocking socket), then close_notify.
    SENT[0] counts the bytes sent."""
    while data := read_some(fd, stopper):
        conn.sendall(data)
        sent[0] += len(data)
    conn.shutdown()  # close_notify: the stream's end, not a truncation


def receive_into(conn: SSL.Connection, fd: int, stopper: Stopper,
                 received: list[int]) -> None:
    """Receive CONN (blocking socket) to its close_notify and write it to FD (its writes
    wait for room), PIECE bytes at most at a time. An SSL.Error (a FIN or a reset
    without close_notify: a truncation) or an OSError of FD's (EPIPE: the reader is gone)
    goes to the caller. RECEIVED[0] counts the bytes written."""
    buf = bytearray(PIECE)
    view = memoryview(buf)
    sock = conn.fileno()
    got = 0
    while True:
        try:
            n = conn.recv_into(view[got:])  # type: ignore[arg-type]
        except SSL.ZeroReturnError:
            n = 0
        except SSL.Error:  # a truncation: what came first goes to FD all the same
            if got and not stopper.stopped:
                _write_all(fd, view[:got], stopper)
                received[0] += got
            raise
        got += n
        if n == 0 or got == PIECE or (conn.pending() == 0
                                      and not select.select([sock], [], [], 0)[0]):
            _write_all(fd, view[:got], stopper)
            received[0] += got
            got = 0
        if n == 0:
            return


def _write_all(fd: int, data: memoryview, stopper: Stopper) -> None:
    done = 0
    while done < len(data):
        try:
            done += os.write(fd, data[done:])
        except BlockingIOError:
            stopper.wait(fd, select.POLLOUT)


def linger(sock: socket.socket, timeout: float) -> None:
    """After our close_notify: FIN, then read (and drop) until the peer's FIN, within
    TIMEOUT, so that what the peer sent unasked (TLS 1.3 session tickets) does not turn
    our close into a reset that could cut the stream's tail at the peer."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(timeout)
        while sock.recv(PIECE):
            pass
