"""The client side of a job, and the Python API: run(), run_streaming(), Executor (rexnet),
the errors a job can end with, rexnet parallel and rexnet status."""

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
