"""`rexnet exec --all APP -- CMD`: the job on every worker that answers (pdsh, dsh -a).

Runs in this process (not through the agent): rexnet.client.everywhere finds the workers
(or takes the --worker names) and runs the jobs; this sets up logging and the reactor,
ends the jobs on SIGINT/SIGTERM and returns the highest status.
"""

from __future__ import annotations

import os
import sys

from rexnet.protocol import exitcodes
from rexnet.protocol.request import ExecRequest

TYPE_CHECKING = False
if TYPE_CHECKING:
    from rexnet.client.cluster import Cluster


def write_to(fd: int) -> object:
    def write(data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(fd, view):]
            except BlockingIOError:
                import select

                select.select([], [fd], [])
            except OSError:
                return  # the reader went away: drop the rest, as pdsh does
    return write


def run_everywhere(request: ExecRequest, cluster: Cluster, wait: float, prefix: bool) -> int:
    """Run REQUEST on every worker that answers within WAIT seconds (or on each worker
    REQUEST names); the highest exit status."""
    if not 0 < wait <= 3600:
        print("rexnet: --wait must be positive (at most 3600 seconds)", file=sys.stderr)
        return exitcodes.USAGE
    if request.tty or request.fds:
        print("rexnet: --all runs jobs without a terminal or extra descriptors: add -T, "
              "leave out --fd", file=sys.stderr)
        return exitcodes.USAGE
    import signal

    from twisted.internet import defer, reactor
    from twisted.logger import globalLogBeginner

    from rexnet.client import everywhere
    from rexnet.logs import stderr_observer

    globalLogBeginner.beginLoggingTo([stderr_observer(request.verbose)],
                                     redirectStandardIO=False)
    out, err = write_to(1), write_to(2)
    outcome: dict[str, object] = {}

    async def main() -> int:
        names = list(request.workers)
        if not names:
            names = await everywhere.discover(reactor, cluster, wait)
            if request.verbose:
                print(f"rexnet: {len(names)} worker(s) answered within {wait:g} s: "
                      f"{', '.join(names)}", file=sys.stderr, flush=True)
        if not names:
            targets = ", ".join(f"{h}:{p}" for h, p in cluster.targets)
            print(f"rexnet: no worker answered within {wait:g} s (asked {targets})",
                  file=sys.stderr)
            return exitcodes.NO_WORKER
        done = await everywhere.run_everywhere(reactor, cluster, request, names,
                                               out, err, prefix)  # type: ignore[arg-type]
        return everywhere.highest(done)

    def finished(result: object) -> None:
        outcome["result"] = result
        reactor.stop()  # type: ignore[attr-defined]

    def interrupted(number: int, frame: object) -> None:
        outcome["signal"] = number
        reactor.callFromThread(reactor.stop)  # type: ignore[attr-defined]

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupted)
    reactor.callWhenRunning(  # type: ignore[attr-defined]
        lambda: defer.Deferred.fromCoroutine(main()).addBoth(finished))
    reactor.run(installSignalHandlers=False)  # type: ignore[attr-defined,call-arg]
    if "signal" in outcome:
        return 128 + int(outcome["signal"])  # type: ignore[call-overload]
    result = outcome.get("result")
    if isinstance(result, int):
        return result
    print(f"rexnet: internal error: {result}", file=sys.stderr)
    return exitcodes.WORKER_LOST
