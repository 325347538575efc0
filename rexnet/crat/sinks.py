"""Where crat's records go besides the log: the JSONL file (the dashboard is another)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import IO

from rexnet.crat.core import CratError, Record


class JsonlSink:
    """Appends each record to a file as one JSON object a line, flushed per line."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.file: IO[str] = open(path, "a", encoding="utf-8")  # noqa: SIM115
        except OSError as e:
            raise CratError(f"cannot write alerts to {path}: {e.strerror}") from None

    def __call__(self, record: Record) -> None:
        self.file.write(json.dumps(record, separators=(",", ":")) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()



def open_jsonl(path: str) -> JsonlSink:
    return JsonlSink(Path(os.path.abspath(path)))
