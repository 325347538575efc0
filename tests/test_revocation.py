"""Revocation (rexnet.security.revocation): the file format, re-reading, `rexnet keygen --revoke`,
and revoked workers and clients refused end to end (issue P6, point 2)."""

from __future__ import annotations

import datetime
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cluster import REXNET, exec_argv, loopback_address, run_exec, start_worker
from hypothesis import given
from hypothesis import strategies as st
from test_tls import connect

from rexnet.protocol import exitcodes
from rexnet.security.credentials import (
    CertInfo,
    Credential,
    app_id_of,
    issue,
    load_ca,
    load_credential,
)
from rexnet.security.revocation import (
    MAX_FILE_BYTES,
    RECHECK,
    RevocationError,
    Revoked,
    RevokedFile,
    parse,
    serial_hex,
)
from rexnet.security.tls import VERIFY_ERROR, check_peer, connecting_options, listening_options


def rexnet(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([REXNET, *map(str, args)], capture_output=True, text=True, timeout=30)


@pytest.fixture
def app(tmp_path: Path) -> Path:
    """A fresh application made with the CLI (so that APP.issued is kept); its directory."""
    done = rexnet("keygen", "revo", "--dir", tmp_path)
    assert done.returncode == 0, done.stderr
    return tmp_path


def cert_of(path: Path) -> object:
    from cryptography import x509

    return x509.load_pem_x509_certificates(path.read_bytes())[0]


# -- the file format ------------------------------------------------------------------


def test_parse_reads_serials_and_ignores_comments_and_the_rest_of_the_line() -> None:
    revoked = parse(b"# header\n\n  1A2b client alice 2026-01-01T00:00:00Z\nff\n")
    assert revoked.serials == frozenset({0x1A2B, 0xFF})


@pytest.mark.parametrize("data", [b"alice\n", b"12 ok\nzz\n", b"\xff\xfe\n",
                                  b"1" * 41 + b"\n", b"1 " + b"x" * 600 + b"\n"])
def test_parse_refuses_damaged_files_saying_where(data: bytes) -> None:
    with pytest.raises(RevocationError, match="revocation list"):
        parse(data)


def test_parse_refuses_a_file_over_its_bound() -> None:
    with pytest.raises(RevocationError, match="larger than"):
        parse(b"#" * (MAX_FILE_BYTES + 1))


@given(st.binary(max_size=2000))
def test_fuzz_parse_raises_only_revocation_error(data: bytes) -> None:
    try:
        revoked = parse(data)
    except RevocationError:
        return
    assert all(0 <= s < 1 << 160 for s in revoked.serials)


@given(st.lists(st.integers(0, (1 << 159) - 1), max_size=50))
def test_parse_reads_back_what_revoke_writes(serials: list[int]) -> None:
    text = "".join(f"{s:X} client n{i} 2026-01-01T00:00:00Z\n" for i, s in enumerate(serials))
    assert parse(text.encode()).serials == frozenset(serials)


# -- re-reading -----------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_file_is_re_read_when_it_changes_at_most_every_recheck(tmp_path: Path) -> None:
    path = tmp_path / "x.revoked"
    path.write_text("0A\n")
    clock = FakeClock()
    listed = RevokedFile(path, clock)
    assert listed.revoked().serials == {10}
    path.write_text("0A\n0B\n")
    assert listed.revoked().serials == {10}  # not looked at again yet
    clock.now += RECHECK
    assert listed.revoked().serials == {10, 11}


def test_a_damaged_or_vanished_file_keeps_the_last_list(tmp_path: Path) -> None:
    path = tmp_path / "x.revoked"
    path.write_text("0A\n")
    clock = FakeClock()
    listed = RevokedFile(path, clock)
    path.write_text("not a serial\n")
    clock.now += RECHECK
    assert listed.revoked().serials == {10}
    path.unlink()
    clock.now += RECHECK
    assert listed.revoked().serials == {10}
    path.write_text("0C\n")
    clock.now += RECHECK
    assert listed.revoked().serials == {12}


def test_a_missing_file_at_start_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(RevocationError, match="cannot read"):
        RevokedFile(tmp_path / "nope")


def test_a_default_list_missing_at_start_is_empty_and_read_when_it_appears(
        tmp_path: Path) -> None:
    path = tmp_path / "x.revoked"
    clock = FakeClock()
    listed = RevokedFile(path, clock, required=False)
    assert listed.revoked().serials == frozenset()
    clock.now += RECHECK
    assert listed.revoked().serials == frozenset()  # still missing: no complaint, empty
    path.write_text("0A\n")
    clock.now += RECHECK
    assert listed.revoked().serials == {10}


def test_open_list_watches_the_default_path_and_requires_an_explicit_one(
        tmp_path: Path) -> None:
    from rexnet.security.credentials import CredentialError
    from rexnet.security.revocation import open_list

    watched = open_list(None, tmp_path / "app.worker", "app")
    assert watched is not None and watched.path == tmp_path / "app.revoked"
    assert watched.revoked().serials == frozenset()
    with pytest.raises(CredentialError, match="cannot read"):
        open_list(str(tmp_path / "given.revoked"), tmp_path / "app.worker", "app")


# -- rexnet keygen --revoke -------------------------------------------------------------


def test_revoke_by_name_lists_that_names_certificates_only(app: Path) -> None:
    assert rexnet("keygen", "--issue", "client", "--name", "alice", app / "revo.ca"
                  ).returncode == 0
    done = rexnet("keygen", "--revoke", "alice", app / "revo.ca")
    assert done.returncode == 0, done.stderr
    revoked = parse((app / "revo.revoked").read_bytes())
    alice = cert_of(app / "revo.alice.client")
    assert revoked.reason(alice)  # type: ignore[arg-type]
    assert revoked.reason(cert_of(app / "revo.client")) is None  # type: ignore[arg-type]
    assert f"revoked {serial_hex(alice)} client alice" in done.stdout  # type: ignore[arg-type]


def test_a_name_re_issued_after_revocation_is_valid(app: Path) -> None:
    ca = app / "revo.ca"
    rexnet("keygen", "--issue", "client", "--name", "bob", ca)
    rexnet("keygen", "--revoke", "bob", ca)
    (app / "revo.bob.client").unlink()
    assert rexnet("keygen", "--issue", "client", "--name", "bob", ca).returncode == 0
    revoked = parse((app / "revo.revoked").read_bytes())
    assert revoked.reason(cert_of(app / "revo.bob.client")) is None  # type: ignore[arg-type]
    assert len(revoked.serials) == 1


def test_revoke_a_credential_file_and_twice_adds_nothing(app: Path) -> None:
    ca = app / "revo.ca"
    assert rexnet("keygen", "--revoke", app / "revo.worker", ca).returncode == 0
    again = rexnet("keygen", "--revoke", app / "revo.worker", ca)
    assert again.returncode == 0 and "0 added" in again.stdout
    assert parse((app / "revo.revoked").read_bytes()).serials == {
        cert_of(app / "revo.worker").serial_number}  # type: ignore[attr-defined]


def test_revoke_an_unknown_name_or_a_foreign_file_is_refused(app: Path, tmp_path: Path
                                                             ) -> None:
    done = rexnet("keygen", "--revoke", "nobody", app / "revo.ca")
    assert done.returncode == exitcodes.CREDENTIAL
    assert "no credential named 'nobody'" in done.stderr
    rexnet("keygen", "other", "--dir", tmp_path / "o")
    done = rexnet("keygen", "--revoke", tmp_path / "o" / "other.client", app / "revo.ca")
    assert done.returncode == exitcodes.CREDENTIAL and "was not issued by" in done.stderr
    assert not (app / "revo.revoked").exists()


# -- TLS: check_peer and a real handshake ------------------------------------------------


def test_tls_peer_whose_certificate_is_revoked_is_refused(app: Path) -> None:
    client = load_credential(app / "revo.client", "client")
    worker = load_credential(app / "revo.worker", "worker")
    server, _ = connect(listening_options(client), connecting_options(worker))
    assert server.handshake_done  # TLS itself is fine: the list is rexnet's check
    listed = Revoked(frozenset({worker.cert.serial_number}))
    cert, problem = check_peer(server.peer, client, listed)
    assert cert is None
    assert problem == (f"peer worker certificate 'worker' (serial {serial_hex(worker.cert)})"
                       " is revoked")
    assert check_peer(server.peer, client, Revoked()) == (worker.cert, None)


def test_tls_peer_with_an_expired_certificate_is_refused_with_the_reason(app: Path) -> None:
    ca = load_ca(app / "revo.ca")
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=30)
    key, cert = issue(ca.key, ca.cert, "worker", "old", 1, now=past)
    old = Credential(Path("old"), key, cert, ca.cert, CertInfo.of(cert), app_id_of(ca.cert))
    client = load_credential(app / "revo.client", "client")
    server, _ = connect(listening_options(client), connecting_options(old))
    assert not server.handshake_done and server.lost is not None
    assert getattr(server.transport, VERIFY_ERROR).startswith("peer certificate expired on ")


# -- end to end: a worker re-reads its list; a client refuses a revoked worker -----------


def test_worker_refuses_a_client_revoked_while_it_runs(app: Path) -> None:
    ca = app / "revo.ca"
    assert rexnet("keygen", "--issue", "client", "--name", "alice", ca).returncode == 0
    listed = app / "workers.revoked"
    listed.write_text("# nothing revoked yet\n")
    addr = f"{loopback_address()}:3010"
    worker = start_worker(app / "revo.worker", ["echo", "ran"], addr, "w", "--revoked",
                          str(listed))
    try:
        alice = app / "revo.alice.client"
        assert run_exec(alice, [addr]).stdout == b"ran\n"
        assert rexnet("keygen", "--revoke", "alice", ca).returncode == 0
        listed.write_bytes((app / "revo.revoked").read_bytes())  # the admin copies it over
        time.sleep(RECHECK + 0.2)
        # the agent still holds a warm channel to this worker: the next job is refused
        # over it, with the reason
        done = run_exec(alice, [addr], "--timeout", "2")
        assert done.returncode == exitcodes.REFUSED, done.stderr
        assert b"the client's client certificate 'alice'" in done.stderr
        assert b"is revoked" in done.stderr and done.stdout == b""
        # a new connection never comes: the worker drops the announcement
        done = run_exec(alice, [addr], "--timeout", "2", "--no-agent")
        assert done.returncode == exitcodes.NO_WORKER, done.stderr
        worker.wait_for(r"re-read: 1 revoked")
        worker.wait_for(r"complaint: announcement refused: client certificate 'alice' "
                        r"\(serial \w+\) is revoked")
        assert worker.output.count("started for alice") == 1
        assert run_exec(app / "revo.client", [addr]).stdout == b"ran\n"  # others still run
    finally:
        worker.stop()


def test_worker_reads_a_default_list_that_appears_after_it_started(app: Path) -> None:
    """Issue P10 item 5: no --revoked and no revo.revoked at start; the administrator
    then revokes alice beside the worker's credential: the worker reads it."""
    ca = app / "revo.ca"
    assert rexnet("keygen", "--issue", "client", "--name", "alice", ca).returncode == 0
    assert not (app / "revo.revoked").exists()
    addr = f"{loopback_address()}:3010"
    worker = start_worker(app / "revo.worker", ["echo", "ran"], addr, "w")
    try:
        worker.wait_for(r"revocation list \S*revo.revoked does not exist \(yet\): nothing "
                        "revoked; watching it")
        alice = app / "revo.alice.client"
        assert run_exec(alice, [addr], "--no-agent").stdout == b"ran\n"
        assert rexnet("keygen", "--revoke", "alice", ca).returncode == 0
        time.sleep(RECHECK + 0.2)
        done = run_exec(alice, [addr], "--timeout", "2", "--no-agent")
        assert done.returncode == exitcodes.NO_WORKER, done.stderr
        worker.wait_for(r"re-read: 1 revoked")
        worker.wait_for(r"complaint: announcement refused: client certificate 'alice' "
                        r"\(serial \w+\) is revoked")
        assert run_exec(app / "revo.client", [addr], "--no-agent").stdout == b"ran\n"
    finally:
        worker.stop()


def test_client_refuses_a_revoked_worker_and_the_job_never_starts(app: Path) -> None:
    assert rexnet("keygen", "--revoke", app / "revo.worker", app / "revo.ca").returncode == 0
    addr = f"{loopback_address()}:3010"
    worker = start_worker(app / "revo.worker", ["echo", "ran"], addr, "w")
    try:
        # the client finds revo.revoked beside its credential (as here) or takes --revoked
        done = subprocess.run(exec_argv(app / "revo.client", [addr], "--timeout", "2"),
                              capture_output=True, timeout=30)
        assert done.returncode == exitcodes.AUTH_FAILED, done.stderr
        assert b"refused: peer worker certificate 'worker' (serial" in done.stderr
        assert b"is revoked" in done.stderr and done.stdout == b""
        # the Python Executor and rexnet parallel take the same default
        script = ("import sys\n"
                  "from rexnet import Executor\n"
                  "from rexnet.client import AuthFailed\n"
                  f"with Executor({str(app / 'revo.client')!r}, announce=[{addr!r}],"
                  " timeout=2) as ex:\n"
                  "    error = ex.submit([]).exception()\n"
                  "print(type(error).__name__, error)\n")
        # (the worker, refused, may try again: the error names the last attempt's failure)
        api = subprocess.run([sys.executable, "-c", script], capture_output=True,
                             timeout=60, text=True)
        assert api.stdout.startswith("AuthFailed"), (api.stdout, api.stderr)
        assert "failed authentication" in api.stdout
        par = subprocess.run([REXNET, "parallel", "--announce", addr, "--timeout", "2",
                              str(app / "revo.client"), "--", ":::", "x"],
                             capture_output=True, timeout=60, text=True)
        assert par.returncode == 1, par.stderr
        assert "failed authentication" in par.stderr and par.stdout == ""
        assert "started for" not in worker.output
    finally:
        worker.stop()


def test_client_stops_reusing_a_warm_channel_to_a_worker_revoked_while_it_runs(
        app: Path) -> None:
    """The agent keeps a warm channel to the worker; the worker's credential is revoked
    (the list beside the client's credential changes): the next job does not go over the
    old channel but is announced, and the worker, now refused at the handshake, never
    gets it (issue P10, point 6)."""
    ca = app / "revo.ca"
    assert rexnet("keygen", "--issue", "worker", "--name", "w2", ca).returncode == 0
    (app / "revo.revoked").write_text("# nothing revoked yet\n")
    addr = f"{loopback_address()}:3010"
    worker = start_worker(app / "revo.w2.worker", ["echo", "ran"], addr, "w2")
    try:
        assert run_exec(app / "revo.client", [addr]).stdout == b"ran\n"
        done = run_exec(app / "revo.client", [addr], "-v")
        assert b"reused warm channel" in done.stderr and done.stdout == b"ran\n"
        assert rexnet("keygen", "--revoke", "w2", ca).returncode == 0
        time.sleep(RECHECK + 0.2)
        done = run_exec(app / "revo.client", [addr], "--timeout", "2", "-v")
        assert done.returncode == exitcodes.AUTH_FAILED, done.stderr
        assert b"reused warm channel" not in done.stderr and done.stdout == b""
        assert worker.output.count("started for") == 2
    finally:
        worker.stop()


def test_bad_revoked_option_is_a_one_line_error(app: Path) -> None:
    done = rexnet("exec", "--revoked", app / "missing", app / "revo.client")
    assert done.returncode == exitcodes.CREDENTIAL
    assert done.stderr.startswith("rexnet: revocation list: cannot read")


def test_rexnet_status_leaves_out_a_revoked_worker(app: Path) -> None:
    """A revoked worker's status replies are refused by the client (issue P10, point 14):
    the table and --json list only the workers still trusted."""
    ca = app / "revo.ca"
    assert rexnet("keygen", "--issue", "worker", "--name", "w2", ca).returncode == 0
    addr = loopback_address()
    good = start_worker(app / "revo.worker", ["true"], f"{addr}:3010", "good")
    other = loopback_address()
    bad = start_worker(app / "revo.w2.worker", ["true"], f"{other}:3010", "revoked")
    try:
        assert rexnet("keygen", "--revoke", "w2", ca).returncode == 0
        done = rexnet("status", "--json", "--announce", f"{addr}:3010", "--announce",
                      f"{other}:3010", app / "revo.client")
        assert done.returncode == 0, done.stderr
        import json

        assert [w["worker"] for w in json.loads(done.stdout)] == ["good"]
    finally:
        good.stop()
        bad.stop()
