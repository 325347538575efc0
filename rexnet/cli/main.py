"""The `rexnet` command (and its `cexec` alias): keygen and exec.

Heavy modules (Twisted, cryptography) are imported inside the subcommands, so that
`rexnet --help` is quick.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from rexnet.protocol import exitcodes
from rexnet.version import __version__

DEFAULT_ANNOUNCE = "255.255.255.255"

EXIT_CODES_HELP = "exit status: the job's own (128+N if killed by signal N), or\n" + "\n".join(
    f"  {code}  {text}" for code, text in sorted(exitcodes.DESCRIPTIONS.items())
)


class Parser(argparse.ArgumentParser):
    """argparse with rexnet's usage exit code and a one-line error."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(exitcodes.USAGE, f"{self.prog}: error: {message}\n")


def fail(message: str, code: int) -> NoReturn:
    print(f"rexnet: {message}", file=sys.stderr)
    raise SystemExit(code)


# -- keygen ---------------------------------------------------------------------------


MAX_DAYS = 36500


def cmd_keygen(args: argparse.Namespace) -> int:
    from rexnet.security import credentials as c

    if not 1 <= args.days <= MAX_DAYS:
        fail(f"--days must be between 1 and {MAX_DAYS}", exitcodes.USAGE)
    if not args.issue and (args.name or args.out):
        fail("--name and --out go with --issue", exitcodes.USAGE)
    if args.revoke and args.issue:
        fail("--revoke and --issue are separate commands", exitcodes.USAGE)
    from rexnet.security import revocation

    try:
        if args.revoke:
            ca = c.load_ca(Path(args.target))
            target, added = revocation.revoke(ca.path, ca.cert, args.revoke)
            for line in added:
                print(f"revoked {line}")
            print(f"{target}: {len(added)} added; copy it to the workers' and clients' "
                  "--revoked FILE")
            return 0
        if args.issue:
            if not args.name:
                fail("--issue needs --name NAME", exitcodes.USAGE)
            ca_path = Path(args.target)
            ca = c.load_ca(ca_path)
            key, cert = c.issue(ca.key, ca.cert, args.issue, args.name, args.days)
            out = Path(args.out) if args.out else (
                Path(args.dir) if args.dir else ca_path.parent
            ) / f"{ca.app}.{args.name}.{args.issue}"
            c.write_private(out, c.credential_file_bytes(key, cert, ca.cert))
            revocation.record_issued(ca_path, ca.app, [cert])
            print(f"wrote {out} ({args.issue} credential {args.name!r} of {ca.app})")
            return 0
        paths = c.keygen(args.target, Path(args.dir or "."), args.days)
        revocation.record_issued(paths[0], args.target, [
            c.load_credential(path, role).cert
            for path, role in zip(paths[1:], c.ROLES, strict=True)])
    except c.CredentialError as e:
        fail(str(e), exitcodes.CREDENTIAL)
    print(f"wrote {paths[0]} (keep it with the administrator), {paths[1]} (for workers), "
          f"{paths[2]} (for clients)")
    return 0


# -- exec -----------------------------------------------------------------------------


def announce_targets(texts: Sequence[str]) -> list[tuple[str, int]]:
    from rexnet.net.announce import parse_target

    if not texts:
        texts = [os.environ.get("GROUP") or DEFAULT_ANNOUNCE]
    targets = []
    for text in texts:
        try:
            targets.append(parse_target(text))
        except ValueError as e:
            fail(f"--announce: {e}", exitcodes.USAGE)
    return targets


FORWARDED_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2")


def descriptor_modes(numbers: Sequence[int]) -> dict[int, str]:
    """--fd N: "r" for a read-only descriptor, "w" write-only, "rw" read-write."""
    import fcntl

    modes = {}
    for fd in numbers:
        if not 3 <= fd <= 255:
            fail(f"--fd {fd}: use descriptors 3 to 255 (0, 1 and 2 always go)", exitcodes.USAGE)
        try:
            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        except OSError:
            fail(f"--fd {fd}: descriptor {fd} is not open", exitcodes.USAGE)
        modes[fd] = {os.O_RDONLY: "r", os.O_WRONLY: "w"}.get(flags & os.O_ACCMODE, "rw")
    return modes


def environment(specs: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """--env NAME=VALUE, or --env NAME for this process's value (skipped if unset)."""
    pairs = []
    for spec in specs:
        name, sep, value = spec.partition("=")
        if not name or "\0" in spec:
            fail(f"--env {spec!r}: use NAME=VALUE or NAME", exitcodes.USAGE)
        if not sep:
            if name not in os.environ:
                continue
            value = os.environ[name]
        pairs.append((name, value))
    return tuple(pairs)


def alert_targets(texts: Sequence[str]) -> list[tuple[str, int]]:
    from rexnet.net.alerts import CRAT_PORT
    from rexnet.net.announce import parse_target

    try:
        return [parse_target(text, CRAT_PORT) for text in texts]
    except ValueError as e:
        fail(f"--alerts: {e}", exitcodes.USAGE)


def cmd_exec(args: argparse.Namespace) -> int:
    from rexnet.config import apply_application

    apply_application(args)  # KEYFILE may name an application of rexnet.toml
    targets = announce_targets(args.announce)
    args.alerts = alert_targets(args.alerts)
    if args.timeout <= 0:
        fail("--timeout must be positive", exitcodes.USAGE)
    if args.tty and args.no_tty:
        fail("-t and -T contradict each other", exitcodes.USAGE)
    fds = descriptor_modes(args.fd)
    tty = args.tty or (not args.no_tty and os.isatty(0))
    if tty and fds:
        fail("--fd cannot be combined with a terminal; add -T", exitcodes.USAGE)
    from rexnet.security.credentials import CredentialError, load_credential
    from rexnet.security.revocation import open_list

    try:
        credential = load_credential(Path(args.keyfile), "client")
        args.revoked = open_list(args.revoked, Path(args.keyfile), credential.app)
    except CredentialError as e:
        fail(str(e), exitcodes.CREDENTIAL)
    from rexnet.client.terminal import window_size
    from rexnet.protocol import wire

    rows, cols = window_size(0) if tty else (0, 0)
    request = wire.Start(tuple(args.args), environment(args.env), tty,
                         os.environ.get("TERM", "") if tty else "", rows, cols,
                         tuple(sorted(fds.items())))
    return run_job(credential, targets, request, args)


def run_job(credential: object, targets: list[tuple[str, int]], request: object,
            args: argparse.Namespace) -> int:
    import signal

    from twisted.internet import reactor
    from twisted.internet.fdesc import setBlocking
    from twisted.logger import globalLogBeginner

    from rexnet.client.job import ClientJob
    from rexnet.client.results import JobFailed, JobResult
    from rexnet.client.terminal import raw_mode, window_size
    from rexnet.logs import stderr_observer
    from rexnet.net.alerts import AlertSender, crat_targets

    globalLogBeginner.beginLoggingTo([stderr_observer(args.verbose)], redirectStandardIO=False)
    raw = {"on": False}

    def say(message: str) -> None:
        if args.verbose:
            end = "\r\n" if raw["on"] else "\n"
            print(f"rexnet: {message}", file=sys.stderr, end=end, flush=True)

    alert_targets = args.alerts or crat_targets(targets)
    alerts = AlertSender(reactor, credential, alert_targets)  # type: ignore[arg-type]
    job = ClientJob(reactor, credential, targets, request, timeout=args.timeout,  # type: ignore[arg-type]
                    say=say, alerts=alerts, revoked=getattr(args, "revoked", None))
    outcome: dict[str, object] = {}

    def done(result: object) -> None:
        outcome["result"] = result
        reactor.stop()  # type: ignore[attr-defined]

    def forward(number: int, frame: object) -> None:
        reactor.callFromThread(job.send_signal, number)  # type: ignore[attr-defined]

    def resized(number: int, frame: object) -> None:
        rows, cols = window_size(0)
        if rows and cols:  # with -t, stdin may be no terminal: no size to follow
            reactor.callFromThread(job.resize, rows, cols)  # type: ignore[attr-defined]

    for name in FORWARDED_SIGNALS:
        signal.signal(getattr(signal, name), forward)
    if getattr(request, "tty", False):
        signal.signal(signal.SIGWINCH, resized)
    reactor.callWhenRunning(lambda: job.run().addBoth(done))  # type: ignore[attr-defined]
    with raw_mode(0) if getattr(request, "tty", False) else contextlib.nullcontext(False) as on:
        raw["on"] = bool(on)
        reactor.run(installSignalHandlers=False)  # type: ignore[attr-defined,call-arg]
    for fd in (0, 1, 2, *getattr(request, "fds", {})):
        with contextlib.suppress(OSError):
            setBlocking(fd if isinstance(fd, int) else fd[0])
    result = outcome.get("result")
    if isinstance(result, JobResult):
        return result.status
    error = getattr(result, "value", None)
    if isinstance(error, JobFailed):
        print(f"rexnet: {error}", file=sys.stderr)
        return error.exit_code
    print(f"rexnet: internal error: {result}", file=sys.stderr)
    return exitcodes.WORKER_LOST


# -- status ---------------------------------------------------------------------------


def cmd_status(args: argparse.Namespace) -> int:
    from rexnet.config import apply_application

    apply_application(args)
    targets = announce_targets(args.announce)
    if args.wait <= 0 or (args.watch is not None and args.watch < args.wait):
        fail("--wait must be positive and no longer than --watch", exitcodes.USAGE)
    from rexnet.security.credentials import CredentialError, load_credential

    try:
        credential = load_credential(Path(args.keyfile), "client")
    except CredentialError as e:
        fail(str(e), exitcodes.CREDENTIAL)

    from twisted.internet import reactor, task

    from rexnet.client.status import Seen, StatusQuery, as_json, merge, table

    known: dict[tuple[str, str], Seen] = {}
    outcome = {"answered": False}

    async def rounds() -> None:
        query = StatusQuery(reactor, credential, targets)
        while True:
            fresh = await query.run(args.wait)
            seen = merge(known, fresh) if args.watch is not None else fresh
            outcome["answered"] = outcome["answered"] or bool(fresh)
            if args.json:
                print(as_json(seen), flush=True)
            else:
                if args.watch is not None and sys.stdout.isatty():
                    print("\x1b[H\x1b[2J", end="")
                print(table(seen, reactor.seconds()) if seen else
                      f"no worker answered within {args.wait:g} s", flush=True)
                for complaint in query.complaints[-5:]:
                    print(f"rexnet: complaint: {complaint}", file=sys.stderr)
                query.complaints.clear()
            if args.watch is None:
                return
            await task.deferLater(reactor, args.watch - args.wait, lambda: None)

    from twisted.internet.defer import Deferred

    def main(_: object) -> Deferred[None]:
        return Deferred.fromCoroutine(rounds())

    try:
        task.react(main)
    except SystemExit as e:
        if e.code not in (0, None):
            return exitcodes.NO_WORKER
    except KeyboardInterrupt:
        pass
    return 0 if outcome["answered"] else exitcodes.NO_WORKER


# -- parallel -------------------------------------------------------------------------


def cmd_parallel(args: argparse.Namespace) -> int:
    from rexnet.client import parallel
    from rexnet.config import apply_application

    apply_application(args)
    targets = announce_targets(args.announce)
    alerts = alert_targets(args.alerts) or None
    if args.timeout <= 0:
        fail("--timeout must be positive", exitcodes.USAGE)
    if args.jobs is not None and args.jobs < 1:
        fail("--jobs must be at least 1", exitcodes.USAGE)
    if args.retries < 0:
        fail("--retries must be 0 or more", exitcodes.USAGE)
    try:
        template, values = parallel.split_arguments(args.args)
    except ValueError as e:
        fail(str(e), exitcodes.USAGE)
    from rexnet.security.credentials import CredentialError, load_credential
    from rexnet.security.revocation import open_list

    try:
        credential = load_credential(Path(args.keyfile), "client")
        revoked = open_list(args.revoked, Path(args.keyfile), credential.app)
    except CredentialError as e:
        fail(str(e), exitcodes.CREDENTIAL)
    if values is None:
        values = parallel.read_inputs(sys.stdin)
    return parallel.main(credential, targets, template, values,
                         args.jobs or os.cpu_count() or 1, args.keep_order, args.retries,
                         args.timeout, environment(args.env), alerts, args.verbose, revoked)


PARALLEL_HELP = """\
Each job's extra arguments are ARG... with {} replaced by the input, or the input appended
if there is no {} (the workers must run with --allow-args). Inputs are the VALUEs after
:::, else the lines of stdin. Each job's stdout and stderr are written in one piece when
it ends (outputs never interleave); --keep-order writes them in input order. On a
terminal, stderr shows a progress line (jobs done, failed and running; per worker, jobs
done+running); a summary follows at the end, with one line per failed job.

exit status: the number of failed jobs (a status other than 0, or a rexnet error such as
a lost worker), at most 101; 250 bad command line, 251 credential refused, 128+N when
signal N interrupted the run.
"""


# -- the parser -----------------------------------------------------------------------


def exec_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("keyfile", metavar="KEYFILE", help="the application's client credential "
                   "(APP.client), or the NAME of an application in rexnet.toml")
    p.add_argument("args", metavar="ARG", nargs="*",
                   help="extra arguments for the job's command, if the worker allows them")
    p.add_argument("-a", "--announce", metavar="ADDR[:PORT]", action="append", default=[],
                   help="where to announce the job (repeatable): a broadcast address, a "
                   "multicast group or a worker's address; default: $GROUP, else "
                   f"{DEFAULT_ANNOUNCE}, port 3010")
    p.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                   help="give up if no worker is found within this time (default: the "
                   "application's timeout in rexnet.toml, else 30)")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="say on stderr which worker took the job and why")
    p.add_argument("--alerts", metavar="ADDR[:PORT]", action="append", default=[],
                   help="send signed alerts to crat there (repeatable; default: the "
                   "announce targets on port 3011)")
    p.add_argument("-t", dest="tty", action="store_true",
                   help="give the job a terminal even if stdin is not one")
    p.add_argument("-T", dest="no_tty", action="store_true",
                   help="never give the job a terminal")
    p.add_argument("--fd", metavar="N", type=int, action="append", default=[],
                   help="carry descriptor N to the same number in the job (repeatable): "
                   "read-only and write-only ones as pipes, read-write ones as sockets")
    p.add_argument("--revoked", metavar="FILE", help="refuse workers whose certificates "
                   "are listed in FILE (rexnet keygen --revoke; default: APP.revoked beside "
                   "KEYFILE, if there is one)")
    p.add_argument("-e", "--env", metavar="NAME[=VALUE]", action="append", default=[],
                   help="set a variable in the job's environment, if the worker accepts it "
                   "(repeatable; NAME alone sends this process's value)")
    p.add_argument("--no-agent", action="store_true",
                   help="run without the agent (as does REXNET_NO_AGENT=1): this process "
                   "finds the worker itself (see `rexnet agent --help`)")


def parser() -> argparse.ArgumentParser:
    top = Parser(prog="rexnet", description="Run commands on the least-loaded machine of "
                 "an ad-hoc cluster, as if they ran locally.",
                 formatter_class=argparse.RawDescriptionHelpFormatter,
                 epilog="Workers run as twistd plugins: twistd -n rexnet-worker --help")
    top.add_argument("--version", action="version", version=f"rexnet {__version__}")
    top.add_argument("--config", metavar="FILE", help="read applications from this TOML file "
                     "only (default: ./rexnet.toml, ~/.config/rexnet/config.toml, "
                     "/etc/rexnet/config.toml; or $REXNET_CONFIG)")
    sub = top.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True

    kg = sub.add_parser("keygen", help="make an application's credentials",
                        description="Make APP.ca, APP.worker and APP.client (mode 0600), or "
                        "with --issue, another credential from APP.ca.")
    kg.add_argument("target", metavar="APP | APP.ca",
                    help="application name, or with --issue the CA file")
    kg.add_argument("--dir", "-d", metavar="DIR", help="where to write (default: . or, with "
                    "--issue, beside the CA file)")
    kg.add_argument("--issue", choices=["client", "worker"],
                    help="issue one more credential of this role from APP.ca")
    kg.add_argument("--name", metavar="NAME", help="holder's name for --issue (a user or host)")
    kg.add_argument("--out", "-o", metavar="FILE", help="file for --issue "
                    "(default: APP.NAME.ROLE)")
    kg.add_argument("--days", type=int, default=3650, help="validity in days (default 3650)")
    kg.add_argument("--revoke", metavar="NAME|FILE", help="revoke every credential issued "
                    "to NAME (as recorded in APP.issued), or the credential FILE: adds it to "
                    "APP.revoked beside APP.ca")
    kg.set_defaults(func=cmd_keygen)

    ex = sub.add_parser("exec", help="run a job on the cluster",
                        description="Announce a job of KEYFILE's application, run it on the "
                        "first authenticated worker to connect back, stream stdin, stdout and "
                        "stderr, and exit with the job's status.",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        epilog=EXIT_CODES_HELP)
    exec_arguments(ex)
    ex.set_defaults(func=cmd_exec)

    par = sub.add_parser("parallel", help="run one job per input across the cluster",
                         description="Run one job per input across the cluster, in the way "
                         "of GNU parallel: rexnet parallel KEYFILE [options] -- ARG... ::: "
                         "VALUE...  (or with the inputs one a line on stdin)",
                         formatter_class=argparse.RawDescriptionHelpFormatter,
                         epilog=PARALLEL_HELP)
    par.add_argument("keyfile", metavar="KEYFILE", help="the application's client credential "
                     "or the NAME of an application in rexnet.toml")
    par.add_argument("args", metavar="ARG", nargs="*",
                     help="the jobs' extra arguments ({} is the input), then ::: and the "
                     "inputs")
    par.add_argument("-j", "--jobs", type=int, metavar="N",
                     help="run at most N jobs at once (default: this host's CPU count; "
                     "more than the cluster's free slots makes jobs wait for a worker, up "
                     "to --timeout)")
    par.add_argument("-k", "--keep-order", action="store_true",
                     help="write the jobs' outputs in the order of the inputs")
    par.add_argument("--retries", type=int, default=0, metavar="N",
                     help="run a job again (up to N times) if its worker is lost before it "
                     "wrote any output; a job that wrote output is never rerun")
    par.add_argument("--revoked", metavar="FILE", help="refuse workers whose certificates "
                     "are listed in FILE (rexnet keygen --revoke; default: APP.revoked "
                     "beside KEYFILE, if there is one)")
    par.add_argument("-a", "--announce", metavar="ADDR[:PORT]", action="append", default=[],
                     help="where to announce the jobs (as for exec)")
    par.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                     help="fail a job if no worker takes it within this time (default: as "
                     "for exec, 30)")
    par.add_argument("-v", "--verbose", action="store_true",
                     help="say on stderr which worker took each job and why")
    par.add_argument("--alerts", metavar="ADDR[:PORT]", action="append", default=[],
                     help="send signed alerts to crat there (as for exec)")
    par.add_argument("-e", "--env", metavar="NAME[=VALUE]", action="append", default=[],
                     help="set a variable in every job's environment, if the worker "
                     "accepts it (as for exec)")
    par.set_defaults(func=cmd_parallel)

    st = sub.add_parser("status", help="show the cluster's workers, their load and slots",
                        description="Ask every worker of KEYFILE's application (a signed "
                        "query to the announce targets) for its name, load, CPUs, speed, "
                        "slots, free memory, jobs run, uptime and version. Exits 254 if no "
                        "worker answered.")
    st.add_argument("keyfile", metavar="KEYFILE", help="the application's client credential "
                    "or the NAME of an application in rexnet.toml")
    st.add_argument("-a", "--announce", metavar="ADDR[:PORT]", action="append", default=[],
                    help="where to send the query (as for exec; default: $GROUP, else "
                    f"{DEFAULT_ANNOUNCE}, port 3010)")
    st.add_argument("--json", action="store_true", help="print JSON instead of a table")
    st.add_argument("--watch", metavar="SECONDS", type=float, nargs="?", const=2.0,
                    help="refresh every SECONDS (default 2) until interrupted, marking "
                    "workers that stopped answering")
    st.add_argument("--wait", metavar="SECONDS", type=float, default=1.0,
                    help="how long to collect answers each round (default 1)")
    st.set_defaults(func=cmd_status)

    ag = sub.add_parser("agent", help="run the client agent that `rexnet exec` uses",
                        description="The client agent keeps credentials and warm channels "
                        "to workers for `rexnet exec`, which passes it its descriptors over "
                        "a Unix socket (one agent per user and network namespace). exec "
                        "starts one on demand; it stops after --idle-timeout.",
                        epilog="socket: $REXNET_AGENT_SOCKET, else "
                        "$XDG_RUNTIME_DIR/rexnet/agent-NETNS.sock, else "
                        "/tmp/rexnet-UID/agent-NETNS.sock; its log is beside it (.log)")
    ag.add_argument("--socket", metavar="PATH", help="the agent's socket (default: see below)")
    ag.add_argument("--foreground", action="store_true",
                    help="stay in the foreground, logging to stderr")
    ag.add_argument("--stop", action="store_true", help="stop the agent at the socket")
    ag.add_argument("--idle-timeout", type=float, default=600.0, metavar="SECONDS",
                    help="stop after this long without a launcher (default 600)")
    ag.set_defaults(func=cmd_agent)
    return top


def cmd_agent(args: argparse.Namespace) -> int:
    if args.idle_timeout <= 0:
        fail("--idle-timeout must be positive", exitcodes.USAGE)
    from rexnet.agent import server as agent

    return agent.command(args.socket, args.foreground, args.stop, args.idle_timeout)


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.config:
        os.environ["REXNET_CONFIG"] = args.config
    code: int = args.func(args)
    return code


def cexec_main(argv: Sequence[str] | None = None) -> int:
    """`cexec KEYFILE [ARG...]`: the same as `rexnet exec`."""
    p = Parser(prog="cexec", description="Run a job on the cluster (alias of rexnet exec).",
               formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXIT_CODES_HELP)
    p.add_argument("--version", action="version", version=f"rexnet {__version__}")
    exec_arguments(p)
    args = p.parse_args(argv)
    return cmd_exec(args)


if __name__ == "__main__":
    sys.exit(main())
