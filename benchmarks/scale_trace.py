"""Where the time between a job's first connect-back and the crowd hearing its TAKEN goes.

Reads a scale run's worker lines (SCALE_LOG) and the client's packets (SCALE_TRACE, tcpdump
in the client's namespace, kernel times on the same clock):

    SCALE_LOG=/tmp/log SCALE_TRACE=/tmp/trace .venv/bin/python benchmarks/scale.py --no-fixed
    .venv/bin/python benchmarks/scale_trace.py /tmp/log /tmp/trace

Per job after the first, from the first connect-back's due moment to the TAKEN's arrival
at the simulated workers' host (SO_TIMESTAMPNS):

- late: its timer ran late (one process serves 1,000 "machines": a simulation artifact);
- to SYN: from its timer to its SYN at the client (Twisted connects on the next reactor
  turn; in the simulation that turn also serves the other workers);
- client: from that SYN to the early TAKEN leaving the client (accept, buildProtocol, the
  pre-signed datagram sent: real, though the client shares the 2 cores with the simulation);
- back: from the TAKEN leaving the client to its arrival at the workers' host (the wire).

A real worker then checks the TAKEN's signature before it cancels (verify, below); the
simulation counts a timer as cancelled from the TAKEN's arrival, so that is not in its
figure.

Then where each extra connect-back came from (every one of a job but the first due), by
the cause scale.py logged with it (SimWorker.why): before-taken (due before the job's
TAKEN reached its machine: the window's trade, (N - 1) * T / S; -shrunk: from a worker
whose crowd a resent announcement shrank, in that job or before), resend (a resent
announcement narrowed its window), reopen (the job announced again under a new id),
after-taken or held (due after the TAKEN, or none within HOLD: a TAKEN late or lost),
untold (gone before its job's TAKEN was known).  And the resends that narrowed a
waiting connect-back (and shrank that worker's crowd): how many, and how late the
simulation judged them after they reached the host.  The log alone will do:

    .venv/bin/python benchmarks/scale_trace.py /tmp/log
"""

from __future__ import annotations

import collections
import statistics
import sys
import time
from bisect import bisect_left
from dataclasses import dataclass
from pathlib import Path

TAKEN_LENGTH = 173  # bytes of a TAKEN datagram's UDP payload (an ANNOUNCE is longer)


def packets(trace: str) -> tuple[list[float], list[float]]:
    """(SYN times, TAKEN departure times) from tcpdump -tt -q lines."""
    syns: list[float] = []
    takens: list[float] = []
    for line in trace.splitlines():
        words = line.split()
        if len(words) < 5:
            continue
        if words[-2:] == ["tcp", "0"]:
            syns.append(float(words[0]))
        elif words[-1] == str(TAKEN_LENGTH) and "UDP," in words:
            takens.append(float(words[0]))
    return syns, takens


def jobs(log: str) -> list[tuple[float, float, float]]:
    """Per job after the first: (first due, first timer run, TAKEN arrival), wall seconds."""
    firsts: dict[str, tuple[float, float]] = {}
    arrivals: list[tuple[str, float]] = []
    for line in log.splitlines():
        words = line.split()
        if words[:1] == ["cb"] and len(words) >= 8:
            ran, late = float(words[7]), float(words[5]) / 1000
            due, run = firsts.get(words[1], (ran - late, ran))
            firsts[words[1]] = (min(due, ran - late), min(run, ran))
        elif words[:1] == ["taken"] and words[-2] == "at":
            arrivals.append((words[1], float(words[-1])))
    return [(*firsts[job], at) for job, at in arrivals[1:] if job in firsts]


def verify_us() -> float:
    """Microseconds one Ed25519 check of a TAKEN-sized message takes here."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    data = bytes(TAKEN_LENGTH - 64)
    signature, public = key.sign(data), key.public_key()
    start = time.perf_counter()
    for _ in range(200):
        public.verify(signature, data)
    return (time.perf_counter() - start) / 200 * 1e6


def breakdown(log: str, trace: str) -> dict[str, list[float]]:
    syns, takens = packets(trace)
    parts: dict[str, list[float]] = {k: [] for k in ("late", "to SYN", "client", "back",
                                                     "due to TAKEN")}
    for due, run, at in jobs(log):
        i = bisect_left(syns, run - 0.0002)
        if i == len(syns) or syns[i] > at:
            continue
        j = bisect_left(takens, syns[i])
        if j == len(takens) or takens[j] > at + 0.0002:
            continue
        for name, value in zip(parts, (run - due, syns[i] - run, takens[j] - syns[i],
                                       at - takens[j], at - due), strict=True):
            parts[name].append(value * 1000)
    return parts


@dataclass
class Extras:
    """The extra connect-backs of the jobs after the first, by cause."""

    jobs: int
    causes: collections.Counter[str]
    per_job: list[int]  # extra connect-backs of each job, in order
    took: list[float]  # jobs with a before-taken extra: first due to TAKEN, ms
    spread: list[float]  # ... the window the first drew from, ms
    narrowed: collections.Counter[str]  # job: workers a resend narrowed
    judged: list[float]  # ms from such a resend's arrival to the simulation's judging it


def extras(log: str) -> Extras:
    """Attribute every connect-back of a job but its first due (see the module's
    docstring); the first job (the storm that teaches the crowd) is left out."""
    cbs: dict[str, list[tuple[float, str, float]]] = {}
    taken: dict[str, float] = {}
    narrowed: collections.Counter[str] = collections.Counter()
    judged: list[float] = []
    for line in log.splitlines():
        words = line.split()
        if words[:1] == ["narrowed"] and len(words) >= 17:
            narrowed[words[1]] += 1
            judged.append(float(words[16]) - float(words[12]))
        if words[:1] == ["cb"] and len(words) >= 12:
            cbs.setdefault(words[1], []).append((float(words[3]), words[11],
                                                 float(words[9])))
        elif words[:1] == ["taken"] and len(words) >= 8:
            taken.setdefault(words[1], float(words[7]))
    causes: collections.Counter[str] = collections.Counter()
    per_job: list[int] = []
    took: list[float] = []
    spread: list[float] = []
    for job in list(cbs)[1:]:
        first, *rest = sorted(cbs[job])
        per_job.append(len(rest))
        causes.update(why for _, why, _ in rest)
        if any(why == "before-taken" for _, why, _ in rest) and job in taken:
            took.append(taken[job] - first[0])
            spread.append(first[2])
    return Extras(len(per_job), causes, per_job, took, spread, narrowed, judged)


def main() -> None:
    log = Path(sys.argv[1]).read_text()
    if len(sys.argv) > 2:
        parts = breakdown(log, Path(sys.argv[2]).read_text())
        print(f"{len(parts['late'])} jobs, ms: median (min-max)")
        for name, values in parts.items():
            if values:
                print(f"  {name:>12}: {statistics.median(values):6.2f} "
                      f"({min(values):.2f}-{max(values):.2f})")
        print(f"  verify (a real worker, per TAKEN): {verify_us():.0f} us")
    found = extras(log)
    if found.jobs:
        total = sum(found.per_job)
        print(f"{found.jobs} jobs after the first: {total / found.jobs:.3f} extra "
              f"connect-backs per job; by cause (per job): " + ", ".join(
                  f"{why} {n} ({n / found.jobs:.3f})" for why, n in found.causes.most_common())
              + f"; per job {' '.join(map(str, found.per_job))}")
        if found.narrowed:
            print(f"  resends narrowed {sum(found.narrowed.values())} waiting connect-backs "
                  f"in {len(found.narrowed)} jobs, judged "
                  f"{statistics.median(found.judged):.1f} ms median "
                  f"({min(found.judged):.1f}-{max(found.judged):.1f}) after they arrived")
        if found.took:
            print(f"  jobs with a before-taken extra: first due to TAKEN "
                  f"{' '.join(f'{t:.1f}' for t in found.took)} ms; windows "
                  f"{' '.join(f'{s:.0f}' for s in found.spread)} ms")


if __name__ == "__main__":
    main()
