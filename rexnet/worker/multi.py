"""Several applications' workers on one UDP socket (twistd rexnet-worker --config)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.internet import defer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from rexnet.worker.listener import WorkerService
from rexnet.worker.service import STATUS_INTERVAL, Worker

log = Logger()


class SharedWorkerService(WorkerService):
    """One announcement socket for WORKERS (which listen on the same address and were
    made with the same AnnounceSocket, which hands each datagram to the worker of its
    application; rexnet.worker.datagrams)."""

    def __init__(self, workers: Sequence[Worker]) -> None:
        super().__init__(workers[0])
        self.others = list(workers[1:])
        if any(w.socket is not self.worker.socket for w in self.others):
            raise ValueError("workers sharing an address must share its AnnounceSocket")
        self.reporters: list[LoopingCall] = []

    def startService(self) -> None:
        super().startService()
        for worker in self.others:
            if worker.alerts.targets:
                reporter = LoopingCall(worker.report_status)
                reporter.clock = worker.reactor
                reporter.start(STATUS_INTERVAL, now=True)
                self.reporters.append(reporter)
            s = worker.settings
            self.warn_about(worker)
            log.info("worker {name} serves {app} ({command}) with {slots} slots at speed "
                     "{speed}; sharing {host}:{port}", name=s.name, app=s.credential.app,
                     command=" ".join(s.command), slots=s.slots, speed=s.speed,
                     host=s.listen[0],
                     port=self.port.getHost().port)  # type: ignore[union-attr]

    def stopService(self) -> defer.Deferred[Any]:
        for reporter in self.reporters:
            if reporter.running:
                reporter.stop()
        waits = [super().stopService()]
        for worker in self.others:
            waits.append(worker.stop_all().addBoth(_stop_alerts, worker))
        return defer.gatherResults(waits)


def _stop_alerts(result: object, worker: Worker) -> None:
    worker.alerts.stop()
