"""The launcher's own reading of `rexnet exec`'s command line agrees with argparse's (the
full command line), or leaves the command line to it."""

from __future__ import annotations

import contextlib
import io

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rexnet.cli import launcher
from rexnet.cli import main as cli

TOKENS = st.sampled_from(["-v", "-t", "-T", "-vT", "-tv", "--verbose", "--no-agent", "-a",
                          "--announce", "--announce=h:1", "-ah:2", "--timeout", "--timeout=2",
                          "--alerts", "--fd", "--fd=4", "-e", "-eA=1", "--env", "--env=B",
                          "--", "-", "key", "x", "-x", "--bogus", "3", "1.5", "h:3", "-h",
                          "--time", "-1", "C=2", "--revoked", "--revoked=r", "--cwd",
                          "--cwd=/d", "--cpus", "--cpus=2", "--mem", "--mem=1G", "--worker",
                          "--worker=w", "--all", "--no-prefix", "--queue-timeout",
                          "--queue-timeout=4"])


def argparse_reading(tokens: list[str]) -> dict[str, object] | None:
    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            args = cli.parser().parse_args(["exec", *tokens])
    except SystemExit:
        return None
    return {"keyfile": args.keyfile, "args": args.args, "announce": args.announce,
            "alerts": args.alerts, "timeout": args.timeout, "verbose": args.verbose,
            "tty": args.tty, "no_tty": args.no_tty, "fd": args.fd, "env": args.env,
            "no_agent": args.no_agent, "revoked": args.revoked or "", "cwd": args.cwd,
            "mem": args.mem, "cpus": args.cpus, "worker": args.worker,
            "queue_timeout": args.queue_timeout}


@settings(max_examples=1500)
@given(st.lists(TOKENS, max_size=8))
def test_what_the_launcher_reads_argparse_reads_the_same(tokens: list[str]) -> None:
    ours = launcher.parse(tokens)
    if ours is None:
        return  # left to argparse, which runs the command (standalone) or says what is wrong
    assert argparse_reading(tokens) == ours, tokens


@pytest.mark.parametrize("tokens", [
    ["-v", "key"], ["--announce", "h:1", "-T", "key", "--", "a", "-b"],
    ["--timeout=5", "--fd", "4", "-eA=1", "key", "x", "y"], ["-vT", "key"],
    ["--cwd", "/src", "--cpus", "2", "--mem=1G", "--worker", "w1", "key", "--", "cc"],
])
def test_ordinary_command_lines_go_through_the_agent(tokens: list[str]) -> None:
    assert launcher.parse(tokens) is not None
    assert launcher.parse(tokens) == argparse_reading(tokens)


@pytest.mark.parametrize("tokens", [
    ["--help"], ["-h"], [], ["--bogus", "key"], ["--time", "5", "key"], ["key", "-v", "x"],
    ["--timeout", "soon", "key"], ["--no-agent", "key"],
])
def test_unusual_command_lines_go_to_the_full_parser(tokens: list[str]) -> None:
    opts = launcher.parse(tokens)
    assert opts is None or opts["no_agent"]
