"""The bulk pumps of rexnet.net.threadtls on their own: a worker's and a client's
credential, mutual TLS over a loopback TCP connection, pipes at both ends, a thread each.
What a job does with them end to end is tests/test_jobdata.py's."""

from __future__ import annotations

import hashlib
import os
import select
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from conftest import Keys
from OpenSSL import SSL

from rexnet.net import threadtls
from rexnet.net.threadtls import Records, Stopper
from rexnet.security.credentials import load_credential


@pytest.fixture
def pair(keys: Keys) -> Iterator[tuple[SSL.Connection, Stopper, SSL.Connection, Stopper]]:
    """A TLS connection made by both ends' handshakes: (client end, its stopper, worker
    end, its stopper); the sockets blocking, as the pumps get them."""
    listener = socket.create_server(("127.0.0.1", 0))
    client_sock = socket.create_connection(listener.getsockname())
    worker_sock, _ = listener.accept()
    listener.close()
    ends: dict[str, tuple[SSL.Connection, Stopper]] = {}
    deadline = time.monotonic() + 10

    def shake(name: str, sock: socket.socket, role: str, server: bool) -> None:
        stopper = Stopper()
        stopper.hold(sock)
        cred = load_credential(getattr(keys, role), role)  # type: ignore[arg-type]
        conn = threadtls.handshake(sock, cred, server, deadline, stopper)
        threadtls.peer(conn, cred, None, None)
        sock.setblocking(True)
        ends[name] = (conn, stopper)

    threads = [threading.Thread(target=shake, args=("c", client_sock, "client", True)),
               threading.Thread(target=shake, args=("w", worker_sock, "worker", False))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(15)
    assert set(ends) == {"c", "w"}
    yield ends["c"][0], ends["c"][1], ends["w"][0], ends["w"][1]
    for _, stopper in ends.values():
        stopper.stop()
        stopper.close()


def pump(pair: tuple[SSL.Connection, Stopper, SSL.Connection, Stopper], data: bytes,
         cut: bool = False) -> tuple[bytes, BaseException | None, int]:
    """DATA through send_from at the client's end (from a pipe) and receive_into at the
    worker's (to a pipe); with CUT, the sender's socket is closed after DATA without
    close_notify. What came out, what receive_into raised, what it counted."""
    conn_c, stop_c, conn_w, stop_w = pair
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    received = [0]
    raised: list[BaseException | None] = [None]

    def send() -> None:
        if cut:
            assert stop_c.sock is not None
            Records(conn_c, bytearray(data)).write(len(data))
            stop_c.sock.close()
        else:
            threadtls.send_from(in_r, conn_c, stop_c, [0])

    def receive() -> None:
        try:
            threadtls.receive_into(conn_w, out_w, stop_w, received)
        except BaseException as e:
            raised[0] = e
        finally:
            os.close(out_w)

    def feed() -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(in_w, view[:65536]):]
        os.close(in_w)

    threads = [threading.Thread(target=f) for f in ((send, receive) if cut
                                                    else (send, receive, feed))]
    for t in threads:
        t.start()
    out = bytearray()
    while chunk := os.read(out_r, 1 << 20):
        out += chunk
    for t in threads:
        t.join(15)
    os.close(out_r)
    os.close(in_r)
    if cut:
        os.close(in_w)
    return bytes(out), raised[0], received[0]


def test_records_reach_pyopenssls_own_calls(
        pair: tuple[SSL.Connection, Stopper, SSL.Connection, Stopper]) -> None:
    """The private pyOpenSSL names Records uses are there (else it would fall back to the
    public calls, and the bulk path would lose what it gained)."""
    conn = pair[0]
    assert hasattr(conn, "_ssl") and callable(conn._raise_ssl_error)
    assert Records(conn, bytearray(16)).direct


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "public-calls"])
def test_a_stream_arrives_whole_and_ends_at_close_notify(
        pair: tuple[SSL.Connection, Stopper, SSL.Connection, Stopper],
        monkeypatch: pytest.MonkeyPatch, direct: bool) -> None:
    if not direct:
        monkeypatch.setattr(threadtls, "_lib", None)
    data = os.urandom(5 * threadtls.PIECE + 12345)  # pieces, records, a short tail
    out, raised, counted = pump(pair, data)
    assert raised is None
    assert counted == len(data)
    assert hashlib.sha256(out).digest() == hashlib.sha256(data).digest()


def test_a_cut_without_close_notify_raises_after_writing_what_came(
        pair: tuple[SSL.Connection, Stopper, SSL.Connection, Stopper]) -> None:
    data = os.urandom(100_000)
    out, raised, counted = pump(pair, data, cut=True)
    assert isinstance(raised, SSL.Error) and not isinstance(raised, SSL.ZeroReturnError)
    assert out == data and counted == len(data)


def test_the_sender_holds_no_piece_back(
        pair: tuple[SSL.Connection, Stopper, SSL.Connection, Stopper]) -> None:
    """A piece send_from reads goes out at once, the stream still open (TCP_NODELAY as a
    job's data connection has it, no cork): a few bytes each reach the far pipe while
    the sender waits for more."""
    conn_c, stop_c, conn_w, stop_w = pair
    assert stop_c.sock is not None
    stop_c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    threads = [threading.Thread(target=threadtls.send_from, args=(in_r, conn_c, stop_c, [0])),
               threading.Thread(target=threadtls.receive_into,
                                args=(conn_w, out_w, stop_w, [0]))]
    for t in threads:
        t.start()
    try:
        for piece in (b"first", b"second", b"x" * 70_000, b"tail"):
            os.write(in_w, piece)
            got = b""
            while len(got) < len(piece):
                ready, _, _ = select.select([out_r], [], [], 2)
                assert ready, f"{len(got)} of a {len(piece)}-byte piece after 2 s"
                got += os.read(out_r, 1 << 20)
            assert got == piece
        # what it leaves unsent is bounded (TCP_NOTSENT_LOWAT), not the send buffer
        assert stop_c.sock.getsockopt(socket.IPPROTO_TCP, threadtls.TCP_NOTSENT_LOWAT) \
            == threadtls.UNSENT
        os.close(in_w)
        for t in threads:
            t.join(10)
        assert not any(t.is_alive() for t in threads), "the stream did not end"
    finally:
        stop_c.stop()
        stop_w.stop()
        for t in threads:
            t.join(10)
        for fd in (in_r, out_r, out_w):
            os.close(fd)


def test_records_held_at_once_all_reach_the_pipe_before_the_sender_goes_on(
        pair: tuple[SSL.Connection, Stopper, SSL.Connection, Stopper]) -> None:
    """Many small records come in one segment, then the sender waits for them to be
    seen: whatever the receiving pump holds already read (OpenSSL's buffer, a read-ahead,
    a memory BIO) must go to the pipe before it waits for the socket again (else a hang
    here; branch p11-readahead checked it fails so with a pump that waits too early)."""
    conn_c, stop_c, conn_w, stop_w = pair
    out_r, out_w = os.pipe()
    received = [0]
    raised: list[BaseException | None] = [None]

    def receive() -> None:
        try:
            threadtls.receive_into(conn_w, out_w, stop_w, received)
        except BaseException as e:
            raised[0] = e
        finally:
            os.close(out_w)

    thread = threading.Thread(target=receive)
    thread.start()
    try:
        for burst in range(3):
            records = [os.urandom(37 + i) for i in range(300)]
            cork(stop_c.sock, True)  # the burst in as few segments as TCP makes
            for record in records:
                Records(conn_c, bytearray(record)).write(len(record))
            cork(stop_c.sock, False)
            want = b"".join(records)
            got = bytearray()
            deadline = time.monotonic() + 10
            while len(got) < len(want):  # the sender waits: nothing more comes meanwhile
                assert time.monotonic() < deadline, f"burst {burst}: {len(got)} of {len(want)}"
                ready, _, _ = select.select([out_r], [], [], 0.2)
                if ready:
                    got += os.read(out_r, 1 << 20)
            assert got == want
        conn_c.shutdown()
        assert os.read(out_r, 1) == b""
        thread.join(10)
        assert raised[0] is None
    finally:
        stop_w.stop()
        thread.join(10)
        os.close(out_r)


def cork(sock: socket.socket | None, on: bool) -> None:
    assert sock is not None
    sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, "TCP_CORK", 3), 1 if on else 0)
