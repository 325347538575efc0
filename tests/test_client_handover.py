"""A job still looking for a worker takes over a channel its pool's last job left
(looking --reuse--> reusing), and a saturated pool's job waits for one before it announces:
the job's machine on the fake reactor of tests/test_client_machine.py, with an Executor's
pool (discount_own)."""

from __future__ import annotations

from conftest import Keys
from OpenSSL import crypto
from test_client_machine import Bed, Reactor, Worker, certs, make_bed

from rexnet.client.warm import HUNGRY_AFTER, SATURATED_WAIT, WarmPool
from rexnet.protocol import wire

__all__ = ["certs"]  # the fixture, shared


def running_job(keys: Keys, certs: dict[str, crypto.X509], pool: WarmPool,
                reactor: Reactor, name: str) -> tuple[Bed, Worker]:
    """A job that runs on a fresh channel of worker NAME."""
    bed = make_bed(keys, certs, pool=pool, reactor=reactor)
    bed.run()
    worker = bed.worker(name)
    assert worker.received() == [wire.Start(("x",), keep=True)]
    worker.send(wire.Started(f"{name}-job"))
    worker.received()
    return bed, worker


def test_a_looking_job_takes_over_the_channel_another_job_left(
        keys: Keys, certs: dict[str, crypto.X509]) -> None:
    reactor = Reactor()
    pool = WarmPool(reactor, discount_own=True)
    first, worker = running_job(keys, certs, pool, reactor, "w1")
    second = make_bed(keys, certs, pool=pool, reactor=reactor)
    second.run()  # no idle channel: it announces
    assert second.transitions == [("idle", "look", "looking")]
    port = reactor.ports[-1]
    worker.send(wire.Exit(0, None))  # at once: no hand-over, as a free worker may answer
    assert first.result().status == 0 and pool.parked(worker.channel)
    assert second.transitions == [("idle", "look", "looking")]
    third = make_bed(keys, certs, pool=pool, reactor=reactor)
    third.run()
    worker.send(wire.Started("j3"))
    worker.received()  # its START, input and EOF
    while second.job.core.seq < HUNGRY_AFTER:  # unanswered: the next spare channel will do
        reactor.advance(0.05)
    announced = len(second.datagrams())
    worker.send(wire.Exit(0, None))
    assert third.result().status == 0
    assert second.transitions[-1] == ("looking", "reuse", "reusing")
    assert not port.listening  # it stopped looking
    assert worker.received() == [wire.Start(("x",), keep=True)]
    reactor.advance(2.0)  # no resend (the timeout gone too): it has its worker
    assert len(second.datagrams()) == announced and not second.outcome
    worker.send(wire.Started("j2"), wire.Exit(0, None))
    assert second.result().worker == "w1" and pool.parked(worker.channel)


def test_busy_in_a_saturated_pool_waits_for_its_own_channel(
        keys: Keys, certs: dict[str, crypto.X509]) -> None:
    reactor = Reactor()
    pool = WarmPool(reactor, discount_own=True)
    done, idle = running_job(keys, certs, pool, reactor, "w1")
    busy_bed, busy = running_job(keys, certs, pool, reactor, "w2")  # runs on
    idle.send(wire.Exit(0, None))
    assert done.result().status == 0 and pool.parked(idle.channel)
    job = make_bed(keys, certs, pool=pool, reactor=reactor)
    job.run()
    assert job.transitions == [("idle", "reuse", "reusing")]
    servers = len(reactor.sslServers)
    idle.send(wire.Busy())  # w1's slots and queue are full
    assert job.transitions[-1] == ("reusing", "busy", "looking")
    assert len(reactor.sslServers) == servers  # it waits rather than announce
    busy.send(wire.Exit(0, None))  # the pool's own job on w2 ends: its channel comes back
    assert busy_bed.result().worker == "w2"
    assert job.transitions[-1] == ("looking", "reuse", "reusing")
    assert busy.received() == [wire.Start(("x",), keep=True)]
    for _ in range(int(SATURATED_WAIT) + 1):
        reactor.advance(1.0)
        busy.send(wire.Hello("w2", "1", 0.1, 0.0, 4, 1))  # as a worker does, queued
    assert len(reactor.sslServers) == servers  # its wait was cancelled: never announced
    busy.send(wire.Started("j"), wire.Exit(0, None))
    assert job.result().worker == "w2"


def test_a_saturated_pools_job_announces_after_its_wait(
        keys: Keys, certs: dict[str, crypto.X509]) -> None:
    reactor = Reactor()
    pool = WarmPool(reactor, discount_own=True)
    done, idle = running_job(keys, certs, pool, reactor, "w1")
    running_job(keys, certs, pool, reactor, "w2")  # runs on
    idle.send(wire.Exit(0, None))
    done.result()
    job = make_bed(keys, certs, pool=pool, reactor=reactor)
    job.run()
    idle.send(wire.Busy())
    servers = len(reactor.sslServers)
    reactor.advance(SATURATED_WAIT - 0.01)
    assert len(reactor.sslServers) == servers
    reactor.advance(0.02)  # a worker the pool does not know may have room
    assert len(reactor.sslServers) == servers + 1
    other = job.worker("w3")
    assert other.received() == [wire.Start(("x",), keep=True)]
    other.send(wire.Started("j"), wire.Exit(0, None))
    assert job.result().worker == "w3"
