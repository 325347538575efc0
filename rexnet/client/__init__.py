"""The client side of a job, and the Python API: run(), run_streaming(), Executor (rexnet),
the Cluster they run on, the errors a job can end with, rexnet parallel and rexnet status."""

from rexnet.client.api import request_of, run, run_on, run_streaming, stream_on
from rexnet.client.cluster import Cluster, Target
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

__all__ = ["AuthFailed", "Cluster", "CompletedJob", "Interrupted", "JobFailed", "JobRefused",
           "JobResult", "LimitHit", "NoWorker", "OutputLimit", "Target", "WorkerLost",
           "request_of", "run", "run_on", "run_streaming", "stream_on"]
