"""A userspace netem: shuttle Ethernet frames between two TAP devices with loss and delay.

The CI kernel has no queueing disciplines (no ``tc qdisc ... netem``), so tests/netbed.py
puts this process on an impaired host's link instead: one TAP in the host's namespace
carries the host's address, one in the bed's switch namespace is a port of the subnet's
bridge. Frames from the host (egress) and to it (ingress) each pass a :class:`DelayLine`:
dropped with probability ``loss``, otherwise delivered ``delay`` seconds later, in order,
at most ``limit`` waiting (netem's default limit is 1000 packets too).

Run (as root) inside the host's namespace::

    python impair.py --host-tap rx0101 --switch-netns NS --switch-tap t0001 --loss 10 \\
        --delay-ms 50

It prints ``ready`` once both TAPs are open, and a JSON line of counters on SIGUSR1. It exits
when its stdin reaches end of file, so a shuttle whose parent died does not linger.
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import json
import os
import random
import selectors
import signal
import struct
import sys
import time
from collections import deque
from collections.abc import Callable
from types import FrameType

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
CLONE_NEWNET = 0x40000000
NETNS_DIR = "/var/run/netns"
MAX_FRAME = 65536
BURST = 64
"""Frames read from one TAP per wake-up, so one busy direction cannot starve the other."""


class DelayLine:
    """One direction of an impaired link: random loss, then a fixed delay, in FIFO order."""

    def __init__(self, loss_percent: float, delay_ms: float, limit: int = 1000,
                 rng: Callable[[], float] = random.random) -> None:
        if not 0 <= loss_percent <= 100 or delay_ms < 0 or limit < 1:
            raise ValueError("want 0 <= loss_percent <= 100, delay_ms >= 0, limit >= 1")
        self.loss = loss_percent / 100
        self.delay = delay_ms / 1000
        self.limit = limit
        self.rng = rng
        self.queue: deque[tuple[float, bytes]] = deque()
        self.frames = self.lost = self.overflow = self.delivered = 0
        self.unsent = 0
        """Frames due but refused by the outgoing TAP (counted by the shuttle loop)."""

    def offer(self, frame: bytes, now: float) -> bool:
        """Take a frame that arrived at ``now``; False if it was dropped (lost or queue full)."""
        self.frames += 1
        if self.rng() < self.loss:
            self.lost += 1
            return False
        if len(self.queue) >= self.limit:
            self.overflow += 1
            return False
        self.queue.append((now + self.delay, frame))
        return True

    def next_due(self) -> float | None:
        """When the oldest waiting frame is due, or None if none waits."""
        return self.queue[0][0] if self.queue else None

    def pop_due(self, now: float) -> list[bytes]:
        """Remove and return the frames due at ``now``, oldest first."""
        due = []
        while self.queue and self.queue[0][0] <= now:
            due.append(self.queue.popleft()[1])
            self.delivered += 1
        return due

    def counters(self) -> dict[str, int]:
        return {"frames": self.frames, "lost": self.lost, "overflow": self.overflow,
                "delivered": self.delivered, "waiting": len(self.queue), "unsent": self.unsent}


def open_tap(name: str) -> int:
    """Attach to the existing TAP ``name`` (made by ``ip tuntap add``) in this namespace."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), IFF_TAP | IFF_NO_PI))
    except OSError:
        os.close(fd)
        raise
    return fd


def enter_netns(name: str) -> None:
    """Move this (single-threaded) process into network namespace ``name`` (os.setns is 3.12+)."""
    libc = ctypes.CDLL(None, use_errno=True)
    with open(os.path.join(NETNS_DIR, name)) as ns:
        if libc.setns(ns.fileno(), CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns {name}: {os.strerror(err)}")


def shuttle(host_fd: int, switch_fd: int, egress: DelayLine, ingress: DelayLine,
            control_fd: int, clock: Callable[[], float] = time.monotonic) -> None:
    """Forward frames host_fd -> egress -> switch_fd and switch_fd -> ingress -> host_fd
    until ``control_fd`` (the parent's pipe) reaches end of file."""
    lines = {host_fd: (egress, switch_fd), switch_fd: (ingress, host_fd)}
    with selectors.DefaultSelector() as sel:
        for fd in (*lines, control_fd):
            sel.register(fd, selectors.EVENT_READ)
        while True:
            dues = [d for line, _ in lines.values() if (d := line.next_due()) is not None]
            timeout = max(0.0, min(dues) - clock()) if dues else None
            for key, _ in sel.select(timeout):
                if key.fd == control_fd:
                    if not os.read(control_fd, 4096):
                        return  # the parent closed the pipe or died
                    continue
                line = lines[key.fd][0]
                for _ in range(BURST):
                    try:
                        frame = os.read(key.fd, MAX_FRAME)
                    except BlockingIOError:
                        break
                    line.offer(frame, clock())
            now = clock()
            for line, out in lines.values():
                for frame in line.pop_due(now):
                    try:
                        os.write(out, frame)
                    except OSError:  # e.g. the TAP is down: the frame is lost, as on a wire
                        line.unsent += 1


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host-tap", required=True, help="TAP in this (the host's) namespace")
    ap.add_argument("--switch-netns", required=True, help="namespace of the subnet's bridge")
    ap.add_argument("--switch-tap", required=True, help="TAP in --switch-netns")
    ap.add_argument("--loss", type=float, default=0, help="egress loss, percent")
    ap.add_argument("--delay-ms", type=float, default=0, help="egress delay, milliseconds")
    ap.add_argument("--ingress-loss", type=float, default=0, help="ingress loss, percent")
    ap.add_argument("--ingress-delay-ms", type=float, default=0, help="ingress delay, ms")
    ap.add_argument("--limit", type=int, default=1000, help="frames waiting per direction")
    args = ap.parse_args(argv)
    egress = DelayLine(args.loss, args.delay_ms, args.limit)
    ingress = DelayLine(args.ingress_loss, args.ingress_delay_ms, args.limit)

    def report(signum: int, frame: FrameType | None) -> None:
        line = json.dumps({"egress": egress.counters(), "ingress": ingress.counters()})
        os.write(sys.stdout.fileno(), line.encode() + b"\n")

    signal.signal(signal.SIGUSR1, report)
    host_fd = open_tap(args.host_tap)
    enter_netns(args.switch_netns)
    switch_fd = open_tap(args.switch_tap)
    print("ready", flush=True)
    shuttle(host_fd, switch_fd, egress, ingress, sys.stdin.fileno())


if __name__ == "__main__":
    main()
