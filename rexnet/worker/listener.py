"""The twistd service of one worker: its UDP socket, status alerts and orderly stop."""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from rexnet.security.hardening import make_undumpable
from rexnet.worker.keyexposure import jobs_identity, key_warning
from rexnet.worker.service import STATUS_INTERVAL, Worker

log = Logger()


class WorkerService(Service):
    """Listens for announcements on UDP (joining multicast groups) for one Worker."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.port: IListeningPort | None = None
        self.reporter: LoopingCall | None = None

    @staticmethod
    def warn_about(worker: Worker) -> None:
        """Start-up warnings (after twistd's privilege drop): a key the jobs' user can
        read, and arguments appended unchecked."""
        s = worker.settings
        if s.keyfile is not None:
            exposed = key_warning(s.keyfile, *jobs_identity())
            if exposed:
                log.warn("worker {name}: {warning}", name=s.name, warning=exposed)
        unchecked = s.arg_policy.warning()
        if unchecked:
            log.warn("worker {name}: {warning}", name=s.name, warning=unchecked)

    def bind(self) -> None:
        """Open the announcement port now (makeService calls this, so that a busy port is
        a one-line error before twistd starts, not a traceback after)."""
        s = self.worker.settings
        host, port = s.listen
        socket = self.worker.socket
        reactor = self.worker.reactor
        if s.groups:
            self.port = reactor.listenMulticast(port, socket, interface=host, listenMultiple=True)
            for group in s.groups:
                socket.transport.joinGroup(group)  # type: ignore[union-attr]
        else:
            self.port = reactor.listenUDP(port, socket, interface=host)

    def startService(self) -> None:
        super().startService()
        make_undumpable()  # after twistd's privilege drop: jobs cannot read our memory
        if self.port is None:
            self.bind()
        s = self.worker.settings
        host = s.listen[0]
        reactor = self.worker.reactor
        if self.worker.alerts.targets:
            self.reporter = LoopingCall(self.worker.report_status)
            self.reporter.clock = reactor
            self.reporter.start(STATUS_INTERVAL, now=True)
        self.warn_about(self.worker)  # before "listening on", which says it is ready
        log.info("worker {name} serves {app} ({command}) with {slots} slots at speed {speed}; "
                 "listening on {host}:{port}", name=s.name, app=s.credential.app,
                 command=" ".join(s.command) or (
                     "any command" if s.commands.any
                     else "commands " + ", ".join(s.commands.patterns)),
                 slots=s.slots, speed=s.speed, host=host,
                 port=self.port.getHost().port)  # type: ignore[union-attr]

    def stopService(self) -> defer.Deferred[Any]:
        super().stopService()
        w = self.worker
        log.info("worker {name} stopping: {jobs} jobs run; {received} datagrams received, "
                 "{limited} dropped by rate limits, {complaints} complaints, {foreign} of "
                 "other applications ignored", name=w.settings.name, jobs=w.jobs_run,
                 received=w.received, limited=w.rate_limited, complaints=w.complain.count,
                 foreign=w.foreign)
        if self.reporter is not None and self.reporter.running:
            self.reporter.stop()
        jobs_gone = self.worker.stop_all()
        jobs_gone.addBoth(lambda result: self.worker.alerts.stop())
        waits = [jobs_gone]
        if self.port is not None:
            stopped = self.port.stopListening()
            waits.append(stopped if stopped is not None else defer.succeed(None))
        return defer.gatherResults(waits)
