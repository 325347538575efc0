"""Command workers and $GROUP on the namespace bed: `make -j8 CC="rexnet exec build -- cc"`
builds a real C project on two workers that see its sources at the same path (the
namespaces share the file system); --all across hosts; multicast groups end to end for
workers ($GROUP), crat (--join), cproxy (--join) and tunnels (--group)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from cluster import REXNET, TWISTD, Proc, exec_argv, run_exec, start_worker
from conftest import Keys
from netbed import Host, NetBed

SOURCES = {
    "add.c": "int add(int a, int b) { return a + b; }\n",
    "mul.c": "int mul(int a, int b) { return a * b; }\n",
    "sub.c": "int sub(int a, int b) { return a - b; }\n",
    "neg.c": "int neg(int a) { return -a; }\n",
    "sq.c": "int mul(int, int);\nint sq(int a) { return mul(a, a); }\n",
    "main.c": (
        '#include <stdio.h>\n#include "ops.h"\n'
        'int main(void) { printf("%d %d %d %d %d\\n", add(2, 3), mul(4, 5), sub(9, 2), '
        "neg(7), sq(6)); return 0; }\n"),
    "ops.h": "int add(int, int); int mul(int, int); int sub(int, int); int neg(int);\n"
             "int sq(int);\n",
}
MAKEFILE = """\
OBJS = add.o mul.o sub.o neg.o sq.o main.o
hello: $(OBJS)
\t$(CC) -o $@ $(OBJS)
%.o: %.c ops.h
\t$(CC) -c $< -o $@
"""
GROUP = "239.77.3.3"


def write_project(directory: Path, keys: Keys, announce: str) -> None:
    for name, text in SOURCES.items():
        (directory / name).write_text(text)
    (directory / "Makefile").write_text(MAKEFILE)
    (directory / "rexnet.toml").write_text(
        f'[applications.build]\ncredential = "{keys.client}"\n'
        f'announce = ["{announce}"]\ntimeout = 30\n')


def command_worker(host: Host, keys: Keys, *options: str) -> Proc:
    return start_worker(keys.worker, [], "0.0.0.0:3010", host.name, "--commands", "cc",
                        "--commands", "echo", *options, popen=host.popen)


def lan(bed: NetBed, *names: str) -> list[Host]:
    subnet = bed.add_subnet("lan")
    return [bed.add_host(name, [subnet]) for name in names]


def test_make_builds_a_c_project_on_the_workers(bed: NetBed, keys: Keys,
                                                tmp_path: Path) -> None:
    if shutil.which("cc") is None or shutil.which("make") is None:
        pytest.skip("needs cc and make (make tools installs gcc and make)")
    client, w1, w2 = lan(bed, "client", "w1", "w2")
    workers = [command_worker(w, keys, "--slots", "2") for w in (w1, w2)]
    project = tmp_path / "project"
    project.mkdir()
    write_project(project, keys, f"{bed.subnets['lan'].broadcast}:3010")
    done = subprocess.run(client.argv(["make", "-j8", f"CC={REXNET} exec build -- cc"]),
                          cwd=project, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (project / "hello").exists()
    ran = subprocess.run([str(project / "hello")], capture_output=True, text=True, timeout=10)
    assert ran.stdout == "5 20 7 -7 36\n"
    # the 7 cc runs (6 compiles, 1 link) were the workers', in the project's directory
    # (a job's line comes once its EXIT is sent; a short job's is one line with its end)
    line = re.compile(r"job \w+ started .*?: \[(.*?)\] in (\S+?)(?:, ended after .*)?$", re.M)
    deadline = time.monotonic() + 10
    while True:
        jobs = [job for w in workers for job in line.findall(w.output)]
        if len(jobs) >= 7 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert len(jobs) == 7, [w.output for w in workers]
    assert {where for _, where in jobs} == {str(project)}
    assert all("/cc'" in argv for argv, _ in jobs)
    # and a compiler that is not on the list is refused, as make says
    refused = subprocess.run(client.argv(["make", "-B", "add.o", f"CC={REXNET} exec build -- "
                                          "gcc"]), cwd=project, capture_output=True,
                             text=True, timeout=60)
    assert refused.returncode != 0
    assert "gcc: not an allowed command" in refused.stderr


def test_all_across_hosts_prefixes_each_workers_lines(bed: NetBed, keys: Keys) -> None:
    client, w1, w2, w3 = lan(bed, "client", "w1", "w2", "w3")
    for w in (w1, w2, w3):
        command_worker(w, keys)
    broadcast = f"{bed.subnets['lan'].broadcast}:3010"
    done = run_exec(keys.client, [broadcast], "--all", "--", "echo", "up", wrap=client.argv)
    assert done.returncode == 0, done.stderr
    assert sorted(done.stdout.splitlines()) == [b"w1: up", b"w2: up", b"w3: up"]
    picked = run_exec(keys.client, [broadcast], "--all", "--worker", "w3", "--worker", "w1",
                      "--", "echo", "up", wrap=client.argv)
    assert sorted(picked.stdout.splitlines()) == [b"w1: up", b"w3: up"], picked.stderr
    best = client.run([REXNET, "status", "--best", "-a", broadcast, str(keys.client)],
                      timeout=30)
    assert best.stdout.strip() in ("w1", "w2", "w3"), best.stderr


def test_group_for_workers_and_crat_join(bed: NetBed, keys: Keys, tmp_path: Path) -> None:
    client, w1, logger = lan(bed, "client", "w1", "logger")
    jsonl = tmp_path / "alerts.jsonl"
    crat = Proc([TWISTD, "-n", "--pidfile=", "crat", "--listen", "0.0.0.0:3011", "--join",
                 GROUP, "--jsonl", str(jsonl), "--trust", str(keys.ca_pem)],
                popen=logger.popen)
    crat.wait_for("crat listening on")
    # the worker reads $GROUP as clients do: it joins the group, and alerts go there
    worker = Proc(["env", f"GROUP={GROUP}", TWISTD, "-n", "--pidfile=", "rexnet-worker",
                   "--name", "w1", "--commands", "echo", str(keys.worker)], popen=w1.popen)
    worker.wait_for("listening on")
    argv = client.argv(["env", f"GROUP={GROUP}", *exec_argv(keys.client, [], "--", "echo",
                                                              "grouped")])
    done = subprocess.run(argv, capture_output=True, timeout=60)
    assert done.returncode == 0 and done.stdout == b"grouped\n", done.stderr
    for _ in range(100):
        if jsonl.exists() and any(
                r.get("event") == "job-finished" and r.get("verified")
                for r in map(json.loads, jsonl.read_text().splitlines())):
            break
        subprocess.run(["sleep", "0.1"], check=True)
    else:
        raise AssertionError(f"crat logged no job over {GROUP}:\n{crat.output}")


def test_cproxy_joins_a_group(bed: NetBed, keys: Keys, tmp_path: Path) -> None:
    a, b = bed.add_subnet("a"), bed.add_subnet("b")
    client = bed.add_host("client", [a])
    proxy = bed.add_host("proxy", [a, b])
    far = bed.add_host("far", [b])
    relay_key = tmp_path / f"{keys.app}.gw.relay"
    subprocess.run([REXNET, "keygen", "--issue", "relay", "--name", "gw", "--out",
                    str(relay_key), str(keys.ca)], check=True, capture_output=True)
    relay = Proc([TWISTD, "-n", "--pidfile=", "cproxy", "--listen", "0.0.0.0:3010",
                  "--join", GROUP, "--announce", f"{b.broadcast}:3010", "--credential",
                  str(relay_key)], popen=proxy.popen)
    relay.wait_for("cproxy listening on")
    command_worker(far, keys)
    done = run_exec(keys.client, [f"{GROUP}:3010"], "--", "echo", "across",
                    wrap=client.argv)
    assert done.returncode == 0 and done.stdout == b"across\n", done.stderr
    assert "relaying job" in relay.output


def test_tunnels_carry_a_multicast_group(bed: NetBed, keys: Keys) -> None:
    s1, s2 = bed.add_subnet("s1"), bed.add_subnet("s2")
    router = bed.add_host("router", [s1, s2])
    router.set_forwarding(True)
    hosts = {}
    for subnet in (s1, s2):
        for role in ("t", "w", "c"):
            host = hosts[f"{role}-{subnet.name}"] = bed.add_host(f"{role}{subnet.name}",
                                                                  [subnet])
            host.run(["ip", "route", "replace", "default", "via", router.addr(subnet)],
                     check=True)
    tunnels = []
    for site, peer in (("s1", None), ("s2", "s1")):
        argv = [TWISTD, "-n", "--pidfile=", "rexnet-tunnel", "--credential", str(keys.worker),
                "--listen", "0.0.0.0:4010", "--group", f"{GROUP}:3010"]
        if peer is not None:
            argv += ["--connect", f"{hosts['t-' + peer].addr()}:4010"]
        tunnel = Proc(argv, popen=hosts[f"t-{site}"].popen)
        tunnel.wait_for("tunnel for")
        tunnels.append(tunnel)
    tunnels[1].wait_for("link up with", timeout=20)
    command_worker(hosts["w-s2"], keys, "--join", GROUP)
    done = run_exec(keys.client, [f"{GROUP}:3010"], "--timeout", "20", "--", "echo",
                    "tunnelled", wrap=hosts["c-s1"].argv)
    assert done.returncode == 0 and done.stdout == b"tunnelled\n", done.stderr
