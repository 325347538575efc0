"""A job's stdin and stdout on mutual-TLS data connections of their own, each pumped by a
thread at both ends (issue P11 item 2: beyond one thread), once they prove big.

The client offers them in START (rexnet.protocol.frames.Start: data_token, data_streams
"i" stdin, "o" stdout) for a job without a terminal whose stdin or stdout is a pipe or
a file; the worker says in STARTED (stdin_apart, stdout_apart) which it would take.
Each stream starts in-band on the job's channel, as with an older peer: a short job
costs no port, thread or handshake. Only once tuning.HANDOVER bytes of it went in-band
does it move (the APART frame marks where its in-band part ends):

- stdin: the client stops reading it in the reactor, opens its DataPort (one a job, for
  both streams) and sends APART(0, port) after its last in-band byte; the worker dials
  (DataDial) and its thread writes to the job's pipe only once the reactor has written
  every in-band byte there (the GATE);
- stdout: the worker stops reading the job's pipe in the reactor and sends APART(1, 0)
  after its last in-band byte; the client answers APART(1, port) (0: stay in-band) and
  its thread writes to stdout only once the reactor has written every in-band byte.

stderr and control (START, WINDOW, EXIT, signals) stay on the channel in the reactor.
Each connection is TLS with certificates on both sides, each checked as the channel's
are (rexnet.net.threadtls.peer) and each required to be the certificate of the job's
channel; the worker's first bytes are the 32-byte token and the stream's letter. The
client (DataPort) accepts one connection per stream, only with the job's token and the
job's worker's certificate, and only for a stream handed over; any other connection is
refused with a complaint, and a peer that has not finished its handshake and sent the
token within HANDSHAKE_TIMEOUT is dropped (MAX_PENDING served at once).

Each stream ends with TLS close_notify. A stream that ends without it (a FIN or a
reset) is a truncation and fails the job: stdin's, at the worker (the job's stdin is
closed, ERROR "stdin": the client exits with the worker-lost status whatever the job's
own), as when the connection cannot be made at all; stdout's, at the client. EXIT
still follows the last byte of output: the worker sends it once its stdout thread has
sent close_notify, and the client acts on it once its own has read that close_notify
and written everything (StdioStreams.finish). A job that stops reading its stdin, or a
client whose stdout reader went away, ends the stream's connection: the other end's
thread ends quietly (the job then sees EPIPE on its stdout, as under ssh). The worker
dials stdout's connection only once the job wrote more after the handover: a job that
ends right at it costs no handshake; its stream 1 ends with an EOF on the channel. A job
that ends while the worker still dials its stdin's connection (DataDial.stop) is no
failure at either end: the worker ends it quietly, and so does the client's port, which
let go of stdin at the job's end (DataPort.finish).
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
from twisted.internet import defer
from twisted.internet.interfaces import IReadDescriptor
from twisted.logger import Logger
from zope.interface import implementer

from rexnet.net import threadtls
from rexnet.net.threadtls import Refused, Stopped, Stopper, TimedOut
from rexnet.net.tuning import widen_pipe
from rexnet.security.credentials import Credential
from rexnet.security.tls import Revocations

TOKEN_SIZE = 32
STDIN, STDOUT = "i", "o"  # the streams, as the worker names them after the token
HANDSHAKE_TIMEOUT = 5.0  # seconds for TCP, TLS and the token, on either end
MAX_PENDING = 4  # connections the port serves at once before they are claimed

log = Logger()


class Truncated(Exception):
    """A stream ended without TLS close_notify (or its connection never came)."""


def _start(target: Callable[..., None], name: str, *args: object) -> None:
    threading.Thread(target=target, name=name, args=args, daemon=True).start()


def await_gate(gate: threading.Event | None, stopper: Stopper) -> None:
    """Until GATE is set (the reactor wrote every in-band byte); Stopped if stopped."""
    while gate is not None and not gate.wait(0.05):
        if stopper.stopped:
            raise Stopped


@implementer(IReadDescriptor)
class DataPort:
    """The client's end: a listening port for one job's data connections (see above).

    SOURCE (stdin) and SINK (stdout) are the job's descriptors, or None for a stream not
    handed over (yet: see add; each copied: a thread closes its copy); EXPECTED is the
    certificate of the job's worker; TOKEN the one START carried (a fresh one if None);
    COMPLAIN(peer, problem) is called in the reactor for each refusal."""

    def __init__(self, reactor: Any, credential: Credential, revoked: Revocations | None,
                 host: str, expected: x509.Certificate, source: int | None,
                 sink: int | None, complain: Callable[[str, str], None],
                 token: bytes | None = None) -> None:
        self.reactor = reactor
        self.credential = credential
        self.revoked = revoked
        self.expected = expected
        self.complain = complain
        self.token = token or os.urandom(TOKEN_SIZE)
        self.gates: dict[str, threading.Event] = {}  # a stream's thread waits on its gate
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.fds: dict[str, int] = {}
        self.claimed: set[str] = set()
        self.unwanted: set[str] = set()  # let go of at the job's end: its connection is not
        #                                  refused but ended quietly (see finish)
        self.streams = ""
        self._lock = threading.Lock()
        try:
            self.sock.bind((host, 0))
            self.sock.listen(MAX_PENDING)
            self.sock.setblocking(False)
            self.port: int = self.sock.getsockname()[1]
            for stream, fd in ((STDIN, source), (STDOUT, sink)):
                if fd is not None:
                    self.add(stream, fd)
        except OSError:
            self.sock.close()
            self._release(*self.fds)
            raise
        self.listening = True
        self.closed = False
        self.sent = [0]
        self.received = [0]
        self.output: defer.Deferred[None] = defer.Deferred()  # stdout's end (see finish)
        self._threads: dict[Stopper, str] = {}  # each thread, and its stream once claimed
        reactor.addReader(self)

    def add(self, stream: str, fd: int, gate: threading.Event | None = None) -> None:
        """STREAM (its descriptor FD, copied) is handed over: its connection may come. Its
        thread moves nothing before GATE is set (None: at once)."""
        widen_pipe(fd)  # as the reactor's pipe readers and writers do
        copy = os.dup(fd)
        with self._lock:
            self.fds[stream] = copy
            if gate is not None:
                self.gates[stream] = gate
            self.streams = "".join(s for s in (STDIN, STDOUT) if s in self.fds
                                   or s in self.claimed)

    # -- IReadDescriptor: the listening socket, in the reactor --------------------------

    def fileno(self) -> int:
        return self.sock.fileno()

    def logPrefix(self) -> str:
        return "DataPort"

    def connectionLost(self, reason: object) -> None:
        self.close()

    def doRead(self) -> None:
        while self.listening:
            try:
                conn, addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.warn("the job's data port failed: {why}", why=e.strerror)
                return
            peer = f"{addr[0]}:{addr[1]}"
            unclaimed = sum(1 for s in self._threads.values() if not s)
            if len(self.claimed) == len(self.streams) or unclaimed >= MAX_PENDING:
                conn.close()
                self.complain(peer, "a further connection to the job's data port ("
                              + ("its data connections are made)" if unclaimed < MAX_PENDING
                                 else f"{MAX_PENDING} are in their handshake)"))
                continue
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            stopper = Stopper()
            stopper.hold(conn)
            self._threads[stopper] = ""
            _start(self._serve, "rexnet-job-data", conn, peer, stopper)

    # -- the threads ----------------------------------------------------------------------

    def _serve(self, sock: socket.socket, peer: str, stopper: Stopper) -> None:
        stream = ""
        problem = ""
        try:
            deadline = time.monotonic() + HANDSHAKE_TIMEOUT
            conn = threadtls.handshake(sock, self.credential, True, deadline, stopper)
            threadtls.peer(conn, self.credential, self.revoked, self.expected)
            first = threadtls.receive_exact(conn, TOKEN_SIZE + 1, deadline, stopper)
            if not hmac.compare_digest(first[:TOKEN_SIZE], self.token):
                raise Refused("wrong token for the job's data port")
            stream = self._claim(first[TOKEN_SIZE:].decode("latin-1"))
            self.reactor.callFromThread(self._threads.__setitem__, stopper, stream)
            sock.setblocking(True)
            if stream == STDIN:
                threadtls.send_from(self.fds[STDIN], conn, stopper, self.sent)
                threadtls.linger(sock, HANDSHAKE_TIMEOUT)
            else:
                await_gate(self.gates.get(STDOUT), stopper)
                threadtls.receive_into(conn, self.fds[STDOUT], stopper, self.received)
                self.reactor.callFromThread(self._output_end, None)
        except Stopped:
            pass
        except TimedOut:
            problem = f"no TLS handshake and token within {HANDSHAKE_TIMEOUT:g} s"
        except Refused as e:
            problem = str(e)
        except (SSL.Error, OSError) as e:
            if stopper.stopped:  # we let go of it (the job ended): not the peer's doing
                pass
            elif not stream:
                problem = f"TLS handshake failed: {e}"
            elif stream == STDOUT and not isinstance(e, OSError):
                self.reactor.callFromThread(self._output_end, Truncated(
                    f"the job's stdout ended without TLS close_notify after "
                    f"{self.received[0]} bytes (truncated)"))
            elif stream == STDOUT:  # our reader went away (EPIPE): the rest is dropped
                self.reactor.callFromThread(self._output_end, None)
            # stdin: the worker stopped reading (the job closed its stdin)
        finally:
            stopper.close()
            if stream:
                self._release(stream)
            self.reactor.callFromThread(self._ended, stopper)
        if problem:
            self.reactor.callFromThread(self.complain, peer, problem)

    def _claim(self, stream: str) -> str:
        with self._lock:
            if stream in self.unwanted or self.closed:
                raise Stopped  # the job's worker, too late: the port let go of the stream
            if stream in self.claimed:
                raise Refused(f"the job's {'stdin' if stream == STDIN else 'stdout'} "
                              "connection is made already")
            if stream not in self.fds:
                raise Refused(f"no stream {stream!r} offered on the job's data port")
            self.claimed.add(stream)
            return stream

    def _release(self, *streams: str) -> None:
        for stream in streams:
            with self._lock:
                fd = self.fds.pop(stream, None)
            if fd is not None:
                os.close(fd)

    def _ended(self, stopper: Stopper) -> None:
        self._threads.pop(stopper, None)
        self._check_output()

    def _output_end(self, error: Exception | None) -> None:
        if not self.output.called:
            if error is None:
                self.output.callback(None)
            else:
                self.output.errback(error)

    def _check_output(self) -> None:
        """Once the port stopped listening, stdout's connection cannot come any more if
        it has not been claimed and no connection is in its handshake."""
        if (not self.listening and STDOUT in self.fds and STDOUT not in self.claimed
                and not any(not s for s in self._threads.values())):
            self._output_end(Truncated("the job's stdout connection never came"))

    # -- from the job -------------------------------------------------------------------

    def empty_output(self) -> None:
        """The worker says (EOF of stream 1 on the channel) that the job's stdout ended
        before its first byte: its connection will not come."""
        with self._lock:
            if STDOUT in self.claimed:
                return
            self.claimed.add(STDOUT)  # no connection may claim it now
        self._release(STDOUT)
        self._output_end(None)

    def finish(self) -> defer.Deferred[None]:
        """The job ended: no more connections; stdin is no longer read; fires once stdout
        has come to its close_notify and is written (at once if it is not here)."""
        self._stop_listening()
        for stopper, stream in list(self._threads.items()):
            if stream == STDIN:
                stopper.stop()
        with self._lock:
            pending = STDIN in self.fds and STDIN not in self.claimed
            if pending:  # the worker may be dialling it still (it ended the job meanwhile)
                self.unwanted.add(STDIN)
        if pending:
            self._release(STDIN)
        self._check_output()
        if STDOUT not in self.streams:
            self._output_end(None)
        return self.output

    def close(self) -> None:
        """Stop everything at once (the job is abandoned, or nothing comes here)."""
        if self.closed:
            return
        with self._lock:
            self.closed = True
            unclaimed = [s for s in self.fds if s not in self.claimed]
        self._stop_listening()
        for stopper in list(self._threads):
            stopper.stop()
        self._release(*unclaimed)
        self._output_end(None)

    def _stop_listening(self) -> None:
        if self.listening:
            self.listening = False
            self.reactor.removeReader(self)
            self.sock.close()


class DataDial:
    """The worker's end of one stream: connect to the client's data port, present the
    token and the stream's letter, then move the stream: STDIN from TLS to the job's
    stdin pipe, STDOUT from the job's stdout pipe to TLS. FD is the job's end of the
    pipe (copied; the copy is closed after ENDED); GATE, if any, is set once the reactor
    wrote its last in-band byte there. ENDED(problem) is called in the reactor at the
    end: "" for a clean end (close_notify; or the other end went away on purpose), None
    when stopped (or once the job ended: stop), else why the stream is incomplete."""

    def __init__(self, reactor: Any, credential: Credential, revoked: Revocations | None,
                 address: tuple[str, int], token: bytes, expected: x509.Certificate,
                 stream: str, fd: int, ended: Callable[[str | None], None],
                 gate: threading.Event | None = None) -> None:
        self.reactor = reactor
        self.credential = credential
        self.revoked = revoked
        self.address = address
        self.token = token
        self.expected = expected
        self.stream = stream
        self.fd = os.dup(fd)
        self.ended = ended
        self.gate = gate
        self.stopper = Stopper()
        self.moved = [0]
        self.empty = False  # stdout ended before its first byte: no connection was made
        self._lock = threading.Lock()
        self._made = False  # TLS is up and the token sent
        self._quitting = False
        _start(self._run, f"rexnet-job-{'stdin' if stream == STDIN else 'stdout'}")

    def stop(self, hard: bool = True) -> None:
        """Let go of the stream at once (HARD), or (the job ended: its stdin is no longer
        wanted) once the connection is made: a handshake cut short would read as an
        attack at the client's end."""
        with self._lock:
            self._quitting = True
            if hard or self._made:
                self.stopper.stop()

    def _run(self) -> None:
        problem: str | None = ""
        made = False
        try:
            first = b""
            if self.stream == STDOUT:  # a job without output needs no connection
                first = threadtls.read_some(self.fd, self.stopper)
                if not first:
                    self.empty = True
                    return
            deadline = time.monotonic() + HANDSHAKE_TIMEOUT
            sock = socket.create_connection(self.address, timeout=HANDSHAKE_TIMEOUT)
            self.stopper.hold(sock)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = threadtls.handshake(sock, self.credential, False, deadline, self.stopper)
            threadtls.peer(conn, self.credential, self.revoked, self.expected)
            threadtls.send_all_nb(conn, self.token + self.stream.encode(), deadline,
                                  self.stopper)
            made = True
            with self._lock:
                self._made = True
                if self._quitting:
                    raise Stopped
            sock.setblocking(True)
            if self.stream == STDIN:
                await_gate(self.gate, self.stopper)
                threadtls.receive_into(conn, self.fd, self.stopper, self.moved)
            else:
                conn.sendall(first)
                self.moved[0] += len(first)
                threadtls.send_from(self.fd, conn, self.stopper, self.moved)
                threadtls.linger(sock, HANDSHAKE_TIMEOUT)
        except Stopped:
            problem = None
        except TimedOut:
            problem = f"no {self.name} connection within {HANDSHAKE_TIMEOUT:g} s"
        except Refused as e:
            problem = f"{self.name} connection refused: {e}"
        except (SSL.Error, OSError) as e:
            if self.stopper.stopped:
                problem = None
            elif not made:
                problem = f"no {self.name} connection: {_why(e)}"
            elif self.stream == STDIN and not isinstance(e, OSError):
                problem = (f"the stdin connection ended without TLS close_notify after "
                           f"{self.moved[0]} bytes (truncated): {_why(e)}")
            # else the job closed its stdin (EPIPE), or the client stopped reading stdout
        finally:
            self.stopper.close()
            self.reactor.callFromThread(self._end, problem)

    def _end(self, problem: str | None) -> None:
        """In the reactor: report the stream's end, then close our copy of the job's pipe.
        In that order: a job reads its stdin's EOF only once a truncation is known here,
        so it cannot end on a cut input before the cut fails it. Once the job ended (stop),
        nothing that befalls its stream is a problem: no part of it could reach the job."""
        try:
            with self._lock:
                if self._quitting:
                    problem = None
            self.ended(problem)
        finally:
            with contextlib.suppress(OSError):
                os.close(self.fd)

    @property
    def name(self) -> str:
        return "stdin" if self.stream == STDIN else "stdout"


def _why(error: Exception) -> str:
    if isinstance(error, OSError):
        return error.strerror or str(error)
    return str(error)[:200] or type(error).__name__
