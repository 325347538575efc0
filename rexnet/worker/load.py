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

With early TAKENs the crowd is a knob, not a count (Crowd.steer): the first job's storm
(every 1 ms window over before its early TAKEN) tells N and T, and the window is set at
once to the one making target_extra(N) extra connect-backs; later jobs steer it by small
steps.  The first answer then comes about T / target_extra(N) after IDLE_MS: the price of
one connect-back per job, whatever N (about 35 T at 1,000 workers, 3 T at 2).  T is about
1 ms between hosts (benchmarks/scale_trace.py: the first connect-back's timer to its
connect(2) 0.1-0.5 ms, the client's accept to its early TAKEN 0.3-0.4 ms, the TAKEN's
signature check 0.1 ms; longer on a loaded client).  The storm's count is every connect-back
that reached the client's port before its final TAKEN, accepted or still in the kernel's
accept queue (rexnet.client.connectback.waiting): with Twisted's backlog of 50 it had been
80-110 of 1,000, a window ~10x too narrow that later jobs widened an extra connect-back at
a time (1.13-1.28 connect-backs per later job in the simulation, 1.03-1.18 now).
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
EXTRA_TARGET = 0.03  # extra connect-backs per job Crowd.steer aims at in a large crowd
SMALL_EXTRA = 0.3  # ... in a crowd of N: max(EXTRA_TARGET, SMALL_EXTRA / sqrt(N - 1))
STEER_GAIN = 0.5  # a steered window doubles per 1 / STEER_GAIN extra connect-backs
JUMP_EXTRA = 4  # extra connect-backs in one job that size the window at once
ELAPSED_MAX_MS = 50.0  # a bound on the early TAKEN's delay a window is sized from
LATE_FACTOR = 8.0  # a first answer this many times later than the crowd's: a smaller one

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
    crowd: float = 1.0, wait: float = 0.0, queued: bool = False,
) -> float:
    """Seconds to wait before connecting back, given LOAD, the worker's SPEED, how many
    workers answer an announcement (CROWD) and the job's expected WAIT in seconds for a
    slot (0 when one is free).  An answer for a queue place (QUEUED) comes after the
    whole window the answers with a free slot draw from: a wide crowd window must not let
    a full worker answer before a free one."""
    window = spread_ms(crowd)
    return (base_ms(load, speed, window, wait, queued) + jitter() * window) / 1000.0


def base_ms(load: float, speed: float, window: float = JITTER_MS, wait: float = 0.0,
            queued: bool = False) -> float:
    """The part of connect_back_delay (in ms) that LOAD, SPEED and the expected WAIT set,
    without the random part: what orders the workers.  A queued answer comes after the
    whole WINDOW of the answers with a free slot."""
    ms = (IDLE_MS + LOAD_MS * max(load, 0.0)) / speed
    return ms + min(WAIT_MS * max(wait, 0.0), WAIT_MAX_MS) + (window if queued else 0.0)


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
        self._n = 1.0  # see known()
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
        self._size = self._n = min(max(float(count), blended), float(CROWD_MAX))
        self._at = now

    def known(self, now: float) -> float:
        """How many workers answered at once when the window was too narrow for all but
        one to hold back (a storm's count), faded as size() is."""
        decay = 0.5 ** (max(now - self._at, 0.0) / CROWD_HALF_LIFE)
        return 1.0 + (self._n - 1.0) * decay

    def steer(self, count: int, now: float, spread: float = 0.0, elapsed: float = 0.0
              ) -> None:
        """A client with early TAKENs said COUNT workers had connected back by the time
        its early TAKEN reached them (its final TAKEN's count).  SPREAD is the window this
        worker drew from (ms), ELAPSED when the early TAKEN came (ms after the earliest
        moment anyone could answer).  Every worker hears the same counts and moves alike.

        - A storm (every window over before the early TAKEN, or JUMP_EXTRA extra
          connect-backs) sizes the window at once: N workers in a window of S ms, a
          TAKEN C ms after the first, make about (N - 1) * C / S extra connect-backs;
          C is ELAPSED less the first draw when the window was over, else the count
          gives (N - 1) * C / S directly.
        - Otherwise the window steers by 2 ** (STEER_GAIN * (extra - target)): up a
          little per extra connect-back, down a little per job without, settling where
          the extra connect-backs average the target (target_extra: a small crowd
          trades a few for a first answer within a few ms).
        - A first answer far later (LATE_FACTOR) than the crowd believed in would give
          says the crowd is smaller: the window shrinks to it at once.

        Bounded: the count by CROWD_MAX, ELAPSED by ELAPSED_MAX_MS where it widens the
        window, the window by spread_ms(CROWD_MAX)."""
        if count < 1:
            return
        k = min(count, CROWD_MAX)
        window = spread_ms(self.size(now))
        drawn = spread if spread > 0.0 else window
        late = min(max(elapsed, 0.0), ELAPSED_MAX_MS)
        crowd = max(self.known(now), float(k))
        if k >= 2 and late >= drawn:  # every window was over: K is the crowd
            crowd = float(k)
            took = max(late - drawn / (k + 1), 0.1)
            window = (k - 1) * (k + 1) / k * took / target_extra(crowd)
        elif k - 1 >= JUMP_EXTRA:
            window = max(window, drawn * (k - 1) / target_extra(crowd))
        elif k == 1 and (smaller := _smaller(drawn, elapsed, crowd)) is not None:
            crowd, window = smaller
        else:
            window *= 2.0 ** (STEER_GAIN * (k - 1 - target_extra(crowd)))
        self._size = min(max(crowd_for(window), 1.0), float(CROWD_MAX))
        self._n = min(crowd, float(CROWD_MAX))
        self._at = now

    def unanswered(self, now: float, spread: float, elapsed: float) -> bool:
        """The client announced again ELAPSED ms after the earliest moment this worker
        could answer (its base delay: before it, no answer says only that the crowd is as
        loaded), and no early TAKEN came, while this worker's connect-back (drawn from a
        window of SPREAD ms) waits still.  If that is far later than the crowd's first
        answer would be, the crowd is smaller: shrink the window to it (as steer does) and
        say so, so that a window widened too far (a client's lying TAKEN) is repaired
        within the job rather than after the client gave up."""
        smaller = _smaller(spread, elapsed, self.known(now))
        if smaller is None:
            return False
        crowd, window = smaller
        self._size = min(max(crowd_for(window), 1.0), float(CROWD_MAX))
        self._n = crowd
        self._at = now
        return True


def _smaller(drawn: float, elapsed: float, crowd: float) -> tuple[float, float] | None:
    """When nothing came until ELAPSED ms, LATE_FACTOR times later than a first answer
    among CROWD drawing from DRAWN ms: the smaller crowd that explains it, and its window
    (the same wait for the TAKEN at that crowd's target); None if not that late."""
    if elapsed <= LATE_FACTOR * drawn / (crowd + 1):
        return None
    smaller = max(drawn / elapsed, 1.0)
    window = drawn * (max(smaller - 1.0, 0.5) / max(crowd - 1.0, 0.5)
                      * target_extra(crowd) / target_extra(smaller))
    return smaller, window


def target_extra(crowd: float) -> float:
    """The extra connect-backs per job a window for CROWD aims at."""
    return max(EXTRA_TARGET, SMALL_EXTRA / math.sqrt(max(crowd - 1.0, 1.0)))


def crowd_for(spread: float) -> float:
    """The crowd whose window (spread_ms) is SPREAD ms wide."""
    return 1.0 + (max(spread, 0.0) / CROWD_MS) ** (2.0 / 3.0)


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
