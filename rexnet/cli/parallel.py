"""`rexnet parallel`: one job per input across the cluster, in the way of GNU parallel."""

from __future__ import annotations

import argparse
import os
import sys

from rexnet.cli.request import build
from rexnet.cli.usage import Parser, fail
from rexnet.protocol import exitcodes
from rexnet.protocol.request import RequestError


def cmd_parallel(args: argparse.Namespace) -> int:
    from rexnet.client import parallel
    from rexnet.client.cluster import Cluster

    try:  # the options it shares with exec, read as exec reads them
        request = build({**vars(args), "args": [], "no_tty": True})
    except RequestError as e:
        fail(e.message, e.exit_code)
    if args.jobs is not None and args.jobs < 1:
        fail("--jobs must be at least 1", exitcodes.USAGE)
    if args.retries < 0:
        fail("--retries must be 0 or more", exitcodes.USAGE)
    try:
        template, values = parallel.split_arguments(args.args)
    except ValueError as e:
        fail(str(e), exitcodes.USAGE)
    try:
        cluster = Cluster.for_request(request)
    except RequestError as e:
        fail(e.message, e.exit_code)
    if values is None:
        values = parallel.read_inputs(sys.stdin)
    return parallel.main(cluster, template, values, args.jobs or os.cpu_count() or 1,
                         args.keep_order, args.retries, request.env, args.verbose)


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


def add_parser(sub: argparse._SubParsersAction[Parser]) -> None:
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
