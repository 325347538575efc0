"""`rexnet parallel`: one job per input across the cluster, in the way of GNU parallel.

Each job's output is spooled (in memory, on disk past SPOOL_MEMORY bytes) and written out
in one piece when the job ends, so outputs of different jobs never interleave; with
--keep-order they come in input order. All writing to the terminal happens in one writer
thread, so a slow reader of our output never stalls the reactor (whose silence would make
workers give up on their jobs).
"""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import signal
import sys
import tempfile
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO, Any

from twisted.internet import defer
from twisted.internet.interfaces import IConsumer
from twisted.logger import globalLogBeginner
from twisted.python.failure import Failure
from zope.interface import implementer

from rexnet.client import api as client
from rexnet.client.bounded import Bounded
from rexnet.client.cluster import Cluster
from rexnet.client.results import JobFailed, JobResult
from rexnet.client.warm import WarmPool
from rexnet.logs import message_observer
from rexnet.protocol.request import ExecRequest

SPOOL_MEMORY = 1 << 20
MAX_FAILED_STATUS = 101  # as GNU parallel: the number of failed jobs, at most 101
MAX_FAILURES_LISTED = 10
PLACEHOLDER = "{}"
SEPARATOR = ":::"


def split_arguments(words: Sequence[str]) -> tuple[list[str], list[str] | None]:
    """ARG... ::: VALUE... as (ARGs, VALUEs); without ":::", (ARGs, None): read stdin.
    ValueError for more than one ":::"."""
    words = list(words)
    if SEPARATOR not in words:
        return words, None
    at = words.index(SEPARATOR)
    template, values = words[:at], words[at + 1:]
    if SEPARATOR in values:
        raise ValueError(f"only one {SEPARATOR} is supported")
    return template, values


def job_arguments(template: Sequence[str], value: str) -> tuple[str, ...]:
    """TEMPLATE with {} replaced by VALUE, or VALUE appended if there is no {}."""
    if any(PLACEHOLDER in word for word in template):
        return tuple(word.replace(PLACEHOLDER, value) for word in template)
    return (*template, value)


@implementer(IConsumer)
class FileConsumer:
    """Writes a stream into a (spooled temporary) file."""

    def __init__(self, file: IO[bytes]) -> None:
        self.file = file
        self.size = 0

    def write(self, data: bytes) -> None:
        self.file.write(data)
        self.size += len(data)

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        pass

    def unregisterProducer(self) -> None:
        pass


def spool() -> IO[bytes]:
    """A file for a job's output: in memory up to SPOOL_MEMORY bytes, then on disk."""
    return tempfile.SpooledTemporaryFile(SPOOL_MEMORY)


@dataclass
class Task:
    """One input and what became of its job."""

    index: int
    value: str
    args: tuple[str, ...]
    stdout: IO[bytes] | None = None  # spools, made when the job starts
    stderr: IO[bytes] | None = None
    worker: str | None = None
    dispatches: int = 0
    status: int | None = None
    error: JobFailed | None = None
    done: bool = False
    interrupted: bool = False

    @property
    def failed(self) -> bool:
        return (self.done and not self.interrupted
                and (self.error is not None or self.status != 0))

    def outcome(self) -> str:
        where = f" on {self.worker}" if self.worker else ""
        if self.error is not None:
            return str(self.error)
        return f"exit status {self.status}{where}"


class Writer(threading.Thread):
    """Everything that goes to stdout and stderr: job outputs in one piece each, messages,
    and (on a terminal) a progress line kept at the bottom of stderr."""

    def __init__(self, stdout: IO[bytes], stderr: IO[bytes], progress: bool,
                 width: Callable[[], int]) -> None:
        super().__init__(name="rexnet-parallel-writer", daemon=True)
        self.stdout = stdout
        self.stderr = stderr
        self.progress = progress
        self.width = width
        self.items: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._line = ""
        self._shown = False

    def output(self, task: Task) -> None:
        self.items.put(("output", task))

    def message(self, text: str) -> None:
        self.items.put(("message", text))

    def status(self, text: str) -> None:
        if self.progress:
            self.items.put(("status", text))

    def close(self) -> None:
        self.items.put(("end", None))
        self.join()

    def run(self) -> None:
        while True:
            kind, item = self.items.get()
            if kind == "end":
                self._clear()
                return
            if kind == "status":
                self._line = item
            else:
                self._clear()
                with contextlib.suppress(OSError, ValueError):
                    self._write(kind, item)
            if self.items.empty():
                self._draw()

    def _write(self, kind: str, item: Any) -> None:
        if kind == "message":
            self.stderr.write(f"rexnet: {item}\n".encode(errors="replace"))
            self.stderr.flush()
            return
        task: Task = item
        for file, out in ((task.stdout, self.stdout), (task.stderr, self.stderr)):
            if file is not None:
                file.seek(0)
                shutil.copyfileobj(file, out)
                file.close()
                out.flush()

    def _clear(self) -> None:
        if self._shown:
            self._shown = False
            with contextlib.suppress(OSError, ValueError):
                self.stderr.write(b"\r\x1b[K")
                self.stderr.flush()

    def _draw(self) -> None:
        if self.progress and self._line:
            text = self._line[: max(self.width() - 1, 10)]
            with contextlib.suppress(OSError, ValueError):
                self.stderr.write(f"\r\x1b[K{text}".encode(errors="replace"))
                self.stderr.flush()
                self._shown = True


class Parallel:
    """Runs TASKS on CLUSTER, at most JOBS at a time, from the reactor thread."""

    def __init__(self, reactor: Any, cluster: Cluster, tasks: list[Task], writer: Writer,
                 jobs: int, keep_order: bool = False, retries: int = 0,
                 env: Sequence[tuple[str, str]] = (), verbose: bool = False) -> None:
        self.reactor = reactor
        self.cluster = cluster
        self.tasks = tasks
        self.writer = writer
        self.slots = Bounded(jobs)
        self.keep_order = keep_order
        self.retries = retries
        self.env = tuple(env)
        self.verbose = verbose
        self.next = 0  # the next task to queue
        self.printed = 0  # with keep_order: the next task to print
        self.running: dict[int, Task] = {}
        self.settled = 0  # tasks that ended, or were never run (stopping)
        self.finished = 0
        self.failures = 0
        self.redispatched = 0
        self.per_worker: Counter[str] = Counter()  # jobs finished there
        self.stopping = False
        self._feeding = False
        self.t0 = reactor.seconds()
        self.all_done: defer.Deferred[None] = defer.Deferred()
        # warm channels: the next job reuses a finished job's authenticated channel while
        # its worker stays the best choice (this run's own jobs discounted, as the Executor)
        # rexnet parallel announces what its warm channels cannot take at once, so that it
        # finds every worker with a free slot (jobs queue at busy workers all the same)
        self.pool = WarmPool(reactor, discount_own=True, queue_on_warm=False)

    def start(self) -> defer.Deferred[None]:
        self._feed()
        self._progress()
        self._check_done()
        return self.all_done

    def stop(self) -> None:
        """Start no more jobs; the running ones end with this process (their workers end
        them when the connection goes) and count as interrupted, not failed."""
        self.stopping = True
        for task in self.running.values():
            task.interrupted = True

    def _feed(self) -> None:
        """Queue tasks until one waits for a slot (so the inputs need not all be queued)."""
        if self._feeding:
            return  # a job started (or even ended) inside the loop below: the loop goes on
        self._feeding = True
        try:
            while not self.stopping and self.next < len(self.tasks) and not self.slots.waiting:
                task = self.tasks[self.next]
                self.next += 1
                self.slots.run(self._run, task).addBoth(self._ended, task)
        finally:
            self._feeding = False

    def _run(self, task: Task) -> defer.Deferred[Any]:
        if self.stopping:
            return defer.succeed(None)  # never run
        self.running[task.index] = task
        self._feed()  # the next task waits for the next free slot

        def started(worker: str, job: str) -> None:
            task.dispatches += 1
            if task.dispatches > 1:
                self.redispatched += 1
                self.writer.message(f"input {task.value!r}: {task.worker} was lost before "
                                    f"the job wrote anything; it runs again on {worker}")
            task.worker = worker
            self._progress()

        def say(message: str) -> None:
            if self.verbose:
                self.writer.message(f"input {task.value!r}: {message}")

        task.stdout, task.stderr = spool(), spool()
        request = ExecRequest(args=task.args, env=self.env)
        return client.stream_on(
            self.reactor, self.cluster, request, None, FileConsumer(task.stdout),
            FileConsumer(task.stderr), retries=self.retries, say=say, on_started=started,
            pool=self.pool)

    def _check_done(self) -> None:
        if (not self.running and (self.settled >= len(self.tasks) or self.stopping)
                and not self.all_done.called):
            self.pool.close()
            self.all_done.callback(None)

    def _ended(self, result: JobResult | Failure | None, task: Task) -> None:
        self.settled += 1
        if result is None:  # stopping: it never ran
            self._check_done()
            return
        del self.running[task.index]
        task.done = True
        if isinstance(result, JobResult):
            task.status = result.status
            task.worker = result.worker
        elif isinstance(result.value, JobFailed):
            task.error = result.value
            task.worker = result.value.worker or task.worker
        else:
            task.error = JobFailed(f"internal error: {result.getErrorMessage()}")
        if task.interrupted:
            return  # the reactor is stopping: nothing more is written or started
        self.finished += 1
        if task.failed:
            self.failures += 1
        if task.worker and task.dispatches:
            self.per_worker[task.worker] += 1
        if self.keep_order:
            while self.printed < len(self.tasks) and self.tasks[self.printed].done:
                self.writer.output(self.tasks[self.printed])
                self.printed += 1
        else:
            self.writer.output(task)
        self._progress()
        self._check_done()

    def _progress(self) -> None:
        running = Counter(t.worker for t in self.running.values() if t.worker)
        workers = sorted(set(self.per_worker) | set(running))
        per = ", ".join(f"{w} {self.per_worker[w]}"
                        + (f"+{running[w]}" if running[w] else "") for w in workers)
        self.writer.status(
            f"rexnet parallel: {self.finished}/{len(self.tasks)} done, {self.failures} "
            f"failed, {len(self.running)} running" + (f" | {per}" if per else ""))

    def summary(self) -> list[str]:
        failed = [t for t in self.tasks if t.failed]
        lines = [f"failed: input {t.value!r}: {t.outcome()}"
                 for t in failed[:MAX_FAILURES_LISTED]]
        if len(failed) > MAX_FAILURES_LISTED:
            lines.append(f"... and {len(failed) - MAX_FAILURES_LISTED} more failed")
        interrupted = sum(t.interrupted for t in self.tasks)
        not_run = len(self.tasks) - self.finished - interrupted
        workers = ", ".join(f"{w} {n}" for w, n in sorted(self.per_worker.items()))
        lines.append(
            f"{len(self.tasks)} job(s): {self.finished - self.failures} succeeded, "
            f"{self.failures} failed"
            + (f", {interrupted} interrupted" if interrupted else "")
            + (f", {not_run} not run" if not_run else "")
            + (f", {self.redispatched} re-dispatched" if self.redispatched else "")
            + f" in {self.reactor.seconds() - self.t0:.1f} s"
            + (f"; per worker: {workers}" if workers else ""))
        return lines


def exit_status(failures: int) -> int:
    return min(failures, MAX_FAILED_STATUS)


def read_inputs(stream: IO[str]) -> list[str]:
    """One input per line (the line's end removed)."""
    return [line[:-1] if line.endswith("\n") else line for line in stream]


INTERRUPTS = ("SIGINT", "SIGTERM", "SIGHUP")


def main(cluster: Cluster, template: Sequence[str], values: Sequence[str], jobs: int,
         keep_order: bool, retries: int, env: Sequence[tuple[str, str]],
         verbose: bool) -> int:
    """Run the jobs, write their outputs and the summary; the exit status (the number of
    failed jobs, at most 101; 128+N if signal N interrupted the run)."""
    from twisted.internet import reactor

    from rexnet.client.terminal import window_size

    progress = os.isatty(2)
    writer = Writer(sys.stdout.buffer, sys.stderr.buffer, progress,
                    lambda: window_size(2)[1] or 80)
    writer.start()
    globalLogBeginner.beginLoggingTo([message_observer(writer.message, verbose)],
                                     redirectStandardIO=False)
    tasks = [Task(i, value, job_arguments(template, value)) for i, value in enumerate(values)]
    run = Parallel(reactor, cluster, tasks, writer, jobs, keep_order, retries, env, verbose)
    interrupted: list[int] = []

    def interrupt(number: int, frame: object) -> None:
        def stop() -> None:
            if not interrupted:
                interrupted.append(number)
                run.stop()
                reactor.stop()  # type: ignore[attr-defined]

        reactor.callFromThread(stop)  # type: ignore[attr-defined]

    for name in INTERRUPTS:
        signal.signal(getattr(signal, name), interrupt)

    def finished(_: object) -> None:
        if not interrupted:
            reactor.stop()  # type: ignore[attr-defined]

    reactor.callWhenRunning(lambda: run.start().addBoth(finished))  # type: ignore[attr-defined]
    reactor.run(installSignalHandlers=False)  # type: ignore[attr-defined,call-arg]
    if interrupted:
        writer.message(f"interrupted by signal {interrupted[0]}: the running jobs are ended")
    for line in run.summary():
        writer.message(line)
    writer.close()
    for task in tasks:  # spools of jobs that never ended or were never printed
        for file in (task.stdout, task.stderr):
            if file is not None:
                file.close()
    if interrupted:
        return 128 + interrupted[0]
    return exit_status(run.failures)

