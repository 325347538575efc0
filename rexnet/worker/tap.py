"""twistd rexnet-worker: options and the service tree."""

from __future__ import annotations

import ipaddress
import os
import shutil
import socket
import sys
from pathlib import Path
from typing import Any

from twisted.application.internet import ClientService
from twisted.application.service import IService, MultiService
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.error import CannotListenError
from twisted.python import usage

from rexnet.net.alerts import CRAT_PORT
from rexnet.net.announce import DEFAULT_PORT, parse_target
from rexnet.net.datalink import DatagramLink
from rexnet.net.registration import WorkerRegistration
from rexnet.net.tapoptions import VersionOption
from rexnet.protocol.exitcodes import CREDENTIAL, USAGE
from rexnet.protocol.remotecall import RUNNER
from rexnet.security.credentials import CredentialError, load_credential
from rexnet.security.revocation import open_list
from rexnet.security.tls import connecting_options
from rexnet.worker.datagrams import AnnounceSocket
from rexnet.worker.job import Limits
from rexnet.worker.load import cpu_count
from rexnet.worker.metrics import Metrics
from rexnet.worker.multi import SharedWorkerService
from rexnet.worker.service import Worker, WorkerService, WorkerSettings


class Options(VersionOption):
    synopsis = "[options] KEYFILE COMMAND [ARG...] | --python KEYFILE | --config FILE"
    longdesc = (
        "Serve one rexnet application: hear announcements of its clients, connect back "
        "to the client after a delay that grows with this host's load, and run COMMAND "
        "for each job with the client's stdin, stdout and stderr. KEYFILE is the "
        f"application's worker credential (APP.worker). Announcements arrive on UDP port "
        f"{DEFAULT_PORT} unless --listen says otherwise. With --python, each job is a "
        "Python call from rexnet.Executor.call instead (pickled: the worker trusts its "
        "authenticated clients). With --config, every [applications.NAME.worker] table of "
        "FILE is served by this one process (its keys are this command's long options, "
        "plus credential and command); applications listening on the same address share "
        "one socket."
    )
    optParameters = [
        ["listen", "l", f"0.0.0.0:{DEFAULT_PORT}",
         "UDP HOST:PORT to receive announcements on."],
        ["name", "n", None, "Name of this worker (default: the host name)."],
        ["speed", "s", "1.0", "Speed weight: 2.0 means twice as fast as 1.0."],
        ["slots", None, None, "Concurrent jobs (default: the number of CPUs)."],
        ["queue", None, None, "Jobs that may wait for a slot when every slot is busy "
         "(default: 4 per slot; 0: a busy worker does not answer)."],
        ["chdir", None, None, "Working directory of the jobs (default: the worker's)."],
        ["job-timeout", None, "0", "End a job after this many SECONDS (0: no limit)."],
        ["job-memory", None, "0", "End a job whose processes use more than this many BYTES "
         "of memory (suffixes K, M, G; 0: no limit)."],
        ["config", "c", None, "Serve the applications of this TOML FILE instead of KEYFILE "
         "COMMAND (see rexnet(1) and etc/rexnet.toml.example)."],
        ["metrics", None, None, "Serve Prometheus metrics over HTTP on TCP HOST:PORT."],
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

    def parseOptions(self, options: Any = None) -> None:
        """Parse OPTIONS, remembering them: with --config they override the file's."""
        self.argv = list(sys.argv[1:] if options is None else options)
        super().parseOptions(options)

    def overrides(self) -> list[str]:
        """The options of the command line other than --config and --metrics."""
        out, skip = [], False
        for arg in self.argv:
            if skip:
                skip = False
            elif arg in ("--config", "-c", "--metrics"):
                skip = True
            elif not arg.startswith(("--config=", "--metrics=")) and not (
                    arg.startswith("-c") and not arg.startswith("--")):
                out.append(arg)
        return out

    def parseArgs(self, *args: str) -> None:  # type: ignore[override]
        self["keyfile"] = args[0] if args else None
        self["command"] = args[1:]

    def postOptions(self) -> None:
        if self["metrics"] is not None:
            try:
                self["metrics_addr"] = parse_target(self["metrics"], any_port=True)
            except ValueError as e:
                raise usage.UsageError(f"--metrics: {e}") from None
        if self["config"] is not None:
            if self["keyfile"] is not None:
                raise usage.UsageError("--config FILE names the applications: give no "
                                       "KEYFILE or COMMAND")
            return
        if self["keyfile"] is None:
            raise usage.UsageError("Wrong number of arguments: give KEYFILE COMMAND [ARG...] "
                                   "(or --python KEYFILE, or --config FILE)")
        try:
            self["listen_addr"] = parse_target(self["listen"], any_port=True)
            ipaddress.ip_address(self["listen_addr"][0])
        except ValueError as e:
            raise usage.UsageError(f"--listen: {e}".replace("does not appear to be an IPv4 "
                                   "or IPv6 address", "is no IP address")) from None
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
        try:
            self["queue"] = None if self["queue"] is None else int(self["queue"])
            if self["queue"] is not None and not 0 <= self["queue"] <= 1 << 20:
                raise ValueError
        except ValueError:
            raise usage.UsageError("--queue must be a whole number of at least 0") from None
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


def config_keys() -> tuple[set[str], set[str], set[str]]:
    """The long options a configuration file's worker table may set: (parameters, flags,
    repeatable options); the same definitions as the command line's."""
    options = Options()
    params = {str(p[0]) for p in Options.optParameters} - {"config", "metrics"}  # type: ignore[index]
    flags = {str(f[0]) for f in Options.optFlags} - {"help", "version"}
    lists = {key for key, value in options.items() if isinstance(value, list)}
    return params, flags, lists


def from_config(path: str, overrides: list[str]) -> tuple[list[Options],
                                                         tuple[str, int] | None]:
    """The options of each application of the configuration FILE (OVERRIDES, options of
    the command line, win), and its metrics address; a mistake is a one-line error
    naming the file and line."""
    from rexnet import config as c
    from rexnet.protocol.exitcodes import CONFIG

    try:
        source = c.read(Path(path))
        c.validate(source, config_keys())
        apps, process = c.worker_apps(source, config_keys())
        metrics = None
        if "metrics" in process:
            try:
                metrics = parse_target(str(process["metrics"]), any_port=True)
            except ValueError as e:
                raise c.ConfigError(f"{source.where(['worker'], 'metrics')}: metrics: {e}"
                                    ) from None
        parsed = []
        for app in apps:
            options = Options()
            try:
                options.parseOptions(app.argv(overrides))
            except usage.UsageError as e:
                raise c.ConfigError(c.blame(app, str(e))) from None
            options["app_name"] = app.name
            options["credential_origin"] = app.origin["credential"]
            parsed.append(options)
    except c.ConfigError as e:
        raise fail(str(e), CONFIG) from None
    return parsed, metrics


def makeService(config: Options) -> IService:
    from twisted.internet import reactor

    top = MultiService()
    if config["config"] is not None:
        apps, metrics_addr = from_config(config["config"], config.overrides())
    else:
        apps, metrics_addr = [config], None
    metrics_addr = config.get("metrics_addr") or metrics_addr  # the command line wins
    metrics = None
    if metrics_addr is not None:
        from rexnet.worker.metrics import MetricsService

        metrics = Metrics()
        server = MetricsService(metrics, metrics_addr[0], metrics_addr[1], reactor)
        try:
            server.bind()
        except CannotListenError as e:
            raise fail(f"--metrics: cannot listen on {metrics_addr[0]}:{metrics_addr[1]}: "
                       f"{e.socketError}", USAGE) from None
        server.setServiceParent(top)
    sockets: dict[tuple[str, int], AnnounceSocket] = {}
    workers = [worker_for(options, top, reactor, metrics,
                          sockets.setdefault(options["listen_addr"], AnnounceSocket()))
               for options in apps]
    by_address: dict[tuple[str, int], list[Worker]] = {}
    for worker in workers:
        by_address.setdefault(worker.settings.listen, []).append(worker)
    for address, sharing in by_address.items():
        if len({w.settings.groups for w in sharing}) > 1:
            raise fail(f"applications listening on {address[0]}:{address[1]} must join the "
                       "same groups", USAGE)
        service = WorkerService(sharing[0]) if len(sharing) == 1 else \
            SharedWorkerService(sharing)
        try:
            service.bind()
        except CannotListenError as e:
            raise fail(f"cannot listen on {address[0]}:{address[1]}: {e.socketError}",
                       USAGE) from None
        service.setServiceParent(top)
    return top


def worker_for(config: Options, top: MultiService, reactor: Any,
               metrics: Metrics | None = None, announce: AnnounceSocket | None = None
               ) -> Worker:
    """The Worker of one application's options (and its registrations with cproxies),
    collecting into METRICS and hearing announcements on ANNOUNCE."""
    try:
        credential = load_credential(Path(config["keyfile"]), "worker")
        revoked = open_list(config["revoked"], Path(config["keyfile"]), credential.app)
    except CredentialError as e:
        origin = config.get("credential_origin")
        raise fail(f"{origin}: {e}" if origin else str(e), CREDENTIAL) from None
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
        queue=config["queue"],
    )
    worker = Worker(settings, reactor, socket=announce, metrics=metrics)
    if config["register"]:
        registration = WorkerRegistration(reactor, credential, worker.datagram)
        factory = DatagramLink.factory_for(registration)
        for host, port in config["register"]:
            endpoint = wrapClientTLS(connecting_options(credential),
                                     TCP4ClientEndpoint(reactor, host, port, timeout=5))
            ClientService(endpoint, factory,
                          retryPolicy=lambda attempt: min(0.5 * 2 ** attempt, 5.0)
                          ).setServiceParent(top)
    return worker
