"""rexnet-tunnel: three sites in a ring; every datagram reaches each site once."""

from __future__ import annotations

import collections
import signal
import sys
import time

from cluster import REXNET, TWISTD, Proc, run_exec, start_worker
from conftest import Keys
from netbed import Host, NetBed

SPY = r"""
import socket, sys
sys.path[:0] = [p for p in sys.argv[1:]]
from rexnet.protocol import wire
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 3010))
print("spying", flush=True)
while True:
    data, _ = s.recvfrom(65536)
    try:
        m = wire.decode_datagram(data).message
    except wire.WireError:
        continue
    if isinstance(m, wire.Announce):
        print("announce", m.job_id.hex(), m.seq, flush=True)
"""


def tunnel_on(host: Host, keys: Keys, *links: str) -> Proc:
    argv = [TWISTD, "-n", "--pidfile=", "rexnet-tunnel", "--credential", str(keys.worker),
            "--listen", "0.0.0.0:4010", "--group", "255.255.255.255:3010"]
    for peer in links:
        argv += ["--connect", f"{peer}:4010"]
    proc = Proc(argv, popen=host.popen)
    proc.wait_for("tunnel for")
    return proc


def ring(bed: NetBed) -> dict[str, dict[str, Host]]:
    """Three sites routed to each other by one router; broadcasts stay in each site."""
    subnets = [bed.add_subnet(f"s{i}") for i in (1, 2, 3)]
    router = bed.add_host("router", subnets)
    router.set_forwarding(True)
    sites: dict[str, dict[str, Host]] = {}
    for i, subnet in enumerate(subnets, 1):
        hosts = {role: bed.add_host(f"{role}{i}", [subnet]) for role in ("t", "w", "spy", "c")}
        for host in hosts.values():
            host.run(["ip", "route", "replace", "default", "via", router.addr(subnet)],
                     check=True)
        sites[f"s{i}"] = hosts
    return sites


def test_ring_of_three_tunnels(bed: NetBed, keys: Keys) -> None:
    sites = ring(bed)
    t = {name: hosts["t"] for name, hosts in sites.items()}
    tunnels = [tunnel_on(t["s1"], keys, t["s2"].addr()),
               tunnel_on(t["s2"], keys, t["s3"].addr()),
               tunnel_on(t["s3"], keys, t["s1"].addr())]
    for tunnel in tunnels:
        tunnel.wait_for("link up with", timeout=20)
    spies = {name: Proc([sys.executable, "-c", SPY, *sys.path], popen=hosts["spy"].popen)
             for name, hosts in sites.items()}
    for spy in spies.values():
        spy.wait_for("spying")
    # workers only at the two far sites: jobs must cross
    for name in ("s2", "s3"):
        start_worker(keys.worker, ["sh", "-c"], "0.0.0.0:3010", f"w-{name}", "--allow-args",
                     popen=sites[name]["w"].popen)
    client = sites["s1"]["c"]
    seen_workers = set()
    for _ in range(4):
        done = run_exec(keys.client, ["255.255.255.255:3010"], "--timeout", "20", "--",
                        "cat; echo $REXNET_WORKER", input=b"x\n", wrap=client.argv)
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith(b"x\n")
        seen_workers.add(done.stdout.split(b"\n")[1])
    assert seen_workers <= {b"w-s2", b"w-s3"} and seen_workers
    time.sleep(1)
    for name, spy in spies.items():
        spy.stop(signal.SIGKILL)
        lines = [line for line in spy.output.splitlines() if line.startswith("announce")]
        counts = collections.Counter(lines)
        assert lines, f"site {name} heard no announcement"
        assert max(counts.values()) == 1, f"site {name} heard duplicates: {counts}"
    # every site heard the same announcements
    heard = [set(s.output.splitlines()) - {"spying"} for s in spies.values()]
    assert heard[0] == heard[1] == heard[2]


def test_a_tunnel_restart_recovers(bed: NetBed, keys: Keys) -> None:
    sites = ring(bed)
    t1, t2 = sites["s1"]["t"], sites["s2"]["t"]
    tunnel_on(t1, keys)
    far = tunnel_on(t2, keys, t1.addr())
    far.wait_for("link up with", timeout=20)
    start_worker(keys.worker, ["cat"], "0.0.0.0:3010", "w2", popen=sites["s2"]["w"].popen)
    client = sites["s1"]["c"]
    # a long job keeps running across the tunnel's restart: it does not pass through it
    running = client.popen(
        [REXNET, "exec", "--announce",
         "255.255.255.255:3010", str(keys.client)], stdin=-1, stdout=-1)
    time.sleep(2)
    far.stop()
    again = tunnel_on(t2, keys, t1.addr())
    again.wait_for("link up with", timeout=20)
    out, _ = running.communicate(b"still here\n", timeout=20)
    assert out == b"still here\n"
    done = run_exec(keys.client, ["255.255.255.255:3010"], "--timeout", "20", input=b"next\n",
                    wrap=client.argv)
    assert done.returncode == 0 and done.stdout == b"next\n", done.stderr
