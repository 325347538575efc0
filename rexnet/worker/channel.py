"""The worker's end of a job channel: a thin adapter from frames to the channel's state
machine (rexnet.worker.machine), on the framed, flow-controlled rexnet.net.channel."""

from __future__ import annotations

from twisted.python.failure import Failure

from rexnet.net.channel import Channel
from rexnet.net.files import FileLane
from rexnet.protocol import wire
from rexnet.security.credentials import CertInfo, Credential
from rexnet.security.tls import Revocations
from rexnet.worker.connectback import Pending
from rexnet.worker.files import FileSettings, JobDirectory, receive
from rexnet.worker.machine import (
    START_TIMEOUT,
    ChannelCore,
    ChannelInputs,
    JobHost,
    WorkerMachine,
)


class WorkerChannel(Channel):
    """One connect-back to a client: TLS, then its jobs (one, or several when kept warm)."""

    def __init__(self, worker: JobHost, pending: Pending, credential: Credential,
                 revoked: Revocations | None = None, files: FileSettings | None = None
                 ) -> None:
        super().__init__(credential)
        self.revoked = revoked
        self.pending = pending
        self.core = ChannelCore(worker, self, pending)
        self.machine: ChannelInputs = WorkerMachine(self.core)
        self.file_settings = files
        self.job_dir: JobDirectory | None = None  # the job's own directory (--put, --get)
        self._client: tuple[object, str] | None = None
        self.queued_at: tuple[float, int] | None = None  # its queued job: since, position

    @property
    def client_name(self) -> str:
        """The name in the client's certificate: parsed once per certificate, not per job
        (a warm channel runs many)."""
        cert = self.peer_cert
        if self._client is None or self._client[0] is not cert:
            self._client = (cert, CertInfo.of(cert).name)
        return self._client[1]

    # -- from the connection to the machine -----------------------------------------------

    def connectionMade(self) -> None:
        super().connectionMade()
        self.machine.connected()

    def peerVerified(self) -> None:
        self.machine.verified()

    def refused(self, problem: str) -> None:
        self.machine.refused(problem)

    def frameReceived(self, frame: wire.Frame) -> None:
        if isinstance(frame, wire.Data | wire.Eof):
            self.machine.stream(frame)
        elif isinstance(frame, wire.PutFile | wire.FileData) and self.files is not None:
            try:
                self.files.frame(frame)
            except wire.WireError as e:
                self.core.host.complain(self.peer_address(), f"files refused: {e}")
                raise
        else:
            super().frameReceived(frame)  # flow control; control frames come back below

    def controlReceived(self, frame: wire.Frame) -> None:
        if isinstance(frame, wire.Start) and (frame.put or frame.get) and self.job_dir is None:
            self._start_with_files(frame)
        elif isinstance(frame, wire.Start):
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
        if self.files is not None:
            self.files.abort()
        if self.core.process is not None:  # its data connections go with the channel
            self.core.process.let_go()
        self.machine.lost(reason)
        if self.core.process is None:  # no job ran in the directory: nothing comes back
            self.job_files_done()

    def _start_with_files(self, frame: wire.Start) -> None:
        """A START with files: a fresh job directory, the files announced into it, then
        the START goes to the machine (the START deadline waits while files arrive)."""
        settings = self.file_settings
        try:
            if settings is None:
                raise OSError(0, "this worker takes no files")
            self.job_dir = directory = JobDirectory.create(settings)
        except OSError as e:
            self.protocolError(f"no job directory for the files: {e.strerror}")
            return
        if not frame.put:
            self.machine.start(frame)
            return

        def complain(problem: str) -> None:
            self.core.host.complain(self.peer_address(), f"files refused: {problem}")

        def progress() -> None:
            timer = self.core.timer
            if timer is not None and timer.active():
                timer.reset(START_TIMEOUT)

        self.files = receive(self, directory, frame, settings, complain,
                             lambda: self.machine.start(frame), progress)

    def lane(self) -> FileLane:
        """The channel's file lane (made for sending files back if none came)."""
        if self.files is None:
            self.files = FileLane(self)
        lane: FileLane = self.files
        return lane

    def job_files_done(self) -> None:
        """The job's directory is no longer needed (the job ended, its files are back)."""
        if self.job_dir is not None:
            self.job_dir.remove()
            self.job_dir = None
        self.files = None

    # -- from the worker ------------------------------------------------------------------

    def taken(self) -> None:
        """The client's TAKEN came before this channel was verified: another worker won."""
        self.machine.taken()

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
