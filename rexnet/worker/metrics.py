"""Prometheus metrics of workers (twistd rexnet-worker --metrics HOST:PORT).

Each worker holds a WorkerMetrics (a no-op one unless --metrics is given) and calls it at
the moments that count; the figures live in a CollectorRegistry of the process (not the
global one), labelled by application, and are served by a twisted.web resource.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()


class NoMetrics:
    """What a worker calls when no one collects metrics: nothing happens."""

    def job_started(self) -> None:
        pass

    def job_finished(self, code: int | None, sig: int | None, limit: str, bytes_in: int,
                     bytes_out: int) -> None:
        pass

    def job_refused(self, reason: str) -> None:
        pass

    def connect_back(self, outcome: str) -> None:
        pass

    def auth_failure(self) -> None:
        pass

    def rate_limited(self) -> None:
        pass


NO_METRICS = NoMetrics()


def exit_class(code: int | None, sig: int | None, limit: str) -> str:
    """ok, error (a status other than 0), signal, time-limit or memory-limit."""
    if limit:
        return f"{limit}-limit"
    if sig is not None:
        return "signal"
    return "ok" if code == 0 else "error"


class Metrics:
    """The metric families of one worker process (every application it serves)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, disable_created_metrics

        disable_created_metrics()  # no *_created series: Prometheus needs none of them
        self.registry = r = CollectorRegistry()
        app = ["app"]
        self.started = Counter("rexnet_jobs_started", "Jobs started.", app, registry=r)
        self.finished = Counter("rexnet_jobs_finished", "Jobs ended, by exit class (ok, "
                                "error, signal, time-limit, memory-limit).",
                                [*app, "exit_class"], registry=r)
        self.refused = Counter("rexnet_jobs_refused", "Jobs refused before they started, by "
                               "reason (args, fds, spawn).", [*app, "reason"], registry=r)
        self.running = Gauge("rexnet_jobs_running", "Jobs running now.", app, registry=r)
        self.slots = Gauge("rexnet_slots", "Concurrent jobs allowed (--slots).", app,
                           registry=r)
        self.busy = Gauge("rexnet_slots_busy", "Slots in use: running jobs and promised "
                          "connect-backs.", app, registry=r)
        self.load = Gauge("rexnet_load", "The load figure the worker announces (0 idle, 1 "
                          "every slot or CPU busy).", app, registry=r)
        self.bytes_in = Counter("rexnet_job_bytes_received", "Bytes of job input received "
                                "from clients.", app, registry=r)
        self.bytes_out = Counter("rexnet_job_bytes_sent", "Bytes of job output sent to "
                                 "clients.", app, registry=r)
        self.connect_backs = Counter("rexnet_connect_backs", "Connect-backs by outcome: won "
                                     "(the client chose this worker), lost (another worker "
                                     "took the job), failed (no connection); warm: jobs that came "
                                     "over a kept channel, with no connect-back.",
                                     [*app, "outcome"], registry=r)
        self.auth_failures = Counter("rexnet_auth_failures", "Job channels whose peer failed "
                                     "mutual authentication.", app, registry=r)
        self.rate_limited = Counter("rexnet_announcements_rate_limited", "Datagrams dropped "
                                    "by the per-source rate limit.", app, registry=r)

    def for_worker(self, app: str, slots: int, busy: Callable[[], int],
                   running: Callable[[], int], load: Callable[[], float]) -> WorkerMetrics:
        """The metrics of one application's worker; gauges read its state when scraped."""
        self.slots.labels(app).set(slots)
        self.busy.labels(app).set_function(busy)
        self.running.labels(app).set_function(running)
        self.load.labels(app).set_function(lambda: _or_nan(load))
        return WorkerMetrics(self, app)

    def exposition(self) -> bytes:
        """The registry in Prometheus' text format."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


def _or_nan(figure: Callable[[], float]) -> float:
    """FIGURE(), or NaN (and a logged failure) if it cannot be had: a scrape never fails."""
    try:
        return figure()
    except Exception:
        log.failure("cannot read the load figure for a metrics scrape")
        return float("nan")


class WorkerMetrics(NoMetrics):
    """The counters of one worker, labelled with its application."""

    def __init__(self, metrics: Metrics, app: str) -> None:
        self.m = metrics
        self.app = app
        for outcome in ("won", "lost", "failed", "warm"):
            metrics.connect_backs.labels(app, outcome)
        for cls in ("ok", "error", "signal", "time-limit", "memory-limit"):
            metrics.finished.labels(app, cls)
        for child in (metrics.started, metrics.bytes_in, metrics.bytes_out,
                      metrics.auth_failures, metrics.rate_limited):
            child.labels(app)

    def job_started(self) -> None:
        self.m.started.labels(self.app).inc()

    def job_finished(self, code: int | None, sig: int | None, limit: str, bytes_in: int,
                     bytes_out: int) -> None:
        self.m.finished.labels(self.app, exit_class(code, sig, limit)).inc()
        self.m.bytes_in.labels(self.app).inc(bytes_in)
        self.m.bytes_out.labels(self.app).inc(bytes_out)

    def job_refused(self, reason: str) -> None:
        self.m.refused.labels(self.app, reason).inc()

    def connect_back(self, outcome: str) -> None:
        self.m.connect_backs.labels(self.app, outcome).inc()

    def auth_failure(self) -> None:
        self.m.auth_failures.labels(self.app).inc()

    def rate_limited(self) -> None:
        self.m.rate_limited.labels(self.app).inc()


class MetricsService(Service):
    """Serves METRICS at http://HOST:PORT/metrics (any path) with twisted.web."""

    def __init__(self, metrics: Metrics, host: str, port: int, reactor: Any) -> None:
        self.metrics = metrics
        self.address = (host, port)
        self.reactor = reactor
        self.port: Any = None

    def bind(self) -> None:
        """Listen now (makeService calls this: a busy port is a one-line error)."""
        from twisted.web.resource import Resource
        from twisted.web.server import Request, Site

        metrics = self.metrics

        class Exposition(Resource):
            isLeaf = True

            def render_GET(self, request: Request) -> bytes:
                from prometheus_client import CONTENT_TYPE_LATEST

                request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode())
                return metrics.exposition()

        class QuietSite(Site):
            noisy = False

            def log(self, request: Request) -> None:  # type: ignore[override]
                """No access-log line per scrape."""

        site = QuietSite(Exposition())
        site.displayTracebacks = False
        host, port = self.address
        endpoint_type = TCP6ServerEndpoint if ":" in host else TCP4ServerEndpoint
        listening = endpoint_type(self.reactor, port, interface=host).listen(site)
        # a TCP endpoint listens at once: its Deferred has fired (or failed) already
        outcome: list[Any] = []
        listening.addBoth(outcome.append)
        if isinstance(outcome[0], Failure):
            outcome[0].raiseException()
        self.port = outcome[0]

    def startService(self) -> None:
        super().startService()
        if self.port is None:
            self.bind()
        address = self.port.getHost()
        log.info("Prometheus metrics at http://{host}:{port}/metrics", host=address.host,
                 port=address.port)

    def stopService(self) -> Any:
        super().stopService()
        if self.port is not None:
            return self.port.stopListening()
        return None
