"""twistd rexnet-tunnel: options and the service tree."""

from __future__ import annotations

import sys
from pathlib import Path

from twisted.application.internet import ClientService, StreamServerEndpointService, backoffPolicy
from twisted.application.service import IService, MultiService
from twisted.internet.endpoints import SSL4ClientEndpoint, SSL4ServerEndpoint
from twisted.python import usage

from rexnet.net.announce import DEFAULT_PORT, parse_target
from rexnet.net.pollguard import guard
from rexnet.net.tapoptions import VersionOption
from rexnet.protocol.exitcodes import CREDENTIAL
from rexnet.relay.tunnel import Tunnel, TunnelGroups, link_factory
from rexnet.security.credentials import Credential, CredentialError, load_credential
from rexnet.security.revocation import open_list
from rexnet.security.tls import listening_options


class Options(VersionOption):
    synopsis = "(--listen HOST:PORT | --connect HOST:PORT ...) --credential FILE --group ADDR"
    longdesc = (
        "A multicast tunnel: joins this site's announce domain (--group, repeatable: a "
        "multicast group or a broadcast address, port 3010 unless given) with other sites' "
        "over mutually authenticated TLS links, carrying announcements, TAKEN messages, "
        "status queries and alerts both ways. Run one tunnel per site; it may --listen for "
        "links and --connect to several others (it reconnects when a link drops). Any "
        "topology works: each datagram reaches each site once. The sites must route "
        "unicast to each other (workers connect back to the client directly)."
    )
    optParameters = [
        ["listen", "l", None, "Accept tunnel links on TCP HOST:PORT."],
        ["credential", "c", None, "A credential of the application (a relay credential: "
         "rexnet keygen --issue relay; or APP.worker, APP.client); peers must hold one of "
         "the same application."],
        ["revoked", None, None, "Refuse links and datagrams of credentials listed in FILE "
         "(re-read when it changes; default: APP.revoked beside the credential)."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["connect"] = []
        self["group"] = []

    def opt_connect(self, target: str) -> None:
        """Open a tunnel link to HOST:PORT (repeatable)."""
        try:
            self["connect"].append(parse_target(target))
        except ValueError as e:
            raise usage.UsageError(f"--connect: {e}") from None

    def opt_group(self, target: str) -> None:
        """This site's announce domain: ADDR[:PORT] (repeatable, at least one)."""
        try:
            self["group"].append(parse_target(target, DEFAULT_PORT))
        except ValueError as e:
            raise usage.UsageError(f"--group: {e}") from None

    def postOptions(self) -> None:
        if not self["listen"] and not self["connect"]:
            raise usage.UsageError("give --listen HOST:PORT or --connect HOST:PORT")
        if not self["group"]:
            raise usage.UsageError("give at least one --group")
        if not self["credential"]:
            raise usage.UsageError("give --credential FILE")
        if self["listen"]:
            try:
                self["listen_addr"] = parse_target(self["listen"])
            except ValueError as e:
                raise usage.UsageError(f"--listen: {e}") from None


def _credential(path: str) -> Credential:
    for role in ("relay", "worker", "client"):
        try:
            return load_credential(Path(path), role)  # type: ignore[arg-type]
        except CredentialError as e:
            error = e
            if "credential, but a" not in str(e):
                break
    print(f"rexnet-tunnel: {error}", file=sys.stderr)
    raise SystemExit(CREDENTIAL)


def makeService(config: Options) -> IService:
    from twisted.internet import reactor

    guard(reactor)  # no stale poll event reaches a reused descriptor (rexnet.net.pollguard)

    credential = _credential(config["credential"])
    try:
        revoked = open_list(config["revoked"], credential.path, credential.app)
    except CredentialError as e:
        print(f"rexnet-tunnel: {e}", file=sys.stderr)
        raise SystemExit(CREDENTIAL) from None
    tunnel = Tunnel(reactor, credential, config["group"], revoked)
    options = listening_options(credential)
    top = MultiService()
    TunnelGroups(tunnel).setServiceParent(top)
    factory = link_factory(tunnel)
    if config["listen"]:
        host, port = config["listen_addr"]
        endpoint = SSL4ServerEndpoint(reactor, port, options, interface=host)
        StreamServerEndpointService(endpoint, factory).setServiceParent(top)
    for host, port in config["connect"]:
        client = SSL4ClientEndpoint(reactor, host, port, options, timeout=5)
        ClientService(client, factory, retryPolicy=backoffPolicy(
            0.5, 5.0, 2.0, jitter=lambda: 0.0)).setServiceParent(top)
    return top
