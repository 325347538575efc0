"""The worker's load figure and its connect-back delay.  psutil is imported here only.

load  = run-queue per CPU (1-minute load average / CPUs)
      + (running jobs + reserved connect-backs) / slots
delay = (IDLE_MS + LOAD_MS * load) / speed + uniform(0, JITTER_MS)   milliseconds

An idle worker answers after about IDLE_MS; each unit of load per CPU adds
LOAD_MS, well above network jitter (cexec's 0.1 ms per unit drowned in it).  A faster
worker (speed 2.0) answers in half the time of a slower one at the same load.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable
from dataclasses import dataclass

IDLE_MS = 5.0
LOAD_MS = 40.0
JITTER_MS = 1.0


@dataclass(frozen=True)
class HostLoad:
    """What the operating system says about the host."""

    loadavg: float
    cpus: int
    free_memory: int


def sample_host() -> HostLoad:
    """Read the host's load with psutil."""
    import psutil

    return HostLoad(
        loadavg=psutil.getloadavg()[0],
        cpus=psutil.cpu_count() or 1,
        free_memory=psutil.virtual_memory().available,
    )


def cpu_count() -> int:
    import psutil

    return psutil.cpu_count() or 1


def load_figure(host: HostLoad, busy: int, slots: int) -> float:
    """Run-queue per CPU plus the share of slots that are busy or reserved."""
    return max(host.loadavg, 0.0) / max(host.cpus, 1) + busy / max(slots, 1)


def connect_back_delay(
    load: float, speed: float, jitter: Callable[[], float] = random.random
) -> float:
    """Seconds to wait before connecting back, given LOAD and the worker's SPEED."""
    ms = (IDLE_MS + LOAD_MS * max(load, 0.0)) / speed + jitter() * JITTER_MS
    return ms / 1000.0


def group_rss(pid: int) -> int:
    """Resident memory of process PID and all its descendants, in bytes (0 if gone)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            total += proc.memory_info().rss
    return total


def local_addresses() -> list[str]:
    """This host's own IPv4 addresses."""
    import socket

    import psutil

    return [a.address for addrs in psutil.net_if_addrs().values() for a in addrs
            if a.family == socket.AF_INET]
