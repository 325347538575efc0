"""`rexnet status`: every worker answers a signed query; a table, JSON and a live watch."""

from __future__ import annotations

import json
import signal
import subprocess
import time

from cluster import REXNET, Proc, loopback_address, start_worker
from conftest import Keys
from netbed import NetBed

from rexnet.protocol import exitcodes, wire
from rexnet.security.credentials import load_credential


def status_argv(keys: Keys, targets: list[str], *options: str) -> list[str]:
    argv = [REXNET, "status"]
    for target in targets:
        argv += ["--announce", target]
    return [*argv, *options, str(keys.client)]


def test_status_over_broadcast_lists_every_worker(bed: NetBed, keys: Keys) -> None:
    lan = bed.add_subnet("lan")
    client = bed.add_host("client", [lan])
    for name, slots, speed in (("w1", "2", "1"), ("w2", "3", "2.5")):
        host = bed.add_host(name, [lan])
        start_worker(keys.worker, ["sleep"], "0.0.0.0:3010", name, "--slots", slots,
                     "--speed", speed, "--allow-args", popen=host.popen)
    done = client.run(status_argv(keys, ["255.255.255.255:3010"], "--json"), timeout=30)
    assert done.returncode == 0, done.stderr
    workers = {w["worker"]: w for w in json.loads(done.stdout)}
    assert set(workers) == {"w1", "w2"}
    assert workers["w2"]["slots"] == 3 and workers["w2"]["speed"] == 2.5
    assert workers["w1"]["address"] == bed.hosts["w1"].addr()
    for w in workers.values():
        assert w["cpus"] >= 1 and w["free_memory"] > 0 and w["version"] and w["uptime"] >= 0
    # a running job shows in the slots and the jobs count
    job = client.popen([REXNET, "exec", "--announce", f"{bed.hosts['w1'].addr()}:3010",
                        str(keys.client), "--", "30"], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        table = client.run(status_argv(keys, ["255.255.255.255:3010"]), timeout=30).stdout
        line = next(row for row in table.splitlines() if row.startswith("w1 "))
        if " 1/2 " in line:
            break
    assert " 1/2 " in line, table
    assert table.splitlines()[0].split()[:3] == ["WORKER", "ADDRESS", "LOAD"]
    job.kill()


def test_watch_marks_a_worker_that_stopped_answering(keys: Keys) -> None:
    a, b = loopback_address(), loopback_address()
    workers = [start_worker(keys.worker, ["true"], f"{addr}:3010", name)
               for addr, name in ((a, "stays"), (b, "goes"))]
    watch = Proc(status_argv(keys, [f"{a}:3010", f"{b}:3010"], "--watch", "1", "--wait",
                             "0.5"))
    try:
        watch.wait_for(r"goes .* ok")
        workers[1].stop()
        # the table is sorted by name: the line after "goes" is "stays", still answering
        # (waited for as a whole: the output arrives line by line)
        watch.wait_for(r"goes .* not answering \(\d+s\)\nstays .* ok\n", timeout=20)
    finally:
        watch.stop(signal.SIGINT)
        for worker in workers:
            worker.stop()


def test_no_worker_exit_code(keys: Keys) -> None:
    done = subprocess.run(status_argv(keys, [f"{loopback_address()}:3010"], "--wait", "0.3"),
                          capture_output=True, timeout=30)
    assert done.returncode == exitcodes.NO_WORKER
    assert b"no worker answered within 0.3 s" in done.stdout


def test_workers_ignore_unsigned_or_forged_status_queries(keys: Keys) -> None:
    import socket

    addr = loopback_address()
    worker = start_worker(keys.worker, ["true"], f"{addr}:3010", "quiet")
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(1.5)
    try:
        as_worker = load_credential(keys.worker, "worker")
        query = wire.StatusQuery(b"\2" * 16, _now(), sock.getsockname()[1], ("127.0.0.1",))
        forged = wire.encode_datagram(query, as_worker.app_id, as_worker.key,
                                      as_worker.cert_der)
        sock.sendto(forged, (addr, 3010))
        worker.wait_for(r"complaint: .*not a client credential")
        try:
            data = sock.recv(4096)
        except TimeoutError:
            data = b""
        assert data == b"", "a worker answered a status query signed by a worker key"
    finally:
        sock.close()
        worker.stop()


def _now() -> int:
    from rexnet.net.announce import now_ms

    return now_ms()


def test_a_worker_name_cannot_write_escape_sequences_to_the_terminal(keys: Keys) -> None:
    """A worker (any worker credential) picks its own name: rexnet status prints it
    escaped, so it cannot retitle the window, move the cursor or forge lines."""
    addr = loopback_address()
    evil = "w\x1b]0;pwned\x07\x1b[2J\rforged\n"
    worker = start_worker(keys.worker, ["true"], f"{addr}:3010", evil)
    try:
        done = subprocess.run(status_argv(keys, [f"{addr}:3010"]), capture_output=True,
                              timeout=30)
        assert done.returncode == 0, done.stderr
        out = done.stdout.decode()
        assert "\x1b" not in out and "\x07" not in out and "\r" not in out
        assert len(out.splitlines()) == 2  # the header and one worker, no forged line
        assert out.splitlines()[1].startswith("w\\x1b]0;pwned\\x07\\x1b[2J\\rforged\\n ")
        as_json = json.loads(subprocess.run(status_argv(keys, [f"{addr}:3010"], "--json"),
                                            capture_output=True, timeout=30).stdout)
        assert as_json[0]["worker"] == evil  # JSON keeps the name exactly (escaped by JSON)
    finally:
        worker.stop()


def test_a_worker_name_is_escaped_in_what_rexnet_exec_says(keys: Keys) -> None:
    """-v names the worker that took the job, and errors quote what workers say: a
    worker's chosen name reaches the user's terminal escaped, through the agent and
    without it."""
    from cluster import exec_argv

    addr = loopback_address()
    evil = "w\x1b]0;pwned\x07\x1b[2J"
    worker = start_worker(keys.worker, ["echo", "ran"], f"{addr}:3010", evil)
    try:
        for extra in ((), ("--no-agent",)):
            done = subprocess.run(exec_argv(keys.client, [f"{addr}:3010"], "-v", *extra),
                                  capture_output=True, timeout=30)
            assert done.returncode == 0 and done.stdout == b"ran\n", done.stderr
            assert b"runs on worker w\\x1b]0;pwned\\x07\\x1b[2J" in done.stderr, done.stderr
            assert b"\x1b" not in done.stderr and b"\x07" not in done.stderr
    finally:
        worker.stop()
