"""A busy worker's queue: jobs waiting for a slot, first come first served, and the
worker's estimate of how long a newcomer would wait.  Sans-IO (times are passed in).

Only a channel whose client passed the TLS checks and sent its START holds a place (the
worker's connect-back reserves one before that, for at most its connect and start
timeouts); a queued channel keeps its heartbeat, so a silent client is dropped within
seconds and its place freed. The queue is bounded (the worker's --queue, by default
QUEUE_PER_SLOT places per slot): a worker with every slot and place taken does not answer.

The wait is estimated from the mean duration of the jobs that finished here (a running
mean, FIRST_GUESS before any did): each busy slot frees after the mean less what its job
has run already, and each queued job ahead then holds the first slot to free for one mean
duration.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from rexnet.protocol import wire

QUEUE_PER_SLOT = 4  # default places per slot
DURATION_WEIGHT = 0.2  # weight of a finished job's duration in the running mean
FIRST_GUESS = 1.0  # seconds a job is taken to last before any has finished here
MAX_WAIT = wire.MAX_WAIT_MS / 1000.0


def default_places(slots: int) -> int:
    return QUEUE_PER_SLOT * slots


@dataclass(eq=False)
class Waiting:
    """A queued job: its channel, the START it sent and when it joined."""

    channel: Any
    start: wire.Start
    since: float


class JobQueue:
    """The jobs waiting for a slot (at most PLACES), and the mean job duration."""

    def __init__(self, places: int) -> None:
        self.places = places
        self.mean = FIRST_GUESS
        self.measured = 0  # jobs whose duration went into the mean
        self._waiting: deque[Waiting] = deque()

    def __len__(self) -> int:
        return len(self._waiting)

    def __iter__(self) -> Any:
        return iter(self._waiting)

    def add(self, channel: Any, start: wire.Start, now: float) -> int:
        """Queue CHANNEL's START; its position (1: next). The caller keeps the bound."""
        self._waiting.append(Waiting(channel, start, now))
        return len(self._waiting)

    def remove(self, channel: Any) -> bool:
        """CHANNEL leaves the queue (its client gave up, or went away); False if absent."""
        for waiting in self._waiting:
            if waiting.channel is channel:
                self._waiting.remove(waiting)
                return True
        return False

    def pop(self) -> Waiting | None:
        """The next job to start, or None."""
        return self._waiting.popleft() if self._waiting else None

    def position(self, channel: Any) -> int:
        """CHANNEL's place in the queue (1: next), or 0 if it is not queued."""
        for number, waiting in enumerate(self._waiting, 1):
            if waiting.channel is channel:
                return number
        return 0

    def finished(self, seconds: float) -> None:
        """A job ran SECONDS: learn the mean duration."""
        seconds = min(max(seconds, 0.0), MAX_WAIT)
        if self.measured == 0:
            self.mean = seconds
        else:
            self.mean += DURATION_WEIGHT * (seconds - self.mean)
        self.measured += 1

    def wait(self, ahead: int, slots: int, running: Iterable[float]) -> float:
        """Seconds until a slot frees for a job with AHEAD jobs queued before it, on SLOTS
        slots whose jobs have run RUNNING seconds each (0 for a slot only reserved)."""
        frees = sorted(max(self.mean - ran, 0.0) for ran in running)[:slots]
        if len(frees) < slots:
            frees[:0] = [0.0] * (slots - len(frees))  # a free slot frees now
        heapq.heapify(frees)
        for _ in range(ahead):
            heapq.heapreplace(frees, frees[0] + self.mean)
        return min(frees[0], MAX_WAIT)


WAITLIST_MAX = 256  # announcements a full worker remembers
WAITLIST_AGE = 5.0  # seconds a remembered announcement counts without a resend (clients
#                     still looking resend at least every 3 s)


@dataclass(eq=False)
class Unanswered:
    """A checked announcement a full worker could not answer: where to connect back."""

    job_id: bytes
    client: Any  # rexnet.net.announce.ClientCert
    target: Any  # a rexnet.worker.connectback.Target
    heard: float


class Waitlist:
    """The checked announcements a worker with no slot and no queue place heard, oldest
    first (a resend keeps a job's place in line and refreshes it): when a place frees, the
    worker answers the oldest still fresh at once, instead of waiting for its next resend.
    A job's TAKEN (checked against the client's certificate) removes it."""

    def __init__(self, size: int = WAITLIST_MAX, age: float = WAITLIST_AGE) -> None:
        self.size = size
        self.age = age
        self._jobs: dict[bytes, Unanswered] = {}

    def __len__(self) -> int:
        return len(self._jobs)

    def __contains__(self, job_id: bytes) -> bool:
        return job_id in self._jobs

    def get(self, job_id: bytes) -> Unanswered | None:
        return self._jobs.get(job_id)

    def note(self, job_id: bytes, client: Any, target: Any, now: float) -> None:
        """Remember (or refresh) an announcement; a full list forgets the new one."""
        known = self._jobs.get(job_id)
        if known is not None:
            known.heard = now
        elif len(self._jobs) < self.size:
            self._jobs[job_id] = Unanswered(job_id, client, target, now)

    def drop(self, job_id: bytes) -> None:
        self._jobs.pop(job_id, None)

    def pop(self, now: float) -> Unanswered | None:
        """The oldest announcement heard within AGE seconds (older ones are forgotten)."""
        while self._jobs:
            job_id = next(iter(self._jobs))
            entry = self._jobs.pop(job_id)
            if now - entry.heard <= self.age:
                return entry
        return None
