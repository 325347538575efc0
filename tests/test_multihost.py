"""Several hosts as network namespaces on a bridge: broadcast, load-based choice, failures."""

from __future__ import annotations

import collections
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

from cluster import Proc, exec_argv, host_pid, run_exec, sleep_marker, start_worker
from conftest import Keys
from netbed import Host, NetBed

from rexnet.protocol import exitcodes

SHELL = ["sh", "-c"]
BROADCAST = "255.255.255.255:3010"


def worker_on(host: Host, keys: Keys, *options: str) -> Proc:
    return start_worker(keys.worker, SHELL, "0.0.0.0:3010", host.name, "--allow-args",
                        *options, popen=host.popen)


def job(host: Host, keys: Keys, script: str, *options: str, announce: str = BROADCAST
        ) -> subprocess.CompletedProcess[bytes]:
    return run_exec(keys.client, [announce], *options, "--", script, wrap=host.argv)


def lan(bed: NetBed, *names: str) -> list[Host]:
    subnet = bed.add_subnet("lan")
    return [bed.add_host(name, [subnet]) for name in names]


def test_broadcast_reaches_workers_on_the_subnet(bed: NetBed, keys: Keys) -> None:
    client, w1, w2 = lan(bed, "client", "w1", "w2")
    worker_on(w1, keys)
    worker_on(w2, keys)
    subnet_broadcast = f"{bed.subnets['lan'].broadcast}:3010"
    for target in (BROADCAST, subnet_broadcast):
        done = job(client, keys, "cat; echo \" on $REXNET_WORKER\"", "-v", announce=target)
        assert done.returncode == 0, done.stderr
        worker = done.stdout.decode().split(" on ")[-1].strip()
        assert worker in ("w1", "w2")
        assert f"runs on worker {worker} (".encode() in done.stderr


def test_a_worker_with_no_free_slot_never_gets_the_job(bed: NetBed, keys: Keys) -> None:
    client, full, free = lan(bed, "client", "full", "free")
    busy_worker = worker_on(full, keys, "--slots", "1")
    worker_on(free, keys, "--slots", "2")
    # fill the only slot of "full" by announcing to it alone
    blocker = client.popen(exec_argv(keys.client, [f"{full.addr()}:3010"], "--", "sleep 60"),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    busy_worker.wait_for(r"job \w+ started")
    placed = [job(client, keys, "echo $REXNET_WORKER").stdout.strip() for _ in range(6)]
    assert placed == [b"free"] * 6
    blocker.kill()


def test_a_burst_of_concurrent_jobs_uses_both_idle_workers(bed: NetBed, keys: Keys) -> None:
    client, w1, w2 = lan(bed, "client", "w1", "w2")
    worker_on(w1, keys, "--slots", "4")
    worker_on(w2, keys, "--slots", "4")
    with ThreadPoolExecutor(8) as pool:
        done = list(pool.map(lambda _: job(client, keys, "sleep 1; echo $REXNET_WORKER"),
                             range(8)))
    assert all(d.returncode == 0 for d in done), [d.stderr for d in done]
    counts = collections.Counter(d.stdout.strip() for d in done)
    assert set(counts) == {b"w1", b"w2"}, counts


def test_the_faster_worker_wins_at_equal_load(bed: NetBed, keys: Keys) -> None:
    client, slow, fast = lan(bed, "client", "slow", "fast")
    worker_on(slow, keys, "--speed", "1")
    worker_on(fast, keys, "--speed", "4")
    placed = collections.Counter(job(client, keys, "echo $REXNET_WORKER").stdout.strip()
                                 for _ in range(10))
    # the delays differ by milliseconds (5 ms vs 1.25 ms when idle): allow one stray
    assert placed[b"fast"] >= 9, placed


def test_the_less_loaded_worker_wins(bed: NetBed, keys: Keys) -> None:
    client, loaded, idle = lan(bed, "client", "loaded", "idle")
    loaded_worker = worker_on(loaded, keys, "--slots", "2")
    worker_on(idle, keys, "--slots", "2")
    blocker = client.popen(exec_argv(keys.client, [f"{loaded.addr()}:3010"], "--", "sleep 60"),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    loaded_worker.wait_for(r"job \w+ started")
    placed = collections.Counter(job(client, keys, "echo $REXNET_WORKER").stdout.strip()
                                 for _ in range(6))
    assert placed[b"idle"] >= 4, placed
    blocker.kill()


def test_worker_killed_mid_job_gives_worker_lost(bed: NetBed, keys: Keys) -> None:
    client, host = lan(bed, "client", "w1")
    worker = worker_on(host, keys)
    running = client.popen(exec_argv(keys.client, [BROADCAST], "--", "echo started; sleep 60"),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert running.stdout is not None and running.stderr is not None
    assert running.stdout.readline() == b"started\n"
    worker.stop(signal.SIGKILL)
    t0 = time.monotonic()
    status = running.wait(10)
    assert status == exitcodes.WORKER_LOST
    assert time.monotonic() - t0 < 5
    assert b"lost worker w1 before the job finished" in running.stderr.read()


def test_client_killed_mid_job_ends_the_job(bed: NetBed, keys: Keys) -> None:
    client, host = lan(bed, "client", "w1")
    worker = worker_on(host, keys)
    marker = sleep_marker()  # the job's $! is a pid of its sandbox's namespace
    running = client.popen(
        exec_argv(keys.client, [BROADCAST], "--", f"sleep {marker} & echo $!; wait"),
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert running.stdout is not None
    running.stdout.readline()
    grandchild = host_pid(f"sleep {marker}")
    running.kill()
    running.wait()
    worker.wait_for(r"client of job \w+ went away")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and _alive(grandchild):
        time.sleep(0.1)
    assert not _alive(grandchild), "the job's process group outlived its client"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_jobs_from_two_clients_at_once(bed: NetBed, keys: Keys) -> None:
    c1, c2, w1, w2 = lan(bed, "c1", "c2", "w1", "w2")
    worker_on(w1, keys)
    worker_on(w2, keys)
    with ThreadPoolExecutor(4) as pool:
        done = list(pool.map(lambda c: job(c, keys, "cat", "--timeout", "20"),
                             [c1, c2, c1, c2]))
    assert [d.returncode for d in done] == [0, 0, 0, 0], [d.stderr for d in done]


def test_multicast_group_and_the_GROUP_variable(bed: NetBed, keys: Keys) -> None:
    client, host = lan(bed, "client", "w1")
    group = "239.77.1.1"
    worker_on(host, keys, "--join", group)
    done = job(client, keys, "echo $REXNET_WORKER", announce=f"{group}:3010")
    assert done.returncode == 0 and done.stdout == b"w1\n", done.stderr
    # with no --announce, the client announces to $GROUP, as cexec did
    argv = client.argv(["env", f"GROUP={group}", *exec_argv(keys.client, [], "--",
                                                              "echo $REXNET_WORKER")])
    by_env = subprocess.run(argv, capture_output=True, timeout=30)
    assert by_env.returncode == 0 and by_env.stdout == b"w1\n", by_env.stderr


def test_losers_cancel_their_connect_back(bed: NetBed, keys: Keys) -> None:
    client, fast, slow = lan(bed, "client", "fast", "slow")
    worker_on(fast, keys, "--speed", "4")
    slow_worker = worker_on(slow, keys, "--speed", "0.02")  # waits 250 ms or more
    done = job(client, keys, "echo $REXNET_WORKER")
    assert done.stdout == b"fast\n"
    slow_worker.wait_for(r"connect-back for job \w+ cancelled: taken by another worker")
    assert "started" not in slow_worker.output.split("listening on")[1]
