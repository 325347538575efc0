"""What a job ends with: its JobResult, or a JobFailed that says why."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass

from rexnet.protocol import exitcodes
from rexnet.protocol.text import printable

MESSAGE_LIMIT = 4000


class JobFailed(Exception):
    """The job could not run or finish for a reason of rexnet's; see exit_code.

    run() fills in what the client knows when the job failed: the worker that had it (if
    one did), the output received before the failure (stdout, stderr, output_bytes) and how
    many times the job was dispatched (attempts).
    """

    exit_code = exitcodes.WORKER_LOST
    worker: str | None = None
    stdout: bytes = b""
    stderr: bytes = b""
    output_bytes = 0
    attempts = 1

    def __init__(self, message: str = "", *args: object) -> None:
        # messages quote what workers say (names, ERROR texts): printed escaped, a worker
        # cannot write terminal control sequences to the user's terminal
        super().__init__(printable(str(message), MESSAGE_LIMIT), *args)


class NoWorker(JobFailed):
    exit_code = exitcodes.NO_WORKER


class AuthFailed(JobFailed):
    exit_code = exitcodes.AUTH_FAILED


class JobRefused(JobFailed):
    exit_code = exitcodes.REFUSED


class WorkerLost(JobFailed):
    exit_code = exitcodes.WORKER_LOST


class LimitHit(JobFailed):
    """The worker ended the job for exceeding --job-timeout or --job-memory."""

    exit_code = exitcodes.TIME_LIMIT


class Interrupted(JobFailed):
    """A signal stopped the client before its job started."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class OutputLimit(JobFailed):
    """The job wrote more than run()'s max_output on stdout or stderr: the client kept the
    first max_output bytes, closed that stream (the job's further writes fail, as into a
    closed pipe) and holds what the job did next in ``result``."""

    exit_code = exitcodes.MEMORY_LIMIT

    def __init__(self, message: str, result: CompletedJob) -> None:
        super().__init__(message)
        self.result = result


@dataclass(frozen=True)
class JobResult:
    """How the job ended, and where it ran."""

    code: int | None
    signal: int | None
    worker: str
    address: str
    job: str

    @property
    def status(self) -> int:
        """The exit status a shell would show: the code, or 128+N for signal N."""
        return self.code if self.signal is None else 128 + self.signal  # type: ignore[return-value]


@dataclass(frozen=True)
class CompletedJob:
    """A finished job, like subprocess.CompletedProcess.

    ``returncode`` is the status a shell would show (128+N when signal N killed the job, as
    ``rexnet exec`` exits with); ``signal`` is N. ``worker`` named the worker it ran on,
    ``attempts`` says how many times it was dispatched (more than 1 after a re-dispatch).
    """

    args: tuple[str, ...]
    returncode: int
    stdout: bytes
    stderr: bytes
    worker: str
    address: str = ""
    job: str = ""
    signal: int | None = None
    attempts: int = 1

    def check_returncode(self) -> None:
        """Raise subprocess.CalledProcessError if the status is not 0."""
        if self.returncode:
            raise subprocess.CalledProcessError(self.returncode, list(self.args), self.stdout,
                                                self.stderr)
