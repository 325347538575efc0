"""Calls on jobs across the cluster: `rexnet jobs`, `attach`, `output` and `cancel`.

JobCaller sends a signed JOB_CALL datagram to the announce targets (resent with backoff)
and listens for the workers' connect-backs over mutual TLS, as a job does. A listing asks
every worker that connects back within WINDOW for its JOB_LIST; an action on one job
takes the worker that has it, sends the JOB_REQUEST, writes the job's output through the
streams (attach: sends stdin once the worker says STARTED) and ends with its JOB_STATE.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Factory

from rexnet.client.channel import ClientChannel
from rexnet.client.cluster import Cluster
from rexnet.client.jobcore import RESEND
from rexnet.client.results import JobFailed, JobRefused, NoWorker, WorkerLost
from rexnet.client.streams import JobStreams
from rexnet.net.announce import DatagramSender, now_ms, source_address
from rexnet.protocol import wire
from rexnet.security.tls import listening_options

LIST_RESENDS = 1


@dataclass(frozen=True)
class Listed:
    """One worker's jobs, and where it answered from."""

    jobs: wire.JobList
    address: str


class JobCaller:
    """Calls on jobs of CLUSTER's application (see the module's docstring)."""

    def __init__(self, reactor: Any, cluster: Cluster, now: Callable[[], int] = now_ms) -> None:
        self.reactor = reactor
        self.cluster = cluster
        self.now = now
        self.complaints: list[str] = []
        self.listed: list[Listed] = []
        self.result: defer.Deferred[Any] = defer.Deferred()
        self.request = wire.JobRequest("", "list")
        self.streams: JobStreams | None = None
        self.chosen: ClientChannel | None = None
        self.channels: set[ClientChannel] = set()
        self._port: Any = None
        self._udp: DatagramSender | None = None
        self._timer: IDelayedCall | None = None
        self._resend: IDelayedCall | None = None
        self._ending = False

    def list(self, window: float) -> defer.Deferred[list[Listed]]:
        """Every answering worker's jobs, collected for WINDOW seconds."""
        self._call("", window)
        return self.result

    def act(self, job: str, action: str, streams: JobStreams | None = None,
            number: int = 0) -> defer.Deferred[wire.JobState]:
        """ACTION ("output", "attach", "cancel" with signal NUMBER) on JOB; fires with its
        JOB_STATE once its output is written, or fails with a JobFailed."""
        self.request = wire.JobRequest(job, action, number)
        self.streams = streams
        self._call(job, self.cluster.timeout)
        return self.result

    # -- the call ---------------------------------------------------------------------

    def _call(self, job: str, window: float) -> None:
        targets = self.cluster.targets
        addrs = tuple(sorted({a for a in map(source_address, targets) if a}))[: wire.MAX_ADDRS]
        if not addrs:
            self._fail(NoWorker("no announce target can be reached from this host"))
            return
        credential = self.cluster.credential
        factory = Factory.forProtocol(lambda: ClientChannel(self, credential, self.reactor,
                                                            self.cluster.revoked))
        self._port = self.reactor.listenSSL(0, factory, listening_options(credential),
                                            interface=addrs[0] if len(addrs) == 1 else "")
        self._udp = DatagramSender(lambda target, e: self.complaints.append(
            f"cannot send to {target[0]}:{target[1]}: {e.strerror}"))
        self.reactor.listenUDP(0, self._udp).setBroadcastAllowed(True)
        port = self._port.getHost().port

        def send(attempt: int) -> None:
            # a fresh nonce each time: a worker takes a resend for a replay otherwise
            call = wire.JobCall(os.urandom(16), self.now(), port, addrs, job)
            data = wire.encode_datagram(call, credential.app_id, credential.key,
                                        credential.cert_der)
            for target in targets:
                assert self._udp is not None
                self._udp.send(data, target)
            if job or attempt < LIST_RESENDS:  # a listing: once more covers a lost datagram
                delay = RESEND(attempt)
                self._resend = self.reactor.callLater(delay * 4, send, attempt + 1)

        send(0)
        self._timer = self.reactor.callLater(window, self._time_up)

    def _stop_calling(self) -> None:
        for call in (self._resend, self._timer):
            if call is not None and call.active():
                call.cancel()
        if self._port is not None:
            self._port.stopListening()
            self._port = None

    def _time_up(self) -> None:
        self._timer = None
        if self.request.action == "list":
            seen = {(x.jobs.worker, x.address): x for x in self.listed}  # resends' answers
            self._done(sorted(seen.values(), key=lambda x: (x.jobs.worker, x.address)))
        elif self.chosen is None:
            self._fail(NoWorker(f"no worker answered for job {self.request.job} within "
                                f"{self.cluster.timeout:g} s (finished jobs are kept for the "
                                "worker's --keep-finished)"))

    def _done(self, value: Any) -> None:
        self._stop_calling()
        for channel in list(self.channels):
            if channel is not self.chosen:
                channel.close(abort=True)
        if self._udp is not None and self._udp.transport is not None:
            self._udp.transport.stopListening()
        if not self.result.called:
            self.result.callback(value)

    def _fail(self, error: JobFailed) -> None:
        if self.chosen is not None:
            self.chosen.close()
        self._stop_calling()
        if self._udp is not None and self._udp.transport is not None:
            self._udp.transport.stopListening()
        if not self.result.called:
            self.result.errback(error)

    def _end(self, outcome: Any) -> None:
        """The chosen worker's answer is complete: write the output, then OUTCOME."""
        if self._ending:
            return
        self._ending = True
        finished = self.streams.finish() if self.streams is not None else defer.succeed(None)

        def deliver(_: object) -> None:
            if isinstance(outcome, JobFailed):
                self._fail(outcome)
            else:
                if self.chosen is not None:
                    self.chosen.close()
                self._done(outcome)

        finished.addBoth(deliver)

    # -- ChannelEvents (rexnet.client.channel) ----------------------------------------

    def connected(self, channel: ClientChannel) -> None:
        self.channels.add(channel)

    def verified(self, channel: ClientChannel) -> None:
        channel.start_heartbeat(self.reactor)
        if self.request.action == "list":
            channel.send(self.request)
            return
        if self.chosen is not None or self.result.called:
            channel.close()
            return
        self.chosen = channel
        self._stop_calling()
        if self.streams is not None:
            self.streams.prepare(channel)
        channel.send(self.request)

    def refused(self, channel: ClientChannel, problem: str) -> None:
        self.complaints.append(f"{channel.peer_address()}: {problem}")

    def hello(self, channel: ClientChannel, hello: wire.Hello) -> None:
        pass

    def started(self, channel: ClientChannel, started: wire.Started) -> None:
        if channel is self.chosen and self.streams is not None:
            self.streams.start_input()  # the job's stdin is ours to feed

    def exited(self, channel: ClientChannel, exit: wire.Exit) -> None:
        channel.protocolError("unexpected Exit frame")

    def error(self, channel: ClientChannel, error: wire.Error) -> None:
        name = channel.hello.worker if channel.hello else channel.peer_address()
        if channel is self.chosen:
            self._end(JobRefused(f"worker {name}: {error.message}"))
        else:
            self.complaints.append(f"worker {name}: {error.message}")

    def busy(self, channel: ClientChannel) -> None:
        channel.protocolError("unexpected Busy frame")

    def queued(self, channel: ClientChannel, queued: wire.Queued) -> None:
        channel.protocolError("unexpected Queued frame")

    def unexpected(self, channel: ClientChannel, frame: wire.Frame) -> None:
        if isinstance(frame, wire.JobList) and self.request.action == "list":
            self.listed.append(Listed(frame, channel.peer_address().rpartition(":")[0]))
            channel.close()
        elif isinstance(frame, wire.JobState) and channel is self.chosen:
            self._end(frame)
        else:
            channel.protocolError(f"unexpected {type(frame).__name__} frame")

    def lost(self, channel: ClientChannel, problem: str) -> None:
        self.channels.discard(channel)
        if problem:
            self.complaints.append(f"{channel.peer_address()}: {problem}")
        if channel is self.chosen and not self._ending:
            self._end(WorkerLost(f"lost the worker of job {self.request.job}"))
