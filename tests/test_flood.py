"""A flood at a worker while real jobs run (issue P6, point 3), in the namespace test bed.

Three attacker hosts send 10,000 datagrams a second together for 10 seconds (override
with REXNET_FLOOD_RATE / REXNET_FLOOD_SECONDS): garbage, oversized datagrams, datagrams
with our application id and junk bodies, announcements with forged signatures, and
copies of one real announcement (replays).  Meanwhile a client runs real jobs, each
checked byte for byte.  The worker's CPU and memory are measured with psutil and
printed (see SECURITY.md for a run's figures); its own counters (logged when it stops)
show the per-source rate limits held.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
from cluster import run_exec, start_worker
from conftest import Keys
from netbed import NetBed
from twisted.internet.task import Clock

from rexnet.net.announce import BURST, RATE, now_ms
from rexnet.protocol import wire
from rexnet.security.credentials import load_credential
from rexnet.worker.load import HostLoad
from rexnet.worker.service import (
    COMPLAINT_RATE,
    GLOBAL_BURST,
    GLOBAL_RATE,
    Complaints,
    Worker,
    WorkerSettings,
)

RATE_TOTAL = float(os.environ.get("REXNET_FLOOD_RATE", "10000"))
SECONDS = float(os.environ.get("REXNET_FLOOD_SECONDS", "10"))
ATTACKERS = 3

SENDER = r"""
import pickle, socket, sys, time
payloads = pickle.load(open(sys.argv[1], "rb"))
target, rate, seconds = (sys.argv[2], int(sys.argv[3])), float(sys.argv[4]), float(sys.argv[5])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sent, t0 = 0, time.monotonic()
while (elapsed := time.monotonic() - t0) < seconds:
    while sent < int(elapsed * rate) + 1:
        try:
            s.sendto(payloads[sent % len(payloads)], target)
        except OSError:
            pass
        sent += 1
    time.sleep(0.001)
print(sent, flush=True)
"""


def flood_payloads(keys: Keys, attacker_addr: str) -> list[bytes]:
    """What an attacker on the LAN can send: it has seen real traffic, holds no key."""
    client = load_credential(keys.client, "client")
    forger = load_credential(keys.worker, "worker")  # any Ed25519 key that is not the client's
    real = wire.encode_datagram(
        wire.Announce(os.urandom(16), 0, now_ms(), 9, (attacker_addr,)),
        client.app_id, client.key, client.cert_der)
    out = [real] * 50  # replays of one announcement the attacker captured
    for n in range(200):
        ann = wire.Announce(os.urandom(16), 0, now_ms(), 9, (attacker_addr,))
        out.append(wire.encode_datagram(ann, client.app_id, forger.key, client.cert_der))
        out.append(os.urandom(n % 200 + 1))
        out.append(b"RXN\x01" + client.app_id + os.urandom(n % 300 + 10))
        if n % 10 == 0:
            out.append(os.urandom(8000))
    return out


def test_the_global_limit_caps_checks_from_many_sources(keys: Keys) -> None:
    """Per-source limits do not help against many sources: a global bucket caps the
    datagrams a worker checks (signatures, certificates) whatever the sources."""
    clock = Clock()
    worker = Worker(WorkerSettings(load_credential(keys.worker, "worker"), ("true",), "w", 2),
                    clock, sample=lambda: HostLoad(0.0, 1, 1 << 30))
    for n in range(20_000):  # 20,000 sources, once each, all within one second
        worker.datagram(b"garbage", f"10.0.{n >> 8}.{n & 255}", 1)
        clock.advance(1 / 20_000)
    checked = worker.received - worker.rate_limited
    assert worker.received == 20_000
    assert checked == worker.complain.count  # each checked one was refused with a complaint
    assert GLOBAL_BURST <= checked <= GLOBAL_BURST + GLOBAL_RATE * 1.0 + 1


def test_complaints_from_many_sources_are_capped_as_a_whole() -> None:
    """One complaint line (and alert) per source per second is not enough against many
    sources: all sources together get COMPLAINT_RATE lines a second, and nothing is
    forgotten (each line says how many were suppressed for its source)."""
    clock = Clock()
    sent: list[dict[str, object]] = []
    complain = Complaints(clock.seconds, lambda event, **fields: sent.append(fields))
    for n in range(10_000):  # 10,000 sources in one second
        complain(f"10.1.{n >> 8}.{n & 255}", "bad")
        clock.advance(1 / 10_000)
    assert complain.count == 10_000
    assert COMPLAINT_RATE <= complain.logged == len(sent) <= 3 * COMPLAINT_RATE + 1


def test_real_jobs_complete_during_a_flood(bed: NetBed, keys: Keys, tmp_path: Path) -> None:
    lan = bed.add_subnet("lan")
    client = bed.add_host("client", [lan])
    target = bed.add_host("w1", [lan])
    attackers = [bed.add_host(f"evil{n}", [lan]) for n in range(ATTACKERS)]
    worker = start_worker(keys.worker, ["sh", "-c"], "0.0.0.0:3010", "w1", "--allow-args",
                          "--slots", "2", popen=target.popen)
    me = psutil.Process(worker.pid)
    rss_before = me.memory_info().rss
    peak = {"rss": rss_before}
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.2):
            peak["rss"] = max(peak["rss"], me.memory_info().rss)

    senders = []
    for n, host in enumerate(attackers):
        path = tmp_path / f"payloads{n}"
        path.write_bytes(pickle.dumps(flood_payloads(keys, host.addr())))
        senders.append(host.popen([sys.executable, "-c", SENDER, str(path), target.addr(),
                                   "3010", str(RATE_TOTAL / ATTACKERS), str(SECONDS)],
                                  stdout=subprocess.PIPE))
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    cpu0, t0 = me.cpu_times(), time.monotonic()
    results = []
    announce = f"{target.addr()}:3010"
    while time.monotonic() - t0 < SECONDS:
        payload = os.urandom(200_000)
        done_job = run_exec(
            keys.client, [announce], "--timeout", "10", "--", "cat", input=payload,
            wrap=client.argv)
        results.append((done_job.returncode, hashlib.sha256(done_job.stdout).digest()
                        == hashlib.sha256(payload).digest(), done_job.stderr[-300:]))
    sent = [int(s.communicate(timeout=30)[0] or 0) for s in senders]
    cpu1, t1 = me.cpu_times(), time.monotonic()
    done.set()
    sampler.join(2)
    cpu = (cpu1.user + cpu1.system - cpu0.user - cpu0.system) / (t1 - t0)
    worker.stop()
    summary = re.search(r"(\d+) jobs run; (\d+) datagrams received, (\d+) dropped by rate "
                        r"limits, (\d+) complaints, (\d+) of other applications ignored",
                        worker.output)
    assert summary, worker.output[-2000:]
    jobs, received, limited, complaints, foreign = map(int, summary.groups())
    figures = (f"flood: {sum(sent)} datagrams in {t1 - t0:.1f} s from {ATTACKERS} hosts "
               f"({sum(sent) / (t1 - t0):.0f}/s); worker received {received}, dropped "
               f"{limited} by rate limits, {complaints} complaints, ignored {foreign} as "
               f"another application's; worker CPU {cpu:.0%} of a "
               f"core; RSS {rss_before / 2**20:.1f} MiB before, peak "
               f"{peak['rss'] / 2**20:.1f} MiB; {len(results)} real jobs, "
               f"{sum(r[0] == 0 and r[1] for r in results)} complete and correct")
    print(figures)
    (tmp_path / "figures.txt").write_text(figures)
    assert results and all(code == 0 and same for code, same, _ in results), results
    assert len(results) >= 5
    assert jobs == len(results)
    assert sum(sent) >= 0.8 * RATE_TOTAL * SECONDS
    # the flood was real, and most of it was dropped cheaply (junk whose header names
    # another application by the application filter, before any limit)
    assert limited + foreign > 0.5 * received
    # per-source limits held: each attacker got at most its burst plus its rate checked
    checked_by_attackers = received - limited - foreign - 40 * len(results)  # not the client's
    assert checked_by_attackers <= ATTACKERS * (BURST + RATE * (t1 - t0 + 2))
    assert peak["rss"] - rss_before < 64 << 20
    assert cpu < 0.9  # a single-threaded worker that is not saturated keeps serving
