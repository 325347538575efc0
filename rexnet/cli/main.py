"""The full `rexnet` command line (and its `cexec` alias): its parser, and the subcommands
keygen (rexnet.cli.keygen), exec (rexnet.cli.execute), parallel (rexnet.cli.parallel),
status (rexnet.cli.status), jobs, attach, output and cancel (rexnet.cli.jobs) and agent.

The thin launcher (rexnet.cli.launcher) calls this for everything but an ordinary
`rexnet exec`. Heavy modules (Twisted, cryptography) are imported inside the subcommands,
so that `rexnet --help` is quick.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from rexnet.cli import execute, jobs, keygen, parallel, status
from rexnet.cli.usage import Parser, fail
from rexnet.protocol import exitcodes
from rexnet.version import __version__


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

    keygen.add_parser(sub)
    execute.add_parser(sub)
    parallel.add_parser(sub)
    status.add_parser(sub)
    jobs.add_parsers(sub)

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
    args = execute.cexec_parser().parse_args(argv)
    return execute.cmd_exec(args)


if __name__ == "__main__":
    sys.exit(main())
