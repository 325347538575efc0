"""The root sandbox helper's complaints in the worker's log (rexnet.worker.helperlog): each
line of the helper's stderr one structured event, so a JSON log stays JSON.

The reader alone on a real pipe and a reactor of its own; then a real worker started as
root with `--logger rexnet.logs.json_logger`, whose helper is sent malformed requests on
its control socket (as a compromised worker could: tests/test_sandboxd.py has the
helper's side of them), checking that every line the worker wrote parses."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import psutil
import pytest
from cluster import REXNET, Proc, loopback_address, worker_argv
from conftest import Keys
from sockets import borrowed
from twisted.internet.pollreactor import PollReactor
from twisted.logger import ILogObserver, globalLogPublisher
from zope.interface import provider

from rexnet.worker import helperlog
from rexnet.worker import sandboxwire as wire
from rexnet.worker.helperlog import HelperLog


@pytest.fixture
def events() -> Iterator[list[dict[str, Any]]]:
    """The helper's events, as the worker's log observers get them."""
    seen: list[dict[str, Any]] = []

    @provider(ILogObserver)
    def observe(event: dict[str, Any]) -> None:
        if event.get("log_namespace") == "rexnet.worker.sandboxd":
            seen.append(event)

    globalLogPublisher.addObserver(observe)
    yield seen
    globalLogPublisher.removeObserver(observe)


def test_each_line_is_one_warning_bounded_and_escaped(events: list[dict[str, Any]]) -> None:
    reactor = PollReactor()
    r, w = os.pipe()
    reader = HelperLog(reactor, r)
    os.write(w, b"rexnet-sandboxd: a bad request from the worker: bad JSON\nhalf of ")
    reactor.iterate(0.1)
    os.write(w, b"a line\n\x1b]0;forged title\x07\n\n")
    os.write(w, b"x" * (helperlog.MAX_LINE + 10) + b"\nno newline at the end")
    os.close(w)  # the helper is gone: its last words come, the reader ends
    deadline = time.monotonic() + 10
    while reader in reactor.getReaders() and time.monotonic() < deadline:
        reactor.iterate(0.05)
    assert reader not in reactor.getReaders()
    with pytest.raises(OSError):
        os.fstat(r)  # closed at the end
    assert [e["complaint"] for e in events] == [
        "a bad request from the worker: bad JSON", "half of a line",
        "\\x1b]0;forged title\\x07", "x" * helperlog.MAX_LINE, "x" * 10,
        "no newline at the end"]
    assert {e["log_level"].name for e in events} == {"warn"}


def _require_root() -> None:
    if os.geteuid() == 0 and os.path.isdir("/sys/fs/cgroup"):
        return
    if os.environ.get("CI") == "true":
        pytest.fail("a sandboxing worker needs root", pytrace=False)
    pytest.skip("a sandboxing worker needs root")


def control_socket(worker: int) -> tuple[int, int]:
    """(helper pid, the worker's descriptor of its control socket to that helper)."""
    deadline = time.monotonic() + 10
    while True:
        helpers = [p for p in psutil.Process(worker).children()
                   if "rexnet.worker.sandboxd" in p.cmdline()]
        if helpers or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    [helper] = helpers
    argv = helper.cmdline()
    theirs = os.stat(f"/proc/{helper.pid}/fd/{argv[argv.index('--control') + 1]}").st_ino
    listing = subprocess.run(["ss", "-xanH"], capture_output=True, text=True,
                             check=True).stdout
    peer = next(fields[7] for fields in map(str.split, listing.splitlines())
                if len(fields) > 7 and fields[5] == str(theirs))
    for name in os.listdir(f"/proc/{worker}/fd"):
        try:
            if os.readlink(f"/proc/{worker}/fd/{name}") == f"socket:[{peer}]":
                return helper.pid, int(name)
        except FileNotFoundError:
            continue
    raise LookupError("the worker holds no end of its helper's control socket")


def test_a_json_log_stays_json_with_the_helpers_complaints(keys: Keys) -> None:
    _require_root()
    addr = loopback_address()
    argv = worker_argv(keys.worker, ["cat"], f"{addr}:3010", "jsonhelper")
    argv.insert(argv.index("rexnet-worker"), "--logger=rexnet.logs.json_logger")
    worker = Proc(argv)
    try:
        worker.wait_for(r'"message": "worker jsonhelper serves testapp')
        helper, fd = control_socket(worker.pid)
        with borrowed(worker.pid, fd) as control:  # as a compromised worker would write
            os.write(control, wire.HEADER.pack(3) + b"{x]")
            os.write(control, wire.HEADER.pack(13) + b'{"job": true}')  # no socket
        worker.wait_for(r"a request with 0 sockets")
        done = subprocess.run([REXNET, "exec", "-a", f"{addr}:3010", str(keys.client)],
                              input=b"hi", capture_output=True, timeout=60)
        assert done.returncode == 0 and done.stdout == b"hi"  # the helper serves on
        worker.wait_for(r'"message": "job \w+ (ended|started [^"]*, ended after '
                        r'[\d.]+ s): exit 0"')  # (a short job's one line)
        assert psutil.pid_exists(helper)
    finally:
        worker.stop()
    records = [json.loads(line) for line in worker.output.splitlines()]  # each parses
    complaints = [r for r in records if r["namespace"] == "rexnet.worker.sandboxd"]
    assert [r["level"] for r in complaints] == ["warn", "warn"]
    assert re.fullmatch(r"a bad request from the worker: bad JSON.*",
                        complaints[0]["complaint"])
    assert complaints[1]["complaint"] == "a request with 0 sockets, not one"
    assert complaints[1]["message"] == "sandbox helper: a request with 0 sockets, not one"
