"""rexnet.Executor: jobs and Python calls on the cluster from ordinary (threaded) code.

The Twisted reactor runs in one background thread per process, started on first use (or
the program's own running reactor is used); the Executor hands work to it with
``reactor.callFromThread`` and gets results back through concurrent.futures Futures.
"""

from __future__ import annotations

import atexit
import collections
import concurrent.futures
import contextlib
import os
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar, overload

from twisted.internet import defer
from twisted.python import threadable
from twisted.python.failure import Failure

from rexnet.client import api as client
from rexnet.client.api import Env
from rexnet.client.bounded import Bounded
from rexnet.client.cluster import Cluster, Target
from rexnet.client.progress import silent
from rexnet.client.results import CompletedJob, JobFailed
from rexnet.client.warm import WarmPool
from rexnet.protocol import remotecall as remote
from rexnet.protocol.request import DEFAULT_TIMEOUT, ExecRequest
from rexnet.security.credentials import Credential

T = TypeVar("T")

_reactor_lock = threading.Lock()
_reactor_thread: threading.Thread | None = None
REACTOR_START_TIMEOUT = 30.0
REQUESTS_KEPT = 64  # distinct (args, env) requests an Executor keeps built


def running_reactor() -> Any:
    """The global Twisted reactor, running: in a daemon thread started on first use (one
    per process), or wherever the program already runs it."""
    global _reactor_thread
    from twisted.internet import reactor

    with _reactor_lock:
        if _reactor_thread is not None and _reactor_thread.is_alive():
            return reactor
        if reactor.running:  # type: ignore[attr-defined]
            return reactor  # the program runs it (it must not be this thread: see Executor)
        if getattr(reactor, "_startedBefore", False):
            raise RuntimeError("the Twisted reactor has run and stopped; it cannot restart")
        started = threading.Event()
        reactor.callWhenRunning(started.set)  # type: ignore[attr-defined]
        thread = threading.Thread(target=reactor.run,  # type: ignore[attr-defined]
                                  kwargs={"installSignalHandlers": False},
                                  name="rexnet-reactor", daemon=True)
        thread.start()
        if not started.wait(REACTOR_START_TIMEOUT):
            raise RuntimeError("the Twisted reactor thread did not start")
        _reactor_thread = thread
        atexit.register(_stop_reactor, reactor, thread)
    return reactor


def _stop_reactor(reactor: Any, thread: threading.Thread) -> None:
    """At exit: stop the reactor we started, so connections close cleanly (jobs still
    running on workers are ended by them when their client goes away)."""

    def stop() -> None:
        with contextlib.suppress(Exception):
            reactor.stop()

    if thread.is_alive():
        reactor.callFromThread(stop)
        thread.join(5)


def in_reactor_thread() -> bool:
    return bool(threadable.isInIOThread())


class CallFailed(JobFailed):
    """A remote call produced no result: the worker is not a `rexnet-worker --python`, its
    Python process died (see the message for its status and stderr), or the result cannot
    be unpickled here."""


class Executor(concurrent.futures.Executor):
    """Runs jobs of one application on its cluster, at most MAX_JOBS at a time.

    ``submit(args, input=b"")`` returns a Future of a CompletedJob (``returncode``,
    ``stdout``, ``stderr``, ``worker``, as subprocess.CompletedProcess) or of a JobFailed
    error (NoWorker, AuthFailed, JobRefused, WorkerLost, LimitHit, OutputLimit); ARGS are
    the extra arguments (the worker must run with --allow-args). ``submit(fn, *args,
    **kwargs)``, with a callable, runs ``fn(*args, **kwargs)`` on a worker started with
    --python and returns a Future of its value (or of what it raised, with the remote
    traceback text as ``remote_traceback`` and as a note); ``call(fn, ...)`` waits for it.
    ``map(fn, *iterables)`` is concurrent.futures' map over those: ``map(fn, xs)`` calls fn
    remotely for each x; ``map(args, inputs)`` runs the job with ARGS on each input.

    CREDENTIAL is a client credential or its file; ANNOUNCE the "ADDR[:PORT]" targets (as
    `rexnet exec --announce`; default $GROUP, else the broadcast address). MAX_JOBS
    (default: this host's CPU count) bounds the jobs running at once; keep it within the
    cluster's free slots, or jobs wait for a worker and may fail with NoWorker after
    TIMEOUT (default 30 s; it bounds each search for a worker). ALERTS are crat's
    addresses (default: the announce targets on port 3011). CREDENTIAL may instead be a
    rexnet.client.Cluster, which holds all of those. RETRIES re-dispatches a job whose
    worker is lost before any of its output arrived (see rexnet.client.run). ENV and
    MAX_OUTPUT (per stream, in bytes) apply to every job. LOG gets progress messages
    (which worker took a job, re-dispatches); the default discards them.

    Not for code that runs in the reactor thread itself (Twisted code): use
    rexnet.client.run there.
    """

    def __init__(
        self,
        credential: Credential | str | os.PathLike[str] | Cluster,
        announce: Sequence[Target] | None = None,
        max_jobs: int | None = None,
        *,
        timeout: float | None = None,
        retries: int = 0,
        env: Env = (),
        max_output: int | None = None,
        alerts: Sequence[Target] | None = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        if isinstance(credential, Cluster):
            if announce is not None or alerts is not None or timeout is not None:
                raise TypeError("give announce, alerts and timeout to the Cluster")
            self.cluster = credential
        else:
            self.cluster = Cluster.build(credential, announce, alerts,
                                         DEFAULT_TIMEOUT if timeout is None else timeout)
        self.max_jobs = max_jobs if max_jobs is not None else (os.cpu_count() or 1)
        if self.max_jobs < 1:
            raise ValueError("max_jobs must be at least 1")
        if retries < 0:
            raise ValueError("retries must be >= 0")
        self.retries = retries
        self.env = env
        self.max_output = max_output
        self.log = log or silent
        self.workers: collections.Counter[str] = collections.Counter()  # jobs started there
        self._reactor = running_reactor()
        # warm channels, used in the reactor thread; our own jobs come and go on them
        self._pool = WarmPool(self._reactor, discount_own=True)
        self._jobs = Bounded(self.max_jobs, on_idle=self._idle)  # in the reactor thread
        self._lock = threading.RLock()
        self._futures: set[concurrent.futures.Future[Any]] = set()
        self._queued: set[concurrent.futures.Future[Any]] = set()  # not yet begun
        # submitted, not yet handed to the reactor thread (one wake-up for a burst)
        self._inbox: collections.deque[tuple[concurrent.futures.Future[Any],
                                             Callable[[], defer.Deferred[Any]]]] = (
            collections.deque())
        self._waking = False
        self._shutdown = False
        self._requests: dict[tuple[tuple[str, ...], tuple[tuple[str, str], ...]],
                             ExecRequest] = {}  # in the reactor thread (see _request)

    # -- submitting -------------------------------------------------------------------

    @overload
    def submit(self, fn: Sequence[str], /, input: bytes = b"", *, env: Env | None = None,
               ) -> concurrent.futures.Future[CompletedJob]: ...

    @overload
    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any
               ) -> concurrent.futures.Future[T]: ...

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        """A job with extra arguments FN (a sequence of str) and stdin INPUT; or, if FN is
        callable, the remote call fn(*args, **kwargs). See the class's docstring."""
        if callable(fn):
            return self._submit_call(fn, args, kwargs)
        if isinstance(fn, str | bytes) or not all(isinstance(a, str) for a in fn):
            raise TypeError("a job's arguments are a sequence of str (or give a callable)")
        if len(args) > 1:
            raise TypeError("submit(args, input=b'') takes one input")
        data = args[0] if args else kwargs.pop("input", b"")
        env = kwargs.pop("env", None)
        if kwargs:
            raise TypeError(f"unexpected keyword arguments: {', '.join(kwargs)}")
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError("a job's input is bytes")
        job_args, stdin = tuple(fn), bytes(data)
        job_env = self.env if env is None else env
        return self._enqueue(lambda: self._run(job_args, stdin, job_env, self.max_output))

    def call(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """Call fn(*args, **kwargs) on a worker started with --python and return its value,
        or raise what it raised (the remote traceback text in ``remote_traceback`` and in a
        note). The callable and arguments are pickled (with cloudpickle: lambdas too) and
        sent as the job's stdin once both sides are authenticated; the same code must be
        importable on every host."""
        if in_reactor_thread():
            raise RuntimeError("Executor.call would block the reactor thread")
        future: concurrent.futures.Future[T] = self.submit(fn, *args, **kwargs)
        return future.result()

    def _submit_call(self, fn: Callable[..., Any], args: tuple[Any, ...],
                     kwargs: dict[str, Any]) -> concurrent.futures.Future[Any]:
        key = remote.new_key()  # the result must be authenticated with it
        payload = remote.encode_call(fn, args, kwargs, key)  # pickling errors raise here

        def start() -> defer.Deferred[Any]:
            return self._run((), payload, self.env, None).addCallback(_call_result, key)

        return self._enqueue(start)

    def _run(self, args: tuple[str, ...], stdin: bytes, env: Env,
             max_output: int | None) -> defer.Deferred[CompletedJob]:
        def started(worker: str, job: str) -> None:
            self.workers[worker] += 1

        return client.run_on(self._reactor, self.cluster, self._request(args, env), stdin,
                             max_output=max_output, retries=self.retries, say=self.log,
                             on_started=started, pool=self._pool)

    def _request(self, args: tuple[str, ...], env: Env) -> ExecRequest:
        """The request of a job with ARGS and ENV: one per distinct pair, not one per job
        (map runs the same ARGS many times). ENV is read now, as the job starts."""
        pairs = client.env_pairs(env) if env else ()
        key = (args, pairs)
        request = self._requests.get(key)
        if request is None:
            if len(self._requests) >= REQUESTS_KEPT:
                self._requests.clear()
            request = self._requests[key] = client.request_of(args, pairs)
        return request

    def _enqueue(self, start: Callable[[], defer.Deferred[Any]]
                 ) -> concurrent.futures.Future[Any]:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._futures.add(future)
            self._queued.add(future)
            self._inbox.append((future, start))
            wake, self._waking = not self._waking, True
        future.add_done_callback(self._forget)
        if wake:
            self._reactor.callFromThread(self._take_inbox)
        return future

    def _forget(self, future: concurrent.futures.Future[Any]) -> None:
        with self._lock:
            self._futures.discard(future)

    # -- in the reactor thread ------------------------------------------------------------

    def _take_inbox(self) -> None:
        """Queue what was submitted since the last wake-up, in order."""
        with self._lock:
            submitted = list(self._inbox)
            self._inbox.clear()
            self._waking = False
        for future, start in submitted:
            self._jobs.run(self._begin, future, start).addBoth(self._settle, future)

    def _begin(self, future: concurrent.futures.Future[Any],
               start: Callable[[], defer.Deferred[Any]]) -> defer.Deferred[Any]:
        """A slot is free: run the job, unless its future was cancelled meanwhile."""
        with self._lock:
            if future not in self._queued:
                return defer.succeed(None)  # shutdown(cancel_futures=True) cancelled it
            self._queued.discard(future)
        if not future.set_running_or_notify_cancel():
            return defer.succeed(None)  # its owner cancelled it
        return start()

    def _settle(self, result: Any, future: concurrent.futures.Future[Any]) -> None:
        if not future.running():
            return  # cancelled before it ran
        if isinstance(result, Failure):
            future.set_exception(result.value)
        else:
            future.set_result(result)

    def _idle(self) -> None:
        if self._shutdown and not self._jobs.running and not self._jobs.waiting:
            self._pool.close()  # no more jobs: the warm channels go

    # -- ending -----------------------------------------------------------------------

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """No more submissions. CANCEL_FUTURES: jobs not yet started are cancelled (their
        Futures say so) and never run; jobs already running are not interrupted. WAIT:
        return once every job that was not cancelled has finished (queued ones run first);
        otherwise return at once while they go on. The reactor thread stays (it is shared
        by the process). Waiting from the reactor thread is a RuntimeError (it would hang).
        """
        with self._lock:
            self._shutdown = True
            queued = list(self._queued) if cancel_futures else []
            if cancel_futures:
                self._queued.clear()  # so that they never begin (see _begin)
        for future in queued:
            if future.cancel():
                future.set_running_or_notify_cancel()  # tells wait() and as_completed()
        with self._lock:
            futures = list(self._futures)
        if wait:
            if in_reactor_thread():
                raise RuntimeError("Executor.shutdown(wait=True) would block the reactor thread")
            concurrent.futures.wait(futures)
        self._reactor.callFromThread(self._idle)

    def map(self, fn: Any, *iterables: Any, timeout: float | None = None,
            chunksize: int = 1) -> Iterator[Any]:
        """concurrent.futures' map: ``map(fn, xs)`` gives fn(x) for each x, run remotely
        (workers with --python); ``map(args, inputs)`` gives the CompletedJob of the job
        with ARGS on each input. Results come in order; TIMEOUT as in concurrent.futures."""
        return super().map(fn, *iterables, timeout=timeout, chunksize=chunksize)


def _call_result(completed: CompletedJob, key: bytes) -> Any:
    if completed.stderr:  # what the call printed, in one piece
        sys.stderr.write(completed.stderr.decode(errors="replace"))
        sys.stderr.flush()
    try:
        ok, value = remote.decode_result(completed.stdout, completed.worker, key)
    except remote.NoResult as e:
        tail = completed.stderr.decode(errors="replace").strip().splitlines()[-3:]
        error = CallFailed(
            f"the call on worker {completed.worker} gave {e} (exit status "
            f"{completed.returncode}; is it a `rexnet-worker --python`?)"
            + (f": {' / '.join(tail)}" if tail else ""))
        error.worker = completed.worker
        raise error from None
    except remote.Unloadable as e:
        error = CallFailed(f"the result of the call on worker {completed.worker} cannot be "
                           f"unpickled here: {e}")
        error.worker = completed.worker
        raise error from e
    if ok:
        return value
    raise value
