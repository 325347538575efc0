"""crat's dashboard: workers and their load over time, running jobs and recent alerts.

Served by the crat process itself (twistd crat --web PORT) as a twisted.web resource tree:

    /               the page (HTML only: its script and style are separate resources, so
                    that the Content-Security-Policy can stay strict: default-src 'self')
    /app.js         the page's script
    /app.css        the page's style
    /api/state      everything the page shows, as one JSON object
    /api/events     Server-Sent Events: one compact "update" per alert crat records

The page loads /api/state, then applies the updates of /api/events as they come (no
reload); when EventSource is missing or the stream fails it polls /api/state instead.

The state is built from crat's records (DashboardState is a crat sink).  Only *verified*
alerts change the workers and running jobs shown: an unverified alert is listed among the
recent alerts, marked UNVERIFIED with the reason, and changes nothing else.  Verified
worker-status alerts (every 5 s per worker) feed the workers' load history rather than the
list of alerts.  Everything is bounded: workers, history points, running jobs, alerts,
event-stream clients.  Nothing from an alert is ever interpreted as markup: the page
renders with textContent only.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import socket
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.internet.interfaces import IListeningPort, IPushProducer
from twisted.logger import Logger
from twisted.web import pages
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Site
from zope.interface import implementer

from rexnet.crat.core import Crat, CratError, Record, host_port

HISTORY = 120
"""Load figures kept per worker (one every 5 s: the last 10 minutes)."""
ALERTS = 50
"""Recent alerts kept and shown, newest first."""
MAX_WORKERS = 1024
MAX_JOBS = 4096
MAX_CLIENTS = 32
"""Event-stream clients at once; more get 503 and the page falls back to polling."""
HEARTBEAT = 15.0
"""Seconds between comments on the event stream, so idle proxies and browsers keep it."""
STATUS_FIELDS = ("load", "running", "slots", "cpus", "speed", "free_memory", "jobs_run")

CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; "
       "frame-ancestors 'none'")
SECURITY_HEADERS = {
    b"content-security-policy": CSP.encode(),
    b"x-content-type-options": b"nosniff",
    b"x-frame-options": b"DENY",
    b"referrer-policy": b"no-referrer",
    b"cross-origin-resource-policy": b"same-origin",
    b"cross-origin-opener-policy": b"same-origin",
}

log = Logger()


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
    """What the dashboard knows of one worker (by application and name)."""

    app: str
    name: str
    sender: str | None
    address: str
    seen: float
    figures: dict[str, float | int | None] = field(default_factory=dict)
    status_seen: float | None = None
    history: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=HISTORY))

    @property
    def key(self) -> str:
        return f"{self.app}/{self.name}"

    def as_dict(self, history: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "key": self.key, "name": self.name, "app": self.app, "sender": self.sender,
            "address": self.address, "seen": self.seen, "status_seen": self.status_seen,
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
        self.alerts: deque[Record] = deque(maxlen=alerts)
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
                                  "job_started": None, "jobs_ended": []}
        event = record.get("event")
        fields: dict[str, Any] = record.get("fields") or {}
        verified = record.get("verified") is True
        if not (verified and event == "worker-status"):
            alert = self._alert(record)
            self.alerts.appendleft(alert)
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
                update["jobs_ended"] = self._finished(fields, app)
            if worker is not None:
                update["worker"] = worker.as_dict(history=False)
        update["counts"] = self.crat.counts.as_dict()
        return update

    @staticmethod
    def _alert(record: Record) -> Record:
        keys = ("received", "source", "verified", "reason", "app", "role", "sender", "event",
                "ts")
        return {**{k: record.get(k) for k in keys}, "fields": dict(record.get("fields") or {})}

    def _worker(self, record: Record, fields: dict[str, Any], app: str,
                now: float) -> WorkerView | None:
        name = _text(fields.get("worker"))  # complaints name no worker: they make no row
        if not name:
            return None
        key = f"{app}/{name}"
        worker = self.workers.pop(key, None)
        address = _address(str(record.get("source") or ""))
        if worker is None:
            worker = WorkerView(app, name, _text(record.get("sender")), address, now)
            worker.history = deque(maxlen=self.history)
        worker.seen, worker.address = now, address
        worker.sender = _text(record.get("sender"))
        self.workers[key] = worker  # the most recently heard last
        while len(self.workers) > MAX_WORKERS:
            self.workers.popitem(last=False)
        return worker

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
            del self.jobs[key]
        return ended

    def _started(self, record: Record, fields: dict[str, Any], app: str,
                 now: float) -> dict[str, Any] | None:
        job_id = _text(fields.get("job"))
        if job_id is None:
            return None
        key = f"{app}/{job_id}"
        job: dict[str, Any] = {
            "key": key, "job": job_id, "app": app,
            "worker": _text(fields.get("worker")) or "?",
            "client": _text(fields.get("client")), "client_addr": _text(fields.get("client_addr")),
            "command": _text(fields.get("command")), "started": now,
            "ts": record.get("ts") if isinstance(record.get("ts"), int) else 0,
        }
        self.jobs.pop(key, None)
        self.jobs[key] = job
        while len(self.jobs) > MAX_JOBS:
            self.jobs.popitem(last=False)
        return job

    def _finished(self, fields: dict[str, Any], app: str) -> list[str]:
        job_id = _text(fields.get("job"))
        key = f"{app}/{job_id}"
        return [key] if job_id is not None and self.jobs.pop(key, None) is not None else []

    # -- the whole picture ----------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Everything /api/state returns."""
        stats = self.crat.stats()
        return {
            "now": self._now(),
            "workers": [w.as_dict() for w in sorted(self.workers.values(),
                                                    key=lambda w: (w.app, w.name))],
            "running": sorted(self.jobs.values(), key=lambda j: (j["started"], j["key"])),
            "alerts": list(self.alerts),
            "counts": stats["counts"],
            "trusted": stats["trusted"],
            "limits": {"history": self.history, "alerts": self.alerts.maxlen,
                       "status_interval": 5.0},
        }


def to_json(value: object) -> bytes:
    """Compact JSON, ASCII only (no raw U+2028 and friends in the event stream)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode("ascii")


# -- the event stream ---------------------------------------------------------------------


@implementer(IPushProducer)
class EventClient:
    """One /api/events response.  When its connection cannot take more (the client is not
    reading), updates are dropped and a "resync" event is sent once it can again."""

    def __init__(self, request: Any) -> None:
        self.request = request
        self.paused = False
        self.missed = False
        self.gone = False

    def send(self, data: bytes) -> None:
        if self.gone:
            return
        if self.paused:
            self.missed = True
            return
        self.request.write(data)

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        if self.missed and not self.gone:
            self.missed = False
            self.request.write(b"event: resync\ndata: {}\n\n")

    def stopProducing(self) -> None:
        self.gone = True

    def close(self) -> None:
        if not self.gone:
            self.gone = True
            with contextlib.suppress(Exception):
                self.request.unregisterProducer()
                self.request.finish()


class EventHub:
    """The event-stream clients, each sent every update and a heartbeat."""

    def __init__(self, state: DashboardState, max_clients: int = MAX_CLIENTS) -> None:
        self.state = state
        self.max_clients = max_clients
        self.clients: list[EventClient] = []
        self.sent = 0
        state.listeners.append(self.publish)

    def publish(self, update: dict[str, Any]) -> None:
        if not self.clients:
            return
        data = b"event: update\ndata: " + to_json(update) + b"\n\n"
        for client in list(self.clients):
            try:
                client.send(data)
            except Exception:
                self.drop(client)
        self.sent += 1

    def heartbeat(self) -> None:
        for client in list(self.clients):
            try:
                client.send(b": heartbeat\n\n")
            except Exception:
                self.drop(client)

    def add(self, client: EventClient) -> None:
        self.clients.append(client)

    def drop(self, client: EventClient) -> None:
        client.gone = True
        if client in self.clients:
            self.clients.remove(client)

    def close(self) -> None:
        for client in list(self.clients):
            client.close()
            self.drop(client)


# -- resources ----------------------------------------------------------------------------


class StaticText(Resource):
    """A fixed document with its content type; not cached (it changes with rexnet)."""

    isLeaf = True

    def __init__(self, body: str, content_type: str) -> None:
        super().__init__()
        self.body = body.encode("utf-8")
        self.content_type = content_type.encode("ascii")

    def render_GET(self, request: IRequest) -> bytes:
        request.setHeader(b"content-type", self.content_type)
        request.setHeader(b"cache-control", b"no-cache")
        return self.body


class StateResource(Resource):
    isLeaf = True

    def __init__(self, state: DashboardState) -> None:
        super().__init__()
        self.state = state

    def render_GET(self, request: IRequest) -> bytes:
        request.setHeader(b"content-type", b"application/json; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        return to_json(self.state.snapshot())


class EventsResource(Resource):
    isLeaf = True

    def __init__(self, hub: EventHub) -> None:
        super().__init__()
        self.hub = hub

    def render_GET(self, request: IRequest) -> bytes | int:
        req: Any = request  # an IRequest that also takes a producer (as server.Request)
        if len(self.hub.clients) >= self.hub.max_clients:
            req.setResponseCode(503)
            req.setHeader(b"content-type", b"text/plain; charset=utf-8")
            req.setHeader(b"retry-after", b"30")
            return b"too many event-stream clients; poll /api/state\n"
        req.setHeader(b"content-type", b"text/event-stream; charset=utf-8")
        req.setHeader(b"cache-control", b"no-store")
        req.setHeader(b"x-accel-buffering", b"no")
        client = EventClient(req)
        req.registerProducer(client, True)
        self.hub.add(client)
        req.notifyFinish().addBoth(lambda _: self.hub.drop(client))
        req.write(b"retry: 3000\n: connected\n\n")
        return NOT_DONE_YET

    def render_HEAD(self, request: IRequest) -> bytes:
        request.setHeader(b"content-type", b"text/event-stream; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        return b""


class Folder(Resource):
    """A resource of named children; anything else is not found (escaped, unlike
    Resource's default page)."""

    def getChild(self, path: bytes, request: IRequest) -> IResource:
        return pages.notFound()


class Root(Folder):
    """The dashboard's tree; every response gets the security headers, and requests
    naming a host other than an address or a name of this machine are refused (a web page
    elsewhere cannot read the dashboard through DNS rebinding)."""

    def __init__(self, state: DashboardState, hub: EventHub,
                 hosts: Iterable[str] = ()) -> None:
        super().__init__()
        machine = socket.gethostname()
        names = ("localhost", machine, machine.split(".")[0], *hosts)
        self.hosts = {h.lower().rstrip(".") for h in names if h}
        self.putChild(b"", StaticText(PAGE, "text/html; charset=utf-8"))
        self.putChild(b"app.js", StaticText(SCRIPT, "text/javascript; charset=utf-8"))
        self.putChild(b"app.css", StaticText(STYLE, "text/css; charset=utf-8"))
        self.putChild(b"favicon.svg", StaticText(ICON, "image/svg+xml"))
        api = Folder()
        api.putChild(b"state", StateResource(state))
        api.putChild(b"events", EventsResource(hub))
        self.putChild(b"api", api)

    def host_allowed(self, header: bytes | None) -> bool:
        if not header:
            return True  # HTTP/1.0 without Host: not a browser
        host = header.decode("latin-1").strip().lower()
        if host.startswith("["):
            host = host[1:host.find("]")] if "]" in host else host
        elif host.count(":") == 1:
            host = host.split(":", 1)[0]
        host = host.rstrip(".")
        try:
            ipaddress.ip_address(host)
            return True
        except ValueError:
            return host in self.hosts

    def getChildWithDefault(self, path: bytes, request: IRequest) -> IResource:
        for name, value in SECURITY_HEADERS.items():
            request.setHeader(name, value)
        if not self.host_allowed(request.getHeader(b"host")):
            return pages.errorPage(421, "Misdirected Request",
                                   "This dashboard answers to its addresses only.")
        return super().getChildWithDefault(path, request)


# -- the service --------------------------------------------------------------------------


def bind_tcp(host: str, port: int) -> socket.socket:
    """A listening TCP socket on HOST:PORT; CratError saying why not."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise CratError(f"cannot serve the dashboard on {host}: {e.strerror}") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(64)
    except OSError as e:
        sock.close()
        raise CratError(f"cannot serve the dashboard on {host_port(host, port)}: "
                        f"{e.strerror}") from None
    sock.setblocking(False)
    return sock


class Dashboard:
    """The dashboard of one Crat: its state (a sink of the Crat), event hub and site."""

    def __init__(self, crat: Crat, hosts: Iterable[str] = ()) -> None:
        self.crat = crat
        self.state = DashboardState(crat)
        self.state.feed(crat.recent)
        self.hub = EventHub(self.state)
        crat.sinks.append(self.state)
        self.root = Root(self.state, self.hub, hosts)
        self.site = Site(self.root)
        self.site.displayTracebacks = False
        self.site.noisy = False


class DashboardService(Service):
    """Serves a Dashboard on a bound TCP socket; sends the event-stream heartbeats."""

    def __init__(self, dashboard: Dashboard, sock: socket.socket, reactor: Any) -> None:
        self.dashboard = dashboard
        self.sock = sock
        self.reactor = reactor
        self.port: IListeningPort | None = None
        self.heartbeat = task.LoopingCall(dashboard.hub.heartbeat)
        self.heartbeat.clock = reactor

    @property
    def url(self) -> str:
        host, port = self.sock.getsockname()[:2]
        return f"http://{host_port(host, port)}/"

    def startService(self) -> None:
        super().startService()
        url = self.url
        self.port = self.reactor.adoptStreamPort(self.sock.fileno(), self.sock.family,
                                                 self.dashboard.site)
        self.sock.close()  # the reactor holds its own copy
        self.heartbeat.start(HEARTBEAT, now=False)
        self.dashboard.crat.log.info("crat dashboard on {url}", url=url)

    def stopService(self) -> defer.Deferred[Any]:
        super().stopService()
        if self.heartbeat.running:
            self.heartbeat.stop()
        self.dashboard.hub.close()
        stopped = self.port.stopListening() if self.port is not None else None
        return stopped if stopped is not None else defer.succeed(None)


def make_dashboard(crat: Crat, host: str, port: int, reactor: Any) -> DashboardService:
    """The dashboard service of CRAT on HOST:PORT, its socket bound now (so that a busy
    port is a one-line error before twistd starts); CratError if it cannot be."""
    sock = bind_tcp(host, port)
    return DashboardService(Dashboard(crat, [host]), sock, reactor)


# -- the page -----------------------------------------------------------------------------

ICON = """<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16">\
<rect width="16" height="16" rx="3" fill="#1f2a44"/>\
<polyline points="2,12 5,8 8,10 11,4 14,6" fill="none" stroke="#7dd3fc" stroke-width="2"/>\
</svg>
"""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>crat dashboard</title>
<link rel="icon" href="/favicon.svg" type="image/svg+xml">
<link rel="stylesheet" href="/app.css">
<script src="/app.js" defer></script>
</head>
<body>
<header>
  <h1>crat</h1>
  <span id="trusted" class="muted"></span>
  <span id="conn" class="conn" data-mode="connecting">connecting&hellip;</span>
  <span id="updated" class="muted"></span>
</header>
<main>
<section id="counts-section" aria-label="counters">
  <dl id="counts"></dl>
</section>
<section id="workers-section">
  <h2>Workers <span id="worker-count" class="n"></span></h2>
  <table id="workers">
    <thead><tr><th>worker</th><th>app</th><th>address</th><th>load over time</th>
    <th class="num">load</th><th class="num">jobs / slots</th><th class="num">cpus</th>
    <th class="num">speed</th><th class="num">free memory</th><th class="num">jobs run</th>
    <th>last heard</th></tr></thead>
    <tbody></tbody>
  </table>
  <p id="workers-empty" class="empty">No worker has reported yet.</p>
</section>
<section id="jobs-section">
  <h2>Running jobs <span id="job-count" class="n"></span></h2>
  <table id="jobs">
    <thead><tr><th>job</th><th>app</th><th>worker</th><th>client</th><th>from</th>
    <th>command</th><th>running for</th></tr></thead>
    <tbody></tbody>
  </table>
  <p id="jobs-empty" class="empty">No job is running.</p>
</section>
<section id="alerts-section">
  <h2>Recent alerts <span class="muted">(newest first)</span></h2>
  <table id="alerts">
    <thead><tr><th>received</th><th>event</th><th>from</th><th>details</th>
    <th>source</th></tr></thead>
    <tbody></tbody>
  </table>
  <p id="alerts-empty" class="empty">No alert yet.</p>
</section>
</main>
<noscript><p>This page needs JavaScript; the same data is at
<a href="/api/state">/api/state</a>.</p></noscript>
</body>
</html>
"""

STYLE = """
:root { color-scheme: light; --fg: #1b1f24; --muted: #6a737d; --line: #e1e4e8;
  --bg: #f6f8fa; --card: #fff; --bad: #b31d28; --badbg: #ffeef0; --ok: #22863a;
  --spark: #0366d6; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif;
  color: var(--fg); background: var(--bg); }
header { display: flex; gap: 1em; align-items: baseline; padding: .6em 1.2em;
  background: #1f2a44; color: #fff; }
header h1 { margin: 0; font-size: 1.3em; }
header .muted { color: #c8d1e0; }
main { padding: .5em 1.2em 2em; }
section { background: var(--card); border: 1px solid var(--line); border-radius: 6px;
  padding: .4em .8em .8em; margin: .8em 0; overflow-x: auto; }
h2 { font-size: 1.05em; margin: .4em 0; }
.n, .muted { color: var(--muted); font-weight: normal; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: .25em .6em; border-bottom: 1px solid var(--line);
  vertical-align: middle; }
th { font-weight: 600; font-size: .9em; color: var(--muted); }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
td.mono { font-family: ui-monospace, monospace; font-size: .92em; }
.empty { color: var(--muted); margin: .4em 0; }
.hidden { display: none; }
.conn { margin-left: auto; padding: .1em .6em; border-radius: 1em; font-size: .85em;
  background: #6a737d; }
.conn[data-mode="live"] { background: var(--ok); }
.conn[data-mode="polling"] { background: #b08800; }
.conn[data-mode="offline"] { background: var(--bad); }
#counts { display: flex; flex-wrap: wrap; gap: .3em 1.6em; margin: .3em 0; }
#counts div { display: flex; gap: .4em; }
#counts dt { color: var(--muted); }
#counts dd { margin: 0; font-weight: 600; font-variant-numeric: tabular-nums; }
svg.spark { display: block; width: 180px; height: 32px; background: #f1f8ff;
  border-radius: 3px; }
svg.spark .line { fill: none; stroke: var(--spark); stroke-width: 1.5; }
svg.spark .area { fill: var(--spark); fill-opacity: .12; stroke: none; }
svg.spark .one { stroke: #d1d5da; stroke-dasharray: 2 2; stroke-width: 1; }
tr.stale td { color: var(--muted); }
tr.stale svg.spark .line { stroke: #959da5; }
.badge { display: inline-block; padding: 0 .45em; border-radius: 3px; font-size: .8em;
  font-weight: 700; letter-spacing: .02em; }
.badge.unverified { background: var(--bad); color: #fff; }
.badge.silent { background: #959da5; color: #fff; }
tr.unverified td { background: var(--badbg); }
tr.unverified td:first-child { box-shadow: inset 4px 0 0 var(--bad); }
.reason { color: var(--bad); margin-left: .4em; }
.field { display: inline-block; max-width: 100%; margin-right: .8em; white-space: pre-wrap;
  overflow-wrap: break-word; }
td.time, td.ev { white-space: nowrap; }
.field .k { color: var(--muted); }
.event { font-weight: 600; }
tr.fresh td { animation: fresh 2s ease-out; }
@keyframes fresh { from { background: #fff8c5; } to { background: transparent; } }
"""

SCRIPT = r"""
"use strict";
(() => {
  const POLL_MS = 5000, RESYNC_MS = 30000, RENDER_MS = 250;
  const SVG = "http://www.w3.org/2000/svg";
  const COUNTS = [["received", "received"], ["verified", "verified"],
    ["unverified", "unverified"], ["garbage", "garbage"], ["ignored", "ignored"],
    ["dropped_verified", "dropped (verified)"], ["dropped_unverified", "dropped (other)"],
    ["sink_errors", "sink errors"], ["errors", "errors"]];
  const FIRST = ["job", "status", "signal", "limit", "duration", "bytes_in", "bytes_out",
    "worker", "client", "what"];
  const st = { workers: new Map(), jobs: new Map(), alerts: [], counts: {}, trusted: [],
    history: 120, maxAlerts: 50, interval: 5, offset: 0, fresh: new Set() };
  let es = null, pollTimer = null, renderTimer = null, lastUpdate = null;

  const $ = (id) => document.getElementById(id);
  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  function td(text, cls) { return el("td", cls, text); }
  const serverNow = () => Date.now() / 1000 + st.offset;

  function ago(seconds) {
    if (seconds === null || seconds === undefined || !isFinite(seconds)) return "";
    const s = Math.max(0, Math.round(seconds));
    if (s < 60) return s + " s";
    if (s < 3600) return Math.floor(s / 60) + " min " + (s % 60) + " s";
    return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
  }
  function bytes(n) {
    if (typeof n !== "number") return "";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return n.toFixed(i ? 1 : 0) + " " + units[i];
  }
  function num(x, digits) {
    return typeof x === "number" ? (digits === undefined ? String(x) : x.toFixed(digits)) : "";
  }
  function clock(iso) {
    const d = new Date(iso);
    return isNaN(d) ? String(iso) : d.toLocaleTimeString();
  }

  // -- state ---------------------------------------------------------------------------

  function load(s) {
    st.offset = s.now - Date.now() / 1000;
    st.history = s.limits.history; st.maxAlerts = s.limits.alerts;
    st.interval = s.limits.status_interval;
    st.workers = new Map(s.workers.map((w) => [w.key, w]));
    st.jobs = new Map(s.running.map((j) => [j.key, j]));
    st.alerts = s.alerts.slice(0, st.maxAlerts);
    st.counts = s.counts; st.trusted = s.trusted;
    lastUpdate = Date.now();
    scheduleRender();
  }

  function apply(u) {
    st.offset = u.now - Date.now() / 1000;
    if (u.worker) {
      const old = st.workers.get(u.worker.key);
      const w = Object.assign({}, u.worker, { history: old ? old.history : [] });
      if (u.point) {
        w.history = w.history.concat([u.point]);
        if (w.history.length > st.history) w.history = w.history.slice(-st.history);
      }
      st.workers.set(w.key, w);
    }
    if (u.job_started) st.jobs.set(u.job_started.key, u.job_started);
    for (const key of u.jobs_ended || []) st.jobs.delete(key);
    if (u.alert) {
      st.alerts.unshift(u.alert);
      st.fresh.add(u.alert);
      if (st.alerts.length > st.maxAlerts) st.alerts.length = st.maxAlerts;
    }
    if (u.counts) st.counts = u.counts;
    lastUpdate = Date.now();
    scheduleRender();
  }

  async function fetchState() {
    try {
      const r = await fetch("/api/state", { cache: "no-store" });
      if (!r.ok) throw new Error("HTTP " + r.status);
      load(await r.json());
      return true;
    } catch (e) {
      if (!es || es.readyState !== EventSource.OPEN) setMode("offline");
      return false;
    }
  }

  // -- connection ----------------------------------------------------------------------

  function setMode(mode) {
    const c = $("conn");
    c.dataset.mode = mode;
    c.textContent = { live: "live", polling: "polling every " + POLL_MS / 1000 + " s",
      offline: "cannot reach crat", connecting: "connecting\u2026" }[mode] || mode;
    document.body.dataset.mode = mode;
  }

  function startPolling() {
    if (pollTimer !== null) return;
    const tick = async () => { if (await fetchState()) setMode("polling"); };
    pollTimer = setInterval(tick, POLL_MS);
    tick();
  }
  function stopPolling() {
    if (pollTimer !== null) { clearInterval(pollTimer); pollTimer = null; }
  }

  function connect() {
    const forcePoll = new URLSearchParams(location.search).has("poll");
    if (forcePoll || typeof EventSource === "undefined") { startPolling(); return; }
    es = new EventSource("/api/events");
    es.addEventListener("open", () => { stopPolling(); setMode("live"); fetchState(); });
    es.addEventListener("update", (e) => {
      try { apply(JSON.parse(e.data)); } catch (err) { fetchState(); }
    });
    es.addEventListener("resync", () => fetchState());
    es.addEventListener("error", () => {
      // the browser reconnects by itself unless the stream is CLOSED; poll meanwhile
      startPolling();
    });
    setInterval(() => { if (es.readyState === EventSource.OPEN) fetchState(); }, RESYNC_MS);
  }

  // -- rendering (textContent only: nothing from an alert is ever markup) ---------------

  function scheduleRender() {
    if (renderTimer === null) renderTimer = setTimeout(render, RENDER_MS);
  }

  function render() {
    renderTimer = null;
    renderCounts(); renderWorkers(); renderJobs(); renderAlerts();
    $("trusted").textContent = st.trusted.length ? "trusting " + st.trusted.join(", ") : "";
    $("updated").textContent = lastUpdate ?
      "updated " + new Date(lastUpdate).toLocaleTimeString() : "";
  }

  function renderCounts() {
    const dl = el("dl"); dl.id = "counts";
    for (const [key, label] of COUNTS) {
      const v = st.counts[key];
      if (typeof v !== "number" || (v === 0 && !["received", "verified", "unverified"]
        .includes(key))) continue;
      const d = el("div"); d.dataset.count = key;
      d.append(el("dt", null, label), el("dd", null, v));
      dl.append(d);
    }
    $("counts").replaceWith(dl);
  }

  function sparkline(history, now) {
    // the window: from the oldest point kept (at least a minute) up to now
    const W = 180, H = 32, full = st.history * st.interval;
    const oldest = history.length ? history[0][0] : now;
    const span = Math.min(full, Math.max(60, now - oldest));
    const svg = document.createElementNS(SVG, "svg");
    svg.setAttribute("class", "spark");
    svg.setAttribute("viewBox", "0 0 " + W + " " + H);
    svg.setAttribute("preserveAspectRatio", "none");
    svg.setAttribute("role", "img");
    const loads = history.map((p) => p[1]);
    const top = Math.max(1, ...loads);
    const y = (v) => (H - 2 - (H - 4) * Math.min(v, top) / top).toFixed(1);
    const x = (t) => (W * (1 - Math.min(span, Math.max(0, now - t)) / span)).toFixed(1);
    const title = document.createElementNS(SVG, "title");
    title.textContent = loads.length ? "load over the last " + ago(span) + ": min " +
      Math.min(...loads).toFixed(2) + ", max " + Math.max(...loads).toFixed(2) :
      "no load figures yet";
    svg.append(title);
    if (top > 1) {  // where a load of 1 (every CPU and slot busy) is
      const one = document.createElementNS(SVG, "line");
      one.setAttribute("class", "one");
      one.setAttribute("x1", "0"); one.setAttribute("x2", String(W));
      one.setAttribute("y1", y(1)); one.setAttribute("y2", y(1));
      svg.append(one);
    }
    if (history.length) {
      const pts = history.map((p) => x(p[0]) + "," + y(p[1]));
      if (pts.length === 1) pts.unshift((x(history[0][0]) - 2) + "," + y(history[0][1]));
      const area = document.createElementNS(SVG, "polygon");
      area.setAttribute("class", "area");
      const first = pts[0].split(",")[0], last = pts[pts.length - 1].split(",")[0];
      area.setAttribute("points", first + "," + H + " " + pts.join(" ") + " " + last + "," + H);
      const line = document.createElementNS(SVG, "polyline");
      line.setAttribute("class", "line");
      line.setAttribute("points", pts.join(" "));
      svg.append(area, line);
    }
    return svg;
  }

  function renderWorkers() {
    const now = serverNow();
    const workers = [...st.workers.values()].sort((a, b) =>
      a.app < b.app ? -1 : a.app > b.app ? 1 : a.name < b.name ? -1 : a.name > b.name ? 1 : 0);
    const body = el("tbody");
    for (const w of workers) {
      const heard = w.status_seen !== null ? w.status_seen : w.seen;
      const silent = now - heard > 3 * st.interval + 5;
      const tr = el("tr", silent ? "stale" : null);
      tr.dataset.worker = w.key;
      const name = td(w.name, "name");
      if (silent) { name.append(" ", el("span", "badge silent", "silent")); }
      const spark = td(null, "spark-cell");
      spark.append(sparkline(w.history || [], now));
      tr.append(name, td(w.app), td(w.address, "mono"), spark,
        td(num(w.load, 2), "num load"),
        td(typeof w.running === "number" ? w.running + " / " + num(w.slots) : "", "num"),
        td(num(w.cpus), "num"), td(num(w.speed), "num"), td(bytes(w.free_memory), "num"),
        td(num(w.jobs_run), "num"), td(ago(now - w.seen) + " ago", "heard"));
      body.append(tr);
    }
    $("workers").tBodies[0].replaceWith(body);
    $("worker-count").textContent = workers.length ? "(" + workers.length + ")" : "";
    $("workers-empty").classList.toggle("hidden", workers.length > 0);
  }

  function renderJobs() {
    const now = serverNow();
    const jobs = [...st.jobs.values()].sort((a, b) => a.started - b.started);
    const body = el("tbody");
    for (const j of jobs) {
      const tr = el("tr");
      tr.dataset.job = j.job;
      tr.append(td(j.job, "mono job"), td(j.app), td(j.worker, "worker"), td(j.client),
        td(j.client_addr, "mono"), td(j.command, "mono"), td(ago(now - j.started)));
      body.append(tr);
    }
    $("jobs").tBodies[0].replaceWith(body);
    $("job-count").textContent = jobs.length ? "(" + jobs.length + ")" : "";
    $("jobs-empty").classList.toggle("hidden", jobs.length > 0);
  }

  function renderAlerts() {
    const body = el("tbody");
    for (const a of st.alerts) {
      const tr = el("tr", a.verified ? "alert" : "alert unverified");
      if (st.fresh.has(a)) tr.classList.add("fresh");
      tr.dataset.event = String(a.event);
      tr.dataset.verified = a.verified ? "yes" : "no";
      const fields = a.fields || {};
      if (typeof fields.job === "string") tr.dataset.job = fields.job;
      const event = td(null, "ev");
      if (!a.verified) event.append(el("span", "badge unverified", "UNVERIFIED"), " ");
      event.append(el("span", "event", a.event));
      if (!a.verified && a.reason) event.append(el("span", "reason", a.reason));
      const who = [a.app, a.role, a.sender].map((v) => (v === null ? "?" : String(v)));
      const details = td(null, "details");
      const keys = Object.keys(fields);
      const order = FIRST.filter((k) => k in fields).concat(
        keys.filter((k) => !FIRST.includes(k)).sort());
      for (const k of order) {
        const f = el("span", "field");
        f.append(el("span", "k", k + "="), el("span", "v", fields[k]));
        details.append(f);
      }
      tr.append(td(clock(a.received), "time"), event, td(who.join(" ")), details,
        td(a.source, "mono"));
      body.append(tr);
    }
    st.fresh.clear();
    $("alerts").tBodies[0].replaceWith(body);
    $("alerts-empty").classList.toggle("hidden", st.alerts.length > 0);
  }

  setInterval(scheduleRender, 5000);  // ages and silent workers move on by themselves
  setMode("connecting");
  fetchState();
  connect();
})();
"""
