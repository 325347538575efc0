"""Starting real workers and clients for end-to-end tests (on loopback or in namespaces)."""

from __future__ import annotations

import itertools
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent
TWISTD = str(BIN / "twistd")
REXNET = str(BIN / "rexnet")
LAUNCHERS = {"python": str(BIN / "rexnet-py"), "native": str(BIN / "rexnet-native")}
"""The two launchers `make install` puts behind `rexnet` (rexnet.cli.entry)."""

_next = itertools.count(1)


def loopback_address() -> str:
    """A fresh 127.x.y.z address for one worker of this test process."""
    n = next(_next)
    return f"127.{(os.getpid() % 200) + 20}.{n // 250}.{n % 250 + 2}"


Popen = Callable[..., "subprocess.Popen[bytes]"]


class Proc:
    """A started process whose combined output is collected in the background."""

    def __init__(self, argv: Sequence[str], popen: Popen = subprocess.Popen, **kw: Any) -> None:
        self.argv = list(argv)
        self.process = popen(self.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, **kw)
        self._lines: list[str] = []
        self._lock = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.process.pid

    def _read(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            with self._lock:
                self._lines.append(raw.decode(errors="replace"))
                self._lock.notify_all()
        with self._lock:
            self._lock.notify_all()

    @property
    def output(self) -> str:
        with self._lock:
            return "".join(self._lines)

    def wait_for(self, pattern: str, timeout: float = 15.0) -> re.Match[str]:
        """Wait until the output matches PATTERN; fail with the output so far."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                match = regex.search("".join(self._lines))
                if match:
                    return match
                left = deadline - time.monotonic()
                if left <= 0 or (self.process.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(
                        f"{pattern!r} not seen from {self.argv}:\n{''.join(self._lines)}")
                self._lock.wait(min(left, 0.2))

    def wait_count(self, pattern: str, count: int, timeout: float = 15.0) -> list[Any]:
        """Wait until the output holds COUNT matches of PATTERN (a worker logs a job's line
        once its EXIT is sent, so after its client may have ended); return them all (as
        re.findall does). Fails with the output so far."""
        regex = re.compile(pattern, re.M)
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                found = regex.findall("".join(self._lines))
                if len(found) >= count:
                    return found
                left = deadline - time.monotonic()
                if left <= 0 or (self.process.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(f"{len(found)} of {count} {pattern!r} seen from "
                                         f"{self.argv}:\n{''.join(self._lines)}")
                self._lock.wait(min(left, 0.2))

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        """Signal the process, wait for it (KILL after TIMEOUT); return its exit status."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._reader.join(5)
        return self.process.returncode


def worker_argv(
    keyfile: Path | str, command: Sequence[str], listen: str, name: str, *options: str
) -> list[str]:
    return [TWISTD, "-n", "--pidfile=", "rexnet-worker", "--listen", listen, "--name", name,
            *options, str(keyfile), *command]


def start_worker(
    keyfile: Path | str,
    command: Sequence[str],
    listen: str,
    name: str,
    *options: str,
    popen: Popen = subprocess.Popen,
) -> Proc:
    """Start a worker and wait until it listens."""
    proc = Proc(worker_argv(keyfile, command, listen, name, *options), popen=popen)
    proc.wait_for(r"listening on")
    return proc


def exec_argv(keyfile: Path | str, announce: Sequence[str], *options: str,
              rexnet: str = REXNET) -> list[str]:
    """rexnet exec with OPTIONS; whatever follows "--" in OPTIONS goes after KEYFILE."""
    argv = [rexnet, "exec"]
    for target in announce:
        argv += ["--announce", target]
    opts = list(options)
    rest: list[str] = []
    if "--" in opts:
        rest = opts[opts.index("--"):]
        opts = opts[: opts.index("--")]
    return [*argv, *opts, str(keyfile), *rest]


def run_exec(
    keyfile: Path | str,
    announce: Sequence[str],
    *options: str,
    input: bytes = b"",
    timeout: float = 60.0,
    wrap: Callable[[list[str]], list[str]] = lambda argv: argv,
    rexnet: str = REXNET,
) -> subprocess.CompletedProcess[bytes]:
    """Run `rexnet exec` to completion and return what it did."""
    return subprocess.run(wrap(exec_argv(keyfile, announce, *options, rexnet=rexnet)), input=input,
                          capture_output=True, timeout=timeout)


def sleep_marker() -> str:
    """A sleep duration no other process has: a job's `sleep MARKER` is found on the host
    by its command line (the job's own $! is a pid of its sandbox's PID namespace)."""
    return f"60.{os.getpid()}{time.monotonic_ns() % 100000}"


def host_pid(cmdline: str, timeout: float = 10.0) -> int:
    """The host pid of the process whose command line is CMDLINE (waits for it)."""
    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in psutil.process_iter(["cmdline"]):
            if " ".join(p.info["cmdline"] or ()) == cmdline:
                return p.pid
        time.sleep(0.05)
    raise AssertionError(f"no process {cmdline!r}")
