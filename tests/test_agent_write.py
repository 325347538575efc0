"""The agent's messages to a launcher (rexnet.agent.server.write_now): straight to the
socket when nothing waits before them, else behind what waits, in order, through the
transport; the Exit of a plain status is encoded once and reads as any Exit."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet.protocol import Factory, Protocol

from rexnet.agent.server import exit_message, write_now
from rexnet.protocol import agentwire


@pytest.fixture
def pair(reactor: Any) -> Iterator[tuple[Any, socket.socket]]:
    """A Twisted transport on one end of a Unix socket pair, and the other end."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    protocol = Protocol()
    reactor.adoptStreamConnection(ours.fileno(), socket.AF_UNIX,
                                  Factory.forProtocol(lambda: protocol))
    ours.close()  # (the reactor has its own descriptor)
    theirs.setblocking(False)
    yield protocol.transport, theirs
    theirs.close()


def read_all(reactor: Any, sock: socket.socket, size: int) -> bytes:
    received = b""
    for _ in range(10000):
        if len(received) >= size:
            break
        reactor.iterate(0.001)
        with contextlib.suppress(BlockingIOError):
            received += sock.recv(1 << 20)
    return received


def test_a_message_is_in_the_socket_without_a_reactor_turn(
        pair: tuple[Any, socket.socket]) -> None:
    transport, theirs = pair
    assert write_now(transport, exit_message(3, ""))
    data = theirs.recv(4096)  # no reactor turn in between
    (message,) = agentwire.Decoder().feed(data)
    assert message == agentwire.Exit(3, "")
    assert exit_message(3, "") is exit_message(3, "")  # made once
    assert exit_message(3, "oops") == agentwire.Exit(3, "oops").encode()


def test_what_the_socket_does_not_take_follows_in_order(
        reactor: Any, pair: tuple[Any, socket.socket]) -> None:
    transport, theirs = pair
    big = bytes(range(256)) * 4096  # 1 MiB: more than the socket pair holds
    assert not write_now(transport, big)
    assert not write_now(transport, b"after")  # behind what waits, not before it
    assert read_all(reactor, theirs, len(big) + 5) == big + b"after"
    assert write_now(transport, b"again")  # nothing waits any more: at once
    assert theirs.recv(100) == b"again"


def test_a_launcher_that_went_away_is_no_error(pair: tuple[Any, socket.socket]) -> None:
    transport, theirs = pair
    theirs.close()
    assert write_now(transport, b"x")  # EPIPE: the reactor finds the connection lost
