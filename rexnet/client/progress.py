"""The words of a job's progress messages (`rexnet exec -v`, an Executor's LOG): where it
runs and why there, where it runs from, and what it asked of its worker. Made only when
someone listens (see rexnet.client.jobcore.silent)."""

from __future__ import annotations

from collections.abc import Iterator

from rexnet.client.channel import ClientChannel
from rexnet.protocol import wire
from rexnet.security.credentials import CertInfo


def silent(message: str) -> None:
    """A SAY that discards progress messages: a job given it does not make them."""


def queued(channel: ClientChannel, queued: wire.Queued) -> str:
    """The job waits in CHANNEL's worker's queue."""
    name = channel.hello.worker if channel.hello else CertInfo.of(channel.peer_cert).name
    return (f"job queued at worker {name} ({channel.peer_address()}): position "
            f"{queued.position}, expected wait {queued.wait_ms / 1000:.1f} s")


def started(channel: ClientChannel, started: wire.Started, name: str, request: wire.Start,
            reused: bool, queued_s: float | None, answered: int, searched: float
            ) -> Iterator[str]:
    """The job runs on worker NAME over CHANNEL: where, why there, in which directory."""
    heard_ms = (channel.clock.seconds() - channel.heard_at) * 1000
    why = placement(channel.hello, reused, queued_s, answered, searched * 1000, heard_ms)
    yield f"job {started.job} runs on worker {name} ({channel.peer_address()}): {why}"
    where = directory(started, request)
    if where:
        yield where


def placement(hello: wire.Hello | None, reused: bool, queued_s: float | None, answered: int,
              searched_ms: float, heard_ms: float) -> str:
    """Why the job runs on its worker: HELLO is the worker's last report (HEARD_MS ago),
    REUSED whether the channel was a warm one, QUEUED_S how long it waited in the worker's
    queue (None: it did not), ANSWERED how many workers connected back, SEARCHED_MS how
    long the search took."""
    if hello and reused:
        return (f"reused warm channel (its load {hello.load:.2f} reported {heard_ms:.0f} ms "
                f"before, {hello.running}/{hello.slots} slots busy)")
    if hello and queued_s is not None:
        return (f"after {queued_s:.2f} s in its queue (first of {answered} to connect back, "
                f"its load {hello.load:.2f})")
    if hello:
        return (f"first of {answered} to connect back, after {searched_ms:.1f} ms; its load "
                f"{hello.load:.2f}, delay {hello.delay_ms:.1f} ms, "
                f"{hello.running}/{hello.slots} slots busy")
    return "first to connect back"


def directory(started: wire.Started, request: wire.Start) -> str | None:
    """Where the job runs, if the worker said (None: it did not)."""
    if not started.cwd:
        return None
    asked, given = request.cwd, request.cwd_required
    return f"it runs in {started.cwd}" + (
        " (--cwd)" if given else ", the same path as here" if started.cwd == asked
        else f": the worker has no {asked}" if asked else ", the worker's directory")


def asked(request: wire.Start) -> str:
    """What the job asked of its worker, if more than any free slot."""
    r = request
    wanted = [f"{r.cpus} free slots"] if r.cpus != 1 else []
    wanted += [f"{r.mem / 2**30:.3g} GiB of free memory"] if r.mem else []
    wanted += [f"worker {' or '.join(r.workers)}"] if r.workers else []
    return f"; the job asked for {', '.join(wanted)}" if wanted else ""
