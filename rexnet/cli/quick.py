"""The launcher's fast path: the Exec message of an ordinary `rexnet exec` command line,
written directly, without rexnet.cli.request.build, ExecRequest or os.

message() reads the options rexnet.cli.launcher.parse gives and returns the very bytes
`agentwire.Exec(build(options), netns).encode()` would (tests hold the two equal), or
None for anything it leaves to that full path: an application's name (the
configuration), a terminal, --fd, --mem, a message longer than the agent takes, and any
value the full path would refuse or needs to look at more closely (it then says what is
wrong, in its own words). Its bounds are rexnet.protocol.request's (a test holds them
equal too).
"""

from __future__ import annotations

import posix

from rexnet.agent.paths import abspath
from rexnet.protocol.agentjson import AgentWireError, frame

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from typing import Any

DEFAULT_ANNOUNCE = "255.255.255.255"
DEFAULT_TIMEOUT = 30.0
MAX_TIMEOUT = 1e9
MAX_ARGS, MAX_ARG = 4096, 65536
MAX_TARGETS, MAX_TARGET = 64, 300
MAX_ENV, MAX_NAME = 256, 256
MAX_PATH = 4096
MAX_CPUS = 4096
MAX_WORKERS, MAX_WORKER_NAME = 8, 64


def _short(values: Sequence[str], count: int, limit: int) -> bool:
    return len(values) <= count and all(len(v) <= limit and "\0" not in v for v in values)


def _seconds(value: object) -> bool:
    return isinstance(value, float) and 0 < value <= MAX_TIMEOUT


def _environment(specs: Sequence[str], environ: Mapping[str, str]) -> list[list[str]] | None:
    pairs = []
    for spec in specs:
        name, sep, value = spec.partition("=")
        if not name or "\0" in spec:
            return None
        if not sep:
            if name not in environ:
                continue
            value = environ[name]
        if len(name) > MAX_NAME or "=" in name or "\0" in value or len(value) > MAX_ARG:
            return None
        pairs.append([name, value])
    return pairs if len(pairs) <= MAX_ENV else None


def message(opts: Mapping[str, Any], environ: Mapping[str, str], netns: int) -> bytes | None:
    """The Exec message (with NETNS) of OPTS, or None: leave it to the full path."""
    keyfile: str = opts["keyfile"]
    try:
        posix.stat(keyfile)
    except (OSError, ValueError):
        if "/" not in keyfile:
            return None  # an application's name (or a missing file): the configuration
    timeout = DEFAULT_TIMEOUT if opts["timeout"] is None else opts["timeout"]
    queue_timeout = opts["queue_timeout"] or 0.0
    tty = opts["tty"] or (not opts["no_tty"] and posix.isatty(0))
    if (tty or opts["fd"] or opts["mem"] is not None or not _seconds(timeout)
            or (queue_timeout and not _seconds(queue_timeout))):
        return None
    env = _environment(opts["env"], environ)
    args, alerts, workers = opts["args"], opts["alerts"], opts["worker"]
    announce = opts["announce"] or [environ.get("GROUP") or DEFAULT_ANNOUNCE]
    given_cwd, revoked, cpus = opts["cwd"], opts["revoked"], opts["cpus"]
    if (env is None or not _short(args, MAX_ARGS, MAX_ARG)
            or not _short(announce, MAX_TARGETS, MAX_TARGET)
            or not _short(alerts, MAX_TARGETS, MAX_TARGET)
            or not _short(workers, MAX_WORKERS, MAX_WORKER_NAME) or "" in workers
            or not 1 <= cpus <= MAX_CPUS or "\0" in keyfile + revoked
            or (given_cwd is not None and (not given_cwd or "\0" in given_cwd))):
        return None
    try:
        keypath = abspath(keyfile)
        revoked = abspath(revoked) if revoked else ""
        cwd = posix.getcwd() if given_cwd is None else abspath(given_cwd)
    except OSError:
        return None  # no working directory: the full path says so or goes without
    if len(cwd) > MAX_PATH:
        return None
    try:
        return frame({
            "op": "exec", "keyfile": keyfile, "keypath": keypath, "args": args,
            "announce": announce, "alerts": alerts, "timeout": timeout, "revoked": revoked,
            "verbose": opts["verbose"], "tty": False, "raw": False, "term": "", "rows": 0,
            "cols": 0, "fds": [], "env": env, "cwd": cwd, "cwd_required": given_cwd is not None,
            "cpus": cpus, "mem": 0, "workers": workers, "queue_timeout": float(queue_timeout),
            "netns": netns})
    except AgentWireError:
        return None  # longer than the agent takes
