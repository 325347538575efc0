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
- `send_from` and `receive_into`: the pumps, PIECE bytes at a time (one piece in flight
  per thread: memory bounded; TCP and blocking writes are the back-pressure); the sender's
  socket blocking (never corked: see send_from), the receiver's non-blocking. A pump
  blocked in a TLS call is stopped by shutting its socket down.
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

try:  # pyOpenSSL's bindings, for Records (its public calls where they are missing)
    from OpenSSL._util import ffi as _ffi
    from OpenSSL._util import lib as _lib
except ImportError:  # pragma: no cover
    _ffi = _lib = None

from rexnet.security.credentials import Credential
from rexnet.security.tls import Revocations, check_peer, listening_options

PIECE = 256 * 1024
# the most a sending pump leaves unsent in its socket (TCP_NOTSENT_LOWAT; what is in
# flight is the congestion window's, not limited by this): see send_from
UNSENT = 128 * 1024
TCP_NOTSENT_LOWAT = getattr(socket, "TCP_NOTSENT_LOWAT", 25)

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


class Records:
    """SSL_read and SSL_write of CONN straight on a buffer of ours, one TLS record a call.

    pyOpenSSL's recv_into reads into a fresh C buffer and copies it out, its send and
    recv ask SSL_get_error after every call, even a successful one, and each of those is
    a C call that lets go of the GIL (which the other pump thread then takes, and gives
    back): per 16 KiB record that was several calls and a copy. Here a record costs one
    C call; only a result <= 0 goes to pyOpenSSL's own error mapping, so the exceptions
    are pyOpenSSL's (WantReadError, ZeroReturnError, SysCallError, Error). This reaches
    pyOpenSSL's private `_ssl` and `_raise_ssl_error` (tests/test_threadtls.py names
    them); where they are not there, the public calls are used (`direct` is False)."""

    def __init__(self, conn: SSL.Connection, buf: bytearray) -> None:
        self.conn = conn
        self.buf = buf
        self.view = memoryview(buf)
        self._ssl = getattr(conn, "_ssl", None)
        self._raise = getattr(conn, "_raise_ssl_error", None)
        self.direct = (self._ssl is not None and callable(self._raise)
                       and _ffi is not None and _lib is not None)
        if self.direct:
            assert _ffi is not None and _lib is not None
            self._ptr = _ffi.from_buffer(buf)
            self._read = _lib.SSL_read
            self._write = _lib.SSL_write

    def read(self, at: int) -> int:
        """Decrypted bytes into the buffer from AT on (one record at most); 0 at the
        peer's close_notify."""
        if not self.direct:
            try:
                return self.conn.recv_into(self.view[at:])  # type: ignore[arg-type]
            except SSL.ZeroReturnError:
                return 0
        n: int = self._read(self._ssl, self._ptr + at, len(self.buf) - at)
        if n <= 0:
            try:
                self._fail(n)
            except SSL.ZeroReturnError:
                return 0
        return n

    def write(self, size: int) -> None:
        """The buffer's first SIZE bytes, all of them (the socket blocking)."""
        if not self.direct:
            self.conn.sendall(self.view[:size])
            return
        done = 0
        while done < size:
            n: int = self._write(self._ssl, self._ptr + done, size - done)
            if n <= 0:
                self._fail(n)
            done += n

    def _fail(self, result: int) -> None:
        assert self._raise is not None
        self._raise(self._ssl, result)
        raise SSL.Error(f"TLS call failed ({result}) with no error from OpenSSL")


def read_some(fd: int, stopper: Stopper) -> bytes:
    """Up to PIECE bytes from FD once it has some (b"" at its end)."""
    while True:
        stopper.wait(fd, select.POLLIN)
        try:
            return os.read(fd, PIECE)
        except BlockingIOError:
            continue


def read_into(fd: int, buf: bytearray, stopper: Stopper) -> int:
    """Bytes read from FD into BUF once it has some (0 at its end)."""
    while True:
        stopper.wait(fd, select.POLLIN)
        try:
            return os.readv(fd, [buf])
        except BlockingIOError:
            continue


def send_from(fd: int, conn: SSL.Connection, stopper: Stopper, sent: list[int]) -> None:
    """Read FD to its end and send it on CONN (blocking socket), then close_notify.
    SENT[0] counts the bytes sent. One PIECE buffer, reused (Records).

    Each 16 KiB record SSL_write makes goes to the kernel in a write() of its own and out
    at once (TCP_NODELAY), about one segment a record. The socket is not corked: corked, a
    piece queued several full segments, and TCP's internal pacing (BBR's, on a device
    without the fq qdisc, as on the bed) sends one segment per pass of tcp_write_xmit
    once the pacing clock is ahead, arming an hrtimer for the next: ~31,000
    timer arms and interrupts per GiB in the worker against sshd's ~550 (uncorked ~9,000),
    and per GiB round trip 1.0 s more CPU in the worker and 0.4 s in the agent
    (benchmarks/RESULTS.md, branch p11-bulksys).

    A write waits while more than UNSENT of what went before is still unsent
    (TCP_NOTSENT_LOWAT): else the socket's send buffer autotunes to 4 MiB and holds
    ~1 MiB not yet sent, and the worker spent ~0.3 s more CPU per GiB round trip."""
    sock = stopper.sock
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, TCP_NOTSENT_LOWAT, UNSENT)
    records = Records(conn, bytearray(PIECE))
    while size := read_into(fd, records.buf, stopper):
        records.write(size)
        sent[0] += size
    conn.shutdown()  # close_notify: the stream's end, not a truncation


def receive_into(conn: SSL.Connection, fd: int, stopper: Stopper,
                 received: list[int]) -> None:
    """Receive CONN to its close_notify and write it to FD (its writes wait for room),
    PIECE bytes at most at a time. An SSL.Error (a FIN or a reset without close_notify:
    a truncation) or an OSError of FD's (EPIPE: the reader is gone) goes to the caller.
    RECEIVED[0] counts the bytes written.

    The socket is made non-blocking: SSL_read takes one record (16 KiB) a call (Records:
    straight into one reused buffer), and what came is written to FD once PIECE is full
    or the socket has no more for now (SSL_read wants to read), so no poll is made per
    record while data keeps coming."""
    records = Records(conn, bytearray(PIECE))
    view = records.view
    sock = conn.fileno()
    if stopper.sock is not None:
        stopper.sock.setblocking(False)
    got = 0
    while True:
        try:
            n = records.read(got)
        except SSL.WantReadError:
            if got:
                _write_all(fd, view[:got], stopper)
                received[0] += got
                got = 0
            stopper.wait(sock, select.POLLIN)
            continue
        except SSL.WantWriteError:  # TLS 1.3 may answer (a key update) as it reads
            stopper.wait(sock, select.POLLOUT)
            continue
        except SSL.Error:  # a truncation: what came first goes to FD all the same
            if got and not stopper.stopped:
                _write_all(fd, view[:got], stopper)
                received[0] += got
            raise
        got += n
        if n == 0 or got == PIECE:
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
