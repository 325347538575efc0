"""Detached jobs (`rexnet exec --detach`) and the worker's record of its jobs.

A detached job's process writes into an OutputLog instead of a client's channel: its
output frames go to a file under the state directory (at most --detached-output bytes;
the rest is counted, not kept), its EXIT is recorded there, and viewers (rexnet attach,
rexnet output: rexnet.worker.calls) read the file from the start and follow it. Its stdin
stays open until an attached client ends it. JobBook keeps a row for every job (owner,
command, state, status) and finished jobs for --keep-finished seconds.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from twisted.logger import Logger

from rexnet.net.channel import Channel
from rexnet.protocol import wire
from rexnet.security.credentials import CertInfo, Credential, is_admin
from rexnet.worker.files import JobDirectory, private_dir
from rexnet.worker.job import JobProcess

DEFAULT_OUTPUT = 16 << 20  # bytes of output kept per detached job
DEFAULT_KEEP = 3600.0  # seconds a finished job is kept
MAX_ROWS = 200  # as rexnet.protocol.jobframes.MAX_LISTED
MAX_FINISHED = 1000  # finished jobs remembered at most, the oldest forgotten first

log = Logger()


class OutputLog(Channel):
    """Stands in for a detached job's channel: what the job writes goes to PATH, at most
    LIMIT bytes of frames (a prefix of the output: once a frame is dropped, so is the rest);
    credit comes back at once; WATCHERS hear of each change."""

    def __init__(self, credential: Credential, reactor: Any, path: str, limit: int,
                 address: str) -> None:
        super().__init__(credential)
        self.reactor = reactor
        self.path = path
        self.limit = limit
        self.address = address
        self.fd: int | None = os.open(
            path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_NOFOLLOW, 0o600)
        self.size = 0
        self.dropped = 0
        self.exit: wire.Exit | None = None
        self.watchers: set[Callable[[], None]] = set()
        self.stdin_holder: Channel | None = None  # the attached client feeding stdin
        self.on_exit: Callable[[wire.Exit], None] = lambda exit: None
        self.verified = True

    def send(self, frame: wire.Frame) -> None:
        if isinstance(frame, wire.Data):
            room = self.limit - self.size - wire.FRAME_HEADER.size
            kept = frame.payload[:room] if self.fd is not None and not self.dropped else b""
            self.dropped += len(frame.payload) - len(kept)
            if kept:
                record = wire.encode_frame(wire.Data(frame.stream, kept))
                with contextlib.suppress(OSError):
                    view = memoryview(record)
                    while view:
                        view = view[os.write(self.fd, view):]  # type: ignore[arg-type]
                    self.size += len(record)
            self.reactor.callLater(0, self._credit, frame.stream, len(frame.payload))
            self._notify()
        elif isinstance(frame, wire.Window | wire.Shut) and frame.stream == 0:
            if self.stdin_holder is not None:  # the job's stdin: credit or its end
                self.stdin_holder.send(frame)
        elif isinstance(frame, wire.Exit):
            self.exit = frame
            if self.fd is not None:
                os.close(self.fd)
                self.fd = None
            self.on_exit(frame)
            self._notify()

    def _credit(self, stream: int, count: int) -> None:
        out = self.outs.get(stream)
        if out is not None:
            out.grant(count)

    def _notify(self) -> None:
        for watcher in list(self.watchers):
            watcher()

    def peer_address(self) -> str:
        return self.address

    def close(self, abort: bool = False) -> None:
        """Nothing to close: the job's end is recorded by its EXIT."""

    def job_ended(self, keep: bool) -> None:
        """The worker is done with the job (as for a channel)."""


def admitted(cert: x509.Certificate, owner: str, serial: int) -> str | None:
    """None if CERT may act on a job of OWNER (its certificate's SERIAL): the same
    certificate, or an admin credential; else why not."""
    if is_admin(cert):
        return None
    if cert.serial_number == serial and CertInfo.of(cert).name == owner:
        return None
    return (f"the job belongs to {owner}'s credential: only it, or an admin credential "
            "(rexnet keygen --issue admin), may act on it")


@dataclass
class Booked:
    """One job as the book keeps it."""

    job: str
    owner: str
    serial: int
    command: str
    detached: bool
    started: float
    process: JobProcess | None = None
    ended: float = 0.0
    status: int | None = None
    output: OutputLog | None = None
    directory: JobDirectory | None = None
    keep_dir: str = ""  # the detached job's own directory (its output)
    expiry: Any = field(default=None, repr=False)

    def row(self) -> wire.JobRow:
        return wire.JobRow(self.job, self.owner[:64], self.command[:200],
                           "finished" if self.ended else "running", round(self.started, 3),
                           round(self.ended, 3), self.status,
                           self.output.dropped if self.output else 0, self.detached)


class JobBook:
    """Every job of a worker while it runs, and finished ones for KEEP seconds; detached
    jobs' output under ROOT/detached/JOB (at most LIMIT bytes each)."""

    def __init__(self, reactor: Any, credential: Credential, root: str, limit: int,
                 keep: float, wall: Callable[[], float] = time.time) -> None:
        self.reactor = reactor
        self.credential = credential
        self.root = root
        self.limit = limit
        self.keep = keep
        self.wall = wall
        self.jobs: OrderedDict[str, Booked] = OrderedDict()
        self.finished = 0  # of the jobs, those that ended

    def output_log(self, job: str, address: str) -> OutputLog:
        """A fresh output file for detached JOB; OSError if the state directory fails."""
        path = os.path.join(private_dir(os.path.join(self.root, "detached")), job)
        os.mkdir(path, 0o700)
        return OutputLog(self.credential, self.reactor, os.path.join(path, "output"),
                         self.limit, address)

    def started(self, job: str, cert: x509.Certificate, command: str,
                process: JobProcess, output: OutputLog | None, owner: str = "") -> Booked:
        """JOB's row; OWNER: the name in CERT, when the caller has it already."""
        booked = Booked(job, owner or CertInfo.of(cert).name, cert.serial_number, command,
                        output is not None, self.wall(), process, output=output)
        if output is not None:
            booked.keep_dir = os.path.dirname(output.path)
        self.jobs[job] = booked
        return booked

    def ended(self, job: str, code: int | None, sig: int | None) -> None:
        booked = self.jobs.get(job)
        if booked is None:
            return
        was = booked.ended
        booked.ended = self.wall()
        booked.status = code if sig is None else 128 + sig
        booked.process = None
        booked.expiry = self.reactor.callLater(self.keep, self.forget, job)
        self.finished += bool(booked.ended) - bool(was)
        while self.finished > MAX_FINISHED:  # the oldest first (not a scan of them all)
            self.forget(next(j for j, b in self.jobs.items() if b.ended))

    def forget(self, job: str) -> None:
        """Drop JOB's row, output and directory (kept long enough)."""
        booked = self.jobs.pop(job, None)
        if booked is None:
            return
        self.finished -= bool(booked.ended)
        if booked.expiry is not None and booked.expiry.active():
            booked.expiry.cancel()
        if booked.directory is not None:
            booked.directory.remove()
        if booked.keep_dir:
            shutil.rmtree(booked.keep_dir, ignore_errors=True)

    def get(self, job: str) -> Booked | None:
        return self.jobs.get(job)

    @property
    def detached_running(self) -> int:
        return sum(1 for b in self.jobs.values() if b.detached and not b.ended)

    def rows(self) -> tuple[wire.JobRow, ...]:
        """The newest 200 jobs, oldest first."""
        return tuple(b.row() for b in list(self.jobs.values())[-MAX_ROWS:])

    def stop(self) -> None:
        """The worker stops: forget every job (their processes are ended by the worker)."""
        for job in list(self.jobs):
            self.forget(job)
