"""The installed `rexnet` and `cexec` console scripts, run as real processes: keygen, help,
version, and exec refusing bad credentials before it sends anything."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Keys

from rexnet.protocol import exitcodes
from rexnet.security.credentials import load_ca, load_credential

BIN = Path(sys.executable).parent
REXNET = BIN / "rexnet"
CEXEC = BIN / "cexec"


def run(*args: str | Path, program: Path = REXNET, cwd: Path | None = None
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(program), *map(str, args)], capture_output=True, text=True, timeout=60,
        cwd=cwd, stdin=subprocess.DEVNULL,
    )


def one_line_error(proc: subprocess.CompletedProcess[str], code: int) -> str:
    """Assert PROC failed with CODE and exactly one 'rexnet:' line; return that line."""
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("rexnet: ")
    assert proc.stdout == ""
    return lines[0]


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- keygen ---------------------------------------------------------------------------


def test_keygen_writes_credentials(tmp_path: Path) -> None:
    out = tmp_path / "keys"
    proc = run("keygen", "myapp", "--dir", out)

    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert proc.stdout == (
        f"wrote {out}/myapp.ca (keep it with the administrator), {out}/myapp.worker "
        f"(for workers), {out}/myapp.client (for clients), {out}/myapp.ca.pem (the CA "
        "certificate, for crat and cproxy)\n"
    )
    assert sorted(p.name for p in out.iterdir()) == [
        "myapp.ca", "myapp.ca.pem", "myapp.client", "myapp.issued", "myapp.worker"]
    assert all(mode_of(p) == 0o600 for p in out.iterdir() if p.suffix != ".pem")
    assert mode_of(out / "myapp.ca.pem") == 0o644  # the CA certificate alone: public
    assert load_ca(out / "myapp.ca").app == "myapp"
    assert load_credential(out / "myapp.worker", "worker").app == "myapp"
    assert load_credential(out / "myapp.client", "client").app == "myapp"


def test_keygen_defaults_to_the_current_directory(tmp_path: Path) -> None:
    proc = run("keygen", "myapp", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "myapp.ca", "myapp.ca.pem", "myapp.client", "myapp.issued", "myapp.worker"
    ]


def test_keygen_days(tmp_path: Path) -> None:
    proc = run("keygen", "myapp", "--dir", tmp_path, "--days", "2")
    assert proc.returncode == 0, proc.stderr
    cert = load_credential(tmp_path / "myapp.client", "client").cert
    assert (cert.not_valid_after_utc - cert.not_valid_before_utc).days == 2


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    """A directory with freshly made credentials of 'myapp'."""
    assert run("keygen", "myapp", "--dir", tmp_path).returncode == 0
    return tmp_path


@pytest.mark.parametrize("role", ["client", "worker"])
def test_issue_writes_a_named_credential(app_dir: Path, role: str) -> None:
    proc = run("keygen", "--issue", role, "--name", "alice", app_dir / "myapp.ca")

    path = app_dir / f"myapp.alice.{role}"
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"wrote {path} ({role} credential 'alice' of myapp)\n"
    assert mode_of(path) == 0o600
    cred = load_credential(path, role)  # type: ignore[arg-type]
    assert (cred.app, cred.role, cred.name) == ("myapp", role, "alice")
    assert cred.ca_cert == load_ca(app_dir / "myapp.ca").cert


def test_issue_with_dir_and_out(app_dir: Path, tmp_path_factory: pytest.TempPathFactory
                                ) -> None:
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    assert run("keygen", "--issue", "client", "--name", "bob", "--dir", elsewhere,
               app_dir / "myapp.ca").returncode == 0
    assert load_credential(elsewhere / "myapp.bob.client", "client").name == "bob"

    out = elsewhere / "carol.key"
    assert run("keygen", "--issue", "worker", "--name", "carol", "--out", out,
               app_dir / "myapp.ca").returncode == 0
    assert mode_of(out) == 0o600
    assert load_credential(out, "worker").name == "carol"


def test_issue_without_name_is_a_usage_error(app_dir: Path) -> None:
    proc = run("keygen", "--issue", "client", app_dir / "myapp.ca")
    assert one_line_error(proc, exitcodes.USAGE) == "rexnet: --issue needs --name NAME"
    assert not list(app_dir.glob("myapp.*.client"))


def test_issue_refuses_to_overwrite(app_dir: Path) -> None:
    ca = app_dir / "myapp.ca"
    assert run("keygen", "--issue", "client", "--name", "alice", ca).returncode == 0
    before = (app_dir / "myapp.alice.client").read_bytes()

    line = one_line_error(run("keygen", "--issue", "client", "--name", "alice", ca),
                          exitcodes.CREDENTIAL)
    assert "already exists" in line
    assert (app_dir / "myapp.alice.client").read_bytes() == before


def test_keygen_refuses_to_overwrite(app_dir: Path) -> None:
    before = {p: p.read_bytes() for p in app_dir.iterdir()}

    line = one_line_error(run("keygen", "myapp", "--dir", app_dir), exitcodes.CREDENTIAL)
    assert line == (f"rexnet: {app_dir}/myapp.ca already exists; remove it first or use "
                    "another --dir")
    assert {p: p.read_bytes() for p in app_dir.iterdir()} == before


@pytest.mark.parametrize("app", ["My-App", "x-", "a/b", "a" * 62, ""])
def test_bad_app_name(tmp_path: Path, app: str) -> None:
    line = one_line_error(run("keygen", app, "--dir", tmp_path), exitcodes.CREDENTIAL)
    assert line.startswith(f"rexnet: bad application name {app!r}")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["../x", "a b", "-x", "a" * 65])
def test_bad_holder_name(app_dir: Path, name: str) -> None:
    before = sorted(app_dir.iterdir())
    line = one_line_error(run("keygen", "--issue", "client", f"--name={name}",
                              app_dir / "myapp.ca"), exitcodes.CREDENTIAL)
    assert line.startswith(f"rexnet: bad credential name {name!r}")
    assert sorted(app_dir.iterdir()) == before


@pytest.mark.parametrize("days", ["0", "-1", "36501", "99999999"])
def test_bad_days(tmp_path: Path, days: str) -> None:
    line = one_line_error(run("keygen", "myapp", "--dir", tmp_path, "--days", days),
                          exitcodes.USAGE)
    assert line == "rexnet: --days must be between 1 and 36500"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("option", [["--name", "alice"], ["--out", "x"]])
def test_name_and_out_need_issue(tmp_path: Path, option: list[str]) -> None:
    line = one_line_error(run("keygen", "myapp", "--dir", tmp_path, *option), exitcodes.USAGE)
    assert line == "rexnet: --name and --out go with --issue"
    assert list(tmp_path.iterdir()) == []


def test_dir_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    line = one_line_error(run("keygen", "myapp", "--dir", tmp_path / "file"),
                          exitcodes.CREDENTIAL)
    assert line.startswith(f"rexnet: cannot create directory {tmp_path}/file")


def ca_problem(app_dir: Path, problem: str) -> Path:
    """A CA path in APP_DIR with PROBLEM."""
    ca = app_dir / "myapp.ca"
    if problem == "missing":
        return app_dir / "nothere.ca"
    if problem == "directory":
        return app_dir
    if problem == "group-readable":
        ca.chmod(0o640)
    elif problem == "world-readable":
        ca.chmod(0o604)
    elif problem == "corrupt":
        ca.write_bytes(os.urandom(300))
    elif problem == "truncated":
        ca.write_bytes(ca.read_bytes()[:200])
    elif problem == "empty":
        ca.write_bytes(b"")
    elif problem == "worker-file":
        return app_dir / "myapp.worker"
    elif problem == "client-file":
        return app_dir / "myapp.client"
    return ca


@pytest.mark.parametrize(
    ("problem", "says"),
    [
        ("missing", "no such credential file"),
        ("directory", "is not a regular file"),
        ("group-readable", "is readable by group or others (mode 0640)"),
        ("world-readable", "is readable by group or others (mode 0604)"),
        ("corrupt", "is not a rexnet credential (corrupt"),
        ("truncated", "is not a rexnet credential (corrupt"),
        ("empty", "is not a rexnet credential (corrupt"),
        ("worker-file", "is not an application CA file"),
        ("client-file", "is not an application CA file"),
    ],
)
def test_issue_with_a_bad_ca_file(app_dir: Path, problem: str, says: str) -> None:
    ca = ca_problem(app_dir, problem)
    before = sorted(app_dir.iterdir())

    line = one_line_error(run("keygen", "--issue", "client", "--name", "alice", ca),
                          exitcodes.CREDENTIAL)
    assert says in line
    assert sorted(app_dir.iterdir()) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_issue_with_an_unreadable_ca_file(app_dir: Path) -> None:
    (app_dir / "myapp.ca").chmod(0)
    line = one_line_error(run("keygen", "--issue", "client", "--name", "alice",
                              app_dir / "myapp.ca"), exitcodes.CREDENTIAL)
    assert "cannot read" in line


# -- help and version -----------------------------------------------------------------


def test_help() -> None:
    proc = run("--help")
    assert proc.returncode == 0
    assert proc.stdout.startswith("usage: rexnet")
    for word in ("keygen", "exec", "rexnet-worker"):
        assert word in proc.stdout


def test_keygen_help() -> None:
    proc = run("keygen", "--help")
    assert proc.returncode == 0
    for word in ("--issue", "--name", "--dir", "--out", "--days", "APP.ca"):
        assert word in proc.stdout


@pytest.mark.parametrize(("program", "args"), [(REXNET, ["exec", "--help"]), (CEXEC, ["--help"])])
def test_exec_help_lists_exit_codes(program: Path, args: list[str]) -> None:
    proc = run(*args, program=program)
    assert proc.returncode == 0
    assert "KEYFILE" in proc.stdout
    assert "--announce" in proc.stdout
    for code, text in exitcodes.DESCRIPTIONS.items():
        assert f"{code}  {text}" in proc.stdout
    assert sorted(exitcodes.DESCRIPTIONS) == list(range(246, 256))


def test_version() -> None:
    from rexnet import __version__

    proc = run("--version")
    assert proc.returncode == 0
    assert proc.stdout == f"rexnet {__version__}\n"


@pytest.mark.parametrize(
    "args", [[], ["frobnicate"], ["keygen"], ["keygen", "--issue", "ca", "x"],
             ["keygen", "x", "--days", "many"], ["exec"]],
)
def test_bad_command_lines_exit_with_usage(args: list[str]) -> None:
    proc = run(*args)
    assert proc.returncode == exitcodes.USAGE
    assert "Traceback" not in proc.stderr
    assert "error:" in proc.stderr


# -- exec refuses bad credentials before announcing -----------------------------------


@pytest.fixture
def announce_listener() -> Iterator[socket.socket]:
    """A UDP socket on the loopback that exec is told to announce to."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.setblocking(False)
        yield sock


@pytest.mark.parametrize("program", [REXNET, CEXEC])
@pytest.mark.parametrize("problem", ["group-readable", "world-readable", "missing", "worker",
                                     "ca", "corrupt"])
def test_exec_with_a_bad_credential(keys: Keys, tmp_path: Path, program: Path, problem: str,
                                    announce_listener: socket.socket) -> None:
    path = tmp_path / "testapp.client"
    if problem in ("group-readable", "world-readable"):
        shutil.copyfile(keys.client, path)
        path.chmod(0o640 if problem == "group-readable" else 0o604)
    elif problem == "worker":
        path = keys.worker
    elif problem == "ca":
        path = keys.ca
    elif problem == "corrupt":
        path.write_bytes(b"garbage")
        path.chmod(0o600)
    port = announce_listener.getsockname()[1]
    args: list[str | Path] = ["--announce", f"127.0.0.1:{port}", "--timeout", "2", path, "arg"]
    if program == REXNET:
        args.insert(0, "exec")

    line = one_line_error(run(*args, program=program), exitcodes.CREDENTIAL)
    assert str(path) in line
    with pytest.raises(BlockingIOError):  # nothing was announced
        announce_listener.recv(2048)
