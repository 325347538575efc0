"""The client side of a job (ClientJob and its channel), warm channels, and the Python API
built on it: run(), run_streaming(), Executor, the Cluster they run on, rexnet parallel,
rexnet status; the errors a job can end with."""

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
