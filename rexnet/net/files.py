"""Files sent with a job over its channel (`--put`, `--get`): FileLane, both ways.

One file at a time: PUT_FILE (name, size, mode), then exactly SIZE bytes of FILE_DATA,
paced by the receiver's FILE_WINDOW credit (granted once the bytes are on disk), as the
streams are paced (rexnet.net.channel). The receiver writes into a directory it holds
open, by plain names only (rexnet.protocol.jobframes.check_file_name), never following a
symbolic link: each file goes to a fresh temporary name and is then linked to its own
name (refused if that exists, unless REPLACE), so a reader never sees half a file.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

from twisted.internet import defer

from rexnet.protocol import wire

FILE_WINDOW = 1 << 20
FILE_GRANT = FILE_WINDOW // 4
CHUNK = wire.MAX_DATA_CHUNK
MAX_OVERRUN = FILE_WINDOW + wire.MAX_FRAME


class FileError(wire.WireError):
    """A file that cannot be sent or received; the message is for people (received, it
    is the channel's protocol error: the peer is told, the channel closes)."""


@dataclass
class Outgoing:
    """A file to send: an open descriptor, the size announced and its permission bits."""

    name: str
    fd: int
    size: int
    mode: int = 0o644


def open_outgoing(path: str, name: str | None = None) -> Outgoing:
    """PATH opened for sending (a regular file), named NAME (default: its base name)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise FileError(f"cannot read {path}: {e.strerror}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise FileError(f"{path} is not a regular file")
    return Outgoing(name or os.path.basename(path.rstrip("/")), fd, st.st_size,
                    stat.S_IMODE(st.st_mode) & 0o755)


def collect(dirfd: int, patterns: tuple[str, ...], max_files: int, max_bytes: int
            ) -> tuple[list[Outgoing], list[str]]:
    """The regular files at the top of directory DIRFD matching PATTERNS, opened without
    following links, and notes on those refused (links, other kinds, over the bounds)."""
    out: list[Outgoing] = []
    notes: list[str] = []
    total = 0
    with os.scandir(dirfd) as entries:
        names = sorted(e.name for e in entries)
    for name in names:
        if not any(fnmatchcase(name, p) for p in patterns):
            continue
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dirfd)
        except OSError as e:
            why = "a symbolic link" if e.errno == errno.ELOOP else e.strerror
            notes.append(f"{name}: not sent ({why})")
            continue
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            notes.append(f"{name}: not sent (not a regular file)")
            continue
        if len(out) >= max_files or total + st.st_size > max_bytes:
            os.close(fd)
            notes.append(f"{name}: not sent (over {max_files} files or {max_bytes} bytes)")
            continue
        total += st.st_size
        out.append(Outgoing(name, fd, st.st_size, stat.S_IMODE(st.st_mode) & 0o755))
    return out, notes


Accept = Callable[[str, int], str | None]
"""accept(name, size): None to take the file, else why it is refused (the lane fails)."""


class FileLane:
    """The files of one channel: SEND some, and receive into DIRFD (if given).

    CHANNEL is the link (send(frame), congested); ACCEPT vets each incoming file; ON_FILE
    hears each file committed (or a note, for one not replacing an existing file);
    PROGRESS is called for each chunk received. A bad file raises FileError from
    frame(), which the channel turns into an error.
    """

    def __init__(self, channel: Any, dirfd: int | None = None, *, accept: Accept | None = None,
                 replace: bool = False, on_file: Callable[[str, str], None] | None = None,
                 progress: Callable[[], None] | None = None) -> None:
        self.channel = channel
        self.dirfd = dirfd
        self.accept = accept or (lambda name, size: None)
        self.replace = replace
        self.on_file = on_file or (lambda name, note: None)
        self.progress = progress or (lambda: None)
        self.received: list[str] = []
        self.bytes_in = 0
        self.credit = FILE_WINDOW
        self._sending: list[Outgoing] = []
        self._current: Outgoing | None = None
        self._left = 0
        self._sent: defer.Deferred[None] | None = None
        self._in: tuple[wire.PutFile, int, str] | None = None  # header, fd, temporary name
        self._in_left = 0
        self._outstanding = 0

    # -- sending ----------------------------------------------------------------------

    def send(self, files: list[Outgoing]) -> defer.Deferred[None]:
        """Send FILES in turn; fires once all are sent (errback FileError)."""
        if self._sent is not None:
            raise FileError("files are already being sent")
        self._sending = list(files)
        self._sent = defer.Deferred()
        done = self._sent
        self._next()
        return done

    def _next(self) -> None:
        if self._current is not None:
            os.close(self._current.fd)
            self._current = None
        if not self._sending:
            sent, self._sent = self._sent, None
            if sent is not None:
                sent.callback(None)
            return
        self._current = self._sending.pop(0)
        self._left = self._current.size
        self.channel.send(wire.PutFile(self._current.name, self._current.size,
                                       self._current.mode))
        self.resume()

    def resume(self) -> None:
        """Send what credit and the link allow (after credit came, or the link drained)."""
        while (self._current is not None and self.credit > 0 and not self.channel.closed
               and not self.channel.congested):
            current = self._current
            if self._left == 0:
                self._next()
                continue
            try:
                data = os.read(current.fd, min(CHUNK, self._left, self.credit))
            except OSError as e:
                self.fail(FileError(f"cannot read {current.name}: {e.strerror}"))
                return
            if not data:
                self.fail(FileError(f"{current.name} shrank while it was sent"))
                return
            self._left -= len(data)
            self.credit -= len(data)
            self.channel.send(wire.FileData(data))

    def fail(self, error: FileError) -> None:
        """Stop sending: close what is open; the send's Deferred fails with ERROR."""
        for f in [*self._sending, *([self._current] if self._current else [])]:
            with contextlib.suppress(OSError):
                os.close(f.fd)
        self._sending, self._current = [], None
        sent, self._sent = self._sent, None
        if sent is not None:
            sent.errback(error)

    # -- receiving --------------------------------------------------------------------

    def frame(self, frame: wire.Frame) -> None:
        """A file frame from the peer."""
        if isinstance(frame, wire.FileWindow):
            self.credit = min(self.credit + frame.credit, FILE_WINDOW)
            self.resume()
        elif isinstance(frame, wire.PutFile):
            self._begin(frame)
        elif isinstance(frame, wire.FileData):
            self._data(frame.payload)

    def _begin(self, header: wire.PutFile) -> None:
        if self.dirfd is None:
            raise FileError("no files are expected here")
        if self._in is not None:
            raise FileError("a file began before the last one ended")
        problem = self.accept(header.name, header.size)
        if problem:
            raise FileError(problem)
        temp = f".rexnet-part-{os.urandom(6).hex()}"
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600,
                         dir_fd=self.dirfd)
        except OSError as e:
            raise FileError(f"cannot write {header.name}: {e.strerror}") from None
        self._in, self._in_left = (header, fd, temp), header.size
        if header.size == 0:
            self._commit()

    def _data(self, payload: bytes) -> None:
        if self._in is None:
            raise FileError("file data outside a file")
        header, fd, _ = self._in
        if len(payload) > self._in_left:
            raise FileError(f"{header.name}: more bytes than the {header.size} announced")
        self._outstanding += len(payload)
        if self._outstanding > MAX_OVERRUN:
            raise FileError("the sender overran its file window")
        try:
            view = memoryview(payload)
            while view:
                view = view[os.write(fd, view):]
        except OSError as e:
            raise FileError(f"cannot write {header.name}: {e.strerror}") from None
        self._in_left -= len(payload)
        self.bytes_in += len(payload)
        self.progress()
        if self._in_left == 0:
            self._commit()
        elif self._outstanding >= FILE_GRANT:
            self._grant()

    def _grant(self) -> None:
        if self._outstanding:
            self.channel.send(wire.FileWindow(self._outstanding))
            self._outstanding = 0

    def _commit(self) -> None:
        assert self._in is not None and self.dirfd is not None
        header, fd, temp = self._in
        self._in = None
        d = self.dirfd
        try:
            os.fchmod(fd, header.mode & 0o755)
            os.close(fd)
            if self.replace:
                os.rename(temp, header.name, src_dir_fd=d, dst_dir_fd=d)
                note = ""
            else:
                try:
                    os.link(temp, header.name, src_dir_fd=d, dst_dir_fd=d,
                            follow_symlinks=False)
                    note = ""
                except FileExistsError:
                    note = "exists: not replaced (--force replaces it)"
                os.unlink(temp, dir_fd=d)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.unlink(temp, dir_fd=d)
            raise FileError(f"cannot write {header.name}: {e.strerror}") from None
        if not note:
            self.received.append(header.name)
        self._grant()
        self.on_file(header.name, note)

    def abort(self) -> None:
        """The channel is gone: drop a half-received file and stop sending."""
        if self._in is not None and self.dirfd is not None:
            _, fd, temp = self._in
            self._in = None
            with contextlib.suppress(OSError):
                os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(temp, dir_fd=self.dirfd)
        self.fail(FileError("the connection was lost"))
