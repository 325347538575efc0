"""Command workers, placement and $GROUP, unit by unit: the allow-list and its path tricks,
the job's directory, the new wire fields and their bounds, a worker's choice of the
announcements it answers (--cpus, --mem, --worker) on a fake clock, status --best, --all's
line prefixes, and the daemons' --join / $GROUP options."""

from __future__ import annotations

import socket
import stat
from pathlib import Path

import pytest
from conftest import Keys
from twisted.internet.task import Clock
from twisted.python import usage

from rexnet.client.everywhere import LineTagger, Outcome, highest
from rexnet.client.status import Seen, best
from rexnet.crat import tap as crat_tap
from rexnet.net.announce import now_ms
from rexnet.net.groups import env_groups, join, joined, multicast_group
from rexnet.protocol import exitcodes, wire
from rexnet.protocol.request import ExecRequest, parse_size
from rexnet.relay import cproxy_tap
from rexnet.security.credentials import load_credential
from rexnet.worker import tap as worker_tap
from rexnet.worker.commands import CommandPolicy, CommandRefused
from rexnet.worker.load import HostLoad
from rexnet.worker.machine import Refusal
from rexnet.worker.placement import place
from rexnet.worker.service import Worker, WorkerSettings

# -- the allow-list ----------------------------------------------------------------------


@pytest.fixture
def bins(tmp_path: Path) -> tuple[Path, Path]:
    """Two directories of executables: the worker's PATH (cc, sh, oggenc) and one a client
    might point at (its own cc and sh)."""
    trusted, evil = tmp_path / "bin", tmp_path / "evil"
    for directory in (trusted, evil):
        directory.mkdir()
        for name in ("cc", "sh", "oggenc"):
            program = directory / name
            program.write_text("#!/bin/sh\n")
            program.chmod(program.stat().st_mode | stat.S_IXUSR)
    return trusted, evil


def policy(trusted: Path, *patterns: str, any_command: bool = False) -> CommandPolicy:
    return CommandPolicy(patterns, any_command, str(trusted))


def test_a_name_is_allowed_by_a_name_pattern_and_resolved_by_the_worker(
        bins: tuple[Path, Path]) -> None:
    trusted, _ = bins
    p = policy(trusted, "cc", "ogg*")
    assert p.resolve("cc") == str(trusted / "cc")
    assert p.resolve("oggenc") == str(trusted / "oggenc")
    refused = p.resolve("sh")
    assert isinstance(refused, CommandRefused) and refused.reason == "command"
    assert "not an allowed command" in refused.message and "cc, ogg*" in refused.message


def test_path_tricks_do_not_pass_a_name_pattern(bins: tuple[Path, Path]) -> None:
    trusted, evil = bins
    p = policy(trusted, "cc")
    for trick in ("../bin/sh", "./cc", "bin/cc", str(evil / "cc"), f"{trusted}/../evil/cc",
                  f"/{trusted}/cc", f"{trusted}/./cc", ""):
        outcome = p.resolve(trick)
        assert isinstance(outcome, CommandRefused), trick
        assert outcome.reason == "command", trick
    # the very path the worker's own lookup gives is the allowed name
    assert p.resolve(str(trusted / "cc")) == str(trusted / "cc")


def test_an_absolute_pattern_matches_the_absolute_path(bins: tuple[Path, Path]) -> None:
    trusted, evil = bins
    p = policy(trusted, f"{trusted}/*")
    assert p.resolve("sh") == str(trusted / "sh")  # the name resolves inside the pattern
    assert p.resolve(str(trusted / "oggenc")) == str(trusted / "oggenc")
    assert isinstance(p.resolve(str(evil / "sh")), CommandRefused)
    assert isinstance(p.resolve(f"{trusted}/../evil/sh"), CommandRefused)


def test_the_clients_path_never_finds_the_program(bins: tuple[Path, Path],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    trusted, evil = bins
    monkeypatch.setenv("PATH", str(evil))  # the worker's own PATH, read when it started
    p = CommandPolicy.of(("cc",), False, {"PATH": str(trusted)})
    assert p.resolve("cc") == str(trusted / "cc")


def test_not_found_and_any_command(bins: tuple[Path, Path]) -> None:
    trusted, evil = bins
    missing = policy(trusted, "gcc*").resolve("gcc-99")
    assert isinstance(missing, CommandRefused) and missing.reason == "not-found"
    anything = policy(trusted, any_command=True)
    assert anything.resolve("sh") == str(trusted / "sh")
    assert anything.resolve(str(evil / "sh")) == str(evil / "sh")
    assert anything.resolve("./configure") == "./configure"  # the client's to choose
    assert not CommandPolicy().enabled and anything.enabled


def test_place_the_job_argv_and_directory(bins: tuple[Path, Path], tmp_path: Path) -> None:
    trusted, _ = bins
    p = policy(trusted, "cc")
    here = str(tmp_path)
    assert place(p, (), wire.Start(("cc", "-c", "x.c"), cwd=here), None, "w") == (
        [str(trusted / "cc"), "-c", "x.c"], here)
    # the client's directory is missing here: the worker's own, unless --cwd required it
    assert place(p, (), wire.Start(("cc",), cwd="/no/such/dir"), "/tmp", "w") == (
        [str(trusted / "cc")], "/tmp")
    missing = place(p, (), wire.Start(("cc",), cwd="/no/such/dir", cwd_required=True),
                    None, "w")
    assert missing == Refusal("cwd", "worker w has no directory /no/such/dir")
    nothing = place(p, (), wire.Start((), cwd=here), None, "w")
    assert isinstance(nothing, Refusal) and nothing.reason == "command"
    # a fixed COMMAND ignores the client's directory and refuses a required one
    fixed = CommandPolicy()
    assert place(fixed, ("cat",), wire.Start(("-n",), cwd=here), "/srv", "w") == (
        ["cat", "-n"], "/srv")
    refused = place(fixed, ("cat",), wire.Start((), cwd=here, cwd_required=True), None, "w")
    assert isinstance(refused, Refusal) and refused.reason == "cwd"


# -- the wire ---------------------------------------------------------------------------


def test_start_and_started_carry_the_new_fields() -> None:
    start = wire.Start(("cc", "-c"), cwd="/src", cwd_required=True, cpus=4, mem=8 << 30,
                       workers=("w1", "w2"))
    [back] = wire.FrameDecoder().feed(wire.encode_frame(start))
    assert back == start
    started = wire.Started("j1", (), "/src")
    assert wire.FrameDecoder().feed(wire.encode_frame(started)) == [started]
    plain = wire.Start(("x",))
    assert b"cwd" not in wire.encode_frame(plain)  # defaults are not sent


@pytest.mark.parametrize("body", [
    b'{"cwd":"relative/dir"}', b'{"cwd":"/a\\u0000b"}', b'{"cwd_required":1}',
    b'{"cpus":0}', b'{"cpus":5000}', b'{"mem":-1}', b'{"workers":"w1"}',
    b'{"workers":["a","b","c","d","e","f","g","h","i"]}', b'{"workers":["' + b"x" * 65 + b'"]}',
])
def test_start_refuses_bad_placement(body: bytes) -> None:
    frame = wire.FRAME_HEADER.pack(wire.FrameKind.START, 0, len(body)) + body
    with pytest.raises(wire.WireError):
        wire.FrameDecoder().feed(frame)


def test_the_announcement_carries_cpus_mem_and_workers(keys: Keys) -> None:
    cred = load_credential(keys.client, "client")
    ann = wire.Announce(b"\1" * 16, 0, 5, 9, ("127.0.0.1",), 2, 3 << 30, ("w1",))
    data = wire.encode_datagram(ann, cred.app_id, cred.key, cred.cert_der)
    assert wire.decode_datagram(data).message == ann
    old = wire.Announce(b"\1" * 16, 0, 5, 9, ("127.0.0.1",))
    assert set(old.body()) == {"job", "seq", "ts", "port", "addrs"}  # as before


def test_request_bounds_and_sizes() -> None:
    ExecRequest(cwd="/d", cwd_required=True, cpus=2, mem=1, workers=("w",)).check()
    for bad in (ExecRequest(cwd="d"), ExecRequest(cwd_required=True), ExecRequest(cpus=0),
                ExecRequest(workers=("",)), ExecRequest(workers=tuple("abcdefghi"))):
        with pytest.raises(ValueError):
            bad.check()
    assert parse_size("8G") == 8 << 30 and parse_size("512m") == 512 << 20
    assert parse_size("1.5GiB") == 3 << 29 and parse_size("100") == 100
    for bad_size in ("", "G", "-1", "nan", "lots"):
        with pytest.raises(ValueError, match="bad size"):
            parse_size(bad_size)


# -- a worker's choice on a fake clock --------------------------------------------------


def announce(keys: Keys, job: int, cpus: int = 1, mem: int = 0,
             workers: tuple[str, ...] = ()) -> tuple[bytes, bytes]:
    cred = load_credential(keys.client, "client")
    job_id = job.to_bytes(16, "big")
    ann = wire.Announce(job_id, 0, now_ms(), 4000, ("192.0.2.7",), cpus, mem, workers)
    return job_id, wire.encode_datagram(ann, cred.app_id, cred.key, cred.cert_der)


def test_a_worker_answers_only_jobs_that_fit(keys: Keys) -> None:
    settings = WorkerSettings(load_credential(keys.worker, "worker"), ("true",), "w1", slots=4)
    host = HostLoad(loadavg=0.0, cpus=4, free_memory=2 << 30)
    worker = Worker(settings, Clock(), sample=lambda: host, jitter=lambda: 0.0)
    source = "192.0.2.7"
    for number, kwargs, answered in [
        (1, {"workers": ("w2",)}, False), (2, {"workers": ("w2", "w1")}, True),
        (3, {"mem": 4 << 30}, False), (4, {"mem": 1 << 30}, True),
        (5, {"cpus": 3}, False),  # 2 slots held by jobs 2 and 4
        (6, {"cpus": 2}, True),
    ]:
        job, data = announce(keys, number, **kwargs)  # type: ignore[arg-type]
        worker.datagram(data, source, 5000)
        assert (job in worker.pending) == answered, (number, kwargs)
    assert worker.busy == 4  # 1 + 1 + 2
    # job 4's memory is reserved while its connect-back is pending
    job, data = announce(keys, 7, mem=1536 << 20)
    worker.connect_backs.release(worker.pending[(6).to_bytes(16, "big")])
    worker.datagram(data, source, 5000)
    assert job not in worker.pending
    assert worker.fits(1, 0, ()) is None
    assert worker.free_slot(wire.Start(cpus=3)) is False
    assert worker.free_slot(wire.Start(cpus=2)) is True
    assert worker.free_slot(wire.Start(workers=("other",))) is False


# -- status --best and --all's output --------------------------------------------------


def seen(name: str, load: float, used: int, slots: int = 2, memory: int = 1 << 30,
         delay: float = -1.0) -> Seen:
    reply = wire.StatusReply(b"\0" * 16, 0, name, "v", load, 2, 1.0, slots, used, memory,
                             0, 1.0, used, delay)
    return Seen(reply, "192.0.2.1", 0.0)


def test_best_is_the_first_to_answer_among_those_with_room() -> None:
    workers = [seen("busy", 0.1, 2), seen("slow", 0.9, 0, delay=41.0),
               seen("quick", 0.5, 1, delay=25.0), seen("small", 0.0, 0, memory=1 << 20)]
    assert best(workers) is not None and best(workers).reply.worker == "small"  # type: ignore[union-attr]
    assert best(workers, mem=1 << 29).reply.worker == "quick"  # type: ignore[union-attr]
    assert best(workers, cpus=2, mem=1 << 29).reply.worker == "slow"  # type: ignore[union-attr]
    assert best(workers, cpus=3) is None
    body = seen("x", 0.1, 1).reply.body()
    del body["used"], body["delay_ms"]  # a worker that does not say: its running jobs
    assert wire.StatusReply.from_body(body).slots_used == 1


def test_lines_are_prefixed_with_the_workers_name() -> None:
    written: list[bytes] = []
    tagger = LineTagger(b"w1: ", written.append)
    tagger.write(b"one\ntw")
    tagger.write(b"o\nthree")
    tagger.flush()
    tagger.flush()
    assert b"".join(written) == b"w1: one\nw1: two\nw1: three\n"
    long: list[bytes] = []
    LineTagger(b"x: ", long.append).write(b"y" * (64 * 1024 * 2 + 1))
    assert b"".join(long).count(b"x: ") == 2  # a line without end is cut, bounded
    assert highest([Outcome("a", 0), Outcome("b", 3), Outcome("c", 1)]) == 3
    assert highest([]) == exitcodes.NO_WORKER


# -- options -----------------------------------------------------------------------------


def parse_worker(*argv: str) -> worker_tap.Options:
    options = worker_tap.Options()
    options.parseOptions(list(argv))
    return options


def test_worker_command_options(keys: Keys) -> None:
    o = parse_worker("--commands", "cc", "--commands", "/usr/bin/*", str(keys.worker))
    assert o["commands"] == ["cc", "/usr/bin/*"] and o["command"] == ()
    assert parse_worker("--any-command", str(keys.worker))["any-command"]
    for wrong in (["--commands", "cc", str(keys.worker), "cat"],
                  ["--commands", "cc", "--any-command", str(keys.worker)],
                  ["--commands", "cc", "--python", str(keys.worker)],
                  ["--any-command", "--allow-args", str(keys.worker)],
                  [str(keys.worker)]):
        with pytest.raises(usage.UsageError):
            parse_worker(*wrong)


def test_a_configuration_table_may_name_commands(keys: Keys, tmp_path: Path) -> None:
    config = tmp_path / "rexnet.toml"
    config.write_text(f'[applications.build.worker]\ncredential = "{keys.worker}"\n'
                      'commands = ["cc", "ld"]\nlisten = "127.0.0.1:3999"\n')
    [app], _ = worker_tap.from_config(str(config), [])
    assert app["commands"] == ["cc", "ld"]


def test_group_joins_and_the_GROUP_variable(keys: Keys, monkeypatch: pytest.MonkeyPatch
                                            ) -> None:
    assert multicast_group("239.1.2.3:3010") == "239.1.2.3"
    assert multicast_group("[ff02::1]:3010") == "ff02::1"
    with pytest.raises(ValueError, match="not a multicast group"):
        multicast_group("10.0.0.255")
    assert env_groups({"GROUP": "239.5.5.5"}) == ["239.5.5.5"]
    assert env_groups({"GROUP": "10.0.0.255"}) == [] and env_groups({}) == []
    assert joined(["239.1.1.1"], {"GROUP": "239.5.5.5"}) == ["239.1.1.1"]
    monkeypatch.setenv("GROUP", "239.5.5.5")
    o = parse_worker("--commands", "cc", str(keys.worker))
    assert o["join"] == ["239.5.5.5"] and o["alerts"] == [("239.5.5.5", 3011)]
    crat = crat_tap.Options()
    crat.parseOptions(["--trust", str(keys.ca_pem)])
    assert crat["join"] == ["239.5.5.5"]
    proxy = cproxy_tap.Options()
    proxy.parseOptions(["--announce", "10.9.0.255", "--join", "239.6.6.6", "--trust",
                       str(keys.ca_pem)])
    assert proxy["join"] == ["239.6.6.6"]
    monkeypatch.setenv("GROUP", "10.1.255.255")
    o = parse_worker("--commands", "cc", str(keys.worker))
    assert o["join"] == [] and o["alerts"] == [("10.1.255.255", 3011)]
    with pytest.raises(usage.UsageError, match="--join"):
        crat_tap.Options().parseOptions(["--trust", str(keys.ca_pem), "--join", "10.0.0.1"])


def test_join_makes_a_socket_a_member() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("0.0.0.0", 0))
        join(sock, "239.255.77.1")
        with open("/proc/net/igmp") as f:
            assert "014DFFEF" in f.read().upper()  # 239.255.77.1, little-endian hex
