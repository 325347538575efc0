"""Silences on the link during a transfer, from tcpdump's timestamps (issue P11, item 1).

`LinkGaps` runs tcpdump (headers only) in a namespace of the bench while a transfer runs;
`Gaps.of(pcap)` reads the capture's timestamps and reports, over the transfer (from the
first 1% of the bytes on the wire to the last 1%: no handshake, no job start or end), the
largest time without any packet in either direction, how many silences exceeded 20 ms
and what share of the transfer's time the link spent in silences over 1 ms. A stalled TCP
connection (nothing in flight, data held by Nagle or waiting for a delayed ACK) shows as
exactly such silences.
"""

from __future__ import annotations

import itertools
import shutil
import struct
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

EDGE = 0.01  # share of the bytes on the wire left out at each end of the capture
STALL = 0.020  # seconds: the goal is no silence longer than this
SILENT = 0.001  # seconds: silences longer than this count towards the silent share


@dataclass
class Gaps:
    packets: int
    seconds: float  # the transfer: first to last packet carrying data
    largest: float  # seconds
    over_stall: int  # silences longer than STALL
    silent: float  # share of the transfer in silences longer than SILENT

    @staticmethod
    def of(pcap: Path) -> Gaps:
        packets = sorted(read_pcap(pcap))
        total = sum(size for _, size in packets)
        if len(packets) < 2 or not total:
            return Gaps(len(packets), 0.0, 0.0, 0, 0.0)
        # the transfer: from the packet that brings the bytes seen to EDGE of the total
        # to the one that brings them to 1 - EDGE (leaves out the handshake, the job's
        # start and end); every packet inside counts as a sound on the link, ACKs too
        first = last = packets[0][0]
        seen = 0
        for stamp, size in packets:
            seen += size
            if seen <= total * EDGE:
                first = stamp
            if seen <= total * (1 - EDGE):
                last = stamp
        inside = [t for t, _ in packets if first <= t <= last]
        if len(inside) < 2:
            return Gaps(len(inside), 0.0, 0.0, 0, 0.0)
        gaps = [b - a for a, b in itertools.pairwise(inside)]
        span = last - first
        return Gaps(len(inside), span, max(gaps), sum(1 for g in gaps if g > STALL),
                    sum(g for g in gaps if g > SILENT) / span if span else 0.0)

    def describe(self) -> str:
        return (f"largest silence {self.largest * 1000:.1f} ms, {self.over_stall} over "
                f"{STALL * 1000:.0f} ms, {self.silent:.0%} of {self.seconds:.1f} s in silences "
                f"over {SILENT * 1000:.0f} ms ({self.packets} packets)")


def read_pcap(path: Path) -> list[tuple[float, int]]:
    """(timestamp in seconds, length on the wire) of each packet of a classic pcap file."""
    data = path.read_bytes()
    if len(data) < 24:
        return []
    magic = data[:4]
    order = {b"\xd4\xc3\xb2\xa1": "<", b"\xa1\xb2\xc3\xd4": ">",
             b"\x4d\x3c\xb2\xa1": "<", b"\xa1\xb2\x3c\x4d": ">"}.get(magic)
    if order is None:
        raise ValueError(f"{path}: not a pcap file")
    scale = 1e-9 if magic in (b"\x4d\x3c\xb2\xa1", b"\xa1\xb2\x3c\x4d") else 1e-6
    record = struct.Struct(order + "IIII")
    out: list[tuple[float, int]] = []
    offset = 24
    while offset + 16 <= len(data):
        sec, frac, caplen, wirelen = record.unpack_from(data, offset)
        out.append((sec + frac * scale, wirelen))
        offset += 16 + caplen
    return out


def available() -> str:
    """'' when tcpdump can be used, else why not."""
    return "" if shutil.which("tcpdump") else "tcpdump is not installed"


class LinkGaps:
    """tcpdump in a namespace (ARGV_PREFIX runs a command there) while a transfer runs."""

    def __init__(self, argv_prefix: Sequence[str], pcap: Path, expression: str) -> None:
        self.argv = [*argv_prefix, "tcpdump", "-n", "-i", "any", "-s", "96", "-B", "16384",
                     "-w", str(pcap), expression]
        self.pcap = pcap
        self.proc: subprocess.Popen[bytes] | None = None
        self.gaps: Gaps | None = None

    def __enter__(self) -> LinkGaps:
        self.pcap.unlink(missing_ok=True)
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        assert self.proc.stderr is not None
        said = b""
        for _ in range(5):  # "listening on any, ..." once it captures
            line = self.proc.stderr.readline()
            said += line
            if not line or b"listening" in line:
                break
        if b"listening" not in said:
            self.proc.kill()
            raise RuntimeError(f"tcpdump did not start: {said.decode(errors='replace')}")
        time.sleep(0.1)
        return self

    def __exit__(self, *exc: Any) -> None:
        assert self.proc is not None
        time.sleep(0.1)
        self.proc.terminate()  # tcpdump flushes its file on TERM
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if exc[0] is None:
            self.gaps = Gaps.of(self.pcap)
        self.pcap.unlink(missing_ok=True)
