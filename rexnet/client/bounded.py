"""Bounded: at most N jobs at a time, in order (a DeferredSemaphore), for the Executor
and rexnet parallel.

A job that ends at once (no route to any announce target fails before it is announced)
frees its slot inside the call that started it; releasing the semaphore there would start
the next waiting job one stack frame deeper, job after job. Releases made while another
is in progress are counted and done by the outer one, in a loop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet import defer

T = TypeVar("T")


class Bounded:
    """Runs callables that return Deferreds, at most LIMIT of them at a time, in the order
    they were given; ON_IDLE is called whenever the last running one ends and none
    waits."""

    def __init__(self, limit: int, on_idle: Callable[[], None] = lambda: None) -> None:
        if limit < 1:
            raise ValueError("the limit must be at least 1")
        self.semaphore = defer.DeferredSemaphore(limit)
        self.on_idle = on_idle
        self._releases = 0
        self._releasing = False

    @property
    def running(self) -> int:
        return self.semaphore.limit - self.semaphore.tokens

    @property
    def waiting(self) -> int:
        return len(self.semaphore.waiting)

    def run(self, start: Callable[..., defer.Deferred[T]], *args: Any
            ) -> defer.Deferred[T]:
        """Call START(*ARGS) once a slot is free; fires with its result."""
        def acquired(_: object) -> defer.Deferred[T]:
            return defer.maybeDeferred(start, *args).addBoth(self._release)

        return self.semaphore.acquire().addCallback(acquired)

    def _release(self, result: T) -> T:
        self._releases += 1
        if self._releasing:
            return result  # the loop below, further up the stack, does it
        self._releasing = True
        try:
            while self._releases:
                self._releases -= 1
                self.semaphore.release()  # may start (and even end) the next job
        finally:
            self._releasing = False
        if not self.running and not self.waiting:
            self.on_idle()
        return result
