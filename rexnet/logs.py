"""Log observers: for the command-line tools, and JSON lines for twistd services
(`twistd -n --logger rexnet.logs.json_logger rexnet-worker ...`)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import IO, Any

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
)
from zope.interface import provider

from rexnet.protocol.text import printable


def message_observer(emit: Callable[[str], None], verbose: bool) -> ILogObserver:
    """Warnings (complaints) always, info too when VERBOSE, each as one text to EMIT, with
    control characters escaped (messages quote what peers say: worker names, errors)."""

    @provider(ILogObserver)
    def write(event: dict) -> None:  # type: ignore[type-arg]
        text = formatEvent(event)
        failure = event.get("log_failure")
        if failure is not None:
            text = f"{text}: {failure.getErrorMessage()}"
        emit(printable(text, 4000))

    levels = LogLevelFilterPredicate(defaultLogLevel=LogLevel.warn)
    if verbose:
        levels.setLogLevelForNamespace("rexnet", LogLevel.info)
    return FilteringLogObserver(write, [levels])


def stderr_observer(verbose: bool) -> ILogObserver:
    """The log as 'rexnet: ...' lines on stderr."""
    return message_observer(lambda text: print(f"rexnet: {text}", file=sys.stderr, flush=True),
                            verbose)


def json_event(event: dict[str, Any]) -> str:
    """EVENT as one line of JSON: time (ISO 8601, UTC), level, namespace, message (the
    formatted text), failure (a traceback, if any), and the event's own fields."""
    record: dict[str, Any] = {
        "time": datetime.fromtimestamp(event.get("log_time", 0), UTC).isoformat(),
        "level": getattr(event.get("log_level"), "name", "info"),
        "namespace": event.get("log_namespace", "-"),
        "message": formatEvent(event),
    }
    failure = event.get("log_failure")
    if failure is not None:
        record["failure"] = failure.getTraceback()
    for key, value in event.items():
        if key.startswith("log_") or key in record or key in ("format", "message", "isError",
                                                               "system", "time"):
            continue
        if isinstance(value, str | int | float | bool | type(None)):
            record[key] = value
        elif isinstance(value, list | tuple) and all(isinstance(v, str | int | float)
                                                     for v in value):
            record[key] = list(value)
    return json.dumps(record, ensure_ascii=False)


def json_file_observer(out: IO[str]) -> ILogObserver:
    """Every event as one line of JSON on OUT."""

    @provider(ILogObserver)
    def write(event: dict[str, Any]) -> None:
        out.write(json_event(event) + "\n")
        out.flush()

    return write


def json_logger() -> ILogObserver:
    """twistd --logger rexnet.logs.json_logger: JSON lines on stdout (use with twistd -n,
    as under systemd, whose journal keeps them)."""
    return json_file_observer(sys.stdout)
