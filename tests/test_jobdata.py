"""A job's stdin and stdout on data connections of their own (rexnet.net.jobdata), end to
end: `rexnet exec` (through the agent and without it) against a real worker on loopback,
real TLS, real threads. A stream moves there only once HANDOVER bytes of it went
in-band: these tests use more (tests/test_handover.py has the sizes around it)."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from cluster import Proc, exec_argv, loopback_address, run_exec, start_worker
from conftest import Keys

from rexnet.net.tuning import HANDOVER

BIG = 3 * HANDOVER  # past the handover, with more than one read left after it (a tail
#                      the read that crosses the handover takes whole stays in-band)


@pytest.fixture(scope="module")
def worker(keys: Keys) -> Iterator[tuple[Proc, str]]:
    addr = f"{loopback_address()}:3010"
    proc = start_worker(keys.worker, ["sh", "-c"], addr, "apart", "--allow-args",
                        "--slots", "4")
    yield proc, addr
    proc.stop()


AGENT = pytest.mark.parametrize("agent", [[], ["--no-agent"]], ids=["agent", "no-agent"])


def job_connections(worker: Proc) -> int:
    """The worker's established TCP connections (to clients: it has no others)."""
    return sum(c.status == psutil.CONN_ESTABLISHED
               for c in psutil.Process(worker.pid).net_connections(kind="tcp"))


def wait_connections(worker: Proc, count: int, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while (seen := job_connections(worker)) != count and time.monotonic() < deadline:
        time.sleep(0.05)
    return seen


@AGENT
def test_a_few_mib_both_ways_arrive_whole(keys: Keys, worker: tuple[Proc, str],
                                          agent: list[str]) -> None:
    data = os.urandom(6 << 20)
    done = run_exec(keys.client, [worker[1]], *agent, "--", "cat", input=data)
    assert done.returncode == 0, done.stderr
    assert hashlib.sha256(done.stdout).hexdigest() == hashlib.sha256(data).hexdigest()


def test_the_job_hashes_what_it_read(keys: Keys, worker: tuple[Proc, str]) -> None:
    data = os.urandom(5 << 20)
    done = run_exec(keys.client, [worker[1]], "--", "sha256sum", input=data)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()


@AGENT
def test_stdin_and_stdout_go_on_connections_of_their_own_and_eof_reaches_the_job(
        keys: Keys, worker: tuple[Proc, str], agent: list[str]) -> None:
    assert wait_connections(worker[0], 0) == 0  # the earlier tests' agents are gone
    argv = exec_argv(keys.client, [worker[1]], *agent, "--", "cat; echo eof-seen")
    with subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE) as proc:
        assert proc.stdin is not None and proc.stdout is not None
        head = b"x" * BIG + b"first line\n"
        proc.stdin.write(head)
        proc.stdin.flush()
        assert proc.stdout.read(len(head)) == head
        # the job waits on its stdin: its channel, its stdin and stdout connections
        assert wait_connections(worker[0], 3) == 3
        proc.stdin.write(b"second line\n")
        proc.stdin.close()  # EOF, through close_notify, closes the job's stdin
        proc.stdin = None
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert out == b"second line\neof-seen\n"


@pytest.mark.parametrize(("stdin", "to_file", "first", "connections"), [
    (None, False, f"head -c {BIG} /dev/zero", 1),
    (BIG, False, f"head -c {BIG} /dev/zero", 2),
    (None, True, f"head -c {BIG} /dev/zero", 2),
    (10, True, "echo out", 1),
    (None, True, f"head -c {HANDOVER} /dev/zero", 1)],
    ids=["none", "stdin", "stdout", "small", "stdout-at-the-handover"])
def test_only_big_pipes_and_files_go_apart(
        keys: Keys, worker: tuple[Proc, str], tmp_path: Path, stdin: int | None,
        to_file: bool, first: str, connections: int) -> None:
    """/dev/null is neither a pipe nor a file; a small stream stays in-band; a stdout
    handed over gets its connection only once the job wrote more after the handover."""
    assert wait_connections(worker[0], 0) == 0
    argv = exec_argv(keys.client, [worker[1]], "--no-agent", "--",
                     f"{first}; cat >/dev/null; sleep 2; echo done >&2")
    with open(tmp_path / "out", "wb") as out, subprocess.Popen(
            argv, stdin=subprocess.DEVNULL if stdin is None else subprocess.PIPE,
            stdout=out if to_file else subprocess.DEVNULL, stderr=subprocess.PIPE) as proc:
        if proc.stdin is not None:
            proc.stdin.write(b"i" * (stdin or 0))
            proc.stdin.flush()
        deadline = time.monotonic() + 10
        while not job_connections(worker[0]) and time.monotonic() < deadline:
            time.sleep(0.05)  # the job starts
        if connections == 1:
            time.sleep(1.0)  # no data connection comes
        seen = wait_connections(worker[0], connections, 5)  # its data connections come
        if proc.stdin is not None:
            proc.stdin.close()
            proc.stdin = None
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert err.endswith(b"done\n")
    assert seen == connections
    if to_file:
        assert (tmp_path / "out").stat().st_size == (4 if first == "echo out" else
                                                     int(first.split()[2]))


@AGENT
def test_a_job_that_never_reads_its_stdin_ends_cleanly(
        keys: Keys, worker: tuple[Proc, str], agent: list[str]) -> None:
    started = time.monotonic()
    done = run_exec(keys.client, [worker[1]], *agent, "--", "echo ignored; exit 3",
                    input=os.urandom(16 << 20), timeout=60)
    assert done.returncode == 3, done.stderr
    assert done.stdout == b"ignored\n"
    assert b"Traceback" not in done.stderr
    assert time.monotonic() - started < 30
    assert "Traceback" not in worker[0].output


def test_a_job_that_closes_its_stdin_early_gets_the_head(
        keys: Keys, worker: tuple[Proc, str]) -> None:
    done = run_exec(keys.client, [worker[1]], "--", "head -c 10; exec 0<&-; sleep 0.2",
                    input=b"y" * 5_000_000)
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"y" * 10


ROUNDS = 4  # the job's end races the worker's dial of stdin: each case a few times


@AGENT
@pytest.mark.parametrize("source", ["pipe", "file"])
@pytest.mark.parametrize("job", ["head -c 10 >/dev/null", f"head -c {HANDOVER + 1} >/dev/null"],
                         ids=["head", "past-the-handover"])
def test_a_job_that_ends_as_its_stdin_goes_apart_ends_as_locally(
        keys: Keys, worker: tuple[Proc, str], tmp_path: Path, agent: list[str],
        source: str, job: str) -> None:
    """BIG bytes of stdin and a job that reads a little (or just past the handover) and
    exits: the worker may be dialling stdin's connection as the job ends, and the client
    letting go of its port. The user gets what a local run gives: head's status, no
    output, no complaint at either end."""
    data = os.urandom(BIG)
    path = tmp_path / "input"
    path.write_bytes(data)
    local = subprocess.run(["sh", "-c", job], input=data, capture_output=True, timeout=30)
    mark = len(worker[0].output)
    for _ in range(ROUNDS):
        with open(path, "rb") as f:
            done = subprocess.run(exec_argv(keys.client, [worker[1]], *agent, "--", job),
                                  stdin=f if source == "file" else None,
                                  input=data if source == "pipe" else None,
                                  capture_output=True, timeout=60)
        assert (done.returncode, done.stdout, done.stderr) == (local.returncode,
                                                               local.stdout, b"")
    complaints = [line for line in worker[0].output[mark:].splitlines() if "#warn" in line]
    assert complaints == []


def test_stdin_from_a_file(keys: Keys, worker: tuple[Proc, str], tmp_path: object) -> None:
    path = os.path.join(str(tmp_path), "input")
    data = os.urandom(3 << 20)
    with open(path, "wb") as f:
        f.write(data)
    with open(path, "rb") as f:
        done = subprocess.run(exec_argv(keys.client, [worker[1]], "--", "sha256sum"),
                              stdin=f, capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()


def read_then_close(argv: list[str], size: int, stderr: bool = False
                    ) -> tuple[bytes, int, bytes]:
    """Run ARGV, read SIZE bytes of its stdout (or STDERR) and close it (as `| head -c
    SIZE` would); (what was read, its exit status, the other stream)."""
    with subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        if stderr:
            proc.stdout, proc.stderr = proc.stderr, proc.stdout
        assert proc.stdout is not None
        got = proc.stdout.read(size)
        proc.stdout.close()
        proc.stdout = None
        rest = proc.communicate(timeout=30)
    return got, proc.returncode, rest[1]


@AGENT
def test_a_reader_that_stops_early_ends_a_job_that_writes_forever(
        keys: Keys, worker: tuple[Proc, str], agent: list[str]) -> None:
    """`rexnet exec -- yes | head -c 100000` ends, as it does locally: SHUT closes the
    job's stdout, which gets SIGPIPE (128+13), stdout still in-band."""
    argv = " ".join(exec_argv(keys.client, [worker[1]], *agent, "--", "yes"))
    done = subprocess.run(["sh", "-c", f"{argv} | head -c 100000"], capture_output=True,
                          timeout=60)
    assert done.stdout == b"y\n" * 50000
    assert b"Traceback" not in done.stderr
    got, status, err = read_then_close(
        exec_argv(keys.client, [worker[1]], *agent, "--", "yes"), 100000)
    assert got == b"y\n" * 50000
    assert status == 128 + signal.SIGPIPE, err
    assert b"Traceback" not in err


@AGENT
def test_a_reader_that_stops_after_the_handover_ends_the_job(
        keys: Keys, worker: tuple[Proc, str], agent: list[str]) -> None:
    """The same once stdout has its data connection: the client's thread ends it, the
    worker's thread closes the job's stdout."""
    size = 3 * HANDOVER
    got, status, err = read_then_close(
        exec_argv(keys.client, [worker[1]], *agent, "--", "yes"), size)
    assert got == b"y\n" * (size // 2)
    assert status == 128 + signal.SIGPIPE, err
    assert b"Traceback" not in err
    if agent:  # an agent may keep its channel warm: without one, every connection ends
        assert wait_connections(worker[0], 0) == 0
    assert "Traceback" not in worker[0].output


def test_a_reader_of_stderr_that_stops_early_ends_the_job(
        keys: Keys, worker: tuple[Proc, str]) -> None:
    got, status, out = read_then_close(
        exec_argv(keys.client, [worker[1]], "--no-agent", "--", "yes >&2"), 100000,
        stderr=True)
    assert got == b"y\n" * 50000
    assert status == 128 + signal.SIGPIPE
    assert out == b""
