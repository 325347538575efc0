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
from collections.abc import Mapping, Sequence
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


def user_variables(uid: int) -> dict[str, str]:
    """HOME, USER and LOGNAME of the user UID (HOME=/ alone if it has no passwd entry)."""
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:
        return {"HOME": "/"}
    return {"HOME": entry.pw_dir or "/", "USER": entry.pw_name, "LOGNAME": entry.pw_name}
