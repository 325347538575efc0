"""The root sandbox helper's stderr in the worker's log.

The helper (rexnet.worker.sandboxd) and the inits it starts write their complaints to
stderr, one line each. The worker gives them a pipe of their own and reads it in the
reactor: each line becomes one warning of the worker's log (namespace
rexnet.worker.sandboxd, the line in the event's `complaint` field), so a JSON log
(twistd --logger rexnet.logs.json_logger) stays JSON, and a daemonized worker keeps what
went to /dev/null before. Bounded: a line longer than MAX_LINE bytes is logged in parts;
control characters are escaped.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

from twisted.internet.interfaces import IReadDescriptor
from twisted.logger import Logger
from zope.interface import implementer

from rexnet.protocol.text import printable

MAX_LINE = 2000  # bytes of one line; a longer one is logged in parts
PREFIX = "rexnet-sandboxd: "  # how the helper starts its lines (sandboxd.complain)

log = Logger(namespace="rexnet.worker.sandboxd")


@implementer(IReadDescriptor)
class HelperLog:
    """Reads FD (the read end of the helper's stderr; closed at its end) in REACTOR and
    logs each line."""

    def __init__(self, reactor: Any, fd: int) -> None:
        self.reactor = reactor
        self.fd = fd
        self.buffer = b""
        os.set_blocking(fd, False)
        reactor.addReader(self)

    def fileno(self) -> int:
        return self.fd

    def logPrefix(self) -> str:
        return "sandbox helper"

    def doRead(self) -> None:
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return None
        except OSError:
            data = b""
        if not data:  # the helper is gone
            self.reactor.removeReader(self)
            self.connectionLost(None)
            return None
        *lines, self.buffer = (self.buffer + data).split(b"\n")
        for line in lines:
            self._line(line)
        while len(self.buffer) > MAX_LINE:
            self._line(self.buffer[:MAX_LINE])
            self.buffer = self.buffer[MAX_LINE:]
        return None

    def _line(self, line: bytes) -> None:
        for start in range(0, len(line), MAX_LINE):
            text = line[start:start + MAX_LINE].decode("utf-8", "replace").rstrip()
            text = text.removeprefix(PREFIX)
            if text:
                log.warn("sandbox helper: {complaint}", complaint=printable(text, MAX_LINE))

    def connectionLost(self, reason: object) -> None:
        """The helper is gone (also on a hang-up the reactor saw without reading)."""
        self._line(self.buffer)
        self.buffer = b""
        if self.fd >= 0:  # once: the number may be another descriptor's after
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1
