"""The agent's answer without a reactor turn to spare (P11, 3). A job's stdin on /dev/null
is closed at once, with no reader (epoll refuses /dev/null, so Twisted would poll it on a
timer until it read EOF); the job's outputs, all written when EXIT comes, close at once,
so the launcher hears the status in the turn that read EXIT; output still waiting for its
reader is written first, as before."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cluster import Proc, exec_argv, loopback_address, run_exec, start_worker
from conftest import Keys
from twisted.internet.testing import StringTransport

from rexnet.client.streams import StdioStreams
from rexnet.net.channel import Channel
from rexnet.net.pipes import PipeReader, PipeWriter
from rexnet.protocol import wire
from rexnet.security.credentials import load_credential


@pytest.fixture
def fds() -> Iterator[dict[str, int]]:
    """/dev/null, and the two ends of a pipe each for stdin, stdout and stderr."""
    opened = {"null": os.open(os.devnull, os.O_RDONLY)}
    for name in ("in", "out", "err"):
        opened[f"{name}_r"], opened[f"{name}_w"] = os.pipe()
    yield opened
    for fd in opened.values():
        try:  # noqa: SIM105
            os.close(fd)
        except OSError:
            pass


def channel(keys: Keys) -> tuple[Channel, StringTransport]:
    link = Channel(load_credential(keys.client, "client"))
    transport = StringTransport()
    link.transport = transport  # type: ignore[assignment]
    return link, transport


def started(keys: Keys, reactor: Any, fds: dict[str, int], stdin: str
            ) -> tuple[Channel, StringTransport, StdioStreams]:
    """A job's streams, its stdin FDS[STDIN] and stdout/stderr the test's pipes, started
    on a channel of their own (and the transport under it)."""
    link, transport = channel(keys)
    streams = StdioStreams(reactor, local={0: fds[stdin], 1: fds["out_w"], 2: fds["err_w"]})
    streams.prepare(link)
    streams.start_input()
    return link, transport, streams


def frames(transport: StringTransport) -> list[wire.Frame]:
    return wire.FrameDecoder().feed(transport.value())


def test_stdin_on_dev_null_ends_at_once_without_a_reader(keys: Keys, reactor: Any,
                                                         fds: dict[str, int]) -> None:
    _, transport, streams = started(keys, reactor, fds, "null")
    assert wire.Eof(0) in frames(transport)  # the job reads EOF, now
    assert not [r for r in reactor.getReaders() if isinstance(r, PipeReader)]
    assert not reactor._continuousPolling.getReaders()  # nothing polled on a timer either
    # a pipe is read as before: no EOF until the pipe says so
    _, transport, streams = started(keys, reactor, fds, "in_r")
    assert wire.Eof(0) not in frames(transport)
    assert [r for r in reactor.getReaders() if isinstance(r, PipeReader)]
    streams.abort()


def test_written_outputs_end_at_once(keys: Keys, reactor: Any, fds: dict[str, int]) -> None:
    _, _, streams = started(keys, reactor, fds, "null")
    done = streams.finish()  # EXIT came; nothing waits to be written
    assert done.called  # the launcher's status goes in this turn, not the next
    assert not [w for w in reactor.getWriters() if isinstance(w, PipeWriter)]


def test_outputs_at_eof_end_at_once_too(keys: Keys, reactor: Any, fds: dict[str, int]) -> None:
    """The worker's EOFs of stdout and stderr and its EXIT mostly come in one read: the
    writers that EOF began to close are closed at once when EXIT comes."""
    link, _, streams = started(keys, reactor, fds, "null")
    for frame in (wire.Data(1, b"out"), wire.Eof(1), wire.Eof(2)):
        link.frameReceived(frame)
    assert [w for w in reactor.getWriters() if isinstance(w, PipeWriter)]  # out waits
    done = streams.finish()
    assert not done.called  # "out" first
    reactor.iterate(0)
    assert done.called and os.read(fds["out_r"], 100) == b"out"
    link, _, streams = started(keys, reactor, fds, "null")
    for frame in (wire.Eof(1), wire.Eof(2)):
        link.frameReceived(frame)
    assert streams.finish().called


def test_output_still_waiting_is_written_before_the_end(keys: Keys, reactor: Any,
                                                        fds: dict[str, int]) -> None:
    link, _, streams = started(keys, reactor, fds, "null")
    link.ins[1].data(b"last words")  # (the writer keeps it for the reactor's next turn)
    done = streams.finish()
    assert not done.called
    reactor.iterate(0)
    assert done.called
    assert os.read(fds["out_r"], 100) == b"last words"


# -- through real launchers, agents and workers ------------------------------------------


@pytest.fixture(scope="module")
def worker(keys: Keys) -> Iterator[tuple[Proc, str]]:
    addr = f"{loopback_address()}:3010"
    proc = start_worker(keys.worker, ["sh", "-c"], addr, "turns", "--allow-args")
    yield proc, addr
    proc.stop()


def test_a_job_reads_eof_from_dev_null_and_its_output_is_whole(
        keys: Keys, worker: tuple[Proc, str], agent_sockets: Path, launcher: str,
        tmp_path: Path) -> None:
    addr = worker[1]
    argv = exec_argv(keys.client, [addr], "--", "cat; head -c 3000000 /dev/zero; exit 7",
                     rexnet=launcher)
    for _ in range(2):  # (the first starts the agent; the second takes its warm channel)
        with open(os.devnull, "rb") as null:
            done = subprocess.run(argv, stdin=null, capture_output=True, timeout=60)
        assert done.returncode == 7, done.stderr
        assert done.stdout == bytes(3000000)
    out = tmp_path / "out"  # a file: epoll refuses it too (Twisted polls its writer)
    with open(os.devnull, "rb") as null, open(out, "wb") as f:
        done = subprocess.run(argv, stdin=null, stdout=f, stderr=subprocess.PIPE, timeout=60)
    assert done.returncode == 7, done.stderr
    assert out.read_bytes() == bytes(3000000)
    piped = run_exec(keys.client, [addr], "--", "cat", input=b"still read", rexnet=launcher)
    assert piped.returncode == 0 and piped.stdout == b"still read", piped.stderr
