"""Application credentials: making them, loading them safely, and TLS options from them.

An application has a CA (``APP.ca``: the CA's private key and certificate; its
certificate alone is also in ``APP.ca.pem``, for crat and cproxy) that issues credentials
of two roles, ``worker`` and ``client``, and on demand of a third, ``relay`` (a cproxy:
it may sign relay trailers and accept worker registrations, never run or take a job).
A credential file holds the holder's private key, its certificate and the CA
certificate, PEM encoded, mode 0600.

A certificate names its role and application in two places: the subject
(``O=APP, OU=ROLE, CN=NAME``) and a DNS subject-alternative name
``ROLE.APP.rexnet`` that peers check with service-identity after the TLS handshake.
All keys are Ed25519.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

Role = Literal["worker", "client", "relay"]
ROLES: tuple[Role, ...] = ("worker", "client")  # what rexnet keygen APP makes
ISSUABLE: tuple[Role, ...] = ("worker", "client", "relay")
CA_SUFFIX = ".ca"
PEM_SUFFIX = ".ca.pem"  # the CA certificate alone (public)
DEFAULT_DAYS = 3650
MAX_CREDENTIAL_BYTES = 64 * 1024

# At most 61 characters, so that the CA's common name "APP CA" fits X.509's 64.
APP_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,59}[a-z0-9])?$")
HOLDER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")


class CredentialError(Exception):
    """A credential cannot be made, read or used; the message says why and what to do."""


def identity(role: str, app: str) -> str:
    """The DNS-ID a certificate of ROLE in APP carries, checked by peers."""
    return f"{role}.{app}.rexnet"


def check_app_name(app: str) -> str:
    if not APP_NAME.fullmatch(app):
        raise CredentialError(
            f"bad application name {app!r}: use lowercase letters, digits and hyphens "
            "(at most 61), starting and ending with a letter or digit"
        )
    return app


def check_holder_name(name: str) -> str:
    if not HOLDER_NAME.fullmatch(name):
        raise CredentialError(
            f"bad credential name {name!r}: use letters, digits and . _ @ - (at most 64)"
        )
    return name


def app_id_of(ca_cert: x509.Certificate) -> bytes:
    """The 16-byte application id carried in datagrams: a digest of the CA certificate."""
    return hashlib.sha256(ca_cert.public_bytes(serialization.Encoding.DER)).digest()[:16]


def _attr(name: x509.Name, oid: x509.ObjectIdentifier) -> str:
    values = name.get_attributes_for_oid(oid)
    return str(values[0].value) if values else ""


@dataclass(frozen=True)
class CertInfo:
    """What a certificate says about its holder."""

    app: str
    role: str
    name: str

    @classmethod
    def of(cls, cert: x509.Certificate) -> CertInfo:
        subject = cert.subject
        return cls(
            app=_attr(subject, NameOID.ORGANIZATION_NAME),
            role=_attr(subject, NameOID.ORGANIZATIONAL_UNIT_NAME),
            name=_attr(subject, NameOID.COMMON_NAME),
        )


def issued_by(cert: x509.Certificate, ca_cert: x509.Certificate) -> bool:
    """True when CA_CERT's key signed CERT (names and signature both match)."""
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def check_validity(cert: x509.Certificate, now: datetime.datetime | None = None) -> str | None:
    """None when CERT is valid at NOW, else a short reason."""
    now = now or datetime.datetime.now(datetime.UTC)
    if now < cert.not_valid_before_utc:
        return f"not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC"
    if now > cert.not_valid_after_utc:
        return f"expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
    return None


# -- making credentials -------------------------------------------------------------


def _name(app: str, role: str, holder: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, app),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
            x509.NameAttribute(NameOID.COMMON_NAME, holder),
        ]
    )


def make_ca(
    app: str, days: int = DEFAULT_DAYS
) -> tuple[Ed25519PrivateKey, x509.Certificate]:
    """A new application CA."""
    check_app_name(app)
    key = Ed25519PrivateKey.generate()
    now = datetime.datetime.now(datetime.UTC)
    name = _name(app, "ca", f"{app} CA")
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, None)
    )
    return key, cert


def is_admin(cert: x509.Certificate) -> bool:
    """Whether CERT is an admin credential of its application: a client certificate that
    also names ADMIN's identity (admin.APP.rexnet), which only the CA can sign."""
    info = CertInfo.of(cert)
    if info.role != "client":
        return False
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    return identity(ADMIN, info.app) in names.get_values_for_type(x509.DNSName)


ADMIN = "admin"


def issue(
    ca_key: Ed25519PrivateKey,
    ca_cert: x509.Certificate,
    role: Role,
    holder: str,
    days: int = DEFAULT_DAYS,
    now: datetime.datetime | None = None,
    admin: bool = False,
) -> tuple[Ed25519PrivateKey, x509.Certificate]:
    """A new credential of ROLE for HOLDER, signed by the application CA; ADMIN (a client
    only) adds the admin marker (see is_admin): it may cancel, attach to and read the
    detached jobs of every client."""
    if admin and role != "client":
        raise CredentialError("only a client credential can be an admin one")
    if role not in ISSUABLE:
        raise CredentialError(f"bad role {role!r}: use worker, client or relay")
    check_holder_name(holder)
    app = CertInfo.of(ca_cert).app
    key = Ed25519PrivateKey.generate()
    now = now or datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(app, role, holder))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(identity(role, app)), *(
                [x509.DNSName(identity(ADMIN, app))] if admin else [])]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, None)
    )
    return key, cert


def _pem_key(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def write_private(path: Path, data: bytes, overwrite: bool = False) -> None:
    """Write DATA to PATH, created with mode 0600 (never briefly wider)."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise CredentialError(
            f"{path} already exists; remove it first or choose another --dir/--name"
        ) from None
    except OSError as e:
        raise CredentialError(f"cannot write {path}: {e.strerror}") from None
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(data)


def write_public(path: Path, data: bytes, overwrite: bool = False) -> None:
    """Write public DATA (a certificate) to PATH with mode 0644."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o644)
    except FileExistsError:
        raise CredentialError(f"{path} already exists; remove it first") from None
    except OSError as e:
        raise CredentialError(f"cannot write {path}: {e.strerror}") from None
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o644)
        f.write(data)


def ca_file_bytes(key: Ed25519PrivateKey, cert: x509.Certificate) -> bytes:
    return _pem_key(key) + _pem_cert(cert)


def credential_file_bytes(
    key: Ed25519PrivateKey, cert: x509.Certificate, ca_cert: x509.Certificate
) -> bytes:
    return _pem_key(key) + _pem_cert(cert) + _pem_cert(ca_cert)


def keygen(app: str, directory: Path, days: int = DEFAULT_DAYS) -> list[Path]:
    """Make APP.ca, APP.worker and APP.client in DIRECTORY (and the public APP.ca.pem);
    return the paths of the first three."""
    check_app_name(app)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CredentialError(f"cannot create directory {directory}: {e.strerror}") from None
    paths = [directory / f"{app}{suffix}" for suffix in (CA_SUFFIX, ".worker", ".client")]
    pem = directory / f"{app}{PEM_SUFFIX}"
    for path in [*paths, pem]:
        if path.exists():
            raise CredentialError(f"{path} already exists; remove it first or use another --dir")
    ca_key, ca_cert = make_ca(app, days)
    write_private(paths[0], ca_file_bytes(ca_key, ca_cert))
    write_public(pem, _pem_cert(ca_cert))
    for path, role in zip(paths[1:], ROLES, strict=True):
        key, cert = issue(ca_key, ca_cert, role, role, days)
        write_private(path, credential_file_bytes(key, cert, ca_cert))
    return paths


# -- reading credentials ------------------------------------------------------------


def _read_private_file(path: Path) -> bytes:
    """Read a secret file, refusing one that is missing, odd, huge or not private."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise CredentialError(f"no such credential file: {path}") from None
    except OSError as e:
        raise CredentialError(f"cannot read {path}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise CredentialError(f"{path} is not a regular file")
    if st.st_mode & 0o077:
        raise CredentialError(
            f"{path} is readable by group or others (mode {stat.S_IMODE(st.st_mode):04o}); "
            f"run: chmod 600 {path}"
        )
    if st.st_size > MAX_CREDENTIAL_BYTES:
        raise CredentialError(f"{path} is too large to be a rexnet credential")
    try:
        return path.read_bytes()
    except OSError as e:
        raise CredentialError(f"cannot read {path}: {e.strerror}") from None


def load_pem_certificates(data: bytes) -> list[x509.Certificate]:
    """The PEM certificates in DATA, every field parsed; ValueError if any is damaged.

    cryptography parses fields lazily and raises several kinds of error (ValueError,
    InvalidVersion, UnsupportedAlgorithm, DuplicateExtension...): all become ValueError here.
    """
    try:
        certs = x509.load_pem_x509_certificates(data)
        for cert in certs:
            cert.subject, cert.issuer, cert.extensions, cert.public_key()
            cert.not_valid_before_utc, cert.not_valid_after_utc  # noqa: B018
    except Exception as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(reason[:160]) from None
    return certs


def _parse_pem(path: Path, data: bytes) -> tuple[Ed25519PrivateKey, list[x509.Certificate]]:
    try:
        key = serialization.load_pem_private_key(data, password=None)
        certs = load_pem_certificates(data)
    except Exception as e:  # damaged keys raise ValueError, UnsupportedAlgorithm, even
        # InternalError: whatever the damage, the file is not a credential
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CredentialError(f"{path} is not a rexnet credential (corrupt: {reason[:160]})"
                              ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise CredentialError(f"{path} is not a rexnet credential (not an Ed25519 key)")
    return key, certs


def _same_key(key: Ed25519PrivateKey, cert: x509.Certificate) -> bool:
    pub = cert.public_key()
    raw = serialization.Encoding.Raw, serialization.PublicFormat.Raw
    return isinstance(pub, Ed25519PublicKey) and pub.public_bytes(*raw) == key.public_key(
    ).public_bytes(*raw)


@dataclass(frozen=True)
class CA:
    """An application CA, as read from APP.ca."""

    path: Path
    key: Ed25519PrivateKey
    cert: x509.Certificate

    @property
    def app(self) -> str:
        return CertInfo.of(self.cert).app


def load_ca(path: Path) -> CA:
    data = _read_private_file(path)
    key, certs = _parse_pem(path, data)
    if len(certs) != 1 or CertInfo.of(certs[0]).role != "ca" or not _same_key(key, certs[0]):
        raise CredentialError(
            f"{path} is not an application CA file (make one with: rexnet keygen APP)"
        )
    return CA(path, key, certs[0])


@dataclass(frozen=True)
class Credential:
    """A worker's or client's credential: key, certificate and its application's CA."""

    path: Path
    key: Ed25519PrivateKey
    cert: x509.Certificate
    ca_cert: x509.Certificate
    info: CertInfo
    app_id: bytes = field(repr=False)

    @property
    def app(self) -> str:
        return self.info.app

    @property
    def role(self) -> str:
        return self.info.role

    @property
    def name(self) -> str:
        return self.info.name

    @functools.cached_property
    def cert_der(self) -> bytes:
        """The certificate in DER (made once: every signed datagram carries it)."""
        return self.cert.public_bytes(serialization.Encoding.DER)

    def peer_identity(self) -> str:
        """The DNS-ID the other side of a job (or, for a relay, of a registration) must
        present."""
        return identity("client" if self.role == "worker" else "worker", self.app)


def load_credential(path: Path, role: Role) -> Credential:
    """Read and check a credential of ROLE; raise CredentialError saying what is wrong."""
    data = _read_private_file(path)
    key, certs = _parse_pem(path, data)
    if len(certs) != 2:
        raise CredentialError(
            f"{path} is not a rexnet {role} credential (expected a key and two certificates)"
        )
    cert, ca_cert = certs
    info = CertInfo.of(cert)
    if info.role == "ca" or CertInfo.of(ca_cert).role != "ca":
        raise CredentialError(f"{path} is not a rexnet {role} credential")
    if info.role != role:
        raise CredentialError(
            f"{path} is a {info.role or 'unknown'} credential, but a {role} credential is "
            f"needed here (use the APP.{role} file)"
        )
    if not _same_key(key, cert):
        raise CredentialError(f"{path}: the private key does not match the certificate")
    if not issued_by(cert, ca_cert) or CertInfo.of(ca_cert).app != info.app:
        raise CredentialError(
            f"{path}: the certificate was not issued by the application CA in the same file"
        )
    problem = check_validity(cert)
    if problem:
        raise CredentialError(
            f"{path}: certificate {problem}; issue a new one with "
            f"rexnet keygen --issue {role} --name {info.name} {info.app}.ca"
        )
    return Credential(path, key, cert, ca_cert, info, app_id_of(ca_cert))


class CredentialCache:
    """Credentials of one role by path, each loaded again only if its file changed (its
    inode, times, size, mode and owner are the stamp: a file replaced, rewritten or made
    unsafe is read and checked anew). For processes that load one credential for many
    jobs (the agent; the Python API's run() called many times)."""

    KEPT = 16  # paths kept

    def __init__(self, role: Role) -> None:
        self.role: Role = role
        self._kept: dict[str, tuple[tuple[int, ...], Credential]] = {}

    def load(self, path: str | os.PathLike[str]) -> Credential:
        """The credential in PATH (CredentialError, in load_credential's words, if refused)."""
        name = os.fspath(path)
        try:
            info = os.stat(name)
        except OSError:
            return load_credential(Path(name), self.role)  # which says why, in its words
        stamp = (info.st_ino, info.st_dev, info.st_mtime_ns, info.st_ctime_ns, info.st_size,
                 info.st_mode, info.st_uid)
        kept = self._kept.get(name)
        if kept is not None and kept[0] == stamp:
            return kept[1]
        credential = load_credential(Path(name), self.role)
        if len(self._kept) >= self.KEPT:
            self._kept.clear()
        self._kept[name] = (stamp, credential)
        return credential
