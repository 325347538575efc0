"""`rexnet parallel` through real workers: exit status, grouping and order of outputs,
inputs, the progress line; in the namespace bed, jobs spread over two workers and are
re-dispatched when their worker dies before any output (and only then)."""

from __future__ import annotations

import collections
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from cluster import REXNET, Proc, loopback_address, start_worker
from conftest import Keys
from netbed import Host, NetBed

from rexnet.client.parallel import job_arguments, split_arguments
from rexnet.protocol import exitcodes

SHELL = ["sh", "-c"]
BROADCAST = "255.255.255.255:3010"


def parallel_argv(keys: Keys, announce: Sequence[str], *options: str) -> list[str]:
    """rexnet parallel with OPTIONS; what follows "--" in OPTIONS goes after KEYFILE."""
    opts = list(options)
    rest: list[str] = []
    if "--" in opts:
        rest = opts[opts.index("--"):]
        opts = opts[: opts.index("--")]
    argv = [REXNET, "parallel"]
    for target in announce:
        argv += ["--announce", target]
    return [*argv, *opts, str(keys.client), *rest]


@pytest.fixture(scope="module")
def shell_worker(keys: Keys) -> Iterator[str]:
    addr = f"{loopback_address()}:3010"
    proc = start_worker(keys.worker, SHELL, addr, "shelly", "--allow-args", "--slots", "4")
    yield addr
    proc.stop()


def parallel(keys: Keys, addr: str, *options: str, input: bytes = b"",
             timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(parallel_argv(keys, [addr], *options), input=input,
                          capture_output=True, timeout=timeout)


def test_arguments_of_each_job() -> None:
    assert split_arguments(["-q", "{}", ":::", "a", "b"]) == (["-q", "{}"], ["a", "b"])
    assert split_arguments(["-q"]) == (["-q"], None)
    assert split_arguments([":::"]) == ([], [])
    with pytest.raises(ValueError):
        split_arguments(["x", ":::", "a", ":::", "b"])
    assert job_arguments(["--in={}", "-o", "{}.out"], "f") == ("--in=f", "-o", "f.out")
    assert job_arguments(["-q"], "f g") == ("-q", "f g")
    assert job_arguments([], "v") == ("v",)


# -- on loopback --------------------------------------------------------------------------


def test_exit_status_is_the_number_of_failed_jobs(keys: Keys, shell_worker: str) -> None:
    done = parallel(keys, shell_worker, "--jobs", "3", "--", "echo {}; exit {}",
                    ":::", "0", "3", "0", "1", "0")
    assert done.returncode == 2, done.stderr
    assert sorted(done.stdout.split()) == [b"0", b"0", b"0", b"1", b"3"]
    err = done.stderr.decode()
    assert "failed: input '3': exit status 3 on shelly" in err
    assert "failed: input '1': exit status 1 on shelly" in err
    assert "5 job(s): 3 succeeded, 2 failed" in err
    assert "per worker: shelly 5" in err
    assert "\r" not in err  # no progress line: stderr is no terminal


def test_exit_status_is_capped_at_101(keys: Keys, shell_worker: str) -> None:
    values = [str(n) for n in range(103)]
    done = parallel(keys, shell_worker, "--jobs", "4", "--", "exit 1", ":::", *values)
    assert done.returncode == 101, done.stderr
    assert "103 job(s): 0 succeeded, 103 failed" in done.stderr.decode()
    assert "... and 93 more failed" in done.stderr.decode()


def test_no_failures_exit_0_and_a_rexnet_error_counts_as_a_failure(keys: Keys,
                                                                   shell_worker: str) -> None:
    done = parallel(keys, shell_worker, "--", "true", ":::", "a", "b")
    assert done.returncode == 0, done.stderr
    nobody = f"{loopback_address()}:3010"
    lost = parallel(keys, nobody, "--timeout", "0.5", "--", "true", ":::", "a", "b")
    assert lost.returncode == 2
    assert "failed: input 'a': no worker answered within 0.5 s" in lost.stderr.decode()


def test_each_jobs_output_stays_together(keys: Keys, shell_worker: str) -> None:
    script = ("for i in 1 2 3 4 5; do echo {}-$i; echo {}-err-$i >&2; sleep 0.05; done; "
              "head -c 300000 /dev/zero | tr '\\0' {}; echo")
    values = list("abcdef")
    done = parallel(keys, shell_worker, "--jobs", "6", "--", script, ":::", *values)
    assert done.returncode == 0, done.stderr
    out = done.stdout.decode()
    blocks = re.findall(r"((\w)-1\n\2-2\n\2-3\n\2-4\n\2-5\n\2{300000}\n)", out)
    assert sorted(v for _, v in blocks) == values
    assert len(out) == sum(len(b) for b, _ in blocks)
    err = done.stderr.decode()
    for v in values:
        assert f"{v}-err-1\n{v}-err-2\n{v}-err-3\n{v}-err-4\n{v}-err-5\n" in err


def test_keep_order_prints_in_input_order(keys: Keys, shell_worker: str) -> None:
    values = ["5", "1", "4", "0", "3", "2"]
    script = "sleep 0.{}; echo {}"
    kept = parallel(keys, shell_worker, "--jobs", "6", "--keep-order", "--", script,
                    ":::", *values)
    assert kept.returncode == 0, kept.stderr
    assert kept.stdout.decode().split() == values
    loose = parallel(keys, shell_worker, "--jobs", "6", "--", script, ":::", *values)
    assert sorted(loose.stdout.decode().split()) == sorted(values)


def test_inputs_from_stdin_and_the_input_appended_without_braces(keys: Keys,
                                                                 shell_worker: str) -> None:
    done = parallel(keys, shell_worker, "-k", "--", 'echo "got $0"',
                    input=b"one\ntwo words\nthree\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"got one\ngot two words\ngot three\n"


def test_bad_command_lines(keys: Keys, shell_worker: str) -> None:
    twice = parallel(keys, shell_worker, "--", "echo", ":::", "a", ":::", "b")
    assert twice.returncode == exitcodes.USAGE
    assert b"only one ::: is supported" in twice.stderr
    jobs = parallel(keys, shell_worker, "--jobs", "0", "--", "echo", ":::", "a")
    assert jobs.returncode == exitcodes.USAGE


def test_progress_line_only_on_a_terminal(keys: Keys, shell_worker: str) -> None:
    primary, secondary = pty.openpty()
    try:
        proc = subprocess.Popen(
            parallel_argv(keys, [shell_worker], "--jobs", "2", "--", "sleep 0.2; echo {}",
                          ":::", "a", "b", "c", "d"),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=secondary)
        os.close(secondary)
        err = b""
        while True:
            ready, _, _ = select.select([primary], [], [], 30)
            if not ready:
                break
            try:
                chunk = os.read(primary, 4096)
            except OSError:  # the terminal is gone: everything was read
                break
            if not chunk:
                break
            err += chunk
        assert proc.wait(30) == 0
        assert proc.stdout is not None
        assert sorted(proc.stdout.read().split()) == [b"a", b"b", b"c", b"d"]
    finally:
        os.close(primary)
    text = err.decode()
    assert re.search(r"\r\x1b\[Krexnet parallel: \d/4 done, 0 failed, \d running", text)
    assert re.search(r"done, 0 failed, \d running \| shelly \d(\+\d)?", text)  # per worker
    assert re.search(r"rexnet: 4 job\(s\): 4 succeeded, 0 failed in [\d.]+ s; "
                     r"per worker: shelly 4\s*$", text), text
    last = text.rsplit("\r\x1b[K", 1)[-1]  # the progress line is cleared before the summary
    assert last.startswith("rexnet: 4 job(s)")


def test_an_interrupted_run_ends_its_jobs_and_says_so(keys: Keys, shell_worker: str) -> None:
    proc = subprocess.Popen(
        parallel_argv(keys, [shell_worker], "--jobs", "2", "--", "echo {}; sleep 30",
                      ":::", "a", "b", "c"),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGINT
    text = err.decode()
    assert "interrupted by signal 2: the running jobs are ended" in text
    assert "3 job(s): 0 succeeded, 0 failed, 2 interrupted, 1 not run" in text
    assert "failed: input" not in text and out == b""


# -- in the namespace bed ---------------------------------------------------------------


def lan(bed: NetBed, *names: str) -> list[Host]:
    subnet = bed.add_subnet("lan")
    return [bed.add_host(name, [subnet]) for name in names]


def worker_on(host: Host, keys: Keys, *options: str) -> Proc:
    return start_worker(keys.worker, SHELL, "0.0.0.0:3010", host.name, "--allow-args",
                        *options, popen=host.popen)


def in_bed(client: Host, keys: Keys, *options: str) -> subprocess.Popen[bytes]:
    return client.popen(parallel_argv(keys, [BROADCAST], *options),
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def started_on(workers: dict[str, Proc], timeout: float = 20) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, proc in workers.items():
            if re.search(r"job \w+ started", proc.output):
                return name
        time.sleep(0.02)
    raise AssertionError("no worker started the job")


def test_jobs_spread_over_two_workers(bed: NetBed, keys: Keys) -> None:
    client, w1, w2 = lan(bed, "client", "w1", "w2")
    worker_on(w1, keys, "--slots", "2")
    worker_on(w2, keys, "--slots", "2")
    values = [str(n) for n in range(8)]
    job = in_bed(client, keys, "--jobs", "4", "--keep-order", "--",
                 "echo {} start; sleep 1; echo {} on $REXNET_WORKER", ":::", *values)
    out, err = job.communicate(timeout=120)
    assert job.returncode == 0, err
    lines = out.decode().splitlines()
    assert [line.split()[0] for line in lines] == [v for v in values for _ in (1, 2)]
    placed = collections.Counter(line.split()[-1] for line in lines[1::2])
    assert set(placed) == {"w1", "w2"}, placed
    summary = err.decode().strip().splitlines()[-1]
    assert f"per worker: w1 {placed['w1']}, w2 {placed['w2']}" in summary


def test_a_job_whose_worker_dies_before_any_output_runs_again(bed: NetBed,
                                                               keys: Keys) -> None:
    client, w1, w2 = lan(bed, "client", "w1", "w2")
    workers = {"w1": worker_on(w1, keys, "--slots", "1"),
               "w2": worker_on(w2, keys, "--slots", "1")}
    job = in_bed(client, keys, "--retries", "2", "--",
                 "sleep 3; echo {} ran on $REXNET_WORKER", ":::", "x")
    doomed = started_on(workers)
    workers[doomed].stop(signal.SIGKILL)
    out, err = job.communicate(timeout=60)
    other = "w2" if doomed == "w1" else "w1"
    assert job.returncode == 0, err
    assert out == f"x ran on {other}\n".encode()
    text = err.decode()
    assert f"input 'x': {doomed} was lost before the job wrote anything; it runs again " \
           f"on {other}" in text
    assert "1 job(s): 1 succeeded, 0 failed, 1 re-dispatched" in text


def test_a_job_that_wrote_output_is_not_run_again(bed: NetBed, keys: Keys,
                                                  tmp_path: Path) -> None:
    client, w1, w2 = lan(bed, "client", "w1", "w2")
    # without the sandbox: the job writes the marker into the test's /tmp (a sandboxed job
    # has a /tmp of its own)
    workers = {"w1": worker_on(w1, keys, "--slots", "1", "--no-sandbox"),
               "w2": worker_on(w2, keys, "--slots", "1", "--no-sandbox")}
    marker = tmp_path / "wrote"  # the hosts share the file system
    job = in_bed(client, keys, "--retries", "2", "--",
                 f"echo {{}} first; touch {marker}; sleep 10; echo never", ":::", "x")
    doomed = started_on(workers)
    deadline = time.monotonic() + 20
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(1.0)  # the output crosses the bridge to the client
    workers[doomed].stop(signal.SIGKILL)
    out, err = job.communicate(timeout=60)
    assert job.returncode == 1, err
    assert out == b"x first\n"  # what the job wrote before its worker died
    text = err.decode()
    assert f"failed: input 'x': lost worker {doomed} before the job finished" in text
    assert "runs again" not in text
    other = "w2" if doomed == "w1" else "w1"
    assert not re.search(r"job \w+ started", workers[other].output)


def test_thousands_of_jobs_that_fail_at_once(bed: NetBed, keys: Keys) -> None:
    """No route to the announce target: every job fails before it is announced (at once,
    not after --timeout), and neither parallel nor the Executor recurses job after job."""
    lonely = bed.add_host("lonely")  # loopback only
    values = [str(n) for n in range(2000)]
    done = lonely.run(parallel_argv(keys, ["10.9.9.9"], "--jobs", "3", "--", "true", ":::",
                                    *values), timeout=120)
    assert done.returncode == 101, done.stderr
    assert "2000 job(s): 0 succeeded, 2000 failed" in done.stderr
    assert "no announce target can be reached from this host" in done.stderr
    script = ("from rexnet import Executor\n"
              "from rexnet.client import NoWorker\n"
              f"with Executor({str(keys.client)!r}, announce=['10.9.9.9'], max_jobs=2) as ex:\n"
              "    futures = [ex.submit(['true']) for _ in range(2000)]\n"
              "print(sum(isinstance(f.exception(), NoWorker) for f in futures))\n")
    executor = lonely.run([sys.executable, "-c", script], timeout=120)
    assert executor.stdout.strip() == "2000", executor.stderr
