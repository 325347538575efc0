"""The one place an ExecRequest is built from a command line (and rexnet.toml).

Both readers of `rexnet exec`'s command line call build(): the thin launcher (with its own
small option parser) and the full argparse command line; rexnet parallel too, for the
options it shares. Standard library only, and light: the launcher imports this module
(the configuration is read only when KEYFILE names an application, not a file).
"""

from __future__ import annotations

import os

from rexnet.protocol import exitcodes
from rexnet.protocol.request import (
    DEFAULT_TIMEOUT,
    ExecRequest,
    RequestError,
    announce_or_default,
    check_descriptor,
    check_timeout,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping, MutableMapping, Sequence
    from typing import Any


def application(values: MutableMapping[str, Any]) -> None:
    """When VALUES["keyfile"] is no file but the name of an application in the
    configuration, take its credential, announce and alert targets and timeout (options
    given win; see rexnet.config.fill_in); else a timeout of None becomes the default.
    RequestError for a mistake in a configuration file (FILE:LINE) or an unknown name."""
    keyfile = str(values["keyfile"])
    if os.path.exists(keyfile) or "/" in keyfile:
        if values.get("timeout", 0) is None:
            values["timeout"] = DEFAULT_TIMEOUT
        return
    from rexnet import config  # some 30 ms: only for a name

    try:
        app = config.load().application(keyfile)
    except config.ConfigError as e:
        raise RequestError(str(e), exitcodes.CONFIG) from None
    if app is None:
        looked = ", ".join(str(p) for p in config.search_path())
        raise RequestError(f"no such credential file: {keyfile}, nor an application "
                           f"[applications.{keyfile}] in {looked}", exitcodes.CREDENTIAL)
    config.fill_in(app, values)


def descriptor_modes(numbers: Sequence[int]) -> dict[int, str]:
    """--fd N: "r" for a read-only descriptor, "w" write-only, "rw" read-write."""
    import fcntl

    modes = {}
    for fd in numbers:
        try:
            check_descriptor(fd)
            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        except ValueError as e:
            raise RequestError(str(e), exitcodes.USAGE) from None
        except OSError:
            raise RequestError(f"--fd {fd}: descriptor {fd} is not open",
                               exitcodes.USAGE) from None
        modes[fd] = {os.O_RDONLY: "r", os.O_WRONLY: "w"}.get(flags & os.O_ACCMODE, "rw")
    return modes


def environment(specs: Sequence[str], environ: Mapping[str, str] = os.environ
                ) -> tuple[tuple[str, str], ...]:
    """--env NAME=VALUE, or --env NAME for this process's value (skipped if unset)."""
    pairs = []
    for spec in specs:
        name, sep, value = spec.partition("=")
        if not name or "\0" in spec:
            raise RequestError(f"--env {spec!r}: use NAME=VALUE or NAME", exitcodes.USAGE)
        if not sep:
            if name not in environ:
                continue
            value = environ[name]
        pairs.append((name, value))
    return tuple(pairs)


def working_directory(given: str | None) -> str:
    """The job's directory: --cwd's (absolute, from ours), else ours ("" if it is gone)."""
    if given is not None:
        if not given or "\0" in given:
            raise RequestError("--cwd: give a directory", exitcodes.USAGE)
        return os.path.abspath(given)
    try:
        return os.getcwd()
    except OSError:
        return ""


def memory(given: str | None) -> int:
    """--mem SIZE in bytes (0: not asked)."""
    if given is None:
        return 0
    from rexnet.protocol.request import parse_size

    try:
        return parse_size(given)
    except ValueError as e:
        raise RequestError(f"--mem: {e}", exitcodes.USAGE) from None


def window_size(fd: int = 0) -> tuple[int, int]:
    """(rows, cols) of the terminal on FD, or (0, 0) if it is not a terminal."""
    import fcntl
    import struct
    import termios

    try:
        rows, cols, _, _ = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8))
    except OSError:
        return 0, 0
    return rows, cols


def build(options: Mapping[str, Any], environ: Mapping[str, str] = os.environ) -> ExecRequest:
    """The request of exec's OPTIONS (as argparse names them: keyfile, args, announce,
    alerts, timeout, revoked, verbose, tty, no_tty, fd, env, cwd, mem, cpus, worker; those
    missing take their defaults), with KEYFILE's application from the configuration, the
    default announce target, descriptor modes, the environment asked for, the terminal
    and the job's directory. RequestError says what is wrong, with the exit status."""
    values = {"args": [], "announce": [], "alerts": [], "timeout": None, "revoked": None,
              "verbose": False, "tty": False, "no_tty": False, "fd": [], "env": [],
              "cwd": None, "mem": None, "cpus": 1, "worker": [], "queue_timeout": None,
              "detach": False, "put": [], "get": [], "force": False, **options}
    application(values)
    timeout = float(values["timeout"])
    try:
        check_timeout(timeout)
    except ValueError as e:
        raise RequestError(str(e), exitcodes.USAGE) from None
    if values["tty"] and values["no_tty"]:
        raise RequestError("-t and -T contradict each other", exitcodes.USAGE)
    fds = descriptor_modes(values["fd"])
    detach = bool(values["detach"])  # a detached job has no terminal unless -t asks
    tty = bool(values["tty"] or (not values["no_tty"] and not detach and os.isatty(0)))
    env = environment(values["env"], environ)
    rows, cols = window_size() if tty else (0, 0)
    keyfile, revoked = str(values["keyfile"]), values["revoked"]
    request = ExecRequest(
        keyfile=keyfile, keypath=os.path.abspath(keyfile), args=tuple(values["args"]),
        announce=announce_or_default(values["announce"], environ),
        alerts=tuple(values["alerts"]), timeout=timeout,
        revoked=os.path.abspath(revoked) if revoked else "", verbose=bool(values["verbose"]),
        tty=tty, raw=tty and os.isatty(0), term=environ.get("TERM", "") if tty else "",
        rows=rows, cols=cols, fds=tuple(fds.items()), env=env,
        cwd=working_directory(values["cwd"]), cwd_required=values["cwd"] is not None,
        cpus=int(values["cpus"]), mem=memory(values["mem"]), workers=tuple(values["worker"]),
        queue_timeout=float(values["queue_timeout"] or 0.0),
        detach=detach,
        put=tuple(os.path.abspath(p) for p in values["put"]), get=tuple(values["get"]),
        get_dir=os.getcwd() if values["get"] else "", force=bool(values["force"]))
    try:
        request.check()
    except ValueError as e:
        raise RequestError(str(e), exitcodes.USAGE) from None
    return request
