"""rexnet.net.pollguard: an event of a poll batch never reaches the descriptor that took
the number of one closed earlier in the same batch (real epoll and poll reactors, real
sockets and pipes). Without the guard the stale event reached the new pipe: the data loss
the soak test found (a closed connect-back's event ended the next job's stdin)."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.interfaces import IReadDescriptor
from twisted.internet.pollreactor import PollReactor
from twisted.internet.selectreactor import SelectReactor
from zope.interface import implementer

from rexnet.net.pollguard import guard, guarded


@implementer(IReadDescriptor)
class Reader:
    """A readable descriptor that records its events; ON_READ runs at its first."""

    def __init__(self, fd: int, on_read: Callable[[Reader], None] | None = None) -> None:
        self.fd = fd
        self.on_read = on_read
        self.reads = 0
        self.lost: list[Any] = []

    def fileno(self) -> int:
        return self.fd

    def logPrefix(self) -> str:
        return "test"

    def doRead(self) -> None:
        self.reads += 1
        if self.on_read is not None:
            on_read, self.on_read = self.on_read, None
            on_read(self)

    def connectionLost(self, reason: Any) -> None:
        self.lost.append(reason)


@pytest.fixture(params=[EPollReactor, PollReactor])
def reactor(request: pytest.FixtureRequest) -> Iterator[Any]:
    made = request.param()
    yield made
    made.waker.connectionLost(None)  # (the registrations go with the poller)
    if hasattr(made._poller, "close"):  # epoll's (poll's has no descriptor)
        made._poller.close()


def stale_event_reaches_new_pipe(reactor: Any) -> tuple[Reader, list[int]]:
    """Two readable sockets in one batch; whichever is dispatched first closes the other
    and puts a fresh, empty pipe on its number (a Reader registered for it). One poll.
    Returns the pipe's reader and what must be closed afterwards."""
    a, a_peer = socket.socketpair()
    b, b_peer = socket.socketpair()
    keep: list[Any] = [a, a_peer, b, b_peer]
    opened: list[int] = []
    victim: list[Reader] = []

    def take_the_others_number(first: Reader) -> None:
        other = readers[1] if first is readers[0] else readers[0]
        number = other.fd
        reactor.removeReader(other)
        (a if other is readers[0] else b).close()
        r, w = os.pipe()
        if r != number:  # the kernel gives the lowest free number: make sure of it
            os.dup2(r, number)
            os.close(r)
        opened.extend([number, w])
        pipe_reader = Reader(number)
        victim.append(pipe_reader)
        reactor.addReader(pipe_reader)

    readers = [Reader(a.fileno(), take_the_others_number),
               Reader(b.fileno(), take_the_others_number)]
    for s, r in zip((a_peer, b_peer), readers, strict=True):
        s.send(b"x")
        reactor.addReader(r)
    reactor.doIteration(0)
    assert victim, "neither socket was dispatched"
    keep_fds = [s.detach() for s in keep if s.fileno() >= 0]
    return victim[0], opened + keep_fds


def test_a_stale_event_does_not_reach_the_descriptor_that_took_its_number(
        reactor: Any) -> None:
    assert guard(reactor) and guarded(reactor)
    pipe_reader, fds = stale_event_reaches_new_pipe(reactor)
    try:
        assert pipe_reader.reads == 0 and pipe_reader.lost == []
        # the new owner is registered and hears its own events at the next poll
        os.write(fds[1], b"y")
        reactor.doIteration(0)
        assert pipe_reader.reads == 1
    finally:
        for fd in fds:
            os.close(fd)


def test_without_the_guard_the_stale_event_reaches_the_new_pipe(reactor: Any) -> None:
    """What the guard prevents happens with Twisted's own dispatch (so the test above can
    fail): the pipe, which nobody wrote to, is told it is readable."""
    pipe_reader, fds = stale_event_reaches_new_pipe(reactor)
    try:
        assert pipe_reader.reads == 1
    finally:
        for fd in fds:
            os.close(fd)


def test_events_of_descriptors_left_alone_are_all_delivered(reactor: Any) -> None:
    guard(reactor)
    pairs = [socket.socketpair() for _ in range(5)]
    readers = [Reader(mine.fileno()) for mine, _ in pairs]
    try:
        for (_, peer), r in zip(pairs, readers, strict=True):
            peer.send(b"x")
            reactor.addReader(r)
        reactor.doIteration(0)
        assert [r.reads for r in readers] == [1] * 5
    finally:
        for mine, peer in pairs:
            mine.close()
            peer.close()


def test_guard_is_idempotent_and_leaves_other_reactors_alone() -> None:
    epoll = EPollReactor()
    try:
        assert guard(epoll) and guard(epoll)
        assert guarded(epoll)
    finally:
        epoll.waker.connectionLost(None)
        epoll._poller.close()
    select = SelectReactor()
    try:
        assert not guard(select) and not guarded(select)
    finally:
        select.waker.connectionLost(None)
