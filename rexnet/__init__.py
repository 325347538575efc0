"""rexnet: run commands on the least-loaded machine of an ad-hoc cluster."""

from __future__ import annotations

TYPE_CHECKING = False  # not typing's: `import rexnet` must stay cheap for the launcher
if TYPE_CHECKING:
    from typing import Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from rexnet.client import CompletedJob, JobFailed
    from rexnet.executor import CallFailed, Executor
    from rexnet.remote import RemoteError

# imported on first use, so that `import rexnet` (and `rexnet --help`) stays quick
_LAZY = {"Executor": "rexnet.executor", "CallFailed": "rexnet.executor",
         "CompletedJob": "rexnet.client", "JobFailed": "rexnet.client",
         "RemoteError": "rexnet.remote"}

__all__ = ["CallFailed", "CompletedJob", "Executor", "JobFailed", "RemoteError",
           "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rexnet' has no attribute {name!r}")
