"""ClientJob: announce, accept the first authenticated worker, run the job over its channel.

The job is a state machine (rexnet.client.machine) around its data and actions
(rexnet.client.jobcore); its channels (rexnet.client.channel) only turn bytes into its
inputs. ClientJob is the face the callers see: run it, signal it, resize it, abandon it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from rexnet.client.channel import ClientChannel
from rexnet.client.jobcore import JobCore
from rexnet.client.machine import JobMachine
from rexnet.client.progress import silent
from rexnet.client.results import JobResult
from rexnet.client.router import ChannelRouter, trace
from rexnet.client.streams import JobStreams, StdioStreams
from rexnet.client.trust import distrust
from rexnet.client.warm import WarmPool
from rexnet.net.alerts import AlertSender
from rexnet.net.announce import now_ms
from rexnet.net.pollguard import guard
from rexnet.protocol import wire
from rexnet.security.credentials import Credential
from rexnet.security.tls import Revocations

DEFAULT_TIMEOUT = 30.0

log = Logger()


class ClientJob:
    """One job: announce it, accept the first authenticated worker, run it there.

    TIMEOUT bounds the search for a worker; a worker with every slot busy may queue the
    job (it answers later, by its expected wait), and QUEUE_TIMEOUT bounds the wait in its
    queue (None: no bound; the queued channel's heartbeat still notices a dead worker).
    REVOKED lists workers to refuse; ON_STARTED(worker, job_id) is called once the job
    runs; POOL lends a warm channel to the job if one is a good choice, and keeps the
    job's channel afterwards (see rexnet.client.warm)."""

    def __init__(
        self,
        reactor: Any,
        credential: Credential,
        targets: Sequence[tuple[str, int]],
        request: wire.Start | None = None,
        streams: JobStreams | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        say: Callable[[str], None] = silent,
        now: Callable[[], int] = now_ms,
        alerts: AlertSender | None = None,
        pool: WarmPool | None = None,
        logger: Logger | None = None,
        revoked: Revocations | None = None,
        on_started: Callable[[str, str], None] | None = None,
        queue_timeout: float | None = None,
    ) -> None:
        guard(reactor)  # the caller's reactor too (rexnet.net.pollguard)
        request = request or wire.Start()
        if streams is None:
            streams = StdioStreams(reactor, request.tty, dict(request.fds))
        if pool is not None and not request.keep:  # ask the worker to keep the channel
            request = replace(request, keep=True)
        self.pool = pool
        self.core = core = JobCore(
            reactor, credential, targets, request, streams, timeout, say, now,
            alerts or AlertSender(reactor, credential, []), pool, logger or log, revoked,
            on_started, queue_timeout)
        self.machine = machine = JobMachine(core)
        core.machine = machine
        core.events = ChannelRouter(core, machine)

    def run(self) -> defer.Deferred[JobResult]:
        """Run the job on a warm channel if the pool has a good one, else announce it."""
        link = (self.pool.take(self.core.pool_key, self.distrust) if self.pool is not None
                else None)
        if link is not None:
            assert isinstance(link, ClientChannel)
            self.machine.reuse(link)
        else:
            self.machine.look()
        return self.core.result

    def distrust(self, link: object) -> str | None:
        """Why LINK's worker is no longer to be trusted with a job, or None: its
        certificate is checked again (expiry, revocation list as it is now) before every
        job on a warm channel, as the worker checks the client's."""
        return distrust(link, self.core.revoked)

    def send_signal(self, number: int) -> None:
        """Deliver signal NUMBER to the job; before the job runs, give up with 128+N."""
        self.machine.signal(number)

    def resize(self, rows: int, cols: int) -> None:
        """The client's terminal changed size: tell the job's terminal (before a worker is
        chosen, the job will start with the new size)."""
        self.machine.resize(rows, cols)

    def abandon(self) -> None:
        """The job's owner went away (the agent's launcher died): end it, as a client that
        dies would (its worker ends the job's processes)."""
        self.machine.abandon()

    def trace(self, tell: Callable[[str, str, str], None]) -> None:
        """Call TELL(old state, input, new state) on each transition (for tests, debugging)."""
        trace(self.machine, tell)

    @property
    def result(self) -> defer.Deferred[JobResult]:
        return self.core.result

    @property
    def chosen(self) -> ClientChannel | None:
        """The channel of the worker that has (or had) the job."""
        return self.core.chosen

    @property
    def request(self) -> wire.Start:
        return self.core.request
