"""What every subcommand of the full command line shares: its argparse parser (with
rexnet's usage exit status) and how it fails."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from rexnet.protocol import exitcodes


class Parser(argparse.ArgumentParser):
    """argparse with rexnet's usage exit code and a one-line error."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(exitcodes.USAGE, f"{self.prog}: error: {message}\n")


def fail(message: str, code: int) -> NoReturn:
    """End the command: "rexnet: MESSAGE" on stderr, exit status CODE."""
    print(f"rexnet: {message}", file=sys.stderr)
    raise SystemExit(code)
