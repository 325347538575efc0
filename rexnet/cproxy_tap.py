"""twistd cproxy: options and the service tree."""

from __future__ import annotations

from twisted.application.service import IService, MultiService
from twisted.python import usage

from rexnet.announce import DEFAULT_PORT, parse_target
from rexnet.relay import Relay, RelayService


class Options(usage.Options):
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
    ]

    def __init__(self) -> None:
        super().__init__()
        self["announce"] = []

    def opt_announce(self, target: str) -> None:
        """Re-announce to ADDR[:PORT] on the other network (repeatable; required): a
        broadcast address, a multicast group or a worker's address."""
        try:
            self["announce"].append(parse_target(target))
        except ValueError as e:
            raise usage.UsageError(f"--announce: {e}") from None

    def postOptions(self) -> None:
        if not self["announce"]:
            raise usage.UsageError("give at least one --announce target on the other network")
        try:
            self["listen_addr"] = parse_target(self["listen"], any_port=True)
        except ValueError as e:
            raise usage.UsageError(str(e)) from None


def makeService(config: Options) -> IService:
    from twisted.internet import reactor

    relay = Relay(reactor, config["announce"])
    top = MultiService()
    RelayService(relay, config["listen_addr"]).setServiceParent(top)
    return top
