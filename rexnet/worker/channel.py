"""The worker's end of a job channel: a thin adapter from frames to the channel's state
machine (rexnet.worker.machine), on the framed, flow-controlled rexnet.net.channel."""

from __future__ import annotations

from twisted.python.failure import Failure

from rexnet.net.channel import Channel
from rexnet.protocol import wire
from rexnet.security.credentials import Credential
from rexnet.security.tls import Revocations
from rexnet.worker.connectback import Pending
from rexnet.worker.machine import ChannelCore, ChannelInputs, JobHost, WorkerMachine


class WorkerChannel(Channel):
    """One connect-back to a client: TLS, then its jobs (one, or several when kept warm)."""

    def __init__(self, worker: JobHost, pending: Pending, credential: Credential,
                 revoked: Revocations | None = None) -> None:
        super().__init__(credential)
        self.revoked = revoked
        self.pending = pending
        self.core = ChannelCore(worker, self, pending)
        self.machine: ChannelInputs = WorkerMachine(self.core)

    # -- from the connection to the machine -----------------------------------------------

    def peerVerified(self) -> None:
        self.machine.verified()

    def refused(self, problem: str) -> None:
        self.machine.refused(problem)

    def frameReceived(self, frame: wire.Frame) -> None:
        if isinstance(frame, wire.Data | wire.Eof):
            self.machine.stream(frame)
        else:
            super().frameReceived(frame)  # flow control; control frames come back below

    def controlReceived(self, frame: wire.Frame) -> None:
        if isinstance(frame, wire.Start):
            self.machine.start(frame)
        elif isinstance(frame, wire.Signal | wire.Winsize):
            self.machine.signal(frame)
        elif isinstance(frame, wire.Busy):
            self.machine.busy()
        elif isinstance(frame, wire.Error):
            self.machine.client_error(frame.message)
        else:
            self.machine.unexpected(frame)

    def close(self, abort: bool = False) -> None:
        self.machine.close(abort)

    def lost(self, reason: Failure) -> None:
        self.machine.lost(reason)

    # -- from the worker ------------------------------------------------------------------

    def job_ended(self, keep: bool) -> None:
        """The job's EXIT is sent: keep the channel for the client's next job, or close."""
        if keep:
            self.machine.rest()
        else:
            self.machine.finish()

    def admit(self) -> None:
        """A slot is free for this channel's queued job: start it."""
        self.machine.admit()

    # -- for the machine (rexnet.worker.machine.Link) ---------------------------------------

    def hang_up(self, abort: bool = False) -> None:
        super().close(abort)

    def deliver(self, frame: wire.Frame) -> None:
        super().frameReceived(frame)

    def forget_streams(self) -> None:
        self.ins.clear()
        self.outs.clear()
