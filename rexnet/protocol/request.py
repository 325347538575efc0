"""ExecRequest: one `rexnet exec` request, whoever runs it.

The launcher (rexnet.cli.launcher) and the full command line build it from the command
line and rexnet.toml (rexnet.cli.request.build, the one place that does); the launcher
sends it to the agent (rexnet.protocol.agentwire), which runs it; the Python API makes
one from its arguments. Standard library only, and light: the launcher imports this.
The defaults every client shares are here: where to announce (DEFAULT_ANNOUNCE, or
$GROUP), how long to look for a worker, which signals reach the job.
"""

from __future__ import annotations

import os

from rexnet.protocol.record import Record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping

    from rexnet.protocol import wire

DEFAULT_ANNOUNCE = "255.255.255.255"
"""Where a job is announced when neither --announce nor $GROUP says (as cexec did)."""
DEFAULT_TIMEOUT = 30.0
"""Seconds to look for a worker when neither --timeout nor rexnet.toml says."""
MAX_TIMEOUT = 1e9
FORWARDED = ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2")
"""Signals the client passes on to the job (and SIGWINCH as a window size, on a terminal)."""
FD_MODES = ("r", "w", "rw")
MAX_ARGS, MAX_ARG = 4096, 65536
MAX_TARGETS, MAX_TARGET = 64, 300
MAX_ENV, MAX_NAME = 256, 256
MAX_FDS = 64
MAX_PATH = 4096
MAX_CPUS = 4096
MAX_MEM = 1 << 60
MAX_WORKERS, MAX_WORKER_NAME = 8, 64  # as rexnet.protocol.fields (not imported: json)


class RequestError(Exception):
    """A request that cannot run as given: MESSAGE for the user (after "rexnet: ") and
    the EXIT_CODE to end with (rexnet.protocol.exitcodes)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


def default_announce(environ: Mapping[str, str] = os.environ) -> str:
    """Where to announce when no target is given: $GROUP, else DEFAULT_ANNOUNCE."""
    return environ.get("GROUP") or DEFAULT_ANNOUNCE


def announce_or_default(texts: tuple[str, ...] | list[str],
                        environ: Mapping[str, str] = os.environ) -> tuple[str, ...]:
    """TEXTS, or the one default target if there are none."""
    return tuple(texts) or (default_announce(environ),)


def check_descriptor(fd: int) -> None:
    """ValueError unless FD may be carried to the job (--fd N: 3 to 255)."""
    if not 3 <= fd <= 255:
        raise ValueError(f"--fd {fd}: use descriptors 3 to 255 (0, 1 and 2 always go)")


def check_timeout(timeout: float, name: str = "--timeout") -> None:
    """ValueError unless TIMEOUT is a usable number of seconds (positive, finite); the
    message calls it NAME."""
    if not 0 < timeout <= MAX_TIMEOUT:  # also refuses NaN
        raise ValueError(f"{name} must be positive" if not timeout > 0 else
                         f"{name} must be at most {MAX_TIMEOUT:g} seconds")


def _short_strings(values: tuple[str, ...], count: int, limit: int) -> bool:
    return len(values) <= count and all(len(v) <= limit and "\0" not in v for v in values)


class ExecRequest(Record):
    """What one `rexnet exec` asks for: the application, where to look for a worker, and
    the job (its extra arguments, environment, terminal and descriptors)."""

    keyfile: str = ""
    """KEYFILE as the user wrote it (for messages); "" when the API got a Credential."""
    keypath: str = ""
    """KEYFILE's absolute path (the agent runs elsewhere)."""
    args: tuple[str, ...] = ()
    announce: tuple[str, ...] = ()
    """"ADDR[:PORT]" targets; built from a command line, never empty (see default_announce)."""
    alerts: tuple[str, ...] = ()
    """crat's "ADDR[:PORT]"s; none: the announce targets on crat's port."""
    timeout: float = DEFAULT_TIMEOUT
    revoked: str = ""
    """--revoked FILE (absolute); "": APP.revoked beside KEYFILE, if there is one."""
    verbose: bool = False
    tty: bool = False
    raw: bool = False
    """The client's stdin is a terminal the launcher puts in raw mode."""
    term: str = ""
    rows: int = 0
    cols: int = 0
    fds: tuple[tuple[int, str], ...] = ()
    """(descriptor, "r" | "w" | "rw") carried to the same number in the job."""
    env: tuple[tuple[str, str], ...] = ()
    cwd: str = ""
    """The job's working directory (absolute): the client's, or --cwd's; "": the worker's."""
    cwd_required: bool = False
    """--cwd was given: a worker without that directory refuses the job."""
    cpus: int = 1
    """--cpus: the slots the job takes (only workers with that many free answer)."""
    mem: int = 0
    """--mem in bytes: only workers with that much free memory answer (0: any)."""
    workers: tuple[str, ...] = ()
    """--worker NAME...: only these workers may run the job (none: any)."""
    queue_timeout: float = 0.0
    """--queue-timeout: seconds the job may wait in a busy worker's queue (0: no limit)."""
    detach: bool = False
    """--detach: start the job, print its id and return; the worker keeps its output."""
    put: tuple[str, ...] = ()
    """--put FILE (absolute paths): sent into the job's fresh working directory."""
    get: tuple[str, ...] = ()
    """--get PATTERN: files brought back from the job's directory when it ends."""
    get_dir: str = ""
    """Where --get writes (absolute; the client's working directory)."""
    force: bool = False
    """--force: --get may replace existing files."""

    def check(self) -> None:
        """ValueError naming the first field that is out of bounds (a decoder's check of
        what another process sent, and the builder's last check)."""
        if not _short_strings(self.args, MAX_ARGS, MAX_ARG):
            raise ValueError(f"the job takes at most {MAX_ARGS} extra arguments of at most "
                             f"{MAX_ARG} characters, without NUL")
        if not (_short_strings(self.announce, MAX_TARGETS, MAX_TARGET)
                and _short_strings(self.alerts, MAX_TARGETS, MAX_TARGET)):
            raise ValueError(f"--announce and --alerts take at most {MAX_TARGETS} targets "
                             f"of at most {MAX_TARGET} characters")
        if len(self.fds) > MAX_FDS or len({fd for fd, _ in self.fds}) < len(self.fds) or not all(
                3 <= fd <= 255 and mode in FD_MODES for fd, mode in self.fds):
            raise ValueError("fds is not a list of [descriptor 3-255, mode] pairs")
        if len(self.env) > MAX_ENV or not all(
                0 < len(name) <= MAX_NAME and "=" not in name and "\0" not in name + value
                and len(value) <= MAX_ARG for name, value in self.env):
            raise ValueError(f"the job takes at most {MAX_ENV} variables (NAME without '=', "
                             f"of at most {MAX_NAME} characters, and a VALUE without NUL)")
        if not (0 <= self.rows <= 0xFFFF and 0 <= self.cols <= 0xFFFF):
            raise ValueError("rows or cols out of range")
        if self.tty and self.fds:
            raise ValueError("--fd cannot be combined with a terminal; add -T")
        check_timeout(self.timeout)
        if (len(self.cwd) > MAX_PATH or "\0" in self.cwd
                or (self.cwd and not self.cwd.startswith("/"))
                or (self.cwd_required and not self.cwd)):
            raise ValueError("the job's directory is not an absolute path")
        if not (1 <= self.cpus <= MAX_CPUS and 0 <= self.mem <= MAX_MEM):
            raise ValueError(f"--cpus takes 1 to {MAX_CPUS}, --mem at most {MAX_MEM} bytes")
        if not _short_strings(self.workers, MAX_WORKERS, MAX_WORKER_NAME) or "" in self.workers:
            raise ValueError(f"--worker names at most {MAX_WORKERS} workers, of at most "
                             f"{MAX_WORKER_NAME} characters")
        check_files(self)
        if self.queue_timeout:
            check_timeout(self.queue_timeout, "--queue-timeout")

    def start(self) -> wire.Start:
        """The START frame that asks the worker for this job."""
        from rexnet.protocol import wire

        return wire.Start(self.args, self.env, self.tty, self.term if self.tty else "",
                          self.rows, self.cols, self.fds, False, self.cwd, self.cwd_required,
                          self.cpus, self.mem, self.workers,
                          detach=self.detach, get=self.get)


SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """'512M', '8G', '1.5G' or a number of bytes, as bytes; ValueError if it is none."""
    number = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = number[-1:] if number[-1:] in SIZE_UNITS and not number[-1:].isdigit() else ""
    try:
        value = float(number[: len(number) - len(unit)] or "x") * SIZE_UNITS[unit]
    except ValueError:
        value = -1.0
    if not 0 <= value <= MAX_MEM:  # also refuses NaN
        raise ValueError(f"bad size {text!r}: use BYTES or a number with K, M, G or T")
    return int(value)


MAX_FILES = 64  # as rexnet.protocol.jobframes.MAX_FILES


def check_files(request: ExecRequest) -> None:
    """ValueError for --put/--get/--detach that cannot go together or out of bounds."""
    names = [p.rstrip("/").rpartition("/")[2] for p in request.put]
    if len(request.put) > MAX_FILES or len(request.get) > MAX_FILES:
        raise ValueError(f"--put and --get take at most {MAX_FILES} files each")
    if not all(p.startswith("/") and name not in ("", ".", "..") and "\0" not in p
               for p, name in zip(request.put, names, strict=True)):
        raise ValueError("--put needs files (absolute paths once read)")
    if len(set(names)) < len(names):
        raise ValueError("--put: two files of the same name (the job directory is flat)")
    for pattern in request.get:
        if not pattern or "/" in pattern or "\0" in pattern or pattern in (".", ".."):
            raise ValueError(f"--get {pattern!r}: a pattern of plain names (no '/'): files "
                             "come back from the top of the job directory")
    if request.get and request.detach:
        raise ValueError("--get does not go with --detach (use rexnet output JOB)")
    if request.get and not request.get_dir.startswith("/"):
        raise ValueError("--get needs the directory to write to")
