"""Bounded: at most N jobs at a time, in order, for the Executor and rexnet parallel.

A plain counter and a queue, not a DeferredSemaphore: a job costs one Deferred of its
own and no acquire/release chain (a trivial job's client CPU is a few hundred
microseconds, and the semaphore took a tenth of it).

A job that ends at once (no route to any announce target fails before it is announced)
frees its slot inside the call that started it; starting the next waiting job there
would go one stack frame deeper, job after job. Slots freed while the queue is being
pumped are filled by the outer pump, in a loop.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet import defer
from twisted.python.failure import Failure

T = TypeVar("T")


class Bounded:
    """Runs callables that return Deferreds, at most LIMIT of them at a time, in the order
    they were given; ON_IDLE is called whenever the last running one ends and none
    waits."""

    def __init__(self, limit: int, on_idle: Callable[[], None] = lambda: None) -> None:
        if limit < 1:
            raise ValueError("the limit must be at least 1")
        self.limit = limit
        self.on_idle = on_idle
        self.running = 0
        self._waiting: deque[tuple[Callable[..., Any], tuple[Any, ...],
                                   defer.Deferred[Any]]] = deque()
        self._pumping = False

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def run(self, start: Callable[..., defer.Deferred[T]], *args: Any
            ) -> defer.Deferred[T]:
        """Call START(*ARGS) once a slot is free; fires with its result."""
        done: defer.Deferred[T] = defer.Deferred()
        self._waiting.append((start, args, done))
        self._pump()
        return done

    def _pump(self) -> None:
        if self._pumping:
            return  # the loop below, further up the stack, does it
        self._pumping = True
        try:
            while self._waiting and self.running < self.limit:
                start, args, done = self._waiting.popleft()
                self.running += 1
                defer.maybeDeferred(start, *args).addBoth(self._ended, done)
        finally:
            self._pumping = False
        if not self.running and not self._waiting:
            self.on_idle()

    def _ended(self, result: Any, done: defer.Deferred[Any]) -> None:
        self.running -= 1
        if isinstance(result, Failure):
            done.errback(result)
        else:
            done.callback(result)
        self._pump()
