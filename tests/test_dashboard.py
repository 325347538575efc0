"""crat's dashboard (rexnet.crat.dashboard, twistd crat --web): state, resources, a real browser.

First the state the dashboard builds from crat's records (a real Crat, real credentials,
a fake clock), and its resources rendered with twisted.web's DummyRequest: /api/state,
the page and its strict Content-Security-Policy, the event stream.  Then a real
`twistd crat --web` process: bound to 127.0.0.1 unless told otherwise, served over real
HTTP.  Last, headless Chromium (Debian's chromium and chromium-driver, driven by selenium)
watches a real worker and a real job arrive live, without reloading the page.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cluster import TWISTD, Proc, exec_argv, loopback_address, start_worker
from conftest import Keys
from twisted.application.service import MultiService
from twisted.logger import ILogObserver, Logger
from twisted.python import usage
from twisted.web.resource import getChildForRequest
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest
from zope.interface import provider

from rexnet.crat import tap as crat_tap
from rexnet.crat.core import Crat
from rexnet.crat.dashboard.events import EventClient
from rexnet.crat.dashboard.state import ALERTS, HISTORY
from rexnet.crat.dashboard.web import (
    CSP,
    ICON,
    PAGE,
    SCRIPT,
    STYLE,
    Dashboard,
    DashboardService,
)
from rexnet.crat.service import CratService
from rexnet.protocol import exitcodes, wire
from rexnet.security.credentials import Credential, load_credential

SOURCE = "192.0.2.9"
XSS = '<img src=x onerror="document.title=\'pwned\'">'


class FakeClock:
    def __init__(self) -> None:
        self.seconds = time.time()

    def __call__(self) -> float:
        return self.seconds

    @property
    def ms(self) -> int:
        return int(self.seconds * 1000)


@provider(ILogObserver)
def _quiet(event: dict[str, Any]) -> None:
    pass


def signed(cred: Credential, event: str, ts: int, **fields: str | int | float) -> bytes:
    """An ALERT datagram as CRED's holder sends it."""
    return wire.encode_datagram(wire.Alert(ts, event, tuple(sorted(fields.items()))),
                                cred.app_id, cred.key, cred.cert_der)


@dataclass
class Bench:
    """A Crat on a fake clock with its Dashboard; the updates the dashboard published."""

    crat: Crat
    clock: FakeClock
    dash: Dashboard
    worker: Credential
    client: Credential
    stranger: Credential  # another application's worker: its alerts are unverified
    updates: list[dict[str, Any]] = field(default_factory=list)

    def send(self, cred: Credential, event: str, **fields: str | int | float) -> None:
        self.clock.seconds += 0.001  # each alert differs (no replays)
        self.crat.datagram(signed(cred, event, self.clock.ms, **fields), SOURCE, 40000)

    def status(self, name: str = "w1", load: float = 0.25, running: int = 0,
               **more: str | int | float) -> None:
        figures: dict[str, str | int | float] = {
            "load": load, "running": running, "slots": 4, "cpus": 2, "speed": 1.5,
            "free_memory": 1 << 30, "jobs_run": 7}
        figures.update(more)
        self.send(self.worker, "worker-status", worker=name, **figures)

    def state(self) -> dict[str, Any]:
        return self.dash.state.snapshot()


@pytest.fixture(scope="module")
def creds(keys: Keys, other_keys: Keys) -> tuple[Credential, Credential, Credential]:
    return (load_credential(keys.worker, "worker"), load_credential(keys.client, "client"),
            load_credential(other_keys.worker, "worker"))


@pytest.fixture
def b(creds: tuple[Credential, Credential, Credential]) -> Bench:
    worker, client, stranger = creds
    clock = FakeClock()
    crat = Crat([worker.ca_cert], clock, [], Logger(observer=_quiet))
    dash = Dashboard(crat)
    bench = Bench(crat, clock, dash, worker, client, stranger)
    dash.state.listeners.append(bench.updates.append)
    return bench


# -- the state, from crat's records ------------------------------------------------------


def test_worker_status_builds_the_workers_and_their_bounded_load_history(b: Bench) -> None:
    t0 = b.clock.seconds
    for i in range(HISTORY + 10):
        b.status(load=i / 100)
        b.clock.seconds += 5
    b.status(name="w2", load=1.75, running=3)
    state = b.state()
    w1, w2 = state["workers"]
    # rows are the certificate's: workers sharing APP.worker (named "worker") are
    # worker/NAME, NAME being what each calls itself
    assert (w1["key"], w1["name"], w1["app"], w1["sender"], w1["claimed"], w1["address"]) == (
        "testapp/worker/w1", "worker/w1", "testapp", "worker", "w1", SOURCE)
    assert (w1["load"], w1["running"], w1["slots"], w1["cpus"], w1["speed"],
            w1["free_memory"], w1["jobs_run"]) == ((HISTORY + 9) / 100, 0, 4, 2, 1.5,
                                                   1 << 30, 7)
    assert len(w1["history"]) == HISTORY  # the oldest points are gone
    assert [p[1] for p in w1["history"]] == [i / 100 for i in range(10, HISTORY + 10)]
    times = [p[0] for p in w1["history"]]
    assert times == sorted(times) and times[0] > t0 + 49
    assert w2["load"] == 1.75 and w2["running"] == 3 and len(w2["history"]) == 1
    # periodic reports are the workers' table, not alerts
    assert state["alerts"] == []
    assert state["counts"]["verified"] == HISTORY + 11
    assert state["trusted"] == ["testapp"]
    assert state["limits"]["history"] == HISTORY


def test_running_jobs_are_started_minus_finished(b: Bench) -> None:
    b.status()
    for job in ("j1", "j2", "j3"):
        b.send(b.worker, "job-started", job=job, worker="w1", client="alice",
               client_addr="10.0.0.7:5555", command="sh -c work")
    b.send(b.worker, "job-finished", job="j1", worker="w1", client="alice", status=0)
    b.send(b.client, "job-finished", job="j2", worker="w1", status=3)  # the client's word
    b.send(b.worker, "job-finished", job="j2", worker="w1", status=3)  # and then the worker's
    b.send(b.worker, "job-finished", job="never-started", worker="w1", status=0)
    running = b.state()["running"]
    assert [j["job"] for j in running] == ["j3"]
    (j3,) = running
    assert (j3["key"], j3["app"], j3["worker"], j3["client"], j3["client_addr"],
            j3["command"]) == ("testapp/j3", "testapp", "worker/w1", "alice", "10.0.0.7:5555",
                               "sh -c work")
    assert isinstance(j3["started"], float)
    events = [a["event"] for a in b.state()["alerts"]]
    assert events == ["job-finished"] * 4 + ["job-started"] * 3  # newest first


def test_a_report_of_no_running_job_ends_jobs_whose_finish_was_lost(b: Bench) -> None:
    b.send(b.worker, "job-started", job="lost", worker="w1", client="alice")
    b.send(b.worker, "job-started", job="other", worker="w2", client="alice")
    b.status(name="w1", running=1)
    assert len(b.state()["running"]) == 2
    b.status(name="w1", running=0)
    assert [j["job"] for j in b.state()["running"]] == ["other"]
    assert b.updates[-1]["jobs_ended"] == ["testapp/lost"]


def test_a_workers_complaint_is_an_alert_not_a_worker(b: Bench) -> None:
    """Complaints name no worker (the credential's name is not the worker's)."""
    b.send(b.worker, "complaint", what="announcement refused", source="10.0.0.9")
    state = b.state()
    assert state["workers"] == [] and state["alerts"][0]["event"] == "complaint"


def test_recent_alerts_are_bounded_and_newest_first(b: Bench) -> None:
    for i in range(ALERTS + 15):
        b.send(b.worker, "complaint", what=f"complaint {i}")
    alerts = b.state()["alerts"]
    assert len(alerts) == ALERTS
    assert [a["fields"]["what"] for a in alerts] == [
        f"complaint {i}" for i in reversed(range(15, ALERTS + 15))]
    assert alerts[0]["verified"] is True and alerts[0]["reason"] is None
    assert set(alerts[0]) == {"received", "source", "verified", "reason", "app", "role",
                              "sender", "event", "ts", "fields"}


def test_unverified_alerts_are_listed_with_the_reason_and_change_nothing_else(
        b: Bench) -> None:
    b.send(b.stranger, "worker-status", worker="fake", load=9.0, running=0, slots=1)
    b.send(b.stranger, "job-started", job="fake-job", worker="fake", client="x")
    b.status(running=1)
    b.send(b.worker, "job-started", job="real", worker="w1", client="alice")
    b.send(b.stranger, "job-finished", job="real", worker="w1", status=0)
    state = b.state()
    assert [j["job"] for j in state["running"]] == ["real"]
    assert [w["name"] for w in state["workers"]] == ["worker/w1"]
    assert [a["event"] for a in state["alerts"]] == ["job-started"]  # kept apart
    unverified = state["unverified"]
    assert [a["event"] for a in unverified] == ["job-finished", "job-started",
                                                "worker-status"]
    assert all(a["reason"] == "certificate not issued by a trusted CA" and
               a["app"] == "otherapp" for a in unverified)
    assert state["counts"]["unverified"] == 3


def test_each_record_publishes_a_compact_update(b: Bench) -> None:
    b.status(load=0.5, running=1)
    b.send(b.worker, "job-started", job="j1", worker="w1", client="alice")
    b.send(b.worker, "job-finished", job="j1", worker="w1", status=0)
    status, started, finished = b.updates
    assert status["alert"] is None and status["point"] == [pytest.approx(b.clock()), 0.5]
    assert status["worker"]["key"] == "testapp/worker/w1" and "history" not in status["worker"]
    assert started["job_started"]["key"] == "testapp/j1"
    assert started["alert"]["event"] == "job-started"
    assert finished["jobs_ended"] == ["testapp/j1"] and finished["job_started"] is None
    assert finished["counts"]["verified"] == 3
    json.dumps(b.updates, allow_nan=False)  # all of it is plain JSON


def test_odd_records_neither_raise_nor_reach_the_tables(b: Bench) -> None:
    odd: list[dict[str, Any]] = [
        {},
        {"verified": True, "role": "worker", "event": "job-started", "fields": {"job": 5}},
        {"verified": True, "role": "worker", "event": "worker-status", "app": "a",
         "sender": "s", "source": "[2001:db8::1]:99", "fields": {"load": "high",
                                                                 "worker": "w"}},
        {"verified": True, "role": "client", "event": "job-finished", "fields": None},
    ]
    for record in odd:
        b.dash.state(record)
    state = b.state()
    assert b.dash.state.errors == 0
    assert state["running"] == []
    (worker,) = state["workers"]
    assert (worker["key"], worker["sender"], worker["address"], worker["load"]) == (
        "a/s/w", "s", "2001:db8::1", None)
    assert worker["history"] == []
    assert len(state["alerts"]) == 2 and len(state["unverified"]) == 1  # {} is not verified


def test_records_crat_made_before_the_dashboard_are_taken_in(
        creds: tuple[Credential, Credential, Credential]) -> None:
    worker, _, _ = creds
    clock = FakeClock()
    crat = Crat([worker.ca_cert], clock, [], Logger(observer=_quiet))
    crat.datagram(signed(worker, "job-started", clock.ms, job="early", worker="w1"),
                  SOURCE, 1)
    state = Dashboard(crat).state.snapshot()
    assert [j["job"] for j in state["running"]] == ["early"]
    assert [w["name"] for w in state["workers"]] == ["worker/w1"]


def test_the_dashboard_is_a_sink_of_crat(b: Bench) -> None:
    assert b.dash.state in b.crat.sinks
    b.send(b.worker, "complaint", what="hello")
    assert b.crat.counts.sink_errors == 0 and len(b.updates) == 1


# -- resources (DummyRequest) -----------------------------------------------------------


class StreamRequest(DummyRequest):
    """A DummyRequest that holds a push producer rather than looping on it."""

    producer: Any = None

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None


def get(dash: Dashboard, path: str, host: str | None = "127.0.0.1:8080",
        method: bytes = b"GET", request: DummyRequest | None = None) -> DummyRequest:
    req = request or DummyRequest(path.lstrip("/").encode().split(b"/"))
    req.method = method
    if host is not None:
        req.requestHeaders.setRawHeaders(b"host", [host.encode()])
    resource = getChildForRequest(dash.root, req)
    result = resource.render(req)
    if result is not NOT_DONE_YET:
        req.write(result)
        req.finish()
    return req


def header(req: DummyRequest, name: str) -> str | None:
    values = req.responseHeaders.getRawHeaders(name.encode())
    return values[-1].decode() if values else None


def body(req: DummyRequest) -> bytes:
    return b"".join(req.written)


def test_api_state_over_a_request(b: Bench) -> None:
    b.status()
    b.send(b.worker, "complaint", what=XSS)
    req = get(b.dash, "/api/state")
    assert req.responseCode in (None, 200)
    assert header(req, "content-type") == "application/json; charset=utf-8"
    assert header(req, "cache-control") == "no-store"
    state = json.loads(body(req))
    assert state["workers"][0]["name"] == "worker/w1"
    assert state["alerts"][0]["fields"]["what"] == XSS  # data, kept as it was said


@pytest.mark.parametrize("path", ["/", "/app.js", "/app.css", "/api/state", "/nowhere"])
def test_every_response_has_the_security_headers(b: Bench, path: str) -> None:
    req = get(b.dash, path)
    assert header(req, "content-security-policy") == CSP
    assert CSP.startswith("default-src 'self';") and "unsafe" not in CSP
    assert header(req, "x-content-type-options") == "nosniff"
    assert header(req, "x-frame-options") == "DENY"


@pytest.mark.parametrize(("path", "content_type"), [
    ("/", "text/html; charset=utf-8"),
    ("/app.js", "text/javascript; charset=utf-8"),
    ("/app.css", "text/css; charset=utf-8"),
    ("/favicon.svg", "image/svg+xml"),
])
def test_the_page_and_its_parts(b: Bench, path: str, content_type: str) -> None:
    req = get(b.dash, path)
    assert header(req, "content-type") == content_type
    assert body(req) == {"/": PAGE, "/app.js": SCRIPT, "/app.css": STYLE,
                         "/favicon.svg": ICON}[path].encode()


def test_the_page_is_self_contained_and_fits_the_strict_csp() -> None:
    # no inline script or style (the CSP would block them), nothing from elsewhere
    assert re.findall(r"<script[^>]*>", PAGE) == ['<script src="/app.js" defer>']
    assert "<style" not in PAGE and " style=" not in PAGE and " on" not in PAGE.lower()
    for text in (PAGE, SCRIPT, STYLE):
        urls = re.findall(r"https?://[^\s\"'<>)]+", text)
        assert all(u == "http://www.w3.org/2000/svg" for u in urls), urls  # a namespace
        assert "@import" not in text and "url(" not in text
    # alert data is only ever text
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(",
                 "new Function", 'setAttribute("style', "setAttribute('on"):
        assert sink not in SCRIPT
    assert "textContent" in SCRIPT and "EventSource" in SCRIPT and "/api/state" in SCRIPT


@pytest.mark.parametrize(("host", "allowed"), [
    ("127.0.0.1:8080", True), ("localhost:8080", True), ("[::1]:8080", True),
    ("10.1.2.3", True), ("LOCALHOST.", True), (None, True), (socket.gethostname(), True),
    ("evil.example:8080", False), ("127.0.0.1.evil.example", False), ("[::1", False),
])
def test_requests_for_other_host_names_are_refused(b: Bench, host: str | None,
                                                   allowed: bool) -> None:
    """A page on another site cannot read the dashboard through DNS rebinding."""
    req = get(b.dash, "/api/state", host=host)
    if allowed:
        assert req.responseCode in (None, 200) and json.loads(body(req))["workers"] == []
    else:
        assert req.responseCode == 421 and b"workers" not in body(req)
        assert header(req, "content-security-policy") == CSP


def test_only_get_and_head(b: Bench) -> None:
    from twisted.web.error import UnsupportedMethod

    with pytest.raises(UnsupportedMethod):
        get(b.dash, "/api/state", method=b"POST")
    req = get(b.dash, "/api/events", method=b"HEAD")
    assert header(req, "content-type") == "text/event-stream; charset=utf-8"
    assert b.dash.hub.clients == []


def open_stream(b: Bench) -> StreamRequest:
    req = get(b.dash, "/api/events", request=StreamRequest([b"api", b"events"]))
    assert isinstance(req, StreamRequest)
    return req


def events(req: DummyRequest) -> list[tuple[str, Any]]:
    """The (event, data) pairs written to an event stream so far."""
    out = []
    for block in body(req).decode().split("\n\n"):
        lines = block.split("\n")
        name = next((line[7:] for line in lines if line.startswith("event: ")), None)
        data = next((line[6:] for line in lines if line.startswith("data: ")), None)
        if name is not None and data is not None:
            out.append((name, json.loads(data)))
    return out


def test_the_event_stream_sends_an_update_per_alert(b: Bench) -> None:
    req = open_stream(b)
    assert header(req, "content-type") == "text/event-stream; charset=utf-8"
    assert header(req, "cache-control") == "no-store"
    assert body(req).startswith(b"retry: 3000\n")
    assert isinstance(req.producer, EventClient) and not req.finished
    b.status(load=0.75)
    b.send(b.worker, "complaint", what="line one\nline two " + XSS)
    (n1, u1), (n2, u2) = events(req)
    assert n1 == n2 == "update"
    assert u1["point"][1] == 0.75 and u1["worker"]["name"] == "worker/w1"
    assert u2["alert"]["fields"]["what"] == "line one\nline two " + XSS
    assert body(req).count(b"\n\n") == 3  # the newline stayed inside the JSON
    b.dash.hub.heartbeat()
    assert body(req).endswith(b": heartbeat\n\n")
    req.finish()  # the client went away
    assert b.dash.hub.clients == []
    b.send(b.worker, "complaint", what="after")  # nothing written, nothing raised
    assert len(events(req)) == 2


def test_a_client_that_does_not_read_misses_updates_then_resyncs(b: Bench) -> None:
    req = open_stream(b)
    client = req.producer
    client.pauseProducing()
    b.send(b.worker, "complaint", what="missed")
    assert events(req) == []
    client.resumeProducing()
    assert events(req) == [("resync", {})]
    b.send(b.worker, "complaint", what="seen")
    assert events(req)[-1][1]["alert"]["fields"]["what"] == "seen"


def test_event_stream_clients_are_bounded(b: Bench) -> None:
    streams = [open_stream(b) for _ in range(b.dash.hub.max_clients)]
    refused = get(b.dash, "/api/events")
    assert refused.responseCode == 503 and refused.finished
    assert b"poll /api/state" in body(refused)
    streams[0].finish()
    assert open_stream(b).producer is not None
    b.dash.hub.close()
    assert all(s.finished for s in streams[1:]) and b.dash.hub.clients == []


def test_the_service_sends_heartbeats_and_ends_streams_when_stopping(b: Bench) -> None:
    from twisted.internet.testing import MemoryReactorClock

    from rexnet.crat.dashboard.events import HEARTBEAT
    from rexnet.crat.dashboard.web import bind_tcp

    reactor = MemoryReactorClock()
    service = DashboardService(b.dash, bind_tcp("127.0.0.1", 0), reactor)
    url = service.url
    service.startService()
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/", url)
    assert reactor.adoptedPorts[0][2] is b.dash.site
    assert service.sock.fileno() == -1  # the reactor has its own copy
    stream = open_stream(b)
    reactor.advance(HEARTBEAT - 0.1)
    assert b"heartbeat" not in body(stream)
    reactor.advance(0.2)
    assert body(stream).endswith(b": heartbeat\n\n")
    service.stopService()
    assert stream.finished and b.dash.hub.clients == []
    assert not service.heartbeat.running


# -- options and the service tree ------------------------------------------------------


def parse(*args: str) -> crat_tap.Options:
    options = crat_tap.Options()
    options.parseOptions(list(args))
    return options


def test_web_options() -> None:
    plain = parse("--trust", "a")
    assert plain["web_port"] is None and plain["web-interface"] == "127.0.0.1"
    web = parse("--trust", "a", "--web", "8080")
    assert web["web_port"] == 8080 and web["web-interface"] == "127.0.0.1"
    assert parse("--trust", "a", "--web", "0", "--web-interface", "::1")["web-interface"] == (
        "::1")
    for bad in ("x", "-1", "65536"):
        with pytest.raises(usage.UsageError, match="bad --web port"):
            parse("--trust", "a", "--web", bad)


def test_make_service_with_web_binds_loopback_by_default(keys: Keys) -> None:
    top = crat_tap.makeService(parse("--listen", f"{loopback_address()}:0", "--trust",
                                     str(keys.ca_pem), "--web", "0"))
    assert isinstance(top, MultiService)
    crat_service, web = list(top)
    assert isinstance(crat_service, CratService) and isinstance(web, DashboardService)
    try:
        assert web.sock.getsockname()[0] == "127.0.0.1"
        assert web.url == f"http://127.0.0.1:{web.sock.getsockname()[1]}/"
        assert web.dashboard.crat is crat_service.crat
        assert web.dashboard.state in crat_service.crat.sinks
    finally:
        web.sock.close()
        crat_service.sock.close()


def test_the_dashboard_on_ipv6_loopback(b: Bench) -> None:
    from rexnet.crat.dashboard.web import bind_tcp

    try:
        sock = bind_tcp("::1", 0)
    except Exception as e:
        pytest.skip(f"no IPv6 loopback here: {e}")
    service = DashboardService(b.dash, sock, None)
    try:
        assert re.fullmatch(r"http://\[::1\]:\d+/", service.url), service.url
    finally:
        sock.close()


def test_a_busy_web_port_is_a_one_line_error(keys: Keys, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(SystemExit) as exit:
            crat_tap.makeService(parse(
                "--listen", f"{loopback_address()}:0", "--trust", str(keys.ca_pem),
                "--jsonl", str(tmp_path / "a.jsonl"), "--web", str(port)))
    assert exit.value.code == exitcodes.USAGE
    err = capsys.readouterr().err
    assert err == (f"crat: cannot serve the dashboard on 127.0.0.1:{port}: "
                   "Address already in use\n")


# -- a real crat process ----------------------------------------------------------------


@dataclass
class CratProc:
    proc: Proc
    udp: tuple[str, int]
    web: tuple[str, int]

    @property
    def url(self) -> str:
        host, port = self.web
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/"

    def send(self, data: bytes) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(data, self.udp)

    def stop(self) -> int:
        status = self.proc.stop()
        if self.proc.process.stdout is not None:
            self.proc.process.stdout.close()
        return status


def start_crat(keys: Keys, *options: str) -> CratProc:
    udp = (loopback_address(), 3011)
    argv = [TWISTD, "-n", "--pidfile=", "crat", "--listen", f"{udp[0]}:{udp[1]}",
            "--trust", str(keys.ca_pem), "--web", "0", *options]
    proc = Proc(argv)
    match = proc.wait_for(r"crat dashboard on http://(\[[^\]]+\]|[^:/]+):(\d+)/", 30)
    proc.wait_for(r"crat listening on", 30)
    return CratProc(proc, udp, (match.group(1).strip("[]"), int(match.group(2))))


def fetch(crat: CratProc, path: str, host: str | None = None) -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection(*crat.web, timeout=30)
    conn.request("GET", path, headers={"Host": host} if host else {})
    return conn.getresponse()


@pytest.fixture
def crat(keys: Keys) -> Iterator[CratProc]:
    proc = start_crat(keys)
    yield proc
    proc.stop()


def now_ms() -> int:
    return int(time.time() * 1000)


def test_the_web_port_binds_127_0_0_1_by_default(crat: CratProc) -> None:
    host, port = crat.web
    assert host == "127.0.0.1"
    socket.create_connection(crat.web, timeout=10).close()
    with pytest.raises(ConnectionRefusedError):  # not 0.0.0.0: other addresses are closed
        socket.create_connection(("127.0.0.2", port), timeout=10).close()


def test_web_interface_chooses_the_address(keys: Keys) -> None:
    addr = loopback_address()
    crat = start_crat(keys, "--web-interface", addr)
    try:
        assert crat.web[0] == addr
        assert json.loads(fetch(crat, "/api/state").read())["trusted"] == ["testapp"]
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", crat.web[1]), timeout=10).close()
    finally:
        crat.stop()


def test_a_real_crat_serves_state_and_headers(keys: Keys, crat: CratProc) -> None:
    worker = load_credential(keys.worker, "worker")
    crat.send(signed(worker, "complaint", now_ms(), what=XSS, source="x"))
    deadline = time.monotonic() + 15
    while True:
        state = json.loads(fetch(crat, "/api/state").read())
        if state["alerts"] or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert state["alerts"][0]["fields"]["what"] == XSS and state["alerts"][0]["verified"]
    page = fetch(crat, "/")
    assert page.status == 200 and page.read() == PAGE.encode()
    assert page.getheader("Content-Security-Policy") == CSP
    assert page.getheader("X-Content-Type-Options") == "nosniff"
    assert fetch(crat, "/app.js").getheader("Content-Type") == (
        "text/javascript; charset=utf-8")
    assert fetch(crat, "/api/state", host="rebound.example").status == 421


def read_event(resp: http.client.HTTPResponse, timeout: float = 20) -> tuple[str, Any]:
    """The next event of a real event stream (comments skipped)."""
    deadline = time.monotonic() + timeout
    name, data = None, None
    while time.monotonic() < deadline:
        line = resp.readline().decode()
        if not line:
            raise AssertionError("the event stream ended")
        line = line.rstrip("\n")
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            data = json.loads(line[6:])
        elif line == "" and name is not None:
            return name, data
    raise AssertionError("no event in time")


def test_a_real_event_stream_and_a_clean_stop(keys: Keys) -> None:
    crat = start_crat(keys)
    try:
        resp = fetch(crat, "/api/events")
        assert resp.status == 200
        assert resp.getheader("Content-Type") == "text/event-stream; charset=utf-8"
        worker = load_credential(keys.worker, "worker")
        crat.send(signed(worker, "job-started", now_ms(), job="j9", worker="w9",
                         client="alice"))
        name, update = read_event(resp)
        assert name == "update" and update["job_started"]["job"] == "j9"
        assert update["worker"]["name"] == "worker/w9"
    finally:
        status = crat.stop()
    assert status in (0, -signal.SIGTERM)
    assert "Traceback" not in crat.proc.output
    assert resp.read() == b""  # the stream was ended, not left hanging


# -- a real browser ----------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
SCREENSHOT = Path("/tmp/rexnet-dashboard.png")
WAIT = 45.0  # seconds; a busy 2-core machine runs chromium, crat, a worker and clients


def need_browser() -> None:
    """Skip (fail under CI=true) without Debian's chromium, chromium-driver and selenium."""
    missing = [f"{path} (apt: {package})" for path, package in (
        (CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver"))
        if not os.access(path, os.X_OK)]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip install '.[test]')")
    if missing:
        reason = "the dashboard's browser test needs " + ", ".join(missing)
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    need_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tmp_path_factory.mktemp("chromium")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--disable-extensions",
                "--no-proxy-server", "--window-size=1280,900", "--hide-scrollbars",
                f"--user-data-dir={profile / 'profile'}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=CHROMEDRIVER,
                      log_output=str(profile / "chromedriver.log"))
    with pytest.MonkeyPatch.context() as env:
        # the driver is named above, so selenium-manager is not even asked; and offline
        env.setenv("SE_OFFLINE", "true")
        driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(WAIT)
    driver.set_script_timeout(WAIT)
    try:
        yield driver
    finally:
        driver.quit()


@dataclass
class Site:
    crat: CratProc
    worker: Proc
    worker_addr: str


@pytest.fixture(scope="module")
def site(keys: Keys) -> Iterator[Site]:
    """A real crat with its dashboard and a real worker sending it alerts, on loopback."""
    crat = start_crat(keys)
    worker_addr = f"{loopback_address()}:3010"
    udp = f"{crat.udp[0]}:{crat.udp[1]}"
    try:
        worker = start_worker(keys.worker, ["sh", "-c"], worker_addr, "w1", "--allow-args",
                              "--alerts", udp)
    except BaseException:
        crat.stop()
        raise
    yield Site(crat, worker, worker_addr)
    worker.stop()
    if worker.process.stdout is not None:
        worker.process.stdout.close()
    crat.stop()


def wait_until(driver: Any, what: str, condition: Callable[[Any], Any],
               timeout: float = WAIT) -> Any:
    from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:  # the page re-renders its tables: an element may go stale while we read it
        return WebDriverWait(driver, timeout, poll_frequency=0.2,
                             ignored_exceptions=(StaleElementReferenceException,)
                             ).until(condition)
    except TimeoutException:
        raise AssertionError(f"the page never showed {what}; it shows:\n"
                             f"{driver.find_element('tag name', 'body').text}") from None


def css(driver: Any, selector: str) -> list[Any]:
    return list(driver.find_elements("css selector", selector))


def png_facts(data: bytes) -> tuple[int, int, int]:
    """Width, height and the number of distinct byte values of the pixels of a PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, size = 8, b"", (0, 0)
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            size = struct.unpack(">II", chunk[:8])
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    return size[0], size[1], len(set(zlib.decompress(idat)))


def screenshot(driver: Any, path: Path) -> bytes:
    data: bytes = driver.get_screenshot_as_png()
    path.write_bytes(data)
    width, height, distinct = png_facts(data)
    assert width >= 800 and height >= 500, (width, height)
    assert len(data) > 10_000 and distinct > 30, "the screenshot looks blank"
    return data


def no_page_errors(driver: Any) -> None:
    """Nothing blocked by the Content-Security-Policy, no script error."""
    bad = [e["message"] for e in driver.get_log("browser")
           if "Content Security Policy" in e["message"] or "Uncaught" in e["message"]]
    assert not bad, bad


def start_job(keys: Keys, site: Site, script: str) -> subprocess.Popen[bytes]:
    udp = f"{site.crat.udp[0]}:{site.crat.udp[1]}"
    return subprocess.Popen(exec_argv(keys.client, [site.worker_addr], "-T", "--alerts", udp,
                                      "--", script),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def first_line(proc: subprocess.Popen[bytes], timeout: float = WAIT) -> str:
    """The first line PROC writes (a thread reads it, so that a hung job cannot hang us)."""
    stdout = proc.stdout
    assert stdout is not None
    lines: list[bytes] = []

    def read() -> None:
        lines.append(stdout.readline())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    assert lines and lines[0], f"the job printed nothing: {proc.poll()}"
    return lines[0].decode().strip()


def test_the_page_shows_a_real_job_live(browser: Any, keys: Keys, site: Site,
                                        tmp_path: Path) -> None:
    driver = browser
    driver.get(site.crat.url)
    wait_until(driver, "the live event stream", lambda d: d.find_element(
        "id", "conn").get_attribute("data-mode") == "live")
    row = 'tr[data-worker="testapp/worker/w1"]'  # w1 holds the shared APP.worker
    wait_until(driver, "worker w1", lambda d: css(d, row))
    driver.execute_script("window.rexnetNotReloaded = 42;")
    before = screenshot(driver, tmp_path / "before.png")
    alerts_before = driver.find_element("id", "alerts-section").screenshot_as_png

    job = start_job(keys, site, 'echo "$REXNET_JOB_ID"; read go; echo "done $go"')
    try:
        job_id = first_line(job)
        assert re.fullmatch(r"[0-9a-f]{12}", job_id), job_id
        running = f'#jobs tr[data-job="{job_id}"]'
        wait_until(driver, f"job {job_id} running", lambda d: css(d, running))
        cells = [c.text for c in css(driver, running + " td")]
        assert cells[:4] == [job_id, "testapp", "worker/w1", "client"], cells
        screenshot(driver, tmp_path / "running.png")
        out, err = job.communicate(b"now\n", timeout=WAIT)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    assert job.returncode == 0 and out == b"done now\n", err

    finished = f'#alerts tr[data-event="job-finished"][data-job="{job_id}"]'
    wait_until(driver, f"the job-finished alerts of {job_id}",
               lambda d: len(css(d, finished)) == 2)  # the worker's and the client's
    wait_until(driver, f"job {job_id} gone from the running jobs",
               lambda d: not css(d, running))
    assert css(driver, f'#alerts tr[data-event="job-started"][data-job="{job_id}"]')
    # the worker's row: its next status report counts the job (within 5 s)
    wait_until(driver, "w1 counting its job", lambda d: int(
        css(d, row + " td")[9].text or 0) >= 1)
    cells = [c.text for c in css(driver, row + " td")]
    assert cells[0] == "worker/w1" and cells[1] == "testapp", cells
    assert re.fullmatch(r"\d+\.\d\d", cells[4]), cells  # the last load figure
    assert re.fullmatch(r"\d+ / \d+", cells[5]), cells  # running jobs / slots
    points = css(driver, row + " svg.spark polyline")[0].get_attribute("points")
    assert len(points.split()) >= 2, points

    after = screenshot(driver, tmp_path / "after.png")
    SCREENSHOT.write_bytes(after)
    assert after != before, "the screenshots are the same: no live update arrived"
    alerts_after = driver.find_element("id", "alerts-section").screenshot_as_png
    assert alerts_after != alerts_before
    assert driver.execute_script("return window.rexnetNotReloaded;") == 42, "page reloaded"
    # every alert shown here is verified: none is marked
    assert not css(driver, "#alerts .badge.unverified")
    assert all(r.get_attribute("data-verified") == "yes" for r in css(driver, "#alerts tbody tr"))
    no_page_errors(driver)


def test_alert_text_is_text_and_only_unverified_alerts_are_marked(
        browser: Any, keys: Keys, other_keys: Keys, site: Site, tmp_path: Path) -> None:
    driver = browser
    driver.get(site.crat.url)
    wait_until(driver, "the live event stream", lambda d: d.find_element(
        "id", "conn").get_attribute("data-mode") == "live")
    title = driver.title
    worker = load_credential(keys.worker, "worker")
    stranger = load_credential(other_keys.worker, "worker")
    marker = f"m{time.monotonic_ns()}"
    site.crat.send(signed(worker, "complaint", now_ms(), what=f"{marker} {XSS}",
                          source="<b>bold</b>"))
    site.crat.send(signed(stranger, "complaint", now_ms(), what=f"{marker} forged <i>x</i>"))

    def rows(d: Any) -> list[Any]:
        found = [r for table in ("alerts", "unverified")
                 for r in css(d, f'#{table} tr[data-event="complaint"]') if marker in r.text]
        return found if len(found) == 2 else []

    # verified and unverified alerts are listed apart
    real, forged = wait_until(driver, "both complaints", rows)
    assert f"{marker} {XSS}" in real.text and "source=<b>bold</b>" in real.text
    assert f"{marker} forged <i>x</i>" in forged.text
    assert not any(marker in r.text for r in css(driver, "#alerts tr.unverified"))
    assert any(marker in r.text for r in css(driver, "#unverified tr.unverified"))
    assert not css(driver, "#alerts img, #alerts b, #alerts i, #unverified img, "
                   "#unverified b, #unverified i"), "alert text became markup"
    assert not css(driver, "img")
    assert driver.title == title
    # only the unverified one is marked, with the reason
    assert real.get_attribute("data-verified") == "yes"
    assert not real.find_elements("css selector", ".badge")
    assert forged.get_attribute("data-verified") == "no"
    assert "unverified" in forged.get_attribute("class").split()
    badge = forged.find_element("css selector", ".badge.unverified")
    assert badge.text == "UNVERIFIED" and badge.is_displayed()
    assert "certificate not issued by a trusted CA" in forged.text
    assert "otherapp worker worker" in forged.text
    screenshot(driver, tmp_path / "alerts.png")
    no_page_errors(driver)


def test_without_the_event_stream_the_page_polls(browser: Any, keys: Keys,
                                                 site: Site) -> None:
    driver = browser
    driver.get(site.crat.url + "?poll")
    wait_until(driver, "polling", lambda d: d.find_element(
        "id", "conn").get_attribute("data-mode") == "polling")
    driver.execute_script("window.rexnetNotReloaded = 7;")
    worker = load_credential(keys.worker, "worker")
    marker = f"polled-{time.monotonic_ns()}"
    site.crat.send(signed(worker, "complaint", now_ms(), what=marker))
    wait_until(driver, "the complaint, polled", lambda d: any(
        marker in r.text for r in css(d, '#alerts tr[data-event="complaint"]')))
    assert driver.execute_script("return window.rexnetNotReloaded;") == 7
    no_page_errors(driver)

