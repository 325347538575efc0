"""A job's stdin on a mutual-TLS data connection of its own, pumped by a thread at each
end (issue P11 item 2: beyond one thread).

The client offers it in START (rexnet.protocol.frames.Start: stdin_port, stdin_token)
for a job whose stdin is a pipe or a file; stdout, stderr and control (START, WINDOW,
EXIT, signals) stay on the job's channel in the reactor, so EXIT still follows the last
byte of output. The worker that takes the offer says so in STARTED (stdin_apart), then
connects to the port (StdinFetch): TLS with certificates on both sides, each checked as
the channel's are (rexnet.net.threadtls.peer) and each required to be the certificate
of the job's channel; its first bytes are the 32-byte token. The client (StdinPort)
accepts one such connection per job, only with the job's token and the job's worker's
certificate, and only after START (the port opens with it); any other connection is
refused with a complaint, and a peer that has not finished its handshake and sent the
token within HANDSHAKE_TIMEOUT is dropped (at most MAX_PENDING are served at once).

The pumps: the client's thread reads its stdin descriptor (a copy of its own, polled
with the Stopper's wake-up pipe, so the job's end stops it) and writes TLS; the
worker's thread reads TLS and writes the job's stdin pipe, PIECE bytes at a time.
The stream ends with TLS close_notify: the worker closes the job's stdin. A connection
that ends without close_notify (a FIN or a reset) is a truncation: the job's stdin is
closed all the same, the worker logs it and fails the job (ERROR "stdin": the client
exits with the worker-lost status, whatever the job's own), as it does when the data
connection cannot be made at all: a job must not run to success on part of its input.
A job that stops reading its stdin makes the worker's thread close the connection; the
client's thread ends quietly.
"""

from __future__ import annotations

import contextlib
import hmac
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from cryptography import x509
from OpenSSL import SSL
from twisted.internet.interfaces import IReadDescriptor
from twisted.logger import Logger
from zope.interface import implementer

from rexnet.net import threadtls
from rexnet.net.threadtls import Refused, Stopped, Stopper, TimedOut
from rexnet.security.credentials import Credential
from rexnet.security.tls import Revocations

TOKEN_SIZE = 32
HANDSHAKE_TIMEOUT = 5.0  # seconds for TCP, TLS and the token, on either end
MAX_PENDING = 4  # connections the port serves at once before one is claimed

log = Logger()


def _start(target: Callable[..., None], name: str, *args: object) -> None:
    threading.Thread(target=target, name=name, args=args, daemon=True).start()


@implementer(IReadDescriptor)
class StdinPort:
    """The client's end: a listening port for one job's stdin connection (see above).

    SOURCE is the job's stdin descriptor (copied: the thread closes its copy);
    EXPECTED the certificate of the job's worker; COMPLAIN(peer, problem) is called in
    the reactor for each refused connection."""

    def __init__(self, reactor: Any, credential: Credential, revoked: Revocations | None,
                 host: str, expected: x509.Certificate, source: int,
                 complain: Callable[[str, str], None]) -> None:
        self.reactor = reactor
        self.credential = credential
        self.revoked = revoked
        self.expected = expected
        self.complain = complain
        self.token = os.urandom(TOKEN_SIZE)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            self.sock.bind((host, 0))
            self.sock.listen(MAX_PENDING)
            self.sock.setblocking(False)
            self.port: int = self.sock.getsockname()[1]
            self.source: int | None = os.dup(source)
        except OSError:
            self.sock.close()
            raise
        self._lock = threading.Lock()
        self.claimed = False
        self.closed = False
        self.sent = [0]
        self._threads: set[Stopper] = set()
        reactor.addReader(self)

    # -- IReadDescriptor: the listening socket, in the reactor --------------------------

    def fileno(self) -> int:
        return self.sock.fileno()

    def logPrefix(self) -> str:
        return "StdinPort"

    def connectionLost(self, reason: object) -> None:
        self.close()

    def doRead(self) -> None:
        while not self.closed:
            try:
                conn, addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.warn("the job's stdin port failed: {why}", why=e.strerror)
                return
            peer = f"{addr[0]}:{addr[1]}"
            if self.claimed or len(self._threads) >= MAX_PENDING:
                conn.close()
                self.complain(peer, "a further connection to the job's stdin port "
                              + ("(its stdin connection is made)" if self.claimed else
                                 f"({MAX_PENDING} are in their handshake)"))
                continue
            stopper = Stopper()
            stopper.hold(conn)
            self._threads.add(stopper)
            _start(self._serve, "rexnet-stdin-send", conn, peer, stopper)

    # -- the thread ---------------------------------------------------------------------

    def _serve(self, sock: socket.socket, peer: str, stopper: Stopper) -> None:
        claimed = False
        problem = ""
        try:
            deadline = time.monotonic() + HANDSHAKE_TIMEOUT
            conn = threadtls.handshake(sock, self.credential, True, deadline, stopper)
            threadtls.peer(conn, self.credential, self.revoked, self.expected)
            token = threadtls.receive_exact(conn, TOKEN_SIZE, deadline, stopper)
            if not hmac.compare_digest(token, self.token):
                raise Refused("wrong token for the job's stdin")
            with self._lock:
                if self.claimed or self.closed or self.source is None:
                    raise Refused("the job's stdin connection is made already")
                self.claimed = claimed = True
            sock.setblocking(True)
            threadtls.send_from(self.source, conn, stopper, self.sent)
        except Stopped:
            pass
        except TimedOut:
            problem = f"no TLS handshake and token within {HANDSHAKE_TIMEOUT:g} s"
        except Refused as e:
            problem = str(e)
        except (SSL.Error, OSError) as e:
            if not claimed:
                problem = f"TLS handshake failed: {e}"
            elif not stopper.stopped:  # the worker stopped reading (the job closed stdin)
                self.reactor.callFromThread(log.info, "the job's stdin connection ended "
                                            "after {n} bytes: {why}", n=self.sent[0], why=e)
        finally:
            stopper.close()
            if claimed:
                self._release_source()
            self.reactor.callFromThread(self._threads.discard, stopper)
        if problem:
            self.reactor.callFromThread(self.complain, peer, problem)

    def _release_source(self) -> None:
        with self._lock:
            source, self.source = self.source, None
        if source is not None:
            os.close(source)

    # -- from the job -------------------------------------------------------------------

    def close_unclaimed(self) -> bool:
        """No connection will come (the worker did not take the offer): close the port
        and let go of stdin, unless a connection has claimed it (then True)."""
        with self._lock:
            claimed = self.claimed
        if not claimed:
            self.close()
        return claimed

    def close(self) -> None:
        """The job ended: stop listening, stop the threads, let go of stdin."""
        if self.closed:
            return
        with self._lock:
            self.closed = True
            claimed = self.claimed
        self.reactor.removeReader(self)
        self.sock.close()
        for stopper in list(self._threads):
            stopper.stop()
        if not claimed:
            self._release_source()


class StdinFetch:
    """The worker's end: connect to the client's stdin port, present the token, write
    what comes to the job's stdin (SINK, copied: the thread closes its copy, the caller
    closes its own at once). ENDED(problem, bytes) is called in the reactor at the end:
    problem "" for a clean end (close_notify, or the job closed its stdin), None when
    stopped, else why the job's input is incomplete."""

    def __init__(self, reactor: Any, credential: Credential, revoked: Revocations | None,
                 host: str, port: int, token: bytes, expected: x509.Certificate,
                 sink: int, ended: Callable[[str | None, int], None]) -> None:
        self.reactor = reactor
        self.credential = credential
        self.revoked = revoked
        self.address = (host, port)
        self.token = token
        self.expected = expected
        self.sink = os.dup(sink)
        self.ended = ended
        self.stopper = Stopper()
        self.received = [0]
        _start(self._run, "rexnet-stdin-receive")

    def stop(self) -> None:
        """The job ended: stop at once."""
        self.stopper.stop()

    def _run(self) -> None:
        problem: str | None = ""
        made = False
        try:
            deadline = time.monotonic() + HANDSHAKE_TIMEOUT
            sock = socket.create_connection(self.address, timeout=HANDSHAKE_TIMEOUT)
            self.stopper.hold(sock)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = threadtls.handshake(sock, self.credential, False, deadline, self.stopper)
            threadtls.peer(conn, self.credential, self.revoked, self.expected)
            threadtls.send_all_nb(conn, self.token, deadline, self.stopper)
            made = True
            sock.setblocking(True)
            threadtls.receive_into(conn, self.sink, self.stopper, self.received)
        except Stopped:
            problem = None
        except BrokenPipeError:
            problem = ""  # the job closed its stdin: nothing more is wanted
        except TimedOut:
            problem = f"no stdin connection within {HANDSHAKE_TIMEOUT:g} s"
        except Refused as e:
            problem = f"stdin connection refused: {e}"
        except (SSL.Error, OSError) as e:
            if self.stopper.stopped:
                problem = None
            elif made:
                problem = (f"the stdin connection ended without TLS close_notify after "
                           f"{self.received[0]} bytes (truncated): {_why(e)}")
            else:
                problem = f"no stdin connection: {_why(e)}"
        finally:
            with contextlib.suppress(OSError):
                os.close(self.sink)
            self.stopper.close()
            self.reactor.callFromThread(self.ended, problem, self.received[0])


def _why(error: Exception) -> str:
    if isinstance(error, OSError):
        return error.strerror or str(error)
    return str(error)[:200] or type(error).__name__
