"""Terminals as a person uses them: `rexnet exec` in a tmux pane, an interactive job remote.

Each test runs its own tmux server (``tmux -L <unique socket>``, never the user's default
one) with one detached pane of a known size. The pane's program runs in the client's
network namespace: either the client itself, or a local shell into which commands are
typed. Keys go in with ``send-keys`` and the screen comes back with ``capture-pane``.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import itertools
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import termios
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, cast

import psutil
import pytest
from cluster import Proc, exec_argv, run_exec, start_worker
from conftest import Keys
from netbed import Host, NetBed

from rexnet.protocol import exitcodes, wire
from rexnet.worker import job, spawn

SHELL = ["sh", "-c"]
BROADCAST = "255.255.255.255:3010"
ROWS, COLS = 30, 100
TIMEOUT = 30.0  # generous: a loaded 2-core machine runs several of these at once
REMOTE_SHELL = "exec env PS1='remote> ' sh -i"
REMOTE_PYTHON = f"exec {shlex.quote(sys.executable)} -q -i"
TMUX_CONF = """\
set -g status off
set -g remain-on-exit on
set -g history-limit 10000
"""

_sockets = itertools.count()
_marks = itertools.count(90001)


def require_tmux() -> str:
    """The tmux program; skip without it, but fail when ``CI=true`` (as netbed does)."""
    program = shutil.which("tmux")
    if program is not None:
        return program
    reason = "terminal tests need tmux, which is not installed (apt-get install tmux)"
    if os.environ.get("CI") == "true":
        pytest.fail(f"tmux required in CI: {reason}", pytrace=False)
    pytest.skip(reason)


class Tmux:
    """A private tmux server with one detached session, "job", of one pane."""

    def __init__(self, program: str, directory: Path) -> None:
        self.program = program
        self.socket = f"rexnet-test-{os.getpid()}-{next(_sockets)}"
        self.conf = directory / "tmux.conf"
        self.conf.write_text(TMUX_CONF)
        # a test run inside tmux must not talk to the user's server
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("TMUX")}
        self.socket_path = ""

    def __call__(self, *args: str, check: bool = True) -> str:
        done = subprocess.run([self.program, "-L", self.socket, "-f", str(self.conf), *args],
                              capture_output=True, text=True, timeout=TIMEOUT, env=self.env)
        if check and done.returncode != 0:
            raise AssertionError(f"tmux {shlex.join(args)} exited {done.returncode}: "
                                 f"{done.stderr.strip()}")
        return done.stdout

    def start(self, argv: Sequence[str], rows: int = ROWS, cols: int = COLS) -> None:
        """Run ARGV in a detached pane of ROWS x COLS."""
        self("new-session", "-d", "-s", "job", "-x", str(cols), "-y", str(rows),
             shlex.join(argv))
        self.socket_path = self.display("#{socket_path}")
        assert self.size() == (rows, cols)

    def display(self, fmt: str) -> str:
        return self("display-message", "-p", "-t", "job", fmt).strip()

    def size(self) -> tuple[int, int]:
        rows, cols = self.display("#{pane_height} #{pane_width}").split()
        return int(rows), int(cols)

    def resize(self, rows: int, cols: int) -> None:
        # on a detached session this also sets the window's window-size to manual
        self("resize-window", "-t", "job", "-x", str(cols), "-y", str(rows))
        assert self.size() == (rows, cols)

    def keys(self, *keys: str) -> None:
        """Press KEYS, in tmux's names (C-c, C-d, Enter)."""
        self("send-keys", "-t", "job", *keys)

    def type(self, line: str) -> None:
        """Type LINE literally, then Enter."""
        self("send-keys", "-t", "job", "-l", "--", line)
        self.keys("Enter")

    def screen(self) -> str:
        """The pane's history and screen, wrapped lines joined, trailing blanks dropped."""
        text = self("capture-pane", "-p", "-J", "-S", "-", "-t", "job")
        return "\n".join(line.rstrip() for line in text.splitlines()).strip("\n")

    def dead(self) -> bool:
        """Has the pane's program ended? (Its status is not used: tmux 3.3a now and then
        never reaps a pane's process, so statuses are printed by a wrapper instead.)"""
        return self.display("#{pane_dead}") == "1"

    def failure(self, what: str) -> AssertionError:
        return AssertionError(f"{what}; the pane shows:\n{self.screen()}")

    def wait_for(self, pattern: str, timeout: float = TIMEOUT) -> re.Match[str]:
        """Poll the pane until PATTERN (a multi-line regex) appears; fail with the pane."""
        regex = re.compile(pattern, re.MULTILINE)
        deadline = time.monotonic() + timeout
        while True:
            ended = self.dead()
            match = regex.search(self.screen())
            if match:
                return match
            if ended:
                raise self.failure(f"{pattern!r} not seen before the pane's program ended")
            if time.monotonic() > deadline:
                raise self.failure(f"{pattern!r} not seen within {timeout:g} s")
            time.sleep(0.1)

    def wait_status(self, timeout: float = TIMEOUT) -> int:
        """The status=N line that the pane's shell prints when the client ends."""
        return int(self.wait_for(r"^status=(\d+)$", timeout).group(1))

    def run(self, command: str, timeout: float = TIMEOUT) -> str:
        """Type COMMAND into the shell running in the pane; what it printed."""
        n = next(_marks)
        line = f'{command}; echo "<$(({n}+0))>"'  # the echoed line cannot match "<n>"
        self.type(line)
        self.wait_for(rf"^<{n}>$", timeout)
        lines = self.screen().splitlines()
        end = max(i for i, text in enumerate(lines) if text == f"<{n}>")
        start = max(i for i, text in enumerate(lines[:end]) if text.endswith(line))
        return "\n".join(lines[start + 1:end]).strip()

    def tty_modes(self) -> list[int]:
        """termios attributes of the pane's terminal, read from outside."""
        fd = os.open(self.display("#{pane_tty}"), os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK)
        try:
            return termios.tcgetattr(fd)
        finally:
            os.close(fd)

    def programs(self) -> list[psutil.Process]:
        """The processes of the pane: its program and all that program's descendants."""
        found = []
        panes = self("list-panes", "-a", "-F", "#{pane_dead} #{pane_pid}", check=False)
        for dead, pid in (line.split() for line in panes.splitlines()):
            if dead == "1":  # reaped, perhaps: its pid may be another process's by now
                continue
            with contextlib.suppress(psutil.Error):
                top = psutil.Process(int(pid))
                found += [top, *top.children(recursive=True)]
        return found

    def close(self) -> None:
        """Kill the server, and whatever the pane started that outlives it."""
        programs = self.programs()
        self("kill-server", check=False)
        if self.socket_path:  # tmux 3.3a leaves it behind
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket_path)
        _, alive = psutil.wait_procs(programs, timeout=5)
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                proc.kill()


@pytest.fixture
def term(bed: NetBed, tmp_path: Path) -> Iterator[Tmux]:
    """A private tmux server, stopped before the test bed (it depends on it)."""
    tmux = Tmux(require_tmux(), tmp_path)
    try:
        yield tmux
    finally:
        tmux.close()


def hosts(bed: NetBed) -> tuple[Host, Host]:
    """Two hosts on one subnet: "client" and "w1"."""
    subnet = bed.add_subnet("lan")
    return bed.add_host("client", [subnet]), bed.add_host("w1", [subnet])


def worker_on(host: Host, keys: Keys) -> Proc:
    """A worker running `sh -c SCRIPT`, SCRIPT from the client."""
    # As if started from an 80x24 terminal that exported its size (GNU readline does, so
    # this test process may too): a job's terminal must not inherit a stale size.
    env = {**os.environ, "LINES": "24", "COLUMNS": "80"}
    return start_worker(keys.worker, SHELL, "0.0.0.0:3010", host.name, "--allow-args",
                        popen=functools.partial(host.popen, env=env))


def setup(bed: NetBed, keys: Keys) -> tuple[Host, Proc]:
    """The client host, and the worker on w1."""
    client, host = hosts(bed)
    return client, worker_on(host, keys)


def start_client(term: Tmux, client: Host, keys: Keys, script: str, *options: str) -> None:
    """Run `rexnet exec` of SCRIPT as the pane's program, in the client's namespace; a
    wrapping shell prints its exit status as status=N."""
    argv = exec_argv(keys.client, [BROADCAST], *options, "--", script)
    term.start(client.argv(["sh", "-c", '"$@"; echo "status=$?"', "sh", *argv]))


def local_shell(term: Tmux, client: Host) -> None:
    """A local shell in the client's namespace as the pane's program."""
    term.start(client.argv(["env", "PS1=local$ ", "sh"]))
    term.wait_for(r"^local\$$")


def flags(stty_a: str) -> set[str]:
    """The words of `stty -a` output ("icanon", "-echo", "rows", ...)."""
    return set(re.split(r"[\s;]+", stty_a))


# -- an interactive shell ------------------------------------------------------------


def test_an_interactive_remote_shell_in_a_terminal(term: Tmux, bed: NetBed, keys: Keys
                                                   ) -> None:
    client, worker = setup(bed, keys)
    start_client(term, client, keys, REMOTE_SHELL, "-v")
    term.wait_for(r"^remote>$")
    worker.wait_for(r"job \w+ started .*\(in a terminal\)")
    # said in raw mode, yet each line starts at the left margin
    term.wait_for(r"^rexnet: job \w+ runs on worker w1 \(.*\n(.*\n)*remote>$")

    assert term.run("echo $((6*7))") == "42"
    assert re.fullmatch(r"/dev/pts/\d+", term.run("tty"))
    assert term.run("stty size") == f"{ROWS} {COLS}"  # sent at start

    # the terminal's size follows the pane (SIGWINCH -> WINSIZE -> TIOCSWINSZ on the pty)
    for rows, cols in ((40, 120), (25, 90)):
        term.resize(rows, cols)
        deadline = time.monotonic() + TIMEOUT
        while (seen := term.run("stty size")) != f"{rows} {cols}":
            assert time.monotonic() < deadline, f"stty size still says {seen!r}"
            time.sleep(0.2)
        assert term.run("tput lines; tput cols").split() == [str(rows), str(cols)]

    term.type("exit 5")
    assert term.wait_status() == 5


def test_the_remote_terminal_sees_the_local_TERM(term: Tmux, bed: NetBed, keys: Keys
                                                  ) -> None:
    client, _ = setup(bed, keys)
    local_shell(term, client)
    local_term = term.run("echo $TERM")
    assert local_term
    command = shlex.join(exec_argv(keys.client, [BROADCAST], "--",
                                   'echo "remote TERM=$TERM"'))
    term.type(command)
    term.wait_for(rf"^remote TERM={re.escape(local_term)}$")


# -- an interactive Python -----------------------------------------------------------


def test_python_interactive_remotely_with_ctrl_c_and_ctrl_d(term: Tmux, bed: NetBed,
                                                             keys: Keys) -> None:
    client, _ = setup(bed, keys)
    start_client(term, client, keys, REMOTE_PYTHON)
    term.wait_for(r"^>>>$")
    term.type("2**10")
    term.wait_for(r"^1024$")

    term.type('import time; print("sleep" + "ing"); time.sleep(100)')
    term.wait_for(r"^sleeping$")
    term.keys("C-c")  # the pane sends 0x03; the remote terminal turns it into SIGINT
    term.wait_for(r'^  File "<stdin>", line 1, in <module>\nKeyboardInterrupt\n>>>$')

    term.type("2**11")  # the session goes on
    term.wait_for(r"^2048$")
    term.keys("C-d")  # EOF from the remote terminal: Python exits
    assert term.wait_status() == 0


# -- the local terminal is always restored -------------------------------------------

RAW_FLAGS = termios.ICANON | termios.ECHO | termios.ISIG


def client_of(term: Tmux) -> psutil.Process:
    """The `rexnet exec` process started by the pane's shell."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        for proc in term.programs():
            with contextlib.suppress(psutil.Error):
                if "exec" in proc.cmdline() and any("rexnet" in a for a in proc.cmdline()):
                    return proc
        if time.monotonic() > deadline:
            raise term.failure("no rexnet exec process in the pane")
        time.sleep(0.1)


@pytest.mark.parametrize("ending,status", [
    ("exit", 3),
    ("job killed by a signal", 128 + signal.SIGKILL),
    ("worker killed", exitcodes.WORKER_LOST),
    ("client sent SIGTERM", 128 + signal.SIGTERM),
    ("agent killed", exitcodes.WORKER_LOST),
])
def test_the_local_terminal_is_restored(term: Tmux, bed: NetBed, keys: Keys, ending: str,
                                        status: int, agent_sockets: Path) -> None:
    client, worker = setup(bed, keys)
    local_shell(term, client)
    cooked = term.tty_modes()
    assert cooked[3] & RAW_FLAGS == RAW_FLAGS
    script = {
        "exit": 'echo "read""y"; read line; echo "got $line"; exit 3',
        "job killed by a signal": 'echo "read""y"; read line; kill -KILL $$',
    }.get(ending, 'echo "read""y"; exec sleep 100')
    command = shlex.join(exec_argv(keys.client, [BROADCAST], "--", script))
    term.type(f'{command}; echo "status=$?"')
    term.wait_for(r"^ready$")
    assert term.tty_modes()[3] & RAW_FLAGS == 0, "the client's terminal is not in raw mode"

    if ending in ("exit", "job killed by a signal"):
        term.type("hello")  # read by the job through its own terminal
    elif ending == "worker killed":
        worker.stop(signal.SIGKILL)
    elif ending == "agent killed":  # the launcher owns the terminal: it restores it
        (pidfile,) = agent_sockets.rglob("agent-*.sock.pid")
        os.kill(int(pidfile.read_text()), signal.SIGKILL)
    else:
        client_of(term).send_signal(signal.SIGTERM)
        worker.wait_for(r"job \w+ ended: signal 15")
    assert term.wait_status() == status, term.screen()
    if ending == "exit":
        term.wait_for(r"^got hello$")
    if ending == "worker killed":  # said after the terminal is back: at the line's start
        term.wait_for(r"^rexnet: lost worker w1 before the job finished")
    if ending == "agent killed":
        term.wait_for(r"^rexnet: lost the agent before the job finished")

    attrs = term.tty_modes()
    assert attrs[3] & RAW_FLAGS == RAW_FLAGS, "the local terminal was left raw"
    assert attrs == cooked
    seen = flags(term.run("stty -a"))
    assert {"icanon", "echo", "isig", "opost"} <= seen, seen
    assert not {"-icanon", "-echo", "-isig", "-opost"} & seen, seen
    assert term.run("echo still $((20+1))") == "still 21"


# -- -t and -T -----------------------------------------------------------------------


def test_dash_T_gives_no_terminal_even_from_a_terminal(term: Tmux, bed: NetBed, keys: Keys
                                                        ) -> None:
    client, worker = setup(bed, keys)
    start_client(term, client, keys, "tty; exit 4", "-T")
    term.wait_for(r"^not a tty$")
    assert term.wait_status() == 4
    assert "(in a terminal)" not in worker.wait_for(r"job \w+ started.*").group(0)


def test_dash_t_gives_a_terminal_to_piped_input(bed: NetBed, keys: Keys) -> None:
    client, worker = setup(bed, keys)
    done = run_exec(keys.client, [BROADCAST], "-t", "--",
                    'tty; stty size; read line; echo "got $line"', input=b"hi\n",
                    wrap=client.argv)
    assert done.returncode == 0, done.stderr
    # the terminal echoes "hi" (whenever it arrives) and turns \n into \r\n
    lines = [line for line in done.stdout.split(b"\r\n") if line != b"hi"]
    assert re.fullmatch(rb"/dev/pts/\d+", lines[0]), done.stdout
    assert lines[1:] == [b"24 80", b"got hi", b""], done.stdout  # 24x80: no size to send
    worker.wait_for(r"job \w+ started .*\(in a terminal\)")


def test_without_a_terminal_there_is_none(bed: NetBed, keys: Keys) -> None:
    client, _ = setup(bed, keys)
    done = run_exec(keys.client, [BROADCAST], "--", "tty", wrap=client.argv)
    assert done.returncode == 1 and done.stdout == b"not a tty\n", done


def test_dash_t_and_dash_T_contradict(bed: NetBed, keys: Keys) -> None:
    client, _ = setup(bed, keys)
    done = run_exec(keys.client, [BROADCAST], "-t", "-T", "--", "true", wrap=client.argv)
    assert done.returncode == exitcodes.USAGE
    assert b"-t and -T contradict" in done.stderr


def test_a_resize_while_looking_for_a_worker_is_not_lost(term: Tmux, bed: NetBed, keys: Keys
                                                          ) -> None:
    client, host = hosts(bed)
    start_client(term, client, keys, REMOTE_SHELL, "--timeout", "60")
    deadline = time.monotonic() + TIMEOUT
    while term.tty_modes()[3] & termios.ICANON:  # the client is up (its terminal is raw)
        assert time.monotonic() < deadline, term.screen()
        time.sleep(0.1)
    term.resize(40, 120)  # before any worker answers
    worker_on(host, keys)
    term.wait_for(r"^remote>$")
    assert term.run("stty size") == "40 120"


def test_dash_t_from_a_pipe_keeps_a_size_on_SIGWINCH(bed: NetBed, keys: Keys) -> None:
    client, _ = setup(bed, keys)
    running = client.popen(exec_argv(keys.client, [BROADCAST], "-t", "--",
                                     "echo ready; read line; stty size"),
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE)
    assert running.stdin and running.stdout and running.stderr
    assert running.stdout.readline() == b"ready\r\n"
    running.send_signal(signal.SIGWINCH)  # e.g. the terminal it was started from resized
    time.sleep(0.5)  # nothing to poll: a late resize could only hide the bug, not fake it
    running.stdin.write(b"go\n")
    running.stdin.close()
    out = running.stdout.read()
    assert running.wait(TIMEOUT) == 0, running.stderr.read()
    assert out == b"go\r\n24 80\r\n"  # not "0 0": stdin has no size to follow


# -- the worker's side, without a network --------------------------------------------


def open_terminals() -> dict[int, str]:
    """This process's descriptors on ptys (masters show as /dev/ptmx)."""
    found = {}
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{name}")
            if target == "/dev/ptmx" or target.startswith("/dev/pts/"):
                found[int(name)] = target
    return found


def test_a_terminal_job_that_cannot_fork_leaks_no_descriptor(
        monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    def fork_fails(self: object, path: str, uid: object, gid: object, executable: str,
                   args: list[str], environment: dict[str, str], **kwargs: Any) -> None:
        seen.update(environment)
        raise OSError(errno.EAGAIN, "Resource temporarily unavailable")

    monkeypatch.setattr(spawn.TerminalProcess, "_fork", fork_fails)
    proto = job.JobProcess(cast(Any, None), None, lambda code, sig, limit: None,
                           wire.Start(tty=True, rows=30, cols=100))
    before = open_terminals()
    with pytest.raises(OSError):
        spawn.spawn(None, proto, ["sh"], {"PATH": "/bin", "LINES": "24", "COLUMNS": "80"})
    assert open_terminals() == before  # both ends of the new pty are closed again
    assert seen == {"PATH": "/bin"}  # a terminal's size is its own, not the environment's
