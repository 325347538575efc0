"""The job's streams on the client: JobStreams, and StdioStreams for `rexnet exec`'s descriptors."""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import stat
import threading
import typing
from typing import Any

from twisted.internet import defer
from twisted.python.failure import Failure

from rexnet.net.channel import Channel, InStream, OutStream
from rexnet.net.jobdata import STDIN, STDOUT, TOKEN_SIZE, DataPort, Truncated
from rexnet.net.pipes import PipeReader, PipeWriter
from rexnet.net.tuning import HANDOVER
from rexnet.protocol import wire


class JobStreams(typing.Protocol):
    """Where a ClientJob's streams go: StdioStreams (descriptors), ProducerStreams
    (Twisted producers and consumers) or BytesStreams (bytes in, buffers out)."""

    def prepare(self, channel: Channel) -> None:
        """Be ready for the job's output (a worker was chosen; the job has not started)."""

    def start_input(self) -> None:
        """The job started: send its input."""

    def finish(self) -> defer.Deferred[Any]:
        """The job ended (or failed): stop input; fire once the output is delivered."""
        ...


class StdioStreams:
    """Connects the client's descriptors to a job channel's streams.

    Descriptors 0, 1 and 2 always (in a terminal, 1 carries the terminal's output and 2 is
    unused); further descriptors by FDS: "r" the job reads it, "w" the job writes it,
    "rw" both. LOCAL maps a stream to the descriptor that serves it here (the agent's
    copies of its launcher's descriptors); by default the stream's own number.
    """

    def __init__(self, reactor: Any, tty: bool = False, fds: dict[int, str] | None = None,
                 local: dict[int, int] | None = None) -> None:
        self.reactor = reactor
        self.local = dict(local or {})
        self.tty = tty
        self.fds = dict(fds or {})
        self.outputs = [1] if tty else [1, 2]
        self.outputs += [fd for fd, mode in self.fds.items() if "w" in mode]
        self.inputs = [0, *(fd for fd, mode in self.fds.items() if "r" in mode)]
        self._flushed: dict[int, defer.Deferred[None]] = {}
        self._writers: dict[int, PipeWriter] = {}
        self._readers: dict[int, PipeReader] = {}
        self._dups: list[int] = []
        self.channel: Channel | None = None
        self.data_port: DataPort | None = None  # opened at the first handover
        self.offered: dict[int, str] = {}  # the streams START offered to take apart
        self.may: set[int] = set()  # ... and the worker would take
        self.apart: set[int] = set()  # the streams handed over
        self.in_sent = 0  # stdin's bytes sent in-band
        self._ending = False  # finish or abort closes the writers: no SHUT then
        self._job: Any = None
        self._token = b""
        self._gate: threading.Event | None = None
        self.truncated = ""  # why stdout's data connection ended without close_notify

    def offer(self, channel: Channel, request: wire.Start, job: Any) -> tuple[str, str] | None:
        """What REQUEST (a START) offers: moving stdin and stdout onto data connections of
        their own once they prove big (rexnet.net.jobdata), where they are pipes or files
        and the job has no terminal: (data_streams, data_token) to set in it, or None (it
        goes as it is; rexnet.client.channel.start_bytes sets them in its bytes). No port
        opens yet. JOB (a JobCore) has the credential, the revocations, and the log and
        alerts to complain to."""
        self.close_data_port()
        self.data_port, self.offered, self.may, self.apart = None, {}, set(), set()
        self.in_sent, self._gate = 0, None
        if self.tty or request.tty or request.detach or channel.peer_cert is None:
            return None
        for fd, stream in ((0, STDIN), (1, STDOUT)):
            if fd not in self.fds and _bulk(self.local.get(fd, fd)):
                self.offered[fd] = stream
        if not self.offered:
            return None
        self._job, self._token = job, os.urandom(TOKEN_SIZE)
        return "".join(self.offered.values()), self._token.hex()

    def take_apart(self, stdin: bool, stdout: bool) -> None:
        """STARTED said which streams the worker would take apart (APART, later)."""
        self.may = {fd for fd, yes in ((0, stdin), (1, stdout)) if yes and fd in self.offered}
        if self.channel is not None:
            self.channel.on_apart = self._apart_received if self.may else None

    def _port(self) -> DataPort | None:
        """The job's data port, opened at its first handover (None if it cannot open)."""
        if self.data_port is None and self.channel is not None:
            job = self._job

            def complain(peer: str, problem: str) -> None:
                what = f"data connection refused: {problem}"
                job.log.warn("complaint: {peer}: {what}", peer=peer, what=what)
                job.alerts.send("complaint", what=what, source=peer,
                                client=job.credential.name)

            try:
                host = self.channel.transport.getHost().host  # type: ignore[union-attr]
                self.data_port = DataPort(self.reactor, job.credential, job.revoked, host,
                                          self.channel.peer_cert, None, None, complain,
                                          self._token)
            except (OSError, AttributeError) as e:
                job.log.warn("the job's data port cannot open ({why}): its streams stay "
                             "in-band", why=e)
                self.may.clear()
        return self.data_port

    def _hand_stdin(self) -> None:
        """Stdin went HANDOVER bytes in-band: the rest goes on its data connection."""
        reader, channel, port = self._readers.get(0), self.channel, self._port()
        if reader is None or channel is None or port is None or port.closed:
            return
        del self._readers[0]
        out = channel.outs[0]
        out.detach()  # every byte the reader read is on the channel already
        out.closed = True  # no EOF in-band: close_notify ends it
        port.add(STDIN, self.local.get(0, 0))
        self.apart.add(0)
        channel.send(wire.Apart(0, port.port))

    def _apart_received(self, frame: wire.Apart) -> None:
        """The worker's stdout went big: APART(1, 0) after its last in-band byte."""
        channel = self.channel
        if frame.stream != 1 or frame.port or 1 not in self.may or 1 in self.apart:
            raise wire.WireError(f"unexpected APART of stream {frame.stream}")
        port = self._port()
        writer = self._writers.get(1)
        if (port is None or port.closed or writer is None or not writer.connected
                or channel is None):
            if channel is not None:
                channel.send(wire.Apart(1, 0))  # stay in-band
            return
        gate = self._gate = threading.Event()
        port.add(STDOUT, self.local.get(1, 1), gate)
        self.apart.add(1)
        channel.ins[1] = ApartOutput(channel, port)
        writer.unregisterProducer()
        writer.loseConnection()  # childConnectionLost opens the gate once all is written
        channel.send(wire.Apart(1, port.port))

    def _cut(self, failure: Failure) -> None:
        failure.trap(Truncated)
        self.truncated = str(failure.value)

    def close_data_port(self) -> None:
        if self.data_port is not None:
            self.data_port.close()

    def prepare(self, channel: Channel) -> None:
        """Be ready for the job's output (before the job starts)."""
        self.channel = channel
        for fd in self.outputs:
            target = self.local.get(fd, fd)
            if fd in self.inputs:  # read-write: a second descriptor for the writer
                target = os.dup(target)
                self._dups.append(target)
            writer = PipeWriter(self.reactor, self, ("out", fd), target)
            self._writers[fd] = writer
            self._flushed[fd] = defer.Deferred()
            channel.ins[fd] = InStream(channel, fd, writer)

    def start_input(self) -> None:
        """The worker accepted the job: start sending our input descriptors."""
        assert self.channel is not None
        for fd in self.inputs:
            if fd in self.apart:
                continue
            out = OutStream(self.channel, fd)
            self.channel.outs[fd] = out
            if _null(self.local.get(fd, fd)):  # EOF at once (and epoll refuses /dev/null:
                out.close()  # Twisted would poll it on a timer until it read that EOF)
                continue
            try:
                reader = PipeReader(self.reactor, self, ("in", fd), self.local.get(fd, fd))
            except OSError:
                out.close()  # the descriptor is closed: the job reads EOF
                continue
            self._readers[fd] = reader
            out.attach(reader)

    # the ProcessReader/ProcessWriter callbacks
    def childDataReceived(self, name: tuple[str, int], data: bytes) -> None:
        assert self.channel is not None
        self.channel.outs[name[1]].write(data)
        if name[1] == 0 and 0 in self.may and 0 not in self.apart:
            self.in_sent += len(data)
            if self.in_sent >= HANDOVER:
                self._hand_stdin()

    def childConnectionLost(self, name: tuple[str, int], reason: Failure) -> None:
        direction, fd = name
        if direction == "in":
            if self.channel is not None and fd in self.channel.outs:
                self.channel.outs[fd].close()
            return
        stream = self.channel.ins.get(fd) if self.channel else None
        if (stream is not None and not stream.eof and not self._ending
                and not isinstance(stream, ApartOutput)):
            # our reader went away (EPIPE; the writer dropped its producer, the sink,
            # already): discard the rest, and SHUT tells the worker to close the job's
            # end, so the job's next write gets SIGPIPE as if it ran here
            stream.drop_sink()
            if self.channel is not None:
                self.channel.send(wire.Shut(fd))
        if fd in self.inputs:
            with contextlib.suppress(OSError):
                socket.socket(fileno=os.dup(self.local.get(fd, fd))).shutdown(socket.SHUT_WR)
        if fd == 1 and self._gate is not None:
            self._gate.set()  # every in-band byte is written: stdout's thread goes on
        flushed = self._flushed.get(fd)
        if flushed is not None and not flushed.called and fd not in self.apart:
            flushed.callback(None)

    def finish(self) -> defer.Deferred[Any]:
        """Fires once every byte of output is written; stops reading input."""
        self._ending = True
        if self.data_port is not None:
            port_done = self.data_port.finish()
            if 1 in self.apart:  # stdout's thread: to its close_notify, all written
                port_done.addErrback(self._cut).chainDeferred(self._flushed[1])
        for reader in self._readers.values():
            if reader.connected:
                reader.stopReading()
                reader.connected = False
        for writer in self._writers.values():
            if not writer.connected:
                continue
            if not writer.disconnecting:  # (else EOF came: InStream.end did these)
                writer.unregisterProducer()
            # all written (EOF and EXIT often come together): closed now, not a turn later
            if not writer.close_if_written() and not writer.disconnecting:
                writer.loseConnection()
        flushed = list(self._flushed.values())
        # all written already (the common end: EXIT after the output's EOF), so no
        # DeferredList to wait for them: the owner hears it in the same call
        done: defer.Deferred[Any] = (
            defer.succeed(None) if all(d.called and d.result is None for d in flushed)
            else defer.gatherResults(flushed))

        def close_dups(result: object) -> object:
            self.close_data_port()
            for fd in self._dups:
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._dups = []
            return result

        return done.addBoth(close_dups)

    def abort(self) -> None:
        """Stop using the descriptors at once, written or not (the agent lets go of its
        launcher's descriptors when the job ends or the launcher goes away)."""
        self._ending = True
        self.close_data_port()
        for reader in self._readers.values():
            reader.stopReading()
        for writer in self._writers.values():
            writer.stopReading()
            writer.stopWriting()
        for fd in self._dups:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._dups = []

    def descriptors(self) -> list[int]:
        return sorted({0, 1, 2, *self.fds})


@functools.cache
def _null_device() -> tuple[int, int]:
    info = os.stat(os.devnull)
    return info.st_mode, info.st_rdev


def _null(fd: int) -> bool:
    """Whether FD is /dev/null (the device, whatever its name)."""
    try:
        info = os.fstat(fd)
        return stat.S_ISCHR(info.st_mode) and (info.st_mode, info.st_rdev) == _null_device()
    except OSError:
        return False


def _bulk(fd: int) -> bool:
    """Whether FD is a pipe or a file (a stream worth a data connection of its own)."""
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISREG(mode)


class ApartOutput(InStream):
    """Stream 1 on the channel while stdout has a data connection of its own: DATA is an
    error; EOF says the job wrote nothing, so no connection comes (DataPort)."""

    def __init__(self, channel: Channel, port: DataPort) -> None:
        super().__init__(channel, 1, None)
        self.port = port

    def data(self, payload: bytes) -> None:
        raise wire.WireError("stdout on the channel while it has a connection of its own")

    def end(self) -> None:
        super().end()
        self.port.empty_output()
