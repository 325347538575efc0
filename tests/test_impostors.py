"""Impostors against real workers and clients on loopback (issue P6, point 2).

Each refusal is shown end to end: the worker (or client) logs a complaint, the job never
starts and no job data moves.  For announcements, "never starts" means the worker never
connects back: a control case shows that a good announcement does make it connect.
Cases already shown elsewhere (plaintext and garbage at the connect-back port, a client
credential used as a worker, another application's worker: test_exec.py; a worker
credential used as a client: test_exec.py and test_announce.py; a replayed
announcement: test_exec.py) are not repeated here.
"""

from __future__ import annotations

import datetime
import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cluster import Proc, loopback_address, start_worker
from conftest import Keys
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from test_exec import run_against_impostor

from rexnet.net.announce import now_ms
from rexnet.protocol import exitcodes, wire
from rexnet.security.credentials import (
    app_id_of,
    credential_file_bytes,
    issue,
    keygen,
    load_ca,
    load_credential,
    make_ca,
    write_private,
)
from rexnet.security.revocation import RECHECK, serial_hex

NO_CONNECT_WAIT = 1.5  # an idle worker connects back within milliseconds of a good one


def forged_credential(path: Path, ca: tuple[Ed25519PrivateKey, x509.Certificate], role: str,
                      name: str = "mallory", age_days: float = 0.0, days: int = 1) -> Path:
    """A credential file issued by CA, AGE_DAYS in the past, valid for DAYS."""
    ca_key, ca_cert = ca
    now = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=age_days)
    key, cert = issue(ca_key, ca_cert, role, name, days, now=now)  # type: ignore[arg-type]
    write_private(path, credential_file_bytes(key, cert, ca_cert), overwrite=True)
    return path


def lookalike_ca(app: str) -> tuple[Ed25519PrivateKey, x509.Certificate]:
    """A self-made CA with exactly the names of the real one."""
    return make_ca(app)


def our_ca(keys: Keys) -> tuple[Ed25519PrivateKey, x509.Certificate]:
    ca = load_ca(keys.ca)
    return ca.key, ca.cert


class ConnectBackTrap:
    """A TCP port an announcement points to: records whether a worker connected."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.port = self.sock.getsockname()[1]

    def connected(self, wait: float) -> bool:
        self.sock.settimeout(wait)
        try:
            conn, _ = self.sock.accept()
        except TimeoutError:
            return False
        conn.close()
        return True

    def close(self) -> None:
        self.sock.close()


def announcement(app_id: bytes, key: Ed25519PrivateKey, cert_der: bytes, port: int) -> bytes:
    """A fresh announcement from 127.0.0.1 asking for a connect-back to PORT."""
    ann = wire.Announce(os.urandom(16), 0, now_ms(), port, ("127.0.0.1",))
    return wire.encode_datagram(ann, app_id, key, cert_der)


def send_to_worker(data: bytes, worker_addr: str) -> None:
    host, port = worker_addr.split(":")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        s.sendto(data, (host, int(port)))


@dataclass
class Guard:
    """A worker on loopback with an (initially empty) revocation list."""

    proc: Proc
    addr: str
    revoked: Path


@pytest.fixture
def worker(keys: Keys, tmp_path: Path) -> Iterator[Guard]:
    revoked = tmp_path / "testapp.revoked"
    revoked.write_text("")
    addr = f"{loopback_address()}:3010"
    proc = start_worker(keys.worker, ["cat"], addr, "guard", "--revoked", str(revoked))
    yield Guard(proc, addr, revoked)
    proc.stop()


def _cert_der(path: Path) -> tuple[Ed25519PrivateKey, bytes, bytes]:
    """(key, certificate DER, app id) of a credential file, even an expired one."""
    data = path.read_bytes()
    key = serialization.load_pem_private_key(data, None)
    certs = x509.load_pem_x509_certificates(data)
    assert isinstance(key, Ed25519PrivateKey)
    return key, certs[0].public_bytes(serialization.Encoding.DER), app_id_of(certs[1])


Forger = Callable[[Keys, Path, int, Guard], tuple[bytes, str]]


def _other_app(keys: Keys, tmp: Path, port: int, w: Guard) -> tuple[bytes, str]:
    other = tmp / "other"
    keygen("otherapp", other)
    key, der, _ = _cert_der(other / "otherapp.client")
    ours = load_credential(keys.client, "client").app_id  # the header is public knowledge
    return announcement(ours, key, der, port), "not issued by the application CA"


def _lookalike(keys: Keys, tmp: Path, port: int, w: Guard) -> tuple[bytes, str]:
    path = forged_credential(tmp / "fake.client", lookalike_ca(keys.app), "client", "client")
    key, der, _ = _cert_der(path)
    ours = load_credential(keys.client, "client").app_id
    return announcement(ours, key, der, port), "not issued by the application CA"


def _expired(keys: Keys, tmp: Path, port: int, w: Guard) -> tuple[bytes, str]:
    path = forged_credential(tmp / "old.client", our_ca(keys), "client", "old", age_days=10)
    key, der, app_id = _cert_der(path)
    return announcement(app_id, key, der, port), r"client certificate expired on \d{4}-"


def _not_yet_valid(keys: Keys, tmp: Path, port: int, w: Guard) -> tuple[bytes, str]:
    path = forged_credential(tmp / "new.client", our_ca(keys), "client", "new", age_days=-3)
    key, der, app_id = _cert_der(path)
    return announcement(app_id, key, der, port), "client certificate not valid before"


def _revoked(keys: Keys, tmp: Path, port: int, w: Guard) -> tuple[bytes, str]:
    path = forged_credential(tmp / "eve.client", our_ca(keys), "client", "eve")
    serial = serial_hex(x509.load_pem_x509_certificates(path.read_bytes())[0])
    w.revoked.write_text(f"{serial} client eve\n")
    time.sleep(RECHECK + 0.1)  # the worker looks at the file at most every RECHECK s
    key, der, app_id = _cert_der(path)
    return (announcement(app_id, key, der, port),
            r"client certificate 'eve' \(serial \w+\) is revoked")


def _forged_signature(keys: Keys, tmp: Path, port: int, w: Guard) -> tuple[bytes, str]:
    real = load_credential(keys.client, "client")
    return (announcement(real.app_id, Ed25519PrivateKey.generate(), real.cert_der, port),
            "bad signature on announcement")


def _oversized(keys: Keys, tmp: Path, port: int, w: Guard) -> tuple[bytes, str]:
    real = load_credential(keys.client, "client")
    good = announcement(real.app_id, real.key, real.cert_der, port)
    return good + b"\0" * (60_000 - len(good)), "malformed datagram"


@pytest.mark.parametrize("forge", [_other_app, _lookalike, _expired, _not_yet_valid, _revoked,
                                   _forged_signature, _oversized],
                         ids=lambda f: f.__name__.strip("_"))
def test_bad_announcement_is_refused_and_never_answered(keys: Keys, worker: Guard,
                                                        tmp_path: Path, forge: Forger) -> None:
    trap = ConnectBackTrap()
    try:
        data, complaint = forge(keys, tmp_path, trap.port, worker)
        send_to_worker(data, worker.addr)
        worker.proc.wait_for(r"complaint: announcement refused: .*" + complaint)
        assert not trap.connected(NO_CONNECT_WAIT), "the worker answered an impostor"
        assert "started for" not in worker.proc.output
    finally:
        trap.close()


def test_a_good_announcement_is_answered(keys: Keys, worker: Guard) -> None:
    """The control for the test above: the trap does see a worker that answers."""
    trap = ConnectBackTrap()
    try:
        real = load_credential(keys.client, "client")
        send_to_worker(announcement(real.app_id, real.key, real.cert_der, trap.port),
                       worker.addr)
        assert trap.connected(5)
    finally:
        trap.close()


# -- impostors connecting back to a client ------------------------------------------------


@pytest.mark.parametrize("who", ["expired worker", "look-alike worker"])
def test_impostor_worker_is_refused(keys: Keys, tmp_path: Path, who: str) -> None:
    if who == "expired worker":
        cred = forged_credential(tmp_path / "w", our_ca(keys), "worker", "old", age_days=10)
        reason = b"TLS handshake failed: peer certificate expired on 20"
    else:
        cred = forged_credential(tmp_path / "w", lookalike_ca(keys.app), "worker", "worker")
        reason = b"TLS handshake failed: peer certificate not issued by the application CA"
    done, outcome = run_against_impostor(keys, cred, b"\0" * 64)
    assert done.returncode == exitcodes.AUTH_FAILED, done.stderr
    assert b"complaint: connection from 127." in done.stderr
    assert reason in done.stderr, done.stderr
    reply = outcome.get("reply", b"")
    assert isinstance(reply, bytes) and (reply == b"" or reply[0] == 0x15), outcome
