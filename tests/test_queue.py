"""A busy worker's queue (P11 #4): the estimate of the wait (rexnet.worker.jobqueue), the
worker's channels queued and admitted on a Clock (the real Worker and WorkerChannel, the
job a stand-in as in test_worker_machine), signed announcements answered or not by
room, the client's machine in its queued state (test_client_machine's fake reactor), and
real workers on loopback: more clients than slots all run, back to back."""

from __future__ import annotations

import re
import subprocess
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

import pytest
from cluster import exec_argv, loopback_address, start_worker
from conftest import Keys
from OpenSSL import crypto
from test_client_machine import Worker as FakeWorker
from test_client_machine import certs as certs  # a fixture
from test_client_machine import make_bed
from test_worker_machine import Bed, FakeProcess, PeerTransport, feed, lose, sent
from test_worker_machine import bed as bed  # a fixture
from twisted.logger import capturedLogs, formatEvent

from rexnet.client.results import Interrupted, JobResult, NoWorker
from rexnet.net.announce import now_ms
from rexnet.net.heartbeat import DEAD_AFTER
from rexnet.protocol import wire
from rexnet.security.credentials import load_credential
from rexnet.worker.channel import WorkerChannel
from rexnet.worker.connectback import Pending
from rexnet.worker.jobqueue import FIRST_GUESS, JobQueue, Waitlist
from rexnet.worker.load import LOAD_MS, WAIT_MAX_MS, WAIT_MS, connect_back_delay

# -- the estimate -------------------------------------------------------------------------


def test_the_wait_is_the_time_until_the_slot_a_job_gets_frees() -> None:
    q = JobQueue(8)
    assert q.mean == FIRST_GUESS and q.wait(0, 2, []) == 0.0  # a free slot: no wait
    q.finished(2.0)  # the first job sets the mean, later ones move it by a fifth
    q.finished(4.0)
    assert q.mean == pytest.approx(2.4) and q.measured == 2
    # two slots, their jobs 0.4 s and 2.0 s in: they free after 2.0 and 0.4 s
    assert q.wait(0, 2, [0.4, 2.0]) == pytest.approx(0.4)
    assert q.wait(1, 2, [0.4, 2.0]) == pytest.approx(2.0)
    assert q.wait(2, 2, [0.4, 2.0]) == pytest.approx(2.8)  # 0.4 + one mean
    assert q.wait(0, 2, [0.4]) == 0.0  # one slot is free
    assert q.wait(0, 1, [100.0]) == 0.0  # a job past the mean: any moment now


def test_the_queue_is_first_come_first_served_and_anyone_may_leave() -> None:
    q = JobQueue(4)
    a, b, c = object(), object(), object()
    assert [q.add(x, wire.Start(), 1.0) for x in (a, b, c)] == [1, 2, 3]
    assert q.position(b) == 2 and q.remove(b) and not q.remove(b)
    assert q.position(c) == 2 and q.position(b) == 0
    first = q.pop()
    assert first is not None and first.channel is a and len(q) == 1
    assert q.pop() is not None and q.pop() is None


def test_a_queued_answer_comes_later_by_its_wait_and_is_capped() -> None:
    idle = connect_back_delay(1.0, 1.0, lambda: 0.0)
    assert idle == pytest.approx((5.0 + LOAD_MS) / 1000)
    waited = connect_back_delay(1.0, 1.0, lambda: 0.0, wait=3.0)
    assert waited - idle == pytest.approx(3.0 * WAIT_MS / 1000)
    assert connect_back_delay(1.0, 1.0, lambda: 0.0, wait=1e6) - idle == pytest.approx(
        WAIT_MAX_MS / 1000)



@pytest.mark.parametrize("crowd", [1.0, 2.0, 50.0, 1000.0])
def test_a_queued_answer_comes_after_every_free_answer_of_the_window(crowd: float) -> None:
    # a free worker drawing the end of a wide crowd window, a full one (at the same host
    # load: +1 busy share) drawing its start with no expected wait: the free one first
    free = connect_back_delay(0.5, 1.0, lambda: 1.0, crowd=crowd)
    full = connect_back_delay(1.5, 1.0, lambda: 0.0, crowd=crowd, queued=True)
    assert full > free
    assert connect_back_delay(0.5, 1.0, lambda: 0.0, crowd=crowd, queued=True) >= free

# -- the worker: queued channels on a Clock ---------------------------------------------------


def connect(b: Bed, n: int, queued: bool = True) -> tuple[WorkerChannel, PeerTransport]:
    """Client N's connect-back, verified (QUEUED: it answered with every slot busy)."""
    pending = Pending(bytes([n]) * 16, cast(Any, None), 1.0, 0.05, heard=b.clock.seconds(),
                      queued=queued)
    b.worker.pending[pending.job_id] = pending
    s = b.worker.settings
    channel = WorkerChannel(b.worker, pending, s.credential, s.revoked)
    transport = PeerTransport(crypto.X509.from_cryptography(b.client.cert))
    channel.makeConnection(transport)
    channel.handshakeCompleted()
    sent(transport)  # its HELLO
    return channel, transport


def busy_worker(b: Bed, clients: int) -> tuple[list[WorkerChannel], list[PeerTransport]]:
    """The only slot runs client 0's job; clients 1.. sent START and wait in the queue."""
    pairs = [connect(b, n, queued=n > 0) for n in range(clients)]
    feed(pairs[0][0], wire.Start())
    b.worker.running[pairs[0][0].core.job or ""].started = b.clock.seconds()
    for channel, _ in pairs[1:]:
        feed(channel, wire.Start())
    return [c for c, _ in pairs], [t for _, t in pairs]


def only(frames: list[wire.Frame]) -> list[wire.Frame]:
    return [f for f in frames if not isinstance(f, wire.Ping | wire.Hello)]


def test_a_start_with_every_slot_busy_is_queued_then_started_when_the_slot_frees(
        bed: Bed) -> None:
    with capturedLogs() as logs:
        _, transports = busy_worker(bed, 3)
    assert sent(transports[0]) == [wire.Started("job1", ())]
    [q1], [q2] = sent(transports[1]), sent(transports[2])
    assert (q1, q2) == (wire.Queued(1, 1000.0), wire.Queued(2, 2000.0))  # mean: 1 s yet
    # an expected wait of a second or more is logged at once (shorter ones only in the
    # job's started line)
    assert [formatEvent(e).split(", ")[-1] for e in logs
            if "queued at position" in formatEvent(e)] == ["expected wait 1.0 s",
                                                            "expected wait 2.0 s"]
    assert len(bed.worker.queue) == 2 and bed.worker.queued == 2 and bed.worker.busy == 1
    assert bed.worker.pending == {}  # the places passed from the connect-backs to the jobs
    bed.clock.advance(0.5)
    bed.worker.end("job1")
    assert only(sent(transports[1])) == [wire.Started("job2", ())]  # at once, first come
    assert only(sent(transports[2])) == []
    assert bed.worker.queue.mean == 0.5 and len(bed.worker.queue) == 1
    bed.worker.running["job2"].started = bed.clock.seconds()
    bed.worker.end("job2")
    assert only(sent(transports[2])) == [wire.Started("job3", ())]
    assert [warm for _, warm in bed.worker.starts] == [False, False, False]


def test_a_client_that_gives_up_or_goes_away_frees_its_place(bed: Bed) -> None:
    channels, transports = busy_worker(bed, 4)
    sent(transports[3])
    with capturedLogs() as logs:
        feed(channels[1], wire.Busy())  # gave up (--queue-timeout, or a signal)
        lose(channels[2])  # went away
    assert transports[1].disconnecting and len(bed.worker.queue) == 1
    assert sum("left the queue" in formatEvent(e) for e in logs) == 2
    bed.worker.end("job1")
    assert only(sent(transports[3])) == [wire.Started("job2", ())]
    assert len(bed.worker.starts) == 2


def test_a_silent_queued_client_loses_its_place(bed: Bed) -> None:
    channels, transports = busy_worker(bed, 2)
    for _ in range(int(DEAD_AFTER) + 1):  # the running client answers; the queued one not
        bed.clock.advance(1.0)
        feed(channels[0], wire.Ping())
    assert transports[1].disconnected and len(bed.worker.queue) == 0
    assert not transports[0].disconnected


def test_a_queued_job_starts_with_the_latest_window_size_and_signals_are_errors(
        bed: Bed) -> None:
    channels, transports = busy_worker(bed, 3)
    feed(channels[1], wire.Winsize(50, 132))
    feed(channels[2], wire.Signal(2))
    assert only(sent(transports[2]))[-1] == wire.Error("protocol", "unexpected Signal frame")
    assert transports[2].disconnected and len(bed.worker.queue) == 1
    bed.worker.end("job1")
    assert bed.worker.starts[-1][0] == wire.Start(rows=50, cols=132)


def test_a_warm_channel_queues_its_next_job_and_a_full_queue_says_busy(bed: Bed) -> None:
    bed.worker.queue.places = 2
    warm = []
    for n in range(2):
        channel, transport = connect(bed, 10 + n, queued=False)
        feed(channel, wire.Start(keep=True))
        bed.worker.end(channel.core.job or "")
        sent(transport)
        warm.append((channel, transport))
    channels, transports = busy_worker(bed, 2)  # client 0 runs, client 1 waits
    feed(warm[0][0], wire.Start(keep=True))
    [queued] = only(sent(warm[0][1]))
    assert isinstance(queued, wire.Queued) and queued.position == 2
    assert not bed.worker.has_room()
    feed(warm[1][0], wire.Start(keep=True))  # no slot, no place: the client announces
    assert only(sent(warm[1][1])) == [wire.Busy()] and warm[1][1].disconnecting
    feed(warm[0][0], wire.Busy())  # the first warm client gives its place up
    assert len(bed.worker.queue) == 1 and bed.worker.has_room()
    bed.worker.end(channels[0].core.job or "")
    assert isinstance(only(sent(transports[1]))[-1], wire.Started)


def test_stopping_tells_queued_clients_and_starts_none_of_them(bed: Bed) -> None:
    _, transports = busy_worker(bed, 3)
    for transport in transports:
        sent(transport)
    stopped = bed.worker.stop_all()
    for transport in transports[1:]:
        [error] = only(sent(transport))
        assert isinstance(error, wire.Error) and error.reason == "stopping"
        assert "not started" in error.message and transport.disconnecting
    process = cast(FakeProcess, bed.worker.running["job1"].process)
    assert process.kills == 1 and not stopped.called
    bed.worker.end("job1")
    assert stopped.called and len(bed.worker.starts) == 1


# -- the worker: which announcements it answers ---------------------------------------------


def announce(b: Bed, n: int) -> None:
    client = b.client
    data = wire.encode_datagram(
        wire.Announce(bytes([n]) * 16, 0, now_ms(), 4000 + n, ("127.0.0.1",)),
        client.app_id, client.key, client.cert_der)
    b.worker.datagram(data, "127.0.0.1", 5000 + n)


def test_a_busy_worker_answers_while_its_queue_has_room_later_by_the_wait(bed: Bed) -> None:
    bed.worker.queue.places = 2
    for n in range(4):  # one slot, two places: the fourth client is not answered
        announce(bed, n)
    promised = list(bed.worker.pending.values())
    assert [p.queued for p in promised] == [False, True, True]
    assert [p.ahead for p in promised] == [0, 0, 1]
    assert promised[0].wait == 0 and 0 < promised[1].wait < promised[2].wait
    assert promised[0].delay < promised[1].delay < promised[2].delay
    assert bed.worker.busy == 1 and bed.worker.queued == 2
    assert bed.worker.has_room()  # for a warm channel: reservations do not keep it out
    hello = bed.worker.hello(promised[2])
    assert (hello.queued, hello.wait_ms) == (1, round(promised[2].wait * 1000, 1))


def taken(b: Bed, n: int, key: Any = None) -> None:
    client = b.client
    data = wire.encode_datagram(wire.Taken(bytes([n]) * 16, now_ms(), 1), client.app_id,
                                key or client.key)
    b.worker.datagram(data, "127.0.0.1", 5000 + n)


def test_an_announcement_heard_when_full_is_answered_as_soon_as_a_place_frees(
        bed: Bed, other_keys: Keys) -> None:
    bed.worker.queue.places = 1
    for n in range(5):  # 0 gets the slot, 1 the place; 2, 3 and 4 are remembered
        announce(bed, n)
    assert len(bed.worker.pending) == 2 and len(bed.worker.waitlist) == 3
    announce(bed, 3)  # a resend keeps its place in line
    taken(bed, 2)  # 2 found a worker elsewhere (its TAKEN is checked, then it is forgotten)
    stranger = load_credential(other_keys.client, "client")
    with capturedLogs():
        taken(bed, 4, stranger.key)  # a forged TAKEN does not remove 4
    assert bytes([2]) * 16 not in bed.worker.waitlist and len(bed.worker.waitlist) == 2
    queued = bed.worker.pending[bytes([1]) * 16]
    bed.worker.connect_backs.taken(queued, 1)  # 1's place frees (it chose another worker)
    bed.worker.release(queued)
    assert bytes([3]) * 16 in bed.worker.pending and len(bed.worker.waitlist) == 1
    assert bed.worker.pending[bytes([3]) * 16].queued


def test_a_freed_slot_hastens_the_oldest_connect_back_promised_for_a_place(bed: Bed) -> None:
    """A connect-back promised for a queue place waits the expected wait; when the slot
    frees first (here the job that reserved it was taken elsewhere), the oldest such
    promise goes for the slot after an idle answer's delay, not after its wait (the slot
    would idle until then, or until the client announced again: the flaky back-to-back
    test's gaps)."""
    for n in range(3):  # one slot: 0 reserves it, 1 and 2 are promised places
        announce(bed, n)
        bed.clock.advance(0.001)
    first, second = (bed.worker.pending[bytes([n]) * 16] for n in (1, 2))
    due = [p.call.getTime() for p in (first, second)]  # type: ignore[union-attr]
    assert first.queued and second.queued and min(due) - bed.clock.seconds() > 0.05
    taken(bed, 0)  # 0 found a worker elsewhere: its slot frees
    assert not first.queued and (first.ahead, first.wait) == (0, 0.0)
    idle = connect_back_delay(first.load, 1.0, lambda: 1.0)
    assert first.call is not None and first.call.getTime() - bed.clock.seconds() <= idle
    assert second.queued and second.call is not None and second.call.getTime() == due[1]
    assert bed.worker.busy == 1 and bed.worker.queued == 1
    hello = bed.worker.hello(first)
    assert (hello.queued, hello.wait_ms) == (0, 0.0)


def test_the_waitlist_is_bounded_and_forgets_clients_that_stopped_resending() -> None:
    wl = Waitlist(size=2, age=5.0)
    wl.note(b"a", None, ("h", 1), 0.0)
    wl.note(b"b", None, ("h", 2), 1.0)
    wl.note(b"c", None, ("h", 3), 1.0)  # full: forgotten
    assert len(wl) == 2 and b"c" not in wl
    wl.note(b"a", None, ("h", 1), 6.0)  # a resend refreshes, and keeps a's place
    first = wl.pop(7.0)
    assert first is not None and first.job_id == b"a"
    assert wl.pop(7.0) is None and len(wl) == 0  # b was last heard 6 s ago: gone


def test_with_no_queue_a_busy_worker_does_not_answer(bed: Bed) -> None:
    bed.worker.queue.places = 0
    announce(bed, 1)
    announce(bed, 2)
    assert [p.queued for p in bed.worker.pending.values()] == [False]


# -- the client's machine: queued ------------------------------------------------------------


def queued_bed(keys: Keys, certs: dict[str, crypto.X509], queue_timeout: float | None = None
               ) -> tuple[Any, FakeWorker]:
    b = make_bed(keys, certs)
    b.job.core.queue_timeout = queue_timeout
    b.run()
    worker = b.worker()
    worker.received()
    worker.send(wire.Queued(3, 1500.0))
    return b, worker


def test_a_queued_job_waits_beyond_the_timeout_and_runs_when_started(
        keys: Keys, certs: dict[str, crypto.X509]) -> None:
    b, worker = queued_bed(keys, certs)
    assert b.states[-1] == "queued"
    assert b.said[-1].startswith("job queued at worker w1 (127.0.0.2:")
    assert b.said[-1].endswith("): position 3, expected wait 1.5 s")
    for _ in range(60):  # far past --timeout (5 s here): still queued, nothing resent
        b.reactor.advance(1.0)
        worker.send(wire.Ping())  # (a silent worker would be given up)
    worker.send(wire.Queued(1, 200.0))  # a later position
    assert b.states[-1] == "queued" and b.outcome == []
    worker.send(wire.Started("j1", ()), wire.Data(1, b"out"), wire.Exit(0, None))
    assert b.states[-3:] == ["running", "draining", "done"]
    assert isinstance(b.outcome[0], JobResult) and b.outcome[0].status == 0
    assert any("runs on worker w1" in m and "after 60.00 s in its queue" in m for m in b.said)


def test_the_queue_timeout_gives_the_place_up(keys: Keys, certs: dict[str, crypto.X509]
                                              ) -> None:
    b, worker = queued_bed(keys, certs, queue_timeout=2.0)
    b.reactor.advance(1.9)
    worker.send(wire.Ping())
    assert b.outcome == []
    b.reactor.advance(0.1)
    error = b.failure()
    assert isinstance(error, NoWorker) and "waited 2 s in the queue of worker w1" in str(error)
    assert worker.received() == [wire.Busy()] and worker.transport.disconnecting


def test_a_started_job_has_no_queue_timeout(keys: Keys, certs: dict[str, crypto.X509]) -> None:
    b, worker = queued_bed(keys, certs, queue_timeout=2.0)
    worker.send(wire.Started("j1", ()))
    for _ in range(5):
        b.reactor.advance(1.0)
        worker.send(wire.Ping())
    assert b.outcome == [] and b.states[-1] == "running"


def test_a_signal_while_queued_interrupts_and_gives_the_place_up(
        keys: Keys, certs: dict[str, crypto.X509]) -> None:
    b, worker = queued_bed(keys, certs)
    b.job.send_signal(2)
    error = b.failure()
    assert isinstance(error, Interrupted) and error.exit_code == 130
    assert worker.received() == [wire.Busy()]


def test_queued_after_started_is_a_protocol_error(keys: Keys, certs: dict[str, crypto.X509]
                                                  ) -> None:
    _, worker = queued_bed(keys, certs)
    worker.send(wire.Started("j1", ()), wire.Queued(1, 0.0))
    assert worker.received()[-1] == wire.Error("protocol", "unexpected Queued frame")


# -- real workers on loopback --------------------------------------------------------------


def test_more_clients_than_slots_all_run_back_to_back(keys: Keys) -> None:
    """12 clients at once, 2 slots, 0.3 s jobs: 1.8 s of work per slot. Every client gets
    its job run (none fails on --timeout, 2 s here, though most wait longer), and the
    slots never sit idle: from the first job's start to the last one's end (the jobs say
    when) stays within twice the ideal 1.8 s (a full run of the suite beside a CPU-bound
    benchmark on the 2 cores made 3.07 s; a client that backs off and resends instead of
    queuing waits up to 2 s per try and fails on --timeout)."""
    addr = loopback_address()
    script = "date +%s.%N; sleep 0.3; date +%s.%N"
    worker = start_worker(keys.worker, ["sh", "-c", script], f"{addr}:3010", "q",
                          "--slots", "2")
    try:
        argv = exec_argv(keys.client, [f"{addr}:3010"], "--no-agent", "--timeout", "2", "-v")
        with ThreadPoolExecutor(12) as pool:
            done = list(pool.map(lambda _: subprocess.run(argv, capture_output=True,
                                                          timeout=60), range(12)))
    finally:
        worker.stop()
    assert [d.returncode for d in done] == [0] * 12, [d.stderr for d in done]
    queued = sum(b"job queued at worker q" in d.stderr for d in done)
    assert queued >= 6
    # each job's started line, the queued ones' with how long they waited
    started = [line for line in worker.output.splitlines() if " started for " in line]
    assert len(started) == 12, worker.output
    assert sum(re.search(r"after \d+\.\d{3} s in the queue \(from position \d+\): ", line)
               is not None for line in started) == queued, started
    times = [[float(t) for t in d.stdout.split()] for d in done]
    span = max(end for _, end in times) - min(start for start, _ in times)
    assert 1.8 <= span < 3.6, (span, sorted(times))
