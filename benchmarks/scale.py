"""Scale simulation: N workers answer one announcement; connect-backs per job, time to start.

The workers are real rexnet Worker objects (announcement checks, load delay, crowd estimate,
TAKEN handling, TLS connect-back, spawning the job) living in one process in a network
namespace, all listening on one multicast group; the client is a real `rexnet exec -v` in
another namespace.  Two corrections make one process stand in for N machines:

- the announcement is verified once and the result shared (N machines verify in parallel;
  one process verifying N times would spread the workers over N signature checks);
- each worker's delay counts from when the announcement reached the process, not from when
  the process got round to that worker (SimWorker._announce resets the timer), and a
  timer that fires after the job's TAKEN reached the process counts as cancelled, and
  the crowd estimate sees the TAKEN's time of arrival (each machine would have read its
  TAKEN at once; this process reads 1,000 copies in turn).

Run by benchmarks/bench.py; alone (as root, from the repository):

    .venv/bin/python benchmarks/scale.py [--workers N] [--jobs J]
"""

from __future__ import annotations

import argparse
import re
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

GROUP = "239.77.9.9"
PORT = 3010


# -- the simulated workers (inside the namespace) --------------------------------------


def serve(keyfile: str, count: int, fixed: bool) -> None:
    """Run COUNT workers on GROUP:PORT until killed; print one line per connect-back."""
    from twisted.internet import reactor

    from rexnet.net.announce import AnnounceChecker, Rejected
    from rexnet.protocol import wire
    from rexnet.security.credentials import load_credential
    from rexnet.security.tls import connecting_options
    from rexnet.worker.listener import WorkerService
    from rexnet.worker.load import Crowd, HostLoad
    from rexnet.worker.service import Worker, WorkerSettings

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))
    cred = load_credential(Path(keyfile), "worker")
    shared = AnnounceChecker(cred)
    decoded: dict[bytes, Any] = {}
    checked: dict[int, Any] = {}
    arrived: dict[bytes, float] = {}
    taken_at: dict[bytes, float] = {}  # job id: when its (first) TAKEN reached the process

    class SharedChecker:
        """One verification per datagram, the result shared by every simulated worker."""

        def decode(self, data: bytes) -> wire.Datagram | None:
            if data not in decoded:
                arrived[data] = time.monotonic()
                decoded[data] = dgram = shared.decode(data)
                if dgram is not None and isinstance(dgram.message, wire.Taken):
                    taken_at.setdefault(dgram.message.job_id, arrived[data])
            return decoded[data]  # type: ignore[no-any-return]

        def _once(self, key: int, check: Any, *args: Any) -> Any:
            if key not in checked:
                try:
                    checked[key] = check(*args)
                except Rejected as e:
                    checked[key] = e
            result = checked[key]
            if isinstance(result, Rejected):
                raise result
            return result

        def check_announce(self, dgram: wire.Datagram, host: str) -> Any:
            return self._once(id(dgram), shared.check_announce, dgram, host)

        def check_taken(self, dgram: wire.Datagram, client: Any) -> Any:
            return self._once(id(dgram), shared.check_taken, dgram, client)

        def check_status(self, dgram: wire.Datagram, host: str) -> Any:
            return shared.check_status(dgram, host)

    idle = HostLoad(loadavg=0.0, cpus=2, free_memory=1 << 30)
    tls = connecting_options(cred)
    checker = SharedChecker()

    class FixedCrowd(Crowd):
        """The delay before crowds were learnt: everyone within 1 ms."""

        def observe(self, *args: Any, **kwargs: Any) -> None:
            pass

    class SimWorker(Worker):
        def datagram(self, data: bytes, host: str, port: int) -> None:
            self._data = data
            super().datagram(data, host, port)

        def _announce(self, dgram: wire.Datagram, host: str) -> None:
            before = set(self.pending)
            super()._announce(dgram, host)
            lag = time.monotonic() - arrived.get(self._data, time.monotonic())
            for job_id in set(self.pending) - before:
                pending = self.pending[job_id]
                pending.heard -= lag
                if pending.call is not None and pending.call.active():
                    pending.call.reset(max(0.0, pending.delay - lag))

        def _taken(self, dgram: wire.Datagram, taken: wire.Taken) -> None:
            pending = self.pending.get(taken.job_id)
            if pending is not None:  # as if read when it reached the "machine"
                pending.heard += time.monotonic() - taken_at.get(taken.job_id,
                                                                 time.monotonic())
            super()._taken(dgram, taken)
            if self.settings.name == "sim0" and pending is not None:
                since = (reactor.seconds() - pending.heard) * 1000
                print(f"taken {taken.job_id.hex()} answered {taken.answered} after "
                      f"{since:.1f} ms; crowd {self.crowd.size(reactor.seconds()):.0f}",
                      flush=True)

        def _connect_back(self, pending: Any, host: str, port: int) -> None:
            if pending.job_id in taken_at:
                # the TAKEN reached this "machine" before the timer fired: a real worker
                # would have cancelled; this process had not got round to it yet
                pending.call = None
                self.release(pending)
                return
            since = (reactor.seconds() - pending.heard) * 1000
            print(f"cb {pending.job_id.hex()} {self.settings.name} {since:.1f}", flush=True)
            super()._connect_back(pending, host, port)

    services = []
    for i in range(count):
        settings = WorkerSettings(cred, ("true",), f"sim{i}", slots=2,
                                  listen=("0.0.0.0", PORT), groups=(GROUP,))
        worker = SimWorker(settings, reactor, sample=lambda: idle,
                           checker=checker,  # type: ignore[arg-type]
                           tls=tls, crowd=FixedCrowd() if fixed else None)
        service = WorkerService(worker)
        service.bind()
        service.startService()
        services.append(service)
    print(f"ready {count}", flush=True)
    reactor.run()  # type: ignore[attr-defined]


# -- the driver (root namespace: starts the namespaces and processes) -------------------


@dataclass
class ScaleResult:
    workers: int
    mode: str
    connect_backs: list[int]  # per job, in order
    start_ms: list[float]  # client's time from announcing to a started job
    crowd: float = 1.0  # the crowd the first simulated worker believed in at the end
    cancel_ms: list[float] = field(default_factory=list)  # first connect-back to TAKEN

    def steady(self) -> tuple[list[int], list[float]]:
        """Jobs after the first (the first teaches the workers the crowd)."""
        return self.connect_backs[1:], self.start_ms[1:]


START = re.compile(r"first of \d+ to connect back, after ([0-9.]+) ms")


def run_scale(bed: Any, keys: Any, workers: int, jobs: int, fixed: bool) -> ScaleResult:
    """Start WORKERS simulated workers in a new namespace of BED, run JOBS jobs one after
    another from another namespace, and count connect-backs per job."""
    from cluster import REXNET, Proc

    tag = f"{workers}{'f' if fixed else 'c'}"
    lan = bed.add_subnet(f"s{tag}")
    sim = bed.add_host(f"sim{tag}", [lan])
    client = bed.add_host(f"cli{tag}", [lan])
    argv = [sys.executable, str(Path(__file__).resolve()), "--serve", str(keys.worker),
            "--workers", str(workers)] + (["--fixed"] if fixed else [])
    proc = Proc(argv, popen=sim.popen)
    try:
        proc.wait_for(rf"ready {workers}", timeout=120)
        starts: list[float] = []
        for _ in range(jobs):
            # --no-agent: every job is announced to the whole crowd (an agent would reuse
            # a warm channel and announce nothing)
            done = client.run([REXNET, "exec", "--no-agent", "-v", "--timeout", "30", "-a",
                               f"{GROUP}:{PORT}", str(keys.client)], timeout=60, text=True)
            match = START.search(done.stderr)
            if done.returncode != 0 or not match:
                raise RuntimeError(f"scale job failed: {done.stderr[-500:]}")
            starts.append(float(match.group(1)))
            time.sleep(0.2)
        time.sleep(1.0)  # late connect-backs (a lost TAKEN) still count
    finally:
        proc.stop()
    crowd = 1.0
    first_cb: dict[str, float] = {}
    cancel_ms: list[float] = []  # first connect-back to the TAKEN heard, per job
    for line in proc.output.splitlines():
        if line.startswith("cb "):
            job, since = line.split()[1], float(line.split()[3])
            first_cb[job] = min(first_cb.get(job, since), since)
    for line in proc.output.splitlines():
        if line.startswith("taken "):
            words = line.split()
            crowd = float(words[-1])
            if words[1] in first_cb:
                cancel_ms.append(float(words[5]) - first_cb[words[1]])
    order: list[str] = []
    counts: dict[str, int] = {}
    for line in proc.output.splitlines():
        if line.startswith("cb "):
            job = line.split()[1]
            if job not in counts:
                order.append(job)
            counts[job] = counts.get(job, 0) + 1
    return ScaleResult(workers, "fixed 1 ms jitter" if fixed else "crowd-scaled window",
                       [counts[j] for j in order], starts, crowd, cancel_ms)


def summary(result: ScaleResult) -> str:
    cbs, starts = result.steady()
    return (f"{result.workers} workers, {result.mode}: first job {result.connect_backs[0]} "
            f"connect-backs, {result.start_ms[0]:.1f} ms; jobs 2-{len(result.start_ms)}: "
            f"{statistics.mean(cbs):.3f} connect-backs per job (max {max(cbs)}), "
            f"start {statistics.median(starts):.1f} ms median "
            f"({min(starts):.1f}-{max(starts):.1f}); crowd learnt {result.crowd:.0f}; "
            f"first connect-back to TAKEN {statistics.median(result.cancel_ms or [0]):.1f} ms")


def model(workers: int, jobs: int, cancel_ms: float, seed: int = 1) -> tuple[float, float]:
    """The same rules without processes: WORKERS idle workers draw their delays with
    rexnet.worker.load's window and crowd estimate; those that fire before the TAKEN (CANCEL_MS
    after the first) connect back; the TAKEN's count is what fired by 0.8 CANCEL_MS.
    Returns (connect-backs per job, median first answer in ms) over jobs after the first."""
    import random

    from rexnet.worker.load import IDLE_MS, Crowd, spread_ms

    rng = random.Random(seed)
    crowds = [Crowd() for _ in range(workers)]
    fired: list[int] = []
    firsts: list[float] = []
    for job in range(jobs):
        now = float(job)
        spreads = [spread_ms(c.size(now)) for c in crowds]
        delays = [IDLE_MS + rng.random() * s for s in spreads]
        first = min(delays)
        taken = first + cancel_ms
        count = sum(1 for d in delays if d < first + 0.8 * cancel_ms)
        for crowd, s in zip(crowds, spreads, strict=True):
            crowd.observe(count, now, s, taken - IDLE_MS)
        fired.append(sum(1 for d in delays if d < taken))
        firsts.append(first)
    return statistics.mean(fired[1:]), statistics.median(firsts[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=1000)
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--model", type=float, metavar="MS",
                        help="no processes: the statistical model, with a TAKEN that "
                        "comes MS after the first connect-back")
    parser.add_argument("--serve", metavar="KEYFILE", help=argparse.SUPPRESS)
    parser.add_argument("--fixed", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.workers, args.fixed)
        return
    if args.model is not None:
        per_job, first = model(args.workers, args.jobs, args.model)
        print(f"model: {args.workers} workers, TAKEN {args.model:g} ms after the first "
              f"connect-back: {per_job:.3f} connect-backs per job, first answer "
              f"{first:.1f} ms after the announcement (jobs 2-{args.jobs})")
        return
    import tempfile

    from conftest import make_keys
    from netbed import NetBed, require_netns

    require_netns()
    with tempfile.TemporaryDirectory() as tmp, NetBed() as bed:
        keys = make_keys(Path(tmp), "scale")
        for fixed in (False, True):
            print(summary(run_scale(bed, keys, args.workers, args.jobs, fixed)), flush=True)


if __name__ == "__main__":
    main()
