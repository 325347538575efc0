"""The `rexnet` and `cexec` commands' entry point: a thin launcher in front of the agent.

`rexnet exec` (and `cexec`) parse their options here with the standard library alone,
build their ExecRequest as the full command line does (rexnet.cli.request), hand it and
their descriptors to the user's agent (rexnet.agent.server; started on demand) over its Unix
socket, relay signals and window sizes, and exit with the job's status. Everything else
(other subcommands, --help, a command line this parser does not follow, a usage error,
--no-agent or REXNET_NO_AGENT=1) goes to the full command line, rexnet.cli.main, which runs
standalone as before. The launcher owns the terminal: it sets raw mode and restores it
however the job or the agent ends.

Start-up time is the point (`python -I -S -c pass` is the floor): an ordinary exec goes
the fast path, which imports posix, _socket and _signal (not os, socket or signal, which
cost milliseconds: os builds the collections ABCs, signal imports enum), rexnet.cli.quick
(its message without ExecRequest) and rexnet.protocol.agentjson (JSON without json, which
imports re). The rest (a terminal, --fd, an application's name, starting the agent)
imports what it needs when it needs it. tests/test_launcher_imports.py keeps it so.
"""

from __future__ import annotations

import posix
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    import _socket
    from collections.abc import Callable, Mapping, Sequence
    from types import ModuleType
    from typing import Any, NoReturn

FLAGS = {"-v": "verbose", "--verbose": "verbose", "-t": "tty", "-T": "no_tty",
         "--no-agent": "no_agent"}
VALUED = {"-a": "announce", "--announce": "announce", "--timeout": "timeout",
          "--alerts": "alerts", "--fd": "fd", "-e": "env", "--env": "env",
          "--revoked": "revoked", "--cwd": "cwd", "--mem": "mem", "--cpus": "cpus",
          "--worker": "worker", "--queue-timeout": "queue_timeout"}
START_WAIT = 5.0
FORWARDED = ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2")
"""rexnet.protocol.request.FORWARDED (a test holds them equal): the signals relayed."""
DEVNULL = "/dev/null"


def main(argv: Sequence[str] | None = None) -> int:
    """`rexnet ...`: exec through the agent; anything else by rexnet.cli.main."""
    standard_descriptors()
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["exec"]:
        return launch(args[1:], lambda: _cli().main(args))
    return _cli().main(args)


def cexec_main(argv: Sequence[str] | None = None) -> int:
    """`cexec KEYFILE [ARG...]`: the same as `rexnet exec`."""
    standard_descriptors()
    args = list(sys.argv[1:] if argv is None else argv)
    return launch(args, lambda: _cli().cexec_main(args))


def run(command: str = "rexnet") -> NoReturn:
    """The body of the fast entry scripts (rexnet.cli.entry writes them for `python -I -S`):
    run COMMAND ("rexnet" or "cexec"); after a job through the agent, leave with _exit
    once stdout and stderr are flushed (interpreter finalization costs milliseconds), after
    the full command line as usual (it may count on atexit)."""
    status = cexec_main() if command == "cexec" else main()
    if "rexnet.cli.main" in sys.modules:
        sys.exit(status)
    for stream in (sys.stdout, sys.stderr):
        try:  # noqa: SIM105
            stream.flush()
        except (OSError, ValueError, AttributeError):
            pass
    posix._exit(status)


def standard_descriptors() -> None:
    """Open /dev/null on any of descriptors 0, 1 and 2 that is closed, as ssh does: else the
    agent's socket or a job's file would take its number, and the job would read or write
    it. sys.stdin, sys.stdout and sys.stderr (None then) are made again on them."""
    for fd, name in ((0, "stdin"), (1, "stdout"), (2, "stderr")):
        try:
            posix.fstat(fd)
            continue
        except OSError:
            pass
        null = posix.open(DEVNULL, posix.O_RDWR)  # the lowest free number: fd itself
        if null != fd:
            posix.dup2(null, fd)
            posix.close(null)
        if getattr(sys, name) is None:
            setattr(sys, name, open(fd, "r" if fd == 0 else "w", closefd=False,  # noqa: SIM115
                                    errors="backslashreplace" if fd == 2 else None))


def environment() -> Mapping[str, str]:
    """os.environ, without importing os: the process's environment as os reads it (if os
    is imported, its environ, which may have been changed since)."""
    if "os" in sys.modules:
        return sys.modules["os"].environ  # type: ignore[no-any-return]
    encoding = sys.getfilesystemencoding()
    return {name.decode(encoding, "surrogateescape"): value.decode(encoding, "surrogateescape")
            for name, value in posix.environ.items()}


def _cli() -> ModuleType:
    from rexnet.cli import main as cli

    return cli


def parse(tokens: Sequence[str]) -> dict[str, object] | None:
    """exec's options as argparse would read them, or None for anything unusual (the full
    parser then reads the command line and says what is wrong with it)."""
    opts: dict[str, object] = {"verbose": False, "tty": False, "no_tty": False,
                               "no_agent": False, "announce": [], "alerts": [], "fd": [],
                               "env": [], "timeout": None, "revoked": "", "cwd": None,
                               "mem": None, "cpus": 1, "worker": [], "queue_timeout": None}
    positional: list[str] = []
    block = "before"  # the positional arguments come in one block (as argparse wants)
    i, only_positional = 0, False
    while i < len(tokens):
        token = tokens[i]
        i += 1
        if only_positional and token == "--":
            return None  # argparse drops some of these and not others
        if only_positional or token == "-" or not token.startswith("-"):
            if block == "after":
                return None
            block = "in"
            positional.append(token)
            continue
        if token == "--":
            if block == "after":
                return None  # the positional block is over: argparse refuses what follows
            only_positional = True
            continue
        if block == "in":
            block = "after"
        name, eq, value = token.partition("=") if token.startswith("--") else (
            token[:2], "", token[2:])
        if name in FLAGS and not eq and not value:
            opts[FLAGS[name]] = True
            continue
        if not name.startswith("--") and name not in VALUED and all(
                f"-{c}" in FLAGS and c != "-" for c in token[1:]):
            for c in token[1:]:  # -vT
                opts[FLAGS[f"-{c}"]] = True
            continue
        if name not in VALUED:
            return None
        if not eq and not value:
            if i >= len(tokens) or tokens[i].startswith("-"):
                return None
            value = tokens[i]
            i += 1
        key = VALUED[name]
        try:
            if key in ("timeout", "queue_timeout"):
                opts[key] = float(value)
            elif key == "fd":
                opts[key].append(int(value))  # type: ignore[attr-defined]
            elif key == "cpus":
                opts[key] = int(value)
            elif key in ("revoked", "cwd", "mem"):
                opts[key] = value
            else:
                opts[key].append(value)  # type: ignore[attr-defined]
        except ValueError:
            return None
    if not positional:
        return None
    opts["keyfile"], opts["args"] = positional[0], positional[1:]
    return opts


def launch(tokens: Sequence[str], full: Callable[[], int]) -> int:
    """Run the job through the agent, or call FULL (the standalone command line)."""
    environ = environment()
    if environ.get("REXNET_NO_AGENT", "") not in ("", "0"):
        return full()
    opts = parse(tokens)
    if opts is None or opts["no_agent"]:
        return full()
    from rexnet.agent import paths
    from rexnet.cli import quick

    netns = paths.netns_id()
    data = quick.message(opts, environ, netns)
    job = Job(data, [], False, False) if data is not None else full_job(opts, environ, netns)
    if job is None:
        return full()  # which says what is wrong, in the same words
    path = paths.socket_path(environ)
    try:
        sock = connect(path) or start_agent(path, job.numbers)
    except Untrusted as e:  # nothing was sent: run here, never through that socket
        write(f"rexnet: will not use the agent at {path}: {e}; running without one\n")
        return full()
    if sock is None:
        write(f"rexnet: no agent could start (see above, or {paths.log_path(path)}); running "
              "without one\n")
        return full()
    try:
        return Launcher(sock, path, job).run()
    except Unsent:  # the agent went away before it had the request: nothing ran; once more
        sock.close()
        try:
            sock = connect(path) or start_agent(path, job.numbers)
        except Untrusted as e:
            write(f"rexnet: will not use the agent at {path}: {e}; running without one\n")
            return full()
        if sock is None:
            write(f"rexnet: no agent could start (see above, or {paths.log_path(path)}); "
                  "running without one\n")
            return full()
        return Launcher(sock, path, job, last_try=True).run()


class Job:
    """What the launcher hands the agent: the Exec message DATA, the --fd NUMBERS that go
    with 0, 1 and 2, and whether the job has a terminal (TTY) the launcher sets RAW."""

    def __init__(self, data: bytes, numbers: list[int], tty: bool, raw: bool) -> None:
        self.data, self.numbers, self.tty, self.raw = data, numbers, tty, raw


def full_job(opts: Mapping[str, Any], environ: Mapping[str, str], netns: int) -> Job | None:
    """The job of what the fast path leaves (rexnet.cli.quick): the request built in full
    (rexnet.cli.request.build); None if it cannot run as given (the full command line says
    why) or is longer than the agent takes (the full command line runs it without)."""
    from rexnet.cli.request import build
    from rexnet.protocol import agentwire
    from rexnet.protocol.request import RequestError

    try:
        request = build(opts, environ)
        data = agentwire.Exec(request, netns).encode()
    except (RequestError, agentwire.AgentWireError):
        return None
    return Job(data, [fd for fd, _ in request.fds], request.tty, request.raw)


class Unsent(Exception):
    """The request could not be sent to the agent (it stopped meanwhile)."""


class Untrusted(Exception):
    """The agent's socket is in a directory others control, or someone else listens there."""


def connect(path: str) -> _socket.socket | None:
    """A connection to the agent at PATH, or None if none listens there. Before anything is
    sent: Untrusted unless the socket's directory is this user's own, private, real
    directory and the listening process runs as this user (SO_PEERCRED)."""
    import _socket

    from rexnet.agent import paths

    try:
        problem = paths.directory_problem(path)
    except FileNotFoundError:
        return None  # no agent yet: one that starts makes the directory
    except OSError as e:
        raise Untrusted(f"cannot check {paths.dirname(path)}: {e.strerror}") from None
    if problem:
        raise Untrusted(problem)
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.connect(path)
        uid = paths.peer_uid(sock)
    except OSError:
        sock.close()
        return None
    if uid != posix.getuid():
        sock.close()
        raise Untrusted(f"the process listening there runs as uid {uid}, not as this user "
                        f"(uid {posix.getuid()})")
    return sock


def start_agent(path: str, numbers: Sequence[int]) -> _socket.socket | None:
    """Start a detached agent at PATH (it forks away once its socket listens) and connect;
    None if it could not start (it said why on stderr)."""
    import os
    import time

    actions = [(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
               (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
               *((os.POSIX_SPAWN_CLOSE, fd) for fd in numbers)]
    # -P: the installed rexnet, not a source tree that happens to be the current directory
    argv = [sys.executable, "-P", "-m", "rexnet.cli.main", "agent", "--socket", path]
    env = dict(os.environ, REXNET_AGENT_ON_DEMAND="1")  # see rexnet.agent.server.ON_DEMAND
    pid = os.posix_spawn(sys.executable, argv, env, file_actions=actions)
    _, status = os.waitpid(pid, 0)
    if status != 0:
        return None
    deadline = time.monotonic() + START_WAIT  # another launcher's agent may be starting
    while True:
        sock = connect(path)
        if sock is not None or time.monotonic() > deadline:
            return sock
        time.sleep(0.01)


class Launcher:
    """One job through the agent: descriptors out, signals relayed, status back."""

    def __init__(self, sock: _socket.socket, path: str, job: Job, last_try: bool = False
                 ) -> None:
        self.last_try = last_try
        self.sock = sock
        self.path = path
        self.job = job

    def relay(self, message: bytes) -> None:
        """Send MESSAGE (from a signal handler)."""
        try:  # noqa: SIM105 (contextlib is not imported here: it costs start-up time)
            self.sock.sendall(message)
        except OSError:
            pass

    def forward_signals(self) -> None:
        """Relay FORWARDED signals (and the window's size, on a terminal) to the job. Set
        once the request is sent, so that it follows the connection at once (the agent,
        woken by the connection, finds it there and starts the job in the same turn); a
        signal before then ends the launcher, and the agent the job, as before a request."""
        import _signal as signal

        from rexnet.protocol.agentjson import frame

        def forward(number: int, frame_: object) -> None:
            self.relay(frame({"op": "signal", "number": number}))

        for name in FORWARDED:
            signal.signal(getattr(signal, name), forward)  # type: ignore[arg-type]
        if self.job.tty:
            from rexnet.cli.request import window_size

            def resized(number: int, frame_: object) -> None:
                rows, cols = window_size()
                if rows and cols:
                    self.relay(frame({"op": "winch", "rows": rows, "cols": cols}))

            signal.signal(signal.SIGWINCH, resized)  # type: ignore[arg-type]

    def run(self) -> int:
        saved = None
        if self.job.raw:
            import termios
            import tty

            saved = termios.tcgetattr(0)
            tty.setraw(0, termios.TCSANOW)
        try:
            status, message = self.exchange()
        finally:
            if saved is not None:
                import termios

                termios.tcsetattr(0, termios.TCSADRAIN, saved)
            self.blocking()
        if message:
            write(message + "\n")
        return status

    def exchange(self) -> tuple[int, str]:
        import _socket

        from rexnet.agent import paths
        from rexnet.protocol.agentjson import AgentWireError, Frames

        fds, opened = [], []
        for fd in (0, 1, 2, *self.job.numbers):
            try:
                posix.fstat(fd)
                fds.append(fd)
            except OSError:  # closed: the job reads EOF there, or its output goes nowhere
                null = posix.open(DEVNULL, posix.O_RDWR)
                opened.append(null)
                fds.append(null)
        data = self.job.data
        try:
            rights = b"".join(fd.to_bytes(4, sys.byteorder, signed=True) for fd in fds)
            sent = self.sock.sendmsg([data], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, rights)])
            if sent < len(data):  # sendall(b"") still calls send(): EPIPE if the agent
                self.sock.sendall(data[sent:])  # already answered (a missing credential)
        except OSError as e:
            if not self.last_try:
                raise Unsent() from None
            return 255, f"rexnet: cannot reach the agent at {self.path}: {e.strerror}"
        finally:
            for fd in opened:
                posix.close(fd)
        self.forward_signals()
        frames = Frames()
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:
                data = b""
            if not data:
                return 255, (f"rexnet: lost the agent before the job finished (its log: "
                             f"{paths.log_path(self.path)}); the job was ended")
            try:
                for obj in frames.values(data):
                    said, status, message = answer(obj)
                    if said is not None:
                        write(said)
                    elif status is not None:
                        return status, message
            except AgentWireError as e:
                return 255, f"rexnet: bad message from the agent: {e}"

    def blocking(self) -> None:
        """Leave our descriptors blocking, as a standalone run does (the agent's reactor
        made the shared ones non-blocking)."""
        for fd in (0, 1, 2, *self.job.numbers):
            try:
                if not posix.get_blocking(fd):
                    posix.set_blocking(fd, True)
            except OSError:
                pass


def answer(obj: object) -> tuple[str | None, int | None, str]:
    """The agent's message OBJ (parsed JSON): (text to write, None, "") for a Say, (None,
    status, message) for an Exit, (None, None, "") for another kind; AgentWireError for a
    message agentwire refuses. Well-formed Say and Exit are read here; anything else by
    agentwire.check (imported only then), which says what is wrong."""
    if type(obj) is dict and len(obj) == 2 and obj.get("op") == "say" and type(
            obj.get("text")) is str:
        return obj["text"], None, ""
    if type(obj) is dict and len(obj) == 3 and obj.get("op") == "exit" and type(
            obj.get("status")) is int and 0 <= obj["status"] <= 255 and type(
            obj.get("message")) is str:
        return None, obj["status"], obj["message"]
    from rexnet.protocol import agentwire

    m = agentwire.check(obj)
    if isinstance(m, agentwire.Say):
        return m.text, None, ""
    if isinstance(m, agentwire.Exit):
        return None, m.status, m.message
    return None, None, ""


def write(text: str) -> None:
    try:  # noqa: SIM105
        posix.write(2, text.encode(errors="replace"))
    except OSError:
        pass


if __name__ == "__main__":
    sys.exit(main())
