"""The agent decodes a launcher's Exec message once per its bytes (rexnet.agent.kept; P11, 3): the
same command line in the same directory sends the same bytes, and the request decoded for an
earlier launcher (the same object, so its START is made once too) serves the next. Only
a whole message that came alone is kept, at most EXECS_KEPT of them, none longer than
EXEC_KEPT_SIZE; anything else is decoded as before, and a bad message is still refused."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
from pathlib import Path
from typing import Any

import pytest
from conftest import Keys
from twisted.internet.protocol import Factory

from rexnet.agent.kept import EXEC_KEPT_SIZE, EXECS_KEPT
from rexnet.agent.server import Agent, Session
from rexnet.protocol import agentwire
from rexnet.protocol.request import ExecRequest, RequestError


def exec_bytes(*args: str) -> bytes:
    return agentwire.Exec(ExecRequest(keyfile="k", keypath="/nonexistent/k",
                                      args=args), 0).encode()


def launch(reactor: Any, agent: Agent, *chunks: bytes) -> agentwire.Message:
    """Connect a launcher (without descriptors) to a session of AGENT, send CHUNKS, and
    return the agent's answer."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    reactor.adoptStreamConnection(ours.fileno(), socket.AF_UNIX,
                                  Factory.forProtocol(lambda: Session(agent)))
    ours.close()
    theirs.setblocking(False)
    decoder = agentwire.Decoder()
    try:
        for chunk in chunks:
            theirs.sendall(chunk)
            reactor.iterate(0.001)
        for _ in range(2000):
            reactor.iterate(0.001)
            with contextlib.suppress(BlockingIOError):
                data = theirs.recv(65536)
                if not data:
                    break
                if messages := decoder.feed(data):
                    return messages[0]
        raise AssertionError("the agent did not answer")
    finally:
        theirs.close()


def test_the_same_bytes_give_the_same_request_and_the_same_answer(reactor: Any) -> None:
    agent = Agent(reactor)
    data = exec_bytes("true")
    first = launch(reactor, agent, data)
    kept = agent.kept.exec_of(data)
    assert kept is not None and kept == agentwire.Decoder().feed(data)[0]
    assert launch(reactor, agent, data) == first  # (no descriptors: refused, as before)
    assert agent.kept.exec_of(data) is kept
    assert isinstance(first, agentwire.Exit) and "descriptors" in first.message


def test_a_message_in_pieces_is_decoded_but_not_kept(reactor: Any) -> None:
    agent = Agent(reactor)
    data = exec_bytes("true")
    answer = launch(reactor, agent, data[:7], data[7:])
    assert isinstance(answer, agentwire.Exit) and "descriptors" in answer.message
    assert agent.kept.exec_of(data) is None and agent.kept.exec_of(data[7:]) is None


def test_a_bad_message_is_refused_whatever_was_kept(reactor: Any) -> None:
    agent = Agent(reactor)
    data = exec_bytes("true")
    launch(reactor, agent, data)
    bad = data[:-2] + b"!}"
    answer = launch(reactor, agent, bad)
    assert isinstance(answer, agentwire.Exit) and "bad message" in answer.message
    assert agent.kept.exec_of(bad) is None


def test_the_kept_messages_are_bounded(reactor: Any) -> None:
    agent = Agent(reactor)
    datas = [exec_bytes(str(i)) for i in range(EXECS_KEPT + 5)]
    for data in datas:
        agent.kept.keep_exec(data, agentwire.Decoder().feed(data)[0])  # type: ignore[arg-type]
    assert len(agent.kept.execs) == EXECS_KEPT
    assert agent.kept.exec_of(datas[0]) is None and agent.kept.exec_of(datas[-1]) is not None
    long = exec_bytes("x" * EXEC_KEPT_SIZE)
    agent.kept.keep_exec(long, agentwire.Decoder().feed(long)[0])  # type: ignore[arg-type]
    assert agent.kept.exec_of(long) is None
    assert EXEC_KEPT_SIZE <= agentwire.MAX_MESSAGE


def test_a_kept_request_keeps_its_cluster_while_its_files_stay(
        reactor: Any, keys: Keys, tmp_path: Path) -> None:
    credential = tmp_path / "client"
    shutil.copy(keys.client, credential)
    credential.chmod(0o600)
    agent = Agent(reactor)
    request = ExecRequest(keyfile=str(credential), keypath=str(credential), args=("true",))
    cluster = agent.kept.cluster(request)
    assert agent.kept.cluster(request) is cluster
    assert agent.kept.cluster(request.replace()) is not cluster  # another request object
    (tmp_path / f"{keys.app}.revoked").write_text("")  # a revocation list appears beside
    with_list = agent.kept.cluster(request)
    assert with_list is not cluster and with_list.revoked is not None
    assert agent.kept.cluster(request) is with_list
    os.utime(credential, ns=(1, 1))  # the credential's file changed
    assert agent.kept.cluster(request) is not with_list
    credential.chmod(0o644)  # made unsafe: refused, as Cluster.for_request refuses it
    with pytest.raises(RequestError):
        agent.kept.cluster(request)
