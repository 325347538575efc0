"""A job's start and end in the worker's books: its log lines (rexnet.worker.joblines),
metrics, signed alerts and its row in the job book. The worker books a job's start
once STARTED is with the kernel, its end once EXIT is (rexnet.net.tuning.send_now)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from rexnet.net.alerts import AlertSender
from rexnet.net.complaints import Complaints
from rexnet.worker import joblines
from rexnet.worker.detached import JobBook
from rexnet.worker.jobqueue import JobQueue
from rexnet.worker.metrics import NoMetrics
from rexnet.worker.settings import Running, WorkerSettings


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

    def started(self, job: str, client: str, peer: str, argv: Sequence[str], command: str,
                *, warm: bool, tty: bool, detached: bool, cwd: str,
                queued: tuple[float, int] | None = None) -> None:
        """JOB's start (COMMAND: ARGV joined; QUEUED: seconds it waited in the queue and
        its position there, if it did): its alert, metrics and log line."""
        w = self.worker
        w.alerts.send("job-started", job=job, worker=w.settings.name, client=client,
                      client_addr=peer, command=command[:200],
                      **({"detached": 1} if detached else {}))
        w.metrics.job_started()
        joblines.started(job, client, peer, argv, warm=warm, tty=tty, detached=detached,
                         cwd=cwd, queued=queued)

    def ended(self, running: Running, code: int | None, sig: int | None, limit: str,
              bytes_in: int, bytes_out: int) -> None:
        """RUNNING's end: its log line, metrics, alert and row."""
        w = self.worker
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
