"""The client side of a job (ClientJob and its channel), warm channels, and the Python API
built on it: run(), run_streaming(), Executor, rexnet parallel, rexnet status; the errors a
job can end with."""

from rexnet.client.api import Target, run, run_streaming
from rexnet.client.results import (
    AuthFailed,
    CompletedJob,
    Interrupted,
    JobFailed,
    JobRefused,
    JobResult,
    LimitHit,
    NoWorker,
    OutputLimit,
    WorkerLost,
)

__all__ = ["AuthFailed", "CompletedJob", "Interrupted", "JobFailed", "JobRefused", "JobResult",
           "LimitHit", "NoWorker", "OutputLimit", "Target", "WorkerLost", "run",
           "run_streaming"]
