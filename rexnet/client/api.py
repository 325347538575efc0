"""The Python API of one job: run() (bytes in, bytes out) and run_streaming() (a producer
and consumers), with re-dispatch of a job lost before any output."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IConsumer
from twisted.logger import Logger

from rexnet.client.job import DEFAULT_TIMEOUT, ClientJob
from rexnet.client.pystreams import BytesStreams, ProducerStreams
from rexnet.client.results import CompletedJob, JobFailed, JobResult, OutputLimit, WorkerLost
from rexnet.client.streams import JobStreams
from rexnet.client.warm import WarmPool
from rexnet.net.alerts import AlertSender
from rexnet.protocol import wire
from rexnet.security.credentials import CertInfo, Credential
from rexnet.security.tls import Revocations

DEFAULT_ANNOUNCE = "255.255.255.255"

log = Logger()

def client_credential(credential: Credential | str | os.PathLike[str]) -> Credential:
    """A client credential, or the path of one to load (CredentialError if it is refused)."""
    if isinstance(credential, Credential):
        return credential
    from pathlib import Path

    from rexnet.security.credentials import load_credential

    return load_credential(Path(credential), "client")


def revocations_beside(credential: Credential | str | os.PathLike[str],
                       loaded: Credential) -> Revocations | None:
    """APP.revoked beside CREDENTIAL's file, if it is a path and there is one (the default
    of `rexnet exec`); CredentialError if that list cannot be read."""
    if isinstance(credential, Credential):
        return None
    from pathlib import Path

    from rexnet.security.revocation import open_list

    return open_list(None, Path(credential), loaded.app)


Target = str | tuple[str, int]


def announce_targets(announce: Sequence[Target] | None = None) -> list[tuple[str, int]]:
    """Targets from "ADDR[:PORT]" texts (or pairs); none: $GROUP, else the broadcast address,
    as `rexnet exec` does. ValueError for a bad address."""
    from rexnet.net.announce import parse_target

    texts: list[Target] = list(announce) if announce else [
        os.environ.get("GROUP") or DEFAULT_ANNOUNCE]
    return [(t[0], int(t[1])) if isinstance(t, tuple) else parse_target(t) for t in texts]


def _env_pairs(env: Mapping[str, str] | Sequence[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    items = env.items() if isinstance(env, Mapping) else env
    return tuple((str(k), str(v)) for k, v in items)


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


async def _dispatch(
    reactor: Any,
    credential: Credential | str | os.PathLike[str],
    args: Sequence[str],
    make_streams: Callable[[], JobStreams],
    announce: Sequence[Target] | None,
    timeout: float,
    env: Mapping[str, str] | Sequence[tuple[str, str]],
    retries: int,
    say: Callable[[str], None] | None,
    alerts: Sequence[Target] | None,
    on_started: Callable[[str, str], None] | None,
    pool: WarmPool | None = None,
    revoked: Revocations | None = None,
) -> tuple[JobResult, JobStreams, int]:
    """Run one job, again on WorkerLost before any output (up to RETRIES more times)."""
    from rexnet.net.alerts import CRAT_PORT, crat_targets
    from rexnet.net.announce import parse_target

    cred = client_credential(credential)
    if revoked is None:
        revoked = revocations_beside(credential, cred)
    targets = announce_targets(announce)
    alert_to = crat_targets(targets) if alerts is None else [
        (t[0], int(t[1])) if isinstance(t, tuple) else parse_target(t, CRAT_PORT)
        for t in alerts]
    if retries < 0 or timeout <= 0:
        raise ValueError("retries must be >= 0 and timeout positive")
    tell = say or (lambda message: log.info("{message}", message=message))
    request = wire.Start(tuple(args), _env_pairs(env))
    attempt = 0
    while True:
        attempt += 1
        streams = make_streams()
        sender = (pool.alerts(cred, alert_to) if pool is not None
                  else AlertSender(reactor, cred, alert_to))
        job = ClientJob(reactor, cred, targets, request, streams, timeout, say=tell,
                        alerts=sender, pool=pool, revoked=revoked, on_started=on_started)
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


def run(
    reactor: Any,
    credential: Credential | str | os.PathLike[str],
    args: Sequence[str] = (),
    stdin: bytes = b"",
    announce: Sequence[Target] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    env: Mapping[str, str] | Sequence[tuple[str, str]] = (),
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

    async def go() -> CompletedJob:
        result, streams, attempts = await _dispatch(
            reactor, credential, args, lambda: BytesStreams(stdin, max_output), announce,
            timeout, env, retries, say, alerts, on_started, pool, revoked)
        assert isinstance(streams, BytesStreams)
        completed = CompletedJob(tuple(args), result.status, streams.stdout.getvalue(),
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


def run_streaming(
    reactor: Any,
    credential: Credential | str | os.PathLike[str],
    args: Sequence[str] = (),
    stdin: Any = None,
    stdout: IConsumer | None = None,
    stderr: IConsumer | None = None,
    announce: Sequence[Target] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    env: Mapping[str, str] | Sequence[tuple[str, str]] = (),
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
    if retries and stdin is not None:
        return defer.fail(ValueError("retries need stdin=None: a producer cannot be replayed"))
    if stdin is not None and not callable(getattr(stdin, "startProducing", None)):
        return defer.fail(TypeError("stdin must be a push producer with "
                                    "startProducing(consumer), as twisted.web's "
                                    "IBodyProducer (FileBodyProducer, BytesProducer)"))

    async def go() -> JobResult:
        result, _, _ = await _dispatch(
            reactor, credential, args, lambda: ProducerStreams(stdin, stdout, stderr),
            announce, timeout, env, retries, say, alerts, on_started, pool, revoked)
        return result

    return defer.Deferred.fromCoroutine(go())
