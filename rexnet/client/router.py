"""From a job's channels to its state machine (rexnet.client.machine): ChannelRouter, and
trace() for watching the machine's transitions."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rexnet.client.channel import ClientChannel
from rexnet.client.jobcore import JobCore
from rexnet.client.machine import JobInputs
from rexnet.protocol import wire


class ChannelRouter:
    """Turns a job's channels' events (rexnet.client.channel.ChannelEvents) into inputs:
    every channel's connection events and load reports, and the job frames of the chosen
    channel only."""

    def __init__(self, core: JobCore, machine: JobInputs) -> None:
        self.core = core
        self.machine = machine

    def connected(self, channel: ClientChannel) -> None:
        self.machine.connected(channel)

    def verified(self, channel: ClientChannel) -> None:
        self.machine.verified(channel)

    def refused(self, channel: ClientChannel, problem: str) -> None:
        self.machine.refused(channel, problem)

    def hello(self, channel: ClientChannel, hello: wire.Hello) -> None:
        self.machine.hello(channel, hello)

    def started(self, channel: ClientChannel, started: wire.Started) -> None:
        if channel is self.core.chosen:
            self.machine.started(started)

    def exited(self, channel: ClientChannel, exit: wire.Exit) -> None:
        if channel is self.core.chosen:
            self.machine.exited(exit)

    def error(self, channel: ClientChannel, error: wire.Error) -> None:
        if channel is self.core.chosen:
            self.machine.error(error)

    def busy(self, channel: ClientChannel) -> None:
        if channel is self.core.chosen:
            self.machine.busy()

    def queued(self, channel: ClientChannel, queued: wire.Queued) -> None:
        if channel is self.core.chosen:
            self.machine.queued(queued)

    def unexpected(self, channel: ClientChannel, frame: wire.Frame) -> None:
        if channel is self.core.chosen:
            self.machine.unexpected(frame)

    def lost(self, channel: ClientChannel, problem: str) -> None:
        if channel is self.core.chosen:
            self.machine.worker_lost()
        else:
            self.machine.lost(channel, problem)


def trace(machine: JobInputs, tell: Callable[[str, str, str], None]) -> None:
    """Call TELL(old state, input, new state) on each transition of MACHINE (Automat's
    tracing hook)."""
    transitioner = getattr(machine, "__automat_transitioner__")  # noqa: B009

    def tracer(old: Any, symbol: str, new: Any) -> None:
        tell(old.name, symbol, new.name)

    transitioner.setTrace(tracer)
