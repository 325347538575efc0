"""Files with a job and detached jobs, in process: the new frames and datagram (bounded
decoders), the file lane's credit and its refusals (names that leave the directory,
symbolic links, files nobody asked for), the owner-or-admin rule, the bounded output log."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import Keys
from twisted.internet.task import Clock

from rexnet.net.files import FILE_WINDOW, FileError, FileLane, collect, open_outgoing
from rexnet.protocol import wire
from rexnet.security.credentials import CA, is_admin, issue, load_ca, load_credential
from rexnet.worker.detached import OutputLog, admitted
from rexnet.worker.files import FileSettings, JobDirectory, receive

FRAMES: list[wire.Frame] = [
    wire.PutFile("a.txt", 3, 0o600), wire.FileData(b"abc"), wire.FileWindow(7),
    wire.JobRequest("00ff", "cancel", 9), wire.JobRequest("", "list"),
    wire.JobList("w1", (wire.JobRow("0a", "alice", "cmd x", "running", 10.5),
                        wire.JobRow("0b", "bob", "y", "finished", 1.0, 2.0, 137, 5, True))),
    wire.JobState("0a", "finished", 3, 12), wire.JobState("0b", "running"),
    wire.Start(("x",), detach=True, put=(("in.txt", 10),), get=("*.o",)),
    wire.Started("0a", (), detached=True),
]


def raw(kind: int, body: bytes) -> bytes:
    return wire.FRAME_HEADER.pack(kind, 0, len(body)) + body


def test_new_frames_round_trip_whole_and_byte_by_byte() -> None:
    data = b"".join(wire.encode_frame(f) for f in FRAMES)
    assert wire.FrameDecoder().feed(data) == FRAMES
    decoder, got = wire.FrameDecoder(), []
    for i in range(len(data)):
        got += decoder.feed(data[i:i + 1])
    assert got == FRAMES


@pytest.mark.parametrize("name", ["..", ".", "../x", "/etc/passwd", "a/b", "", "a\0b",
                                  "x" * 256])
def test_put_file_names_that_leave_the_directory_are_refused(name: str) -> None:
    with pytest.raises(wire.WireError):
        wire.FrameDecoder().feed(raw(wire.FrameKind.PUT_FILE,
                                     json.dumps({"name": name, "size": 1}).encode()))
    with pytest.raises(wire.WireError):
        wire.FrameDecoder().feed(raw(wire.FrameKind.START,
                                     json.dumps({"put": [[name, 1]]}).encode()))
    with pytest.raises(wire.WireError):
        wire.FrameDecoder().feed(raw(wire.FrameKind.START,
                                     json.dumps({"get": [name]}).encode()))


@pytest.mark.parametrize("kind,body", [
    (wire.FrameKind.PUT_FILE, {"name": "a", "size": -1}),
    (wire.FrameKind.PUT_FILE, {"name": "a", "size": 1, "mode": 0o4755}),
    (wire.FrameKind.START, {"put": [["a", 1], ["a", 2]]}),
    (wire.FrameKind.START, {"put": [[f"f{i}", 1] for i in range(wire.MAX_FILES + 1)]}),
    (wire.FrameKind.START, {"detach": "yes"}),
    (wire.FrameKind.JOB_REQUEST, {"job": "0a", "action": "delete"}),
    (wire.FrameKind.JOB_REQUEST, {"action": "cancel"}),
    (wire.FrameKind.JOB_REQUEST, {"job": "../0a", "action": "output"}),
    (wire.FrameKind.JOB_LIST, {"worker": "w", "jobs": [["0a"] * 9] * 201}),
    (wire.FrameKind.JOB_LIST, {"worker": "w", "jobs": [[1, 2, 3]]}),
    (wire.FrameKind.JOB_STATE, {"job": "0a", "state": "lost"}),
    (wire.FrameKind.JOB_STATE, {"job": "0a", "state": "finished", "status": 1000}),
])
def test_malformed_job_frames_are_refused(kind: int, body: dict[str, object]) -> None:
    with pytest.raises(wire.WireError):
        wire.FrameDecoder().feed(raw(kind, json.dumps(body).encode()))


def test_file_data_is_raw_and_bounded_like_data() -> None:
    big = wire.FileData(b"x" * wire.MAX_FRAME)
    assert wire.FrameDecoder().feed(wire.encode_frame(big)) == [big]
    header = wire.FRAME_HEADER.pack(wire.FrameKind.FILE_DATA, 0, wire.MAX_FRAME + 1)
    with pytest.raises(wire.WireError):
        wire.FrameDecoder().feed(header)
    with pytest.raises(wire.WireError):
        wire.FrameDecoder().feed(raw(wire.FrameKind.FILE_WINDOW, b"abc"))


def test_job_call_datagram_round_trips_and_refuses_a_bad_job_id(keys: Keys) -> None:
    cred = load_credential(keys.client, "client")
    call = wire.JobCall(b"\1" * 16, 5, 4000, ("127.0.0.1",), "00ab")
    data = wire.encode_datagram(call, cred.app_id, cred.key, cred.cert_der)
    assert wire.decode_datagram(data).message == call
    bad = wire.JobCall(b"\1" * 16, 5, 4000, ("127.0.0.1",), "../../x")
    with pytest.raises(wire.WireError):
        wire.decode_datagram(wire.encode_datagram(bad, cred.app_id, cred.key, cred.cert_der))


# -- the file lane ----------------------------------------------------------------------


class Link:
    """A channel's face for a lane: frames queue up until the test delivers them."""

    closed = False
    congested = False

    def __init__(self) -> None:
        self.frames: list[wire.Frame] = []

    def send(self, frame: wire.Frame) -> None:
        self.frames.append(frame)


def pump(a: tuple[Link, FileLane], b: tuple[Link, FileLane]) -> int:
    """Deliver queued frames both ways until none is left; the most file bytes the
    sender had in flight (sent, not yet credited)."""
    in_flight = most = 0
    while a[0].frames or b[0].frames:
        for (link, _), (_, peer) in ((a, b), (b, a)):
            frames, link.frames = link.frames, []
            for frame in frames:
                if isinstance(frame, wire.FileData):
                    in_flight += len(frame.payload)
                    most = max(most, in_flight)
                elif isinstance(frame, wire.FileWindow):
                    in_flight -= frame.credit
                peer.frame(wire.FrameDecoder().feed(wire.encode_frame(frame))[0])
    return most


def test_a_large_file_goes_within_the_credit_window(tmp_path: Path) -> None:
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(3 * FILE_WINDOW + 123))
    dest = tmp_path / "dest"
    dest.mkdir()
    dirfd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY)
    sender_link, receiver_link = Link(), Link()
    sender, receiver = FileLane(sender_link), FileLane(receiver_link, dirfd)
    sent = sender.send([open_outgoing(str(src))])
    most = pump((sender_link, sender), (receiver_link, receiver))
    assert sent.called and (dest / "big.bin").read_bytes() == src.read_bytes()
    assert 0 < most <= FILE_WINDOW
    assert receiver.received == ["big.bin"] and os.listdir(dest) == ["big.bin"]


def test_the_worker_takes_only_the_files_start_announced_within_its_limit(
        tmp_path: Path) -> None:
    complaints: list[str] = []
    done: list[int] = []
    directory = JobDirectory.create(FileSettings(str(tmp_path), 100))
    start = wire.Start(put=(("a.txt", 3), ("big", 200)))
    lane = receive(Link(), directory, start, FileSettings(str(tmp_path), 100),
                   complaints.append, lambda: done.append(1), lambda: None)
    with pytest.raises(FileError, match="not announced"):
        lane.frame(wire.PutFile("b.txt", 3))
    with pytest.raises(FileError, match="size"):
        lane.frame(wire.PutFile("a.txt", 4))
    with pytest.raises(FileError, match="--job-files"):
        lane.frame(wire.PutFile("big", 200))
    assert len(complaints) == 3 and not done
    assert os.listdir(directory.path) == []
    directory.remove()
    assert not os.path.exists(directory.path)


def test_more_bytes_than_announced_unasked_files_and_no_directory_are_refused(
        tmp_path: Path) -> None:
    lane = FileLane(Link(), os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY),
                    accept=lambda name, size: None if name == "ok" else "not asked for")
    with pytest.raises(FileError, match="not asked for"):
        lane.frame(wire.PutFile("evil", 1))
    lane.frame(wire.PutFile("ok", 2))
    with pytest.raises(FileError, match="more bytes"):
        lane.frame(wire.FileData(b"abc"))
    with pytest.raises(FileError, match="no files"):
        FileLane(Link()).frame(wire.PutFile("ok", 1))


@pytest.mark.parametrize("replace", [False, True])
def test_a_symbolic_link_at_the_name_is_never_written_through(tmp_path: Path,
                                                               replace: bool) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    there = tmp_path / "there"
    there.mkdir()
    (there / "out.txt").symlink_to(victim)
    lane = FileLane(Link(), os.open(there, os.O_RDONLY | os.O_DIRECTORY), replace=replace)
    lane.frame(wire.PutFile("out.txt", 5))
    lane.frame(wire.FileData(b"hello"))
    assert victim.read_text() == "precious"
    if replace:  # the link itself is replaced by the file
        assert not (there / "out.txt").is_symlink()
        assert (there / "out.txt").read_text() == "hello"
    else:
        assert (there / "out.txt").is_symlink() and lane.received == []
    assert sorted(os.listdir(there)) == ["out.txt"]  # no temporary file left


def test_collect_sends_regular_files_only_and_never_follows_links(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "secret.txt").symlink_to("/etc/passwd")
    (tmp_path / "dir.txt").mkdir()
    os.mkfifo(tmp_path / "fifo.txt")
    (tmp_path / "b.log").write_text("b")
    files, notes = collect(os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY), ("*.txt",), 64,
                           1 << 20)
    assert [f.name for f in files] == ["a.txt"]
    assert any("secret.txt" in n and "symbolic link" in n for n in notes)
    assert any("fifo.txt" in n for n in notes) and any("dir.txt" in n for n in notes)
    for f in files:
        os.close(f.fd)
    files, notes = collect(os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY), ("*",), 1, 1)
    assert [f.name for f in files] == ["a.txt"]  # one file of one byte: b.log is over
    assert any(n.startswith("b.log") and "over 1 files" in n for n in notes)


# -- owners, admins, output --------------------------------------------------------------


def test_only_the_same_certificate_or_an_admin_is_admitted(keys: Keys, tmp_path: Path) -> None:
    ca: CA = load_ca(keys.ca)
    _, alice = issue(ca.key, ca.cert, "client", "alice")
    _, alice_again = issue(ca.key, ca.cert, "client", "alice")  # same name, another key
    _, boss = issue(ca.key, ca.cert, "client", "boss", admin=True)
    _, worker = issue(ca.key, ca.cert, "worker", "w1")
    assert admitted(alice, "alice", alice.serial_number) is None
    assert admitted(alice_again, "alice", alice.serial_number) is not None
    assert admitted(boss, "alice", alice.serial_number) is None
    assert is_admin(boss) and not is_admin(alice) and not is_admin(worker)
    with pytest.raises(Exception, match="client"):
        issue(ca.key, ca.cert, "worker", "w2", admin=True)


def test_the_output_log_keeps_at_most_its_limit(keys: Keys, tmp_path: Path) -> None:
    clock = Clock()
    log = OutputLog(load_credential(keys.worker, "worker"), clock, str(tmp_path / "out"),
                    1000, "peer")
    heard: list[int] = []
    log.watchers.add(lambda: heard.append(1))
    for _ in range(30):
        log.send(wire.Data(1, b"y" * 100))
    assert (tmp_path / "out").stat().st_size <= 1000
    frames = wire.FrameDecoder().feed((tmp_path / "out").read_bytes())
    kept = b"".join(f.payload for f in frames if isinstance(f, wire.Data))
    assert kept == b"y" * len(kept) and len(kept) + log.dropped == 3000 and heard
    assert log.dropped >= 2000
    log.send(wire.Exit(None, 9))
    assert log.exit == wire.Exit(None, 9) and log.fd is None
    log.send(wire.Data(1, b"late"))  # after the end: counted, never written
    assert (tmp_path / "out").stat().st_size <= 1000
