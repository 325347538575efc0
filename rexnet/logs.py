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

PREFORMATTED = "{log_text}"
"""The format of an event whose text its emitter made once (an f-string in log_text), with
its fields beside it for the JSON log: for log lines on a hot path (the worker's per job),
which Twisted would otherwise format field by field (string.Formatter, in Python). The
text is what the field-by-field format gave; log_text itself, like every log_ key, is not
one of the event's fields in the JSON log."""

_encoder = json.JSONEncoder(ensure_ascii=False)  # (json.dumps makes one a call)
_NOT_FIELDS = frozenset(("format", "message", "isError", "system", "time"))
_SCALARS = (str, int, float, bool, type(None))  # (a tuple: isinstance checks it faster)
_ITEMS = (str, int, float)


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
    text = event.get("log_text")
    record: dict[str, Any] = {
        "time": datetime.fromtimestamp(event.get("log_time", 0), UTC).isoformat(),
        "level": getattr(event.get("log_level"), "name", "info"),
        "namespace": event.get("log_namespace", "-"),
        "message": text if type(text) is str and event.get("log_format") == PREFORMATTED
        else formatEvent(event),  # (what formatEvent gives for PREFORMATTED, at once)
    }
    failure = event.get("log_failure")
    if failure is not None:
        record["failure"] = failure.getTraceback()
    for key, value in event.items():
        if key.startswith("log_") or key in _NOT_FIELDS or key in record:
            continue
        if isinstance(value, _SCALARS):
            record[key] = value
        elif isinstance(value, list | tuple) and all(isinstance(v, _ITEMS) for v in value):
            record[key] = list(value)
    return _encoder.encode(record)


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
