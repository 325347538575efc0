"""Fuzz targets shared by the hypothesis tests (tests/test_fuzz.py) and atheris
(tests/fuzz/atheris_run.py).  Each target takes bytes and raises only the documented
decode error of its decoder, or AssertionError when a decoder misbehaves otherwise."""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from twisted.internet.task import Clock

from rexnet.crat.core import Crat, CratError
from rexnet.crat.trust import read_ca_certificate
from rexnet.net.announce import AnnounceChecker, Rejected
from rexnet.protocol import agentwire, wire
from rexnet.protocol.request import ExecRequest
from rexnet.security.credentials import (
    Credential,
    CredentialError,
    keygen,
    load_ca,
    load_credential,
)
from rexnet.security.revocation import RevocationError, parse
from rexnet.worker.load import HostLoad
from rexnet.worker.service import Worker, WorkerSettings

_dir = Path(tempfile.mkdtemp(prefix="rexnet-fuzz-"))
atexit.register(shutil.rmtree, _dir, True)
CA, WORKER, CLIENT = keygen("fuzz", _dir / "keys")
worker_cred: Credential = load_credential(WORKER, "worker")
client_cred: Credential = load_credential(CLIENT, "client")
SCRATCH = _dir / "scratch"


def _write_private(data: bytes) -> Path:
    fd = os.open(SCRATCH, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return SCRATCH


def datagram(data: bytes) -> None:
    try:
        wire.decode_datagram(data)
    except wire.WireError:
        return
    assert len(data) <= wire.MAX_DATAGRAM + 2  # + the relay trailer


_checker = AnnounceChecker(worker_cred)


def announcement(data: bytes) -> None:
    """A worker's whole check of a datagram, up to (not including) its reply."""
    try:
        dgram = _checker.decode(data)
        if dgram is not None and isinstance(dgram.message, wire.Announce):
            _checker.check_announce(dgram, "127.0.0.1")
    except Rejected:
        pass


def frames(data: bytes) -> None:
    decoder = wire.FrameDecoder()
    try:
        for start in range(0, len(data), 997):
            decoder.feed(data[start:start + 997])
    except wire.WireError:
        return
    assert decoder.buffered <= wire.FRAME_HEADER.size + wire.MAX_FRAME


def job_frames(data: bytes) -> None:
    """The frames of files and detached jobs: whatever decodes names only plain files (no
    name can leave a job directory) and keeps within the listing's bound."""
    try:
        got = wire.FrameDecoder().feed(data)
    except wire.WireError:
        return
    for frame in got:
        names: list[str] = []
        if isinstance(frame, wire.PutFile):
            names = [frame.name]
        elif isinstance(frame, wire.Start):
            names = [name for name, _ in frame.put] + list(frame.get)
        elif isinstance(frame, wire.JobList):
            assert len(frame.jobs) <= 200
        for name in names:
            assert name and "/" not in name and "\0" not in name and name not in (".", "..")


def agent_messages(data: bytes) -> None:
    """The agent's (json.loads) and the launcher's (its own JSON) decoders of the agent
    socket: typed messages within their bounds, or AgentWireError."""
    for loads in (json.loads, None):
        decoder = agentwire.Decoder(loads)
        try:
            for start in range(0, len(data), 61):
                for message in decoder.feed(data[start:start + 61]):
                    assert agentwire.KINDS[message.OP] is type(message)
                    if isinstance(message, agentwire.Exec):
                        message.request.check()
        except agentwire.AgentWireError:
            pass
        assert len(decoder._buffer) <= agentwire.HEADER.size + agentwire.MAX_MESSAGE


def credential(data: bytes) -> None:
    path = _write_private(data)
    for role in ("worker", "client"):
        with contextlib.suppress(CredentialError):
            load_credential(path, role)  # type: ignore[arg-type]
    with contextlib.suppress(CredentialError):
        load_ca(path)


def trust_file(data: bytes) -> None:
    with contextlib.suppress(CratError):
        read_ca_certificate(_write_private(data))


def revocation(data: bytes) -> None:
    with contextlib.suppress(RevocationError):
        parse(data)


class _Crat:
    clock = Clock()
    crat = Crat([worker_cred.ca_cert], clock.seconds)


def crat(data: bytes) -> None:
    """crat never raises by design (it catches everything): count its caught errors."""
    before = _Crat.crat.counts.errors
    _Crat.crat.datagram(data, "127.0.0.1", 4000)
    assert _Crat.crat.counts.errors == before, "crat hit an unexpected error"


class _Worker:
    reactor = Clock()
    worker = Worker(WorkerSettings(worker_cred, ("true",), "fuzz", 2), reactor,
                    sample=lambda: HostLoad(0.0, 1, 1 << 30))


def worker_datagram(data: bytes) -> None:
    """The worker's datagram handler: refusals are complaints, nothing escapes."""
    _Worker.reactor.advance(0.01)  # keeps the per-source rate limit from hiding inputs
    _Worker.worker.datagram(data, "127.0.0.1", 4000)


def every(data: bytes) -> None:
    """All targets in one (the first byte picks one): one process fuzzes them all."""
    if data:
        chosen = _SINGLE[data[0] % len(_SINGLE)]
        chosen(data[1:])


TARGETS: dict[str, Callable[[bytes], None]] = {
    "datagram": datagram,
    "announcement": announcement,
    "frames": frames,
    "job_frames": job_frames,
    "agent_messages": agent_messages,
    "credential": credential,
    "trust_file": trust_file,
    "revocation": revocation,
    "crat": crat,
    "worker_datagram": worker_datagram,
}
_NAMES = sorted(TARGETS)
_SINGLE = [TARGETS[name] for name in _NAMES]
TARGETS["all"] = every


def seeds() -> dict[str, list[bytes]]:
    """Valid inputs of each target, for mutation."""
    ann = wire.encode_datagram(wire.Announce(b"\1" * 16, 0, 0, 9, ("127.0.0.1",)),
                               client_cred.app_id, client_cred.key, client_cred.cert_der)
    placed = wire.encode_datagram(wire.Announce(b"\2" * 16, 0, 0, 9, ("127.0.0.1",), 2,
                                                1 << 30, ("w1", "w2")),
                                  client_cred.app_id, client_cred.key, client_cred.cert_der)
    alert = wire.encode_datagram(wire.Alert(0, "job-finished", (("status", 0),)),
                                 worker_cred.app_id, worker_cred.key, worker_cred.cert_der)
    stream = b"".join(wire.encode_frame(f) for f in (
        wire.Hello("w", "0.1", 0.5, 1.0, 2, 0), wire.Data(1, b"x" * 100), wire.Eof(1),
        wire.Exit(0, None, ""), wire.Start(("cc", "-c"), cwd="/src", cwd_required=True,
                                           cpus=2, mem=1 << 20, workers=("w",)),
        wire.Started("j", (), "/src")))
    jobs = b"".join(wire.encode_frame(f) for f in (
        wire.Start(("a",), detach=True, put=(("in.txt", 3),), get=("*.o",)),
        wire.PutFile("in.txt", 3), wire.FileData(b"abc"), wire.FileWindow(3),
        wire.JobRequest("0a1b", "attach"), wire.JobState("0a1b", "finished", 0, 0),
        wire.JobList("w", (wire.JobRow("0a1b", "c", "cmd", "running", 1.0),))))
    call = wire.encode_datagram(wire.JobCall(b"\2" * 16, 0, 9, ("127.0.0.1",), "0a1b"),
                                client_cred.app_id, client_cred.key, client_cred.cert_der)
    agent = b"".join(m.encode() for m in (
        agentwire.Exec(ExecRequest(keyfile="k", keypath="/k", args=("a",), fds=((3, "r"),),
                                   env=(("A", "1"),), cwd="/d", cwd_required=True, cpus=2,
                                   mem=5, workers=("w",)), 1),
        agentwire.Signal(2), agentwire.Winch(24, 80), agentwire.Exit(0, "")))
    return {"datagram": [ann, alert, placed, call], "announcement": [ann, placed],
            "frames": [stream, jobs],
            "job_frames": [jobs],
            "agent_messages": [agent],
            "credential": [WORKER.read_bytes(), CA.read_bytes()],
            "trust_file": [WORKER.read_bytes()], "revocation": [b"# x\n0A client a\n"],
            "crat": [alert], "worker_datagram": [ann, placed, call],
            "all": [bytes([_NAMES.index("announcement")]) + ann]}
