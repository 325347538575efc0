"""Faults in the namespace test bed (issue P6, point 4): a lossy, slow network, a client
killed by SIGKILL, a worker restarted during a burst of jobs, crat down.

A worker killed by SIGKILL mid-job (the client exits with 255 within seconds) is shown by
test_multihost.py::test_worker_killed_mid_job_gives_worker_lost.

Loss and delay: every host gets 10% loss and 50 ms delay on egress, like ``tc qdisc ... netem
loss 10% delay 50ms`` but from a userspace shuttle between TAP devices (netbed's
``Host.impair``, tests/impair.py), because the CI kernel has no queueing disciplines. The
test measures that the delay is there (UDP round trip between two hosts >= 100 ms) and that
frames were dropped, and prints both.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
from cluster import exec_argv, run_exec
from conftest import Keys
from netbed import Host, NetBed
from test_crat import start_crat
from test_multihost import BROADCAST, job, worker_on
from test_netbed import start_echo, udp_rtts

from rexnet.protocol import exitcodes
from rexnet.worker.nativeinit import SERVER_NAME
from rexnet.worker.sandboxd import SPARE_NAME

LOSS = 10
DELAY_MS = 50


def test_jobs_complete_on_a_lossy_network(bed: NetBed, keys: Keys) -> None:
    lan = bed.add_subnet("lan")
    hosts = [bed.add_host(name, [lan]) for name in ("client", "w1", "w2")]
    for host in hosts:
        host.impair(loss_percent=LOSS, delay_ms=DELAY_MS)
    print(f"every host: {LOSS}% loss, {DELAY_MS} ms delay on egress (userspace shuttle)")
    start_echo(hosts[1])
    rtts = udp_rtts(hosts[0], hosts[1], count=10)
    print(f"UDP round trip client-w1: min {min(rtts) * 1000:.1f} ms, {len(rtts)}/10 answered")
    assert min(rtts) >= 2 * DELAY_MS / 1000  # 50 ms out of each host
    for host in hosts[1:]:
        worker_on(host, keys, "--slots", "4")

    def one(n: int) -> tuple[int, bool, bytes]:
        payload = os.urandom(100_000 + n)
        done = run_exec(keys.client, [BROADCAST], "--timeout", "30", "--", "cat",
                        input=payload, wrap=hosts[0].argv, timeout=90)
        return done.returncode, hashlib.sha256(done.stdout).digest() == hashlib.sha256(
            payload).digest(), done.stderr[-300:]

    t0 = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(one, range(16)))
    assert all(code == 0 and same for code, same, _ in results), results
    counters = [host.impair_counters() for host in hosts]
    frames, lost = sum(c["frames"] for c in counters), sum(c["lost"] for c in counters)
    print(f"16 jobs of 100 kB in {time.monotonic() - t0:.1f} s; "
          f"{lost} of {frames} frames dropped ({100 * lost / frames:.1f}%)")
    assert lost >= 20 and 0.05 < lost / frames < 0.15  # the impairment was real


def nft_dropped(host: Host) -> int:
    rules = host.run(["nft", "list", "table", "inet", "rexfault"]).stdout
    return sum(int(m) for m in re.findall(r"counter packets (\d+)", rules))


def test_lost_announcements_are_resent_and_make_one_job(bed: NetBed, keys: Keys) -> None:
    """The client's first three announcements are dropped on its way out: the resends
    (50, 100, 200 ms apart) find the worker, and the job runs once."""
    lan = bed.add_subnet("lan")
    client, host = (bed.add_host(name, [lan]) for name in ("client", "w1"))
    worker = worker_on(host, keys)
    rules = ("add table inet rexfault\n"
             "add chain inet rexfault out { type filter hook output priority 0 ; }\n"
             "add rule inet rexfault out udp dport 3010 numgen inc mod 1000 < 3 counter drop\n")
    assert client.run(["nft", "-f", "-"], input=rules).returncode == 0
    t0 = time.monotonic()
    done = job(client, keys, "echo once")
    assert done.returncode == 0 and done.stdout == b"once\n", done.stderr
    assert time.monotonic() - t0 >= 0.35  # it did wait for the fourth announcement
    assert nft_dropped(client) == 3
    assert len(worker.wait_count("started for", 1)) == 1


def job_processes(worker: int) -> list[psutil.Process]:
    """The worker's descendants but its sandbox helper (a worker started as root has one;
    the inits of its jobs count), the spares waiting for a job and their fork server."""
    found = []
    for p in psutil.Process(worker).children(recursive=True):
        try:
            if ((p.ppid() == worker and "rexnet.worker.sandboxd" in " ".join(p.cmdline()))
                    or p.name() in (SPARE_NAME, SERVER_NAME)):
                continue
        except psutil.Error:
            continue  # gone meanwhile
        found.append(p)
    return found


def test_a_client_killed_leaves_no_process_of_its_job(bed: NetBed, keys: Keys) -> None:
    lan = bed.add_subnet("lan")
    client, host = (bed.add_host(name, [lan]) for name in ("client", "w1"))
    worker = worker_on(host, keys)
    running = client.popen(
        exec_argv(keys.client, [BROADCAST], "--", "sleep 60 & sleep 61 & (sleep 62; :) & "
                  "echo up; wait"), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert running.stdout is not None and running.stdout.readline() == b"up\n"
    tree = job_processes(worker.pid)
    assert len(tree) >= 4  # the shell and its three sleepers (one in a subshell)
    running.send_signal(signal.SIGKILL)
    running.wait()
    worker.wait_for(r"client of job \w+ went away")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and job_processes(worker.pid):
        time.sleep(0.1)
    assert job_processes(worker.pid) == []
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in tree)


def test_a_worker_restarted_during_a_burst_sends_the_next_jobs_elsewhere(
        bed: NetBed, keys: Keys) -> None:
    lan = bed.add_subnet("lan")
    client, h1, h2 = (bed.add_host(name, [lan]) for name in ("client", "w1", "w2"))
    w1 = worker_on(h1, keys, "--slots", "2")
    w2 = worker_on(h2, keys, "--slots", "2")  # 4 jobs for 4 slots: 2 land on each
    burst = [client.popen(exec_argv(keys.client, [BROADCAST], "--", "echo $REXNET_WORKER; "
                                    "sleep 2; echo done"),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(4)]
    w1.wait_for(r"job \w+ started")
    w1.stop()  # SIGTERM: its jobs end, their clients are told
    placed = Counter(job(client, keys, "echo $REXNET_WORKER").stdout for _ in range(3))
    assert placed == Counter({b"w2\n": 3})  # while w1 is down, jobs go to w2
    w1 = worker_on(h1, keys, "--slots", "2")
    outcomes = []
    for proc in burst:
        out, err = proc.communicate(timeout=30)
        outcomes.append((proc.returncode, out, err))
    lost = [o for o in outcomes if o[0] == exitcodes.WORKER_LOST]
    # (its EXIT may reach the client after its ERROR: "lost worker: worker w1 is stopping")
    assert lost and all(re.search(rb"lost worker:? (worker )?w1", o[2]) and o[1] in (b"", b"w1\n")
                        for o in lost)
    assert all(o[0] == 0 and o[1] == b"w2\ndone\n" for o in outcomes if o not in lost), outcomes
    after = Counter(job(client, keys, "echo $REXNET_WORKER").stdout for _ in range(4))
    assert sum(after.values()) == 4 and set(after) <= {b"w1\n", b"w2\n"}  # all ran
    # no job ran twice: each burst job started exactly once, on one worker
    expected = 3 + len(outcomes) - len(lost) + after[b"w2\n"]
    assert len(w2.wait_count("started for", expected)) == expected


def test_crat_down_changes_nothing_for_jobs(bed: NetBed, keys: Keys, tmp_path: Path) -> None:
    lan = bed.add_subnet("lan")
    client, host, logs = (bed.add_host(name, [lan]) for name in ("client", "w1", "logs"))
    alerts = f"{logs.addr()}:3011"
    worker_on(host, keys, "--alerts", alerts)
    crat = start_crat(f"{logs.addr()}:3011", tmp_path / "a.jsonl", keys.ca_pem, popen=logs.popen)

    def timed_jobs() -> list[float]:
        times = []
        for _ in range(4):
            t0 = time.monotonic()
            done = job(client, keys, "echo ok", "--alerts", alerts)
            assert done.returncode == 0 and done.stdout == b"ok\n", done.stderr
            times.append(time.monotonic() - t0)
        return sorted(times)

    with_crat = timed_jobs()
    crat.wait_for(r"job-finished")
    crat.stop(signal.SIGKILL)
    without_port = timed_jobs()  # the port is closed: ICMP errors come back
    logs.run(["ip", "link", "set", logs.iface(), "down"])
    without_host = timed_jobs()  # the host is gone: datagrams vanish
    median = with_crat[len(with_crat) // 2]
    for times in (without_port, without_host):
        assert times[len(times) // 2] < median + 0.5, (with_crat, without_port, without_host)

