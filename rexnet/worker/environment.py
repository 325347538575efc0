"""A job's environment: a minimal base, what the worker's configuration names
(--job-env), and the client's variables that its --accept-env patterns accept.

A job never inherits the worker's whole environment (a secret there must not reach a job),
and a client never sets a variable that changes how programs are loaded or how shells and
interpreters start (NEVER), whatever the patterns say: such a request refuses the job.
"""

from __future__ import annotations

import fnmatch
import os
import pwd
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

BASE_PATH = "/usr/local/bin:/usr/bin:/bin"

# Loader, shell and interpreter hooks, and the job's identity: never from a client.
NEVER: tuple[str, ...] = (
    "LD_*", "DYLD_*", "GCONV_PATH", "GLIBC_TUNABLES", "MALLOC_*", "LOCPATH", "NLSPATH",
    "HOSTALIASES", "RESOLV_HOST_CONF", "RES_OPTIONS", "LOCALDOMAIN",
    "PATH", "ENV", "BASH_ENV", "BASH_FUNC_*", "IFS", "SHELLOPTS", "BASHOPTS", "PS4",
    "PROMPT_COMMAND", "CDPATH", "GLOBIGNORE", "SHELL",
    "PYTHON*", "PERL5*", "PERLLIB", "RUBYOPT", "RUBYLIB", "NODE_OPTIONS", "NODE_PATH",
    "JAVA_TOOL_OPTIONS", "_JAVA_OPTIONS", "JDK_JAVA_OPTIONS", "CLASSPATH", "LUA_INIT*",
    "LUA_PATH*", "LUA_CPATH*", "TCLLIBPATH", "TERMINFO", "TERMINFO_DIRS", "TERMCAP",
    "HOME", "USER", "LOGNAME", "REXNET_*",
)


def never_accepted(name: str) -> bool:
    """Whether NAME is a variable no client may set (NEVER)."""
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in NEVER)


def parse_job_env(spec: str) -> tuple[str, str | None]:
    """--job-env NAME[=VALUE] as (NAME, VALUE or None: the worker's own value)."""
    name, equals, value = spec.partition("=")
    if not name or "\0" in spec or any(c.isspace() for c in name):
        raise ValueError(f"bad variable {spec!r}: use NAME or NAME=VALUE")
    return name, value if equals else None


@dataclass(frozen=True)
class Requested:
    """A client's variables, sorted: those set, those refused by the patterns, and those
    no pattern can allow."""

    accepted: dict[str, str]
    refused: tuple[str, ...]
    forbidden: tuple[str, ...]

    def forbidden_message(self) -> str:
        names = ", ".join(self.forbidden)
        return (f"this worker never lets a client set {names}: such variables change how "
                "programs are loaded or how shells and interpreters start (whatever its "
                "--accept-env says); the job was not run")


@dataclass(frozen=True)
class EnvPolicy:
    """ACCEPT: the --accept-env patterns; CONFIGURED: the --job-env variables (a value
    of None passes the worker's own value, if it has one)."""

    accept: tuple[str, ...] = ()
    configured: tuple[tuple[str, str | None], ...] = ()

    def accepts(self, name: str) -> bool:
        return not never_accepted(name) and any(
            fnmatch.fnmatchcase(name, pattern) for pattern in self.accept)

    def sort(self, requested: Sequence[tuple[str, str]]) -> Requested:
        accepted = {k: v for k, v in requested if self.accepts(k)}
        forbidden = tuple(dict.fromkeys(k for k, _ in requested if never_accepted(k)))
        refused = tuple(k for k, _ in requested if k not in accepted and k not in forbidden)
        return Requested(accepted, refused, forbidden)

    def build(self, accepted: Mapping[str, str], fixed: Mapping[str, str], *,
              uid: int | None = None, term: str | None = None,
              source: Mapping[str, str] = os.environ) -> dict[str, str]:
        """The environment of a job run as UID (default: this process's) with the
        client's ACCEPTED variables and FIXED ones (REXNET_JOB_ID and the like, which win);
        TERM for a job in a terminal; SOURCE is the worker's own environment."""
        env = {"PATH": BASE_PATH, **user_variables(os.getuid() if uid is None else uid)}
        if "LANG" in source:
            env["LANG"] = source["LANG"]
        for name, value in self.configured:
            if value is not None:
                env[name] = value
            elif name in source:
                env[name] = source[name]
        env.update(accepted)
        if term is not None:
            env["TERM"] = term or "dumb"
        env.update(fixed)
        return env


def passwd_variables(uid: int) -> dict[str, str]:
    """HOME, USER and LOGNAME of the user UID (HOME=/ alone if it has no passwd entry)."""
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:
        return {"HOME": "/"}
    return {"HOME": entry.pw_dir or "/", "USER": entry.pw_name, "LOGNAME": entry.pw_name}


class UserVariables:
    """passwd_variables per uid, kept until the passwd file changes: one stat of PATH at
    most every CHECK_EVERY seconds (by CLOCK) tells; a change of its inode, size or
    modification time forgets every entry (an edit, or a new file moved in place), and so
    does MAX_AGE seconds (for entries from elsewhere than the file: NSS's LDAP, sssd). At
    most LIMIT uids are kept. LOOKUP reads an entry (pwd, through the system's NSS)."""

    CHECK_EVERY = 1.0
    MAX_AGE = 60.0
    LIMIT = 256

    def __init__(self, path: str = "/etc/passwd",
                 lookup: Callable[[int], dict[str, str]] = passwd_variables,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path, self.lookup, self.clock = path, lookup, clock
        self._seen: tuple[int, int, int] | None = None  # the file's (inode, size, mtime)
        self._checked = self._cleared = float("-inf")
        self._entries: dict[int, dict[str, str]] = {}

    def _identity(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_ino, st.st_size, st.st_mtime_ns

    def __call__(self, uid: int) -> dict[str, str]:
        now = self.clock()
        if now - self._checked >= self.CHECK_EVERY:
            self._checked = now
            seen = self._identity()
            if seen is None or seen != self._seen or now - self._cleared >= self.MAX_AGE:
                self._entries.clear()
                self._cleared = now
            self._seen = seen
        entry = self._entries.get(uid)
        if entry is None:
            entry = self.lookup(uid)
            if self._seen is not None:  # (no passwd file to watch: nothing kept)
                if len(self._entries) >= self.LIMIT:
                    self._entries.clear()
                self._entries[uid] = entry
        return dict(entry)  # (a copy: the caller's environment is its own)


user_variables = UserVariables()
"""The worker's passwd look-ups (one per job before the spawn, from the cache)."""
