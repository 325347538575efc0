"""Trust files: the public certificate of an application CA, for crat and cproxy.

``rexnet keygen APP`` writes ``APP.ca.pem`` (mode 0644) beside ``APP.ca``, and
``rexnet keygen --export-ca APP.ca`` writes it again on demand.  It holds the CA
certificate alone: it can be copied anywhere and read by anyone.  A trust file that holds
a private key of any kind (``APP.ca``, ``APP.worker``, ``APP.client``) is refused, so that
a world-readable copy of a credential is never what a log receiver or relay is given.
"""

from __future__ import annotations

import stat
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from rexnet.security.credentials import (
    MAX_CREDENTIAL_BYTES,
    PEM_SUFFIX,
    CertInfo,
    CredentialError,
    check_validity,
    issued_by,
    load_pem_certificates,
    write_public,
)


def ca_pem_path(ca_path: Path, app: str) -> Path:
    """APP.ca.pem beside CA_PATH."""
    return ca_path.parent / f"{app}{PEM_SUFFIX}"


def ca_pem_bytes(ca_cert: x509.Certificate) -> bytes:
    return ca_cert.public_bytes(serialization.Encoding.PEM)


def write_ca_pem(path: Path, ca_cert: x509.Certificate, overwrite: bool = False) -> None:
    """Write the CA certificate alone to PATH (mode 0644: it is public)."""
    write_public(path, ca_pem_bytes(ca_cert), overwrite)


def read_trust_file(path: Path) -> x509.Certificate:
    """The application CA certificate in trust file PATH; CredentialError saying what is
    wrong (a private key in it, no CA certificate, damaged, expired, unreadable)."""
    hint = f"give APP{PEM_SUFFIX} (written by rexnet keygen, or: rexnet keygen --export-ca APP.ca)"
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):
            raise CredentialError(f"{path} is not a regular file")
        if st.st_size > MAX_CREDENTIAL_BYTES:
            raise CredentialError(f"{path} is too large to be a CA certificate")
        data = path.read_bytes()[:MAX_CREDENTIAL_BYTES]
    except OSError as e:
        raise CredentialError(f"cannot read {path}: {e.strerror}") from None
    if b"PRIVATE KEY-----" in data:
        raise CredentialError(
            f"{path} holds a private key: a trust file must hold the CA certificate alone, "
            f"never a credential (whoever reads it could act as its holder); {hint}")
    try:
        certs = load_pem_certificates(data)
    except ValueError:
        certs = []
    if len(certs) != 1:
        raise CredentialError(f"{path} does not hold exactly one PEM certificate; {hint}")
    ca = certs[0]
    try:
        info = CertInfo.of(ca)
    except ValueError:
        info = CertInfo("", "", "")
    if info.role != "ca" or not issued_by(ca, ca):
        raise CredentialError(f"{path} is not an application CA certificate; {hint}")
    problem = check_validity(ca)
    if problem:
        raise CredentialError(f"{path}: the CA certificate of {info.app} {problem}")
    return ca
