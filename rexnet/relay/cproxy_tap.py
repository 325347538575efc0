"""twistd cproxy: options and the service tree."""

from __future__ import annotations

import sys
from pathlib import Path

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, MultiService
from twisted.internet.endpoints import SSL4ServerEndpoint
from twisted.python import usage

from rexnet.net.announce import DEFAULT_PORT, parse_target
from rexnet.net.datalink import DatagramLink
from rexnet.net.groups import joined
from rexnet.net.registration import RegisteredWorkers
from rexnet.net.tapoptions import VersionOption
from rexnet.protocol.exitcodes import CREDENTIAL
from rexnet.relay.cproxy import Relay, RelayService
from rexnet.security.credentials import CredentialError, load_credential
from rexnet.security.tls import listening_options


class Options(VersionOption):
    synopsis = "[options] --announce ADDR[:PORT] [--announce ...]"
    longdesc = (
        "Relay rexnet announcements, TAKEN messages, status queries and alerts heard on "
        "--listen to the --announce targets of another network, naming this host as the "
        "place to connect back, and splice the workers' connections through to the client. "
        "cproxy holds no credential and sees no job data: TLS is end to end. Run it on a "
        "host attached to both networks; IP forwarding is not needed. Alerts are heard on "
        "port 3011 of the same address and relayed to port 3011 of the targets."
    )
    optParameters = [
        ["listen", "l", f"0.0.0.0:{DEFAULT_PORT}",
         "UDP HOST:PORT to hear announcements on."],
        ["register", None, None, "Accept registrations of workers behind NAT on TCP "
         "HOST:PORT (needs --credential)."],
        ["credential", None, None, "A client credential of the application, for "
         "registrations (e.g. rexnet keygen --issue client --name cproxy APP.ca)."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["announce"] = []
        self["join"] = []

    def opt_join(self, group: str) -> None:
        """Join this multicast GROUP on the --listen side, for announcements and alerts
        sent there (repeatable; default: $GROUP, when it is a multicast group)."""
        self["join"].append(group)

    def opt_announce(self, target: str) -> None:
        """Re-announce to ADDR[:PORT] on the other network (repeatable; required): a
        broadcast address, a multicast group or a worker's address."""
        try:
            self["announce"].append(parse_target(target))
        except ValueError as e:
            raise usage.UsageError(f"--announce: {e}") from None

    def postOptions(self) -> None:
        if not self["announce"] and not self["register"]:
            raise usage.UsageError("give at least one --announce target on the other network")
        if bool(self["register"]) != bool(self["credential"]):
            raise usage.UsageError("--register and --credential go together")
        if self["register"]:
            try:
                self["register_addr"] = parse_target(self["register"])
            except ValueError as e:
                raise usage.UsageError(f"--register: {e}") from None
        try:
            self["listen_addr"] = parse_target(self["listen"], any_port=True)
        except ValueError as e:
            raise usage.UsageError(str(e)) from None
        try:
            self["join"] = joined(self["join"])
        except ValueError as e:
            raise usage.UsageError(f"--join: {e}") from None


def makeService(config: Options) -> IService:
    from twisted.internet import reactor

    relay = Relay(reactor, config["announce"])
    top = MultiService()
    RelayService(relay, config["listen_addr"], tuple(config["join"])).setServiceParent(top)
    if config["register"]:
        try:
            credential = load_credential(Path(config["credential"]), "client")
        except CredentialError as e:
            print(f"cproxy: {e}", file=sys.stderr)
            raise SystemExit(CREDENTIAL) from None
        relay.registered = RegisteredWorkers(reactor, credential)
        host, port = config["register_addr"]
        endpoint = SSL4ServerEndpoint(reactor, port, listening_options(credential),
                                      interface=host)
        StreamServerEndpointService(
            endpoint, DatagramLink.factory_for(relay.registered)).setServiceParent(top)
    return top
