"""twistd crat: options and the service tree of the alert receiver."""

from __future__ import annotations

import sys
from pathlib import Path

from cryptography import x509
from twisted.application.service import IService, MultiService
from twisted.python import usage

from rexnet.crat.core import Crat, CratError
from rexnet.crat.service import CratService, bind_udp
from rexnet.crat.sinks import open_jsonl
from rexnet.net.alerts import CRAT_PORT
from rexnet.net.announce import parse_target
from rexnet.net.groups import join, joined
from rexnet.net.pollguard import guard
from rexnet.net.tapoptions import VersionOption
from rexnet.protocol.exitcodes import CREDENTIAL, USAGE
from rexnet.security.credentials import CredentialError
from rexnet.security.revocation import RevocationError, RevokedFile
from rexnet.security.trust import read_trust_file


class Options(VersionOption):
    synopsis = ("[--listen HOST:PORT] [--join GROUP ...] --trust FILE [--trust FILE ...] "
                "[--revoked FILE ...] [--jsonl FILE] [--web PORT [--web-interface HOST]]")
    longdesc = (
        "Receive the signed alerts of rexnet workers and clients (jobs started and "
        "finished, complaints) and log them, each marked verified or UNVERIFIED by the "
        "application CAs given with --trust. FILE is APP.ca.pem, the CA certificate "
        "alone (rexnet keygen writes it; rexnet keygen --export-ca APP.ca writes it again); "
        "a file holding any private key (APP.ca, APP.worker, APP.client) is refused. "
        "With --revoked (an APP.revoked file of rexnet keygen --revoke; "
        "repeatable, e.g. one per trusted CA; re-read when it changes), the alerts of a "
        "revoked certificate are recorded as UNVERIFIED, saying so. With --jsonl, every "
        "alert is also appended to FILE as one JSON object a line. Floods of garbage and "
        "unverified alerts are rate-limited; drops are summarised in the log. With --web, "
        "a dashboard (workers and their load over time, running jobs, recent verified and "
        "unverified alerts apart, updated live) is served on that TCP port of 127.0.0.1 "
        "(or of --web-interface). A worker's row is named by the certificate that signs "
        "its alerts (NAME, or CERTIFICATE/NAME when the worker calls itself otherwise); a "
        "running job is ended only by the certificate that reported its start."
    )
    optParameters = [
        ["listen", "l", f"0.0.0.0:{CRAT_PORT}", "UDP HOST:PORT to receive alerts on."],
        ["jsonl", None, None, "Append every alert to FILE, one JSON object a line."],
        ["web", None, None, "Serve the dashboard on this TCP PORT (0: any free port)."],
        ["web-interface", None, "127.0.0.1", "Address to serve the dashboard on."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["trust"] = []
        self["revoked"] = []
        self["join"] = []

    def opt_join(self, group: str) -> None:
        """Join this multicast GROUP to hear alerts sent there (repeatable; default: $GROUP,
        when it is a multicast group, as workers and clients send their alerts there)."""
        self["join"].append(group)

    def opt_trust(self, path: str) -> None:
        """Believe alerts signed by credentials of this application: FILE is its CA
        certificate, APP.ca.pem (repeatable)."""
        self["trust"].append(path)

    def opt_revoked(self, path: str) -> None:
        """Alerts signed by a certificate listed in FILE (APP.revoked, made by rexnet keygen
        --revoke) are unverified; FILE is re-read when it changes (repeatable)."""
        self["revoked"].append(path)

    def postOptions(self) -> None:
        try:
            self["listen_addr"] = parse_target(self["listen"], CRAT_PORT, any_port=True)
        except ValueError as e:
            raise usage.UsageError(str(e)) from None
        if self["web"] is not None:
            try:
                self["web_port"] = int(self["web"])
            except ValueError:
                self["web_port"] = -1
            if not 0 <= self["web_port"] <= 65535:
                raise usage.UsageError(f"bad --web port {self['web']!r} (give 0 to 65535)")
        else:
            self["web_port"] = None
        try:
            self["join"] = joined(self["join"])
        except ValueError as e:
            raise usage.UsageError(f"--join: {e}") from None
        if not self["trust"]:
            raise usage.UsageError("give --trust at least once (APP.ca.pem, the "
                                   "CA certificate): without it no alert can be verified")


def fail(message: str, code: int) -> SystemExit:
    """A one-line error for the administrator, and an exit without a traceback."""
    print(f"crat: {message}", file=sys.stderr)
    return SystemExit(code)


def makeService(config: Options) -> IService:
    from twisted.internet import reactor

    guard(reactor)  # no stale poll event reaches a reused descriptor (rexnet.net.pollguard)

    cas: list[x509.Certificate] = []
    try:
        for path in config["trust"]:
            cas.append(read_trust_file(Path(path)))
    except (CratError, CredentialError) as e:
        raise fail(str(e), CREDENTIAL) from None
    revoked: list[RevokedFile] = []
    try:
        for path in config["revoked"]:
            revoked.append(RevokedFile(Path(path)))
    except RevocationError as e:
        raise fail(f"revocation list: {e}", CREDENTIAL) from None
    closing = []
    sinks = []
    try:
        if config["jsonl"] is not None:
            jsonl = open_jsonl(config["jsonl"])
            sinks.append(jsonl)
            closing.append(jsonl.close)
        sock = bind_udp(*config["listen_addr"])  # now: a busy port is a one-line error
    except CratError as e:
        raise fail(str(e), USAGE) from None
    for group in config["join"]:
        try:
            join(sock, group)
        except OSError as e:
            sock.close()
            raise fail(f"cannot join {group}: {e.strerror}", USAGE) from None
    crat = Crat(cas, reactor.seconds, sinks,  # type: ignore[attr-defined]
                revoked=revoked)
    top = MultiService()
    CratService(crat, sock, reactor, closing).setServiceParent(top)
    if config["web_port"] is not None:
        from rexnet.crat.dashboard.web import make_dashboard

        try:
            web = make_dashboard(crat, config["web-interface"], config["web_port"], reactor)
        except CratError as e:
            sock.close()
            for action in closing:
                action()
            raise fail(str(e), USAGE) from None
        web.setServiceParent(top)
    return top
