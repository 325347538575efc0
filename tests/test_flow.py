"""Flow control end to end: 1 GiB through a job running `cat`, intact and in bounded memory."""

from __future__ import annotations

import hashlib
import os
import subprocess
import threading
import time
from collections.abc import Iterator

import psutil
import pytest
from cluster import Proc, exec_argv, loopback_address, start_worker
from conftest import Keys

GIB = 1 << 30
BLOCK = 1 << 20
MEMORY_LIMIT = 50 * 1024 * 1024


@pytest.fixture
def cat_worker(keys: Keys) -> Iterator[tuple[Proc, str]]:
    addr = f"{loopback_address()}:3010"
    proc = start_worker(keys.worker, ["cat"], addr, "catter")
    yield proc, addr
    proc.stop()


class PeakRSS:
    """Samples the resident memory of some processes until stopped."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.procs = {name: psutil.Process(pid) for name, pid in pids.items()}
        self.first: dict[str, int] = {}
        self.peak: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for name, proc in self.procs.items():
                try:
                    rss = proc.memory_info().rss
                except psutil.Error:
                    continue
                self.first.setdefault(name, rss)
                self.peak[name] = max(self.peak.get(name, 0), rss)
            time.sleep(0.05)

    def start(self) -> PeakRSS:
        self._thread.start()
        return self

    def stop(self) -> dict[str, int]:
        self._stop.set()
        self._thread.join()
        return {name: self.peak[name] - self.first[name] for name in self.first}


def test_one_gib_through_cat_intact_in_bounded_memory(
    keys: Keys, cat_worker: tuple[Proc, str]
) -> None:
    worker, addr = cat_worker
    block = os.urandom(BLOCK)
    client = subprocess.Popen(exec_argv(keys.client, [addr]), stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert client.stdin is not None and client.stdout is not None
    sent, received = hashlib.sha256(), hashlib.sha256()
    got = 0
    memory: PeakRSS | None = None

    def feed() -> None:
        assert client.stdin is not None
        for i in range(GIB // BLOCK):
            chunk = i.to_bytes(8, "big") + block[8:]
            sent.update(chunk)
            client.stdin.write(chunk)
        client.stdin.close()

    writer = threading.Thread(target=feed)
    started = time.monotonic()
    writer.start()
    while True:
        data = client.stdout.read1(BLOCK)  # type: ignore[attr-defined]
        if not data:
            break
        received.update(data)
        got += len(data)
        if memory is None and got >= 8 * BLOCK:
            # measure from the moment the stream runs: imports and TLS set-up are not growth
            memory = PeakRSS({"client": client.pid, "worker": worker.pid}).start()
    writer.join()
    status = client.wait(60)
    elapsed = time.monotonic() - started
    assert memory is not None
    growth = memory.stop()
    assert status == 0, client.stderr.read() if client.stderr else b""
    assert got == GIB
    assert received.hexdigest() == sent.hexdigest()
    print(f"1 GiB through cat in {elapsed:.1f} s ({GIB / elapsed / 1e6:.0f} MB/s); "
          f"RSS growth: {growth}")
    assert growth["client"] < MEMORY_LIMIT, growth
    assert growth["worker"] < MEMORY_LIMIT, growth


def test_slow_reader_pauses_the_far_side(keys: Keys, cat_worker: tuple[Proc, str]) -> None:
    """A client whose stdout is not read stops the job's output at the window, not later."""
    worker, addr = cat_worker
    client = subprocess.Popen(exec_argv(keys.client, [addr]), stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert client.stdin is not None and client.stdout is not None
    pushed = 0
    block = b"y" * BLOCK
    stalled = threading.Event()

    def feed() -> None:
        nonlocal pushed
        assert client.stdin is not None
        try:
            for _ in range(512):
                client.stdin.write(block)
                client.stdin.flush()
                pushed += len(block)
        except BrokenPipeError:
            pass
        stalled.set()

    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    time.sleep(3)  # nobody reads the client's stdout meanwhile
    held = pushed
    assert held < 64 * BLOCK, f"{held} bytes accepted with no reader: flow control failed"
    rss = psutil.Process(worker.pid).memory_info().rss
    assert rss < 200 * BLOCK
    client.kill()
    client.wait()
    writer.join(10)
