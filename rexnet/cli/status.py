"""`rexnet status`: the cluster's workers, their load and slots (once, or --watch)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rexnet.cli.request import application
from rexnet.cli.usage import Parser, fail
from rexnet.protocol import exitcodes
from rexnet.protocol.request import DEFAULT_ANNOUNCE, MAX_CPUS, RequestError, parse_size


def cmd_status(args: argparse.Namespace) -> int:
    from rexnet.client.cluster import announce_addresses

    try:
        application(vars(args))
        targets = announce_addresses(args.announce)
    except RequestError as e:
        fail(e.message, e.exit_code)
    if args.wait <= 0 or (args.watch is not None and args.watch < args.wait):
        fail("--wait must be positive and no longer than --watch", exitcodes.USAGE)
    if not 1 <= args.cpus <= MAX_CPUS:
        fail(f"--cpus takes 1 to {MAX_CPUS}", exitcodes.USAGE)
    try:
        mem = parse_size(args.mem) if args.mem is not None else 0
    except ValueError as e:
        fail(f"--mem: {e}", exitcodes.USAGE)
    from rexnet.security.credentials import CredentialError, load_credential
    from rexnet.security.revocation import open_list

    try:
        credential = load_credential(Path(args.keyfile), "client")
        revoked = open_list(None, Path(args.keyfile), credential.app)
    except CredentialError as e:
        fail(str(e), exitcodes.CREDENTIAL)

    from twisted.internet import reactor, task

    from rexnet.client.status import Seen, StatusQuery, as_json, best, merge, table
    from rexnet.protocol.text import printable

    known: dict[tuple[str, str], Seen] = {}
    outcome = {"answered": False}

    async def rounds() -> None:
        query = StatusQuery(reactor, credential, targets, revoked=revoked)
        while True:
            fresh = await query.run(args.wait)
            seen = merge(known, fresh) if args.watch is not None else fresh
            outcome["answered"] = outcome["answered"] or bool(fresh)
            if args.best:
                chosen = best(seen, args.cpus, mem)
                outcome["answered"] = chosen is not None
                if chosen is None:
                    print(f"rexnet: no worker with room for the job answered within "
                          f"{args.wait:g} s", file=sys.stderr)
                else:
                    print(as_json([chosen]) if args.json else printable(chosen.reply.worker),
                          flush=True)
            elif args.json:
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


def add_parser(sub: argparse._SubParsersAction[Parser]) -> None:
    st = sub.add_parser("status", help="show the cluster's workers, their load and slots",
                        description="Ask every worker of KEYFILE's application (a signed "
                        "query to the announce targets) for its name, load, CPUs, speed, "
                        "slots in use (jobs count their --cpus), free memory, jobs run, "
                        "uptime and version. Exits 254 if no worker answered.")
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
    st.add_argument("--best", action="store_true",
                    help="print only the name of the worker a job would go to now (of those "
                    "with room for it, the one that would answer first), as dsh's best node")
    st.add_argument("--cpus", metavar="N", type=int, default=1,
                    help="with --best: a job that takes N slots")
    st.add_argument("--mem", metavar="SIZE", help="with --best: a job that needs SIZE of "
                    "free memory (K, M, G, T)")
    st.set_defaults(func=cmd_status)
