"""The one ExecRequest: built in one place (rexnet.cli.request) from what the launcher and
the full command line read, with real descriptors, environment and configuration files;
the Record it is made of; and the Cluster a request runs on."""

from __future__ import annotations

import contextlib
import io
import math
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Keys
from hypothesis import given, settings
from hypothesis import strategies as st

from rexnet.cli import launcher
from rexnet.cli import main as cli
from rexnet.cli.request import build
from rexnet.client.cluster import Cluster
from rexnet.net.alerts import CRAT_PORT
from rexnet.protocol import exitcodes
from rexnet.protocol.record import Record
from rexnet.protocol.request import DEFAULT_ANNOUNCE, DEFAULT_TIMEOUT, ExecRequest, RequestError
from rexnet.security.credentials import load_credential
from rexnet.security.revocation import RevokedFile


def options(keyfile: str, **given: object) -> dict[str, object]:
    return {"keyfile": keyfile, **given}


def refused(opts: dict[str, object], environ: dict[str, str] | None = None) -> RequestError:
    with pytest.raises(RequestError) as info:
        build(opts, {} if environ is None else environ)
    return info.value


# -- Record -------------------------------------------------------------------------------


class Point(Record):
    x: int
    y: int = 0
    tags: tuple[str, ...] = ()


def test_a_record_is_a_frozen_value() -> None:
    p = Point(1, tags=("a",))
    assert p == Point(x=1, y=0, tags=("a",)) and hash(p) == hash(Point(1, 0, ("a",)))
    assert p != Point(2) and p.replace(y=5) == Point(1, 5, ("a",)) and p.y == 0
    assert repr(p) == "Point(x=1, y=0, tags=('a',))"
    with pytest.raises(AttributeError, match="frozen"):
        p.x = 2  # type: ignore[misc]
    with pytest.raises(TypeError, match="missing argument 'x'"):
        Point()  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="'z'"):
        Point(1, z=2)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        Point(1, x=2)  # type: ignore[misc]


# -- building a request ---------------------------------------------------------------------


def test_defaults_and_the_announce_fallback(tmp_path: Path) -> None:
    key = str(tmp_path / "app.client")
    Path(key).touch()
    plain = build(options(key, no_tty=True), {})
    assert plain == ExecRequest(keyfile=key, keypath=key, announce=(DEFAULT_ANNOUNCE,),
                                timeout=DEFAULT_TIMEOUT, cwd=os.getcwd())
    assert build(options(key, no_tty=True), {"GROUP": "239.1.2.3"}).announce == ("239.1.2.3",)
    given = build(options(key, no_tty=True, announce=["h:1", "k"]), {"GROUP": "239.1.2.3"})
    assert given.announce == ("h:1", "k")


def test_a_relative_keyfile_and_revocation_list_become_absolute(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("app.client").touch()
    request = build(options("./app.client", no_tty=True, revoked="lists/app.revoked"), {})
    assert request.keyfile == "./app.client"
    assert request.keypath == str(tmp_path / "app.client")
    assert request.revoked == str(tmp_path / "lists" / "app.revoked")


@pytest.fixture
def pipes() -> Iterator[tuple[int, int, int]]:
    """A pipe's read end, its write end, and a socket: real descriptors to carry."""
    r, w = os.pipe()
    a, b = socket.socketpair()
    yield r, w, a.fileno()
    for fd in (r, w):
        os.close(fd)
    a.close()
    b.close()


def test_descriptor_modes_come_from_the_descriptors(tmp_path: Path,
                                                    pipes: tuple[int, int, int]) -> None:
    r, w, s = pipes
    request = build(options("k/x", no_tty=True, fd=[r, w, s, r]), {})
    assert request.fds == ((r, "r"), (w, "w"), (s, "rw"))
    closed = max(pipes) + 50
    assert refused(options("k/x", no_tty=True, fd=[closed])).message == (
        f"--fd {closed}: descriptor {closed} is not open")
    low = refused(options("k/x", no_tty=True, fd=[2]))
    assert (low.message, low.exit_code) == (
        "--fd 2: use descriptors 3 to 255 (0, 1 and 2 always go)", exitcodes.USAGE)
    assert refused(options("k/x", tty=True, fd=[r])).message == (
        "--fd cannot be combined with a terminal; add -T")
    assert refused(options("k/x", tty=True, no_tty=True)).message == (
        "-t and -T contradict each other")


def test_environment_and_terminal() -> None:
    request = build(options("k/x", tty=True, env=["A=1", "HOME", "UNSET", "B=x=y"]),
                    {"HOME": "/h", "TERM": "xterm"})
    assert request.env == (("A", "1"), ("HOME", "/h"), ("B", "x=y"))
    assert request.tty and request.term == "xterm" and not request.raw  # stdin: no terminal
    assert build(options("k/x", no_tty=True), {"TERM": "xterm"}).term == ""
    for spec in ("=1", "A\0B"):
        error = refused(options("k/x", no_tty=True, env=[spec]))
        assert error.message == f"--env {spec!r}: use NAME=VALUE or NAME"


@pytest.mark.parametrize(("timeout", "message"), [
    (0.0, "--timeout must be positive"), (-1.0, "--timeout must be positive"),
    (math.nan, "--timeout must be positive"), (1e10, "--timeout must be at most 1e+09 seconds"),
])
def test_bad_timeouts(timeout: float, message: str) -> None:
    error = refused(options("k/x", no_tty=True, timeout=timeout))
    assert (error.message, error.exit_code) == (message, exitcodes.USAGE)


def test_an_application_of_the_configuration(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "rexnet.toml"
    config.write_text('[applications.ogg]\ncredential = "keys/ogg.client"\n'
                      'announce = ["10.0.0.255:3010"]\nalerts = ["10.0.0.9"]\ntimeout = 5\n')
    monkeypatch.setenv("REXNET_CONFIG", str(config))
    monkeypatch.chdir(tmp_path)
    request = build(options("ogg", no_tty=True), {})
    assert request.keyfile == request.keypath == str(tmp_path / "keys" / "ogg.client")
    assert (request.announce, request.alerts, request.timeout) == (
        ("10.0.0.255:3010",), ("10.0.0.9",), 5.0)
    mine = build(options("ogg", no_tty=True, announce=["h"], timeout=2.0), {})
    assert (mine.announce, mine.alerts, mine.timeout) == (("h",), ("10.0.0.9",), 2.0)
    unknown = refused(options("vorbis", no_tty=True))
    assert unknown.exit_code == exitcodes.CREDENTIAL
    assert unknown.message.startswith("no such credential file: vorbis, nor an application "
                                      f"[applications.vorbis] in {config}")
    config.write_text("[applications.ogg]\ncredential = 3\n")
    broken = refused(options("ogg", no_tty=True))
    assert broken.exit_code == exitcodes.CONFIG and broken.message.startswith(f"{config}:2:")


TOKENS = st.sampled_from(["-v", "-T", "-t", "--timeout=2", "--timeout", "0", "nan", "-a",
                          "h:1", "--alerts=c", "--fd", "3", "--fd=255", "-eA=1", "-e", "HOME",
                          "--env==x", "--revoked=r", "--", "dir/key", "dir/key", "x", "-vT"])


def argparse_options(tokens: list[str]) -> dict[str, object] | None:
    try:
        with (contextlib.redirect_stderr(io.StringIO()),
              contextlib.redirect_stdout(io.StringIO())):
            return vars(cli.parser().parse_args(["exec", *tokens]))
    except SystemExit:
        return None


def built(opts: dict[str, object]) -> ExecRequest | tuple[str, int]:
    try:
        return build(opts, {"HOME": "/h", "TERM": "t"})
    except RequestError as e:
        return e.message, e.exit_code


@settings(max_examples=500)
@given(st.lists(TOKENS, max_size=8))
def test_the_launcher_and_the_full_command_line_build_the_same_request(
        tokens: list[str]) -> None:
    """Whatever the launcher reads, the full command line (--no-agent, and its error
    messages) makes the same request of it, or refuses it in the same words."""
    ours = launcher.parse(tokens)
    if ours is None:
        return
    theirs = argparse_options(tokens)
    assert theirs is not None
    assert built(ours) == built(theirs), tokens


# -- the cluster of a request ---------------------------------------------------------------


def test_the_cluster_of_a_request(keys: Keys) -> None:
    path = str(keys.client)
    request = ExecRequest(keyfile="app.client", keypath=path, announce=("10.1.2.255", "h:99"))
    cluster = Cluster.for_request(request)
    assert cluster.credential.name == load_credential(keys.client, "client").name
    assert cluster.targets == (("10.1.2.255", 3010), ("h", 99))
    assert cluster.alert_targets == (("10.1.2.255", CRAT_PORT), ("h", CRAT_PORT))
    assert cluster.timeout == DEFAULT_TIMEOUT
    # APP.revoked beside the credential is watched even before it exists (nothing revoked)
    assert isinstance(cluster.revoked, RevokedFile)
    assert cluster.revoked.path == keys.client.parent / f"{keys.app}.revoked"
    assert not cluster.revoked.revoked().serials
    alerted = Cluster.for_request(request.replace(alerts=("crat:1",), timeout=3.0))
    assert alerted.alert_targets == (("crat", 1),) and alerted.timeout == 3.0


def test_a_cluster_refuses_in_the_words_of_the_command_line(keys: Keys,
                                                            tmp_path: Path) -> None:
    good = ExecRequest(keyfile="app.client", keypath=str(keys.client), announce=("h",))
    for request, message in [
        (good.replace(announce=("nowhere:99999",)), "--announce: bad address "),
        (good.replace(alerts=("crat:x",)), "--alerts: bad port in 'crat:x'"),
    ]:
        with pytest.raises(RequestError, match=message) as info:
            Cluster.for_request(request)
        assert info.value.exit_code == exitcodes.USAGE
    unsafe = tmp_path / "unsafe.client"
    unsafe.write_bytes(keys.client.read_bytes())
    unsafe.chmod(0o644)
    with pytest.raises(RequestError) as info:
        Cluster.for_request(good.replace(keyfile="u.client", keypath=str(unsafe)))
    assert info.value.exit_code == exitcodes.CREDENTIAL
    assert "u.client" in info.value.message and str(unsafe) not in info.value.message


def test_the_python_api_cluster(keys: Keys, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GROUP", "239.9.9.9")
    cluster = Cluster.build(keys.client)
    assert cluster.targets == (("239.9.9.9", 3010),)
    assert cluster.alert_targets == (("239.9.9.9", CRAT_PORT),)
    assert Cluster.build(keys.client, [("h", 5)], alerts=[]).alert_targets == ()
    with pytest.raises(ValueError, match="bad port"):
        Cluster.build(keys.client, ["h:x"])
    with pytest.raises(ValueError, match=r"^timeout must be positive"):
        Cluster.build(keys.client, timeout=0)
