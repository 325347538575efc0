"""Calls on a worker's jobs: `rexnet jobs`, `attach`, `output` and `cancel`.

A client sends a signed JOB_CALL datagram (checked as strictly as an announcement); the
worker that has the job (every worker, for a listing) connects back to it over mutual
TLS, as for a job, and the client says what it wants in a JOB_REQUEST. Listing is open
to every client of the application; the rest only to the credential that started the
job (the same certificate) or to an admin credential: anyone else gets an ERROR and the
worker complains. A Follower sends a detached job's stored output from its start, paced
by the client's credit, and (attach) follows it until the job ends.
"""

from __future__ import annotations

import collections
import os
import signal
from typing import Any, Protocol

from twisted.internet import interfaces
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IDelayedCall, IOpenSSLClientConnectionCreator
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from rexnet.net.channel import Channel, OutStream
from rexnet.protocol import wire
from rexnet.security.credentials import CertInfo
from rexnet.worker.connectback import connect_back_target
from rexnet.worker.detached import Booked, JobBook, OutputLog, admitted

MAX_CALLS = 32  # call channels open at once
REQUEST_TIMEOUT = 10.0  # seconds a verified call channel waits for its JOB_REQUEST
CHUNK = 64 * 1024

log = Logger()


class CallHost(Protocol):
    """What the calls need of their worker (rexnet.worker.service.Worker)."""

    reactor: Any
    settings: Any
    checker: Any
    book: JobBook

    @property
    def complain(self) -> Any: ...


class JobCalls:
    """A worker's answers to JOB_CALL datagrams."""

    def __init__(self, host: CallHost, tls: IOpenSSLClientConnectionCreator) -> None:
        self.host = host
        self.tls = tls
        self.channels: set[CallChannel] = set()

    def datagram(self, dgram: wire.Datagram, source: str) -> None:
        """A JOB_CALL: connect back if it is for us (Rejected if it is not well signed)."""
        call, _ = self.host.checker.check_job_call(dgram, source)
        if call.job and self.host.book.get(call.job) is None:
            return  # another worker's job
        if len(self.channels) >= MAX_CALLS:
            log.warn("job call from {source} dropped: {n} calls open", source=source,
                     n=len(self.channels))
            return
        host, port, _why = connect_back_target(dgram, call.addrs, call.port, source)
        kind = TCP6ClientEndpoint if ":" in host else TCP4ClientEndpoint
        endpoint = wrapClientTLS(self.tls, kind(self.host.reactor, host, port, timeout=5))
        connecting = endpoint.connect(Factory.forProtocol(lambda: CallChannel(self)))
        connecting.addErrback(lambda f: log.info("job call to {host}:{port} failed: {why}",
                                                 host=host, port=port,
                                                 why=f.getErrorMessage()))

    def serve(self, channel: CallChannel, request: wire.JobRequest) -> None:
        """Answer REQUEST from CHANNEL's (verified) client."""
        host, book = self.host, self.host.book
        name = host.settings.name
        if request.action == "list":
            channel.send(wire.JobList(name, book.rows()))
            channel.close()
            return
        booked = book.get(request.job)
        if booked is None:
            channel.finish("no-job", f"no job {request.job} on worker {name} (finished jobs "
                           "are kept for the worker's --keep-finished)")
            return
        problem = admitted(channel.peer_cert, booked.owner, booked.serial)
        if problem:
            who = CertInfo.of(channel.peer_cert).name
            host.complain(channel.peer_address(),
                          f"{request.action} of job {booked.job} refused to {who}: {problem}")
            channel.finish("denied", problem)
            return
        if request.action == "cancel":
            self.cancel(booked, request.signal)
            channel.send(state_of(booked))
            channel.close()
        elif booked.output is None:
            channel.finish("not-detached", f"job {booked.job} is not detached: its output "
                           "goes to the client that started it")
        else:
            channel.follow(booked, booked.output, request.action == "attach")

    def cancel(self, booked: Booked, number: int) -> None:
        process = booked.process
        if process is None or process.ended:
            return
        log.info("job {job} cancelled ({how})", job=booked.job,
                 how=f"signal {number}" if number else "SIGTERM, then SIGKILL")
        if number:
            process.deliver_signal(number)
        else:
            process.kill_group(signal.SIGTERM)


def state_of(booked: Booked) -> wire.JobState:
    output = booked.output
    exit = output.exit if output is not None else None
    if exit is not None:
        status = exit.code if exit.signal is None else 128 + exit.signal
    else:
        status = booked.status
    finished = exit is not None or bool(booked.ended)
    return wire.JobState(booked.job, "finished" if finished else "running", status,
                         output.dropped if output is not None else 0)


class CallChannel(Channel):
    """A connect-back for a JOB_CALL: TLS, one JOB_REQUEST, its answer."""

    def __init__(self, calls: JobCalls) -> None:
        settings = calls.host.settings
        super().__init__(settings.credential)
        self.revoked = settings.revoked
        self.calls = calls
        self.timer: IDelayedCall | None = None
        self.request: wire.JobRequest | None = None
        self.follower: Follower | None = None

    def connectionMade(self) -> None:
        super().connectionMade()
        self.calls.channels.add(self)
        self.timer = self.calls.host.reactor.callLater(REQUEST_TIMEOUT, self._silent)

    def _silent(self) -> None:
        self.timer = None
        self.calls.host.complain(self.peer_address(), "job call: no request in time")
        self.close(abort=True)

    def peerVerified(self) -> None:
        self.start_heartbeat(self.calls.host.reactor)

    def refused(self, problem: str) -> None:
        self.calls.host.complain(self.peer_address(), f"authentication failed: {problem}")

    def controlReceived(self, frame: wire.Frame) -> None:
        if not isinstance(frame, wire.JobRequest) or self.request is not None:
            raise wire.WireError(f"unexpected {type(frame).__name__} frame")
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.request = frame
        self.calls.serve(self, frame)

    def finish(self, reason: str, message: str) -> None:
        self.send(wire.Error(reason, message))
        self.close()

    def follow(self, booked: Booked, output: OutputLog, attach: bool) -> None:
        """Send OUTPUT from its start; ATTACH: follow it, and feed the job's stdin."""
        self.follower = Follower(self, booked, output, attach)
        stdin = output.ins.get(0)
        if (attach and output.exit is None and output.stdin_holder is None
                and stdin is not None and not stdin.eof and stdin.sink is not None):
            output.stdin_holder = self
            stdin.outstanding = 0
            self.ins[0] = stdin
            self.send(wire.Started(booked.job, detached=True))  # the client may send stdin
        self.follower.pump()

    def lost(self, reason: Failure) -> None:
        self.calls.channels.discard(self)
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        if self.follower is not None:
            self.follower.stop()
            if self.follower.output.stdin_holder is self:
                self.follower.output.stdin_holder = None
        self.ins.clear()


@implementer(interfaces.IPushProducer)
class Follower:
    """Sends a detached job's stored output (frames of its OutputLog's file) to CHANNEL,
    within the client's credit; FOLLOW: on as the job writes, until it ends. Then the
    streams' EOF and a JOB_STATE, and the channel closes."""

    def __init__(self, channel: Channel, booked: Booked, output: OutputLog,
                 follow: bool) -> None:
        self.channel = channel
        self.booked = booked
        self.output = output
        self.follow = follow
        self.fd: int | None = os.open(output.path, os.O_RDONLY | os.O_NOFOLLOW)
        self.offset = 0
        self.decoder = wire.FrameDecoder()
        self.pending: collections.deque[wire.Frame] = collections.deque()
        self.done = False
        output.watchers.add(self.pump)

    def _out(self, stream: int) -> OutStream:
        out = self.channel.outs.get(stream)
        if out is None:
            out = self.channel.outs[stream] = OutStream(self.channel, stream)
            out.attach(self)
        return out

    def pump(self) -> None:
        """Send what the client's credit allows."""
        while not self.done and self.fd is not None:
            if self.channel.closed:
                self.stop()
                return
            if self.channel.congested:
                return
            if not self.pending:
                chunk = os.pread(self.fd, CHUNK, self.offset)
                if chunk:
                    self.offset += len(chunk)
                    self.pending.extend(self.decoder.feed(chunk))
                    continue
                if self.follow and self.output.exit is None:
                    return  # the job may write more: OutputLog calls again
                self._finish()
                return
            frame = self.pending[0]
            assert isinstance(frame, wire.Data)
            out = self._out(frame.stream)
            if out.credit <= 0:
                return
            self.pending.popleft()
            out.write(frame.payload)

    def _finish(self) -> None:
        self.stop()
        for stream in (1, 2):
            self._out(stream)
        for out in self.channel.outs.values():
            out.close()
        self.channel.send(state_of(self.booked))
        self.channel.close()

    def stop(self) -> None:
        self.done = True
        self.output.watchers.discard(self.pump)
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    # IPushProducer: the client's credit and the link's congestion
    def pauseProducing(self) -> None:
        pass  # pump() checks credit and congestion itself

    def resumeProducing(self) -> None:
        self.pump()

    def stopProducing(self) -> None:
        self.stop()
