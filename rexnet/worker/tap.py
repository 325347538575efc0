"""twistd rexnet-worker: options and the service tree."""

from __future__ import annotations

import ipaddress
import os
import shutil
import socket
import sys
from pathlib import Path
from typing import Any

from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import IService, MultiService
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.python import usage

from rexnet.net.alerts import CRAT_PORT
from rexnet.net.announce import DEFAULT_PORT, parse_target
from rexnet.net.datalink import DatagramLink
from rexnet.net.groups import env_groups, joined
from rexnet.net.pollguard import guard
from rexnet.net.registration import WorkerRegistration, registration_options
from rexnet.net.tapoptions import VersionOption
from rexnet.protocol.exitcodes import CREDENTIAL, USAGE
from rexnet.protocol.remotecall import RUNNER_ARGV
from rexnet.security.credentials import CredentialError, load_credential
from rexnet.security.revocation import open_list
from rexnet.worker.commands import CommandPolicy
from rexnet.worker.datagrams import AnnounceSocket
from rexnet.worker.environment import parse_job_env
from rexnet.worker.job import Limits
from rexnet.worker.listener import WorkerService
from rexnet.worker.load import cpu_count
from rexnet.worker.metrics import Metrics
from rexnet.worker.multi import SharedWorkerService
from rexnet.worker.sandbox import (
    GROWN_SPARES,
    MAX_SPARES,
    SPARES,
    JobUsers,
    Sandbox,
    SandboxService,
    missing_isolation,
    parse_job_users,
)
from rexnet.worker.service import Worker, WorkerSettings

log = Logger()


class Options(VersionOption):
    synopsis = ("[options] KEYFILE COMMAND [ARG...] | --commands PATTERN... KEYFILE | "
                "--any-command KEYFILE | --python KEYFILE | --config FILE")
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
        "one socket. With --commands (or --any-command) and no COMMAND, the client names "
        "the program and its arguments (rexnet exec APP -- cc -c foo.c): the worker "
        "looks the name up in its own PATH and runs it if it is allowed, in the client's "
        "working directory when this host has the same path."
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
        ["job-pids", None, "0", "At most this many processes (and threads) per job (0: no "
         "limit; needs a worker started as root)."],
        ["job-cpus", None, "0", "At most this many CPUs' worth of time per job, e.g. 0.5 "
         "(0: no limit; needs a worker started as root)."],
        ["job-users", None, None, "Run each job as a user of its own from this pool: "
         "rexjob0-15 (users rexjob0 to rexjob15), a uid range such as 61000-61015, or a "
         "comma-separated list; one job per user at a time (needs a worker started as "
         "root, which keeps root only in a small sandbox helper)."],
        ["config", "c", None, "Serve the applications of this TOML FILE instead of KEYFILE "
         "COMMAND (see rexnet(1) and etc/rexnet.toml.example)."],
        ["metrics", None, None, "Serve Prometheus metrics over HTTP on TCP HOST:PORT."],
        ["revoked", None, None, "Refuse clients whose certificates are listed in FILE "
         "(made by rexnet keygen --revoke; re-read when it changes; default: APP.revoked "
         "beside KEYFILE, if there is one)."],
        ["state-dir", None, None, "Keep detached jobs' output and jobs' own directories "
         "(--put, --get) under DIR/APP (default: /var/lib/rexnet as root, else "
         "$XDG_STATE_HOME/rexnet)."],
        ["detached-output", None, "16M", "Keep at most this many BYTES of a detached job's "
         "output (the rest is counted, not kept)."],
        ["keep-finished", None, "3600", "List finished jobs, and keep detached jobs' output, "
         "for this many SECONDS."],
        ["job-files", None, "1G", "BYTES a job's --put files may total (and its --get "
         "files)."],
    ]
    optFlags = [
        ["allow-args", None, "Append any extra arguments of the client to COMMAND: option "
         "and file injection (a client can name any file the jobs' user can read); prefer "
         "--allow-arg."],
        ["no-sandbox", None, "Run jobs without a sandbox even when started as root (no PID "
         "namespace, control group, private /tmp or job users)."],
        ["any-command", None, "Run whatever program the client names (no COMMAND; for a "
         "trusted cluster: every authenticated client can run anything as this worker)."],
        ["python", None, "Run Python calls (rexnet.Executor.call) instead of a COMMAND: each "
         "job unpickles a callable and its arguments from its stdin in a fresh `python -c` "
         "process (the worker's own interpreter) and pickles back the result. "
         "Pickle runs code: this trusts every authenticated client."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["join"] = []
        self["accept-env"] = []
        self["job-env"] = []
        self["allow-arg"] = []
        self["alerts"] = []
        self["register"] = []
        self["commands"] = []

    def opt_commands(self, pattern: str) -> None:
        """Let clients name the program: one whose name or absolute path matches PATTERN
        (shell wildcards; repeatable); give no COMMAND. The worker resolves a name in its
        own PATH."""
        if not pattern or "\0" in pattern:
            raise usage.UsageError("--commands: give a program name or path pattern")
        self["commands"].append(pattern)

    def opt_join(self, group: str) -> None:
        """Join this multicast GROUP for announcements (repeatable; default: $GROUP, when
        it is a multicast group, as clients announce there)."""
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
        sshd's AcceptEnv; repeatable). Others are refused and the client is told. Loader
        and interpreter hooks (LD_*, PATH, BASH_ENV, ENV, PYTHON*, PERL5*, REXNET_*...)
        are never accepted: a job asking for one is refused."""
        self["accept-env"].append(pattern)

    def opt_job_env(self, spec: str) -> None:
        """Give every job the variable NAME with the worker's own value of it, or VALUE
        (NAME[=VALUE]; repeatable). Jobs start from PATH=/usr/local/bin:/usr/bin:/bin,
        HOME, USER and LOGNAME of their user, LANG, TERM in a terminal and REXNET_JOB_ID,
        REXNET_WORKER and REXNET_CLIENT; nothing else of the worker's environment."""
        try:
            self["job-env"].append(parse_job_env(spec))
        except ValueError as e:
            raise usage.UsageError(f"--job-env: {e}") from None

    def opt_allow_arg(self, pattern: str) -> None:
        """Let clients append extra arguments that match PATTERN to COMMAND (shell
        wildcards, matched as file names are: * never matches / or a leading .;
        repeatable). Each argument must match one pattern, or the job is refused."""
        if not pattern:
            raise usage.UsageError("--allow-arg: give a PATTERN (say, '[!-]*')")
        self["allow-arg"].append(pattern)

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
        self["slots_given"] = slots is not None
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
        try:
            self["join"] = joined(self["join"])  # no --join: $GROUP, if a multicast group
        except ValueError as e:
            raise usage.UsageError(f"--join: {e}") from None
        if not self["alerts"]:
            defaults = [(group, CRAT_PORT) for group in self["join"]]
            group = os.environ.get("GROUP", "")
            if self["listen_addr"][0] == "0.0.0.0" and not env_groups():
                broadcast = group.rpartition(":")[0] if group.count(":") == 1 else group
                defaults.append((broadcast or "255.255.255.255", CRAT_PORT))
            self["alerts"] = defaults
        try:
            self["job-timeout"] = float(self["job-timeout"])
            if self["job-timeout"] < 0:
                raise ValueError
        except ValueError:
            raise usage.UsageError("--job-timeout must be a number of seconds >= 0") from None
        self["job-memory"] = parse_bytes(self["job-memory"])
        self.sandbox_options()
        self["detached-output"] = parse_bytes(self["detached-output"])
        self["job-files"] = parse_bytes(self["job-files"])
        try:
            self["keep-finished"] = float(self["keep-finished"])
            if not 0 <= self["keep-finished"] <= 1e8:
                raise ValueError
        except ValueError:
            raise usage.UsageError("--keep-finished must be a number of seconds >= 0") from None
        if self["state-dir"] is not None:
            self["state-dir"] = os.path.abspath(self["state-dir"])
        if self["chdir"] is not None:
            if not os.path.isdir(self["chdir"]):
                raise usage.UsageError(f"--chdir: no such directory: {self['chdir']}")
            self["chdir"] = os.path.abspath(self["chdir"])
        if self["commands"] or self["any-command"]:
            if self["command"] or self["python"] or self["allow-args"]:
                raise usage.UsageError("--commands and --any-command let the client name the "
                                       "program and its arguments: give no COMMAND, "
                                       "--python or --allow-args")
            if self["commands"] and self["any-command"]:
                raise usage.UsageError("--any-command allows every program: give no "
                                       "--commands with it")
            return
        if self["python"]:
            if self["command"]:
                raise usage.UsageError("--python runs Python calls: give no COMMAND")
            if self["allow-args"] or self["allow-arg"]:
                given = "--allow-args" if self["allow-args"] else "--allow-arg"
                raise usage.UsageError(f"{given} does not go with --python")
            self["command"] = (sys.executable, *RUNNER_ARGV)
            named = {name for name, _ in self["job-env"]}
            if "PYTHONPATH" in os.environ and "PYTHONPATH" not in named:
                self["job-env"].append(("PYTHONPATH", None))  # the callables' modules
            return
        if not self["command"]:
            raise usage.UsageError("Wrong number of arguments: give KEYFILE COMMAND [ARG...] "
                                   "(or --python KEYFILE, or --commands PATTERN KEYFILE)")
        command = self["command"][0]
        found = shutil.which(command)
        if found is None:
            raise usage.UsageError(f"command not found: {command}")
        self["command"] = (os.path.abspath(found), *self["command"][1:])


    def sandbox_options(self) -> None:
        """--job-pids, --job-cpus, --job-users and --no-sandbox, checked together."""
        try:
            self["job-pids"] = int(self["job-pids"])
            self["job-cpus"] = float(self["job-cpus"])
            if self["job-pids"] < 0 or self["job-cpus"] < 0:
                raise ValueError
        except ValueError:
            raise usage.UsageError("--job-pids and --job-cpus must be numbers >= 0") from None
        self["sandboxed"] = os.geteuid() == 0 and not self["no-sandbox"]
        if self["job-users"] is None:
            self["job_users"] = []
            return
        if not self["sandboxed"]:
            raise usage.UsageError("--job-users needs a worker started as root, without "
                                   "--no-sandbox")
        try:
            self["job_users"] = parse_job_users(self["job-users"])
        except ValueError as e:
            raise usage.UsageError(f"--job-users: {e}") from None
        if self["slots"] > len(self["job_users"]) and not self["slots_given"]:
            self["slots"] = len(self["job_users"])
        elif self["slots"] > len(self["job_users"]):
            raise usage.UsageError(f"--job-users gives {len(self['job_users'])} users for "
                                   f"{self['slots']} slots: give one user per slot (or "
                                   "fewer --slots)")


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

    guard(reactor)  # no stale poll event reaches a reused descriptor (rexnet.net.pollguard)

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


def sandbox_for(config: Options, top: MultiService) -> Sandbox | None:
    """The sandbox of one application (its helper starts with TOP, while the worker is
    still root), or None; either way the worker's start-up log says which isolation its
    jobs get."""
    if not config["sandboxed"]:
        reason = ("job isolation off (--no-sandbox)" if config["no-sandbox"]
                  else missing_isolation())
        limits = [f"--{o}" for o in ("job-pids", "job-cpus") if config[o]]
        log.warn("{reason}{ignored}", reason=reason, ignored=f"; {' and '.join(limits)} "
                 "cannot be enforced" if limits else "")
        return None
    users = JobUsers(config["job_users"]) if config["job_users"] else None
    # one spare per slot (at most MAX_SPARES): a burst of jobs as large as the worker's
    # slots takes prepared supervisors, none waits for one in the reactor; jobs that come
    # faster than the helper refills add spares, up to two per slot (GROWN_SPARES at most)
    spares = max(SPARES, min(config["slots"], MAX_SPARES))
    sandbox = Sandbox(users, spares=spares,
                      bounds=[b for b in ("memory", "pids", "cpus") if config[f"job-{b}"]],
                      grow_to=min(2 * config["slots"], GROWN_SPARES))
    SandboxService(sandbox).setServiceParent(top)
    return sandbox


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
        job_env=tuple(config["job-env"]),
        allow_arg=tuple(config["allow-arg"]),
        keyfile=os.path.abspath(config["keyfile"]),
        alert_targets=tuple(config["alerts"]),
        chdir=config["chdir"],
        limits=Limits(config["job-timeout"], config["job-memory"], config["job-pids"],
                      config["job-cpus"]),
        revoked=revoked,
        sandbox=sandbox_for(config, top),
        commands=CommandPolicy.of(tuple(config["commands"]), bool(config["any-command"])),
        state_dir=config["state-dir"] or "",
        job_files=config["job-files"],
        detached_output=config["detached-output"],
        keep_finished=config["keep-finished"],
        queue=config["queue"],
    )
    worker = Worker(settings, reactor, socket=announce, metrics=metrics)
    if config["register"]:
        registration = WorkerRegistration(reactor, credential, worker.datagram, revoked)
        factory = DatagramLink.factory_for(registration)
        for host, port in config["register"]:
            endpoint = wrapClientTLS(registration_options(credential),
                                     TCP4ClientEndpoint(reactor, host, port, timeout=5))
            ClientService(endpoint, factory, retryPolicy=backoffPolicy(
                0.5, 5.0, 2.0, jitter=lambda: 0.0)).setServiceParent(top)
    return worker
