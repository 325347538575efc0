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
"""

from __future__ import annotations

import statistics
import sys
import time
from bisect import bisect_left
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


def main() -> None:
    log, trace = (Path(a).read_text() for a in sys.argv[1:3])
    parts = breakdown(log, trace)
    print(f"{len(parts['late'])} jobs, ms: median (min-max)")
    for name, values in parts.items():
        if values:
            print(f"  {name:>12}: {statistics.median(values):6.2f} "
                  f"({min(values):.2f}-{max(values):.2f})")
    print(f"  verify (a real worker, per TAKEN): {verify_us():.0f} us")


if __name__ == "__main__":
    main()
