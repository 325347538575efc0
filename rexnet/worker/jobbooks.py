"""A job's start and end in the worker's books: its log lines (rexnet.worker.joblines:
one line for a job that ends within LINE_HOLD of its start), metrics, signed alerts and
its row in the job book. The worker books a job's start once STARTED is with the kernel,
its end once EXIT is (rexnet.net.tuning.send_now)."""

from __future__ import annotations

from collections import OrderedDict
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


LINE_HOLD = 0.05
"""Seconds a job's started line is held: a job that ends by then gets one line for both
(rexnet.worker.joblines.ran; a trivial job's two lines were ~20% of the worker's CPU
per job), a longer one its started line then."""


class JobBooks:
    """The books of WORKER's jobs (read from it when booked: its alerts, metrics, queue and
    job book)."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        # started lines not yet logged, oldest first, by job: since, text and fields
        self._held: OrderedDict[str, tuple[float, str, dict[str, Any]]] = OrderedDict()
        self._due: Any = None  # the call that logs the oldest when it is due

    def flush(self) -> None:
        """Log every started line still held (the worker stops)."""
        if self._due is not None and self._due.active():
            self._due.cancel()
        self._due = None
        for _, text, fields in self._held.values():
            joblines.log_started(text, fields)
        self._held.clear()

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
        text, fields = joblines.start_parts(job, client, peer, argv, warm=warm, tty=tty,
                                            detached=detached, cwd=cwd, queued=queued)
        if detached or not LINE_HOLD:
            joblines.log_started(text, fields)
            return
        self._held[job] = (w.reactor.seconds(), text, fields)
        if self._due is None:
            self._due = w.reactor.callLater(LINE_HOLD, self._log_due)

    def _log_due(self) -> None:
        """Log the started lines held LINE_HOLD (the oldest first); come back for the
        next one still held."""
        self._due = None
        now = self.worker.reactor.seconds()
        while self._held:
            job, (since, text, fields) = next(iter(self._held.items()))
            if 0 <= now - since < LINE_HOLD:  # (a clock set back: due now)
                self._due = self.worker.reactor.callLater(since + LINE_HOLD - now,
                                                          self._log_due)
                return
            del self._held[job]
            joblines.log_started(text, fields)

    def ended(self, running: Running, code: int | None, sig: int | None, limit: str,
              bytes_in: int, bytes_out: int) -> None:
        """RUNNING's end: its log line, metrics, alert and row."""
        w = self.worker
        held = self._held.pop(running.job, None)
        duration = w.reactor.seconds() - running.started
        if held is None:
            joblines.ended(running.job, code, sig, limit)
        else:  # its started line is still held: one line for both
            joblines.ran(held[1], held[2], code, sig, limit, duration)
        w.metrics.job_finished(code, sig, limit, bytes_in, bytes_out)
        w.queue.finished(duration)
        w.alerts.send(
            "job-finished", job=running.job, worker=w.settings.name, client=running.client,
            status=code if sig is None else 128 + sig, signal=sig, limit=limit or None,
            duration=round(duration, 3), bytes_in=bytes_in, bytes_out=bytes_out)
        if limit:
            w.complain(running.channel.peer_address(), f"job {running.job} hit its {limit} "
                       "limit")
        w.book.ended(running.job, code, sig)
