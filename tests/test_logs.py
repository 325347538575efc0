"""The worker's per-job log lines (rexnet.worker.joblines), formatted once: the same text
Twisted made of their field-by-field formats, the same fields in the JSON log
(rexnet.logs.json_event), and both logs of a real worker show them: one line for a job
that ends within LINE_HOLD, both lines for a longer one."""

from __future__ import annotations

import json
import re
import subprocess
from datetime import datetime
from types import SimpleNamespace
from typing import Any, cast

import pytest
from cluster import REXNET, Proc, loopback_address, worker_argv
from conftest import Keys
from twisted.internet.task import Clock
from twisted.logger import Logger, LogLevel, capturedLogs, formatEvent

from rexnet.logs import PREFORMATTED, json_event
from rexnet.net.alerts import AlertSender
from rexnet.worker import joblines
from rexnet.worker.detached import JobBook
from rexnet.worker.jobbooks import LINE_HOLD, JobBooks
from rexnet.worker.jobqueue import JobQueue
from rexnet.worker.metrics import NoMetrics
from rexnet.worker.settings import Running

# the lines as rexnet.worker.service logged them field by field, before joblines (and a
# queued job's wait, in the started line since the queue's own line is only for long waits)
STARTED = "job {job} started for {client} from {peer}{warm}{queued}: {argv}{tty}{cwd}"
ENDED = "job {job} ended: {how}{limit}"


def field_by_field(format: str, **fields: Any) -> dict[str, Any]:
    with capturedLogs() as events:
        Logger(namespace="rexnet.worker.service").info(format, **fields)
    return dict(events[0])


@pytest.mark.parametrize(("warm", "tty", "detached", "cwd", "queued"), [
    (False, False, False, "", None), (True, False, False, "/srv/x", None),
    (False, True, False, "", None), (False, False, True, "", (0.0125, 3)),
    (False, True, True, "/tmp", None), (True, False, False, "", (61.5, 12))])
def test_the_started_line_is_the_field_by_field_one(
        warm: bool, tty: bool, detached: bool, cwd: str, queued: tuple[float, int] | None
) -> None:
    argv = ["sh", "-c", "echo 'hi' {}"]  # braces and quotes pass as they are
    with capturedLogs() as events:
        joblines.log_started(*joblines.start_parts(
            "0123abcd", "alice", "127.0.0.2:4567", argv, warm=warm, tty=tty,
            detached=detached, cwd=cwd, queued=queued))
    [event] = events
    old = field_by_field(
        STARTED, job="0123abcd", client="alice", peer="127.0.0.2:4567", argv=argv,
        warm=" on a warm channel" if warm else "",
        queued=f" after {queued[0]:.3f} s in the queue (from position {queued[1]})"
        if queued else "",
        tty=" (in a detached terminal)" if tty and detached else " (detached)" if detached
        else " (in a terminal)" if tty else "",
        cwd=f" in {cwd}" if cwd else "")
    assert formatEvent(event) == formatEvent(old)
    assert event["log_namespace"] == "rexnet.worker.service"
    assert event["log_level"] is LogLevel.info and event["log_format"] == PREFORMATTED
    new, before = json.loads(json_event(event)), json.loads(json_event(old))
    assert new.pop("time") and before.pop("time")
    assert new == before
    assert new["argv"] == argv and new["job"] == "0123abcd" and "log_text" not in new


@pytest.mark.parametrize(("code", "sig", "limit"), [(0, None, ""), (3, None, "cpu"),
                                                    (None, 9, ""), (None, 24, "cpu")])
def test_the_ended_line_is_the_field_by_field_one(code: int | None, sig: int | None,
                                                   limit: str) -> None:
    with capturedLogs() as events:
        joblines.ended("0123abcd", code, sig, limit)
    [event] = events
    old = field_by_field(ENDED, job="0123abcd",
                         how=f"exit {code}" if sig is None else f"signal {sig}",
                         limit=f" ({limit} limit)" if limit else "")
    assert formatEvent(event) == formatEvent(old)
    new, before = json.loads(json_event(event)), json.loads(json_event(old))
    assert new.pop("time") and before.pop("time")
    assert new == before


def test_json_keeps_formatting_other_events_as_before() -> None:
    event = field_by_field("{a} and {b!r}", a=1, b="two", nested={"no": "kept"},
                           listed=(1, "x"), log_text="not a PREFORMATTED event")
    record = json.loads(json_event(event))
    assert record["message"] == "1 and 'two'"
    assert record["a"] == 1 and record["b"] == "two" and record["listed"] == [1, "x"]
    assert "nested" not in record and "log_text" not in record


def run_one_job(keys: Keys, *twistd: str, command: str = "cat") -> str:
    """The log of a worker (with these twistd options) that ran one job of `sh -c
    COMMAND`, its stdin "hi"."""
    addr = loopback_address()
    argv = worker_argv(keys.worker, ["sh", "-c", command], f"{addr}:3010", "logging")
    argv[argv.index("rexnet-worker"):argv.index("rexnet-worker")] = twistd
    worker = Proc(argv)
    try:
        worker.wait_for("listening on|serves testapp")
        done = subprocess.run([REXNET, "exec", "-a", f"{addr}:3010", str(keys.client)],
                              input=b"hi", capture_output=True, timeout=60)
        assert done.returncode == 0 and done.stdout == b"hi", done.stderr
        worker.wait_for(r"job \w+ (ended|started .*, ended after [\d.]+ s): exit 0")
    finally:
        worker.stop()
    return worker.output


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_a_worker_logs_a_short_job_in_one_line_in_text_and_in_json(keys: Keys) -> None:
    text = run_one_job(keys)
    job = re.search(r"\+0000 \[rexnet\.worker\.service#info\] job (\w+) started for "
                    r"client from 127\.[\d.]+:\d+: \['/\S+/sh', '-c', 'cat'\], ended after "
                    r"0\.\d{3} s: exit 0\n", text)
    assert job, text
    assert text.count(f"job {job[1]} ") == 1 and "ended: " not in text
    records = json_lines(run_one_job(keys, "--logger=rexnet.logs.json_logger"))
    [ran] = [r for r in records if " started for " in r["message"]]
    assert not [r for r in records if " ended: " in r["message"]]
    assert ran["namespace"] == "rexnet.worker.service"
    [sh, *rest] = ran["argv"]
    assert sh.endswith("/sh") and rest == ["-c", "cat"] and ran["client"] == "client"
    assert ran["message"] == (f"job {ran['job']} started for client from {ran['peer']}: "
                              f"{ran['argv']}, ended after {ran['seconds']:.3f} s: exit 0")
    assert (ran["warm"], ran["tty"], ran["cwd"], ran["queued"]) == ("", "", "", "")
    assert (ran["how"], ran["limit"]) == ("exit 0", "")
    assert 0 < ran["seconds"] < LINE_HOLD


def test_a_longer_job_gets_its_started_line_then_its_ended_line(keys: Keys) -> None:
    """A job still running LINE_HOLD after its start: its started line then (not held to
    the job's end), its ended line at the end."""
    records = json_lines(run_one_job(keys, "--logger=rexnet.logs.json_logger",
                                     command=f"sleep {LINE_HOLD * 8}; cat"))
    [started] = [r for r in records if " started for " in r["message"]]
    [ended] = [r for r in records if " ended: " in r["message"]]
    assert " ended after " not in started["message"]
    assert started["message"] == (f"job {started['job']} started for client from "
                                  f"{started['peer']}: {started['argv']}")
    assert ended["message"] == f"job {started['job']} ended: exit 0"
    assert (ended["job"], ended["how"], ended["limit"]) == (started["job"], "exit 0", "")
    # the started line came about LINE_HOLD after the start, well before the end
    gap = (datetime.fromisoformat(ended["time"])
           - datetime.fromisoformat(started["time"])).total_seconds()
    assert gap > LINE_HOLD * 2, gap


def test_held_started_lines_come_when_due_oldest_first_and_all_at_the_stop() -> None:
    """The worker's books on a Clock: a job ended within LINE_HOLD has one line; the
    others' started lines come LINE_HOLD after their starts, in order, by one call at a
    time; the stop logs those still held; a job whose line came ends with its own."""
    clock = Clock()
    worker = SimpleNamespace(reactor=clock, settings=SimpleNamespace(name="w"),
                             alerts=AlertSender(clock, cast(Any, None), []),
                             metrics=NoMetrics(), queue=JobQueue(4),
                             book=JobBook(clock, cast(Any, None), "/nonexistent", 0, 60.0),
                             complain=lambda *_: None)
    books = JobBooks(cast(Any, worker))

    def start(job: str) -> None:
        books.started(job, "alice", "127.0.0.2:1", ["true"], "true", warm=False, tty=False,
                      detached=False, cwd="")

    def end(job: str, since: float) -> None:
        books.ended(Running(job, cast(Any, None), cast(Any, None), "alice", started=since),
                    0, None, "", 0, 0)

    with capturedLogs() as events:
        start("a")
        clock.advance(LINE_HOLD / 5)
        end("a", 0.0)
        start("b")
        clock.advance(LINE_HOLD / 2)
        start("c")
        clock.advance(LINE_HOLD * 0.7)  # b's line is due, c's not yet
        assert [formatEvent(e) for e in events[1:]] == ["job b started for alice from "
                                                        "127.0.0.2:1: ['true']"]
        assert len(clock.getDelayedCalls()) == 1  # one call, for c's line
        clock.advance(LINE_HOLD / 2)
        start("d")
        books.flush()  # the worker stops
        end("b", LINE_HOLD / 5)
    lines = [formatEvent(e) for e in events]
    assert lines == [f"job a started for alice from 127.0.0.2:1: ['true'], ended after "
                     f"{LINE_HOLD / 5:.3f} s: exit 0",
                     *(f"job {j} started for alice from 127.0.0.2:1: ['true']" for j in "bcd"),
                     "job b ended: exit 0"]
    assert clock.getDelayedCalls() == []
