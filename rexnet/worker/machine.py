"""The worker's job channel as an explicit state machine (Automat's TypeMachineBuilder).

    verifying --verified--> awaiting_start --start--> starting --started--> running
    verifying --handshake_timeout / give_up (TAKEN, then a grace)--> closed
    running --rest--> warm_idle --start--> starting (again: a warm channel's next job)
    starting --queue--> queued --admit--> starting (every slot was busy: QUEUED is sent,
                                          and the job starts when the worker admits it)
    starting --refuse / no_slot--> closed;  running --finish--> closed
    any state --close / lost / the client's ERROR or BUSY / a deadline--> closed

verifying waits HANDSHAKE_TIMEOUT for the TLS handshake (a silent peer must not hold a
slot), and only TAKEN_GRACE once the client's TAKEN said another worker won;
awaiting_start waits START_TIMEOUT for the client's START; warm_idle waits WARM_IDLE for
the next one, sending HELLO (the worker's load) every WARM_REPORT seconds. A frame a state
does not expect is a protocol error (the channel closes); frames meant for the last job
that arrive on a warm channel are dropped. The channel protocol (rexnet.worker.channel)
only turns frames into these inputs; the worker (JobHost) runs the jobs and keeps the
queue (a queued channel leaves it when it closes, whatever the reason).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol

from automat import TypeMachineBuilder
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from rexnet.protocol import wire
from rexnet.protocol.transitions import index_transitions
from rexnet.worker.connectback import Pending
from rexnet.worker.job import JobProcess
from rexnet.worker.metrics import NoMetrics

HANDSHAKE_TIMEOUT = 8.0  # seconds a connect-back may take for its TLS handshake
TAKEN_GRACE = 1.0  # ... and once TAKEN came (it may overtake the handshake's last bytes)
START_TIMEOUT = 10.0  # seconds a fresh channel waits for the client's START
WARM_IDLE = 30.0  # how long a warm channel may wait for its client's next job
WARM_REPORT = 1.0  # seconds between fresh HELLOs (load figures) on an idle warm channel

log = Logger()


@dataclass(frozen=True)
class Refusal:
    """Why the worker will not run a START (the ERROR frame's reason and message)."""

    reason: str
    message: str


class StartedJob(Protocol):
    job: str
    process: JobProcess


class JobHost(Protocol):
    """What a channel needs of its worker (rexnet.worker.service.Worker)."""

    reactor: Any
    metrics: NoMetrics
    warm: set[Any]

    @property
    def complain(self) -> Callable[[str, str], None]: ...

    def hello(self, pending: Pending | None) -> wire.Hello: ...

    def release(self, pending: Pending) -> None: ...

    def client_refusal(self, cert: Any) -> str | None: ...

    def has_room(self, start: wire.Start | None = None) -> bool: ...

    def wait_turn(self, channel: Any, start: wire.Start, pending: Pending | None
                  ) -> wire.Queued | Refusal | None: ...

    def leave_queue(self, channel: Any) -> None: ...

    def start_job(self, channel: Any, start: wire.Start, warm: bool
                  ) -> Refusal | StartedJob: ...


class Link(Protocol):
    """What the machine does to its connection (rexnet.worker.channel.WorkerChannel)."""

    verified: bool
    peer_cert: Any

    def peer_address(self) -> str: ...

    def send(self, frame: wire.Frame) -> None: ...

    def hang_up(self, abort: bool = False) -> None: ...

    def protocolError(self, problem: str) -> None: ...

    def deliver(self, frame: wire.Frame) -> None: ...

    def forget_streams(self) -> None: ...

    def start_heartbeat(self, clock: IReactorTime) -> None: ...


class ChannelInputs(Protocol):
    """The inputs of a worker's job channel."""

    def connected(self) -> None:
        "TCP is up: the TLS handshake begins."

    def taken(self) -> None:
        "The client's TAKEN says another worker won (while the handshake is unfinished)."

    def handshake_timeout(self) -> None:
        "The TLS handshake took too long."

    def give_up(self) -> None:
        "The grace after TAKEN is over and the handshake is still unfinished."

    def verified(self) -> None:
        "The TLS handshake is done and the client's certificate passed the checks."

    def refused(self, problem: str) -> None:
        "The client's certificate failed the checks."

    def start(self, frame: wire.Start) -> None:
        "The client's START."

    def signal(self, frame: wire.Signal | wire.Winsize) -> None:
        "A SIGNAL or WINSIZE for the job."

    def stream(self, frame: wire.Data | wire.Eof) -> None:
        "Input for the job (DATA or EOF)."

    def busy(self) -> None:
        "The client's BUSY: it chose another worker, or wants none."

    def client_error(self, message: str) -> None:
        "The client's ERROR: it ends the job."

    def unexpected(self, frame: wire.Frame) -> None:
        "Any other frame."

    def started(self, job: StartedJob) -> None:
        "The worker started the job."

    def refuse(self, refusal: Refusal) -> None:
        "The worker will not run the START."

    def no_slot(self) -> None:
        "A warm channel's START found no free slot and no place in the queue."

    def queue(self, frame: wire.Queued) -> None:
        "Every slot is busy: the job waits in the worker's queue."

    def admit(self) -> None:
        "A slot is free for the queued job."

    def rest(self) -> None:
        "The job ended and the channel is kept for the client's next job."

    def finish(self) -> None:
        "The job ended and the channel closes."

    def deadline(self) -> None:
        "The wait for a START is over."

    def report(self) -> None:
        "Time to tell an idle warm channel's client this worker's load."

    def close(self, abort: bool) -> None:
        "Close the connection (the worker stopping, a silent peer, a protocol error)."

    def lost(self, reason: Failure) -> None:
        "The connection is gone."


@dataclass(eq=False)
class ChannelCore:
    """The state every state of a channel shares."""

    host: JobHost
    link: Link
    pending: Pending
    job: str | None = None
    process: JobProcess | None = None
    jobs: int = 0  # jobs started on this channel
    start_frame: wire.Start | None = None  # the START of a queued job
    timer: IDelayedCall | None = None
    reporter: LoopingCall | None = None
    given_up: bool = False  # closed before its handshake finished, for a reason logged

    def wait(self, seconds: float, then: Callable[[], None]) -> None:
        self.timer = self.host.reactor.callLater(seconds, then)

    def stop_waiting(self) -> None:
        self.host.warm.discard(self.link)
        self.host.leave_queue(self.link)
        if self.reporter is not None and self.reporter.running:
            self.reporter.stop()
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None


builder = TypeMachineBuilder(ChannelInputs, ChannelCore)
verifying = builder.state("verifying")
awaiting_start = builder.state("awaiting_start")
starting = builder.state("starting")
running = builder.state("running")
warm_idle = builder.state("warm_idle")
queued = builder.state("queued")
closed = builder.state("closed")
Inputs = ChannelInputs
Self = ChannelInputs
Core = ChannelCore


# -- verifying --------------------------------------------------------------------------

@verifying.upon(Inputs.connected).loop()
def _handshaking(self: Self, core: Core) -> None:
    core.wait(HANDSHAKE_TIMEOUT, self.handshake_timeout)


@verifying.upon(Inputs.taken).loop()
def _taken_while_handshaking(self: Self, core: Core) -> None:
    core.stop_waiting()
    core.wait(TAKEN_GRACE, self.give_up)


@verifying.upon(Inputs.handshake_timeout).to(closed)
def _silent_peer(self: Self, core: Core) -> None:
    core.timer = None
    core.given_up = True
    core.host.metrics.auth_failure()
    core.host.complain(core.link.peer_address(), f"no TLS handshake within "
                       f"{HANDSHAKE_TIMEOUT:g} s on a connect-back; closed, slot freed")
    core.host.release(core.pending)
    core.link.hang_up(abort=True)


@verifying.upon(Inputs.give_up).to(closed)
def _lost_the_race(self: Self, core: Core) -> None:
    core.timer = None
    core.given_up = True
    log.info("connect-back for job {job} to {peer} cancelled: taken by another worker "
             "before its TLS handshake finished", job=core.pending.job_id.hex()[:12],
             peer=core.link.peer_address())
    core.host.metrics.connect_back("lost")
    core.host.release(core.pending)
    core.link.hang_up(abort=True)


@verifying.upon(Inputs.verified).to(awaiting_start)
def _greet(self: Self, core: Core) -> None:
    core.stop_waiting()
    host = core.host
    core.link.send(host.hello(core.pending))
    core.wait(START_TIMEOUT, self.deadline)
    core.link.start_heartbeat(host.reactor)


@verifying.upon(Inputs.refused).to(closed)
def _refused(self: Self, core: Core, problem: str) -> None:
    core.stop_waiting()
    core.host.complain(core.link.peer_address(), f"authentication failed: {problem}")


# -- awaiting_start and warm_idle: waiting for a START ------------------------------------

@awaiting_start.upon(Inputs.start).to(starting)
def _start_fresh(self: Self, core: Core, frame: wire.Start) -> None:
    core.stop_waiting()
    core.host.metrics.connect_back("won")
    _launch(self, core, frame, core.pending)  # its slot or queue place passes to the job


@warm_idle.upon(Inputs.start).to(starting)
def _start_warm(self: Self, core: Core, frame: wire.Start) -> None:
    core.stop_waiting()
    host = core.host
    host.release(core.pending)
    problem = host.client_refusal(core.link.peer_cert)  # it may have expired meanwhile
    if problem:
        self.refuse(Refusal("auth", problem))
        return
    host.metrics.connect_back("warm")
    if not host.has_room(frame):  # slots for its cpus, or a queue place; its workers
        self.no_slot()
        return
    _launch(self, core, frame, None)


def _launch(self: Self, core: Core, frame: wire.Start, pending: Pending | None) -> None:
    turn = core.host.wait_turn(core.link, frame, pending)
    if isinstance(turn, Refusal):
        self.refuse(turn)
    elif turn is not None:
        core.start_frame = frame
        self.queue(turn)
    else:
        _run(self, core, frame)


def _run(self: Self, core: Core, frame: wire.Start) -> None:
    outcome = core.host.start_job(core.link, frame, warm=core.jobs > 0)
    if isinstance(outcome, Refusal):
        self.refuse(outcome)
    else:
        self.started(outcome)


@awaiting_start.upon(Inputs.deadline).to(closed)
def _no_start(self: Self, core: Core) -> None:
    core.timer = None
    core.host.complain(core.link.peer_address(), "client sent no job in time")
    core.link.hang_up(abort=True)


@warm_idle.upon(Inputs.deadline).to(closed)
def _idle_too_long(self: Self, core: Core) -> None:
    core.timer = None
    core.stop_waiting()
    core.link.hang_up()


@warm_idle.upon(Inputs.report).loop()
def _report(self: Self, core: Core) -> None:
    try:
        core.link.send(core.host.hello(None))
    except Exception:
        log.failure("cannot read the host's load for a warm channel")


def _client_chose_another(self: Self, core: Core) -> None:
    core.stop_waiting()
    core.host.metrics.connect_back("lost")
    core.link.hang_up()


awaiting_start.upon(Inputs.busy).to(closed)(_client_chose_another)
warm_idle.upon(Inputs.busy).to(closed)(_client_chose_another)


def _for_the_last_job(self: Self, core: Core, frame: wire.Frame) -> None:
    """Meant for the last job, sent before its client saw the EXIT: dropped."""


warm_idle.upon(Inputs.signal).loop()(_for_the_last_job)
warm_idle.upon(Inputs.stream).loop()(_for_the_last_job)


# -- starting ---------------------------------------------------------------------------

@starting.upon(Inputs.started).to(running)
def _running(self: Self, core: Core, job: StartedJob) -> None:
    core.job, core.process = job.job, job.process
    core.jobs += 1


@starting.upon(Inputs.refuse).to(closed)
def _refuse(self: Self, core: Core, refusal: Refusal) -> None:
    log.warn("job refused: {message}", message=refusal.message)
    core.host.metrics.job_refused(refusal.reason)
    core.link.send(wire.Error(refusal.reason, refusal.message))
    core.link.hang_up()


@starting.upon(Inputs.no_slot).to(closed)
def _busy(self: Self, core: Core) -> None:
    log.info("no free slot for the next job on a warm channel from {peer}",
             peer=core.link.peer_address())
    core.link.send(wire.Busy())  # the client announces instead
    core.link.hang_up()


@starting.upon(Inputs.queue).to(queued)
def _queued(self: Self, core: Core, frame: wire.Queued) -> None:
    core.link.send(frame)


# -- queued: waiting for a slot -----------------------------------------------------------

@queued.upon(Inputs.admit).to(starting)
def _admitted(self: Self, core: Core) -> None:
    frame, core.start_frame = core.start_frame, None
    assert frame is not None
    _run(self, core, frame)


@queued.upon(Inputs.signal).loop()
def _signal_queued(self: Self, core: Core, frame: wire.Signal | wire.Winsize) -> None:
    """A new window size is the job's when it starts; a signal before then is an error
    (a client whose job is queued gives up its place instead)."""
    if isinstance(frame, wire.Winsize) and core.start_frame is not None:
        core.start_frame = replace(core.start_frame, rows=frame.rows, cols=frame.cols)
    else:
        _protocol_error(self, core, frame)


@queued.upon(Inputs.busy).to(closed)
def _gave_up(self: Self, core: Core) -> None:
    """The client gave up its place in the queue (it chose another worker, or timed out)."""
    core.stop_waiting()
    core.link.hang_up()


# -- running ----------------------------------------------------------------------------

@running.upon(Inputs.signal).loop()
def _signal(self: Self, core: Core, frame: wire.Signal | wire.Winsize) -> None:
    assert core.process is not None
    if isinstance(frame, wire.Signal):
        core.process.deliver_signal(frame.number)
    else:
        core.process.resize(frame.rows, frame.cols)


@running.upon(Inputs.rest).to(warm_idle)
def _rest(self: Self, core: Core) -> None:
    """Wait, idle, for the client's next START, telling it this worker's load meanwhile."""
    core.job, core.process = None, None
    core.link.forget_streams()
    host = core.host
    host.warm.add(core.link)
    core.wait(WARM_IDLE, self.deadline)
    core.reporter = LoopingCall(self.report)
    core.reporter.clock = host.reactor
    core.reporter.start(WARM_REPORT, now=True)


@running.upon(Inputs.finish).to(closed)
def _finish(self: Self, core: Core) -> None:
    core.link.hang_up()


def _deliver(self: Self, core: Core, frame: wire.Frame) -> None:
    core.link.deliver(frame)  # a stream not open is a protocol error


running.upon(Inputs.stream).loop()(_deliver)
awaiting_start.upon(Inputs.stream).loop()(_deliver)
queued.upon(Inputs.stream).loop()(_deliver)


# -- protocol errors, the client's ERROR, closing and loss: every open state ----------------

def _protocol_error(self: Self, core: Core, frame: wire.Frame) -> None:
    core.link.protocolError(f"unexpected {type(frame).__name__} frame")  # then close()


def _unexpected_busy(self: Self, core: Core) -> None:
    _protocol_error(self, core, wire.Busy())


awaiting_start.upon(Inputs.signal).loop()(_protocol_error)
running.upon(Inputs.start).loop()(_protocol_error)
running.upon(Inputs.busy).loop()(_unexpected_busy)
queued.upon(Inputs.start).loop()(_protocol_error)
for _state in (awaiting_start, running, warm_idle, queued):
    _state.upon(Inputs.unexpected).loop()(_protocol_error)


def _client_error(self: Self, core: Core, message: str) -> None:
    log.warn("client {peer} ended the job: {message}", peer=core.link.peer_address(),
             message=message)
    core.stop_waiting()
    core.link.hang_up()


def _close(self: Self, core: Core, abort: bool) -> None:
    core.stop_waiting()
    core.link.hang_up(abort)


def _gone(self: Self, core: Core, reason: Failure) -> None:
    core.stop_waiting()
    host, link = core.host, core.link
    if not link.verified and not core.given_up:
        host.metrics.auth_failure()
        host.complain(link.peer_address(), f"TLS with client failed: {reason.getErrorMessage()}")
    host.release(core.pending)
    if core.process is not None and not core.process.ended:
        log.warn("client of job {job} went away; ending the job's process group", job=core.job)
        core.process.kill_group()


for _state in (awaiting_start, running, warm_idle, queued):
    _state.upon(Inputs.client_error).to(closed)(_client_error)
for _state in (verifying, awaiting_start, starting, running, warm_idle, queued):
    _state.upon(Inputs.close).to(closed)(_close)
    _state.upon(Inputs.lost).to(closed)(_gone)

# -- closed: the connection is going or gone; nothing more happens but its loss ----------

def _too_late(self: Self, core: Core, *args: object) -> None:
    """The channel is closing: nothing more happens on it."""


closed.upon(Inputs.lost).loop()(_gone)
closed.upon(Inputs.close).loop()(_close)  # (a protocol error's close comes after the error)
for _input in (Inputs.connected, Inputs.taken, Inputs.handshake_timeout, Inputs.give_up,
               Inputs.start, Inputs.signal, Inputs.stream, Inputs.busy, Inputs.client_error,
               Inputs.unexpected, Inputs.started, Inputs.refuse, Inputs.no_slot, Inputs.rest,
               Inputs.finish, Inputs.deadline, Inputs.report, Inputs.queue, Inputs.admit):
    closed.upon(_input).loop()(_too_late)

WorkerMachine = builder.build()
index_transitions(WorkerMachine)  # a dict lookup per input, not a scan of 73

