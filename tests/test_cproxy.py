"""cproxy: one cluster across two (or three) networks with no routing between them."""

from __future__ import annotations

import collections
import subprocess

from cluster import REXNET, TWISTD, Proc, exec_argv, run_exec, start_worker
from conftest import Keys
from netbed import Host, NetBed

SHELL = ["sh", "-c"]


def cproxy_on(host: Host, *announce: str) -> Proc:
    argv = [TWISTD, "-n", "--pidfile=", "cproxy", "--listen", "0.0.0.0:3010"]
    for target in announce:
        argv += ["--announce", target]
    proc = Proc(argv, popen=host.popen)
    proc.wait_for("cproxy listening on")
    return proc


def worker_on(host: Host, keys: Keys, *options: str) -> Proc:
    return start_worker(keys.worker, SHELL, "0.0.0.0:3010", host.name, "--allow-args",
                        *options, popen=host.popen)


def job(client: Host, keys: Keys, target: str, script: str, input: bytes = b""
        ) -> subprocess.CompletedProcess[bytes]:
    return run_exec(keys.client, [target], "--", script, input=input, wrap=client.argv)


def test_a_job_crosses_cproxy_to_the_least_loaded_worker(bed: NetBed, keys: Keys) -> None:
    a, b = bed.add_subnet("a"), bed.add_subnet("b")
    client = bed.add_host("client", [a])
    proxy = bed.add_host("proxy", [a, b])  # IP forwarding stays off
    w1, w2 = bed.add_host("w1", [b]), bed.add_host("w2", [b])
    relay = cproxy_on(proxy, f"{b.broadcast}:3010")
    workers = {"w1": worker_on(w1, keys, "--slots", "2"),
               "w2": worker_on(w2, keys, "--slots", "2")}
    target = f"{a.broadcast}:3010"

    data = bytes(range(256)) * 2000
    done = job(client, keys, target, "cat; echo; echo $REXNET_WORKER; exit 3", data)
    assert done.returncode == 3, done.stderr
    assert done.stdout.startswith(data)
    assert done.stdout.split(b"\n")[-2] in (b"w1", b"w2")
    assert "relaying job" in relay.output

    # occupy one slot of whichever worker takes a long job, then place four more
    blocker = client.popen(exec_argv(keys.client, [target], "--", "echo $REXNET_WORKER; "
                                     "sleep 60"), stdout=subprocess.PIPE,
                           stderr=subprocess.DEVNULL)
    assert blocker.stdout is not None
    loaded = blocker.stdout.readline().strip().decode()
    other = "w2" if loaded == "w1" else "w1"
    workers[loaded].wait_for(r"job \w+ started")
    placed = collections.Counter(job(client, keys, target, "echo $REXNET_WORKER").stdout
                                 .strip().decode() for _ in range(4))
    blocker.kill()
    assert placed[other] >= 3, placed


def test_a_chain_of_two_cproxies(bed: NetBed, keys: Keys) -> None:
    a, b, c = bed.add_subnet("a"), bed.add_subnet("b"), bed.add_subnet("c")
    client = bed.add_host("client", [a])
    first, second = bed.add_host("p1", [a, b]), bed.add_host("p2", [b, c])
    far = bed.add_host("far", [c])
    cproxy_on(first, f"{b.broadcast}:3010")
    cproxy_on(second, f"{c.broadcast}:3010")
    worker_on(far, keys)
    done = job(client, keys, f"{a.broadcast}:3010", "cat; echo $REXNET_WORKER", b"hello\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"hello\nfar\n"
    status = client.run([REXNET, "status", "--announce", f"{a.broadcast}:3010", "--json",
                         str(keys.client)], timeout=30)
    assert '"worker": "far"' in status.stdout, status.stderr


def test_workers_never_reach_the_client_directly(bed: NetBed, keys: Keys) -> None:
    a, b = bed.add_subnet("a"), bed.add_subnet("b")
    client = bed.add_host("client", [a])
    bed.add_host("proxy", [a, b])
    far = bed.add_host("far", [b])
    worker_on(far, keys)
    # without cproxy running, no announcement crosses: the job finds no worker
    done = run_exec(keys.client, [f"{a.broadcast}:3010"], "--timeout", "1", wrap=client.argv)
    assert done.returncode == 254
