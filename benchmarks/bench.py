"""rexnet against its peers on one namespace test bed, every figure in the same run.

Run as root from the repository (`make bench`, or `make bench BENCH_ARGS=--quick`):

    .venv/bin/python benchmarks/bench.py [--quick] [--runs N] [--no-write] [--only STEP]

Builds a bed of three namespaces on one bridge (client, w1, w2), starts a rexnet worker
(`sh -c`, --allow-args) and an sshd (port 2222, user rexbench whose shell reads no rc
files) on w1 and w2, then measures, alternating rexnet and its peer run by run:

- start of a trivial job: cold (`ssh host true`, default and curve25519 key exchange,
  against `rexnet exec --no-agent`), warm (ssh ControlMaster against `rexnet exec` through
  the agent), and Slurm's `srun true` where Slurm runs here;
- a short job with a little stdin (`printf hi | rexnet exec cat`, through the agent)
  against `printf hi | ssh` through a ControlMaster;
- 1 GiB one way (`cat > /dev/null`) and in and back out through `cat` (ssh default cipher
  and aes128-gcm), with the peak RSS of worker, agent and client while streaming; and
  the largest silence on the link during the 1 GiB round trip (tcpdump, benchmarks/gaps.py);
- tiny jobs 8 at a time across both workers: GNU parallel -S with ControlMaster and
  ssh+xargs -P8 with ControlMaster against `rexnet parallel` and the Python Executor;
- full slots under overload (benchmarks/slot_fill.py): 200 concurrent clients of 0.2 s
  jobs on one worker of 4 slots (slot time used), and the Executor with 16 and 64 jobs in
  flight against 8 (jobs/s);
- the scale simulation (benchmarks/scale.py): 1,000 workers answering one announcement,
  connect-backs per job and time to a started job, with and without the crowd-scaled
  window; and the same at 2 workers (the cost for a small cluster).

Prints a table and rewrites the generated part of benchmarks/RESULTS.md (everything above
the line "## History"; that section is written by hand and kept). `--only STEP` (repeatable)
runs only those steps and prints their rows without touching RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from cluster import LAUNCHERS, REXNET, Proc, start_worker  # noqa: E402
from conftest import Keys, make_keys  # noqa: E402
from gaps import Gaps, LinkGaps  # noqa: E402
from gaps import available as gaps_available  # noqa: E402
from netbed import Host, NetBed, require_netns, sweep_stale  # noqa: E402
from scale import ScaleResult, model, run_scale  # noqa: E402
from slurm import Slurm  # noqa: E402
from start_latency import USER, ensure_sshd, start_sshd  # noqa: E402

GIB = 1 << 30
BLOCK = 1 << 20
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
HISTORY = "## History"
WORKER_OPTIONS: list[str] = []  # more options for the bed's workers (--no-sandbox)
STEPS = ["start", "short", "srun", "jobs", "slots", "bulk", "gaps", "scale"]


@dataclass
class Row:
    """One figure: rexnet's samples next to a peer's, and which way is better."""

    section: str
    what: str
    unit: str
    rexnet: list[float]
    peer_name: str = ""
    peer: list[float] = field(default_factory=list)
    higher_is_better: bool = False
    goal: str = ""
    note: str = ""

    @staticmethod
    def cell(values: list[float]) -> str:
        if not values:
            return "-"
        digits = 0 if statistics.median(values) >= 100 else 1 if statistics.median(
            values) >= 10 else 2
        return (f"{statistics.median(values):.{digits}f} "
                f"({min(values):.{digits}f}-{max(values):.{digits}f})")

    @property
    def ratio(self) -> float | None:
        if not self.rexnet or not self.peer:
            return None
        return statistics.median(self.rexnet) / statistics.median(self.peer)

    @property
    def met(self) -> str:
        if not self.goal or self.ratio is None:
            return ""
        ok = self.ratio >= 1 if self.higher_is_better else self.ratio <= 1
        return "yes" if ok else "no"

    def markdown(self) -> str:
        ratio = f"{self.ratio:.2f}" if self.ratio is not None else "-"
        return (f"| {self.what} | {self.unit} | {self.cell(self.rexnet)} | {self.peer_name} | "
                f"{self.cell(self.peer)} | {ratio} | {self.goal} {self.met} | {self.note} |")


# -- measuring --------------------------------------------------------------------------


def run_ms(argv: Sequence[str], env: dict[str, str] | None = None,
           stdin: bytes | None = None) -> float:
    """Milliseconds ARGV takes (STDIN its input, else /dev/null; with STDIN, its output
    must be STDIN again: the short job runs `cat`)."""
    t0 = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, env=env, timeout=120, input=stdin,
                          stdin=None if stdin is not None else subprocess.DEVNULL)
    elapsed = (time.perf_counter() - t0) * 1000
    if done.returncode != 0 or (stdin is not None and done.stdout != stdin):
        raise RuntimeError(f"{argv} failed ({done.returncode}, {done.stdout[:40]!r}): "
                           f"{done.stderr.decode()[-400:]}")
    return elapsed


def alternate(n: int, *fns: Callable[[], float]) -> list[list[float]]:
    """Call each of FNS N times, round-robin, so that noise from the rest of the machine
    falls on all of them alike; returns the samples of each."""
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(n):
        for i, fn in enumerate(fns):
            samples[i].append(fn())
    return samples


class PeakRSS:
    """Samples the resident memory of named processes until stopped."""

    def __init__(self, find: Callable[[], dict[str, int]]) -> None:
        self.find = find
        self.peak: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for name, pid in self.find().items():
                try:
                    rss = psutil.Process(pid).memory_info().rss
                except psutil.Error:
                    continue
                self.peak[name] = max(self.peak.get(name, 0), rss)
            time.sleep(0.05)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process PID so far (not its children's); 0 if gone."""
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return 0.0
    return float(times.user + times.system)


def stream(argv: Sequence[str], size: int, back: bool, env: dict[str, str] | None = None,
           memory: PeakRSS | None = None) -> float:
    """Feed SIZE bytes to ARGV's stdin (reading back as many if BACK); return MB/s."""
    block = os.urandom(BLOCK)
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    assert proc.stdin is not None and proc.stdout is not None
    if memory is not None:
        memory.client_pid = proc.pid  # type: ignore[attr-defined]

    def feed() -> None:
        assert proc.stdin is not None
        try:
            for _ in range(size // BLOCK):
                proc.stdin.write(block)
            proc.stdin.close()
        except BrokenPipeError:
            pass

    t0 = time.perf_counter()
    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    got = 0
    while True:
        data = proc.stdout.read1(BLOCK)  # type: ignore[attr-defined]
        if not data:
            break
        got += len(data)
    writer.join()
    status = proc.wait(120)
    elapsed = time.perf_counter() - t0
    err = proc.stderr.read().decode()[-400:] if proc.stderr else ""
    if status != 0 or got != (size if back else 0):
        raise RuntimeError(f"{argv}: status {status}, {got} bytes back: {err}")
    return size / elapsed / 1e6


# -- the bed ----------------------------------------------------------------------------


@dataclass
class Bed:
    bed: NetBed
    keys: Keys
    work: Path
    client: Host
    workers: list[Host]
    ssh: list[str]  # argv prefix without the host
    agent: bool
    agent_env: dict[str, str]
    worker_procs: list[Proc]

    def rex(self, *args: str, agent: bool = False, targets: Sequence[Host] = ()) -> list[str]:
        hosts = targets or self.workers[:1]
        argv = [REXNET, "exec"]
        if self.agent and not agent:
            argv.append("--no-agent")
        for h in hosts:
            argv += ["-a", f"{h.addr()}:3010"]
        return self.client.argv([*argv, "-T", str(self.keys.client), *args])

    def ssh_to(self, host: Host, *options: str) -> list[str]:
        return self.client.argv([self.ssh[0], *options, *self.ssh[1:],
                                 f"{USER}@{host.addr()}"])


def has_agent(client: Host) -> bool:
    return client.run([REXNET, "agent", "--help"]).returncode == 0


def build(bed: NetBed, work: Path) -> Bed:
    keys = make_keys(work, "bench")
    lan = bed.add_subnet("lan")
    client = bed.add_host("client", [lan])
    workers = [bed.add_host(f"w{i}", [lan]) for i in (1, 2)]
    procs = [start_worker(keys.worker, ["sh", "-c"], "0.0.0.0:3010", h.name, "--allow-args",
                          "--slots", "8", *WORKER_OPTIONS, popen=h.popen) for h in workers]
    ssh: list[str] = []
    for h in workers:
        (work / f"ssh-{h.name}").mkdir()
        ssh = start_sshd(h, work / f"ssh-{h.name}", keyfile=work / "user")
    prefix = ssh[:-1]  # start_sshd's argv ends with user@host
    agent = has_agent(client)
    # the launcher uses an agent only in a directory of its own user, mode 0700 (P10 #1)
    (work / "agent").mkdir(mode=0o700)
    (work / "agent").chmod(0o700)
    env = dict(os.environ, REXNET_AGENT_SOCKET=str(work / "agent" / "agent.sock"))
    return Bed(bed, keys, work, client, workers, prefix, agent, env, procs)


# -- the figures ------------------------------------------------------------------------


def start_latency(b: Bed, n: int) -> list[Row]:
    w1 = b.workers[0]
    cold = b.rex("true")
    ssh_default = [*b.ssh_to(w1), "true"]
    ssh_curve = [*b.ssh_to(w1, "-o", "KexAlgorithms=curve25519-sha256"), "true"]
    for argv in (cold, ssh_default):
        run_ms(argv)
    rex, default, curve = alternate(n, lambda: run_ms(cold), lambda: run_ms(ssh_default),
                                    lambda: run_ms(ssh_curve))
    label = "`rexnet exec --no-agent true`" if b.agent else "`rexnet exec true` (cold)"
    rows = [Row("start", f"cold start: {label}", "ms", rex, "`ssh host true`", default,
                goal="<= 1"),
            Row("start", f"cold start: {label}", "ms", rex, "`ssh` curve25519", curve)]
    control = str(b.work / "control-w1")
    master = subprocess.Popen(b.client.argv([b.ssh[0], "-M", "-S", control, "-N", *b.ssh[1:],
                                             f"{USER}@{w1.addr()}"]))
    try:
        time.sleep(1.0)
        warm_ssh = b.client.argv([b.ssh[0], "-S", control, *b.ssh[1:],
                                  f"{USER}@{w1.addr()}", "true"])
        run_ms(warm_ssh)
        if b.agent:
            warm = b.rex("true", agent=True)
            for _ in range(3):
                run_ms(warm, b.agent_env)
            python = [LAUNCHERS["python"] if a == REXNET else a for a in warm]
            native = os.path.realpath(REXNET) == os.path.realpath(LAUNCHERS["native"])
            floor = b.client.argv([sys.executable, "-I", "-S", "-c", "pass"])
            rex_warm, ssh_warm, py_warm, py_floor = alternate(
                n, lambda: run_ms(warm, b.agent_env), lambda: run_ms(warm_ssh),
                lambda: run_ms(python, b.agent_env), lambda: run_ms(floor))
            rows.append(Row("start", "warm start: `rexnet exec true` (agent)", "ms", rex_warm,
                            "ssh ControlMaster", ssh_warm, goal="<= 1",
                            note="native launcher" if native else "Python launcher"))
            rows.append(Row("start", "warm start: `rexnet-py exec true` (agent, Python "
                            "launcher)", "ms", py_warm, "ssh ControlMaster", ssh_warm))
            gap = statistics.median(py_warm) - statistics.median(py_floor)
            rows.append(Row("start", "warm start: `rexnet-py exec true` (agent, Python "
                            "launcher)", "ms", py_warm, "`python -I -S -c pass`", py_floor,
                            note=f"{gap:+.1f} ms over the interpreter (goal: +6 ms at most)"))
        else:
            ssh_warm = alternate(n, lambda: run_ms(warm_ssh))[0]
            rows.append(Row("start", "warm start: rexnet agent", "ms", [], "ssh ControlMaster",
                            ssh_warm, goal="<= 1", note="agent not available on this branch"))
    finally:
        master.terminate()
        master.wait(10)
    return rows


def short_job(b: Bed, n: int) -> list[Row]:
    """`printf hi | rexnet exec cat` (warm, through the agent) against `printf hi | ssh`
    through a ControlMaster: the EXIT frame behind a little data is where a delayed ACK
    (with Nagle) used to cost ~40 ms."""
    w1 = b.workers[0]
    control = str(b.work / "control-short")
    master = subprocess.Popen(b.client.argv([b.ssh[0], "-M", "-S", control, "-N", *b.ssh[1:],
                                             f"{USER}@{w1.addr()}"]))
    try:
        time.sleep(1.0)
        ssh_cat = b.client.argv([b.ssh[0], "-S", control, *b.ssh[1:], f"{USER}@{w1.addr()}",
                                 "cat"])
        rex_cat = b.rex("cat", agent=b.agent)
        env = b.agent_env if b.agent else None
        for _ in range(3):
            run_ms(rex_cat, env, b"hi")
        run_ms(ssh_cat, stdin=b"hi")
        rex, ssh = alternate(n, lambda: run_ms(rex_cat, env, b"hi"),
                             lambda: run_ms(ssh_cat, stdin=b"hi"))
    finally:
        master.terminate()
        master.wait(10)
    slow = sum(1 for t in rex if t > statistics.median(ssh) + 30)
    via = " (agent)" if b.agent else ""
    return [Row("start", f"short job with a little stdin: `printf hi | rexnet exec cat`{via}",
                "ms", rex, "ssh ControlMaster", ssh, goal="<= 1",
                note=f"{slow} of {len(rex)} rexnet runs over the ssh median + 30 ms")]


def srun_latency(b: Bed, n: int) -> list[Row]:
    slurm = Slurm(b.workers[0], b.work / "slurm")
    problem = slurm.start()
    if problem:
        return [Row("start", "`srun true` (single node)", "ms", [], "Slurm srun", [],
                    note=f"Slurm not measured: {problem}")]
    try:
        srun = b.workers[0].argv(slurm.srun(["true"]))  # srun on the node itself
        cold = b.rex("true")
        run_ms(srun, slurm.env)
        rex, peer = alternate(n, lambda: run_ms(cold), lambda: run_ms(srun, slurm.env))
        return [Row("start", "cold start: `rexnet exec --no-agent true`" if b.agent
                    else "cold start: `rexnet exec true`", "ms", rex,
                    "`srun true` (one node)", peer,
                    note="srun runs on the node; rexnet from the client host")]
    finally:
        slurm.stop()


def agent_pid(b: Bed) -> int | None:
    """The agent this run started: a rexnet process with our agent socket in its command
    line or environment (other users' agents on the machine are not ours)."""
    sock = b.agent_env["REXNET_AGENT_SOCKET"]
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if "rexnet" not in cmd or "agent" not in cmd or proc.pid == os.getpid():
            continue
        try:
            if sock in cmd or proc.environ().get("REXNET_AGENT_SOCKET") == sock:
                return int(proc.pid)
        except psutil.Error:
            continue
    return None


def bulk(b: Bed, n: int) -> tuple[list[Row], dict[str, int]]:
    w1 = b.workers[0]
    env = b.agent_env if b.agent else None
    rex_one = b.rex("cat > /dev/null", agent=b.agent)
    rex_back = b.rex("cat", agent=b.agent)
    gcm = ("-c", "aes128-gcm@openssh.com")
    ssh_one, gcm_one = [*b.ssh_to(w1), "cat > /dev/null"], [*b.ssh_to(w1, *gcm), "cat > /dev/null"]
    ssh_back, gcm_back = [*b.ssh_to(w1), "cat"], [*b.ssh_to(w1, *gcm), "cat"]
    worker_pid = b.worker_procs[0].pid
    memory = PeakRSS(lambda: {k: v for k, v in {
        "worker": worker_pid, "client": getattr(memory, "client_pid", None),
        "agent": agent_pid(b) if b.agent else None}.items() if v})
    with memory:
        rex_b = [stream(rex_back, GIB, True, env, memory)]
    cpu: dict[str, list[float]] = {}

    def rex_round() -> float:
        """One round trip, with the CPU seconds the agent and the worker spent on it
        (user + system: less sensitive to the machine's other load than MB/s)."""
        pids = {k: v for k, v in {"agent": agent_pid(b) if b.agent else None,
                                  "worker": worker_pid}.items() if v}
        before = {k: cpu_seconds(pid) for k, pid in pids.items()}
        rate = stream(rex_back, GIB, True, env)
        for k, pid in pids.items():
            cpu.setdefault(k, []).append(cpu_seconds(pid) - before[k])
        return rate

    rex_b_more, gcm_b, def_b = alternate(
        n, rex_round, lambda: stream(gcm_back, GIB, True), lambda: stream(ssh_back, GIB, True))
    cpu_note = "CPU s per round trip: " + ", ".join(
        f"{k} {statistics.median(v):.2f}" for k, v in cpu.items())
    print(f"   {cpu_note}", flush=True)
    rex_o, gcm_o, def_o = alternate(
        n, lambda: stream(rex_one, GIB, False, env), lambda: stream(gcm_one, GIB, False),
        lambda: stream(ssh_one, GIB, False))
    rex_b += rex_b_more
    via = " (agent)" if b.agent else ""
    rows = [
        Row("bulk", f"1 GiB in and back out through `cat`{via}", "MB/s", rex_b,
            "ssh aes128-gcm", gcm_b, True, ">= 1", note=cpu_note),
        Row("bulk", f"1 GiB in and back out through `cat`{via}", "MB/s", rex_b,
            "ssh default cipher", def_b, True),
        Row("bulk", f"1 GiB one way (`cat > /dev/null`){via}", "MB/s", rex_o,
            "ssh aes128-gcm", gcm_o, True),
        Row("bulk", f"1 GiB one way (`cat > /dev/null`){via}", "MB/s", rex_o,
            "ssh default cipher", def_o, True),
    ]
    return rows, memory.peak


def link_gaps(b: Bed, n: int) -> list[Row]:
    """The largest silence on the client's link during 1 GiB in and back out through
    `cat`, rexnet against ssh aes128-gcm, from tcpdump in the client's namespace."""
    w1 = b.workers[0]
    why = gaps_available()
    what = "largest silence on the link, 1 GiB through `cat`"
    if why:
        return [Row("bulk", what, "ms", [], "ssh aes128-gcm", [], note=f"not measured: {why}")]
    env = b.agent_env if b.agent else None
    rex_back = b.rex("cat", agent=b.agent)
    gcm_back = [*b.ssh_to(w1, "-c", "aes128-gcm@openssh.com"), "cat"]
    found: dict[str, list[Gaps]] = {"rexnet": [], "ssh": []}

    def capture(name: str, argv: list[str], expression: str) -> float:
        with LinkGaps(b.client.argv([]), b.work / "gaps.pcap", expression) as gaps:
            stream(argv, GIB, True, env if name == "rexnet" else None)
        assert gaps.gaps is not None
        found[name].append(gaps.gaps)
        print(f"   {name}: {gaps.gaps.describe()}", flush=True)
        return gaps.gaps.largest * 1000

    host = f"tcp and host {w1.addr()}"
    rex, ssh = alternate(n, lambda: capture("rexnet", rex_back, f"{host} and not port 2222"),
                         lambda: capture("ssh", gcm_back, f"{host} and port 2222"))

    def share(name: str) -> str:
        return "/".join(f"{g.silent:.0%}" for g in found[name])

    stalls = sum(g.over_stall for g in found["rexnet"])
    return [Row("bulk", what, "ms", rex, "ssh aes128-gcm", ssh,
                note=f"goal: none over 20 ms (rexnet: {stalls} over 20 ms in {len(rex)} runs); "
                f"time in silences over 1 ms: rexnet {share('rexnet')}, ssh {share('ssh')}")]


def jobs_rate(argv: Sequence[str], jobs: int, env: dict[str, str] | None = None,
              stdin: bytes | None = None) -> float:
    """Jobs per second of ARGV running JOBS jobs.  Its output goes to a file, not a pipe:
    GNU parallel -M leaves a helper holding its stdout after it exits."""
    with tempfile.TemporaryFile() as out:
        t0 = time.perf_counter()
        done = subprocess.run(argv, input=stdin, stdout=out, stderr=out, env=env, timeout=600,
                              stdin=None if stdin is not None else subprocess.DEVNULL)
        elapsed = time.perf_counter() - t0
        out.seek(0)
        if done.returncode != 0:
            raise RuntimeError(f"{argv[-6:]} failed ({done.returncode}): "
                               f"{out.read().decode(errors='replace')[-400:]}")
    return jobs / elapsed


def ssh_wrapper(b: Bed) -> Path:
    """A script that runs the bed's ssh with its options, for GNU parallel's --ssh.  Given
    the options in --ssh itself, `parallel -M` execs the whole string as one program name
    to start its control master: that fails (ENOENT), every job then logs in anew, and the
    forked copy of parallel that failed to exec goes on running jobs of the same queue
    after the timed parallel has exited (20221122; the crawls and the too-fast runs of
    2026-12-02)."""
    script = b.work / "ssh-for-parallel"
    script.write_text("#!/bin/sh\nexec " + " ".join(b.ssh) + ' "$@"\n')
    script.chmod(0o755)
    return script


def reap(host: Host, word: str) -> None:
    """End the processes in HOST's namespace whose command line has WORD (what a run of
    ours left behind: GNU parallel's control-master helper)."""
    pids = subprocess.run(["ip", "netns", "pids", host.netns], capture_output=True,
                          text=True).stdout.split()
    for pid in map(int, pids):
        try:
            proc = psutil.Process(pid)
            if word in " ".join(proc.cmdline()):
                proc.terminate()
        except psutil.Error:
            continue


EXECUTOR = """
import resource, sys, time, rexnet
key, jobs, width, targets = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
with rexnet.Executor(key, targets, width) as ex:
    list(ex.map(["true"], [b""] * width))
    c0, t0 = cpu(), time.perf_counter()
    done = list(ex.map(["true"], [b""] * jobs))
    rate, used = jobs / (time.perf_counter() - t0), cpu() - c0
assert all(d.returncode == 0 for d in done)
print(rate, used * 1000 / jobs)
"""


def worker_cpu(b: Bed) -> float:
    """CPU seconds of the bed's workers and their (reaped) jobs so far, with their sandbox
    helpers' (which reap the jobs' inits)."""
    total = 0.0
    for proc in b.worker_procs:
        worker = psutil.Process(proc.process.pid)
        for p in [worker, *(c for c in worker.children()
                            if "rexnet.worker.sandboxd" in " ".join(c.cmdline()))]:
            t = p.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
    return total


def executor_rate(b: Bed, jobs: int, width: int, cpu: list[float] | None = None) -> float:
    """Jobs/s of an Executor with WIDTH jobs at a time; CPU gets the client's and the
    workers' (with their jobs) CPU milliseconds per job."""
    targets = [f"{h.addr()}:3010" for h in b.workers]
    before = worker_cpu(b)
    done = b.client.run([sys.executable, "-c", EXECUTOR, str(b.keys.client), str(jobs),
                         str(width), *targets], timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"Executor run failed: {done.stderr[-600:]}")
    rate, client_ms = map(float, done.stdout.strip().splitlines()[-1].split())
    if cpu is not None:  # (the workers' figure includes the warm-up jobs)
        cpu[:] = [client_ms, (worker_cpu(b) - before) * 1000 / (jobs + width)]
    return rate


def tiny_jobs(b: Bed, jobs: int, n: int) -> list[Row]:
    w1, w2 = b.workers
    controls = [str(b.work / f"control-{h.name}") for h in b.workers]
    masters = [subprocess.Popen(b.client.argv([b.ssh[0], "-M", "-S", c, "-N", *b.ssh[1:],
                                               f"{USER}@{h.addr()}"]))
               for c, h in zip(controls, b.workers, strict=True)]
    try:
        time.sleep(1.0)
        ssh_cmd = " ".join(b.ssh)
        joblog = b.work / "parallel-joblog"
        parallel = b.client.argv(
            ["parallel", "-j8", "-M", "--ssh", str(ssh_wrapper(b)), "--joblog", str(joblog),
             "-S", f"4/{USER}@{w1.addr()},4/{USER}@{w2.addr()}", "true", ":::",
             *map(str, range(jobs))])
        pairs = "".join(f"{controls[i % 2]} {USER}@{b.workers[i % 2].addr()}\n"
                        for i in range(jobs)).encode()
        xargs = b.client.argv(["xargs", "-P8", "-n2", "sh", "-c",
                               f'exec {ssh_cmd} -S "$0" "$1" true'])
        rex_parallel = b.client.argv(
            [REXNET, "parallel", "-j", "8", "-a", f"{w1.addr()}:3010", "-a",
             f"{w2.addr()}:3010", str(b.keys.client), "--", "true", ":::",
             *map(str, range(jobs))])
        def gnu_parallel() -> float:
            joblog.unlink(missing_ok=True)
            # its control masters' sockets go in TMPDIR: the bed's, removed with it
            rate = jobs_rate(parallel, jobs, env=dict(os.environ, TMPDIR=str(b.work)))
            reap(b.client, "/usr/bin/parallel")
            ran = joblog.read_text().splitlines()[1:]  # jobs it ran itself, not a copy of it
            if len(ran) != jobs or any(line.split("\t")[6] != "0" for line in ran):
                raise RuntimeError(f"GNU parallel ran {len(ran)} of {jobs} jobs, or some failed")
            return rate

        rex_p, par, xar, exe = alternate(
            n, lambda: jobs_rate(rex_parallel, jobs), gnu_parallel,
            lambda: jobs_rate(xargs, jobs, stdin=pairs), lambda: executor_rate(b, jobs, 8))
        cpu: list[float] = []
        exe16 = alternate(n, lambda: executor_rate(b, 1000, 16, cpu))[0]
    finally:
        for m in masters:
            m.terminate()
            m.wait(10)
    rows = [
        Row("jobs", "`rexnet parallel -j8`, 2 workers", "jobs/s", rex_p,
            "GNU parallel -S -M, 8 at a time", par, True),
        Row("jobs", "`rexnet parallel -j8`, 2 workers", "jobs/s", rex_p,
            "ssh+xargs -P8, ControlMaster", xar, True),
        Row("jobs", "rexnet.Executor, 8 at a time, 2 workers", "jobs/s", exe,
            "GNU parallel -S -M, 8 at a time", par, True),
        Row("jobs", "rexnet.Executor, 8 at a time, 2 workers", "jobs/s", exe,
            "ssh+xargs -P8, ControlMaster", xar, True),
        Row("jobs", "rexnet.Executor, 16 at a time, 2 workers", "jobs/s", exe16,
            "(goal 1,000 jobs/s)", [1000.0], True, ">= 1",
            note=f"CPU per job (last run): client {cpu[0]:.2f} ms, workers and jobs "
            f"{cpu[1]:.2f} ms" if cpu else ""),
    ]
    return rows


def slot_fill(b: Bed, runs: int) -> list[Row]:
    """Slot time used by 200 concurrent 0.2 s jobs on a worker of 4 slots (a second worker
    process on w1, port 3020), and the Executor's jobs/s with more jobs in flight than the
    bed's 16 slots, against 8 in flight (benchmarks/slot_fill.py, in the client's host)."""
    import json

    w1 = b.workers[0]
    script = str(ROOT / "benchmarks" / "slot_fill.py")
    sleeper = start_worker(b.keys.worker, ["sleep"], "0.0.0.0:3020", "sleeper", "--allow-args",
                           "--slots", "4", popen=w1.popen)
    try:
        fills = [json.loads(b.client.run([sys.executable, script, "--clients",
                                          str(b.keys.client), f"{w1.addr()}:3020", "200",
                                          "0.2", "4"], timeout=600).stdout)
                 for _ in range(max(1, runs // 5))]
        used = [f["used"] * 100 for f in fills]

        def mid(name: str) -> float:
            return statistics.median(f[name] for f in fills)

        setup = (f"the one client process set its 200 jobs up in {mid('made') * 1000:.0f} ms,"
                 f" the first started at {mid('first_start') * 1000:.0f} ms; from there"
                 f" slot time used {mid('used_from_first_start') * 100:.1f}%")
    finally:
        sleeper.stop()
    targets = [f"{h.addr()}:3010" for h in b.workers]

    def rate(width: int) -> float:
        done = b.client.run([sys.executable, script, "--executor", str(b.keys.client), "1000",
                             str(width), "true", *targets], timeout=600)
        return float(json.loads(done.stdout)["rate"])

    # one run each is noisier than the ratio sought: rounds of 8/16/64, and every round's
    # ratio printed
    at8, at16, at64 = alternate(max(3, runs // 3), lambda: rate(8), lambda: rate(16),
                                lambda: rate(64))
    return [
        Row("queue", "200 concurrent 0.2 s jobs on 4 slots: slot time used", "%", used,
            "(goal 90%)", [90.0], True, ">= 1", note=setup),
        Row("queue", "rexnet.Executor, 16 in flight (16 slots)", "jobs/s", at16,
            "8 in flight", at8, True, ">= 1", note=rounds(at16, at8)),
        Row("queue", "rexnet.Executor, 64 in flight (16 slots)", "jobs/s", at64,
            "8 in flight", at8, True, ">= 1", note=rounds(at64, at8)),
    ]


def rounds(these: list[float], peers: list[float]) -> str:
    """The ratio of each round of alternated samples, in order."""
    return "per round: " + ", ".join(f"{a / b:.2f}" for a, b in zip(these, peers, strict=True))


def scale(bed: NetBed, keys: Keys, workers: int, jobs: int) -> list[ScaleResult]:
    results = []
    for count, n in ((workers, jobs), (2, max(jobs, 20))):
        for fixed in (False, True):
            results.append(run_scale(bed, keys, count, n, fixed))
    return results


# -- the report -------------------------------------------------------------------------


def scale_lines(results: list[ScaleResult]) -> list[str]:
    lines = ["| workers | connect-back window | first job: connect-backs | first job: "
             "start ms | later jobs: connect-backs per job (max) | later jobs: start ms "
             "median (min-max) | second half: connect-backs per job | crowd learnt | "
             "first connect-back due to TAKEN, ms | first connect-back sent to TAKEN, ms |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        cbs, starts = r.steady()
        settled, _ = r.settled()
        lines.append(f"| {r.workers} | {r.mode} | {r.connect_backs[0]} | {r.start_ms[0]:.1f} | "
                     f"{statistics.mean(cbs):.3f} ({max(cbs)}) | {Row.cell(starts)} | "
                     f"{statistics.mean(settled):.3f} | {r.crowd:.0f} | "
                     f"{Row.cell(r.cancel_ms)} | {Row.cell(r.sent_ms)} |")
    sent = [t for r in results if r.workers > 2 and not r.mode.startswith("fixed")
            for t in r.cancel_ms]  # (scale.py has the first connect-back leave when due)
    if sent:  # the model (benchmarks/scale.py), with the TAKEN as late as measured here
        late = statistics.median(sent)
        lines += ["", f"Model, early TAKEN {late:.1f} ms after the first connect-back (as "
                  "measured), final TAKEN 20 ms after, 200 jobs: " + ", ".join(
                      f"{n:,} workers {model(n, 200, 20.0, early_ms=late)[0]:.3f} "
                      "connect-backs per job" for n in (1000, 10000)) + "."]
    return lines


def report(rows: list[Row], peak: dict[str, int], scaled: list[ScaleResult], argv: list[str],
           seconds: float, agent: bool) -> str:
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    load = os.getloadavg()
    lines = [
        "# Benchmark results", "",
        f"Generated by `{' '.join(argv)}` on {now} in {seconds:.0f} s: "
        f"{platform.machine()}, {psutil.cpu_count()} CPUs, Python "
        f"{platform.python_version()}, load average {load[0]:.2f} at the end (the machine "
        "is shared: the figures of one row were taken alternately, run by run, so that the "
        "ratios compare like with like).", "",
        "Hosts are network namespaces on one bridge (tests/netbed.py): `client`, `w1`, `w2`. "
        "Each worker host runs a rexnet worker (`sh -c`, --allow-args, 8 slots) and an sshd "
        f"on port 2222 for the user `{USER}` (shell /bin/sh, no rc files). rexnet agent: "
        f"{'present' if agent else 'not on this branch (warm rows empty)'}.", "",
        "Cells are median (min-max). The ratio is rexnet/peer: below 1 is better for times, "
        "above 1 for rates.", "",
        "| figure | unit | rexnet | peer | peer figure | ratio | goal met | note |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        *[r.markdown() for r in rows], "",
        "Peak resident memory while streaming 1 GiB through `cat`: " + ", ".join(
            f"{name} {size / 1e6:.1f} MB" for name, size in sorted(peak.items())) + ".", "",
        "### Scale simulation", "",
        "Simulated workers are real Worker objects in one process (benchmarks/scale.py), all "
        "on one multicast group in a namespace; the client is a real `rexnet exec -v` in "
        "another. Connect-backs are the attempts the workers made per job, counted in the "
        "workers; start is the client's time from announcing to a started job. The first job "
        "is where the workers learn the crowd from the client's TAKEN.", "",
        *scale_lines(scaled), "",
    ]
    return "\n".join(lines)


def write_results(text: str) -> None:
    old = RESULTS.read_text() if RESULTS.exists() else ""
    history = old[old.index(HISTORY):] if HISTORY in old else f"{HISTORY}\n"
    RESULTS.write_text(text + "\n" + history)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="fewer runs and jobs (a few minutes)")
    parser.add_argument("--runs", type=int, help="runs per figure (default 15, quick 5)")
    parser.add_argument("--no-write", action="store_true",
                        help="print only; leave benchmarks/RESULTS.md alone")
    parser.add_argument("--scale-workers", type=int, default=1000)
    parser.add_argument("--only", action="append", choices=STEPS, metavar="STEP",
                        help=f"run only this step ({', '.join(STEPS)}); repeatable; prints "
                        "the rows and leaves benchmarks/RESULTS.md alone")
    parser.add_argument("--no-sandbox", action="store_true",
                        help="start the workers with --no-sandbox (the sandbox's share apart)")
    args = parser.parse_args()
    if args.no_sandbox:
        WORKER_OPTIONS.append("--no-sandbox")
    only = set(args.only or STEPS)
    runs = args.runs or (5 if args.quick else 15)
    bulk_runs = 1 if args.quick else 3
    jobs = 200 if args.quick else 500
    scale_jobs = 30 if args.quick else 40  # the first job sizes the windows; later ones steer
    require_netns()
    sweep_stale()
    # a TERM (or ^C) unwinds through the bed's cleanup: namespaces, sshd, workers
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    ensure_sshd()
    for tool in ("parallel", "tcpdump"):  # GNU parallel for "jobs", tcpdump for "gaps"
        if not shutil.which(tool):
            subprocess.run(["apt-get", "install", "-y", "-qq", tool], check=True,
                           env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    started = time.monotonic()
    rows: list[Row] = []
    peak: dict[str, int] = {}
    scaled: list[ScaleResult] = []
    with tempfile.TemporaryDirectory() as tmp, NetBed() as bed:
        work = Path(tmp)
        work.chmod(0o755)  # sshd reads the authorized keys as the user
        b = build(bed, work)
        try:
            def bulk_step() -> None:
                bulk_rows, peak_rss = bulk(b, bulk_runs)
                rows.extend(bulk_rows)
                peak.update(peak_rss)

            steps: dict[str, Callable[[], object]] = {
                "start": lambda: rows.extend(start_latency(b, runs)),
                "short": lambda: rows.extend(short_job(b, runs)),
                "srun": lambda: rows.extend(srun_latency(b, runs)),
                "jobs": lambda: rows.extend(tiny_jobs(b, jobs, max(2, runs // 5))),
                "slots": lambda: rows.extend(slot_fill(b, runs)),
                "bulk": bulk_step,
                "gaps": lambda: rows.extend(link_gaps(b, bulk_runs)),
                "scale": lambda: scaled.extend(
                    scale(bed, b.keys, args.scale_workers, scale_jobs)),
            }
            assert list(steps) == STEPS
            for name, step in steps.items():
                if name in only:
                    print(f"-- {name}", flush=True)
                    done = len(rows)
                    step()
                    for row in rows[done:]:  # as they come: a later step may fail
                        print(row.markdown(), flush=True)
        finally:
            if b.agent:
                b.client.run([REXNET, "agent", "--stop"], env=b.agent_env)
    text = report(rows, peak, scaled, ["make", "bench"] if os.environ.get("MAKELEVEL") else
                  [".venv/bin/python", "benchmarks/bench.py", *sys.argv[1:]],
                  time.monotonic() - started, b.agent)
    print(text)
    if not args.no_write and not args.only:
        write_results(text)
        print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
