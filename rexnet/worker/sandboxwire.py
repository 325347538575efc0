"""Messages between the worker and its root sandbox helper (and the helper and a job's
Python init).

Each message is a 4-byte big-endian length and a JSON object, descriptors passed with
SCM_RIGHTS on its first bytes. Bounded: MAX_MESSAGE bytes and MAX_FDS descriptors; a
message over the bounds, truncated descriptors or bad JSON is a WireError. receive() reads
one message from a blocking socket; a Reader takes them from a non-blocking one as they
come (the helper's event loop, which must never wait for one peer).
"""

from __future__ import annotations

import array
import json
import os
import socket
import struct
from collections.abc import Sequence
from typing import Any

MAX_MESSAGE = 4 << 20
MAX_FDS = 64
HEADER = struct.Struct(">I")
_SPACE = socket.CMSG_SPACE(MAX_FDS * 4)
_FLAGS = int(socket.MSG_CMSG_CLOEXEC | socket.MSG_DONTWAIT)  # plain ints: an enum's | and
_CTRUNC = int(socket.MSG_CTRUNC)  # & cost microseconds a call


class WireError(Exception):
    """A message broke the format or its bounds."""


def send(sock: socket.socket, message: dict[str, Any], fds: list[int] | tuple[int, ...] = ()
         ) -> None:
    body = json.dumps(message, separators=(",", ":")).encode()
    send_with_fds(sock, HEADER.pack(len(body)) + body, fds)


def ready(pid: int) -> bytes:
    """The message {"ready": PID}, framed (as send() would: without json.dumps)."""
    body = b'{"ready":%d}' % pid
    return HEADER.pack(len(body)) + body


def ended(code: int | None, number: int | None, limit: str) -> bytes:
    """The message {"code": CODE, "signal": NUMBER, "limit": LIMIT}, framed (as send()
    would, with one json.dumps of a string)."""
    body = b'{"code":%s,"signal":%s,"limit":%s}' % (
        b"null" if code is None else b"%d" % code, b"null" if number is None else b"%d" % number,
        json.dumps(limit).encode())
    return HEADER.pack(len(body)) + body


def send_with_fds(sock: socket.socket, data: bytes, fds: Sequence[int] = ()) -> None:
    """DATA on SOCK, its first bytes carrying the descriptors FDS (SCM_RIGHTS)."""
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    sent = sock.sendmsg([data], ancillary)
    if sent < len(data):
        sock.sendall(data[sent:])


def _exactly(sock: socket.socket, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = sock.recv(min(left, 1 << 16))
        if not chunk:
            raise WireError("the peer closed mid-message")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def descriptors(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % 4
            fds.extend(array.array("i", data[:usable]))
    return fds


def _decode(body: bytes) -> dict[str, Any]:
    try:
        message = json.loads(body)
    except ValueError as e:
        raise WireError(f"bad JSON: {e}") from None
    if not isinstance(message, dict):
        raise WireError("a message is a JSON object")
    return message


class Reader:
    """The messages of a non-blocking socket, read as they come: read() after the socket
    was readable returns the messages completed so far (with their descriptors, close-on-
    exec, the caller's); at EOF `ended` is set. A message that is not a JSON object is
    dropped (its descriptors closed) and why is added to `bad`; a broken frame (over the
    bounds, an EOF inside a message) raises WireError and ends the reader (the stream cannot
    be trusted past it). No read crosses the end of a message: a message's descriptors
    come with the read that starts it (a read across would get the next one's).
    read(1) stops at the end of the first message: a peer that sent more leaves its socket
    readable, and a socket that carries one message at a time (a job's) then needs no read
    that finds nothing."""

    CHUNK = 1 << 16
    READS = 64  # at most, per read(): one busy peer does not hold the caller

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.ended = False
        self.bad: list[str] = []
        self._buffer = bytearray()
        self._size = -1  # the body's, once its header is in
        self._fds: list[int] = []

    def read(self, most: int = 0) -> list[tuple[dict[str, Any], list[int]]]:
        """The messages completed so far (MOST: at most that many, dropped ones counted;
        0: as many as READS reads bring)."""
        done: list[tuple[dict[str, Any], list[int]]] = []
        bad = len(self.bad)
        try:
            for _ in range(self.READS):
                if self.ended or not self._read_some(done):
                    break
                if most and len(done) + len(self.bad) - bad >= most:
                    break
        except BaseException:
            self.ended = True
            self.close()
            for _, fds in done:
                for fd in fds:
                    os.close(fd)
            raise
        return done

    def _read_some(self, done: list[tuple[dict[str, Any], list[int]]]) -> bool:
        """One read (up to the end of the header or of the body); False: nothing there."""
        want = (HEADER.size if self._size < 0 else HEADER.size + self._size) - len(self._buffer)
        try:
            data, ancillary, flags, _ = self.sock.recvmsg(min(want, self.CHUNK), _SPACE,
                                                          _FLAGS)
        except (BlockingIOError, InterruptedError):
            return False
        if ancillary:
            self._fds.extend(descriptors(ancillary))
        if flags & _CTRUNC or len(self._fds) > MAX_FDS:
            raise WireError("too many descriptors")
        if not data:
            self.ended = True
            if self._buffer or self._fds:
                raise WireError("the peer closed mid-message")
            return False
        self._buffer += data
        if self._size < 0 and len(self._buffer) == HEADER.size:
            (self._size,) = HEADER.unpack(self._buffer)
            if self._size > MAX_MESSAGE:
                raise WireError(f"a message of {self._size} bytes (at most {MAX_MESSAGE})")
        if self._size >= 0 and len(self._buffer) == HEADER.size + self._size:
            body, fds = bytes(self._buffer[HEADER.size:]), self._fds
            self._buffer.clear()
            self._size, self._fds = -1, []
            try:
                done.append((_decode(body), fds))
            except WireError as e:
                for fd in fds:
                    os.close(fd)
                self.bad.append(str(e))
        return True

    def close(self) -> None:
        """Close the descriptors of a message not yet complete."""
        for fd in self._fds:
            os.close(fd)
        self._fds = []
        self._buffer.clear()
        self._size = -1


def receive(sock: socket.socket) -> tuple[dict[str, Any], list[int]] | None:
    """The next message and its descriptors (the caller owns them), or None at EOF."""
    head, ancillary, flags, _ = sock.recvmsg(HEADER.size, _SPACE)
    fds = descriptors(ancillary)
    try:
        if not head:
            if fds:
                raise WireError("descriptors without a message")
            return None
        if flags & _CTRUNC:
            raise WireError("too many descriptors")
        if len(head) < HEADER.size:
            head += _exactly(sock, HEADER.size - len(head))
        (size,) = HEADER.unpack(head)
        if size > MAX_MESSAGE:
            raise WireError(f"a message of {size} bytes (at most {MAX_MESSAGE})")
        message = _decode(_exactly(sock, size))
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return message, fds
