"""Reading local pipes and sockets in large pieces (for the job's and the client's streams)."""

from __future__ import annotations

import errno
import os
from typing import Any

from twisted.internet import main, process

READ_SIZE = 64 * 1024


class PipeReader(process.ProcessReader):
    """A pipe (or socket) reader that reads 64 KiB at a time (Twisted reads 8 KiB)."""

    def doRead(self) -> Any:
        try:
            data = os.read(self.fd, READ_SIZE)
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EINTR):
                return None
            return main.CONNECTION_LOST
        if not data:
            return main.CONNECTION_DONE
        self.dataReceived(data)
        return None
