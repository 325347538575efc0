"""Signals, descriptors, environment and limits of remote jobs, in the namespace test bed."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from cluster import Proc, exec_argv, host_pid, sleep_marker, start_worker
from conftest import Keys
from netbed import Host, NetBed

from rexnet.protocol import exitcodes

BROADCAST = "255.255.255.255:3010"


def pair(bed: NetBed, keys: Keys, *options: str) -> tuple[Host, Host, Proc]:
    lan = bed.add_subnet("lan")
    client, host = bed.add_host("client", [lan]), bed.add_host("w1", [lan])
    worker = start_worker(keys.worker, ["sh", "-c"], "0.0.0.0:3010", "w1", "--allow-args",
                          *options, popen=host.popen)
    return client, host, worker


def argv(keys: Keys, script: str, *options: str) -> list[str]:
    return exec_argv(keys.client, [BROADCAST], *options, "--", script)


def wait_alive_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split()[2] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


# -- signals ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1",
                                  "SIGUSR2"])
def test_signals_reach_the_job_which_decides_the_status(bed: NetBed, keys: Keys,
                                                        name: str) -> None:
    client, _, _ = pair(bed, keys)
    number = getattr(signal, name)
    script = f'trap "echo caught {name[3:]}; exit 42" {name[3:]}; echo ready; sleep 30 & wait'
    job = client.popen(argv(keys, script), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert job.stdout is not None
    assert job.stdout.readline() == b"ready\n"
    job.send_signal(number)
    assert job.wait(15) == 42
    assert job.stdout.read() == f"caught {name[3:]}\n".encode()


def test_an_untrapped_signal_kills_the_job_and_gives_128_plus_n(bed: NetBed, keys: Keys) -> None:
    client, _, _ = pair(bed, keys)
    job = client.popen(argv(keys, "echo ready; sleep 30"), stdout=subprocess.PIPE)
    assert job.stdout is not None and job.stdout.readline() == b"ready\n"
    job.send_signal(signal.SIGTERM)
    assert job.wait(15) == 128 + signal.SIGTERM


def test_a_dropped_connection_ends_the_job_within_5_seconds(bed: NetBed, keys: Keys) -> None:
    client, _, worker = pair(bed, keys)
    mark = sleep_marker()
    job = client.popen(argv(keys, f"sleep {mark} & echo started; wait"),
                       stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert job.stdout is not None and job.stdout.readline() == b"started\n"
    grandchild = host_pid(f"sleep {mark}")
    # the client's host vanishes from the network: no FIN, no RST reaches the worker
    client.run(["ip", "link", "set", client.iface(), "down"], check=True)
    t0 = time.monotonic()
    worker.wait_for(r"silent for \d+ s: connection considered lost", timeout=10)
    assert wait_alive_gone(grandchild, 5.0 - (time.monotonic() - t0) + 1.0)
    assert time.monotonic() - t0 < 6.0
    job.kill()


def test_stopping_the_worker_ends_jobs_and_clients_see_worker_lost(bed: NetBed,
                                                                  keys: Keys) -> None:
    client, _, worker = pair(bed, keys)
    mark = sleep_marker()
    job = client.popen(argv(keys, f"echo ready; sleep {mark} & echo started; wait"),
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert job.stdout is not None and job.stderr is not None
    assert job.stdout.readline() == b"ready\n"
    assert job.stdout.readline() == b"started\n"
    grandchild = host_pid(f"sleep {mark}")
    # twistd shuts down cleanly, then exits by the signal that stopped it
    assert worker.stop(signal.SIGTERM) in (0, -signal.SIGTERM)
    assert "Server Shut Down" in worker.output
    assert job.wait(10) == exitcodes.WORKER_LOST
    # the worker says it is stopping; if its frame loses the race with the close, the
    # client still reports the worker lost (the exit code is the contract)
    said = job.stderr.read()
    assert b"lost worker" in said and b"w1" in said, said
    assert wait_alive_gone(grandchild, 5)


# -- descriptors --------------------------------------------------------------------------


def test_job_reads_fd_3_and_writes_fd_4(bed: NetBed, keys: Keys, tmp_path: object) -> None:
    client, _, _ = pair(bed, keys)
    data = os.urandom(300_000)
    r_in, w_in = os.pipe()
    r_out, w_out = os.pipe()
    job = client.popen(argv(keys, "cat <&3 >&4; echo done", "--fd", "3", "--fd", "4"),
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       **_fds({3: r_in, 4: w_out}))
    os.close(r_in)
    os.close(w_out)
    with os.fdopen(w_in, "wb") as sink:
        sink.write(data)
    with os.fdopen(r_out, "rb") as source:
        got = source.read()
    assert job.wait(30) == 0
    assert got == data
    assert job.stdout is not None and job.stdout.read() == b"done\n"


def test_read_write_descriptor_becomes_a_socket(bed: NetBed, keys: Keys) -> None:
    client, _, _ = pair(bed, keys)
    mine, theirs = socket.socketpair()
    job = client.popen(argv(keys, 'echo ping >&5; read answer <&5; echo "got $answer"',
                            "--fd", "5"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       **_fds({5: theirs.fileno()}))
    theirs.close()
    mine.settimeout(15)
    assert mine.recv(100) == b"ping\n"
    mine.sendall(b"pong\n")
    assert job.wait(30) == 0, job.stderr.read() if job.stderr else b""
    assert job.stdout is not None and job.stdout.read() == b"got pong\n"
    mine.close()


def _fds(mapping: dict[int, int]) -> dict[str, object]:
    """Popen arguments that put each descriptor at the given number in the child."""
    def place() -> None:
        for target, fd in mapping.items():
            os.dup2(fd, target)
            os.set_inheritable(target, True)

    return {"preexec_fn": place, "close_fds": False}


def test_fd_needs_an_open_descriptor(bed: NetBed, keys: Keys) -> None:
    client, _, _ = pair(bed, keys)
    done = client.run(argv(keys, "true", "--fd", "9"), timeout=30)
    assert done.returncode == exitcodes.USAGE
    assert "descriptor 9 is not open" in done.stderr


# -- environment, directory, arguments ------------------------------------------------------


def test_environment_only_as_the_worker_accepts(bed: NetBed, keys: Keys) -> None:
    client, _, _ = pair(bed, keys, "--accept-env", "LC_*", "--accept-env", "MY_VAR")
    done = client.run(["env", "LC_TEST=fr", *argv(
        keys, 'echo "$LC_TEST|$MY_VAR|$OTHER"', "--env", "LC_TEST", "--env", "MY_VAR=1",
        "--env", "OTHER=x")], timeout=30)
    assert done.returncode == 0
    assert done.stdout == "fr|1|\n"
    assert "did not accept the environment variable(s) OTHER" in done.stderr


def test_worker_sets_the_working_directory(bed: NetBed, keys: Keys, tmp_path: os.PathLike[str]
                                           ) -> None:
    client, _, _ = pair(bed, keys, "--chdir", str(tmp_path))
    done = client.run(argv(keys, "pwd"), timeout=30)
    assert done.stdout.strip() == str(tmp_path)


# -- limits -------------------------------------------------------------------------------


def test_job_timeout(bed: NetBed, keys: Keys) -> None:
    client, _, _ = pair(bed, keys, "--job-timeout", "1")
    t0 = time.monotonic()
    done = client.run(argv(keys, "echo started; sleep 30"), timeout=30)
    assert done.returncode == exitcodes.TIME_LIMIT
    assert done.stdout == "started\n"
    assert "hit its time limit" in done.stderr
    assert time.monotonic() - t0 < 10


def test_job_memory(bed: NetBed, keys: Keys) -> None:
    client, _, _ = pair(bed, keys, "--job-memory", "100M")
    hog = f"{sys.executable} -c 'import time; x = bytearray(400 << 20); time.sleep(30)'"
    done = client.run(argv(keys, hog), timeout=40)
    assert done.returncode == exitcodes.MEMORY_LIMIT, done.stderr
    assert "hit its memory limit" in done.stderr
    small = client.run(argv(keys, f"{sys.executable} -c 'x = bytearray(10 << 20)'"), timeout=30)
    assert small.returncode == 0
