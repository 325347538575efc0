"""The check of a warm channel's worker before each job on it, with what it parsed kept.

Before every job on a warm channel the client checks its worker's certificate again: in
its validity window now, and not in the revocation list in force now (P10). Reading a
certificate's dates and serial number parses it each time, so TrustCache keeps, per
certificate, its window in POSIX seconds and the revocation list (the generation a
RevokedFile returns, a new object whenever the file is re-read) under which it was last
found not revoked: a warm job then costs a clock read, two comparisons and an identity
test, and a list re-read or a window's end is still seen at the next job. Both are kept
by the certificate object's identity (a channel keeps its peer's for its life): hashing a
certificate hashes its DER, a few microseconds at each look-up.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable
from typing import Any

from cryptography import x509

from rexnet.security.credentials import check_validity
from rexnet.security.tls import Revocations

MAX_CERTS = 4096  # certificates remembered (the cache starts over past this)


class TrustCache:
    """Validity windows and revocation verdicts of certificates, by certificate."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        # by id(cert), with the certificate itself (an id is only its own while it lives)
        self._windows: dict[int, tuple[x509.Certificate, float, float]] = {}
        self._clean: dict[int, tuple[x509.Certificate, object]] = {}  # the list it is not in

    def problem(self, cert: x509.Certificate, revoked: Revocations | None) -> str | None:
        """Why CERT's worker may not be given a job now (in the words of a complaint), or
        None."""
        key = id(cert)
        window = self._windows.get(key)
        if window is None or window[0] is not cert:
            if len(self._windows) >= MAX_CERTS:
                self._windows.clear()
            window = (cert, cert.not_valid_before_utc.timestamp(),
                      cert.not_valid_after_utc.timestamp())
            self._windows[key] = window
        now = self.clock()
        if not window[1] <= now <= window[2]:
            problem = check_validity(cert, datetime.datetime.fromtimestamp(now, datetime.UTC))
            if problem:
                return f"its certificate {problem}"
        if revoked is None:
            return None
        current: Any = getattr(revoked, "revoked", None)
        generation = current() if callable(current) else None
        clean = self._clean.get(key)
        if (generation is not None and clean is not None and clean[0] is cert
                and clean[1] is generation):
            return None
        reason = (generation if generation is not None else revoked).reason(cert)
        if reason:
            return f"worker {reason}"
        if generation is not None:
            if len(self._clean) >= MAX_CERTS:
                self._clean.clear()
            self._clean[key] = (cert, generation)
        return None


TRUST = TrustCache()
"""The process's cache (the agent's and an Executor's warm jobs share it)."""


def distrust(link: object, revoked: Revocations | None) -> str | None:
    """Why the worker of LINK (a warm channel) is no longer to be trusted with a job, or
    None: its certificate is checked again (expiry, the revocation list as it is now)."""
    cert = getattr(link, "peer_cert", None)
    if cert is None:
        return "its certificate is unknown"
    return TRUST.problem(cert, revoked)
