"""Reading and writing local pipes and sockets in large pieces (the job's and the client's
streams): reads of READ_SIZE, writers that buffer WRITE_BUFFER before they pause their
producer (a channel stream, which then holds back the peer's credit), pipes widened to
tuning.PIPE_SIZE where the kernel allows."""

from __future__ import annotations

import errno
import os
from typing import Any

from twisted.internet import main, process
from twisted.python.failure import Failure

from rexnet.net.tuning import widen_pipe

READ_SIZE = 256 * 1024
WRITE_BUFFER = 256 * 1024


class PipeReader(process.ProcessReader):
    """A pipe (or socket) reader that reads 256 KiB at a time (Twisted reads 8 KiB)."""

    def __init__(self, reactor: Any, proc: Any, name: Any, fileno: int) -> None:
        widen_pipe(fileno)
        super().__init__(reactor, proc, name, fileno)

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


class PipeWriter(process.ProcessWriter):
    """A pipe (or socket) writer whose pipe is widened first; it pauses its producer over
    WRITE_BUFFER bytes (Twisted's 64 KiB held the peer's credit back at every full pipe)."""

    bufferSize = WRITE_BUFFER
    SEND_LIMIT = WRITE_BUFFER

    def __init__(self, reactor: Any, proc: Any, name: Any, fileno: int,
                 forceReadHack: bool = False) -> None:
        widen_pipe(fileno)
        super().__init__(reactor, proc, name, fileno, forceReadHack)

    def close_if_written(self) -> bool:
        """Close now if every byte written to it is out and no producer is registered (also
        after loseConnection, which would close it a turn of the reactor later): the owner
        hears childConnectionLost at once (an agent's launcher waits for that before its
        status). False, and nothing done, otherwise."""
        if (not self.connected or self.producer is not None
                or self._tempDataLen or len(self.dataBuffer) > self.offset):
            return False
        self.stopReading()
        self.stopWriting()
        self.connectionLost(Failure(main.CONNECTION_DONE))
        return True
