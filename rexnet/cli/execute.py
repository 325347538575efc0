"""`rexnet exec` (and `cexec`) without the agent: this process finds the worker itself.

The launcher (rexnet.cli.launcher) sends ordinary command lines to the agent; this runs the
others (--no-agent, REXNET_NO_AGENT=1, no agent could start) and reports every mistake
of a command line, in the same words as the agent would (rexnet.cli.request builds the
request, rexnet.client.cluster.Cluster finds its credential and targets, for both).
"""

from __future__ import annotations

import argparse
import contextlib
import sys

from rexnet.cli.request import build
from rexnet.cli.usage import Parser, fail
from rexnet.protocol import exitcodes
from rexnet.protocol.request import DEFAULT_ANNOUNCE, FORWARDED, ExecRequest, RequestError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from rexnet.client.cluster import Cluster  # Twisted: imported when a job runs

EXIT_CODES_HELP = "exit status: the job's own (128+N if killed by signal N), or\n" + "\n".join(
    f"  {code}  {text}" for code, text in sorted(exitcodes.DESCRIPTIONS.items())
)


def cmd_exec(args: argparse.Namespace) -> int:
    from rexnet.client.cluster import Cluster

    try:
        request = build(vars(args))
        cluster = Cluster.for_request(request)
    except RequestError as e:
        fail(e.message, e.exit_code)
    if getattr(args, "all", False):
        from rexnet.cli.everywhere import run_everywhere

        return run_everywhere(request, cluster, args.wait, prefix=not args.no_prefix)
    if getattr(args, "no_prefix", False):
        fail("--no-prefix goes with --all", exitcodes.USAGE)
    return run_job(request, cluster)


def run_job(request: ExecRequest, cluster: Cluster) -> int:
    """Run REQUEST on CLUSTER in this process: the
    terminal in raw mode if the job has one, signals forwarded; the exit status."""
    import signal

    from twisted.internet import reactor
    from twisted.internet.fdesc import setBlocking
    from twisted.logger import globalLogBeginner

    from rexnet.client.results import JobFailed, JobResult
    from rexnet.client.terminal import raw_mode, window_size
    from rexnet.logs import stderr_observer

    globalLogBeginner.beginLoggingTo([stderr_observer(request.verbose)],
                                     redirectStandardIO=False)
    raw = {"on": False}

    def say(message: str) -> None:
        if request.verbose:
            end = "\r\n" if raw["on"] else "\n"
            print(f"rexnet: {message}", file=sys.stderr, end=end, flush=True)

    try:
        job = cluster.job(reactor, request, say=say)
    except RequestError as e:  # a --put file that cannot be read
        print(f"rexnet: {e.message}", file=sys.stderr)
        return e.exit_code
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

    for name in FORWARDED:
        signal.signal(getattr(signal, name), forward)
    if request.tty:
        signal.signal(signal.SIGWINCH, resized)
    reactor.callWhenRunning(lambda: job.run().addBoth(done))  # type: ignore[attr-defined]
    with raw_mode(0) if request.tty else contextlib.nullcontext(False) as on:
        raw["on"] = bool(on)
        reactor.run(installSignalHandlers=False)  # type: ignore[attr-defined,call-arg]
    for fd in (0, 1, 2, *(number for number, _ in request.fds)):
        with contextlib.suppress(OSError):
            setBlocking(fd)
    result = outcome.get("result")
    if isinstance(result, JobResult) and request.detach:
        print(result.job, flush=True)  # `rexnet jobs|attach|output|cancel JOB` take it
        say(f"job {result.job} runs detached on worker {result.worker}")
        return 0
    if isinstance(result, JobResult):
        return result.status
    error = getattr(result, "value", None)
    if isinstance(error, JobFailed):
        print(f"rexnet: {error}", file=sys.stderr)
        return error.exit_code
    print(f"rexnet: internal error: {result}", file=sys.stderr)
    return exitcodes.WORKER_LOST


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
    p.add_argument("--queue-timeout", type=float, default=None, metavar="SECONDS",
                   help="give up if the job waited this long in a busy worker's queue "
                   "(default: no limit; --timeout bounds finding a worker)")
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
    p.add_argument("--cwd", metavar="DIR", help="run the job in DIR on the worker (a command "
                   "worker: --commands); default: this directory, if the worker has the "
                   "same path, else the worker's own; a worker without DIR refuses the job")
    p.add_argument("--cpus", metavar="N", type=int, default=1,
                   help="the job takes N slots: only a worker with N free answers (default 1)")
    p.add_argument("--mem", metavar="SIZE", help="only a worker with SIZE of free memory "
                   "answers (bytes, or a number with K, M, G or T)")
    p.add_argument("--worker", metavar="NAME", action="append", default=[],
                   help="only the worker called NAME may run the job (repeatable, at most 8)")
    p.add_argument("--all", action="store_true",
                   help="run the job on every worker that answers `rexnet status` within "
                   "--wait (or those --worker names), each line of output prefixed with "
                   "the worker's name; exit with the highest status")
    p.add_argument("--no-prefix", action="store_true",
                   help="with --all: print each worker's output as one block under a header "
                   "(as dshbak), not line by line with its name")
    p.add_argument("--wait", metavar="SECONDS", type=float, default=1.0,
                   help="with --all: how long to collect the workers' answers (default 1)")
    p.add_argument("--detach", action="store_true",
                   help="start the job, print its id and return: the worker keeps its "
                   "output (see rexnet jobs, attach, output, cancel)")
    p.add_argument("--put", metavar="FILE", action="append", default=[],
                   help="send FILE into the job's fresh working directory (repeatable)")
    p.add_argument("--get", metavar="PATTERN", action="append", default=[],
                   help="bring the files matching PATTERN back from the job's directory "
                   "when it ends, into the current directory (repeatable)")
    p.add_argument("--force", action="store_true",
                   help="let --get replace files that exist here")
    p.add_argument("--no-agent", action="store_true",
                   help="run without the agent (as does REXNET_NO_AGENT=1): this process "
                   "finds the worker itself (see `rexnet agent --help`)")


def add_parser(sub: argparse._SubParsersAction[Parser]) -> None:
    ex = sub.add_parser("exec", help="run a job on the cluster",
                        description="Announce a job of KEYFILE's application, run it on the "
                        "first authenticated worker to connect back, stream stdin, stdout and "
                        "stderr, and exit with the job's status.",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        epilog=EXIT_CODES_HELP)
    exec_arguments(ex)
    ex.set_defaults(func=cmd_exec)


def cexec_parser() -> argparse.ArgumentParser:
    """`cexec`'s parser: `rexnet exec` under cexec's name (its page is cexec(1))."""
    from rexnet.version import __version__

    p = Parser(prog="cexec", description="Run a job on the cluster (cexec, the alias of "
               "rexnet exec, as the cexec 1.26 suite named its client).",
               formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXIT_CODES_HELP)
    p.add_argument("--version", action="version", version=f"rexnet {__version__}")
    exec_arguments(p)
    return p
