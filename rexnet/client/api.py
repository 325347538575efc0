"""The Python API of one job: run() (bytes in, bytes out) and run_streaming() (a producer
and consumers), with re-dispatch of a job lost before any output."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IConsumer
from twisted.logger import Logger

from rexnet.client.cluster import Cluster, Target
from rexnet.client.job import ClientJob
from rexnet.client.pystreams import BytesStreams, ProducerStreams
from rexnet.client.results import CompletedJob, JobFailed, JobResult, OutputLimit, WorkerLost
from rexnet.client.streams import JobStreams
from rexnet.client.warm import WarmPool
from rexnet.protocol.request import DEFAULT_TIMEOUT, ExecRequest
from rexnet.security.credentials import CertInfo, Credential
from rexnet.security.tls import Revocations

__all__ = ["DEFAULT_TIMEOUT", "Cluster", "Target", "dispatch", "run", "run_on", "run_streaming",
           "stream_on"]

log = Logger()

Env = Mapping[str, str] | Sequence[tuple[str, str]]


def env_pairs(env: Env) -> tuple[tuple[str, str], ...]:
    items = env.items() if isinstance(env, Mapping) else env
    return tuple((str(k), str(v)) for k, v in items)


def request_of(args: Sequence[str], env: Env = ()) -> ExecRequest:
    """The request of a job of the Python API: its extra ARGS and ENV."""
    return ExecRequest(args=tuple(args), env=env_pairs(env))


def _failure_details(error: JobFailed, job: ClientJob, streams: JobStreams,
                     attempt: int) -> None:
    """What the client knows about a failed job, on the error (see JobFailed)."""
    chosen = job.chosen
    if chosen is not None:
        error.worker = chosen.hello.worker if chosen.hello else CertInfo.of(
            chosen.peer_cert).name
        error.output_bytes = sum(chosen.ins[fd].received for fd in (1, 2)
                                 if fd in chosen.ins)
    if isinstance(streams, BytesStreams):
        error.stdout = streams.stdout.getvalue()
        error.stderr = streams.stderr.getvalue()
    error.attempts = attempt


async def dispatch(
    reactor: Any, cluster: Cluster, request: ExecRequest,
    make_streams: Callable[[], JobStreams], *, retries: int = 0,
    say: Callable[[str], None] | None = None,
    on_started: Callable[[str, str], None] | None = None, pool: WarmPool | None = None,
) -> tuple[JobResult, JobStreams, int]:
    """Run REQUEST on CLUSTER, again on WorkerLost before any output (up to RETRIES more
    times); its result, its last streams and the number of attempts."""
    if retries < 0:
        raise ValueError("retries must be >= 0")
    tell = say or (lambda message: log.info("{message}", message=message))
    attempt = 0
    while True:
        attempt += 1
        streams = make_streams()
        job = cluster.job(reactor, request, streams, say=tell, pool=pool,
                          on_started=on_started)
        try:
            result = await job.run()
        except JobFailed as error:
            _failure_details(error, job, streams, attempt)
            if isinstance(error, WorkerLost) and error.output_bytes == 0 and attempt <= retries:
                tell(f"{error}; the job had written no output: dispatching it again "
                     f"(attempt {attempt + 1} of {retries + 1})")
                continue
            raise
        return result, streams, attempt


def run_on(
    reactor: Any, cluster: Cluster, request: ExecRequest, stdin: bytes = b"", *,
    max_output: int | None = None, retries: int = 0,
    say: Callable[[str], None] | None = None,
    on_started: Callable[[str, str], None] | None = None, pool: WarmPool | None = None,
) -> defer.Deferred[CompletedJob]:
    """run() of REQUEST on CLUSTER (built once for many jobs)."""

    async def go() -> CompletedJob:
        result, streams, attempts = await dispatch(
            reactor, cluster, request, lambda: BytesStreams(stdin, max_output),
            retries=retries, say=say, on_started=on_started, pool=pool)
        assert isinstance(streams, BytesStreams)
        completed = CompletedJob(request.args, result.status, streams.stdout.getvalue(),
                                 streams.stderr.getvalue(), result.worker, result.address,
                                 result.job, result.signal, attempts)
        if streams.overflowed:
            which = " and ".join("stdout" if fd == 1 else "stderr"
                                 for fd in sorted(set(streams.overflowed)))
            error = OutputLimit(f"job {result.job} on worker {result.worker} wrote more than "
                                f"{max_output} bytes on {which}; the rest was discarded",
                                completed)
            error.worker, error.attempts = result.worker, attempts
            error.stdout, error.stderr = completed.stdout, completed.stderr
            raise error
        return completed

    return defer.Deferred.fromCoroutine(go())


def stream_on(
    reactor: Any, cluster: Cluster, request: ExecRequest, stdin: Any = None,
    stdout: IConsumer | None = None, stderr: IConsumer | None = None, *, retries: int = 0,
    say: Callable[[str], None] | None = None,
    on_started: Callable[[str, str], None] | None = None, pool: WarmPool | None = None,
) -> defer.Deferred[JobResult]:
    """run_streaming() of REQUEST on CLUSTER (built once for many jobs)."""
    if retries and stdin is not None:
        return defer.fail(ValueError("retries need stdin=None: a producer cannot be replayed"))
    if stdin is not None and not callable(getattr(stdin, "startProducing", None)):
        return defer.fail(TypeError("stdin must be a push producer with "
                                    "startProducing(consumer), as twisted.web's "
                                    "IBodyProducer (FileBodyProducer, BytesProducer)"))

    async def go() -> JobResult:
        result, _, _ = await dispatch(
            reactor, cluster, request, lambda: ProducerStreams(stdin, stdout, stderr),
            retries=retries, say=say, on_started=on_started, pool=pool)
        return result

    return defer.Deferred.fromCoroutine(go())


def run(
    reactor: Any,
    credential: Credential | str | os.PathLike[str],
    args: Sequence[str] = (),
    stdin: bytes = b"",
    announce: Sequence[Target] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    env: Env = (),
    max_output: int | None = None,
    retries: int = 0,
    say: Callable[[str], None] | None = None,
    alerts: Sequence[Target] | None = None,
    on_started: Callable[[str, str], None] | None = None,
    pool: WarmPool | None = None,
    revoked: Revocations | None = None,
) -> defer.Deferred[CompletedJob]:
    """Run one job with STDIN as its input; fires with a CompletedJob (its status, stdout,
    stderr and worker) or fails with a JobFailed subclass (NoWorker, AuthFailed, JobRefused,
    WorkerLost, LimitHit; OutputLimit past MAX_OUTPUT bytes on stdout or stderr).

    ARGS are the extra arguments (the worker must run with --allow-args); ANNOUNCE is where
    to announce ("ADDR[:PORT]", as `rexnet exec --announce`; default $GROUP, else the
    broadcast address); TIMEOUT bounds the search for a worker; ENV asks for variables the
    worker may accept. With RETRIES, a job whose worker is lost before the client received
    any of its output runs again (on whichever worker answers next); one that produced
    output fails with WorkerLost, never silently rerun. SAY gets progress messages (default:
    Twisted's log); ON_STARTED(worker, job_id) is called when the job runs somewhere;
    ALERTS are crat addresses (default: the announce targets on port 3011). POOL keeps the
    job's channel warm afterwards, and runs it on a warm channel if one is a good choice
    (see rexnet.client.warm). REVOKED lists workers to refuse
    (rexnet.security.revocation.open_list; by default APP.revoked beside CREDENTIAL's file,
    if there is one, as for `rexnet exec`).
    """

    try:
        cluster = Cluster.build(credential, announce, alerts, timeout, revoked)
    except Exception:
        return defer.fail()
    return run_on(reactor, cluster, request_of(args, env), stdin, max_output=max_output,
                  retries=retries, say=say, on_started=on_started, pool=pool)


def run_streaming(
    reactor: Any,
    credential: Credential | str | os.PathLike[str],
    args: Sequence[str] = (),
    stdin: Any = None,
    stdout: IConsumer | None = None,
    stderr: IConsumer | None = None,
    announce: Sequence[Target] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    env: Env = (),
    retries: int = 0,
    say: Callable[[str], None] | None = None,
    alerts: Sequence[Target] | None = None,
    on_started: Callable[[str, str], None] | None = None,
    pool: WarmPool | None = None,
    revoked: Revocations | None = None,
) -> defer.Deferred[JobResult]:
    """Run one job streaming: STDIN is a push producer with startProducing(consumer) (as
    twisted.web's IBodyProducer; None: empty input), STDOUT and STDERR are IConsumers that
    may pause the stream (None: discarded). Fires with a JobResult once every byte of
    output was written to the consumers, or fails as run() does. RETRIES (as for run())
    needs STDIN None: a producer cannot be replayed. POOL (a rexnet.client.warm.WarmPool) lets
    jobs reuse warm channels, as for run()."""
    try:
        cluster = Cluster.build(credential, announce, alerts, timeout, revoked)
    except Exception:
        return defer.fail()
    return stream_on(reactor, cluster, request_of(args, env), stdin, stdout, stderr,
                     retries=retries, say=say, on_started=on_started, pool=pool)
