"""The worker's load figure and its connect-back delay.  psutil is imported here only.

load  = run-queue per CPU (1-minute load average / CPUs)
      + (running jobs + reserved connect-backs) / slots
delay = (IDLE_MS + LOAD_MS * load) / speed + uniform(0, spread(crowd))
      + min(WAIT_MS * expected wait in seconds, WAIT_MAX_MS)             milliseconds
spread(crowd) = max(JITTER_MS, CROWD_MS * (crowd - 1) ** 1.5)

An idle worker answers after about IDLE_MS; each unit of load per CPU adds
LOAD_MS, well above network jitter (cexec's 0.1 ms per unit drowned in it).  A faster
worker (speed 2.0) answers in half the time of a slower one at the same load.  A worker
whose slots are all busy answers only if its queue has room, later by its expected wait
(rexnet.worker.jobqueue): the client queues at the first to answer, so at the worker with
the shortest wait, and any worker with a free slot answers before all of them.  (The load
figure a worker reports, in HELLO and status, adds its queued jobs per slot.)

CROWD is how many workers answer one announcement, as this worker has learnt it from
the clients' TAKENs (see Crowd).  N equally idle workers drawing from a window of S ms
waste about (N - 1) * T / S connect-backs per job, T being the
time from the first connect-back to the TAKEN reaching the others (a TLS handshake, a
few ms); the first answer comes after about S / N.  A window growing as (N - 1) ** 1.5
keeps a lone worker exactly as before and two workers within half a millisecond of it,
and at 1,000 workers makes about 0.05 extra connect-backs per job for a first answer
about 50 ms later.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Callable
from dataclasses import dataclass

IDLE_MS = 5.0
LOAD_MS = 40.0
JITTER_MS = 1.0
CROWD_MS = 1.5
WAIT_MS = 10.0  # milliseconds of delay per second of expected wait in a queue
WAIT_MAX_MS = 500.0
CROWD_MAX = 4096  # a bound on what one TAKEN can make us believe
CROWD_HALF_LIFE = 3600.0  # seconds: a cluster that shrank is believed within hours
CROWD_WEIGHT = 0.3  # weight of a new estimate of the crowd (in log space)
FIRST_DRAW_BIAS = math.exp(0.5772)  # e^(Euler's constant)
COUNT_TARGET = 1.02  # connect-backs per job Crowd.steer aims at


@dataclass(frozen=True)
class HostLoad:
    """What the operating system says about the host."""

    loadavg: float
    cpus: int
    free_memory: int


def sample_host() -> HostLoad:
    """Read the host's load with psutil."""
    import psutil

    return HostLoad(
        loadavg=psutil.getloadavg()[0],
        cpus=psutil.cpu_count() or 1,
        free_memory=psutil.virtual_memory().available,
    )


def cpu_count() -> int:
    import psutil

    return psutil.cpu_count() or 1


def load_figure(host: HostLoad, busy: int, slots: int) -> float:
    """Run-queue per CPU plus the share of slots that are busy or reserved."""
    return max(host.loadavg, 0.0) / max(host.cpus, 1) + busy / max(slots, 1)


def spread_ms(crowd: float) -> float:
    """The width of the random part of the delay for a worker among CROWD answerers."""
    return max(JITTER_MS, CROWD_MS * max(crowd - 1.0, 0.0) ** 1.5)


def connect_back_delay(
    load: float, speed: float, jitter: Callable[[], float] = random.random,
    crowd: float = 1.0, wait: float = 0.0,
) -> float:
    """Seconds to wait before connecting back, given LOAD, the worker's SPEED, how many
    workers answer an announcement (CROWD) and the job's expected WAIT in seconds for a
    slot (0 when one is free)."""
    ms = (IDLE_MS + LOAD_MS * max(load, 0.0)) / speed + jitter() * spread_ms(crowd)
    ms += min(WAIT_MS * max(wait, 0.0), WAIT_MAX_MS)
    return ms / 1000.0


class Crowd:
    """How many workers answer one announcement, learnt from the clients' TAKENs.

    A TAKEN says how many workers had connected back when the client chose (COUNT: at
    least that many answer).  When the window was wider than the time the TAKEN took to
    come (ELAPSED < SPREAD), the first of N workers drawing from a window of SPREAD ms
    answered after about SPREAD / N, so COUNT * SPREAD / ELAPSED estimates N (divided by
    e^0.577, the mean of log(1/X) for that first draw X).  Estimates are blended in log
    space (CROWD_WEIGHT), never below COUNT, and decay towards 1 with a half-life of
    CROWD_HALF_LIFE seconds (a cluster that shrank is believed again).
    """

    def __init__(self) -> None:
        self._size = 1.0
        self._at = 0.0

    def size(self, now: float) -> float:
        decay = 0.5 ** (max(now - self._at, 0.0) / CROWD_HALF_LIFE)
        return 1.0 + (self._size - 1.0) * decay

    def observe(self, count: int, now: float, spread: float = 0.0, elapsed: float = 0.0
                ) -> None:
        """A TAKEN said COUNT workers had answered; it came ELAPSED ms after the earliest
        moment anyone could answer, for a window of SPREAD ms."""
        if count < 1:
            return  # a client that does not say
        count = min(count, CROWD_MAX)
        estimate = float(count)
        if 0.0 < elapsed < spread:
            estimate = max(estimate, count * spread / elapsed / FIRST_DRAW_BIAS)
        blended = math.exp((1 - CROWD_WEIGHT) * math.log(self.size(now))
                           + CROWD_WEIGHT * math.log(estimate))
        self._size = min(max(float(count), blended), float(CROWD_MAX))
        self._at = now

    def steer(self, count: int, now: float) -> None:
        """A client with early TAKENs said COUNT workers had connected back by the time
        its early TAKEN reached them (its final TAKEN's count: one, and those that were
        under way).  Widen the window while more did, narrow it slowly while only one did:
        about COUNT_TARGET connect-backs per job, whatever the crowd and however long the
        TAKEN takes on this network.  Every worker hears the same counts and moves alike
        (an estimate from each one's own window would drive their windows apart)."""
        if count < 1:
            return
        count = min(count, CROWD_MAX)
        size = self.size(now) * (count / COUNT_TARGET) ** CROWD_WEIGHT
        self._size = min(max(float(count), size, 1.0), float(CROWD_MAX))
        self._at = now


def group_rss(pid: int) -> int:
    """Resident memory of process PID and all its descendants, in bytes (0 if gone)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            total += proc.memory_info().rss
    return total
