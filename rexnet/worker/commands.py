"""Command workers: which program a client may name, resolved by the worker itself.

`twistd rexnet-worker --commands PATTERN ... KEYFILE` (or `--any-command`) runs the
program the client names (`rexnet exec APP -- cc -c foo.c`) instead of a fixed COMMAND.
The rules, so that no path trick gets around the allow-list:

- A bare name (``cc``) is looked up in the worker's own search path (its PATH when it
  started, never the job's environment, which a client may influence), giving an absolute
  path. It is allowed if a pattern without a slash matches the name, or a pattern with one
  matches that absolute path.
- An absolute path must be normal (no ``..``, ``.``, ``//``) and is allowed if a pattern
  with a slash matches it, or if a name pattern matches its last part *and* the worker's
  own lookup of that name gives this very path (``/tmp/evil/cc`` is no ``cc``).
- A relative path with a slash (``./x``, ``../bin/sh``) is refused, except with
  --any-command (then it is the client's to choose, resolved in the job's directory).

Patterns are shell wildcards (fnmatch, case-sensitive). The outcome is the argv[0] to
execute (absolute unless --any-command passed a relative path through) or a Refusal.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
from dataclasses import dataclass

DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"


@dataclass(frozen=True)
class CommandRefused:
    """Why a program may not run: REASON "command" (not allowed) or "not-found"."""

    reason: str
    message: str


@dataclass(frozen=True)
class CommandPolicy:
    """An allow-list of programs (PATTERNS), or ANY program; SEARCH is the worker's own
    search path for bare names."""

    patterns: tuple[str, ...] = ()
    any: bool = False
    search: str = DEFAULT_PATH

    @classmethod
    def of(cls, patterns: tuple[str, ...], any_command: bool,
           environ: dict[str, str] | None = None) -> CommandPolicy:
        """The policy of the worker's options, searching the worker's PATH."""
        env = os.environ if environ is None else environ
        return cls(patterns, any_command, env.get("PATH") or DEFAULT_PATH)

    @property
    def enabled(self) -> bool:
        """Whether the client names the program (a command worker)."""
        return self.any or bool(self.patterns)

    def _names(self) -> tuple[str, ...]:
        return tuple(p for p in self.patterns if "/" not in p)

    def _paths(self) -> tuple[str, ...]:
        return tuple(p for p in self.patterns if "/" in p)

    def lookup(self, name: str) -> str | None:
        """NAME's absolute path in the worker's search path, or None."""
        found = shutil.which(name, path=self.search)
        return os.path.abspath(found) if found else None

    def resolve(self, program: str) -> str | CommandRefused:
        """The argv[0] to run for the client's PROGRAM, or why not."""
        shown = program if len(program) <= 200 else program[:200] + "..."
        if not program or "\0" in program:
            return CommandRefused("command", "no program named: give one after --, as in "
                                  "`rexnet exec APP -- cc -c foo.c`")
        if "/" not in program:
            path = self.lookup(program)
            allowed = self.any or any(fnmatch.fnmatchcase(program, p) for p in self._names()
                                      ) or (path is not None and self._path_allowed(path))
            if not allowed:
                return self._not_allowed(shown)
            if path is None:
                return CommandRefused("not-found", f"{shown}: command not found on this "
                                      "worker")
            return path
        if not program.startswith("/"):
            if self.any:
                return program
            return CommandRefused("command", f"{shown}: not an allowed command (a relative "
                                  "path: name the program, or give its absolute path)")
        if os.path.normpath(program) != program or program.startswith("//"):
            return CommandRefused("command", f"{shown}: not an allowed command (not a normal "
                                  "absolute path)")
        name = os.path.basename(program)
        allowed = self.any or self._path_allowed(program) or (
            any(fnmatch.fnmatchcase(name, p) for p in self._names())
            and self.lookup(name) == program)
        if not allowed:
            return self._not_allowed(shown)
        if not (os.path.isfile(program) and os.access(program, os.X_OK)):
            return CommandRefused("not-found", f"{shown}: no such program on this worker")
        return program

    def _path_allowed(self, path: str) -> bool:
        return any(fnmatch.fnmatchcase(path, p) for p in self._paths())

    def _not_allowed(self, shown: str) -> CommandRefused:
        listed = ", ".join(self.patterns) if self.patterns else "none"
        return CommandRefused("command", f"{shown}: not an allowed command on this worker "
                              f"(its --commands: {listed[:300]})")
