"""The application CAs crat trusts: read from the --trust files, refusing a CA's key."""

from __future__ import annotations

from pathlib import Path

from cryptography import x509

from rexnet.crat.core import CratError
from rexnet.security.credentials import CertInfo, check_validity, issued_by, load_pem_certificates


def read_ca_certificate(path: Path) -> x509.Certificate:
    """The application CA certificate of a trust FILE; CratError saying what is wrong.

    FILE is a credential (APP.worker or APP.client: crat takes its last certificate, the
    CA's) or a PEM file holding the CA certificate alone.  An APP.ca file is refused: it
    holds the CA's private key, which must stay with the administrator.
    """
    if path.name.endswith(".ca"):
        raise CratError(
            f"{path} holds the application CA's private key, which must stay with the "
            "administrator: trust APP.worker, APP.client or the CA certificate alone "
            f"(openssl x509 -in {path} -out {path.name}.pem)")
    try:
        size = path.stat().st_size
        if size > 64 * 1024:
            raise CratError(f"{path} is too large to be a rexnet credential or certificate")
        data = path.read_bytes()
    except OSError as e:
        raise CratError(f"cannot read {path}: {e.strerror}") from None
    try:
        certs = load_pem_certificates(data)
    except ValueError:
        raise CratError(f"{path} holds no PEM certificate (give APP.worker, APP.client or "
                        "the application's CA certificate)") from None
    ca = certs[-1]
    has_key = b"PRIVATE KEY-----" in data
    try:
        info = CertInfo.of(ca)
    except ValueError:
        info = CertInfo("", "", "")
    if info.role != "ca" or not issued_by(ca, ca):
        raise CratError(f"{path} does not end with an application CA certificate "
                        "(give APP.worker, APP.client or the CA certificate)")
    if has_key and len(certs) == 1:
        raise CratError(
            f"{path} holds the application CA's private key, which must stay with the "
            "administrator: trust APP.worker, APP.client or the CA certificate alone")
    problem = check_validity(ca)
    if problem:
        raise CratError(f"{path}: the CA certificate of {info.app} {problem}")
    return ca
