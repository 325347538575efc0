"""`rexnet jobs`, `attach`, `output` and `cancel`: jobs across the cluster, like squeue,
and detached jobs (`rexnet exec --detach`) from any terminal (rexnet.client.calls)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from rexnet.cli.request import application
from rexnet.cli.usage import Parser, fail
from rexnet.protocol import exitcodes
from rexnet.protocol.request import DEFAULT_ANNOUNCE, ExecRequest, RequestError

ACTIONS = {"attach": "attach", "output": "output", "cancel": "cancel"}


def signal_number(text: str) -> int:
    """--signal TERM, SIGTERM or 15 as a number (argparse type)."""
    import signal

    if text.isdigit() and 1 <= int(text) <= 64:
        return int(text)
    name = text.upper() if text.upper().startswith("SIG") else f"SIG{text.upper()}"
    number = getattr(signal.Signals, name, None) if name.isidentifier() else None
    if number is None:
        raise argparse.ArgumentTypeError(f"no such signal: {text}")
    return int(number)


def _cluster(args: argparse.Namespace) -> Any:
    from rexnet.client.cluster import Cluster

    values = vars(args)
    try:
        application(values)
        if not 0 < float(values["timeout"]) < 1e9:
            raise RequestError("--timeout must be positive", exitcodes.USAGE)
        job = values.get("job", "")
        if len(job) > 64 or not all(c in "0123456789abcdef" for c in job):
            raise RequestError(f"{job!r} is no job id (as rexnet jobs prints them)",
                               exitcodes.USAGE)
        request = ExecRequest(keyfile=args.keyfile, keypath=os.path.abspath(args.keyfile),
                              announce=tuple(args.announce), timeout=float(values["timeout"]),
                              revoked=os.path.abspath(args.revoked) if args.revoked else "")
        return Cluster.for_request(request)
    except RequestError as e:
        fail(e.message, e.exit_code)


def _react(run: Callable[[Any], Any]) -> Any:
    """Run RUN(reactor) (a Deferred) to its end; its result, or its Failure."""
    from twisted.internet import task

    outcome: dict[str, Any] = {}

    def main(r: Any) -> Any:
        d = run(r)
        d.addBoth(lambda result: outcome.__setitem__("result", result))
        return d.addBoth(lambda _: None)

    with contextlib.suppress(SystemExit):
        task.react(main)
    return outcome.get("result")


def _age(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def table(listed: Sequence[Any], now: float) -> str:
    """The jobs as a table (what workers say is escaped)."""
    from rexnet.protocol.text import printable

    head = ("JOB", "WORKER", "CLIENT", "STATE", "RUNTIME", "STATUS", "MODE", "COMMAND")
    rows = [head]
    for item in listed:
        for j in item.jobs.jobs:
            runtime = (j.ended or now) - j.started
            mode = "detached" if j.detached else "attached"
            if j.dropped:
                mode += f" ({j.dropped} B dropped)"
            rows.append((printable(j.job), printable(item.jobs.worker), printable(j.client),
                         j.state, _age(runtime), "" if j.status is None else str(j.status),
                         mode, printable(j.command)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                     for row in rows)


def cmd_jobs(args: argparse.Namespace) -> int:
    cluster = _cluster(args)
    from rexnet.client.calls import JobCaller

    caller: dict[str, Any] = {}

    def run(reactor: Any) -> Any:
        caller["c"] = JobCaller(reactor, cluster)
        return caller["c"].list(args.wait)

    result = _react(run)
    if not isinstance(result, list):
        print(f"rexnet: {getattr(result, 'value', result)}", file=sys.stderr)
        return exitcodes.NO_WORKER
    for complaint in caller["c"].complaints[-5:]:
        print(f"rexnet: complaint: {complaint}", file=sys.stderr)
    if args.json:
        print(json.dumps([{"worker": item.jobs.worker, "address": item.address,
                           **{k: getattr(j, k) for k in j.__dataclass_fields__}}
                          for item in result for j in item.jobs.jobs]))
    elif result:
        print(table(result, time.time()))
    else:
        print(f"no worker answered within {args.wait:g} s", file=sys.stderr)
        return exitcodes.NO_WORKER
    return 0


def cmd_job(args: argparse.Namespace) -> int:
    """attach, output and cancel: one job, its owner's (or an admin's) business."""
    cluster = _cluster(args)
    from twisted.logger import globalLogBeginner

    from rexnet.client.calls import JobCaller
    from rexnet.client.results import JobFailed
    from rexnet.client.streams import StdioStreams
    from rexnet.logs import stderr_observer
    from rexnet.protocol import wire

    globalLogBeginner.beginLoggingTo([stderr_observer(False)], redirectStandardIO=False)
    action = ACTIONS[args.command]

    def run(reactor: Any) -> Any:
        streams = StdioStreams(reactor) if action != "cancel" else None
        return JobCaller(reactor, cluster).act(args.job, action, streams,
                                               getattr(args, "signal", 0) or 0)

    result = _react(run)
    if isinstance(result, wire.JobState):
        if result.dropped:
            print(f"rexnet: {result.dropped} bytes of the job's output were not kept (the "
                  "worker's --detached-output)", file=sys.stderr)
        if action == "cancel":
            print(f"job {result.job}: {result.state}"
                  + (f", status {result.status}" if result.status is not None else ""))
            return 0
        if result.state == "running":
            return 0
        return result.status if result.status is not None else 0
    error = getattr(result, "value", result)
    print(f"rexnet: {error}", file=sys.stderr)
    return error.exit_code if isinstance(error, JobFailed) else exitcodes.WORKER_LOST


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("keyfile", metavar="KEYFILE", help="the application's client credential "
                   "or the NAME of an application in rexnet.toml")
    p.add_argument("-a", "--announce", metavar="ADDR[:PORT]", action="append", default=[],
                   help="where to send the call (as for exec; default: $GROUP, else "
                   f"{DEFAULT_ANNOUNCE}, port 3010)")
    p.add_argument("--revoked", metavar="FILE", help="refuse workers listed in FILE")


def add_parsers(sub: argparse._SubParsersAction[Parser]) -> None:
    jb = sub.add_parser("jobs", help="list running and recent jobs across the cluster",
                        description="Ask every worker of KEYFILE's application (a signed call; "
                        "each answers over mutual TLS) for its running jobs and those that "
                        "finished within its --keep-finished: id, worker, client, state, "
                        "runtime, exit status, command. Exits 254 if no worker answered.")
    _common(jb)
    jb.add_argument("--wait", metavar="SECONDS", type=float, default=1.0,
                    help="how long to collect answers (default 1)")
    jb.add_argument("--json", action="store_true", help="print JSON instead of a table")
    jb.set_defaults(func=cmd_jobs, timeout=None)
    for name, what in (("attach", "stream a detached job's output (from its start) and "
                        "feed it stdin while it reads it; exit with its status once it "
                        "ends (interrupting attach leaves the job running)"),
                       ("output", "print what a detached job wrote so far (all of it, once "
                        "it ended); exit with its status if it ended"),
                       ("cancel", "end a job (SIGTERM, then SIGKILL) or send it --signal")):
        p = sub.add_parser(name, help=what.split(";")[0].split(" (")[0], description=(
            f"{what[0].upper()}{what[1:]}. Only the credential that started the job, or an "
            "admin credential (rexnet keygen --issue admin), may."))
        _common(p)
        p.add_argument("job", metavar="JOB", help="the job's id (as rexnet exec --detach "
                       "and rexnet jobs print it)")
        p.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                       help="how long to wait for the job's worker (default 30)")
        if name == "cancel":
            p.add_argument("--signal", "-s", type=signal_number, default=0, metavar="SIG",
                           help="send SIG (a name or number) instead of ending the job")
        p.set_defaults(func=cmd_job)
