"""Command workers end to end on loopback: real workers (--commands), real `rexnet exec`
through the agent and standalone, real TLS: the allow-list, the job's directory, --all,
--worker, --cpus/--mem and status --best."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster import REXNET, exec_argv, loopback_address, run_exec, start_worker
from conftest import Keys

from rexnet.protocol import exitcodes

ALLOWED = ("--commands", "echo", "--commands", "pwd", "--commands", "false",
           "--commands", "/bin/sleep", "--commands", "/usr/bin/sleep")


@pytest.fixture(scope="module")
def workers(keys: Keys) -> Iterator[dict[str, str]]:
    """Two command workers: small (1 slot) and big (3 slots); their announce addresses."""
    addrs = {"small": f"{loopback_address()}:3010", "big": f"{loopback_address()}:3010"}
    procs = [start_worker(keys.worker, [], addrs["small"], "small", *ALLOWED, "--slots", "1"),
             start_worker(keys.worker, [], addrs["big"], "big", *ALLOWED, "--slots", "3")]
    yield addrs
    for proc in procs:
        proc.stop()


def rexnet_exec(keys: Keys, announce: list[str], *options: str, cwd: Path | None = None,
                ) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(exec_argv(keys.client, announce, *options), capture_output=True,
                          timeout=60, cwd=cwd)


def test_an_allowed_command_runs_with_the_clients_arguments(
        keys: Keys, workers: dict[str, str]) -> None:
    done = run_exec(keys.client, [workers["small"]], "--", "echo", "-n", "hello", "there")
    assert (done.returncode, done.stdout) == (0, b"hello there"), done.stderr


@pytest.mark.parametrize("program", ["sh", "../../bin/sh", "/bin/sh", "/tmp/echo",
                                     "./echo", "/usr/bin/../bin/sh"])
def test_a_program_outside_the_list_is_refused_with_its_own_code(
        keys: Keys, workers: dict[str, str], program: str) -> None:
    done = run_exec(keys.client, [workers["small"]], "--", program, "-c", "echo pwned")
    assert done.returncode == exitcodes.NOT_ALLOWED == 246, done.stderr
    assert b"pwned" not in done.stdout
    assert f"{program}: not an allowed command".encode() in done.stderr


def test_a_worker_lookup_that_finds_nothing_is_127(keys: Keys, tmp_path: Path) -> None:
    addr = f"{loopback_address()}:3010"
    worker = start_worker(keys.worker, [], addr, "bare", "--commands", "no-such-tool-*")
    try:
        done = run_exec(keys.client, [addr], "--", "no-such-tool-x")
        assert done.returncode == 127, done.stderr
        assert b"command not found on this worker" in done.stderr
    finally:
        worker.stop()


def test_the_job_runs_in_the_clients_directory(keys: Keys, workers: dict[str, str],
                                                tmp_path: Path) -> None:
    for agent in ((), ("--no-agent",)):
        done = rexnet_exec(keys, [workers["small"]], "-v", *agent, "--", "pwd", cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        assert done.stdout.decode().strip() == str(tmp_path)
        assert f"it runs in {tmp_path}, the same path as here".encode() in done.stderr


def test_cwd_chooses_the_directory_and_a_missing_one_is_a_clear_error(
        keys: Keys, workers: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    done = rexnet_exec(keys, [workers["small"]], "--cwd", "sub", "--", "pwd", cwd=tmp_path)
    assert done.stdout.decode().strip() == str(tmp_path / "sub"), done.stderr
    missing = rexnet_exec(keys, [workers["small"]], "--cwd", "/no/such/place", "--", "pwd")
    assert missing.returncode == exitcodes.REFUSED, missing.stderr
    assert b"worker small has no directory /no/such/place" in missing.stderr
    assert missing.stdout == b""


def test_a_fixed_command_worker_keeps_its_directory(keys: Keys, tmp_path: Path) -> None:
    addr = f"{loopback_address()}:3010"
    worker = start_worker(keys.worker, ["pwd"], addr, "fixed", "--chdir", "/")
    try:
        plain = rexnet_exec(keys, [addr], cwd=tmp_path)
        assert plain.stdout == b"/\n", plain.stderr  # as before: the worker's directory
        asked = rexnet_exec(keys, [addr], "--cwd", str(tmp_path))
        assert asked.returncode == exitcodes.REFUSED
        assert b"--cwd is for command workers" in asked.stderr
    finally:
        worker.stop()


def test_all_runs_on_every_worker_with_prefixed_lines(keys: Keys,
                                                      workers: dict[str, str]) -> None:
    targets = [workers["small"], workers["big"]]
    done = run_exec(keys.client, targets, "--all", "--", "echo", "up")
    assert done.returncode == 0, done.stderr
    assert sorted(done.stdout.splitlines()) == [b"big: up", b"small: up"]
    grouped = run_exec(keys.client, targets, "--all", "--no-prefix", "--", "echo", "up")
    rule = b"-" * 16
    assert grouped.stdout == (rule + b"\nbig\n" + rule + b"\nup\n"
                              + rule + b"\nsmall\n" + rule + b"\nup\n"), grouped.stderr
    # the highest status wins; each failure is said with its worker's name
    failing = run_exec(keys.client, targets, "--all", "--", "sh", "-c", "exit 1")
    assert failing.returncode == exitcodes.NOT_ALLOWED
    assert failing.stderr.count(b"not an allowed command") == 2
    assert b"big: rexnet: " in failing.stderr and b"small: rexnet: " in failing.stderr
    mixed = run_exec(keys.client, targets, "--all", "--worker", "small", "--", "false")
    assert mixed.returncode == 1 and mixed.stdout == b"", mixed.stderr


def test_worker_picks_the_worker_by_name(keys: Keys, workers: dict[str, str]) -> None:
    targets = [workers["small"], workers["big"]]
    for name in ("small", "big", "small"):
        done = run_exec(keys.client, targets, "-v", "--worker", name, "--", "echo")
        assert done.returncode == 0, done.stderr
        assert f"runs on worker {name} (".encode() in done.stderr
    nobody = run_exec(keys.client, targets, "--worker", "nobody", "--timeout", "1", "--",
                      "echo")
    assert nobody.returncode == exitcodes.NO_WORKER
    assert b"the job asked for worker nobody" in nobody.stderr


def test_cpus_and_mem_choose_workers_with_room(keys: Keys, workers: dict[str, str]) -> None:
    targets = [workers["small"], workers["big"]]
    for _ in range(3):
        done = run_exec(keys.client, targets, "-v", "--cpus", "2", "--", "echo")
        assert b"runs on worker big (" in done.stderr, done.stderr
    too_many = run_exec(keys.client, targets, "--cpus", "4", "--timeout", "1", "--", "echo")
    assert too_many.returncode == exitcodes.NO_WORKER
    assert b"the job asked for 4 free slots" in too_many.stderr
    too_big = run_exec(keys.client, targets, "--mem", "1000T", "--timeout", "1", "--", "echo")
    assert too_big.returncode == exitcodes.NO_WORKER
    assert b"GiB of free memory" in too_big.stderr
    fits = run_exec(keys.client, targets, "--mem", "1M", "--", "echo", "ok")
    assert fits.stdout == b"ok\n", fits.stderr


def test_a_job_holds_its_cpus_and_status_shows_them(keys: Keys,
                                                    workers: dict[str, str]) -> None:
    targets = [workers["small"], workers["big"]]
    sleeper = subprocess.Popen(exec_argv(keys.client, [workers["big"]], "--cpus", "3", "--",
                                         "sleep", "30"), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)

    def status(*options: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([REXNET, "status", *options, "-a", targets[0], "-a", targets[1],
                               str(keys.client)], capture_output=True, text=True, timeout=30)

    try:
        table = ""
        for _ in range(40):
            table = status().stdout
            if any(line.startswith("big ") and " 3/3 " in line for line in table.splitlines()):
                break
        else:
            raise AssertionError(table)
        # big is full: a job goes to small, and status --best says so
        best = status("--best")
        assert best.stdout == "small\n", best.stderr
        nobody = status("--best", "--cpus", "2")
        assert nobody.returncode == exitcodes.NO_WORKER and nobody.stdout == ""
        done = run_exec(keys.client, targets, "-v", "--", "echo")
        assert b"runs on worker small (" in done.stderr, done.stderr
    finally:
        sleeper.kill()
        sleeper.wait()

