"""A job's start and end in the worker's books: its log lines (rexnet.worker.joblines),
metrics, signed alerts and its row in the job book; the start a little later
(StartBooks), off a short job's round trip."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from rexnet.net.alerts import AlertSender
from rexnet.net.complaints import Complaints
from rexnet.worker import joblines
from rexnet.worker.detached import JobBook
from rexnet.worker.jobqueue import JobQueue
from rexnet.worker.metrics import NoMetrics
from rexnet.worker.settings import Running, WorkerSettings

START_BOOKS_DELAY = 0.02  # s a job's start waits to be booked (a short job's end comes first)


class StartBooks:
    """A job's start in the worker's books (its log line, its alert, signed, and metrics:
    ~0.5 ms of CPU) START_BOOKS_DELAY after STARTED went, or at once when its end is booked
    before that (then first): a job that ends sooner (`true`) has its EXIT out before them
    (its end came while the worker was still busy with them), and the order stays."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.pending: dict[str, tuple[Any, Callable[[], None]]] = {}

    def later(self, job: str, books: Callable[[], None]) -> None:
        self.pending[job] = (self.reactor.callLater(START_BOOKS_DELAY, self.now, job), books)

    def now(self, job: str) -> None:
        """JOB's start in the books now, if it is not yet."""
        call, books = self.pending.pop(job, (None, None))
        if call is not None and call.active():
            call.cancel()
        if books is not None:
            books()


class Worker(Protocol):
    """What the books read of the worker (rexnet.worker.service.Worker)."""

    reactor: Any
    settings: WorkerSettings
    alerts: AlertSender
    metrics: NoMetrics
    queue: JobQueue
    book: JobBook
    complain: Complaints


class JobBooks:
    """The books of WORKER's jobs (read from it when booked: its alerts, metrics, queue and
    job book)."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.pending_starts = StartBooks(worker.reactor)

    def started(self, job: str, client: str, peer: str, argv: Sequence[str], command: str,
                *, warm: bool, tty: bool, detached: bool, cwd: str) -> None:
        """Book JOB's start (COMMAND: ARGV joined) START_BOOKS_DELAY from now, or before its
        end if that is sooner."""
        w = self.worker

        def books() -> None:
            w.alerts.send("job-started", job=job, worker=w.settings.name, client=client,
                          client_addr=peer, command=command[:200],
                          **({"detached": 1} if detached else {}))
            w.metrics.job_started()
            joblines.started(job, client, peer, argv, warm=warm, tty=tty, detached=detached,
                             cwd=cwd)
        self.pending_starts.later(job, books)

    def ended(self, running: Running, code: int | None, sig: int | None, limit: str,
              bytes_in: int, bytes_out: int) -> None:
        """RUNNING's end: its log line, metrics, alert and row (its start first, if due)."""
        w = self.worker
        self.pending_starts.now(running.job)
        joblines.ended(running.job, code, sig, limit)
        w.metrics.job_finished(code, sig, limit, bytes_in, bytes_out)
        w.queue.finished(duration := w.reactor.seconds() - running.started)
        w.alerts.send(
            "job-finished", job=running.job, worker=w.settings.name, client=running.client,
            status=code if sig is None else 128 + sig, signal=sig, limit=limit or None,
            duration=round(duration, 3), bytes_in=bytes_in, bytes_out=bytes_out)
        if limit:
            w.complain(running.channel.peer_address(), f"job {running.job} hit its {limit} "
                       "limit")
        w.book.ended(running.job, code, sig)
