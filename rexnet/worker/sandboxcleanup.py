"""The root sandbox helper's clean-up of ended jobs (rexnet.worker.sandboxd), in a thread
of its own: their mount namespaces let go, their control groups killed and removed."""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections.abc import Callable

from rexnet.worker.cgroups import JobCgroup

CLEANUP_BATCH = 8  # ended jobs handed to the clean-up at once, at most
CLEANUP_BACKLOG = 64  # ended jobs whose clean-up may wait; beyond that the loop waits


class Cleanup:
    """Kills and removes ended jobs' control groups and lets their mount namespaces go, in a
    thread of its own (the last close of a mount namespace waits for an RCU grace period,
    a group's removal may wait for its last processes): the loop hands a job over and goes
    on. The jobs go over in batches (of CLEANUP_BATCH at most), when the loop is about to
    wait: the thread then runs while the loop does not, neither waiting for the other's
    GIL. Bounded: at most CLEANUP_BACKLOG jobs wait; beyond that the loop waits."""

    def __init__(self, complain: Callable[[str], None]) -> None:
        self.complain = complain
        self.queue: queue.Queue[list[tuple[list[int], JobCgroup | None]] | None] = (
            queue.Queue(CLEANUP_BACKLOG // CLEANUP_BATCH))
        self.batch: list[tuple[list[int], JobCgroup | None]] = []
        self.thread = threading.Thread(target=self._run, name="cleanup", daemon=True)
        self.thread.start()

    def put(self, namespaces: list[int], group: JobCgroup | None) -> None:
        self.batch.append((namespaces, group))
        if len(self.batch) >= CLEANUP_BATCH:
            self.flush()

    def flush(self) -> None:
        """Hand the jobs put since the last flush over."""
        if self.batch:
            batch, self.batch = self.batch, []
            self.queue.put(batch)

    def _run(self) -> None:
        while (batch := self.queue.get()) is not None:
            for namespaces, group in batch:
                for fd in namespaces:  # its unmounts wait for an RCU grace period (~5 ms)
                    with contextlib.suppress(OSError):
                        os.close(fd)
                if group is not None:
                    try:
                        group.release() if group.made else group.discard()
                    except OSError as e:
                        self.complain(f"control group: {e}")

    def close(self) -> None:
        self.flush()
        self.queue.put(None)
        self.thread.join()
