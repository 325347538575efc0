"""A job's files and detachment on the client: FileStreams wraps the job's streams.

`--put FILE` files are opened when the job is made (their sizes go in START) and sent
right after START (the worker runs the job once they are in); `--get PATTERN` files
come back before EXIT into the client's directory, each committed atomically under its
own name (never over an existing file without --force); the worker may send only names
the patterns match, at most wire.MAX_FILES files of MAX_GET_BYTES in all. A detached
job (`--detach`) is sent no input: its stdin is for a later `rexnet attach`.
"""

from __future__ import annotations

import contextlib
import os
from fnmatch import fnmatchcase
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from rexnet.client.streams import JobStreams
from rexnet.net.channel import Channel
from rexnet.net.files import FileError, FileLane, Outgoing, open_outgoing
from rexnet.protocol import exitcodes, wire
from rexnet.protocol.request import ExecRequest, RequestError

MAX_GET_BYTES = 4 << 30

log = Logger()


class FileStreams:
    """INNER's streams, with REQUEST's files (--put, --get) and --detach."""

    def __init__(self, reactor: Any, inner: JobStreams, request: ExecRequest) -> None:
        self.reactor = reactor
        self.inner = inner
        self.request = request
        self.outgoing: list[Outgoing] = []
        self.dirfd: int | None = None
        self.lane: FileLane | None = None
        self.notes: list[str] = []
        self.seen: list[str] = []  # the files that came back (written or not)
        self._taken = 0
        self._bytes = 0
        try:
            for path in request.put:
                self.outgoing.append(open_outgoing(path))
            if request.get:
                self.dirfd = os.open(request.get_dir, os.O_RDONLY | os.O_DIRECTORY)
        except (FileError, OSError) as e:
            self.close()
            message = str(e) if isinstance(e, FileError) else f"--get: {e.strerror}"
            raise RequestError(message if message.startswith("--") else f"--put: {message}",
                               exitcodes.USAGE) from None

    @property
    def declared(self) -> tuple[tuple[str, int], ...]:
        """START's "put": the names and sizes of the files that follow it."""
        return tuple((f.name, f.size) for f in self.outgoing)

    def prepare(self, channel: Channel) -> None:
        self.inner.prepare(channel)
        self.lane = FileLane(channel, self.dirfd, accept=self._accept,
                             replace=self.request.force, on_file=self._got)
        channel.files = self.lane
        if self.outgoing:  # after START, which the job's core sends once this returns
            self.reactor.callLater(0, self._send)

    def _send(self) -> None:
        assert self.lane is not None
        outgoing, self.outgoing = self.outgoing, []
        self.lane.send(outgoing).addErrback(
            lambda f: log.warn("--put: {why}", why=f.getErrorMessage()))

    def _accept(self, name: str, size: int) -> str | None:
        if not any(fnmatchcase(name, p) for p in self.request.get):
            return f"the worker sent {name!r}, which no --get pattern asked for"
        self._taken += 1
        self._bytes += size
        if self._taken > wire.MAX_FILES or self._bytes > MAX_GET_BYTES:
            return f"the worker sent more than {wire.MAX_FILES} files or {MAX_GET_BYTES} bytes"
        return None

    def _got(self, name: str, note: str) -> None:
        self.seen.append(name)
        if note:
            self.notes.append(f"--get: {name} {note}")

    def start_input(self) -> None:
        if not self.request.detach:
            self.inner.start_input()

    def finish(self) -> defer.Deferred[Any]:
        for pattern in self.request.get:
            if not any(fnmatchcase(name, pattern) for name in self.seen):
                self.notes.append(f"--get {pattern}: no such file came back from the job's "
                                  "directory (only regular files at its top are sent)")
        for note in self.notes:
            log.warn("{note}", note=note)
        if self.lane is not None:
            self.lane.abort()
        self.close()
        return self.inner.finish()

    def close(self) -> None:
        for f in self.outgoing:
            with contextlib.suppress(OSError):
                os.close(f.fd)
        self.outgoing = []
        if self.dirfd is not None:
            with contextlib.suppress(OSError):
                os.close(self.dirfd)
            self.dirfd = None
