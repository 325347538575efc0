"""The Python API through real workers on loopback: rexnet.client.run (Twisted),
rexnet.Executor (threads and futures), re-dispatch after a lost worker, remote calls."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cluster import Proc, loopback_address, start_worker
from conftest import Keys
from twisted.internet.interfaces import IConsumer
from twisted.internet.threads import blockingCallFromThread
from zope.interface import implementer

import rexnet
from rexnet.client import api as client
from rexnet.client.executor import CallFailed, Executor, running_reactor
from rexnet.client.results import CompletedJob, JobRefused, NoWorker, OutputLimit, WorkerLost
from rexnet.protocol import exitcodes
from rexnet.protocol.remotecall import RemoteError

SHELL = ["sh", "-c"]
TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def shell_worker(keys: Keys) -> Iterator[str]:
    """A worker running `sh -c SCRIPT` (SCRIPT from the client); its announce address."""
    addr = f"{loopback_address()}:3010"
    proc = start_worker(keys.worker, SHELL, addr, "shelly", "--allow-args", "--slots", "4")
    yield addr
    proc.stop()


@pytest.fixture(scope="module")
def python_worker(keys: Keys) -> Iterator[str]:
    """A worker with --python that can import this module (the same code on every host)."""
    addr = f"{loopback_address()}:3010"
    env = dict(os.environ, PYTHONPATH=str(TESTS))

    def popen(argv: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        return subprocess.Popen(argv, env=env, **kw)

    proc = start_worker(keys.worker, [], addr, "pyworker", "--python", "--slots", "4",
                        popen=popen)
    yield addr
    proc.stop()


def twisted_run(**kwargs: Any) -> Any:
    """rexnet.client.run in the reactor thread, from this (test) thread."""
    reactor = running_reactor()

    def call() -> Any:
        return client.run(reactor, **kwargs)

    return blockingCallFromThread(reactor, call)


# -- rexnet.client.run ------------------------------------------------------------------


def test_run_gives_status_stdout_stderr_and_worker(keys: Keys, shell_worker: str) -> None:
    data = os.urandom(3_000_000)  # more than the stream window: flow control on stdin
    done = twisted_run(credential=keys.client, args=["cat; echo err >&2; exit 3"],
                       stdin=data, announce=[shell_worker], timeout=10)
    assert isinstance(done, CompletedJob)
    assert (done.returncode, done.stdout, done.stderr) == (3, data, b"err\n")
    assert done.worker == "shelly" and done.attempts == 1 and len(done.job) == 12
    with pytest.raises(subprocess.CalledProcessError) as info:
        done.check_returncode()
    assert info.value.returncode == 3 and info.value.stderr == b"err\n"


def test_run_status_of_a_killed_job_is_128_plus_the_signal(keys: Keys,
                                                           shell_worker: str) -> None:
    done = twisted_run(credential=keys.client, args=["kill -TERM $$"],
                       announce=[shell_worker])
    assert done.returncode == 128 + signal.SIGTERM and done.signal == signal.SIGTERM


def test_run_fails_with_no_worker_after_a_short_timeout(keys: Keys) -> None:
    nobody = f"{loopback_address()}:3010"
    t0 = time.monotonic()
    with pytest.raises(NoWorker, match=r"no worker answered within 0\.5 s") as info:
        twisted_run(credential=keys.client, args=["true"], announce=[nobody], timeout=0.5)
    assert time.monotonic() - t0 < 5
    assert info.value.exit_code == exitcodes.NO_WORKER
    assert info.value.worker is None and info.value.output_bytes == 0


def test_run_fails_with_job_refused_when_arguments_are_not_allowed(keys: Keys) -> None:
    addr = f"{loopback_address()}:3010"
    strict = start_worker(keys.worker, ["echo"], addr, "strict")
    try:
        with pytest.raises(JobRefused, match="does not accept extra arguments"):
            twisted_run(credential=keys.client, args=["hello"], announce=[addr])
        plain = twisted_run(credential=keys.client, announce=[addr])
        assert plain.stdout == b"\n" and plain.worker == "strict"
    finally:
        strict.stop()


def test_run_bounds_the_output_it_keeps(keys: Keys, shell_worker: str) -> None:
    with pytest.raises(OutputLimit, match="more than 1000 bytes on stdout") as info:
        twisted_run(credential=keys.client, args=["yes | head -c 5000000; echo tail >&2"],
                    announce=[shell_worker], max_output=1000)
    result = info.value.result
    assert result.stdout == b"y\n" * 500 and result.stderr == b"tail\n"
    assert result.worker == "shelly"


@implementer(IConsumer)
class SlowConsumer:
    """An IConsumer that pauses its producer after every write and resumes it later."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.data = io.BytesIO()
        self.producer: Any = None
        self.pauses = 0

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        assert streaming
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def write(self, data: bytes) -> None:
        self.data.write(data)
        if self.producer is not None:
            self.pauses += 1
            self.producer.pauseProducing()
            self.reactor.callLater(0.001, self._resume)

    def _resume(self) -> None:
        if self.producer is not None:
            self.producer.resumeProducing()


def test_run_streaming_takes_a_producer_and_consumers(keys: Keys, shell_worker: str) -> None:
    from twisted.web.client import FileBodyProducer

    reactor = running_reactor()
    data = os.urandom(2_500_000)
    consumers: dict[str, SlowConsumer] = {}

    def start() -> Any:
        consumers["out"], consumers["err"] = SlowConsumer(reactor), SlowConsumer(reactor)
        return client.run_streaming(reactor, keys.client, ["cat; echo done >&2"],
                                    FileBodyProducer(io.BytesIO(data)), consumers["out"],
                                    consumers["err"], [shell_worker])

    result = blockingCallFromThread(reactor, start)
    assert result.status == 0 and result.worker == "shelly"
    assert consumers["out"].data.getvalue() == data
    assert consumers["err"].data.getvalue() == b"done\n"
    assert consumers["out"].pauses > 1  # the consumer paced the stream


# -- rexnet.Executor --------------------------------------------------------------------


def test_executor_submit_and_map(keys: Keys, shell_worker: str) -> None:
    with rexnet.Executor(keys.client, announce=[shell_worker], max_jobs=3) as ex:
        first = ex.submit(["cat; echo $REXNET_WORKER >&2; exit 4"], input=b"in")
        done = first.result(30)
        assert (done.returncode, done.stdout, done.stderr, done.worker) == (
            4, b"in", b"shelly\n", "shelly")
        counted = list(ex.map(["wc -c"], [b"", b"a", b"bb" * 1000, b"ccc"]))
        assert [r.stdout.strip() for r in counted] == [b"0", b"1", b"2000", b"3"]
        assert ex.workers["shelly"] == 5


def test_executor_jobs_of_many_requests_each_run_their_own(keys: Keys,
                                                           shell_worker: str) -> None:
    """Warm jobs of one request share its START frame (built and encoded once): jobs of
    many requests, more than are kept, interleaved on the same warm channels, each still
    run their own arguments."""
    with rexnet.Executor(keys.client, announce=[shell_worker], max_jobs=2) as ex:
        asked = [f"echo {i}" for i in range(80)] * 2
        got = [f.result(60).stdout for f in [ex.submit([cmd]) for cmd in asked]]
    assert got == [f"{cmd[5:]}\n".encode() for cmd in asked]
    assert ex._pool.reused > 100  # they ran on warm channels


def test_executor_and_run_on_a_cluster_built_once(keys: Keys, shell_worker: str) -> None:
    cluster = client.Cluster.build(keys.client, [shell_worker], timeout=10)
    with Executor(cluster, max_jobs=2) as ex:
        done = [f.result(60) for f in [ex.submit(["echo $REXNET_WORKER"]) for _ in range(3)]]
    assert [d.stdout for d in done] == [b"shelly\n"] * 3
    reactor = running_reactor()
    request = client.request_of(["cat; echo x"])

    def call() -> Any:
        return client.run_on(reactor, cluster, request, b"in ")

    got = blockingCallFromThread(reactor, call)
    assert got.stdout == b"in x\n" and got.args == ("cat; echo x",)
    with pytest.raises(TypeError, match="give announce, alerts and timeout to the Cluster"):
        Executor(cluster, announce=[shell_worker])


def test_executor_max_jobs_bounds_concurrency(keys: Keys, shell_worker: str) -> None:
    script = "date +%s.%N; sleep 0.4; date +%s.%N"
    with Executor(keys.client, announce=[shell_worker], max_jobs=2) as ex:
        spans = [tuple(map(float, f.result(60).stdout.split()))
                 for f in [ex.submit([script]) for _ in range(6)]]
    events = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    assert peak == 2, spans


def test_executor_errors_come_through_the_future(keys: Keys) -> None:
    nobody = f"{loopback_address()}:3010"
    with Executor(keys.client, announce=[nobody], timeout=0.3) as ex:
        future = ex.submit(["true"])
        assert isinstance(future.exception(30), NoWorker)
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.submit(["true"])
    with pytest.raises(TypeError):
        ex.submit("not a list of arguments")  # type: ignore[call-overload]


def test_executor_shutdown_waits_for_every_job(keys: Keys, shell_worker: str) -> None:
    ex = Executor(keys.client, announce=[shell_worker], max_jobs=2)
    futures = [ex.submit(["sleep 0.3; echo ok"]) for _ in range(4)]
    ex.shutdown(wait=True)
    assert all(f.done() and f.result().stdout == b"ok\n" for f in futures)


def test_executor_shutdown_can_cancel_what_has_not_started(keys: Keys,
                                                           shell_worker: str) -> None:
    ex = Executor(keys.client, announce=[shell_worker], max_jobs=1)
    futures = [ex.submit(["sleep 1; echo ran"]) for _ in range(4)]
    deadline = time.monotonic() + 10
    while not futures[0].running() and time.monotonic() < deadline:
        time.sleep(0.01)
    t0 = time.monotonic()
    ex.shutdown(wait=True, cancel_futures=True)
    assert time.monotonic() - t0 < 5
    assert futures[0].result().stdout == b"ran\n"  # the running job was not interrupted
    assert all(f.cancelled() for f in futures[1:])


def test_executor_shutdown_without_waiting(keys: Keys, shell_worker: str) -> None:
    ex = Executor(keys.client, announce=[shell_worker], max_jobs=4)
    future = ex.submit(["sleep 0.5; echo late"])
    t0 = time.monotonic()
    ex.shutdown(wait=False)
    assert time.monotonic() - t0 < 0.3 and not future.done()
    assert future.result(30).stdout == b"late\n"


# -- re-dispatch after a lost worker ----------------------------------------------------


@pytest.fixture
def two_workers(keys: Keys) -> Iterator[dict[str, tuple[Proc, str]]]:
    """Two single-slot shell workers, a and b, by name: (process, announce address)."""
    workers = {}
    for name in ("a", "b"):
        addr = f"{loopback_address()}:3010"
        workers[name] = (start_worker(keys.worker, SHELL, addr, name, "--allow-args",
                                      "--slots", "1"), addr)
    yield workers
    for proc, _ in workers.values():
        proc.stop()


def which_started(workers: dict[str, tuple[Proc, str]], timeout: float = 15) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, (proc, _) in workers.items():
            if "started for client" in proc.output:
                return name
        time.sleep(0.02)
    raise AssertionError("no worker started the job")


def test_executor_retries_a_job_whose_worker_died_before_any_output(
        keys: Keys, two_workers: dict[str, tuple[Proc, str]]) -> None:
    announce = [addr for _, addr in two_workers.values()]
    with Executor(keys.client, announce=announce, retries=1) as ex:
        future = ex.submit(["sleep 2; echo ran on $REXNET_WORKER"])
        doomed = which_started(two_workers)
        two_workers[doomed][0].stop(signal.SIGKILL)
        done = future.result(60)
    other = "b" if doomed == "a" else "a"
    assert done.returncode == 0, done
    assert done.stdout == f"ran on {other}\n".encode()
    assert done.worker == other and done.attempts == 2


def test_without_retries_a_lost_worker_is_a_worker_lost_error(
        keys: Keys, two_workers: dict[str, tuple[Proc, str]]) -> None:
    announce = [addr for _, addr in two_workers.values()]
    with Executor(keys.client, announce=announce) as ex:
        future = ex.submit(["sleep 2; echo never"])
        doomed = which_started(two_workers)
        two_workers[doomed][0].stop(signal.SIGKILL)
        error = future.exception(60)
    assert isinstance(error, WorkerLost)
    assert error.worker == doomed and error.output_bytes == 0 and error.attempts == 1


@implementer(IConsumer)
class Collector:
    """Collects a stream and says when the first bytes arrived."""

    def __init__(self) -> None:
        self.data = b""
        self.arrived = threading.Event()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        pass

    def unregisterProducer(self) -> None:
        pass

    def write(self, data: bytes) -> None:
        self.data += data
        self.arrived.set()


def test_a_job_that_wrote_output_is_never_rerun(
        keys: Keys, two_workers: dict[str, tuple[Proc, str]]) -> None:
    reactor = running_reactor()
    announce = [addr for _, addr in two_workers.values()]
    out = Collector()
    outcome: dict[str, Any] = {}
    finished = threading.Event()

    def ended(result: object) -> None:
        outcome["result"] = result
        finished.set()

    def start() -> None:
        running = client.run_streaming(reactor, keys.client, ["echo first; sleep 10"],
                                       stdout=out, announce=announce, retries=3)
        running.addBoth(ended)

    reactor.callFromThread(start)
    assert out.arrived.wait(30)  # the client has received output: no rerun from here on
    doomed = which_started(two_workers)
    two_workers[doomed][0].stop(signal.SIGKILL)
    assert finished.wait(30)
    error = outcome["result"].value
    assert isinstance(error, WorkerLost), outcome
    assert error.worker == doomed and error.output_bytes == len(b"first\n")
    assert error.attempts == 1 and out.data == b"first\n"
    other = "b" if doomed == "a" else "a"
    time.sleep(0.5)
    assert "started for client" not in two_workers[other][0].output


# -- remote calls -----------------------------------------------------------------------


class Unpicklable(Exception):
    def __init__(self) -> None:
        super().__init__("cannot travel")
        self.lock = threading.Lock()


def where_am_i(greeting: str, *, punctuation: str = "!") -> tuple[str, str, int]:
    print("this goes to stderr, not into the result")
    return f"{greeting}{punctuation}", os.environ["REXNET_WORKER"], os.getpid()


def fails(number: int) -> None:
    if number > 1:
        raise ValueError(f"bad number {number}")


def fails_unpicklably() -> None:
    raise Unpicklable()


def test_call_returns_the_value(keys: Keys, python_worker: str,
                                capfd: pytest.CaptureFixture[str]) -> None:
    with Executor(keys.client, announce=[python_worker]) as ex:
        greeting, worker, pid = ex.call(where_am_i, "hello", punctuation="?")
        assert (greeting, worker) == ("hello?", "pyworker") and pid != os.getpid()
        assert ex.call(lambda x, y: x * y, 6, 7) == 42  # by value, with cloudpickle
        offset = 100
        assert list(ex.map(lambda x: x + offset, range(5))) == [100, 101, 102, 103, 104]
        assert ex.submit(sorted, [3, 1, 2], reverse=True).result(30) == [3, 2, 1]
    assert "this goes to stderr, not into the result" in capfd.readouterr().err


def test_call_reraises_the_remote_exception_with_its_traceback(keys: Keys,
                                                               python_worker: str) -> None:
    with Executor(keys.client, announce=[python_worker]) as ex:
        with pytest.raises(ValueError, match="bad number 7") as info:
            ex.call(fails, 7)
        remote_tb = info.value.remote_traceback  # type: ignore[attr-defined]
        assert "Traceback (most recent call last)" in remote_tb
        assert 'raise ValueError(f"bad number {number}")' in remote_tb
        assert "in fails" in remote_tb
        notes = info.value.__notes__
        assert notes[0].startswith("remote traceback (worker pyworker):")
        with pytest.raises(RemoteError, match="Unpicklable: cannot travel") as raised:
            ex.call(fails_unpicklably)
        assert "in fails_unpicklably" in raised.value.remote_traceback
        assert ex.call(fails, 1) is None


def test_call_on_a_command_worker_is_a_call_failed_error(keys: Keys,
                                                         shell_worker: str) -> None:
    with (Executor(keys.client, announce=[shell_worker]) as ex,
          pytest.raises(CallFailed, match="is it a `rexnet-worker --python`")):
        ex.call(abs, -1)


def test_a_command_job_on_a_python_worker_is_told_what_the_worker_is(
        keys: Keys, python_worker: str) -> None:
    with Executor(keys.client, announce=[python_worker]) as ex:
        done = ex.submit([], input=b"echo hello").result(30)
    assert done.returncode == 2
    assert b"this worker runs Python calls" in done.stderr


def test_worker_python_option(keys: Keys) -> None:
    import sys

    from twisted.python import usage

    from rexnet.protocol.remotecall import RUNNER_ARGV
    from rexnet.worker.tap import Options

    def parse(*args: str) -> Options:
        options = Options()
        options.parseOptions(list(args))
        return options

    assert parse("--python", str(keys.worker))["command"] == (sys.executable, *RUNNER_ARGV)
    with pytest.raises(usage.UsageError, match="give no COMMAND"):
        parse("--python", str(keys.worker), "cat")
    with pytest.raises(usage.UsageError, match="does not go with --python"):
        parse("--python", "--allow-args", str(keys.worker))
    with pytest.raises(usage.UsageError, match="Wrong number of arguments"):
        parse(str(keys.worker))
