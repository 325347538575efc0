"""The worker's log lines per job, each formatted once by an f-string
(rexnet.logs.PREFORMATTED) with its fields beside it for the JSON log; they keep the
namespace of the worker's service, whose lines they were.

A job that ends soon after its start gets one line (`ran`): its started line with how it
ended appended; a job still running then gets its started line at that moment and its
ended line at its end (rexnet.worker.jobbooks holds the started line)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.logger import Logger

from rexnet.logs import PREFORMATTED

log = Logger(namespace="rexnet.worker.service")


def start_parts(job: str, client: str, peer: str, argv: Sequence[str], *, warm: bool,
                tty: bool, detached: bool, cwd: str, queued: tuple[float, int] | None = None
                ) -> tuple[str, dict[str, Any]]:
    """The started line's text after "job JOB started " and its fields, for log_started:
    job JOB of CLIENT (at PEER) runs ARGV (in CWD, if given); WARM: on a warm channel;
    TTY: in a terminal; DETACHED: the client does not wait for it; QUEUED: it waited that
    many seconds in the queue, which it joined at that position (the queue's own line
    comes only for a long expected wait: one line a job, not two)."""
    on = " on a warm channel" if warm else ""
    how = (" (in a detached terminal)" if tty and detached else " (detached)" if detached
           else " (in a terminal)" if tty else "")
    where = f" in {cwd}" if cwd else ""
    waited = (f" after {queued[0]:.3f} s in the queue (from position {queued[1]})"
              if queued else "")
    return (f"for {client} from {peer}{on}{waited}: {list(argv)}{how}{where}",
            {"job": job, "client": client, "peer": peer, "argv": argv, "warm": on,
             "queued": waited, "tty": how, "cwd": where})


def log_started(text: str, fields: dict[str, Any]) -> None:
    """The started line of start_parts' TEXT and FIELDS."""
    log.info(PREFORMATTED, log_text=f"job {fields['job']} started {text}", **fields)


def _end_parts(code: int | None, sig: int | None, limit: str) -> tuple[str, str]:
    return (f"exit {code}" if sig is None else f"signal {sig}",
            f" ({limit} limit)" if limit else "")


def ended(job: str, code: int | None, sig: int | None, limit: str) -> None:
    """Job JOB ended with exit status CODE or signal SIG (after its LIMIT, if one)."""
    how, why = _end_parts(code, sig, limit)
    log.info(PREFORMATTED, log_text=f"job {job} ended: {how}{why}", job=job, how=how,
             limit=why)


def ran(text: str, fields: dict[str, Any], code: int | None, sig: int | None, limit: str,
        seconds: float) -> None:
    """The job of start_parts' TEXT and FIELDS ended (as `ended` says) SECONDS after its
    start, before its started line was logged: both in one line, the started line's
    text first."""
    how, why = _end_parts(code, sig, limit)
    log.info(PREFORMATTED, log_text=f"job {fields['job']} started {text}, ended after "
             f"{seconds:.3f} s: {how}{why}", how=how, limit=why, seconds=round(seconds, 6),
             **fields)
