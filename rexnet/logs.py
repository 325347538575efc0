"""Log observers for the command-line tools (twistd services use twistd's own)."""

from __future__ import annotations

import sys

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
)
from zope.interface import provider


def stderr_observer(verbose: bool) -> ILogObserver:
    """Warnings (complaints) always, info too when VERBOSE, as 'rexnet: ...' lines."""

    @provider(ILogObserver)
    def write(event: dict) -> None:  # type: ignore[type-arg]
        text = formatEvent(event)
        failure = event.get("log_failure")
        if failure is not None:
            text = f"{text}: {failure.getErrorMessage()}"
        print(f"rexnet: {text}", file=sys.stderr, flush=True)

    levels = LogLevelFilterPredicate(defaultLogLevel=LogLevel.warn)
    if verbose:
        levels.setLogLevelForNamespace("rexnet", LogLevel.info)
    return FilteringLogObserver(write, [levels])
