"""Revoked credentials: the APP.revoked file, the APP.issued ledger, and the check.

``rexnet keygen --issue`` (and ``rexnet keygen APP``) record every certificate they
issue in ``APP.issued`` (mode 0600) beside ``APP.ca``, one line each::

    SERIAL ROLE NAME NOT-AFTER

``rexnet keygen --revoke NAME APP.ca`` appends every certificate issued to NAME (or, if
NAME is a credential file, that file's certificate) to ``APP.revoked`` (mode 0644: it is
meant to be copied to every worker and client)::

    SERIAL ROLE NAME REVOKED-AT

Only the first field counts: a certificate is revoked when its serial number (hex, as
``openssl x509 -serial`` prints it) is listed.  Revoking by serial, not by name, lets an
administrator re-issue a credential under the same name.  Lines starting with ``#`` and
blank lines are ignored; anything else is an error (so a damaged file is noticed, not
silently read as "nothing revoked").

Workers (``--revoked FILE``) and clients (``rexnet exec --revoked FILE``) read the file
at start and again whenever it changes (size, mtime or inode), checked at most every
RECHECK seconds: a peer whose certificate is listed is refused in TLS and its signed
datagrams are dropped with a complaint.  If the file later disappears or becomes
unreadable, the last list read stays in force and the problem is logged.  Without
``--revoked``, ``APP.revoked`` beside the credential is watched the same way, whether or
not it exists yet (missing means nothing is revoked); the list in force is logged at start.
"""

from __future__ import annotations

import datetime
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from twisted.logger import Logger

from rexnet.security.credentials import CertInfo, CredentialError, issued_by

MAX_FILE_BYTES = 4 << 20  # 4 MiB: about 50,000 entries
MAX_LINE = 512
RECHECK = 0.5
REVOKED_SUFFIX = ".revoked"
ISSUED_SUFFIX = ".issued"

log = Logger()


class RevocationError(Exception):
    """A revocation file cannot be read or parsed; the message says where and why."""


def serial_hex(cert: x509.Certificate) -> str:
    return f"{cert.serial_number:X}"


@dataclass(frozen=True)
class Revoked:
    """The set of revoked serial numbers."""

    serials: frozenset[int] = frozenset()

    def reason(self, cert: x509.Certificate) -> str | None:
        """None if CERT is not revoked, else a short reason for a complaint."""
        if cert.serial_number in self.serials:
            info = CertInfo.of(cert)
            return (f"{info.role} certificate {info.name!r} (serial {serial_hex(cert)}) "
                    "is revoked")
        return None


def parse(data: bytes, origin: str = "revocation list") -> Revoked:
    """Parse the bytes of an APP.revoked (or APP.issued) file; RevocationError if bad."""
    if len(data) > MAX_FILE_BYTES:
        raise RevocationError(f"{origin} is larger than {MAX_FILE_BYTES} bytes")
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise RevocationError(f"{origin} is not an ASCII text file") from None
    serials: set[int] = set()
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if len(line) > MAX_LINE:
            raise RevocationError(f"{origin}, line {number}: line too long")
        field = line.split()[0]
        if len(field) > 40 or not all(c in "0123456789abcdefABCDEF" for c in field):
            raise RevocationError(f"{origin}, line {number}: {field[:40]!r} is not a "
                                  "certificate serial number in hex")
        serials.add(int(field, 16))
    return Revoked(frozenset(serials))


def read(path: Path) -> Revoked:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise RevocationError(f"cannot read {path}: {e.strerror}") from None
    return parse(data, str(path))


class RevokedFile:
    """An APP.revoked file, re-read when it changes (checked at most every RECHECK s)."""

    def __init__(self, path: Path, clock: Callable[[], float] = time.monotonic,
                 required: bool = True) -> None:
        """REQUIRED: the file must be readable now (RevocationError if not); otherwise a
        missing file is an empty list, read when it appears."""
        self.path = path
        self.clock = clock
        self._stamp = self._stat()
        if self._stamp is None and not required:
            self.current = Revoked()
            log.info("revocation list {path} does not exist (yet): nothing revoked; "
                     "watching it", path=str(path))
        else:
            self.current = read(path)  # raises RevocationError at start: fail loudly
            log.info("revocation list {path} in force: {n} revoked", path=str(path),
                     n=len(self.current.serials))
        self._checked = clock()

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_ino, st.st_size, st.st_mtime_ns

    def revoked(self) -> Revoked:
        """The list in force now (re-read if the file changed)."""
        now = self.clock()
        if now - self._checked < RECHECK:
            return self.current
        self._checked = now
        stamp = self._stat()
        if stamp == self._stamp:
            return self.current
        self._stamp = stamp
        if stamp is None:
            log.error("revocation list {path} is gone; keeping the {n} revocations read "
                      "before", path=str(self.path), n=len(self.current.serials))
            return self.current
        try:
            self.current = read(self.path)
        except RevocationError as e:
            log.error("{problem}; keeping the {n} revocations read before", problem=str(e),
                      n=len(self.current.serials))
        else:
            log.info("revocation list {path} re-read: {n} revoked", path=str(self.path),
                     n=len(self.current.serials))
        return self.current

    def reason(self, cert: x509.Certificate) -> str | None:
        return self.revoked().reason(cert)


def beside(ca_or_credential: Path, app: str, suffix: str = REVOKED_SUFFIX) -> Path:
    return ca_or_credential.parent / f"{app}{suffix}"


def default_file(keyfile: Path, app: str) -> Path | None:
    """APP.revoked beside KEYFILE, if there is one (used when no --revoked is given)."""
    path = beside(keyfile, app)
    return path if path.is_file() else None


def open_list(option: str | None, keyfile: Path, app: str) -> RevokedFile | None:
    """The revocation list a worker or client uses: --revoked FILE (which must exist), else
    APP.revoked beside its credential, watched even while it does not exist (missing means
    nothing revoked).  CredentialError if a file that exists cannot be read."""
    path = Path(option) if option else beside(keyfile, app)
    try:
        return RevokedFile(path, required=bool(option))
    except RevocationError as e:
        raise CredentialError(f"revocation list: {e}") from None


class AnyList:
    """Several revocation lists in force together (a relay trusting several CAs)."""

    def __init__(self, lists: Iterable[RevokedFile]) -> None:
        self.lists = list(lists)

    def reason(self, cert: x509.Certificate) -> str | None:
        for listed in self.lists:
            reason = listed.reason(cert)
            if reason:
                return reason
        return None


# -- the administrator's side: the ledger and revoking -------------------------------


def _append(path: Path, lines: Iterable[str], mode: int = 0o644) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, mode)
    with os.fdopen(fd, "a", encoding="ascii") as f:
        for line in lines:
            f.write(line + "\n")


def record_issued(ca_path: Path, app: str, certs: Iterable[x509.Certificate]) -> None:
    """Note CERTS in APP.issued beside the CA file (what --revoke NAME looks up)."""
    _append(beside(ca_path, app, ISSUED_SUFFIX), (
        f"{serial_hex(c)} {CertInfo.of(c).role} {CertInfo.of(c).name} "
        f"{c.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}" for c in certs), 0o600)


def issued_to(ca_path: Path, app: str, name: str) -> list[tuple[str, str, str]]:
    """(serial, role, name) of every certificate the ledger says was issued to NAME."""
    ledger = beside(ca_path, app, ISSUED_SUFFIX)
    try:
        text = ledger.read_text("ascii")
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as e:
        raise CredentialError(f"cannot read {ledger}: {e}") from None
    found = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 3 and not fields[0].startswith("#") and fields[2] == name:
            found.append((fields[0], fields[1], fields[2]))
    return found


def revoke(ca_path: Path, ca_cert: x509.Certificate, what: str) -> tuple[Path, list[str]]:
    """Add to APP.revoked the certificates WHAT names: a credential file, or a holder
    name looked up in APP.issued.  Returns the file and a line per certificate added."""
    app = CertInfo.of(ca_cert).app
    target = beside(ca_path, app)
    entries: list[tuple[str, str, str]]
    as_file = Path(what)
    if as_file.is_file():
        try:
            cert = x509.load_pem_x509_certificates(as_file.read_bytes()[:1 << 16])[0]
        except (OSError, ValueError, IndexError):
            raise CredentialError(f"{what} is not a rexnet credential file") from None
        if not issued_by(cert, ca_cert):
            raise CredentialError(f"{what} was not issued by {ca_path}")
        info = CertInfo.of(cert)
        entries = [(serial_hex(cert), info.role, info.name)]
    else:
        entries = issued_to(ca_path, app, what)
        if not entries:
            raise CredentialError(
                f"no credential named {what!r} in {beside(ca_path, app, ISSUED_SUFFIX)}; "
                "give the credential file to revoke instead")
    try:
        already = read(target).serials if target.exists() else frozenset()
    except RevocationError as e:
        raise CredentialError(str(e)) from None
    new = [e for e in entries if int(e[0], 16) not in already]
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    lines = [f"{serial} {role} {name} {stamp}" for serial, role, name in new]
    if not target.exists():
        lines.insert(0, f"# certificates of {app} revoked: SERIAL ROLE NAME REVOKED-AT "
                     "(only SERIAL counts)")
    try:
        _append(target, lines)
    except OSError as e:
        raise CredentialError(f"cannot write {target}: {e.strerror}") from None
    return target, [line for line in lines if not line.startswith("#")]
