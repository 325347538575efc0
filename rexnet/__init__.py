"""rexnet: run commands on the least-loaded machine of an ad-hoc cluster."""

from __future__ import annotations

from rexnet.version import __version__

TYPE_CHECKING = False  # not typing's: `import rexnet` must stay cheap for the launcher
if TYPE_CHECKING:
    from typing import Any

    from rexnet.client.executor import CallFailed, Executor
    from rexnet.client.results import CompletedJob, JobFailed
    from rexnet.protocol.remotecall import RemoteError

# imported on first use, so that `import rexnet` (and `rexnet --help`) stays quick
_LAZY = {"Executor": "rexnet.client.executor", "CallFailed": "rexnet.client.executor",
         "CompletedJob": "rexnet.client.results", "JobFailed": "rexnet.client.results",
         "RemoteError": "rexnet.protocol.remotecall"}

__all__ = ["CallFailed", "CompletedJob", "Executor", "JobFailed", "RemoteError",
           "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rexnet' has no attribute {name!r}")
