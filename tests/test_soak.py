"""Soak (issue P6, point 6): many jobs with random payloads from 4 clients across 4
workers in the namespace test bed; every output's sha256, its stderr (a line with the
job's number) and exit status checked; no process, file descriptor or namespace left
behind; a job that never ends fails the test with the workers' logs (it does not hang).

REXNET_SOAK_JOBS sets the number of jobs: CI runs a short form (the default), and
`make soak` runs 1,000.  Each client host runs one Python process that keeps
CONCURRENCY jobs in flight through the Python API (rexnet.client.run), and a few of its
jobs through the `rexnet exec` command line, so both paths soak.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path

import psutil
from cluster import REXNET, Proc, start_worker
from conftest import Keys, stop_agents
from netbed import NetBed, list_netns, require_netns

from rexnet.worker.nativeinit import SERVER_NAME
from rexnet.worker.sandbox import SPARES
from rexnet.worker.sandboxd import SPARE_NAME

JOBS = int(os.environ.get("REXNET_SOAK_JOBS", "200"))
CLIENTS = WORKERS = 4
CONCURRENCY = 3
REPORT_TIMEOUT = 600  # seconds for all of a client's jobs (CI runs 50 each in ~20 s)
MAX_PAYLOAD = int(os.environ.get("REXNET_SOAK_MAX_BYTES", str(1 << 20)))

CLIENT = r"""
import hashlib, json, os, random, subprocess, sys
from twisted.internet import defer, task, threads
from rexnet.client.api import run
from rexnet.client.results import JobFailed

keyfile, announce, jobs, concurrency, seed, max_bytes, rexnet = sys.argv[1:8]
rng = random.Random(int(seed))
report = {"ok": 0, "bad": [], "bytes": 0, "workers": {}}

def payload():
    size = min(int(max_bytes), int(2 ** rng.uniform(0, 20)))  # log-uniform up to 1 MiB
    return rng.randbytes(size), rng.randrange(4)

def check(n, data, status, code, out, err, worker):
    ok = (code == status and hashlib.sha256(out).digest() == hashlib.sha256(data).digest()
          and err == f"{n}\n".encode())
    if ok:
        report["ok"] += 1
        report["bytes"] += len(data)
        report["workers"][worker] = report["workers"].get(worker, 0) + 1
    else:
        report["bad"].append([n, len(data), status, code, len(out), err[-200:].decode(
            errors="replace")])

def by_command_line(n, data, status):
    done = subprocess.run([rexnet, "exec", "--announce", announce, "--timeout", "30",
                           keyfile, "--", f"cat; echo {n} >&2; exit {status}"],
                          input=data, capture_output=True, timeout=120)
    check(n, data, status, done.returncode, done.stdout, done.stderr, "cli")

async def one(reactor, n):
    data, status = payload()
    if n % 10 == 0:
        await threads.deferToThread(by_command_line, n, data, status)
        return
    try:
        done = await run(reactor, keyfile, [f"cat; echo {n} >&2; exit {status}"], stdin=data,
                         announce=[announce], timeout=30)
    except JobFailed as e:
        report["bad"].append([n, len(data), status, str(e)])
        return
    check(n, data, status, done.returncode, done.stdout, done.stderr, done.worker)

def fds():
    return len(os.listdir("/proc/self/fd"))

async def main(reactor):
    await one(reactor, 1)  # the first job opens what stays open (threads, alert port)
    before = fds()
    sem = defer.DeferredSemaphore(int(concurrency))
    await defer.gatherResults([sem.run(lambda n=n: defer.Deferred.fromCoroutine(
        one(reactor, n))) for n in range(2, int(jobs) + 1)])
    await task.deferLater(reactor, 1.0, lambda: None)  # connections close cleanly by now
    report["fds"] = [before, fds()]
    print(json.dumps(report), flush=True)
    await threads.deferToThread(sys.stdin.read)  # stay alive while the test looks

task.react(lambda reactor: defer.Deferred.fromCoroutine(main(reactor)))
"""


def counts(proc: Proc) -> tuple[int, int, int]:
    """(descendant processes, open descriptors, RSS) of a worker; its sandbox helper and
    the spare inits it prepares ahead of jobs and their fork server are not counted (those
    of jobs are), nor the worker's socket to each spare (the spares grow, one each time a
    job found none ready: rexnet.worker.sandbox.GROWN_SPARES)."""
    me = psutil.Process(proc.pid)
    helpers = [c for c in me.children() if "rexnet.worker.sandboxd" in " ".join(c.cmdline())]
    tree = me.children(recursive=True)
    spares = [p for p in tree if p.name() in (SPARE_NAME, SERVER_NAME)]
    ready = sum(p.name() == SPARE_NAME for p in spares)
    return len(tree) - len(helpers) - len(spares), me.num_fds() - ready, me.memory_info().rss


def wait_for_spares(proc: Proc, timeout: float = 10.0) -> None:
    """Until the worker's sandbox helper has prepared its spares (an init each), if it
    sandboxes jobs at all."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        tree = psutil.Process(proc.pid).children(recursive=True)
        if (not any("rexnet.worker.sandboxd" in " ".join(p.cmdline()) for p in tree)
                or len([p for p in tree if p.name() == SPARE_NAME]) >= SPARES):
            return
        time.sleep(0.1)


def test_soak(keys: Keys, agent_sockets: Path) -> None:
    require_netns()
    with NetBed() as bed:
        lan = bed.add_subnet("lan")
        workers = [start_worker(keys.worker, ["sh", "-c"], "0.0.0.0:3010", f"w{n}",
                                "--allow-args", "--slots", "3",
                                popen=bed.add_host(f"w{n}", [lan]).popen)
                   for n in range(WORKERS)]
        clients = [bed.add_host(f"c{n}", [lan]) for n in range(CLIENTS)]
        namespaces = list(bed.namespaces)
        announce = "255.255.255.255:3010"
        for w in workers:  # its spare supervisors, made a second after its start
            wait_for_spares(w)
        before = [counts(w) for w in workers]
        t0 = time.monotonic()
        runs = [host.popen([sys.executable, "-c", CLIENT, str(keys.client), announce,
                            str(JOBS // CLIENTS), str(CONCURRENCY), str(n), str(MAX_PAYLOAD),
                            REXNET], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE)
                for n, host in enumerate(clients)]
        reports = []
        for proc in runs:  # each prints its report, then waits for its stdin to close
            assert proc.stdout is not None and proc.stdin is not None
            if not select.select([proc.stdout], [], [], REPORT_TIMEOUT)[0]:
                raise AssertionError(  # a job that never ends: say where, do not hang
                    f"no report from a client in {REPORT_TIMEOUT} s; workers' logs end: "
                    + " | ".join(w.output[-1500:] for w in workers))
            line = proc.stdout.readline()
            assert line, proc.communicate(timeout=30)[1].decode()[-3000:]
            reports.append(json.loads(line))
        elapsed = time.monotonic() - t0
        # the agents (of the jobs run by the command line) keep warm channels to the
        # workers: open on purpose, not leaked; they close with the agents
        stop_agents(agent_sockets)
        time.sleep(1.5)  # a job's last processes get 1 s to finish after it exits
        after = [counts(w) for w in workers]  # measured while the clients still run
        for proc in runs:
            _, err = proc.communicate(b"", timeout=60)
            assert proc.returncode == 0, err.decode()[-3000:]
        ok = sum(r["ok"] for r in reports)
        bad = [b for r in reports for b in r["bad"]]
        moved = sum(r["bytes"] for r in reports)
        placed: dict[str, int] = {}
        for r in reports:
            for name, n in r["workers"].items():
                placed[name] = placed.get(name, 0) + n
        print(f"soak: {ok}/{JOBS // CLIENTS * CLIENTS} jobs correct in {elapsed:.1f} s, "
              f"{moved / 2**20:.1f} MiB checked; per worker {placed}; workers' "
              f"(processes, fds, RSS MiB) before "
              f"{[(p, f, round(r / 2**20, 1)) for p, f, r in before]} after "
              f"{[(p, f, round(r / 2**20, 1)) for p, f, r in after]}; clients' fds "
              f"{[r['fds'] for r in reports]}")
        assert bad == [], bad[:10]
        for r in reports:  # the long-lived clients leaked no descriptor either
            assert r["fds"][1] <= r["fds"][0] + 2, r["fds"]
        assert ok == JOBS // CLIENTS * CLIENTS
        assert len([w for w in placed if w != "cli"]) == WORKERS  # all took part
        for (_, fds0, _), (procs1, fds1, _) in zip(before, after, strict=True):
            assert procs1 == 0  # no job process left
            assert fds1 <= fds0 + 2  # no descriptor leaked (a log file may open late)
        for w in workers:
            assert "Traceback" not in w.output and "Unhandled" not in w.output, w.output[-3000:]
    left = set(list_netns()) & set(namespaces)
    assert not left, f"namespaces left behind: {left}"
