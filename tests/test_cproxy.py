"""cproxy: one cluster across two (or three) networks with no routing between them."""

from __future__ import annotations

import collections
import subprocess
import sys
from pathlib import Path

import pytest
from cluster import REXNET, TWISTD, Proc, exec_argv, run_exec, start_worker
from conftest import Keys
from netbed import Host, NetBed

SHELL = ["sh", "-c"]
LISTEN = ("import socket; s = socket.create_server(('0.0.0.0', 6010)); print('listening', "
          "flush=True); [s.accept() for _ in range(10)]")
CONNECT = ("import socket\ntry:\n socket.create_connection(('{}', 6010), timeout=2)\n "
           "print('connected')\nexcept OSError:\n print('blocked')")


@pytest.fixture(scope="module")
def relay_key(keys: Keys, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A relay credential of the application (what cproxy signs its trailers with)."""
    out = tmp_path_factory.mktemp("relay") / f"{keys.app}.gw.relay"
    subprocess.run([REXNET, "keygen", "--issue", "relay", "--name", "gw", "--out", str(out),
                    str(keys.ca)], check=True, capture_output=True)
    return out


def cproxy_on(host: Host, relay_key: Path | None, *announce: str, trust: Path | None = None,
              options: tuple[str, ...] = ()) -> Proc:
    argv = [TWISTD, "-n", "--pidfile=", "cproxy", "--listen", "0.0.0.0:3010", *options]
    if relay_key is not None:
        argv += ["--credential", str(relay_key)]
    if trust is not None:
        argv += ["--trust", str(trust)]
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


def test_a_job_crosses_cproxy_to_the_least_loaded_worker(bed: NetBed, keys: Keys,
                                                         relay_key: Path) -> None:
    a, b = bed.add_subnet("a"), bed.add_subnet("b")
    client = bed.add_host("client", [a])
    proxy = bed.add_host("proxy", [a, b])  # IP forwarding stays off
    w1, w2 = bed.add_host("w1", [b]), bed.add_host("w2", [b])
    relay = cproxy_on(proxy, relay_key, f"{b.broadcast}:3010")
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


def test_a_chain_of_two_cproxies(bed: NetBed, keys: Keys, relay_key: Path) -> None:
    a, b, c = bed.add_subnet("a"), bed.add_subnet("b"), bed.add_subnet("c")
    client = bed.add_host("client", [a])
    first, second = bed.add_host("p1", [a, b]), bed.add_host("p2", [b, c])
    far = bed.add_host("far", [c])
    cproxy_on(first, relay_key, f"{b.broadcast}:3010")
    cproxy_on(second, relay_key, f"{c.broadcast}:3010")
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


def test_a_worker_behind_nat_serves_through_its_registration(
        bed: NetBed, keys: Keys, tmp_path: Path, relay_key: Path) -> None:
    a, b, c = bed.add_subnet("a"), bed.add_subnet("b"), bed.add_subnet("c")
    client = bed.add_host("client", [a])
    proxy = bed.add_host("proxy", [a, b])
    nat = bed.add_host("nat", [b, c])
    hidden = bed.add_host("hidden", [c])
    nat.set_forwarding(True)
    rules = f"""
table ip rexnet_nat {{
  chain post {{ type nat hook postrouting priority 100; oifname "{nat.iface(b)}" masquerade; }}
  chain guard {{ type filter hook forward priority 0; policy drop;
    ct state established,related accept; iifname "{nat.iface(c)}" accept; }}
}}
"""
    ruleset = tmp_path / "nat.nft"
    ruleset.write_text(rules)
    nat.run(["nft", "-f", str(ruleset)], check=True)
    hidden.run(["ip", "route", "replace", "default", "via", nat.addr(c)], check=True)
    # nothing reaches the hidden host from outside, even with a route to it through the NAT
    proxy.run(["ip", "route", "replace", c.cidr, "via", nat.addr(b)], check=True)
    listener = hidden.popen([sys.executable, "-c", LISTEN], stdout=subprocess.PIPE)
    assert listener.stdout is not None and listener.stdout.readline() == b"listening\n"
    outside = proxy.run([sys.executable, "-c", CONNECT.format(hidden.addr())], timeout=20)
    assert outside.stdout.strip() == "blocked", outside
    inside = nat.run([sys.executable, "-c", CONNECT.format(hidden.addr())], timeout=20)
    assert inside.stdout.strip() == "connected", inside  # the listener does work

    relay = Proc([TWISTD, "-n", "--pidfile=", "cproxy", "--listen", "0.0.0.0:3010",
                  "--register", "0.0.0.0:5010", "--credential", str(relay_key)],
                 popen=proxy.popen)
    relay.wait_for("cproxy listening on")
    worker = start_worker(keys.worker, SHELL, "0.0.0.0:3010", "hidden", "--allow-args",
                          "--register", f"{proxy.addr(b)}:5010", popen=hidden.popen)
    worker.wait_for("link up with", timeout=20)
    done = job(client, keys, f"{a.broadcast}:3010", "cat; echo $REXNET_WORKER", b"over nat\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"over nat\nhidden\n"
    status = client.run([REXNET, "status", "--announce", f"{a.broadcast}:3010", "--json",
                         str(keys.client)], timeout=30)
    assert '"worker": "hidden"' in status.stdout, status.stderr


def test_a_cproxy_restart_keeps_local_jobs_and_recovers(bed: NetBed, keys: Keys,
                                                        relay_key: Path) -> None:
    a, b = bed.add_subnet("a"), bed.add_subnet("b")
    client = bed.add_host("client", [a])
    near = bed.add_host("near", [a])
    proxy = bed.add_host("proxy", [a, b])
    far = bed.add_host("far", [b])
    near_worker = worker_on(near, keys)
    worker_on(far, keys)
    relay = cproxy_on(proxy, relay_key, f"{b.broadcast}:3010")
    # a job on the client's own network does not pass through cproxy
    local = client.popen(exec_argv(keys.client, [f"{near.addr()}:3010"], "--",
                                   "cat; echo $REXNET_WORKER"),
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    relay.stop()
    relay = cproxy_on(proxy, relay_key, f"{b.broadcast}:3010")
    out, _ = local.communicate(b"kept\n", timeout=20)
    assert out == b"kept\nnear\n"
    # and the restarted cproxy carries the next jobs across to the only worker left
    near_worker.stop()
    done = run_exec(keys.client, [f"{far.addr()}:3010"], "--timeout", "2", wrap=client.argv)
    assert done.returncode == 254  # far is not reachable directly ...
    for _ in range(3):  # ... but through the new cproxy it is
        crossing = job(client, keys, f"{a.broadcast}:3010", "echo $REXNET_WORKER")
        assert crossing.stdout == b"far\n", crossing.stderr
    assert "relaying job" in relay.output
