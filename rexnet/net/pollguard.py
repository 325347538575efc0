"""Events of one poll reach only the descriptors they were reported for.

Twisted's epoll and poll reactors look each event's selectable up by descriptor number
when they dispatch it, one event after the other. When a callback earlier in the same batch
closes a descriptor and a new one takes its number (the kernel gives the lowest free one),
the old descriptor's pending event goes to the new selectable. In the soak test this lost
data: a cancelled connect-back's refused socket (IN|OUT|ERR|HUP) was closed, the next job's
stdin pipe got its number, and the stale event made the pipe's writer believe the job had
closed its stdin, so the job read an empty input and its client's bytes were dropped;
likewise a job's stdout or stderr reader was ended before it had read a byte. The same
class of bug was fixed in other event loops (creytiv/re #266, swoole-src #6184).

`guard(reactor)` resolves every event of a batch to its selectable as the poll returns, and
drops an event whose descriptor changed hands (was removed, or taken by another selectable)
while the batch ran; epoll and poll are level-triggered, so the descriptor's new owner hears
of its own readiness at the next poll.
"""

from __future__ import annotations

import errno
import types
from typing import Any

from twisted.internet.epollreactor import EPollReactor
from twisted.internet.pollreactor import PollReactor
from twisted.python import log

__all__ = ["guard", "guarded"]


def guard(reactor: Any) -> bool:
    """Make REACTOR (an epoll or poll reactor) dispatch each event only to the selectable
    that held its descriptor when the poll returned. Idempotent; False for other reactors
    (select's keeps its own sets; in-memory test reactors have no poller)."""
    if guarded(reactor):
        return True
    if isinstance(reactor, EPollReactor):
        poll = types.MethodType(_epoll_iteration, reactor)
    elif isinstance(reactor, PollReactor):
        poll = types.MethodType(_poll_iteration, reactor)
    else:
        return False
    reactor.doPoll = reactor.doIteration = poll
    return True


def guarded(reactor: Any) -> bool:
    """Whether REACTOR dispatches events through this module."""
    method = getattr(reactor, "doIteration", None)
    return getattr(method, "__func__", None) in (_epoll_iteration, _poll_iteration)


def _dispatch(reactor: Any, events: list[tuple[int, int]]) -> None:
    selectables = reactor._selectables
    batch = [(fd, event, selectables.get(fd)) for fd, event in events]
    handle = reactor._doReadOrWrite
    for fd, event, selectable in batch:
        if selectable is not None and selectables.get(fd) is selectable:
            log.callWithLogger(selectable, handle, selectable, fd, event)


def _epoll_iteration(self: EPollReactor, timeout: float | None) -> None:
    """EPollReactor.doPoll, with _dispatch."""
    try:
        events = self._poller.poll(-1 if timeout is None else timeout,  # type: ignore[attr-defined]
                                   len(self._selectables))  # type: ignore[attr-defined]
    except OSError as e:
        if e.errno == errno.EINTR:
            return
        raise
    _dispatch(self, events)


def _poll_iteration(self: PollReactor, timeout: float | None) -> None:
    """PollReactor.doPoll, with _dispatch."""
    try:
        events = self._poller.poll(None if timeout is None else int(timeout * 1000))  # type: ignore[attr-defined]
    except OSError as e:
        if e.errno == errno.EINTR:
            return
        raise
    _dispatch(self, events)
