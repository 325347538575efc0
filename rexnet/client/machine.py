"""The client job's state machine (Automat's TypeMachineBuilder: JobMachine).

``automat-visualize rexnet.client.machine`` draws it (with graphviz installed). In text,
state --input--> state  [what happens]::

    idle --look--> looking                 listen, announce; resend with backoff (a
                                           saturated pool: wait for its channel first)
    idle --reuse--> reusing                START over a warm channel from the pool
    looking --reuse--> reusing             the pool handed over a channel its job left:
                                           stop announcing (or waiting for it), START
    looking --unreachable--> done          NoWorker: no announce target can be reached
    looking --connected--> handshaking     a worker connected back: TLS under way
    handshaking --connected--> handshaking     (several may be in flight)
    handshaking --refused, lost--> handshaking a failed handshake is a complaint
    handshaking --none_pending--> looking  every handshake failed: keep announcing
    handshaking --verified--> chosen       TAKEN to the targets, BUSY to the other
                                           verified, abort the rest; START
    looking, handshaking --timed_out--> done   AuthFailed if a handshake failed,
                                               else NoWorker
    reusing --busy--> looking              "warm channel to worker W has no free slot"
    reusing --worker_lost--> looking       "... was lost before the job started"
    chosen, reusing --queued--> queued     every slot is busy: the job waits in the
                                           worker's queue (--queue-timeout starts)
    queued --queued--> queued              (a later position)
    queued --started--> running            as from chosen
    queued --signal, queue_timed_out--> done   Interrupted (128+N) or NoWorker: BUSY to
                                           the worker, which frees the place
    chosen, reusing --started--> running   input flows; signals kept so far are sent
    chosen, reusing, queued --error--> done    JobRefused
    running --error--> ending              the worker ends the job: keep its output
    ending --error--> ending               (its latest word is kept)
    chosen, reusing, queued, running --exited--> draining   the status, or LimitHit
    ending --exited--> draining            WorkerLost "lost worker: ERROR"
    chosen, queued, running, ending --worker_lost--> draining   WorkerLost
    draining --drained--> done             every byte of output written: the result
    idle, looking, handshaking --signal--> done   Interrupted (128+N)
    idle .. draining --abandon--> done     Interrupted (a chosen channel is aborted)

    and loops: signal (kept until STARTED, then sent) and resize (WINSIZE; before a
    worker is chosen, the START's size) in chosen .. draining; started, busy,
    unexpected frames and a second EXIT out of place there are protocol errors; a
    worker verified after the choice (chosen .. done) is told BUSY; a connection in
    done is aborted; hello (a load report, for the pool) and refused (a complaint)
    are heard in every state but done; lost and worker_lost in draining and done let
    the pool forget the channel. Any other input is ignored in that state.

Frames of a channel other than the chosen one reach the machine only as connected,
verified, refused, hello and lost (ChannelRouter): a worker that lost the race is
ignored while it closes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from automat import TypeMachineBuilder

from rexnet.client.channel import ClientChannel
from rexnet.client.jobcore import JobCore
from rexnet.protocol import wire
from rexnet.protocol.transitions import index_transitions


class JobInputs(Protocol):
    """The inputs of a job's machine."""

    def look(self) -> None:
        """Run the job by announcing it."""

    def reuse(self, channel: ClientChannel) -> None:
        """Run the job over this warm channel."""

    def unreachable(self) -> None:
        """No announce target can be reached from this host."""

    def connected(self, channel: ClientChannel) -> None:
        """A worker connected back."""

    def verified(self, channel: ClientChannel) -> None:
        """A worker's TLS handshake completed and its certificate is good."""

    def refused(self, channel: ClientChannel, problem: str) -> None:
        """A peer failed authentication."""

    def lost(self, channel: ClientChannel, problem: str) -> None:
        """A connection other than the chosen one is gone."""

    def none_pending(self) -> None:
        """No handshake is under way any more."""

    def hello(self, channel: ClientChannel, hello: wire.Hello) -> None:
        """A worker reported its load."""

    def started(self, started: wire.Started) -> None:
        """The chosen worker runs the job."""

    def exited(self, exit: wire.Exit) -> None:
        """The chosen worker says the job ended."""

    def error(self, error: wire.Error) -> None:
        """The chosen worker sent ERROR."""

    def busy(self) -> None:
        """The chosen worker has no free slot."""

    def queued(self, queued: wire.Queued) -> None:
        """The chosen worker queued the job: every slot is busy."""

    def queue_timed_out(self) -> None:
        """The job waited --queue-timeout in the worker's queue."""

    def unexpected(self, frame: wire.Frame) -> None:
        """The chosen worker sent a frame a client never expects."""

    def worker_lost(self) -> None:
        """The chosen worker's connection is gone."""

    def drained(self) -> None:
        """The job's output is written locally."""

    def timed_out(self) -> None:
        """The job's --timeout passed without a verified worker."""

    def signal(self, number: int) -> None:
        """A signal for the job."""

    def resize(self, rows: int, cols: int) -> None:
        """The client's terminal changed size."""

    def abandon(self) -> None:
        """The job's owner went away."""


builder = TypeMachineBuilder(JobInputs, JobCore)
idle = builder.state("idle")
looking = builder.state("looking")
handshaking = builder.state("handshaking")
chosen = builder.state("chosen")
reusing = builder.state("reusing")
queued = builder.state("queued")
running = builder.state("running")
ending = builder.state("ending")
draining = builder.state("draining")
done = builder.state("done")
STATES = (idle, looking, handshaking, chosen, reusing, queued, running, ending, draining, done)
SEARCHING = (idle, looking, handshaking)  # no worker has the job yet
ENGAGED = (chosen, reusing, queued, running, ending, draining)  # one worker has it

_defined: set[tuple[str, str]] = set()


def _mark(states: tuple[Any, ...], inp: Callable[..., None]) -> None:
    for state in states:
        _defined.add((state.name, inp.__name__))


# -- starting ---------------------------------------------------------------------------


def _look(inputs: JobInputs, core: JobCore) -> None:
    if not core.listen():
        inputs.unreachable()


idle.upon(JobInputs.look).to(looking)(_look)


@idle.upon(JobInputs.reuse).to(reusing)
def _reuse(inputs: JobInputs, core: JobCore, channel: ClientChannel) -> None:
    core.reuse(channel)


@looking.upon(JobInputs.reuse).to(reusing)
def _take_over(inputs: JobInputs, core: JobCore, channel: ClientChannel) -> None:
    core.reuse(channel)


@looking.upon(JobInputs.unreachable).to(done)
def _unreachable(inputs: JobInputs, core: JobCore) -> None:
    core.unreachable()


_mark((idle,), JobInputs.look)
_mark((idle, looking), JobInputs.reuse)
_mark((looking,), JobInputs.unreachable)

# -- looking for a worker ---------------------------------------------------------------


def _connected(inputs: JobInputs, core: JobCore, channel: ClientChannel) -> None:
    core.connected(channel)


looking.upon(JobInputs.connected).to(handshaking)(_connected)
handshaking.upon(JobInputs.connected).loop()(_connected)
for _state in ENGAGED:
    _state.upon(JobInputs.connected).loop()(_connected)  # accepted as the port closed


@done.upon(JobInputs.connected).loop()
def _too_late(inputs: JobInputs, core: JobCore, channel: ClientChannel) -> None:
    core.drop(channel)


_mark(STATES[1:], JobInputs.connected)


def _refused(inputs: JobInputs, core: JobCore, channel: ClientChannel, problem: str) -> None:
    core.auth_failed(channel, problem)


for _state in STATES[:-1]:
    _state.upon(JobInputs.refused).loop()(_refused)
_mark(STATES[:-1], JobInputs.refused)


@handshaking.upon(JobInputs.lost).loop()
def _handshake_lost(inputs: JobInputs, core: JobCore, channel: ClientChannel,
                    problem: str) -> None:
    if problem:
        core.auth_failed(channel, problem)
    core.forget(channel)
    if not core.channels:
        inputs.none_pending()


def _forget(inputs: JobInputs, core: JobCore, channel: ClientChannel, problem: str) -> None:
    core.forget(channel)  # a loser of the race, closed by us; or a warm channel given up


for _state in (idle, looking, *ENGAGED, done):
    _state.upon(JobInputs.lost).loop()(_forget)
_mark(STATES, JobInputs.lost)

handshaking.upon(JobInputs.none_pending).to(looking).returns(None)
_mark((handshaking,), JobInputs.none_pending)


@handshaking.upon(JobInputs.verified).to(chosen)
def _choose(inputs: JobInputs, core: JobCore, channel: ClientChannel) -> None:
    core.choose(channel)


def _turn_away(inputs: JobInputs, core: JobCore, channel: ClientChannel) -> None:
    core.turn_away(channel)


for _state in (idle, looking, *ENGAGED, done):
    _state.upon(JobInputs.verified).loop()(_turn_away)
_mark(STATES, JobInputs.verified)


def _time_out(inputs: JobInputs, core: JobCore) -> None:
    core.time_out()


looking.upon(JobInputs.timed_out).to(done)(_time_out)
handshaking.upon(JobInputs.timed_out).to(done)(_time_out)
_mark((looking, handshaking), JobInputs.timed_out)


def _heard(inputs: JobInputs, core: JobCore, channel: ClientChannel,
           hello: wire.Hello) -> None:
    core.heard(channel, hello)


for _state in STATES[:-1]:
    _state.upon(JobInputs.hello).loop()(_heard)
_mark(STATES[:-1], JobInputs.hello)

# -- the job on its worker --------------------------------------------------------------


def _started(inputs: JobInputs, core: JobCore, started: wire.Started) -> None:
    core.job_started(started)


chosen.upon(JobInputs.started).to(running)(_started)
reusing.upon(JobInputs.started).to(running)(_started)
queued.upon(JobInputs.started).to(running)(_started)


def _queued(inputs: JobInputs, core: JobCore, queued: wire.Queued) -> None:
    core.queued(queued)


chosen.upon(JobInputs.queued).to(queued)(_queued)
reusing.upon(JobInputs.queued).to(queued)(_queued)
queued.upon(JobInputs.queued).loop()(_queued)


@queued.upon(JobInputs.queue_timed_out).to(done)
def _queue_time_out(inputs: JobInputs, core: JobCore) -> None:
    core.queue_time_out()


_mark((queued,), JobInputs.queue_timed_out)


def _protocol_error(inputs: JobInputs, core: JobCore, frame: wire.Frame) -> None:
    core.protocol_error(frame)


def _started_again(inputs: JobInputs, core: JobCore, started: wire.Started) -> None:
    core.protocol_error(started)


for _state in (running, ending, draining):
    _state.upon(JobInputs.started).loop()(_started_again)
for _state in ENGAGED:
    _state.upon(JobInputs.unexpected).loop()(_protocol_error)


def _queued_again(inputs: JobInputs, core: JobCore, queued: wire.Queued) -> None:
    core.protocol_error(queued)  # after STARTED: out of place


for _state in (running, ending, draining):
    _state.upon(JobInputs.queued).loop()(_queued_again)
_mark(ENGAGED, JobInputs.queued)
_mark(ENGAGED, JobInputs.started)
_mark(ENGAGED, JobInputs.unexpected)


def _busy_frame(inputs: JobInputs, core: JobCore) -> None:
    core.protocol_error(wire.Busy())


@reusing.upon(JobInputs.busy).to(looking)
def _warm_busy(inputs: JobInputs, core: JobCore) -> None:
    core.warm_refused("has no free slot", full=True)
    _look(inputs, core)


for _state in (chosen, queued, running, ending, draining):
    _state.upon(JobInputs.busy).loop()(_busy_frame)
_mark(ENGAGED, JobInputs.busy)


def _refuse(inputs: JobInputs, core: JobCore, error: wire.Error) -> None:
    core.refuse(error)


chosen.upon(JobInputs.error).to(done)(_refuse)
reusing.upon(JobInputs.error).to(done)(_refuse)
queued.upon(JobInputs.error).to(done)(_refuse)


def _worker_error(inputs: JobInputs, core: JobCore, error: wire.Error) -> None:
    core.worker_error = error.message


running.upon(JobInputs.error).to(ending)(_worker_error)
ending.upon(JobInputs.error).loop()(_worker_error)
draining.upon(JobInputs.error).loop().returns(None)  # the outcome is decided
_mark(ENGAGED, JobInputs.error)


def _exited(inputs: JobInputs, core: JobCore, exit: wire.Exit) -> None:
    core.job_exited(exit)


for _state in (chosen, reusing, queued, running, ending):
    _state.upon(JobInputs.exited).to(draining)(_exited)


@draining.upon(JobInputs.exited).loop()
def _exited_again(inputs: JobInputs, core: JobCore, exit: wire.Exit) -> None:
    core.protocol_error(exit)



_mark(ENGAGED, JobInputs.exited)


@reusing.upon(JobInputs.worker_lost).to(looking)
def _warm_lost(inputs: JobInputs, core: JobCore) -> None:
    assert core.chosen is not None
    core.forget(core.chosen)
    core.warm_refused("was lost before the job started")
    _look(inputs, core)


def _worker_lost(inputs: JobInputs, core: JobCore) -> None:
    assert core.chosen is not None
    core.forget(core.chosen)
    core.worker_lost()


for _state in (chosen, queued, running, ending):
    _state.upon(JobInputs.worker_lost).to(draining)(_worker_lost)


def _chosen_gone(inputs: JobInputs, core: JobCore) -> None:
    if core.chosen is not None:
        core.forget(core.chosen)


draining.upon(JobInputs.worker_lost).loop()(_chosen_gone)  # its output still drains
done.upon(JobInputs.worker_lost).loop()(_chosen_gone)
_mark((*ENGAGED, done), JobInputs.worker_lost)


@draining.upon(JobInputs.drained).to(done)
def _deliver(inputs: JobInputs, core: JobCore) -> None:
    core.deliver()


_mark((draining,), JobInputs.drained)

# -- from the job's owner: signals, window size, going away -------------------------------


def _interrupted(inputs: JobInputs, core: JobCore, number: int) -> None:
    core.interrupted(number)


def _signal(inputs: JobInputs, core: JobCore, number: int) -> None:
    core.signal(number)


def _interrupted_in_queue(inputs: JobInputs, core: JobCore, number: int) -> None:
    core.leave_queue()
    core.interrupted(number)


for _state in SEARCHING:
    _state.upon(JobInputs.signal).to(done)(_interrupted)
queued.upon(JobInputs.signal).to(done)(_interrupted_in_queue)
for _state in (chosen, reusing, running, ending, draining):
    _state.upon(JobInputs.signal).loop()(_signal)
_mark(STATES[:-1], JobInputs.signal)


def _resize_request(inputs: JobInputs, core: JobCore, rows: int, cols: int) -> None:
    core.resize_request(rows, cols)


def _resize(inputs: JobInputs, core: JobCore, rows: int, cols: int) -> None:
    core.resize(rows, cols)


for _state in SEARCHING:
    _state.upon(JobInputs.resize).loop()(_resize_request)
for _state in ENGAGED:
    _state.upon(JobInputs.resize).loop()(_resize)
_mark(STATES[:-1], JobInputs.resize)


def _abandon(inputs: JobInputs, core: JobCore) -> None:
    core.abandon()


for _state in STATES[:-1]:
    _state.upon(JobInputs.abandon).to(done)(_abandon)
_mark(STATES[:-1], JobInputs.abandon)

# -- everything else is ignored -------------------------------------------------------


def _ignore(inputs: JobInputs, core: JobCore, *args: Any) -> None:
    """An input that means nothing in this state (see the module's docstring)."""


for _state in STATES:
    for _name in sorted(n for n in dir(JobInputs) if not n.startswith("_")):
        if (_state.name, _name) not in _defined:
            _state.upon(getattr(JobInputs, _name)).loop()(_ignore)

JobMachine = builder.build()
index_transitions(JobMachine)  # a dict lookup per input, not a scan of 220
