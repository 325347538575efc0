"""A job's data connections under attack (rexnet.net.jobdata), with real sockets, real
TLS and real threads; the listening end is driven by a reactor of its own (PollReactor,
not installed, iterated here).

The client's port accepts one connection per stream and job, and only from the job's
worker's certificate with the job's token; every other connection is refused with a
complaint, a silent one within the handshake timeout. The worker's end refuses a server
that is not the job's client, and fails the job when its stdin ends without
close_notify; the client's fails it when its stdout does."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import pytest
from conftest import Keys
from OpenSSL import SSL
from twisted.internet.pollreactor import PollReactor
from twisted.python.failure import Failure

from rexnet.net import jobdata, threadtls
from rexnet.net.jobdata import STDIN, STDOUT, DataDial, DataPort, Truncated
from rexnet.security.credentials import (
    CertInfo,
    Credential,
    issue,
    load_ca,
    load_credential,
)

HOST = "127.0.0.1"


@pytest.fixture
def reactor() -> PollReactor:
    return PollReactor()


def turn(reactor: PollReactor, until: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not until() and time.monotonic() < deadline:
        reactor.iterate(0.02)
    assert until(), "timed out"


def other_worker(keys: Keys) -> Credential:
    """A second worker credential of the same application."""
    ca = load_ca(keys.ca)
    key, cert = issue(ca.key, ca.cert, "worker", "intruder")
    return replace(load_credential(keys.worker, "worker"), key=key, cert=cert,
                   info=CertInfo.of(cert))


@contextlib.contextmanager
def port_with(reactor: PollReactor, keys: Keys, data: bytes,
              complaints: list[str], sink: int | None = None) -> Iterator[DataPort]:
    """A client's data port for a job whose worker holds keys.worker, stdin DATA (and
    stdout SINK if given)."""
    client = load_credential(keys.client, "client")
    worker = load_credential(keys.worker, "worker")
    r, w = os.pipe()

    def write() -> None:  # as a launcher's stdin: its reader may go before the end
        with contextlib.suppress(BrokenPipeError):
            os.write(w, data)
        os.close(w)

    threading.Thread(target=write, daemon=True).start()
    port = DataPort(reactor, client, None, HOST, worker.cert, r, sink,
                    lambda peer, problem: complaints.append(problem))
    os.close(r)
    try:
        yield port
    finally:
        port.close()
        reactor.iterate(0)


def connect(credential: Credential, port: int, token: bytes | None, stream: str = STDIN
            ) -> tuple[bytes, str]:
    """As a worker would for stdin: TLS to PORT, TOKEN and STREAM, then everything until
    the end; the bytes and how it ended ('close_notify', or the error)."""
    return tls_on(socket.create_connection((HOST, port), timeout=10), credential, token,
                  stream)


def tls_on(sock: socket.socket, credential: Credential, token: bytes | None,
           stream: str = STDIN) -> tuple[bytes, str]:
    """connect()'s TLS, token (None: none sent) and reading on SOCK, a TCP connection
    already made."""
    sock.settimeout(None)  # blocking TLS calls (the port's own deadlines bound them)
    conn = SSL.Connection(threadtls.context(credential), sock)
    conn.set_connect_state()
    got = b""
    try:
        conn.do_handshake()
        if token is not None:
            conn.sendall(token + stream.encode())
        while True:
            got += conn.recv(1 << 16)
    except SSL.ZeroReturnError:
        return got, "close_notify"
    except (SSL.Error, OSError) as e:
        return got, f"error: {e}"
    finally:
        sock.close()


def in_thread(fn: Callable[[], tuple[bytes, str]]) -> Callable[[], tuple[bytes, str] | None]:
    result: list[tuple[bytes, str]] = []
    thread = threading.Thread(target=lambda: result.append(fn()), daemon=True)
    thread.start()
    return lambda: result[0] if result else None


def test_the_jobs_worker_with_the_token_gets_stdin_to_close_notify(
        reactor: PollReactor, keys: Keys) -> None:
    data, complaints = os.urandom(3 << 20), list[str]()
    worker = load_credential(keys.worker, "worker")
    with port_with(reactor, keys, data, complaints) as port:
        done = in_thread(lambda: connect(worker, port.port, port.token))
        turn(reactor, lambda: done() is not None)
    assert done() == (data, "close_notify")
    assert complaints == []


def test_a_wrong_token_is_refused_and_the_right_one_still_works(
        reactor: PollReactor, keys: Keys) -> None:
    data, complaints = b"secret input\n", list[str]()
    worker = load_credential(keys.worker, "worker")
    with port_with(reactor, keys, data, complaints) as port:
        wrong = in_thread(lambda: connect(worker, port.port, os.urandom(32)))
        turn(reactor, lambda: wrong() is not None and bool(complaints))
        right = in_thread(lambda: connect(worker, port.port, port.token))
        turn(reactor, lambda: right() is not None)
    assert wrong() is not None and wrong()[0] == b""  # type: ignore[index]
    assert complaints == ["wrong token for the job's data port"]
    assert right() == (data, "close_notify")


def test_a_replayed_token_and_a_third_connection_are_refused(
        reactor: PollReactor, keys: Keys) -> None:
    data, complaints = b"x" * 1000, list[str]()
    worker = load_credential(keys.worker, "worker")
    with port_with(reactor, keys, data, complaints) as port:
        first = in_thread(lambda: connect(worker, port.port, port.token))
        turn(reactor, lambda: first() is not None)
        again = in_thread(lambda: connect(worker, port.port, port.token))
        turn(reactor, lambda: again() is not None and bool(complaints))
    assert first() == (data, "close_notify")
    assert again() is not None and again()[0] == b""  # type: ignore[index]
    assert complaints == ["a further connection to the job's data port (its data "
                          "connections are made)"]


def test_another_workers_certificate_is_refused_even_with_the_token(
        reactor: PollReactor, keys: Keys) -> None:
    complaints: list[str] = []
    intruder = other_worker(keys)
    with port_with(reactor, keys, b"secret", complaints) as port:
        stolen = in_thread(lambda: connect(intruder, port.port, port.token))
        turn(reactor, lambda: stolen() is not None and bool(complaints))
    assert stolen() is not None and stolen()[0] == b""  # type: ignore[index]
    assert complaints == ["peer certificate is not the one of the job's channel"]


def test_a_stream_not_offered_is_refused(reactor: PollReactor, keys: Keys) -> None:
    complaints: list[str] = []
    worker = load_credential(keys.worker, "worker")
    with port_with(reactor, keys, b"secret", complaints) as port:  # stdin only
        assert port.streams == STDIN
        other = in_thread(lambda: connect(worker, port.port, port.token, STDOUT))
        turn(reactor, lambda: other() is not None and bool(complaints))
    assert complaints == ["no stream 'o' offered on the job's data port"]


def test_a_client_certificate_is_refused(reactor: PollReactor, keys: Keys) -> None:
    complaints: list[str] = []
    client = load_credential(keys.client, "client")
    with port_with(reactor, keys, b"secret", complaints) as port:
        wrong_role = in_thread(lambda: connect(client, port.port, port.token))
        turn(reactor, lambda: wrong_role() is not None and bool(complaints))
    assert wrong_role()[0] == b""  # type: ignore[index]
    assert "not a" in complaints[0] and "worker" in complaints[0]


@pytest.mark.parametrize("handshake", [False, True], ids=["no-tls", "no-token"])
def test_a_silent_peer_is_dropped_in_bounded_time(
        reactor: PollReactor, keys: Keys, monkeypatch: pytest.MonkeyPatch,
        handshake: bool) -> None:
    monkeypatch.setattr(jobdata, "HANDSHAKE_TIMEOUT", 0.5)
    complaints: list[str] = []
    worker = load_credential(keys.worker, "worker")
    with port_with(reactor, keys, b"secret", complaints) as port:
        started = time.monotonic()
        if handshake:  # TLS, then no token
            silent = in_thread(lambda: connect(worker, port.port, None))
        else:  # TCP, then nothing

            def tcp_only() -> tuple[bytes, str]:
                with socket.create_connection((HOST, port.port), timeout=10) as sock:
                    return sock.recv(1 << 16), "closed"

            silent = in_thread(tcp_only)
        turn(reactor, lambda: bool(complaints) and silent() is not None)
        took = time.monotonic() - started
    assert silent() is not None and silent()[0] == b""  # type: ignore[index]
    assert complaints == ["no TLS handshake and token within 0.5 s"]
    assert took < 3


def test_no_connection_is_taken_once_the_job_ended(reactor: PollReactor, keys: Keys) -> None:
    complaints: list[str] = []
    with port_with(reactor, keys, b"secret", complaints) as port:
        number = port.port
        port.finish()  # the job ended
    with pytest.raises(OSError):
        socket.create_connection((HOST, number), timeout=2)


def test_stdin_whose_connection_comes_as_the_job_ends_is_let_go_quietly(
        reactor: PollReactor, keys: Keys) -> None:
    """The job ended (EXIT: finish) while its worker was still dialling stdin: the
    connection, its handshake under way, is ended without a byte and without a complaint
    (it is the job's own worker, with the token: not an attack)."""
    complaints: list[str] = []
    worker = load_credential(keys.worker, "worker")
    with port_with(reactor, keys, os.urandom(1 << 20), complaints) as port:
        sock = socket.create_connection((HOST, port.port), timeout=10)
        turn(reactor, lambda: bool(port._threads))  # accepted: its handshake under way
        port.finish()  # EXIT came
        late = in_thread(lambda: tls_on(sock, worker, port.token))
        turn(reactor, lambda: late() is not None and not port._threads)
        reactor.iterate(0)
    got = late()
    assert got is not None and got[0] == b""  # not a byte of stdin
    assert complaints == []


def test_a_handshake_the_port_cut_short_is_no_complaint(
        reactor: PollReactor, keys: Keys, monkeypatch: pytest.MonkeyPatch) -> None:
    """The job was abandoned (close) as a connection's thread was about to shake hands:
    the thread meets the socket the port shut down, which is the port's doing, not the
    peer's. The thread is held until then, as a busy machine might hold it."""
    handshake, closed = threadtls.handshake, threading.Event()

    def held(*args: Any) -> Any:
        closed.wait(10)
        return handshake(*args)

    monkeypatch.setattr(threadtls, "handshake", held)
    complaints: list[str] = []
    worker = load_credential(keys.worker, "worker")
    with port_with(reactor, keys, b"secret", complaints) as port:
        dial = in_thread(lambda: connect(worker, port.port, port.token))
        turn(reactor, lambda: bool(port._threads))
        port.close()
        closed.set()
        turn(reactor, lambda: dial() is not None and not port._threads)
        reactor.iterate(0)
    got = dial()
    assert got is not None and got[0] == b""
    assert complaints == []


# -- the worker's end -------------------------------------------------------------------


def serve_once(credential: Credential, ending: str, data: bytes
               ) -> tuple[int, Callable[[], bytes | None]]:
    """A TLS server as the client's port would be (CREDENTIAL's certificate): reads the
    token and the stream's letter, sends DATA, then ends with ENDING ('close_notify' or
    'fin')."""
    listener = socket.create_server((HOST, 0))
    token: list[bytes] = []

    def run() -> None:
        sock, _ = listener.accept()
        listener.close()
        conn = SSL.Connection(threadtls.context(credential), sock)
        conn.set_accept_state()
        try:
            conn.do_handshake()
            token.append(conn.recv(33))
            conn.sendall(data)
            if ending == "close_notify":
                conn.shutdown()
        except (SSL.Error, OSError):  # the worker refused us: it may have reset already
            token.append(b"")
        finally:
            with contextlib.suppress(OSError):  # ENOTCONN once the worker reset it
                sock.shutdown(socket.SHUT_WR)
            time.sleep(0.2)
            sock.close()

    threading.Thread(target=run, daemon=True).start()
    return listener.getsockname()[1], lambda: token[0] if token else None


KNEW_AT_EOF: list[bool] = []  # at each job's EOF: had the worker its stream's end?


def fetch(reactor: PollReactor, keys: Keys, server: Credential, ending: str,
          data: bytes) -> tuple[str | None, bytes, bytes | None]:
    """A worker's StdinFetch against SERVER: (problem, what the job read, token seen)."""
    worker = load_credential(keys.worker, "worker")
    client = load_credential(keys.client, "client")
    number, seen = serve_once(server, ending, data)
    token = os.urandom(32)
    r, w = os.pipe()
    read: list[bytes] = []
    ended: list[str | None] = []

    def job() -> None:  # reads its stdin to EOF, then looks whether the worker knew
        read.append(_read_all(r))
        KNEW_AT_EOF.append(bool(ended))

    reader = threading.Thread(target=job, daemon=True)
    reader.start()
    DataDial(reactor, worker, None, (HOST, number), token, client.cert, STDIN, w,
             ended.append)
    os.close(w)  # the job's stdin is the thread's copy alone
    turn(reactor, lambda: bool(ended) and bool(read))
    got = seen()
    return ended[0], read[0], None if got is None else (b"ok" if got == token + b"i" else got)


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks)


def test_the_worker_writes_stdin_to_the_job_and_closes_it_at_close_notify(
        reactor: PollReactor, keys: Keys) -> None:
    data = os.urandom(2 << 20)
    problem, read, token = fetch(reactor, keys, load_credential(keys.client, "client"),
                                 "close_notify", data)
    assert (problem, token) == ("", b"ok")
    assert read == data


def test_a_fin_without_close_notify_is_a_truncation(reactor: PollReactor,
                                                    keys: Keys) -> None:
    KNEW_AT_EOF.clear()
    problem, read, _ = fetch(reactor, keys, load_credential(keys.client, "client"), "fin",
                             b"partial input")
    assert problem is not None and "truncated" in problem
    assert read == b"partial input"  # what came, then the job's stdin is closed
    assert KNEW_AT_EOF == [True]  # ... once the worker knew: the cut fails a job still
    # running, never one that ended on the EOF it made


def test_a_stdin_dial_the_jobs_end_overtook_is_no_failure(reactor: PollReactor,
                                                           keys: Keys) -> None:
    """The job ended (stop(hard=False)) while its stdin's connection was still being
    made, and then the client's port went (it had its EXIT): no problem is reported,
    the job's end of the pipe is closed."""
    worker = load_credential(keys.worker, "worker")
    client = load_credential(keys.client, "client")
    listener = socket.create_server((HOST, 0), backlog=1)  # never accepts: as a port
    r, w = os.pipe()  # whose reactor has not come to it before it closed
    ended: list[str | None] = []
    dial = DataDial(reactor, worker, None, listener.getsockname(), os.urandom(32),
                    client.cert, STDIN, w, ended.append)
    os.close(w)
    dial.stop(hard=False)  # the job ended
    time.sleep(0.2)  # its connection waits in the backlog for the handshake
    listener.close()  # the client's port is gone: a reset
    turn(reactor, lambda: bool(ended))
    assert ended == [None]
    assert os.read(r, 1) == b""  # the thread's copy of the job's stdin is closed
    os.close(r)


def test_the_worker_refuses_a_server_that_is_not_the_jobs_client(
        reactor: PollReactor, keys: Keys) -> None:
    ca = load_ca(keys.ca)
    key, cert = issue(ca.key, ca.cert, "client", "mallory")
    mallory = replace(load_credential(keys.client, "client"), key=key, cert=cert,
                      info=CertInfo.of(cert))
    problem, read, token = fetch(reactor, keys, mallory, "close_notify", b"injected")
    assert problem == ("stdin connection refused: peer certificate is not the one of the "
                       "job's channel")
    assert read == b""  # nothing reaches the job; the token was never sent
    assert token in (None, b"")


# -- stdout -------------------------------------------------------------------------------


def send_stdout(credential: Credential, port: int, token: bytes, data: bytes,
                ending: str) -> None:
    """As a worker would for stdout: TLS, token, DATA, then ENDING."""
    sock = socket.create_connection((HOST, port), timeout=10)
    sock.settimeout(None)
    conn = SSL.Connection(threadtls.context(credential), sock)
    conn.set_connect_state()
    conn.do_handshake()
    conn.sendall(token + STDOUT.encode() + data)
    if ending == "close_notify":
        conn.shutdown()
    sock.shutdown(socket.SHUT_WR)
    time.sleep(0.2)
    sock.close()


@pytest.mark.parametrize("ending", ["close_notify", "fin"])
def test_stdout_is_written_to_its_close_notify_and_a_fin_is_a_truncation(
        reactor: PollReactor, keys: Keys, ending: str) -> None:
    worker = load_credential(keys.worker, "worker")
    data, complaints = os.urandom(1 << 20), list[str]()
    r, w = os.pipe()
    read: list[bytes] = []
    threading.Thread(target=lambda: read.append(_read_all(r)), daemon=True).start()
    outcome: list[object] = []
    with port_with(reactor, keys, b"", complaints, sink=w) as port:
        os.close(w)  # the port's copy is the pipe's only writer
        threading.Thread(target=send_stdout, daemon=True,
                         args=(worker, port.port, port.token, data, ending)).start()
        turn(reactor, lambda: STDOUT in port.claimed)
        port.finish().addBoth(outcome.append)  # EXIT came: wait for stdout's end
        turn(reactor, lambda: bool(outcome) and bool(read))
    assert read == [data]  # what came is written, in full, either way
    if ending == "close_notify":
        assert outcome == [None]
    else:
        assert isinstance(outcome[0], Failure) and outcome[0].check(Truncated)
        assert "truncated" in str(outcome[0].value)
    assert complaints == []


def test_stdout_that_never_comes_fails_the_stream(reactor: PollReactor, keys: Keys) -> None:
    r, w = os.pipe()
    outcome: list[object] = []
    with port_with(reactor, keys, b"", [], sink=w) as port:
        port.finish().addBoth(outcome.append)
        turn(reactor, lambda: bool(outcome))
    os.close(r)
    os.close(w)
    assert isinstance(outcome[0], Failure) and outcome[0].check(Truncated)


def test_an_eof_on_the_channel_says_stdout_was_empty(reactor: PollReactor,
                                                      keys: Keys) -> None:
    """The worker wrote nothing: no connection comes, the stream ends well; a connection
    for stdout after that is refused."""
    worker = load_credential(keys.worker, "worker")
    r, w = os.pipe()
    outcome: list[object] = []
    complaints: list[str] = []
    with port_with(reactor, keys, b"", complaints, sink=w) as port:
        port.empty_output()
        port.finish().addBoth(outcome.append)
        assert outcome == [None]
    os.close(r)
    os.close(w)
    sink = os.open(os.devnull, os.O_WRONLY)
    with port_with(reactor, keys, b"", complaints, sink=sink) as port:
        port.empty_output()
        late = in_thread(lambda: connect(worker, port.port, port.token, STDOUT))
        turn(reactor, lambda: late() is not None and bool(complaints))
    os.close(sink)
    assert complaints == ["the job's stdout connection is made already"]
