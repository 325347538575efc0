"""One running job on a worker: the process, its pipes, and their link to the channel."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from twisted.internet import main, process
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from rexnet import wire
from rexnet.channel import Channel, InStream, OutStream

READ_SIZE = 64 * 1024
KILL_GRACE = 2.0

log = Logger()


class PipeReader(process.ProcessReader):
    """A process pipe reader that reads 64 KiB at a time (Twisted reads 8 KiB)."""

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


class SessionProcess(process.Process):
    """A child process that leads its own session, so its whole group can be signalled."""

    processReaderFactory = PipeReader

    def _trySpawnInsteadOfFork(self, *args: Any, **kwargs: Any) -> bool:
        return False  # posix_spawn cannot call setsid here; fork and setsid instead

    def _setupChild(self, *args: Any, **kwargs: Any) -> None:
        os.setsid()
        super()._setupChild(*args, **kwargs)


def exit_status(reason: Failure) -> tuple[int | None, int | None]:
    """(exit code, None) or (None, signal number) from a processEnded reason."""
    value = reason.value
    sig = getattr(value, "signal", None)
    if sig:
        return None, int(sig)
    code = getattr(value, "exitCode", None)
    return (int(code) if code is not None else 0), None


class JobProcess(ProcessProtocol):
    """Bridges a job's stdin, stdout and stderr to streams 0, 1 and 2 of a channel."""

    def __init__(
        self,
        channel: Channel,
        clock: IReactorTime,
        on_end: Callable[[int | None, int | None], None],
    ) -> None:
        self.channel = channel
        self.clock = clock
        self.on_end = on_end
        self.ended = False
        self.pid: int | None = None

    def connectionMade(self) -> None:
        pipes = self.transport.pipes  # type: ignore[union-attr]
        self.pid = self.transport.pid  # type: ignore[union-attr]
        self.channel.ins[0] = InStream(self.channel, 0, pipes[0])
        for fd in (1, 2):
            out = OutStream(self.channel, fd)
            self.channel.outs[fd] = out
            out.attach(pipes[fd])

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        self.channel.outs[childFD].write(data)

    def childConnectionLost(self, childFD: int) -> None:
        if childFD == 0:
            stdin = self.channel.ins.get(0)
            if stdin is not None and not stdin.eof:
                stdin.drop_sink()
                self.channel.send(wire.Eof(0))  # tell the client to stop sending
        else:
            self.channel.outs[childFD].close()

    def processEnded(self, reason: Failure) -> None:
        self.ended = True
        self.on_end(*exit_status(reason))

    def kill_group(self, sig: int = signal.SIGTERM) -> None:
        """Signal the job's process group; KILL it if it outlives the grace period."""
        if self.ended or self.pid is None:
            return
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            return
        if sig != signal.SIGKILL:
            self.clock.callLater(KILL_GRACE, self._force)

    def _force(self) -> None:
        if not self.ended and self.pid is not None:
            log.warn("job process group {pid} outlived SIGTERM; sending SIGKILL", pid=self.pid)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)


def spawn(
    reactor: Any,
    proto: JobProcess,
    argv: Sequence[str],
    env: Mapping[str, str],
    cwd: str | None = None,
) -> SessionProcess:
    """Start ARGV as the job of PROTO, with pipes for fds 0, 1 and 2."""
    return SessionProcess(
        reactor, argv[0], list(argv), dict(env), cwd, proto, None, None,
        {0: "w", 1: "r", 2: "r"},
    )
