"""The dashboard's parts: its pure state on a fake clock, and its static files.

The state (rexnet.crat.dashboard.state) is fed hand-made crat records: no datagram, no
signature, only what the state does with a record.  The static files (page, script,
style, icon) are package data: every one of them must be served, and the *installed*
package must hold them all, as a real `twistd crat --web` from the venv shows.
"""

from __future__ import annotations

import http.client
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cluster import BIN, TWISTD, Proc, loopback_address
from conftest import Keys
from twisted.logger import Logger

from rexnet.crat.core import Crat, CratError
from rexnet.crat.dashboard import state as state_module
from rexnet.crat.dashboard.state import DashboardState
from rexnet.crat.dashboard.web import CSP, STATIC, static_text

STATIC_DIR = Path(__file__).resolve().parent.parent / "rexnet/crat/dashboard/static"


class FakeClock:
    def __init__(self) -> None:
        self.seconds = 1_700_000_000.0

    def __call__(self) -> float:
        return self.seconds


def record(event: str, verified: bool = True, role: str = "worker", ts: int = 0,
           sender: str | None = None, serial: str = "5E41A1", **fields: Any) -> dict[str, Any]:
    """A record as crat makes it, for application "app": signed by a certificate named
    SENDER (by default the worker's name: each worker has a credential of its own)."""
    return {"received": "2023-11-14T22:13:20.000+00:00", "source": "192.0.2.7:40000",
            "verified": verified, "reason": None if verified else "bad signature",
            "app": "app", "role": role, "sender": sender or fields.get("worker", "w.example"),
            "serial": serial, "event": event, "ts": ts, "fields": fields}


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def st(clock: FakeClock) -> DashboardState:
    return DashboardState(Crat([], clock, [], Logger()), history=3, alerts=4)


# -- the state ----------------------------------------------------------------------------


def test_load_history_takes_the_fake_clocks_time_and_keeps_the_last_points(
        st: DashboardState, clock: FakeClock) -> None:
    for load in (0.1, 0.2, 0.3, 0.4, 0.5):
        clock.seconds += 5.0004
        st(record("worker-status", worker="w1", load=load, running=0))
    (worker,) = st.snapshot()["workers"]
    assert [p[1] for p in worker["history"]] == [0.3, 0.4, 0.5]  # history=3
    assert worker["history"][-1][0] == round(clock.seconds, 3) == worker["status_seen"]
    assert worker["load"] == 0.5 and worker["slots"] is None  # figures not sent: None
    assert st.snapshot()["alerts"] == []  # verified status reports are not alerts


def test_a_status_without_a_load_adds_no_point(st: DashboardState) -> None:
    updates: list[dict[str, Any]] = []
    st.listeners.append(updates.append)
    st(record("worker-status", worker="w1", load="high", running=1))
    assert updates[0]["point"] is None and updates[0]["worker"]["load"] is None
    assert st.snapshot()["workers"][0]["history"] == []


def test_workers_and_jobs_are_bounded_oldest_heard_first_out(
        st: DashboardState, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(state_module, "MAX_WORKERS", 2)
    monkeypatch.setattr(state_module, "MAX_JOBS", 2)
    for name in ("w1", "w2", "w3"):
        st(record("worker-status", worker=name, load=0.0))
    st(record("worker-status", worker="w2", load=0.0))  # heard again: the newest
    st(record("worker-status", worker="w4", load=0.0))
    assert [w["name"] for w in st.snapshot()["workers"]] == ["w2", "w4"]
    for job in ("j1", "j2", "j3"):
        st(record("job-started", job=job, worker="w2"))
    assert [j["job"] for j in st.snapshot()["running"]] == ["j2", "j3"]


def test_a_job_is_listed_from_its_start_to_its_finish(st: DashboardState,
                                                      clock: FakeClock) -> None:
    st(record("job-started", job="j1", worker="w1", command="make", client="alice"))
    (job,) = st.snapshot()["running"]
    assert (job["key"], job["command"], job["started"]) == ("app/j1", "make", clock.seconds)
    st(record("job-finished", role="client", sender="alice", job="j1", status=0))
    assert len(st.snapshot()["running"]) == 1  # the client's word ends nothing
    st(record("job-finished", job="j1", worker="w1", status=0))
    assert st.snapshot()["running"] == []
    assert [a["event"] for a in st.snapshot()["alerts"]] == [
        "job-finished", "job-finished", "job-started"]


def test_a_clients_job_started_lists_no_job(st: DashboardState) -> None:
    st(record("job-started", role="client", job="j1", worker="w1"))
    assert st.snapshot()["running"] == [] and st.snapshot()["workers"] == []


def test_an_unverified_record_is_an_alert_only(st: DashboardState) -> None:
    st(record("worker-status", verified=False, worker="w1", load=9.0))
    st(record("job-started", verified=False, job="j1", worker="w1"))
    snap = st.snapshot()
    assert snap["workers"] == [] and snap["running"] == [] and snap["alerts"] == []
    assert [a["verified"] for a in snap["unverified"]] == [False, False]
    assert snap["unverified"][0]["reason"] == "bad signature"


def test_alerts_are_bounded_newest_first(st: DashboardState) -> None:
    for n in range(6):
        st(record("complaint", what=f"c{n}"))
    assert [a["fields"]["what"] for a in st.snapshot()["alerts"]] == ["c5", "c4", "c3", "c2"]


def test_rows_belong_to_the_certificate_that_signs(st: DashboardState) -> None:
    st(record("worker-status", worker="w3", load=0.5))
    st(record("worker-status", sender="w4", worker="w3", load=99.0))  # w4 says it is w3
    st(record("worker-status", sender="worker", worker="alpha", load=1.0))  # shared cred
    st(record("worker-status", sender="w4", load=2.0))  # no name: no row
    workers = {w["name"]: w for w in st.snapshot()["workers"]}
    assert set(workers) == {"w3", "w4/w3", "worker/alpha"}
    assert (workers["w3"]["load"], workers["w3"]["sender"]) == (0.5, "w3")
    assert (workers["w4/w3"]["load"], workers["w4/w3"]["claimed"]) == (99.0, "w3")
    assert workers["worker/alpha"]["key"] == "app/worker/alpha"


def test_only_the_certificate_that_reported_the_start_ends_a_job(st: DashboardState) -> None:
    st(record("job-started", job="j1", worker="w3", client="alice", serial="A1"))
    st(record("job-started", job="j1", worker="w4", serial="B2"))  # a takeover: refused
    st(record("job-finished", job="j1", worker="w3", serial="C3"))  # same name, other cert
    st(record("job-finished", job="j1", sender="w4", worker="w3", serial="B2"))
    st(record("job-finished", job="j1", role="client", sender="alice"))  # its client
    st(record("worker-status", sender="w4", worker="w3", running=0, ts=99))  # not w3's row
    (job,) = st.snapshot()["running"]
    assert (job["worker"], job["sender"], job["serial"]) == ("w3", "w3", "A1")
    st(record("job-finished", job="j1", worker="w3", serial="A1"))
    assert st.snapshot()["running"] == []


def test_unverified_alerts_never_push_verified_ones_out(st: DashboardState) -> None:
    st(record("complaint", what="real"))
    for n in range(10):
        st(record("complaint", verified=False, what=f"junk {n}"))
    snap = st.snapshot()
    assert [a["fields"]["what"] for a in snap["alerts"]] == ["real"]
    assert [a["fields"]["what"] for a in snap["unverified"]] == [
        "junk 9", "junk 8", "junk 7", "junk 6"]  # alerts=4, each list


def test_a_failing_listener_is_counted_and_the_others_still_hear(st: DashboardState) -> None:
    heard: list[dict[str, Any]] = []

    def broken(update: dict[str, Any]) -> None:
        raise RuntimeError("listener bug")

    st.listeners[:] = [broken, heard.append]
    st(record("complaint", what="x"))
    assert st.errors == 1 and len(heard) == 1 and heard[0]["alert"]["fields"] == {"what": "x"}


def test_a_record_the_state_cannot_take_is_counted_not_raised(st: DashboardState) -> None:
    st({"verified": True, "role": "worker", "event": "worker-status", "fields": ["not", 1]})
    assert st.errors == 1 and st.snapshot()["workers"] == []


# -- the static files ---------------------------------------------------------------------


def test_every_static_file_is_served_and_every_served_file_exists() -> None:
    served = {name for name, _ in STATIC.values()}
    on_disk = {p.name for p in STATIC_DIR.iterdir() if p.is_file()}
    assert served == on_disk
    for name in on_disk:
        assert static_text(name) == (STATIC_DIR / name).read_text(encoding="utf-8")


def test_a_missing_static_file_is_a_one_line_error() -> None:
    with pytest.raises(CratError, match=r"^cannot read the dashboard's gone\.css from the "
                                        r"rexnet package \(.*\): reinstall rexnet$"):
        static_text("gone.css")


def test_the_script_parses_and_finds_its_elements_in_the_page() -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the script's syntax is not checked")
    subprocess.run([node, "--check", str(STATIC_DIR / "dashboard.js")], check=True,
                   timeout=60)
    page = (STATIC_DIR / "index.html").read_text(encoding="utf-8")
    ids = set(re.findall(r'\bid="([^"]+)"', page))
    wanted = set(re.findall(r'\$\("([^"]+)"\)', static_text("dashboard.js")))
    assert wanted and wanted <= ids, wanted - ids


def test_the_icon_is_well_formed_svg_and_the_style_balanced() -> None:
    icon = ET.fromstring((STATIC_DIR / "icon.svg").read_text(encoding="utf-8"))
    assert icon.tag == "{http://www.w3.org/2000/svg}svg"
    style = (STATIC_DIR / "dashboard.css").read_text(encoding="utf-8")
    depth = 0
    for char in style:
        depth += {"{": 1, "}": -1}.get(char, 0)
        assert 0 <= depth <= 2
    assert depth == 0


def test_the_installed_package_holds_every_static_file() -> None:
    # -I: the venv's own site-packages, not this source tree
    script = ("import importlib.resources as r, rexnet.crat.dashboard as d; print(d.__file__); "
              "print(*sorted(p.name for p in r.files(d).joinpath('static').iterdir()))")
    out = subprocess.run([str(BIN / "python"), "-I", "-c", script], check=True,
                         capture_output=True, text=True, timeout=60).stdout.splitlines()
    assert "site-packages" in out[0], out
    assert out[1].split() == sorted(p.name for p in STATIC_DIR.iterdir() if p.is_file())


@dataclass
class Web:
    proc: Proc
    address: tuple[str, int]

    def get(self, path: str) -> http.client.HTTPResponse:
        conn = http.client.HTTPConnection(*self.address, timeout=30)
        conn.request("GET", path)
        return conn.getresponse()


@pytest.fixture
def web(keys: Keys) -> Iterator[Web]:
    proc = Proc([TWISTD, "-n", "--pidfile=", "crat", "--listen", f"{loopback_address()}:0",
                 "--trust", str(keys.ca_pem), "--web", "0"])
    try:
        match = proc.wait_for(r"crat dashboard on http://([\d.]+):(\d+)/", 30)
        yield Web(proc, (match.group(1), int(match.group(2))))
    finally:
        proc.stop()
        if proc.process.stdout is not None:
            proc.process.stdout.close()


@pytest.mark.parametrize("path", sorted(p.decode() for p in STATIC))
def test_a_real_crat_serves_each_static_file_from_its_install(web: Web, path: str) -> None:
    name, content_type = STATIC[path.encode()]
    resp = web.get("/" + path)
    assert resp.status == 200
    assert resp.getheader("Content-Type") == content_type
    assert resp.getheader("Content-Security-Policy") == CSP
    assert resp.read() == (STATIC_DIR / name).read_bytes()


def test_finished_jobs_are_kept_newest_first_with_their_status(st: DashboardState) -> None:
    st(record("job-started", job="j1", worker="w1", client="alice", command="sleep 9",
              detached=1))
    st(record("job-started", job="j2", worker="w1", client="bob", command="true"))
    assert [j["detached"] for j in st.snapshot()["running"]] == [True, False]
    heard: list[dict[str, Any]] = []
    st.listeners.append(heard.append)
    st(record("job-finished", job="j1", worker="w1", status=143, duration=2.5))
    st(record("job-finished", job="j2", worker="w1", status=0, duration=0.1))
    finished = st.snapshot()["finished"]
    assert [(j["job"], j["status"], j["duration"], j["detached"]) for j in finished] == [
        ("j2", 0, 0.1, False), ("j1", 143, 2.5, True)]
    assert [[j["job"] for j in u["jobs_finished"]] for u in heard] == [["j1"], ["j2"]]
    assert st.snapshot()["running"] == []
    for n in range(150):  # bounded
        st(record("job-started", job=f"x{n}", worker="w1"))
        st(record("job-finished", job=f"x{n}", worker="w1", status=0))
    assert len(st.snapshot()["finished"]) == 100
