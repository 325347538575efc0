"""Streams of the Python API: bytes or producers and consumers instead of descriptors."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IConsumer, IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from rexnet.net.channel import Channel, InStream, OutStream
from rexnet.protocol import wire

log = Logger()
INPUT_CHUNK = 64 * 1024


@implementer(IPushProducer)
class BytesProducer:
    """Produces DATA for one consumer, in the manner of twisted.web's IBodyProducer:
    startProducing(consumer) writes while not paused and returns a Deferred that fires once
    everything is written (never, after stopProducing)."""

    def __init__(self, data: bytes, chunk: int = INPUT_CHUNK) -> None:
        self.data = memoryview(data)
        self.chunk = chunk
        self.position = 0
        self.paused = False
        self.stopped = False
        self._busy = False
        self._consumer: Any = None
        self._done: defer.Deferred[None] | None = None

    def startProducing(self, consumer: IConsumer) -> defer.Deferred[None]:
        self._consumer = consumer
        self._done = defer.Deferred()
        self._produce()
        return self._done

    def _produce(self) -> None:
        if self._busy or self._consumer is None:
            return
        self._busy = True
        try:
            while not self.paused and not self.stopped and self.position < len(self.data):
                chunk = self.data[self.position : self.position + self.chunk].tobytes()
                self.position += len(chunk)
                self._consumer.write(chunk)
        finally:
            self._busy = False
        done = self._done
        if (self.position >= len(self.data) and not self.stopped and done is not None
                and not done.called):
            done.callback(None)

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self._produce()

    def stopProducing(self) -> None:
        self.stopped = True


@implementer(IConsumer)
class OutputBuffer:
    """Collects a stream in memory, at most LIMIT bytes (None: no bound); past the limit it
    keeps the first LIMIT bytes, sets ``truncated`` and calls OVERFLOW once."""

    def __init__(self, limit: int | None = None,
                 overflow: Callable[[], None] = lambda: None) -> None:
        self.limit = limit
        self.overflow = overflow
        self.chunks: list[bytes] = []
        self.size = 0
        self.truncated = False

    def write(self, data: bytes) -> None:
        if self.truncated:
            return
        if self.limit is not None and self.size + len(data) > self.limit:
            data = data[: self.limit - self.size]
            self.truncated = True
        if data:
            self.chunks.append(data)
            self.size += len(data)
        if self.truncated:
            self.overflow()

    def getvalue(self) -> bytes:
        if len(self.chunks) > 1:
            self.chunks = [b"".join(self.chunks)]
        return self.chunks[0] if self.chunks else b""

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        pass

    def unregisterProducer(self) -> None:
        pass


class ConsumerSink:
    """The sink of an InStream (write, registerProducer, unregisterProducer,
    loseConnection) that hands the bytes to an IConsumer, or drops them if there is none.

    The consumer gets the stream as its producer, so it can pause it (the worker's side
    then pauses within the stream's window). It is never closed: the job's Deferred firing
    says the output is complete."""

    def __init__(self, consumer: IConsumer | None) -> None:
        self.consumer = consumer
        self.ended = False
        self._registered = False

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        if self.consumer is not None and not self._registered:
            try:
                self.consumer.registerProducer(producer, streaming)
            except RuntimeError:  # the consumer has a producer already: no flow control
                return
            self._registered = True

    def unregisterProducer(self) -> None:
        if self._registered and self.consumer is not None:
            self._registered = False
            self.consumer.unregisterProducer()

    def write(self, data: bytes) -> None:
        if self.consumer is not None:
            self.consumer.write(data)

    def loseConnection(self) -> None:
        self.ended = True
        self.unregisterProducer()


@implementer(IConsumer)
class StreamInput:
    """The consumer a stdin producer writes to: the job's stream 0. The producer is paced
    by the stream's credit from its first write (or from registerProducer)."""

    def __init__(self, out: OutStream, producer: Any) -> None:
        self.out = out
        self.producer = producer
        self._attached = False

    def _attach(self) -> None:
        if not self._attached and not self.out.closed:
            self._attached = True
            self.out.attach(self.producer)

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        if not streaming:
            raise ValueError("rexnet takes push producers (IPushProducer) for a job's stdin")
        self.producer = producer
        self._attach()

    def unregisterProducer(self) -> None:
        if self.out.source is self.producer:
            self.out.source = None

    def write(self, data: bytes) -> None:
        self._attach()
        self.out.write(data)


class ProducerStreams:
    """A job's stdin from a Twisted push producer, its stdout and stderr to consumers.

    STDIN follows twisted.web's IBodyProducer: an IPushProducer with
    ``startProducing(consumer)`` returning a Deferred that fires once all input is written
    (twisted.web.client.FileBodyProducer fits); then the job reads EOF. None: empty stdin.
    STDOUT and STDERR are IConsumers (None discards); see ConsumerSink.
    """

    def __init__(self, stdin: Any = None, stdout: IConsumer | None = None,
                 stderr: IConsumer | None = None) -> None:
        self.stdin = stdin
        self.sinks = {1: ConsumerSink(stdout), 2: ConsumerSink(stderr)}
        self.channel: Channel | None = None
        self._input: OutStream | None = None
        self._input_done = False

    def prepare(self, channel: Channel) -> None:
        self.channel = channel
        for fd, sink in self.sinks.items():
            channel.ins[fd] = InStream(channel, fd, sink)

    def start_input(self) -> None:
        assert self.channel is not None
        out = self._input = OutStream(self.channel, 0)
        self.channel.outs[0] = out
        if self.stdin is None:
            self._input_done = True
            out.close()
            return

        def finished(result: object) -> None:
            self._input_done = True
            out.source = None
            if isinstance(result, Failure) and not out.closed:
                log.warn("the job's input failed: {why}; the job reads EOF",
                         why=result.getErrorMessage())
            out.close()

        try:
            written = self.stdin.startProducing(StreamInput(out, self.stdin))
        except Exception:
            log.failure("the job's input could not start; the job reads EOF")
            finished(None)
            return
        written.addBoth(finished)

    def finish(self) -> defer.Deferred[Any]:
        out = self._input
        if self.stdin is not None and out is not None and not self._input_done:
            self._input_done = True
            if not out.closed:  # the job ended first, or failed: stop reading the input
                out.closed = True
                out.source = None
                self.stdin.stopProducing()
        for sink in self.sinks.values():
            sink.unregisterProducer()
        return defer.succeed(None)


class BytesStreams(ProducerStreams):
    """A job's stdin from bytes; its stdout and stderr collected into OutputBuffers of at
    most MAX_OUTPUT bytes each (None: unbounded). A stream that overflows is closed, as a
    pipe whose reader went away: the job's further writes to it fail."""

    def __init__(self, stdin: bytes = b"", max_output: int | None = None) -> None:
        self.stdout = OutputBuffer(max_output, lambda: self._overflow(1))
        self.stderr = OutputBuffer(max_output, lambda: self._overflow(2))
        self.overflowed: list[int] = []
        super().__init__(BytesProducer(stdin) if stdin else None, self.stdout, self.stderr)

    def _overflow(self, fd: int) -> None:
        self.overflowed.append(fd)
        stream = self.channel.ins.get(fd) if self.channel is not None else None
        if stream is not None and self.channel is not None:
            stream.drop_sink()
            self.channel.send(wire.Shut(fd))
