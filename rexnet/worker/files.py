"""A job's own working directory on the worker, and the files sent with it.

`rexnet exec --put FILE --get PATTERN`: the client's START names the files it sends
(name, size); the worker makes a fresh directory (mode 0700) under its state directory,
takes exactly those files into it (rexnet.net.files.FileLane: plain names, no links
followed, within --job-files bytes), runs the job there, sends back the regular files
matching the patterns when the job ends, and removes the directory.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from rexnet.net.files import FileLane, collect
from rexnet.protocol import wire

DEFAULT_JOB_FILES = 1 << 30

log = Logger()


def default_state_dir() -> str:
    """/var/lib/rexnet for root, else $XDG_STATE_HOME/rexnet (~/.local/state/rexnet)."""
    if os.geteuid() == 0:
        return "/var/lib/rexnet"
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return os.path.join(base, "rexnet")


@dataclass(frozen=True)
class FileSettings:
    """Where a worker's job directories go (ROOT/work) and how much a job may send each
    way (MAX_BYTES, in at most wire.MAX_FILES files)."""

    root: str
    max_bytes: int = DEFAULT_JOB_FILES


def private_dir(path: str) -> str:
    """PATH, made (mode 0700, parents too) if missing; OSError if it cannot be."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    return path


class JobDirectory:
    """A fresh directory for one job, held open (DIRFD) so that names resolve inside it."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.dirfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        self.removed = False

    @classmethod
    def create(cls, settings: FileSettings) -> JobDirectory:
        """A new directory under SETTINGS.root/work; OSError if it cannot be made."""
        return cls(tempfile.mkdtemp(prefix="job-", dir=private_dir(
            os.path.join(settings.root, "work"))))

    def remove(self) -> None:
        if not self.removed:
            self.removed = True
            with contextlib.suppress(OSError):
                os.close(self.dirfd)
            shutil.rmtree(self.path, ignore_errors=True)  # never follows links


def receive(channel: Any, directory: JobDirectory, start: wire.Start, settings: FileSettings,
            complain: Callable[[str], None], done: Callable[[], None],
            progress: Callable[[], None]) -> FileLane:
    """A lane taking START's announced files into DIRECTORY; DONE once all are in."""
    expected = dict(start.put)
    total = sum(expected.values())

    def accept(name: str, size: int) -> str | None:
        problem = None
        if name not in expected or name in lane.received:
            problem = f"file {name!r} was not announced by START (or came twice)"
        elif size != expected[name]:
            problem = f"file {name!r} is not of the size START announced"
        elif total > settings.max_bytes:
            problem = (f"the job's files ({total} bytes) exceed this worker's limit of "
                       f"{settings.max_bytes} bytes (--job-files)")
        if problem:
            complain(problem)
        return problem

    def arrived(name: str, note: str) -> None:
        if len(lane.received) == len(expected):
            done()

    lane = FileLane(channel, directory.dirfd, accept=accept, on_file=arrived,
                    progress=progress)
    return lane


def send_back(lane: FileLane, directory: JobDirectory, patterns: tuple[str, ...],
              settings: FileSettings, complain: Callable[[str], None]
              ) -> defer.Deferred[None]:
    """Send the files of DIRECTORY matching PATTERNS over LANE; fires when sent (or when
    they could not be: the client is told by the missing files, the worker logs it)."""
    try:
        files, notes = collect(directory.dirfd, patterns, wire.MAX_FILES, settings.max_bytes)
    except OSError as e:
        complain(f"cannot read the job directory: {e.strerror}")
        return defer.succeed(None)
    for note in notes:
        complain(f"--get {note}")
    sent = lane.send(files)
    sent.addErrback(lambda f: log.warn("files not sent back: {why}",
                                       why=f.getErrorMessage()))
    return sent
