"""Messages between the worker and a job's root supervisor (and the supervisor's init).

Each message is a 4-byte big-endian length and a JSON object, descriptors passed with
SCM_RIGHTS on its first bytes. Bounded: MAX_MESSAGE bytes and MAX_FDS descriptors; a
message over the bounds, truncated descriptors or bad JSON is a WireError.
"""

from __future__ import annotations

import array
import json
import os
import socket
import struct
from typing import Any

MAX_MESSAGE = 4 << 20
MAX_FDS = 64
HEADER = struct.Struct(">I")


class WireError(Exception):
    """A message broke the format or its bounds."""


def send(sock: socket.socket, message: dict[str, Any], fds: list[int] | tuple[int, ...] = ()
         ) -> None:
    body = json.dumps(message, separators=(",", ":")).encode()
    data = HEADER.pack(len(body)) + body
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


def receive(sock: socket.socket) -> tuple[dict[str, Any], list[int]] | None:
    """The next message and its descriptors (the caller owns them), or None at EOF."""
    head, ancillary, flags, _ = sock.recvmsg(HEADER.size, socket.CMSG_SPACE(MAX_FDS * 4))
    fds: list[int] = []
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % 4
            fds.extend(array.array("i", data[:usable]))
    try:
        if not head:
            if fds:
                raise WireError("descriptors without a message")
            return None
        if flags & socket.MSG_CTRUNC:
            raise WireError("too many descriptors")
        if len(head) < HEADER.size:
            head += _exactly(sock, HEADER.size - len(head))
        (size,) = HEADER.unpack(head)
        if size > MAX_MESSAGE:
            raise WireError(f"a message of {size} bytes (at most {MAX_MESSAGE})")
        try:
            message = json.loads(_exactly(sock, size))
        except ValueError as e:
            raise WireError(f"bad JSON: {e}") from None
        if not isinstance(message, dict):
            raise WireError("a message is a JSON object")
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return message, fds
