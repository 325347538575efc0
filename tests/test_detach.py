"""End to end with real workers and real TLS: files with a job (--put, --get) and
detached jobs (rexnet exec --detach, rexnet jobs, attach, output, cancel), attacked by
another client's credential; several workers on the namespace bed."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster import REXNET, Proc, loopback_address, run_exec, start_worker
from conftest import Keys
from netbed import NetBed

from rexnet.protocol import exitcodes
from rexnet.security.credentials import (
    credential_file_bytes,
    issue,
    load_ca,
    write_private,
)

SCRIPT = """#!/bin/sh
case "$1" in
  files) cat a.txt b.txt > result.txt; ln -s /etc/passwd stolen.txt; mkdir sub.txt
         echo "ran in $(pwd)"; ls ;;
  sleep) echo "started"; sleep "$2"; echo "slept" ;;
  cat)   echo "ready"; cat; echo "eof" ;;
  loud)  head -c 200000 /dev/zero | tr '\\0' x; echo ;;
esac
exit 3
"""


@pytest.fixture
def script(tmp_path: Path) -> Path:
    path = tmp_path / "job.sh"
    path.write_text(SCRIPT)
    path.chmod(0o755)
    return path


def credential(keys: Keys, tmp_path: Path, name: str, admin: bool = False) -> Path:
    """Another client credential of the application (an admin one if ADMIN)."""
    ca = load_ca(keys.ca)
    key, cert = issue(ca.key, ca.cert, "client", name, admin=admin)
    path = tmp_path / f"{name}.client"
    write_private(path, credential_file_bytes(key, cert, ca.cert))
    return path


@pytest.fixture
def worker(keys: Keys, script: Path, tmp_path: Path) -> Iterator[tuple[Proc, str]]:
    address = loopback_address()
    proc = start_worker(keys.worker, [str(script)], f"{address}:3010", "w1", "--allow-args",
                        "--state-dir", str(tmp_path / "state"), "--detached-output", "4096",
                        "--chdir", str(tmp_path))
    yield proc, f"{address}:3010"
    proc.stop()


def call(command: str, keyfile: Path, target: str, *args: str,
         stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([REXNET, command, "--announce", target, *args, str(keyfile)]
                          if command == "jobs" else
                          [REXNET, command, "--announce", target, str(keyfile), *args],
                          input=stdin, capture_output=True, timeout=60)


def test_put_and_get_files_through_a_fresh_job_directory(
        keys: Keys, worker: tuple[Proc, str], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    proc, target = worker
    here = tmp_path / "client"
    here.mkdir()
    (here / "a.txt").write_text("alpha\n")
    (here / "b.txt").write_text("beta\n")
    victim = tmp_path / "victim"
    victim.write_text("precious")
    monkeypatch.chdir(here)
    done = run_exec(keys.client, [target], "--put", "a.txt", "--put", str(here / "b.txt"),
                    "--get", "*.txt", "--", "files")
    assert done.returncode == 3, done.stderr
    assert (here / "result.txt").read_text() == "alpha\nbeta\n"
    assert not (here / "stolen.txt").exists() and not (here / "sub.txt").exists()
    ran_in = done.stdout.decode().splitlines()[0].split()[-1]
    assert ran_in.startswith(str(tmp_path / "state" / "testapp" / "work"))
    assert not os.path.exists(ran_in), "the job directory is removed after the job"
    proc.wait_for("stolen.txt: not sent .a symbolic link")
    # an existing file is not replaced without --force; a link there is never followed
    (here / "result.txt").unlink()
    (here / "result.txt").symlink_to(victim)
    again = run_exec(keys.client, [target], "--put", "a.txt", "--put", "b.txt",
                     "--get", "result.txt", "--", "files")
    assert again.returncode == 3 and b"result.txt exists: not replaced" in again.stderr
    assert (here / "result.txt").is_symlink() and victim.read_text() == "precious"
    forced = run_exec(keys.client, [target], "--put", "a.txt", "--put", "b.txt",
                      "--get", "result.txt", "--force", "--", "files")
    assert forced.returncode == 3, forced.stderr
    assert not (here / "result.txt").is_symlink()
    assert (here / "result.txt").read_text() == "alpha\nbeta\n"
    assert victim.read_text() == "precious"
    assert sorted(os.listdir(here)) == ["a.txt", "b.txt", "result.txt"]  # no temporary files
    bad = run_exec(keys.client, [target], "--get", "../x", "--", "files")
    assert bad.returncode == exitcodes.USAGE and b"plain names" in bad.stderr


def test_a_detached_job_from_start_to_its_status(keys: Keys, worker: tuple[Proc, str],
                                                 tmp_path: Path) -> None:
    _, target = worker
    t0 = time.monotonic()
    started = run_exec(keys.client, [target], "--detach", "--", "sleep", "3")
    assert started.returncode == 0, started.stderr
    assert time.monotonic() - t0 < 3, "--detach returns once the job started"
    job = started.stdout.decode().strip()
    assert len(job) == 12
    listed = call("jobs", keys.client, target, "--json")
    assert listed.returncode == 0, listed.stderr
    rows = {r["job"]: r for r in json.loads(listed.stdout)}
    assert rows[job]["state"] == "running" and rows[job]["detached"]
    assert rows[job]["worker"] == "w1" and rows[job]["client"] == "client"
    assert rows[job]["command"].endswith("job.sh sleep 3")
    so_far = call("output", keys.client, target, job)
    assert so_far.returncode == 0 and so_far.stdout == b"started\n"
    attached = call("attach", keys.client, target, job)  # follows it to its end
    assert attached.returncode == 3 and attached.stdout == b"started\nslept\n"
    table = call("jobs", keys.client, target).stdout.decode()
    assert "JOB" in table.splitlines()[0]
    line = next(row for row in table.splitlines() if row.startswith(job))
    assert " finished " in line and " 3 " in line and "detached" in line
    assert call("output", keys.client, target, job).stdout == b"started\nslept\n"


def test_attach_feeds_the_stdin_of_a_detached_job(keys: Keys, worker: tuple[Proc, str]) -> None:
    _, target = worker
    job = run_exec(keys.client, [target], "--detach", "--", "cat").stdout.decode().strip()
    attached = call("attach", keys.client, target, job, stdin=b"one\ntwo\n")
    assert attached.returncode == 3, attached.stderr
    assert attached.stdout == b"ready\none\ntwo\neof\n"


def test_only_the_owner_or_an_admin_may_cancel_attach_or_read(
        keys: Keys, worker: tuple[Proc, str], tmp_path: Path) -> None:
    proc, target = worker
    eve = credential(keys, tmp_path, "eve")
    boss = credential(keys, tmp_path, "boss", admin=True)
    job = run_exec(keys.client, [target], "--detach", "--", "sleep", "60").stdout.decode().strip()
    for command in ("cancel", "attach", "output"):
        attempt = call(command, eve, target, job)
        assert attempt.returncode == exitcodes.REFUSED, attempt
        assert b"belongs to client's credential" in attempt.stderr
        assert attempt.stdout == b""
        proc.wait_for(f"{command} of job {job} refused to eve")
    listed = json.loads(call("jobs", eve, target, "--json").stdout)  # listing is open
    assert any(r["job"] == job and r["state"] == "running" for r in listed)
    cancelled = call("cancel", boss, target, job)
    assert cancelled.returncode == 0 and job.encode() in cancelled.stdout
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        out = call("output", keys.client, target, job)
        if out.returncode != 0:
            break
        time.sleep(0.2)
    assert out.returncode == 128 + 15 and out.stdout == b"started\n"
    mine = run_exec(keys.client, [target], "--detach", "--", "sleep", "60").stdout.decode()
    assert call("cancel", keys.client, target, mine.strip(), "--signal", "KILL").returncode == 0
    proc.wait_for(f"job {mine.strip()} ended: signal 9")


def test_detached_output_is_bounded_on_disk(keys: Keys, worker: tuple[Proc, str],
                                            tmp_path: Path) -> None:
    _, target = worker
    job = run_exec(keys.client, [target], "--detach", "--", "loud").stdout.decode().strip()
    time.sleep(1)
    out = call("output", keys.client, target, job)
    assert out.returncode == 3
    assert 0 < len(out.stdout) <= 4096 and set(out.stdout) == {ord("x")}
    assert b"bytes of the job's output were not kept" in out.stderr
    kept = tmp_path / "state" / "testapp" / "detached" / job / "output"
    assert kept.stat().st_size <= 4096


def test_jobs_across_several_workers_and_cancel_finds_the_right_one(
        bed: NetBed, keys: Keys, script: Path, tmp_path: Path) -> None:
    lan = bed.add_subnet("lan")
    client = bed.add_host("client", [lan])
    jobs = {}
    for name in ("w1", "w2"):
        host = bed.add_host(name, [lan])
        start_worker(keys.worker, [str(script)], "0.0.0.0:3010", name, "--allow-args",
                     "--state-dir", str(tmp_path / name),
                     popen=host.popen)
        started = client.run([REXNET, "exec", "--announce", f"{host.addr()}:3010", "--detach",
                              str(keys.client), "sleep", "60"], timeout=60)
        assert started.returncode == 0, started.stderr
        jobs[name] = started.stdout.strip()
    listed = client.run([REXNET, "jobs", "--announce", "255.255.255.255:3010", "--json",
                         str(keys.client)], timeout=60)
    assert listed.returncode == 0, listed.stderr
    rows = {(r["worker"], r["job"]) for r in json.loads(listed.stdout)}
    assert {("w1", jobs["w1"]), ("w2", jobs["w2"])} <= rows
    cancelled = client.run([REXNET, "cancel", "--announce", "255.255.255.255:3010",
                            str(keys.client), jobs["w2"]], timeout=60)
    assert cancelled.returncode == 0, cancelled.stderr
    deadline = time.monotonic() + 10
    states: dict[str, str] = {}
    while time.monotonic() < deadline:
        listed = client.run([REXNET, "jobs", "--announce", "255.255.255.255:3010", "--json",
                             str(keys.client)], timeout=60)
        states = {r["job"]: r["state"] for r in json.loads(listed.stdout)}
        if states.get(jobs["w2"]) == "finished":
            break
    assert states[jobs["w2"]] == "finished" and states[jobs["w1"]] == "running"
