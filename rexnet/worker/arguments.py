"""Which extra arguments a client may append to the worker's COMMAND.

Appended raw (--allow-args), an argument is option and file injection: `cat` given the
worker's key file prints it. --allow-arg PATTERN lists what may come instead: each argument
must match one pattern, as the shell matches file names (`*`, `?` and `[...]` never match
a `/`, nor a `.` that starts a name), so `*.csv` accepts `a.csv` but not `../a.csv` or
`/etc/x.csv`; write `[!-]*` to accept no option.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass


def matches(arg: str, pattern: str) -> bool:
    """Whether ARG matches PATTERN name by name ('/'-separated), with a leading '.' of a
    name matched only by a literal '.' (FNM_PATHNAME | FNM_PERIOD)."""
    names, wanted = arg.split("/"), pattern.split("/")
    if len(names) != len(wanted):
        return False
    for name, want in zip(names, wanted, strict=True):
        if name.startswith(".") and not want.startswith("."):
            return False
        if not fnmatch.fnmatchcase(name, want):
            return False
    return True


@dataclass(frozen=True)
class ArgPolicy:
    """ANY: --allow-args (every argument); PATTERNS: --allow-arg (each must match one)."""

    any: bool = False
    patterns: tuple[str, ...] = ()

    @property
    def allows_args(self) -> bool:
        return self.any or bool(self.patterns)

    def refusal(self, args: Sequence[str]) -> str | None:
        """Why ARGS may not be appended, or None."""
        if not args:
            return None
        if not self.allows_args:
            return ("this worker does not accept extra arguments (its administrator can "
                    "allow them with --allow-arg PATTERN or --allow-args)")
        if not self.patterns:
            return None
        for arg in args:
            if not any(matches(arg, pattern) for pattern in self.patterns):
                shown = arg if len(arg) <= 80 else arg[:77] + "..."
                return (f"this worker does not accept the argument {shown!r}: each must "
                        f"match one of its --allow-arg patterns "
                        f"({', '.join(self.patterns)})")
        return None

    def warning(self) -> str | None:
        """A start-up warning when any argument goes (--allow-args without patterns)."""
        if self.any and not self.patterns:
            return ("--allow-args appends any argument a client sends to the command: "
                    "options and file names included (a file the jobs' user can read, "
                    "such as a key, can be printed); list what may come with --allow-arg "
                    "PATTERN")
        return None
