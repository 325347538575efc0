"""crat's dashboard and alert log against holders of real credentials (issue P10, 12 and 14).

Each attack is performed against a real `twistd crat --web` on loopback with real signed
alerts: a second worker credential (`rexnet keygen --issue worker --name w4`) that writes
another worker's name in its alerts, worker and client credentials that send job-started
and job-finished for a job they did not start, junk alerts from several sources, and a
credential revoked (`rexnet keygen --revoke`) while crat runs.  Each test then shows the
refusal (the dashboard's state over HTTP), the complaint in crat's log, and that the real
alerts - of a real worker and a real job where that is the behaviour - are still recorded.
"""

from __future__ import annotations

import datetime
import http.client
import json
import re
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pytest
from cluster import REXNET, TWISTD, Proc, loopback_address, run_exec, start_worker
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from twisted.logger import ILogObserver, Logger, formatEvent
from zope.interface import provider

from rexnet.crat import tap as crat_tap
from rexnet.crat.core import Crat
from rexnet.crat.dashboard.state import ALERTS
from rexnet.protocol import exitcodes, wire
from rexnet.security.credentials import Credential, load_credential
from rexnet.security.revocation import RevokedFile

APP = "integ"
Role = Literal["worker", "client"]
WAIT = 30.0  # seconds: a busy 2-core machine


def rexnet(*args: str | Path) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([REXNET, *map(str, args)], capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


@dataclass
class Creds:
    """An application's credentials, several issued with rexnet keygen --issue."""

    dir: Path
    ca: Path
    ca_pem: Path  # the CA certificate alone: what crat is given to trust
    revoked: Path

    def path(self, name: str, role: Role = "worker") -> Path:
        """APP.ROLE (the shared credential keygen makes) or APP.NAME.ROLE (issued)."""
        return self.dir / (f"{APP}.{role}" if name == role else f"{APP}.{name}.{role}")

    def load(self, name: str, role: Role = "worker") -> Credential:
        return load_credential(self.path(name, role), role)


@pytest.fixture(scope="module")
def creds(tmp_path_factory: pytest.TempPathFactory) -> Creds:
    d = tmp_path_factory.mktemp("integrity")
    rexnet("keygen", APP, "--dir", d)
    ca = d / f"{APP}.ca"
    for role, name in [("worker", "w3"), ("worker", "w4"), ("worker", "w5"),
                       ("client", "mallory")]:
        rexnet("keygen", "--issue", role, "--name", name, ca)
    ca_pem = d / f"{APP}.ca.pem"
    ca_pem.write_bytes(load_credential(d / f"{APP}.worker", "worker").ca_cert.public_bytes(
        serialization.Encoding.PEM))
    revoked = d / f"{APP}.revoked"
    revoked.write_text("# nothing revoked yet\n")
    return Creds(d, ca, ca_pem, revoked)


def signed(cred: Credential, event: str, key: Ed25519PrivateKey | None = None,
           **fields: str | int | float) -> bytes:
    """An ALERT datagram signed now by CRED's key (or by KEY: a forgery)."""
    alert = wire.Alert(int(time.time() * 1000), event, tuple(sorted(fields.items())))
    return wire.encode_datagram(alert, cred.app_id, key or cred.key, cred.cert_der)


@dataclass
class CratProc:
    proc: Proc
    udp: tuple[str, int]
    web: tuple[str, int]
    sent: int = 0

    @property
    def alerts_to(self) -> str:
        return f"{self.udp[0]}:{self.udp[1]}"

    def send(self, data: bytes, source: str = "127.0.0.1") -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((source, 0))
            s.sendto(data, self.udp)
        self.sent += 1

    def state(self) -> dict[str, Any]:
        conn = http.client.HTTPConnection(*self.web, timeout=WAIT)
        conn.request("GET", "/api/state")
        state: dict[str, Any] = json.loads(conn.getresponse().read())
        conn.close()
        return state

    def wait(self, what: str, check: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        deadline = time.monotonic() + WAIT
        while True:
            state = self.state()
            if check(state):
                return state
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: not seen in {WAIT} s; state {state}\n"
                                     f"crat said:\n{self.proc.output}")
            time.sleep(0.05)

    def settle(self) -> dict[str, Any]:
        """The state once crat has taken in every datagram sent to it so far."""
        return self.wait(f"{self.sent} datagrams received",
                         lambda s: s["counts"]["received"] >= self.sent)


def start_crat(creds: Creds, *options: str | Path) -> CratProc:
    udp = (loopback_address(), 3011)
    proc = Proc([TWISTD, "-n", "--pidfile=", "crat", "--listen", f"{udp[0]}:{udp[1]}",
                 "--trust", str(creds.ca_pem), "--web", "0", *map(str, options)])
    match = proc.wait_for(r"crat dashboard on http://([^:/]+):(\d+)/", WAIT)
    proc.wait_for(r"crat listening on", WAIT)
    return CratProc(proc, udp, (match.group(1), int(match.group(2))))


@pytest.fixture
def crat(creds: Creds) -> Iterator[CratProc]:
    proc = start_crat(creds, "--revoked", creds.revoked)
    yield proc
    proc.proc.stop()
    assert "Traceback" not in proc.proc.output


def rows(state: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {w["name"]: w for w in state["workers"]}


# -- 12: rows belong to the certificate that signed the alerts ------------------------------


def test_a_worker_credential_cannot_take_another_workers_row(creds: Creds,
                                                             crat: CratProc) -> None:
    worker_addr = f"{loopback_address()}:3010"
    worker = start_worker(creds.path("w3"), ["sh", "-c"], worker_addr, "w3", "--allow-args",
                          "--alerts", crat.alerts_to)
    try:
        state = crat.wait("the real worker w3's row", lambda s: "w3" in rows(s))
        real_load = rows(state)["w3"]["load"]
        assert isinstance(real_load, float) and real_load < 99
        # the attack: w4's credential reports "w3" with load 99 and starts a job as "w3"
        w4 = creds.load("w4")
        crat.send(signed(w4, "worker-status", worker="w3", load=99.0, running=0, slots=1))
        crat.send(signed(w4, "job-started", job="fake-job", worker="w3", client="client"))
        state = crat.settle()
        w3, fake = rows(state)["w3"], rows(state)["w4/w3"]
        assert (w3["sender"], w3["claimed"], w3["load"]) == ("w3", "w3", real_load)
        assert (fake["sender"], fake["claimed"], fake["load"]) == ("w4", "w3", 99.0)
        assert set(rows(state)) == {"w3", "w4/w3"}
        (job,) = state["running"]
        assert (job["job"], job["worker"], job["sender"]) == ("fake-job", "w4/w3", "w4")
        crat.proc.wait_for(r"worker certificate w4 of integ calls itself w3, the name of "
                           r"another certificate: its alerts are listed as w4/w3, never as "
                           r"w3's")
        # real alerts still make w3's row and w3's jobs
        done = run_exec(creds.path("client", "client"), [worker_addr], "--alerts",
                        crat.alerts_to, "--", "cat; exit 3", input=b"x")
        assert done.returncode == 3 and done.stdout == b"x", done.stderr
        state = crat.wait("the real job's alerts", lambda s: sum(
            a["event"] == "job-finished" for a in s["alerts"]) == 2)
        started = [a for a in state["alerts"] if a["event"] == "job-started"
                   and a["sender"] == "w3"]
        assert len(started) == 1
        assert [j["job"] for j in state["running"]] == ["fake-job"]  # the real one ended
        assert rows(state)["w3"]["load"] < 99 and rows(state)["w3"]["sender"] == "w3"
        assert all(a["verified"] for a in state["alerts"]) and state["unverified"] == []
    finally:
        worker.stop()
        if worker.process.stdout is not None:
            worker.process.stdout.close()


def test_only_the_certificate_that_started_a_job_ends_it(creds: Creds,
                                                         crat: CratProc) -> None:
    w3, w4 = creds.load("w3"), creds.load("w4")
    client, mallory = creds.load("client", "client"), creds.load("mallory", "client")
    crat.send(signed(w3, "job-started", job="j1", worker="w3", client="client",
                     command="sh -c work"))
    crat.settle()
    # the attacks: another worker restarts and finishes the job, another client finishes it
    crat.send(signed(w4, "job-started", job="j1", worker="w4", client="mallory"))
    crat.send(signed(w4, "job-finished", job="j1", worker="w3", status=0))
    crat.send(signed(mallory, "job-finished", job="j1", worker="w3", status=0))
    crat.send(signed(client, "job-finished", job="j1", worker="w3", status=0))  # its client
    state = crat.settle()
    (job,) = state["running"]
    assert (job["job"], job["worker"], job["sender"], job["client"]) == (
        "j1", "w3", "w3", "client")
    assert [(a["event"], a["sender"]) for a in state["alerts"]] == [  # all of them recorded
        ("job-finished", "client"), ("job-finished", "mallory"), ("job-finished", "w4"),
        ("job-started", "w4"), ("job-started", "w3")]
    out = crat.proc.output
    assert "dashboard: ignored job-started of job j1 from worker certificate w4" in out
    assert ("dashboard: ignored job-finished of job j1 from worker certificate w4: only the "
            "worker certificate that reported its start (w3, serial ") in out
    assert "ignored job-finished of job j1 from client certificate mallory" in out
    assert "from client certificate client" not in out  # the job's own client: no complaint
    # the job's worker ends it
    crat.send(signed(w3, "job-finished", job="j1", worker="w3", status=0))
    assert crat.settle()["running"] == []


# -- 12: junk never pushes verified alerts out ------------------------------------------------


def test_junk_alerts_cannot_push_verified_alerts_out(creds: Creds, crat: CratProc) -> None:
    w3 = creds.load("w3")
    for n in range(5):
        crat.send(signed(w3, "complaint", what=f"real {n}"))
    crat.settle()
    forger = Ed25519PrivateKey.generate()  # w3's certificate, someone else's key
    sources = [f"127.0.9.{n}" for n in range(2, 14)]
    for wave in range(4):  # each source 10 at once (its burst), a wave a second
        for n in range(10):
            for source in sources:
                crat.send(signed(w3, "complaint", key=forger, what=f"junk {wave} {n}"),
                          source)
        time.sleep(1.0)
    state = crat.settle()
    counts = state["counts"]
    assert counts["unverified"] == 480  # each counted; the rate limits dropped some
    assert counts["unverified"] - counts["dropped_unverified"] > ALERTS  # recorded: enough
    # to push every verified alert out of one shared list, as before
    assert [a["fields"]["what"] for a in state["alerts"]] == [f"real {n}" for n in
                                                              reversed(range(5))]
    assert len(state["unverified"]) == ALERTS  # bounded, kept apart
    assert all(a["reason"] == "bad signature" for a in state["unverified"])
    assert 'alert [UNVERIFIED: "bad signature"] integ worker w3: complaint' in (
        crat.proc.output)
    # a real alert after the flood still goes to the top of the verified list
    crat.send(signed(w3, "complaint", what="after"))
    assert crat.settle()["alerts"][0]["fields"]["what"] == "after"


# -- 14: a revoked signer's alerts are unverified --------------------------------------------


def test_a_certificate_revoked_while_crat_runs_is_unverified(creds: Creds,
                                                             crat: CratProc) -> None:
    crat.proc.wait_for(rf"revocation lists: {creds.revoked} \(0 revoked\)")
    w3, w5 = creds.load("w3"), creds.load("w5")
    crat.send(signed(w5, "worker-status", worker="w5", load=0.5, running=0, slots=2))
    crat.wait("w5's row", lambda s: "w5" in rows(s))
    rexnet("keygen", "--revoke", "w5", creds.ca)
    reason = f"worker certificate 'w5' (serial {w5.cert.serial_number:X}) is revoked"
    deadline = time.monotonic() + WAIT  # crat re-reads the list within 0.5 s of a change
    while not any(a["reason"] == reason for a in crat.settle()["unverified"]):
        assert time.monotonic() < deadline, crat.proc.output
        crat.send(signed(w5, "complaint", what="probe"))
        time.sleep(0.2)
    crat.send(signed(w5, "worker-status", worker="w5", load=77.0, running=0, slots=2))
    crat.send(signed(w5, "complaint", what="from a revoked worker"))
    crat.send(signed(w3, "complaint", what="still trusted"))
    state = crat.settle()
    assert rows(state)["w5"]["load"] == 0.5  # the revoked certificate changed nothing
    assert all(a["reason"] == reason for a in state["unverified"])
    assert state["unverified"][0]["fields"]["what"] == "from a revoked worker"
    assert state["alerts"][0]["fields"]["what"] == "still trusted"
    assert state["counts"]["reasons"]["revoked"] >= 2
    crat.proc.wait_for(rf"revocation list {creds.revoked} re-read: 1 revoked")
    crat.proc.wait_for(re.escape(f'alert [UNVERIFIED: "{reason}"] integ worker w5: '
                                 "complaint what=\"from a revoked worker\""))


def test_revocation_lists_one_per_trusted_ca_and_a_missing_one(creds: Creds,
                                                               tmp_path: Path) -> None:
    other = tmp_path / "other.revoked"
    other.write_text("")
    crat = start_crat(creds, "--revoked", creds.revoked, "--revoked", other)
    try:
        crat.proc.wait_for(rf"revocation lists: {creds.revoked} \(\d+ revoked\), "
                           rf"{other} \(0 revoked\)")
    finally:
        crat.proc.stop()
    done = subprocess.run([TWISTD, "-n", "--pidfile=", "crat", "--listen",
                           f"{loopback_address()}:0", "--trust", str(creds.ca_pem),
                           "--revoked", str(tmp_path / "missing.revoked")],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == exitcodes.CREDENTIAL
    assert done.stderr == (f"crat: revocation list: cannot read {tmp_path}/missing.revoked: "
                           "No such file or directory\n")


class FakeClock:
    def __init__(self) -> None:
        self.seconds = time.time()

    def __call__(self) -> float:
        return self.seconds


def test_the_core_consults_each_list_and_rereads_it(creds: Creds, tmp_path: Path) -> None:
    """Without processes: a Crat on a fake clock, a RevokedFile whose clock is the same."""
    lines: list[str] = []

    @provider(ILogObserver)
    def observe(event: dict[str, Any]) -> None:
        lines.append(formatEvent(event))

    empty, listed = tmp_path / "empty.revoked", tmp_path / "a.revoked"
    empty.write_text("# none\n")
    listed.write_text("")
    clock = FakeClock()
    w4 = creds.load("w4")
    crat = Crat([w4.ca_cert], clock, [], Logger(observer=observe),
                revoked=[RevokedFile(empty, clock), RevokedFile(listed, clock)])

    def send() -> dict[str, Any]:
        clock.seconds += 0.001
        crat.datagram(wire.encode_datagram(
            wire.Alert(int(clock.seconds * 1000), "complaint", (("what", "x"),)),
            w4.app_id, w4.key, w4.cert_der), "192.0.2.1", 1)
        records = list(crat.recent) + list(crat.recent_unverified)
        return max(records, key=lambda r: r["ts"])

    assert send()["verified"]
    listed.write_text(f"{w4.cert.serial_number:X} worker w4 "
                      f"{datetime.datetime.now(datetime.UTC):%Y-%m-%dT%H:%M:%SZ}\n")
    assert send()["verified"]  # checked at most every 0.5 s
    clock.seconds += 0.6
    record = send()
    assert not record["verified"] and record["reason"] == (
        f"worker certificate 'w4' (serial {w4.cert.serial_number:X}) is revoked")
    assert record["serial"] == f"{w4.cert.serial_number:X}"
    assert crat.counts.reasons["revoked"] == 1
    assert "[UNVERIFIED: \"worker certificate 'w4'" in lines[-1]
    assert len(crat.recent) == 2 and len(crat.recent_unverified) == 1


def test_the_tap_takes_revoked_files(creds: Creds) -> None:
    options = crat_tap.Options()
    options.parseOptions(["--trust", "t", "--revoked", "a", "--revoked", "b"])
    assert options["revoked"] == ["a", "b"]
    assert crat_tap.Options()["revoked"] == []
