"""Log observers for the command-line tools (twistd services use twistd's own)."""

from __future__ import annotations

import sys
from collections.abc import Callable

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
)
from zope.interface import provider


def message_observer(emit: Callable[[str], None], verbose: bool) -> ILogObserver:
    """Warnings (complaints) always, info too when VERBOSE, each as one text to EMIT."""

    @provider(ILogObserver)
    def write(event: dict) -> None:  # type: ignore[type-arg]
        text = formatEvent(event)
        failure = event.get("log_failure")
        if failure is not None:
            text = f"{text}: {failure.getErrorMessage()}"
        emit(text)

    levels = LogLevelFilterPredicate(defaultLogLevel=LogLevel.warn)
    if verbose:
        levels.setLogLevelForNamespace("rexnet", LogLevel.info)
    return FilteringLogObserver(write, [levels])


def stderr_observer(verbose: bool) -> ILogObserver:
    """The log as 'rexnet: ...' lines on stderr."""
    return message_observer(lambda text: print(f"rexnet: {text}", file=sys.stderr, flush=True),
                            verbose)
