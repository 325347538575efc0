"""The worker's two log lines per job (started, ended), each formatted once by an f-string
(rexnet.logs.PREFORMATTED) with its fields beside it for the JSON log; they keep the
namespace of the worker's service, whose lines they were."""

from __future__ import annotations

from collections.abc import Sequence

from twisted.logger import Logger

from rexnet.logs import PREFORMATTED

log = Logger(namespace="rexnet.worker.service")


def started(job: str, client: str, peer: str, argv: Sequence[str], *, warm: bool, tty: bool,
            detached: bool, cwd: str, queued: tuple[float, int] | None = None) -> None:
    """Job JOB of CLIENT (at PEER) runs ARGV (in CWD, if given); WARM: on a warm channel;
    TTY: in a terminal; DETACHED: the client does not wait for it; QUEUED: it waited that
    many seconds in the queue, which it joined at that position (the queue's own line
    comes only for a long expected wait: one line a job, not two)."""
    on = " on a warm channel" if warm else ""
    how = (" (in a detached terminal)" if tty and detached else " (detached)" if detached
           else " (in a terminal)" if tty else "")
    where = f" in {cwd}" if cwd else ""
    waited = (f" after {queued[0]:.3f} s in the queue (from position {queued[1]})"
              if queued else "")
    log.info(PREFORMATTED, log_text=f"job {job} started for {client} from {peer}{on}"
             f"{waited}: {list(argv)}{how}{where}", job=job, client=client, peer=peer,
             argv=argv, warm=on, queued=waited, tty=how, cwd=where)


def ended(job: str, code: int | None, sig: int | None, limit: str) -> None:
    """Job JOB ended with exit status CODE or signal SIG (after its LIMIT, if one)."""
    how = f"exit {code}" if sig is None else f"signal {sig}"
    why = f" ({limit} limit)" if limit else ""
    log.info(PREFORMATTED, log_text=f"job {job} ended: {how}{why}", job=job, how=how,
             limit=why)

