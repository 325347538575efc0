"""The attacks of issue P10 on relays, performed for real (namespace bed, loopback): each
fails against the old code and is now refused with a logged complaint, while real jobs
still cross.  Items 3 (forged trailers at the worker), 4 (cproxy checks nothing),
7 (silent connections to link listeners), 8 (tunnels carry junk and foreign trailers)
and 14 (revocation on registration and tunnel links)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cluster import REXNET, TWISTD, Proc, loopback_address, run_exec, start_worker
from conftest import Keys
from netbed import Host, NetBed
from test_cproxy import cproxy_on, job, worker_on
from test_tunnel import ring

from rexnet.net import datalink

# Runs in an attacker's namespace: argv = client credential, what to send, target, addrs.
ATTACK = r"""
import os, socket, sys, time
from pathlib import Path
from rexnet.net.announce import now_ms
from rexnet.protocol import wire
from rexnet.security.credentials import load_credential
client = load_credential(Path(sys.argv[1]), "client")
what, host, port, signed_for = sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
def announcement(port=40000):
    ann = wire.Announce(os.urandom(16), 0, now_ms(), port, (signed_for,))
    return wire.encode_datagram(ann, client.app_id, client.key, client.cert_der)
def send(data):
    s.sendto(data, (host, port))
if what == "cproxy":
    good = announcement()
    for _ in range(200):  # unsigned, random application ids
        send(b"RXN\x01\x01" + os.urandom(300))
    time.sleep(0.5)  # (let the receive buffer drain: each of the next must arrive)
    forged = bytearray(announcement())
    forged[-1] ^= 1
    send(bytes(forged))  # a broken signature
    time.sleep(1.1)  # (complaints: one line a second per source)
    send(good)  # captured, replayed from the attacker's own address
    time.sleep(1.1)
    for i in range(1100):  # junk with our application id
        send(good[:21] + os.urandom(200))
        if i % 100 == 0:
            time.sleep(0.01)
elif what == "trailer":  # a captured announcement with a forged relay trailer
    send(wire.with_relay(wire.decode_datagram(announcement(port=1)), int(sys.argv[6])))
elif what == "tunnel":
    good = announcement()
    send(wire.with_relay(wire.decode_datagram(good), 22))  # a foreign trailer
    time.sleep(0.2)
    for i in range(1000):  # then junk with our application id, as fast as it goes
        send(good[:21] + os.urandom(200))
        if i % 100 == 0:
            time.sleep(0.01)
print("sent", flush=True)
"""

# Counts what reaches a site: junk, announcements and the trailers they carry.
SPY = r"""
import socket
from rexnet.protocol import wire
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 3010))
print("spying", flush=True)
while True:
    data, _ = s.recvfrom(65536)
    try:
        dgram = wire.decode_datagram(data)
    except wire.WireError:
        print("junk", flush=True)
        continue
    print("datagram", type(dgram.message).__name__, dgram.relay_port, flush=True)
"""


@pytest.fixture(scope="module")
def relay_key(keys: Keys, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("relay") / f"{keys.app}.gw.relay"
    subprocess.run([REXNET, "keygen", "--issue", "relay", "--name", "gw", "--out", str(out),
                    str(keys.ca)], check=True, capture_output=True)
    return out


def attack(host: Host, keys: Keys, what: str, target: str, port: int, signed_for: str,
           *extra: str) -> None:
    done = host.run([sys.executable, "-c", ATTACK, str(keys.client), what, target, str(port),
                     signed_for, *extra], timeout=60)
    assert done.stdout.strip() == "sent", done.stderr


def test_cproxy_relays_nothing_it_cannot_verify(bed: NetBed, keys: Keys, relay_key: Path
                                                ) -> None:
    a, b = bed.add_subnet("a"), bed.add_subnet("b")
    client, mallory = bed.add_host("client", [a]), bed.add_host("mallory", [a])
    proxy = bed.add_host("proxy", [a, b])
    far = bed.add_host("far", [b])
    relay = cproxy_on(proxy, relay_key, f"{b.broadcast}:3010")
    worker_on(far, keys)
    attack(mallory, keys, "cproxy", proxy.addr(a), 3010, client.addr())
    relay.wait_for(rf"complaint: cproxy refused a datagram from {mallory.addr()}: bad "
                   "signature on announce")
    relay.wait_for(rf"from {mallory.addr()}: sent from {mallory.addr()}, which the client "
                   "did not sign")
    assert "relaying job" not in relay.output  # no port opened for any of it
    # ... and a real job, right after the flood, crosses
    done = job(client, keys, f"{a.broadcast}:3010", "cat; echo $REXNET_WORKER", b"real\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"real\nfar\n"
    relay.wait_for(rf"relaying job \w+ from {client.addr()}:\d+ on port")
    ports = proxy.run(["ss", "-Hltn"]).stdout
    assert f"{proxy.addr(b)}:" in ports and "0.0.0.0:" not in ports.replace(
        "0.0.0.0:*", "")  # the job's port listens on the far network's address only


def test_a_worker_never_connects_where_a_forged_trailer_says(keys: Keys) -> None:
    bait = socket.create_server(("127.0.0.1", 0))
    bait.settimeout(3)
    addr = loopback_address()
    worker = start_worker(keys.worker, ["echo", "ran"], f"{addr}:3010", "w")
    try:
        done = subprocess.run(
            [sys.executable, "-c", ATTACK, str(keys.client), "trailer", addr, "3010",
             "127.0.0.9", str(bait.getsockname()[1])], capture_output=True, text=True,
            timeout=60)
        assert done.stdout.strip() == "sent", done.stderr
        worker.wait_for(r"complaint: announcement refused: unsigned relay trailer from "
                        r"127\.0\.0\.1, which is not a configured relay")
        with pytest.raises(TimeoutError):
            bait.accept()  # the worker never came
        assert run_exec(keys.client, [f"{addr}:3010"], "--no-agent").stdout == b"ran\n"
    finally:
        worker.stop()
        bait.close()


HOLD = r"""
import socket, sys, time
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
socks = []
for _ in range(n):
    try:  # (a connection refused at once may be reset before connect returns)
        socks.append(socket.create_connection((host, port), timeout=10))
    except OSError:
        pass
def still_open():
    count = 0
    for s in socks:
        s.setblocking(False)
        try:
            if s.recv(1):
                count += 1
        except BlockingIOError:
            count += 1
        except OSError:
            pass
    return count
time.sleep(1.5)
print("after 1.5 s", still_open(), flush=True)
time.sleep(float(sys.argv[4]))
print("later", still_open(), flush=True)
"""


@pytest.mark.parametrize("listener", ["cproxy", "tunnel"])
def test_silent_connections_to_link_listeners_are_capped_and_dropped(
        bed: NetBed, keys: Keys, relay_key: Path, listener: str) -> None:
    a = bed.add_subnet("a")
    server, mallory, w = (bed.add_host(n, [a]) for n in ("server", "mallory", "w"))
    if listener == "cproxy":
        argv = [TWISTD, "-n", "--pidfile=", "cproxy", "--register", "0.0.0.0:5010",
                "--credential", str(relay_key)]
        ready = "cproxy listening on"
    else:
        argv = [TWISTD, "-n", "--pidfile=", "rexnet-tunnel", "--credential", str(relay_key),
                "--listen", "0.0.0.0:5010", "--group", "255.255.255.255:3010"]
        ready = "tunnel for"
    proc = Proc(argv, popen=server.popen)
    proc.wait_for(ready)
    held = mallory.run([sys.executable, "-c", HOLD, server.addr(), "5010", "300",
                        str(datalink.HANDSHAKE_TIMEOUT)], timeout=60)
    counts = [int(line.split()[-1]) for line in held.stdout.splitlines()]
    assert len(counts) == 2, held.stdout + held.stderr
    assert counts[0] <= datalink.PER_SOURCE, held.stdout + held.stderr
    assert counts[1] == 0, held.stdout  # the silent ones are dropped after the timeout
    proc.wait_for(rf"complaint: link connection from {mallory.addr()} refused")
    proc.wait_for(rf"complaint: link peer {mallory.addr()}:\d+ did not complete its TLS "
                  "handshake")
    # a genuine peer still links up
    if listener == "cproxy":
        worker = worker_on(w, keys, "--register", f"{server.addr()}:5010")
    else:
        worker = Proc([TWISTD, "-n", "--pidfile=", "rexnet-tunnel", "--credential",
                       str(keys.worker), "--connect", f"{server.addr()}:5010", "--group",
                       "255.255.255.255:3010"], popen=w.popen)
    worker.wait_for("link up with", timeout=20)


def test_a_tunnel_carries_only_verified_datagrams_and_replaces_trailers(
        bed: NetBed, keys: Keys) -> None:
    sites = ring(bed)
    t1, t2 = sites["s1"]["t"], sites["s2"]["t"]
    near = Proc([TWISTD, "-n", "--pidfile=", "rexnet-tunnel", "--credential", str(keys.worker),
                 "--listen", "0.0.0.0:4010", "--group", "255.255.255.255:3010"],
                popen=t1.popen)
    near.wait_for("tunnel for")
    far = Proc([TWISTD, "-n", "--pidfile=", "rexnet-tunnel", "--credential", str(keys.worker),
                "--connect", f"{t1.addr()}:4010", "--group", "255.255.255.255:3010"],
               popen=t2.popen)
    far.wait_for("link up with", timeout=20)
    spy = Proc([sys.executable, "-c", SPY], popen=sites["s2"]["spy"].popen)
    spy.wait_for("spying")
    mallory = sites["s1"]["spy"]
    attack(mallory, keys, "tunnel", "255.255.255.255", 3010, sites["s1"]["c"].addr())
    near.wait_for(rf"complaint: tunnel refused a datagram from {mallory.addr()}")
    spy.wait_for("datagram Announce 0")  # the genuine one, its trailer replaced
    time.sleep(1)
    assert "junk" not in spy.output and "Announce 22" not in spy.output
    start_worker(keys.worker, ["cat"], "0.0.0.0:3010", "w2", popen=sites["s2"]["w"].popen)
    done = run_exec(keys.client, ["255.255.255.255:3010"], "--timeout", "20",
                    input=b"across\n", wrap=sites["s1"]["c"].argv)
    assert done.returncode == 0 and done.stdout == b"across\n", done.stderr


def test_revoked_credentials_are_refused_on_registration_and_tunnel_links(
        bed: NetBed, keys: Keys, tmp_path: Path, relay_key: Path) -> None:
    a = bed.add_subnet("a")
    proxy, w, t, other = (bed.add_host(n, [a]) for n in ("proxy", "w", "t", "other"))
    revoked = tmp_path / "listed.revoked"
    done = subprocess.run([REXNET, "keygen", "--revoke", str(relay_key), str(keys.ca)],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    revoked.write_bytes(keys.ca.with_name(f"{keys.app}.revoked").read_bytes())
    keys.ca.with_name(f"{keys.app}.revoked").unlink()  # keep the shared keys clean
    relay = Proc([TWISTD, "-n", "--pidfile=", "cproxy", "--register", "0.0.0.0:5010",
                  "--credential", str(relay_key)], popen=proxy.popen)
    relay.wait_for("cproxy listening on")
    worker = worker_on(w, keys, "--register", f"{proxy.addr()}:5010", "--revoked",
                       str(revoked))
    worker.wait_for(r"complaint: link peer \S+ refused: relay certificate 'gw' \(serial "
                    r"\w+\) is revoked", timeout=20)
    assert "link up with" not in worker.output
    tunnel = Proc([TWISTD, "-n", "--pidfile=", "rexnet-tunnel", "--credential",
                   str(keys.worker), "--listen", "0.0.0.0:4010", "--group",
                   "255.255.255.255:3010", "--revoked", str(revoked)], popen=t.popen)
    tunnel.wait_for("tunnel for")
    peer = Proc([TWISTD, "-n", "--pidfile=", "rexnet-tunnel", "--credential", str(relay_key),
                 "--connect", f"{t.addr()}:4010", "--group", "255.255.255.255:3010"],
                popen=other.popen)
    try:
        tunnel.wait_for(r"complaint: link peer \S+ refused: relay certificate 'gw' .* is "
                        "revoked", timeout=20)
    except AssertionError:
        raise AssertionError(peer.output) from None
    assert "link up with" not in tunnel.output
    peer.stop()
