"""Where an Executor's jobs go at several numbers in flight (P11 item 4): two workers on
loopback (8 slots each, as inflight_cpu.py), one fresh Executor per run warmed up with
WIDTH jobs, each job `sh -c true`; the widths alternated round by round.

    .venv/bin/python benchmarks/inflight_slots.py [JOBS [ROUNDS [WIDTH...]]]

Per run: the pool's channels per worker after the warm-up; jobs/s; the jobs each worker
ran; the jobs queued at each worker, and how many while the other ran fewer than 8 of
the pool's jobs (a slot free there, as the client counts: its jobs between their START
and their EXIT, so a slot freed shows a little late); how the pool found each job a
channel (take: a usable one, a queue, none; hand-over); the mean of the pool's jobs per
worker over time, and the share of time with fewer than 16. It observes the pool by
wrapping its methods (observation only: the choices are the pool's own).
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from cluster import Proc, loopback_address, worker_argv  # noqa: E402

import rexnet  # noqa: E402
from rexnet.client import jobcore, warm  # noqa: E402
from rexnet.security.credentials import keygen  # noqa: E402

SLOTS = 8
Event = tuple[float, str, str, dict[str, int]]
EVENTS: list[Event] = []


def note(kind: str, worker: str, pool: warm.WarmPool) -> None:
    EVENTS.append((time.perf_counter(), kind, worker, dict(pool._running)))


def observe() -> None:
    """Wrap the pool's and the job's methods to note each choice and each job's turn."""
    pool_cls, core_cls = warm.WarmPool, jobcore.JobCore
    take, hand, started, exited = (pool_cls.take, pool_cls._hand_over, pool_cls.started,
                                   pool_cls.exited)
    queued = core_cls.queued

    def take_(self: warm.WarmPool, key: Any, distrust: Callable[..., Any] = lambda link: None
              ) -> Any:
        now = self.reactor.seconds()
        free = any(self.usable(w, now) for w in self._idle_by_key.get(key, {}).values())
        link = take(self, key, distrust)
        worker = self.records[link].worker if link is not None else "-"
        note("none" if link is None else "free" if free else "queue", worker, self)
        return link

    def hand_(self: warm.WarmPool, key: Any, w: warm.Warm, distrust: Any) -> bool | None:
        handed = hand(self, key, w, distrust)
        if handed:
            note("handover", w.worker, self)
        return handed

    def started_(self: warm.WarmPool, link: Any) -> None:
        started(self, link)
        note("started", self.records[link].worker, self)

    def exited_(self: warm.WarmPool, link: Any) -> None:
        exited(self, link)
        note("exited", self.records[link].worker, self)

    def queued_(self: jobcore.JobCore, frame: Any) -> None:
        hello = self.chosen.hello if self.chosen is not None else None
        assert self.pool is not None
        note("queued", hello.worker if hello else "?", self.pool)
        queued(self, frame)

    pool_cls.take = take_  # type: ignore[method-assign, assignment]
    pool_cls._hand_over = hand_  # type: ignore[method-assign, assignment]
    pool_cls.started = started_  # type: ignore[method-assign, assignment]
    pool_cls.exited = exited_  # type: ignore[method-assign, assignment]
    core_cls.queued = queued_  # type: ignore[method-assign, assignment]


def summary(events: list[Event], workers: list[str]) -> str:
    kinds: Counter[str] = Counter()
    ran: Counter[str] = Counter()
    queued: Counter[str] = Counter()
    while_free = 0
    for _, kind, worker, running in events:
        kinds[kind] += 1
        ran[worker] += kind == "started"
        if kind == "queued":
            queued[worker] += 1
            while_free += any(running.get(o, 0) < SLOTS for o in workers if o != worker)
    held = dict.fromkeys(workers, 0.0)
    short = 0.0
    for (t0, _, _, running), (t1, *_) in pairwise(events):
        for w in workers:
            held[w] += running.get(w, 0) * (t1 - t0)
        if sum(running.values()) < SLOTS * len(workers):
            short += t1 - t0
    span = max(events[-1][0] - events[0][0], 1e-9)
    return (f"ran {', '.join(f'{w} {ran[w]}' for w in workers)}; queued "
            f"{', '.join(f'{w} {queued[w]}' for w in workers)}, {while_free} while the other "
            f"had a free slot; take free/queue/none {kinds['free']}/{kinds['queue']}/"
            f"{kinds['none']}, hand-overs {kinds['handover']}; mean jobs "
            f"{', '.join(f'{w} {held[w] / span:.2f}' for w in workers)}, fewer than "
            f"{SLOTS * len(workers)} {100 * short / span:.0f}% of the time")


def main() -> None:
    args = sys.argv[1:]
    jobs = int(args.pop(0)) if args else 1000
    rounds = int(args.pop(0)) if args else 3
    widths = [int(a) for a in args] or [16, 64]
    observe()
    rates: dict[int, list[float]] = {w: [] for w in widths}
    names = ["w0", "w1"]
    with tempfile.TemporaryDirectory() as tmp:
        _, worker_key, client_key = keygen("slots", Path(tmp))
        host = loopback_address()
        addrs = [f"{host}:{3010 + i}" for i in range(2)]
        workers = [Proc(worker_argv(worker_key, ["sh", "-c"], a, n, "--slots", str(SLOTS),
                                    "--allow-args")) for n, a in zip(names, addrs, strict=True)]
        try:
            for w in workers:
                w.wait_for("listening on|serves slots")
            for r in range(rounds):
                for width in widths if r % 2 == 0 else widths[::-1]:
                    with rexnet.Executor(client_key, addrs, width) as ex:
                        list(ex.map(["true"], [b""] * width))
                        pool = ex._pool
                        channels = Counter(w.worker for w in pool.records.values())
                        EVENTS.clear()
                        t0 = time.perf_counter()
                        list(ex.map(["true"], [b""] * jobs))
                        rate = jobs / (time.perf_counter() - t0)
                        events = list(EVENTS)
                    rates[width].append(rate)
                    print(f"width {width}: channels after the warm-up "
                          f"{', '.join(f'{n} {channels[n]}' for n in names)}; {rate:.0f} "
                          f"jobs/s; {summary(events, names)}", flush=True)
        finally:
            for w in workers:
                w.stop()
    for width, runs in rates.items():
        print(f"median width {width}: {statistics.median(runs):.0f} jobs/s "
              f"({min(runs):.0f}-{max(runs):.0f})")


if __name__ == "__main__":
    main()
