"""The client's end of a job channel (the TLS server side of the connect-back)."""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from rexnet.client.warm import WarmPool
from rexnet.net.channel import Channel
from rexnet.protocol import wire
from rexnet.security.tls import VERIFY_ERROR

HANDSHAKE_TIMEOUT = 10.0

log = Logger()


class ClientChannel(Channel):
    """The client's end of a job channel (the TLS server side)."""

    def __init__(self, job: Any) -> None:  # a rexnet.client.job.ClientJob
        super().__init__(job.credential)
        self.revoked = job.revoked
        self.job = job
        self.hello: wire.Hello | None = None
        self.heard_at = 0.0  # when the last HELLO came
        self.won_load = 0.0  # the worker's load when it won (see rexnet.client.warm)
        self.won_others = 0  # other clients' jobs on the worker then
        self.own_at_hello = 0  # this client's jobs there when the last HELLO came
        self.jobs = 0  # jobs started on this channel
        self.parked: WarmPool | None = None  # idle in this pool, between jobs
        self.exited = False
        self._timer: IDelayedCall | None = None

    def connectionMade(self) -> None:
        super().connectionMade()
        self.job.channels.add(self)
        self.job.answered += 1
        self._timer = self.job.reactor.callLater(HANDSHAKE_TIMEOUT, self._silent)

    def _silent(self) -> None:
        self._timer = None
        if not self.verified:
            self.job.auth_failed(self, "no TLS handshake in time")
            self.close(abort=True)

    def peerVerified(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self.job.worker_verified(self)

    def refused(self, problem: str) -> None:
        self.job.auth_failed(self, problem)

    def controlReceived(self, frame: wire.Frame) -> None:
        if isinstance(frame, wire.Hello):
            self.hello = frame
            self.heard_at = self.job.reactor.seconds()
            pool = self.parked or self.job.pool
            if pool is not None:
                pool.heard(self)
        elif self.parked is not None or self.job.result.called:
            return  # idle between jobs: late frames of the last job
        elif self is not self.job.chosen:
            return  # a worker that lost the race: ignore it while it closes
        elif isinstance(frame, wire.Started) and self.job.started is None:
            self.job.job_started(self, frame)
        elif isinstance(frame, wire.Exit) and not self.exited:
            self.exited = True
            self.job.job_exited(self, frame)
        elif isinstance(frame, wire.Error):
            self.job.job_error(self, frame)
        elif isinstance(frame, wire.Busy) and self.job.reused and self.job.started is None:
            self.job.warm_refused(self, "has no free slot")
        else:
            super().controlReceived(frame)

    def lost(self, reason: Failure) -> None:
        if self.parked is not None:
            self.parked.lost(self)
            return
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        if not self.verified and not self.closed_by_us:
            why = getattr(self.transport, VERIFY_ERROR, None) or tls_reason(reason)
            self.job.auth_failed(self, f"TLS handshake failed: {why}")
        self.job.channel_lost(self)

    @property
    def closed_by_us(self) -> bool:
        return self.job.chosen is not None and self is not self.job.chosen


def tls_reason(reason: Failure) -> str:
    """A short reason from an OpenSSL error or a plain connection failure."""
    value = reason.value
    errors = getattr(value, "args", ())
    if errors and isinstance(errors[0], list) and errors[0]:
        last = errors[0][-1]
        if isinstance(last, tuple) and len(last) == 3:
            return str(last[2])
    return reason.getErrorMessage()[:200]
