"""Trust files (rexnet.security.trust) and the relay role: crat and cproxy are given the CA
certificate alone (APP.ca.pem), never a file holding a private key (issue P10, items 11
and 13)."""

from __future__ import annotations

import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import Keys
from cryptography.hazmat.primitives import serialization

from rexnet.protocol import exitcodes
from rexnet.security.credentials import (
    CredentialError,
    identity,
    load_ca,
    load_credential,
)
from rexnet.security.trust import read_trust_file

REXNET = Path(sys.executable).parent / "rexnet"
TWISTD = Path(sys.executable).parent / "twistd"


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in (REXNET, *args)], capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL)


def test_keygen_writes_a_public_ca_pem_that_is_trusted(keys: Keys) -> None:
    assert stat.S_IMODE(keys.ca_pem.stat().st_mode) == 0o644
    assert b"PRIVATE" not in keys.ca_pem.read_bytes()
    assert read_trust_file(keys.ca_pem) == load_ca(keys.ca).cert


@pytest.mark.parametrize("which", ["ca", "worker", "client"])
def test_a_trust_file_holding_a_private_key_is_refused(keys: Keys, tmp_path: Path,
                                                       which: str) -> None:
    source = getattr(keys, which)
    copy = tmp_path / "innocent.pem"  # whatever its name
    shutil.copy(source, copy)
    copy.chmod(0o644)
    with pytest.raises(CredentialError, match=r"holds a private key.*--export-ca"):
        read_trust_file(copy)


def test_other_bad_trust_files(keys: Keys, tmp_path: Path) -> None:
    junk = tmp_path / "junk"
    junk.write_text("hello\n")
    with pytest.raises(CredentialError, match="does not hold exactly one PEM certificate"):
        read_trust_file(junk)
    with pytest.raises(CredentialError, match=r"cannot read .*No such file"):
        read_trust_file(tmp_path / "missing")
    leaf = tmp_path / "leaf.pem"
    leaf.write_bytes(load_credential(keys.worker, "worker").cert.public_bytes(
        serialization.Encoding.PEM))
    with pytest.raises(CredentialError, match="not an application CA certificate"):
        read_trust_file(leaf)
    with pytest.raises(CredentialError, match="not a regular file"):
        read_trust_file(tmp_path)


def test_keygen_export_ca_writes_the_certificate_on_demand(keys: Keys, tmp_path: Path
                                                           ) -> None:
    out = tmp_path / "exported.pem"
    done = run("keygen", "--export-ca", keys.ca, "--out", out)
    assert done.returncode == 0, done.stderr
    assert f"wrote {out}" in done.stdout
    assert out.read_bytes() == keys.ca_pem.read_bytes()
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
    refused = run("keygen", "--export-ca", keys.worker)  # not a CA file
    assert refused.returncode == exitcodes.CREDENTIAL and "not an application CA" in \
        refused.stderr
    both = run("keygen", "--export-ca", "--issue", "relay", keys.ca)
    assert both.returncode == exitcodes.USAGE and "separate commands" in both.stderr


def test_crat_refuses_a_worker_credential_as_trust_file(keys: Keys, tmp_path: Path) -> None:
    """The README once suggested `crat --trust ogg.worker`: a world-readable copy of it gave
    away the worker's key. crat now refuses it, with the way out."""
    copy = tmp_path / "ogg.worker"
    shutil.copy(keys.worker, copy)
    copy.chmod(0o644)
    done = subprocess.run([str(TWISTD), "-n", "--pidfile=", "crat", "--listen",
                           "127.0.0.1:0", "--trust", str(copy)], capture_output=True,
                          text=True, timeout=60, cwd=tmp_path, stdin=subprocess.DEVNULL)
    assert done.returncode == exitcodes.CREDENTIAL, done.stdout + done.stderr
    assert done.stderr.startswith("crat: ") and "holds a private key" in done.stderr
    assert "rexnet keygen --export-ca APP.ca" in done.stderr


def test_a_relay_credential_is_issued_and_is_neither_worker_nor_client(
        keys: Keys, tmp_path: Path) -> None:
    out = tmp_path / "testapp.gw.relay"
    done = run("keygen", "--issue", "relay", "--name", "gw", "--out", out, keys.ca)
    assert done.returncode == 0, done.stderr
    relay = load_credential(out, "relay")
    assert relay.role == "relay" and relay.peer_identity() == identity("worker", "testapp")
    for role in ("worker", "client"):
        with pytest.raises(CredentialError, match="is a relay credential"):
            load_credential(out, role)  # type: ignore[arg-type]
