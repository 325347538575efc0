"""Every decoder fuzzed (issue P6, point 1): announcements, TAKEN, status, alerts (all
datagrams, and the worker's and crat's whole handling of them), job frames, credentials
and trust files on disk, revocation lists.  Only the documented decode error escapes,
and decoders allocate no more than their stated bounds.

The targets live in tests/fuzz_targets.py; hypothesis drives them here, and atheris
(coverage-guided, libFuzzer) drives them in tests/fuzz/atheris_run.py: briefly below,
at length with `make fuzz`.  atheris found the credential-file bugs fixed with these
tests (cryptography's lazy parsing raising InvalidVersion, UnsupportedAlgorithm,
DuplicateExtension or InternalError instead of ValueError).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import fuzz_targets as targets
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rexnet.protocol import wire
from rexnet.security.credentials import CredentialError, load_credential

FUZZ = Path(__file__).parent / "fuzz"
NAMES = sorted(targets.TARGETS)
SEEDS = targets.seeds()


@st.composite
def mutated(draw: st.DrawFn, seed: bytes) -> bytes:
    """SEED with a few bytes flipped, inserted, deleted or the tail cut."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 6))):
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        action = draw(st.sampled_from(["flip", "insert", "delete", "cut"]))
        if action == "flip":
            data[at] ^= draw(st.integers(1, 255))
        elif action == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif action == "delete":
            del data[at:at + draw(st.integers(1, 8))]
        else:
            del data[at:]
    return bytes(data)


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzz_target_with_arbitrary_and_mutated_inputs(name: str, data: st.DataObject) -> None:
    target: Callable[[bytes], None] = targets.TARGETS[name]
    target(data.draw(st.binary(max_size=5000)))
    target(data.draw(mutated(data.draw(st.sampled_from(SEEDS[name])))))


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_fuzz_pem_credential_with_damaged_base64(data: st.DataObject) -> None:
    """Damage inside the DER (not the PEM armour) reaches cryptography's lazy parsers."""
    import base64

    text = targets.WORKER.read_bytes()
    blocks = text.split(b"-----")
    index = data.draw(st.sampled_from([i for i, b in enumerate(blocks) if len(b) > 100]))
    der = bytearray(base64.b64decode(blocks[index]))
    for _ in range(data.draw(st.integers(1, 4))):
        der[data.draw(st.integers(0, len(der) - 1))] ^= data.draw(st.integers(1, 255))
    blocks[index] = b"\n" + base64.encodebytes(bytes(der))
    path = targets._write_private(b"-----".join(blocks))
    with contextlib.suppress(CredentialError):
        load_credential(path, "worker")


def test_a_valid_credential_passes_the_fuzz_target_unchanged() -> None:
    """The control: the target really loads what it is given."""
    path = targets._write_private(targets.WORKER.read_bytes())
    assert load_credential(path, "worker").name == "worker"


# -- memory bounds ----------------------------------------------------------------------


def peak_of(work: Callable[[], object]) -> int:
    tracemalloc.start()
    try:
        work()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_frame_decoder_holds_at_most_one_frame_whatever_it_is_fed() -> None:
    """4 MiB of frames claiming the maximum length, fed in 64 KiB reads (what a TLS
    transport hands over): the decoder holds at most one MAX_FRAME plus a read, and its
    peak is that plus the one frame it hands over."""
    header = wire.FRAME_HEADER.pack(wire.FrameKind.DATA, 1, wire.MAX_FRAME)
    stream = (header + os.urandom(wire.MAX_FRAME)) * 4
    decoder = wire.FrameDecoder()

    def feed() -> None:
        for start in range(0, len(stream), 65536):
            decoder.feed(stream[start:start + 65536])
            assert decoder.buffered <= wire.FRAME_HEADER.size + wire.MAX_FRAME + 65536

    assert peak_of(feed) < 2 * wire.MAX_FRAME + 8 * 65536


def test_frame_header_claiming_4_gib_allocates_nothing() -> None:
    decoder = wire.FrameDecoder()

    def feed() -> None:
        with pytest.raises(wire.WireError):
            decoder.feed(wire.FRAME_HEADER.pack(wire.FrameKind.DATA, 1, 0xFFFFFFFF) + b"x")

    assert peak_of(feed) < 64 * 1024


def test_an_oversized_datagram_is_refused_without_copying_it() -> None:
    data = b"RXN\x01" + os.urandom(65_000)

    def decode() -> None:
        with pytest.raises(wire.WireError):
            wire.decode_datagram(data)

    assert peak_of(decode) < 32 * 1024


def test_worker_memory_for_a_stream_of_distinct_valid_looking_datagrams_is_bounded() -> None:
    """Caches keyed by attacker input (certificates, replay keys, rate-limit sources,
    complaints) are bounded: 20,000 datagrams from 20,000 sources grow the worker by
    a bounded amount."""
    worker = targets._Worker.worker
    seed = SEEDS["worker_datagram"][0]

    def flood() -> None:
        for n in range(20_000):
            data = bytearray(seed)
            data[-(n % 64) - 1] ^= 0xFF  # a bad signature, each one different
            worker.datagram(bytes(data), f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}", 1)

    assert peak_of(flood) < 16 << 20


# -- atheris, briefly --------------------------------------------------------------------


def _atheris() -> bool:
    try:
        import atheris  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _atheris(), reason="atheris is not installed for this Python "
                    "(it ships wheels for CPython <= 3.11 on x86_64 Linux)")
def test_atheris_finds_no_crash(tmp_path: Path) -> None:
    """All targets in one process (instrumenting the imports takes most of the time);
    `make fuzz` gives each target a longer run of its own."""
    runs = os.environ.get("REXNET_FUZZ_RUNS", "20000")
    done = subprocess.run([sys.executable, str(FUZZ / "atheris_run.py"), "all",
                           f"-runs={runs}", "-max_len=5000"], capture_output=True, text=True,
                          timeout=600, cwd=tmp_path)  # crash files go there
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"Done {runs} runs" in done.stderr
