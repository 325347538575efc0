"""What the dashboard shows, built from crat's records: workers, load, jobs, alerts.

DashboardState is a crat sink.  Only *verified* alerts change the workers and running
jobs shown: an unverified alert is listed among the unverified alerts, with the reason,
and changes nothing else.  Verified and unverified alerts are kept in two bounded lists,
so that junk never pushes a verified alert out.  Verified worker-status alerts (every 5 s
per worker) feed the workers' load history rather than the list of alerts.

Rows belong to certificates, not to the names senders write in their alerts: a worker's
row is named by the name in the certificate that signed its alerts (`w3`), or, when the
worker calls itself something else, `CERTIFICATE/NAME` (`worker/alpha` for workers that
share the application's APP.worker credential).  No certificate can make or change
another certificate's rows.  A running job is ended only by the certificate that reported
its start (its job-finished, or its status report of no running job); a job-finished
from anyone else ends nothing and, unless it is the job's own client reporting, is
logged as a complaint.  Everything is bounded: workers, history points, running jobs,
alerts.  No I/O; time comes from a clock.
"""

from __future__ import annotations

import contextlib
import itertools
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from twisted.logger import Logger

from rexnet.crat.core import Crat, Record, readable

HISTORY = 120
"""Load figures kept per worker (one every 5 s: the last 10 minutes)."""
ALERTS = 50
"""Recent alerts kept and shown, newest first."""
MAX_WORKERS = 1024
MAX_JOBS = 4096
FINISHED = 100  # finished jobs shown (newest first)
STATUS_FIELDS = ("load", "running", "slots", "cpus", "speed", "free_memory", "jobs_run")

log = Logger()


def row_name(certificate: str | None, claimed: str | None) -> str:
    """The name of a worker's row: its CERTIFICATE's name, with the name it CLAIMED in its
    alerts after a slash when that differs.  Certificate names hold no slash, so a row
    name always tells which certificate it belongs to."""
    cert = certificate or "?"
    return cert if not claimed or claimed == cert else f"{cert}/{claimed}"


def _number(value: object) -> float | int | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return value


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _address(source: str) -> str:
    """The host of a record's source ("host:port" or "[v6]:port"): the port of an alert
    is its sender's ephemeral one."""
    host = source.rsplit(":", 1)[0] if ":" in source else source
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


@dataclass
class WorkerView:
    """What the dashboard knows of one worker (by application and row name)."""

    app: str
    name: str  # row_name(sender, claimed)
    sender: str | None  # the name in its certificate
    address: str
    seen: float
    claimed: str | None = None  # the name it gives itself in its alerts
    figures: dict[str, float | int | None] = field(default_factory=dict)
    status_seen: float | None = None
    history: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=HISTORY))

    @property
    def key(self) -> str:
        return f"{self.app}/{self.name}"

    def as_dict(self, history: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "key": self.key, "name": self.name, "app": self.app, "sender": self.sender,
            "claimed": self.claimed, "address": self.address, "seen": self.seen,
            "status_seen": self.status_seen,
            **{k: self.figures.get(k) for k in STATUS_FIELDS},
        }
        if history:
            out["history"] = [[t, load] for t, load in self.history]
        return out


class DashboardState:
    """The workers, running jobs and recent alerts built from crat's records.

    Call it with each record (it is a crat sink); LISTENERS are called with the compact
    update each record makes (what /api/events sends)."""

    def __init__(self, crat: Crat, clock: Callable[[], float] | None = None,
                 history: int = HISTORY, alerts: int = ALERTS) -> None:
        self.crat = crat
        self.clock = clock or crat.clock
        self.history = history
        self.workers: OrderedDict[str, WorkerView] = OrderedDict()
        self.jobs: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self.alerts: deque[Record] = deque(maxlen=alerts)  # verified, newest first
        self.unverified: deque[Record] = deque(maxlen=alerts)
        self.finished: deque[dict[str, Any]] = deque(maxlen=FINISHED)  # newest first
        self.listeners: list[Callable[[dict[str, Any]], None]] = []
        self.errors = 0

    def feed(self, records: Iterable[Record]) -> None:
        """Take in records crat made before the dashboard existed (no updates sent)."""
        for record in records:
            with contextlib.suppress(Exception):
                self._apply(record, self._now())

    def __call__(self, record: Record) -> None:
        """A crat sink: never raises (a dashboard problem must not look like a lost alert)."""
        try:
            update = self._apply(record, self._now())
        except Exception:
            self.errors += 1
            log.failure("dashboard: cannot take in an alert")
            return
        for listener in list(self.listeners):
            try:
                listener(update)
            except Exception:
                self.errors += 1
                log.failure("dashboard: cannot pass on an update")

    def _now(self) -> float:
        return round(self.clock(), 3)

    # -- records --------------------------------------------------------------------------

    def _apply(self, record: Record, now: float) -> dict[str, Any]:
        update: dict[str, Any] = {"now": now, "alert": None, "worker": None, "point": None,
                                  "job_started": None, "jobs_ended": [], "jobs_finished": []}
        before = len(self.finished) and self.finished[0]
        event = record.get("event")
        fields: dict[str, Any] = record.get("fields") or {}
        verified = record.get("verified") is True
        if not (verified and event == "worker-status"):
            alert = self._alert(record)
            (self.alerts if verified else self.unverified).appendleft(alert)
            update["alert"] = alert
        if verified:
            app = _text(record.get("app")) or "?"
            worker: WorkerView | None = None
            if record.get("role") == "worker":
                worker = self._worker(record, fields, app, now)
            if event == "worker-status" and worker is not None:
                update["point"] = self._status(worker, record, fields, now)
                update["jobs_ended"] = self._idle(worker, record)
            elif event == "job-started" and record.get("role") == "worker":
                update["job_started"] = self._started(record, fields, app, now)
            elif event == "job-finished":
                update["jobs_ended"] = self._finished(record, fields, app)
            if worker is not None:
                update["worker"] = worker.as_dict(history=False)
        update["jobs_finished"] = list(itertools.takewhile(lambda j: j is not before,
                                                           self.finished))
        update["counts"] = self.crat.counts.as_dict()
        return update

    def _end(self, key: str, fields: dict[str, Any], now: float) -> None:
        """Job KEY ended (with the status FIELDS say, if they do): into the history."""
        job = self.jobs.pop(key)
        self.finished.appendleft({**job, "ended": now, "status": _number(fields.get("status")),
                                  "duration": _number(fields.get("duration"))})

    @staticmethod
    def _alert(record: Record) -> Record:
        keys = ("received", "source", "verified", "reason", "app", "role", "sender", "event",
                "ts")
        return {**{k: record.get(k) for k in keys}, "fields": dict(record.get("fields") or {})}

    def _worker(self, record: Record, fields: dict[str, Any], app: str,
                now: float) -> WorkerView | None:
        claimed = _text(fields.get("worker"))  # complaints name no worker: they make no row
        if not claimed:
            return None
        sender = _text(record.get("sender"))
        name = row_name(sender, claimed)
        key = f"{app}/{name}"
        worker = self.workers.pop(key, None)
        address = _address(str(record.get("source") or ""))
        if worker is None:
            worker = WorkerView(app, name, sender, address, now, claimed)
            worker.history = deque(maxlen=self.history)
            self._new_row(worker)
        worker.seen, worker.address = now, address
        self.workers[key] = worker  # the most recently heard last
        while len(self.workers) > MAX_WORKERS:
            self.workers.popitem(last=False)
        return worker

    def _new_row(self, worker: WorkerView) -> None:
        """Say so when a certificate calls itself by the name of another certificate that
        has a row: it gets a row of its own (CERT/NAME), never the other one's."""
        if worker.claimed == worker.sender or not any(
                w.app == worker.app and w.sender == worker.claimed
                for w in self.workers.values()):
            return
        log.warn("dashboard: worker certificate {sender} of {app} calls itself {claimed}, "
                 "the name of another certificate: its alerts are listed as {name}, never "
                 "as {claimed}'s", sender=readable(worker.sender), app=readable(worker.app),
                 claimed=readable(worker.claimed), name=readable(worker.name))

    def _status(self, worker: WorkerView, record: Record, fields: dict[str, Any],
                now: float) -> list[float] | None:
        worker.figures = {k: _number(fields.get(k)) for k in STATUS_FIELDS}
        worker.status_seen = now
        load = worker.figures.get("load")
        if load is None:
            return None
        point = (now, float(load))
        worker.history.append(point)
        return list(point)

    def _idle(self, worker: WorkerView, record: Record) -> list[str]:
        """When a worker reports no running job, every job it started before that report
        has ended, even if its job-finished alert was lost on the way: the keys of those
        jobs, which are no longer listed."""
        sent = record.get("ts")
        if worker.figures.get("running") != 0 or not isinstance(sent, int):
            return []
        ended = [key for key, job in self.jobs.items()
                 if (job["app"], job["worker"]) == (worker.app, worker.name)
                 and job["ts"] < sent]
        for key in ended:
            self._end(key, {}, round(self.clock(), 3))
        return ended

    def _started(self, record: Record, fields: dict[str, Any], app: str,
                 now: float) -> dict[str, Any] | None:
        job_id = _text(fields.get("job"))
        if job_id is None:
            return None
        key = f"{app}/{job_id}"
        sender, serial = _text(record.get("sender")), _text(record.get("serial"))
        old = self.jobs.get(key)
        if old is not None and (old["sender"], old["serial"]) != (sender, serial):
            log.warn("dashboard: ignored job-started of job {job} from worker certificate "
                     "{sender} (serial {serial}): the job was started by {starter} (serial "
                     "{starter_serial})", job=readable(job_id), sender=readable(sender),
                     serial=serial, starter=readable(old["sender"]),
                     starter_serial=old["serial"])
            return None
        job: dict[str, Any] = {
            "key": key, "job": job_id, "app": app,
            "worker": row_name(sender, _text(fields.get("worker"))),
            "sender": sender, "serial": serial,
            "client": _text(fields.get("client")), "client_addr": _text(fields.get("client_addr")),
            "command": _text(fields.get("command")), "started": now,
            "detached": fields.get("detached") == 1,
            "ts": record.get("ts") if isinstance(record.get("ts"), int) else 0,
        }
        self.jobs.pop(key, None)
        self.jobs[key] = job
        while len(self.jobs) > MAX_JOBS:
            self.jobs.popitem(last=False)
        return job

    def _finished(self, record: Record, fields: dict[str, Any], app: str) -> list[str]:
        """Only the certificate that reported the job's start ends it.  Anyone else's
        job-finished ends nothing; it is a complaint unless the job's client sent it."""
        job_id = _text(fields.get("job"))
        key = f"{app}/{job_id}"
        job = self.jobs.get(key) if job_id is not None else None
        if job is None:
            return []
        role, sender = record.get("role"), _text(record.get("sender"))
        if role == "worker" and (sender, _text(record.get("serial"))) == (
                job["sender"], job["serial"]):
            self._end(key, fields, round(self.clock(), 3))
            return [key]
        if role != "client" or sender != job["client"]:
            log.warn("dashboard: ignored job-finished of job {job} from {role} certificate "
                     "{sender}: only the worker certificate that reported its start "
                     "({starter}, serial {serial}) ends it", job=readable(job_id),
                     role=readable(role), sender=readable(sender),
                     starter=readable(job["sender"]), serial=job["serial"])
        return []

    # -- the whole picture ----------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Everything /api/state returns."""
        stats = self.crat.stats()
        return {
            "now": self._now(),
            "workers": [w.as_dict() for w in sorted(self.workers.values(),
                                                    key=lambda w: (w.app, w.name))],
            "running": sorted(self.jobs.values(), key=lambda j: (j["started"], j["key"])),
            "finished": list(self.finished),
            "alerts": list(self.alerts),
            "unverified": list(self.unverified),
            "counts": stats["counts"],
            "trusted": stats["trusted"],
            "limits": {"history": self.history, "alerts": self.alerts.maxlen,
                       "status_interval": 5.0},
        }

