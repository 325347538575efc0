"""One job on every worker (pdsh -a, dsh's "all nodes"), or on the workers named.

`rexnet exec --all APP -- uptime` asks the cluster who is there (a signed status query,
as `rexnet status`), then runs one ordinary job per worker name, each announced for that
worker only (the announcement's ``workers`` field: the others do not answer), all at
once. Each job gets no input; its output comes back line by line, prefixed with the
worker's name ("name: line", as pdsh), or grouped per worker under a header (as dshbak).
The outcome is the highest status of all (a job that failed counts rexnet's exit code).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IConsumer
from zope.interface import implementer

from rexnet.client.cluster import Cluster
from rexnet.client.pystreams import OutputBuffer, ProducerStreams
from rexnet.client.results import JobFailed, JobResult
from rexnet.client.status import StatusQuery
from rexnet.protocol import exitcodes
from rexnet.protocol.request import ExecRequest
from rexnet.protocol.text import printable

Write = Callable[[bytes], None]
MAX_LINE = 64 * 1024  # a longer line is cut into pieces, each prefixed
MAX_GROUPED = 16 << 20  # bytes kept per worker and stream for --no-prefix
RULE = b"-" * 16


@implementer(IConsumer)
class LineTagger:
    """A job's output stream, written line by line with PREFIX before each line."""

    def __init__(self, prefix: bytes, write: Write) -> None:
        self.prefix = prefix
        self.write_out = write
        self.partial = b""

    def write(self, data: bytes) -> None:
        data = self.partial + data
        *lines, self.partial = data.split(b"\n")
        while len(self.partial) > MAX_LINE:
            lines.append(self.partial[:MAX_LINE])
            self.partial = self.partial[MAX_LINE:]
        if lines:
            self.write_out(b"".join(self.prefix + line + b"\n" for line in lines))

    def flush(self) -> None:
        """The stream ended: its last line, if it had no newline."""
        if self.partial:
            self.write_out(self.prefix + self.partial + b"\n")
            self.partial = b""

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        pass

    def unregisterProducer(self) -> None:
        pass


@dataclass
class Outcome:
    """One worker's job: its status, and rexnet's complaint if it failed."""

    name: str
    status: int
    error: str = ""


async def discover(reactor: Any, cluster: Cluster, wait: float) -> list[str]:
    """The names of the workers that answer a status query within WAIT seconds."""
    seen = await StatusQuery(reactor, cluster.credential, cluster.targets,
                             revoked=cluster.revoked).run(wait)
    return sorted({s.reply.worker for s in seen})


async def run_everywhere(reactor: Any, cluster: Cluster, request: ExecRequest,
                         names: Sequence[str], out: Write, err: Write,
                         prefix: bool = True) -> list[Outcome]:
    """Run REQUEST once on each worker of NAMES, at once, writing their output to OUT and
    ERR (prefixed or grouped); every worker's Outcome, in NAMES's order."""
    buffers: dict[str, tuple[OutputBuffer, OutputBuffer]] = {}

    def one(name: str) -> defer.Deferred[Outcome]:
        shown = printable(name).encode()
        if prefix:
            taggers = (LineTagger(shown + b": ", out), LineTagger(shown + b": ", err))
            streams = ProducerStreams(None, *taggers)
        else:
            grouped = buffers[name] = (OutputBuffer(MAX_GROUPED), OutputBuffer(MAX_GROUPED))
            streams = ProducerStreams(None, *grouped)
        job = cluster.job(reactor, request.replace(workers=(name,)), streams)

        def ended(result: object) -> Outcome:
            if prefix:
                for tagger in taggers:
                    tagger.flush()
            if isinstance(result, JobResult):
                return Outcome(name, result.status)
            error = getattr(result, "value", result)
            if isinstance(error, JobFailed):
                return Outcome(name, error.exit_code, str(error))
            return Outcome(name, exitcodes.WORKER_LOST, f"internal error: {error}")

        return job.run().addBoth(ended)

    outcomes = await defer.gatherResults([one(name) for name in names])
    for outcome in outcomes:
        if not prefix:
            stdout, stderr = buffers[outcome.name]
            header = RULE + b"\n" + printable(outcome.name).encode() + b"\n" + RULE + b"\n"
            if stdout.size or not stderr.size:
                out(header + _ended(stdout.getvalue()))
            if stderr.size:
                err(header + _ended(stderr.getvalue()))
        if outcome.error:
            err(f"{printable(outcome.name)}: rexnet: {outcome.error}\n".encode())
    return list(outcomes)


def _ended(data: bytes) -> bytes:
    return data if not data or data.endswith(b"\n") else data + b"\n"


def highest(outcomes: Sequence[Outcome]) -> int:
    """The exit status of a run on several workers: the highest of theirs."""
    return max((o.status for o in outcomes), default=exitcodes.NO_WORKER)
