"""A job's stdin and stdout handed over from the channel to their data connections
(rexnet.net.jobdata, APART) once HANDOVER bytes went in-band: end to end through a real
worker on loopback, real TLS and real threads, with sizes around the handover; every
byte once and in order (sha256 of random data), EOF and the exit status kept."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator

import pytest
from cluster import Proc, loopback_address, run_exec, start_worker
from conftest import Keys

from rexnet.net.tuning import HANDOVER
from rexnet.protocol import wire


@pytest.fixture(scope="module")
def worker(keys: Keys) -> Iterator[tuple[Proc, str]]:
    addr = f"{loopback_address()}:3011"
    proc = start_worker(keys.worker, ["sh", "-c"], addr, "handover", "--allow-args",
                        "--slots", "4")
    yield proc, addr
    proc.stop()
    assert "Traceback" not in proc.output


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("size", [HANDOVER - 1, HANDOVER, HANDOVER + 1,
                                  3 * HANDOVER + 12345],
                         ids=["under", "at", "over", "well-over"])
@pytest.mark.parametrize("agent", [[], ["--no-agent"]], ids=["agent", "no-agent"])
def test_cat_gives_back_every_byte_once_and_in_order(
        keys: Keys, worker: tuple[Proc, str], size: int, agent: list[str]) -> None:
    data = os.urandom(size)
    done = run_exec(keys.client, [worker[1]], *agent, "--", "cat", input=data)
    assert done.returncode == 0, done.stderr
    assert len(done.stdout) == size
    assert digest(done.stdout) == digest(data)


@pytest.mark.parametrize("size", [HANDOVER - 1, HANDOVER, HANDOVER + 1],
                         ids=["under", "at", "over"])
def test_the_job_sees_stdin_whole_and_its_eof_around_the_handover(
        keys: Keys, worker: tuple[Proc, str], size: int) -> None:
    """The job hashes what it read: it must see EOF (even when stdin ends right at the
    handover: its data connection then carries nothing but close_notify)."""
    data = os.urandom(size)
    done = run_exec(keys.client, [worker[1]], "--no-agent", "--", "sha256sum", input=data)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[0].decode() == digest(data)


@pytest.mark.parametrize("size", [HANDOVER - 1, HANDOVER, HANDOVER + 1, 2 * HANDOVER + 7],
                         ids=["under", "at", "over", "well-over"])
def test_output_around_the_handover_then_the_exit_status(
        keys: Keys, worker: tuple[Proc, str], size: int) -> None:
    """A job that writes SIZE random bytes and ends at once (mid-handover at and just
    over it) with status 3: every byte once and in order (the hash it printed on
    stderr), then the status."""
    done = run_exec(keys.client, [worker[1]], "--no-agent", "--",
                    f"f=$(mktemp); head -c {size} /dev/urandom >$f; sha256sum <$f >&2; "
                    f"cat $f; rm $f; exit 3", timeout=60)
    assert done.returncode == 3, done.stderr
    assert len(done.stdout) == size
    assert done.stderr.split()[0].decode() == digest(done.stdout)


@pytest.mark.parametrize("agent", [[], ["--no-agent"]], ids=["agent", "no-agent"])
def test_a_job_that_ends_mid_handover_of_its_stdin(
        keys: Keys, worker: tuple[Proc, str], agent: list[str]) -> None:
    """The job reads just past the handover and exits: its status and what it wrote
    come back; the rest of stdin is dropped; nothing hangs."""
    data = os.urandom(4 * HANDOVER)
    keep = HANDOVER + 100
    done = run_exec(keys.client, [worker[1]], *agent, "--", f"head -c {keep}; exit 5",
                    input=data, timeout=60)
    assert done.returncode == 5, done.stderr
    assert digest(done.stdout) == digest(data[:keep])
    assert b"Traceback" not in done.stderr


def test_apart_frames_round_trip_and_bad_ones_are_refused() -> None:
    for frame in (wire.Apart(0, 40000), wire.Apart(1, 0), wire.Apart(1, 65535)):
        assert list(wire.FrameDecoder().feed(wire.encode_frame(frame))) == [frame]
    header = wire.FRAME_HEADER.pack(wire.FrameKind.APART, 2, 4)
    with pytest.raises(wire.WireError):
        list(wire.FrameDecoder().feed(header + b"\0\0\0\1"))  # stream 2: not 0 or 1
    with pytest.raises(wire.WireError):  # a port over 65535
        list(wire.FrameDecoder().feed(wire.FRAME_HEADER.pack(wire.FrameKind.APART, 0, 4)
                                      + b"\0\1\0\0"))
    with pytest.raises(wire.WireError):  # the wrong size
        list(wire.FrameDecoder().feed(wire.FRAME_HEADER.pack(wire.FrameKind.APART, 0, 2)
                                      + b"\0\1"))
