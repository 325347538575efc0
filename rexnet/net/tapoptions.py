"""What every twistd service's options share: `--version` (rexnet's own parser has argparse's)."""

from __future__ import annotations

import sys

from twisted.python import usage

from rexnet.version import __version__


class VersionOption(usage.Options):
    """usage.Options with --version: prints rexnet's version and exits."""

    def opt_version(self) -> None:
        """Print rexnet's version and exit."""
        from twisted import __version__ as twisted_version

        print(f"rexnet {__version__} (Twisted {twisted_version})")
        sys.exit(0)
