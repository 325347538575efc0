"""twistd cproxy: options and the service tree."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import NoReturn

from cryptography import x509
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, MultiService
from twisted.internet.endpoints import SSL4ServerEndpoint
from twisted.logger import Logger
from twisted.python import usage

from rexnet.net.announce import DEFAULT_PORT, parse_target, source_address
from rexnet.net.certcheck import CertChecker
from rexnet.net.datalink import DatagramLink
from rexnet.net.groups import joined
from rexnet.net.pollguard import guard
from rexnet.net.registration import RegisteredWorkers
from rexnet.net.tapoptions import VersionOption
from rexnet.protocol.exitcodes import CREDENTIAL
from rexnet.relay.cproxy import Relay, RelayService
from rexnet.security.credentials import CertInfo, Credential, CredentialError, load_credential
from rexnet.security.revocation import AnyList, RevokedFile, open_list
from rexnet.security.tls import listening_options
from rexnet.security.trust import read_trust_file

WILDCARDS = ("", "0.0.0.0", "::")

log = Logger()


class Options(VersionOption):
    synopsis = ("--trust APP.ca.pem | --credential APP.NAME.relay [--announce ADDR[:PORT] ...] "
                "[--register HOST:PORT]")
    longdesc = (
        "Relay rexnet announcements, TAKEN messages, status queries and alerts heard on "
        "--listen to the --announce targets of another network, naming this host as the "
        "place to connect back, and splice the workers' connections through to the client. "
        "cproxy sees no job data: TLS is end to end. It carries only datagrams signed by "
        "valid, unrevoked credentials of the applications it trusts (--trust APP.ca.pem, "
        "and the application of --credential), and splices a job only to the address its "
        "client signed. With a relay credential (rexnet keygen --issue relay --name NAME "
        "APP.ca) it signs the trailer that tells workers where to connect back; workers "
        "refuse an unsigned trailer unless configured to trust this relay's address. Run it "
        "on a host attached to both networks; IP forwarding is not needed. Alerts are heard "
        "on port 3011 of the same address and relayed to port 3011 of the targets."
    )
    optParameters = [
        ["listen", "l", f"0.0.0.0:{DEFAULT_PORT}",
         "UDP HOST:PORT to hear announcements on."],
        ["register", None, None, "Accept registrations of workers behind NAT on TCP "
         "HOST:PORT (needs --credential)."],
        ["credential", None, None, "A relay credential of the application (APP.NAME.relay, "
         "see above): it signs relay trailers and serves registrations."],
        ["bind", None, None, "Address the per-job ports listen on (default: this host's "
         "address toward the --announce targets when there is one, else all)."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["announce"] = []
        self["trust"] = []
        self["revoked"] = []
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

    def opt_trust(self, path: str) -> None:
        """Carry datagrams of the application whose CA certificate is FILE (APP.ca.pem,
        written by rexnet keygen; repeatable)."""
        self["trust"].append(path)

    def opt_revoked(self, path: str) -> None:
        """Refuse credentials listed in FILE (rexnet keygen --revoke; repeatable; re-read
        when it changes; default: APP.revoked beside each --trust file and --credential)."""
        self["revoked"].append(path)

    def postOptions(self) -> None:
        if not self["announce"] and not self["register"]:
            raise usage.UsageError("give at least one --announce target on the other network")
        if self["register"] and not self["credential"]:
            raise usage.UsageError("--register needs --credential (a relay credential)")
        if not self["trust"] and not self["credential"]:
            raise usage.UsageError("give --trust APP.ca.pem or --credential: cproxy carries "
                                   "only what it can verify")
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


def fail(message: str) -> NoReturn:
    print(f"cproxy: {message}", file=sys.stderr)
    raise SystemExit(CREDENTIAL)


def job_port_interface(config: Options) -> str:
    """Where per-job ports listen: --bind, else the one address facing the targets."""
    if config["bind"]:
        return str(config["bind"])
    facing = {source_address(target) for target in config["announce"]} - {None}
    if config["register"] and config["register_addr"][0] not in WILDCARDS:
        facing.add(config["register_addr"][0])
    return facing.pop() if len(facing) == 1 else ""  # type: ignore[return-value]


def trust(config: Options) -> tuple[list[x509.Certificate], Credential | None, AnyList]:
    """The trusted CAs, the relay credential and the revocation lists in force."""
    credential = None
    cas: list[x509.Certificate] = []
    lists: dict[Path, RevokedFile] = {}
    try:
        if config["credential"]:
            credential = load_credential(Path(config["credential"]), "relay")
            cas.append(credential.ca_cert)
        for path in config["trust"]:
            cas.append(read_trust_file(Path(path)))
        for option in config["revoked"]:
            listed = open_list(option, Path(option), "")
            if listed is not None:
                lists[listed.path] = listed
        if not config["revoked"]:
            sources = [(Path(p), ca) for p, ca in zip(config["trust"], cas[bool(credential):],
                                                     strict=True)]
            if credential is not None:
                sources.append((credential.path, credential.ca_cert))
            for near, ca in sources:
                listed = open_list(None, near, CertInfo.of(ca).app)
                if listed is not None:
                    lists.setdefault(listed.path, listed)
    except CredentialError as e:
        fail(str(e))
    return cas, credential, AnyList(lists.values())


def makeService(config: Options) -> IService:
    from twisted.internet import reactor

    guard(reactor)  # no stale poll event reaches a reused descriptor (rexnet.net.pollguard)

    cas, credential, revoked = trust(config)
    bind = job_port_interface(config)
    relay = Relay(reactor, config["announce"], CertChecker(cas, revoked), credential, bind)
    apps = sorted({CertInfo.of(ca).app for ca in cas})
    log.info("cproxy trusts {apps}; relay trailers {how}; job ports on {bind}",
             apps=", ".join(apps),
             how=f"signed as {credential.name!r} for {credential.app}" if credential else
             "unsigned (workers must be configured to trust this relay's address)",
             bind=bind or "all interfaces")
    top = MultiService()
    RelayService(relay, config["listen_addr"], tuple(config["join"])).setServiceParent(top)
    if config["register"]:
        assert credential is not None
        relay.registered = RegisteredWorkers(reactor, credential, revoked)
        host, port = config["register_addr"]
        endpoint = SSL4ServerEndpoint(reactor, port, listening_options(credential),
                                      interface=host)
        StreamServerEndpointService(
            endpoint, DatagramLink.factory_for(relay.registered)).setServiceParent(top)
    return top
