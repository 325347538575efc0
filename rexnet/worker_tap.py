"""twistd rexnet-worker: options and the service tree."""

from __future__ import annotations

import os
import shutil
import socket
import sys
from pathlib import Path

from twisted.application.internet import ClientService
from twisted.application.service import IService, MultiService
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.error import CannotListenError
from twisted.python import usage

from rexnet.alerts import CRAT_PORT
from rexnet.announce import DEFAULT_PORT, parse_target
from rexnet.credentials import CredentialError, load_credential
from rexnet.datalink import DatagramLink
from rexnet.exitcodes import CREDENTIAL, USAGE
from rexnet.job import Limits
from rexnet.load import cpu_count
from rexnet.registration import WorkerRegistration
from rexnet.remote import RUNNER
from rexnet.revocation import open_list
from rexnet.tls import connecting_options
from rexnet.worker import Worker, WorkerService, WorkerSettings


class Options(usage.Options):
    synopsis = "[options] KEYFILE COMMAND [ARG...] | --python KEYFILE"
    longdesc = (
        "Serve one rexnet application: hear announcements of its clients, connect back "
        "to the client after a delay that grows with this host's load, and run COMMAND "
        "for each job with the client's stdin, stdout and stderr. KEYFILE is the "
        f"application's worker credential (APP.worker). Announcements arrive on UDP port "
        f"{DEFAULT_PORT} unless --listen says otherwise. With --python, each job is a "
        "Python call from rexnet.Executor.call instead (pickled: the worker trusts its "
        "authenticated clients)."
    )
    optParameters = [
        ["listen", "l", f"0.0.0.0:{DEFAULT_PORT}",
         "UDP HOST:PORT to receive announcements on."],
        ["name", "n", None, "Name of this worker (default: the host name)."],
        ["speed", "s", "1.0", "Speed weight: 2.0 means twice as fast as 1.0."],
        ["slots", None, None, "Concurrent jobs (default: the number of CPUs)."],
        ["chdir", None, None, "Working directory of the jobs (default: the worker's)."],
        ["job-timeout", None, "0", "End a job after this many SECONDS (0: no limit)."],
        ["job-memory", None, "0", "End a job whose processes use more than this many BYTES "
         "of memory (suffixes K, M, G; 0: no limit)."],
        ["revoked", None, None, "Refuse clients whose certificates are listed in FILE "
         "(made by rexnet keygen --revoke; re-read when it changes; default: APP.revoked "
         "beside KEYFILE, if there is one)."],
    ]
    optFlags = [
        ["allow-args", None, "Append the client's extra arguments to COMMAND."],
        ["python", None, "Run Python calls (rexnet.Executor.call) instead of a COMMAND: each "
         "job unpickles a callable and its arguments from its stdin in a fresh `python -c` "
         "process (the worker's own interpreter) and pickles back the result. "
         "Pickle runs code: this trusts every authenticated client."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["join"] = []
        self["accept-env"] = []
        self["alerts"] = []
        self["register"] = []

    def opt_join(self, group: str) -> None:
        """Join this multicast GROUP for announcements (repeatable)."""
        self["join"].append(group)

    def opt_alerts(self, target: str) -> None:
        """Send alerts (signed) to crat at ADDR[:PORT] (repeatable; default: the joined
        groups, and the broadcast address when listening on 0.0.0.0, on port 3011)."""
        try:
            self["alerts"].append(parse_target(target, CRAT_PORT))
        except ValueError as e:
            raise usage.UsageError(f"--alerts: {e}") from None

    def opt_register(self, target: str) -> None:
        """Register with the cproxy at HOST:PORT over an outbound TLS link and receive
        announcements through it (for workers behind NAT; repeatable)."""
        try:
            self["register"].append(parse_target(target))
        except ValueError as e:
            raise usage.UsageError(f"--register: {e}") from None

    def opt_accept_env(self, pattern: str) -> None:
        """Let clients set environment variables matching PATTERN (shell wildcards, as
        sshd's AcceptEnv; repeatable). Others are refused and the client is told."""
        self["accept-env"].append(pattern)

    def parseArgs(self, keyfile: str, *command: str) -> None:  # type: ignore[override]
        self["keyfile"] = keyfile
        self["command"] = command

    def postOptions(self) -> None:
        try:
            self["listen_addr"] = parse_target(self["listen"], any_port=True)
        except ValueError as e:
            raise usage.UsageError(str(e)) from None
        try:
            self["speed"] = float(self["speed"])
            if not 0.01 <= self["speed"] <= 1000:
                raise ValueError
        except ValueError:
            raise usage.UsageError("--speed must be a number between 0.01 and 1000") from None
        slots = self["slots"]
        try:
            self["slots"] = cpu_count() if slots is None else int(slots)
            if self["slots"] < 1:
                raise ValueError
        except ValueError:
            raise usage.UsageError("--slots must be a whole number of at least 1") from None
        self["name"] = self["name"] or socket.gethostname()
        if not self["alerts"]:
            defaults = [(group, CRAT_PORT) for group in self["join"]]
            if self["listen_addr"][0] == "0.0.0.0":
                defaults.append(("255.255.255.255", CRAT_PORT))
            self["alerts"] = defaults
        try:
            self["job-timeout"] = float(self["job-timeout"])
            if self["job-timeout"] < 0:
                raise ValueError
        except ValueError:
            raise usage.UsageError("--job-timeout must be a number of seconds >= 0") from None
        self["job-memory"] = parse_bytes(self["job-memory"])
        if self["chdir"] is not None:
            if not os.path.isdir(self["chdir"]):
                raise usage.UsageError(f"--chdir: no such directory: {self['chdir']}")
            self["chdir"] = os.path.abspath(self["chdir"])
        if self["python"]:
            if self["command"]:
                raise usage.UsageError("--python runs Python calls: give no COMMAND")
            if self["allow-args"]:
                raise usage.UsageError("--allow-args does not go with --python")
            self["command"] = (sys.executable, "-c", RUNNER)
            return
        if not self["command"]:
            raise usage.UsageError("Wrong number of arguments: give KEYFILE COMMAND [ARG...] "
                                   "(or --python KEYFILE)")
        command = self["command"][0]
        found = shutil.which(command)
        if found is None:
            raise usage.UsageError(f"command not found: {command}")
        self["command"] = (os.path.abspath(found), *self["command"][1:])


def parse_bytes(text: str) -> int:
    """'512M' and the like as a number of bytes."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    number, unit = text.strip().upper(), ""
    if number[-1:] in units and not number[-1:].isdigit():
        number, unit = number[:-1], number[-1]
    try:
        value = int(float(number) * units[unit])
        if value < 0:
            raise ValueError
    except (ValueError, KeyError):
        raise usage.UsageError(f"bad size {text!r}: use BYTES or a number with K, M or G"
                               ) from None
    return value


def fail(message: str, code: int) -> SystemExit:
    """A one-line error for the administrator, and an exit without a traceback."""
    print(f"rexnet-worker: {message}", file=sys.stderr)
    return SystemExit(code)


def makeService(config: Options) -> IService:
    from twisted.internet import reactor

    try:
        credential = load_credential(Path(config["keyfile"]), "worker")
        revoked = open_list(config["revoked"], Path(config["keyfile"]), credential.app)
    except CredentialError as e:
        raise fail(str(e), CREDENTIAL) from None
    settings = WorkerSettings(
        credential=credential,
        command=tuple(config["command"]),
        name=config["name"],
        slots=config["slots"],
        speed=config["speed"],
        allow_args=bool(config["allow-args"]),
        listen=config["listen_addr"],
        groups=tuple(config["join"]),
        accept_env=tuple(config["accept-env"]),
        alert_targets=tuple(config["alerts"]),
        chdir=config["chdir"],
        limits=Limits(config["job-timeout"], config["job-memory"]),
        revoked=revoked,
    )
    top = MultiService()
    worker = Worker(settings, reactor)
    service = WorkerService(worker)
    try:
        service.bind()
    except CannotListenError as e:
        raise fail(f"cannot listen on {config['listen']}: {e.socketError}", USAGE) from None
    service.setServiceParent(top)
    if config["register"]:
        registration = WorkerRegistration(reactor, credential, worker.datagram)
        factory = DatagramLink.factory_for(registration)
        for host, port in config["register"]:
            endpoint = wrapClientTLS(connecting_options(credential),
                                     TCP4ClientEndpoint(reactor, host, port, timeout=5))
            ClientService(endpoint, factory,
                          retryPolicy=lambda attempt: min(0.5 * 2 ** attempt, 5.0)
                          ).setServiceParent(top)
    return top
