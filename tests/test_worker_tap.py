"""The twistd rexnet-worker plugin: found by twistd, its options, its service tree, and
refusing bad credentials with one line and exit status 251."""

from __future__ import annotations

import os
import runpy
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import Keys
from twisted.application.service import IServiceMaker, MultiService
from twisted.logger import capturedLogs, formatEvent
from twisted.python import usage

from rexnet.protocol import exitcodes
from rexnet.worker.listener import WorkerService
from rexnet.worker.load import cpu_count
from rexnet.worker.sandbox import SandboxService
from rexnet.worker.tap import Options, makeService

TWISTD = Path(sys.executable).parent / "twistd"
PLUGINS = Path(__file__).parent.parent / "twisted" / "plugins" / "rexnet_plugins.py"
CAT = shutil.which("cat")
SH = shutil.which("sh")


def parse(*args: str) -> Options:
    options = Options()
    options.parseOptions(list(args))
    return options


def twistd(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(TWISTD), *map(str, args)], capture_output=True, text=True, timeout=60, cwd=cwd,
        stdin=subprocess.DEVNULL,
    )


# -- the plugin -----------------------------------------------------------------------


def tapnames() -> list[str]:
    namespace = runpy.run_path(str(PLUGINS))
    return [v.tapname for v in namespace.values() if IServiceMaker.providedBy(v)]


def test_twistd_lists_every_plugin(tmp_path: Path) -> None:
    names = tapnames()
    assert sorted(names) == ["cproxy", "crat", "rexnet-tunnel", "rexnet-worker"]

    proc = twistd("--help", cwd=tmp_path)

    assert proc.returncode == 0, proc.stderr
    listed = {line.split()[0] for line in proc.stdout.splitlines() if line.startswith("    ")}
    for name in names:
        assert name in listed


def test_twistd_plugin_help(tmp_path: Path) -> None:
    proc = twistd("rexnet-worker", "--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for word in ("KEYFILE COMMAND", "--listen", "--join", "--slots", "--speed", "--allow-args"):
        assert word in proc.stdout


# -- options --------------------------------------------------------------------------


def test_defaults(keys: Keys) -> None:
    options = parse(str(keys.worker), "cat")

    assert options["keyfile"] == str(keys.worker)
    assert options["command"] == (CAT,)
    assert options["listen_addr"] == ("0.0.0.0", 3010)
    assert options["slots"] == cpu_count()
    assert options["speed"] == 1.0
    assert options["name"] == socket.gethostname()
    assert options["join"] == []
    assert not options["allow-args"]


def test_every_option(keys: Keys) -> None:
    options = parse("--listen", "127.0.0.1:4000", "--name", "w1", "--speed", "2.5",
                    "--slots", "3", "--join", "239.1.2.3", "--join", "239.1.2.4",
                    "--allow-args", str(keys.worker), "cat")

    assert options["listen_addr"] == ("127.0.0.1", 4000)
    assert options["name"] == "w1"
    assert options["speed"] == 2.5
    assert options["slots"] == 3
    assert options["join"] == ["239.1.2.3", "239.1.2.4"]
    assert options["allow-args"]


def test_join_list_is_not_shared_between_instances(keys: Keys) -> None:
    parse("--join", "239.1.2.3", str(keys.worker), "cat")
    assert parse(str(keys.worker), "cat")["join"] == []


@pytest.mark.parametrize(
    ("listen", "address"),
    [("127.0.0.1:0", ("127.0.0.1", 0)), ("10.0.0.1", ("10.0.0.1", 3010)),
     ("[::1]:5000", ("::1", 5000)), ("[::1]:0", ("::1", 0)), ("::1", ("::1", 3010))],
)
def test_listen(keys: Keys, listen: str, address: tuple[str, int]) -> None:
    assert parse("--listen", listen, str(keys.worker), "cat")["listen_addr"] == address


def test_command_and_its_arguments_are_kept(keys: Keys) -> None:
    options = parse("--slots", "1", str(keys.worker), "sh", "-c", "echo x", "--slots", "9")

    assert options["command"] == (SH, "-c", "echo x", "--slots", "9")
    assert options["slots"] == 1


def test_command_is_made_absolute(keys: Keys, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o755)
    monkeypatch.chdir(tmp_path)

    for given in ("./job.sh", "job.sh"):
        monkeypatch.setenv("PATH", "." if given == "job.sh" else os.environ["PATH"])
        options = parse(str(keys.worker), given, "arg")
        assert options["command"] == (str(script), "arg")


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--speed", "fast"], "--speed must be a number between 0.01 and 1000"),
        (["--speed", "0"], "--speed must be a number between 0.01 and 1000"),
        (["--speed", "1001"], "--speed must be a number between 0.01 and 1000"),
        (["--speed", "nan"], "--speed must be a number between 0.01 and 1000"),
        (["--slots", "0"], "--slots must be a whole number of at least 1"),
        (["--slots", "-2"], "--slots must be a whole number of at least 1"),
        (["--slots", "1.5"], "--slots must be a whole number of at least 1"),
        (["--listen", "127.0.0.1:x"], "bad port in '127.0.0.1:x'"),
        (["--listen", "127.0.0.1:70000"], "bad address '127.0.0.1:70000'"),
        (["--listen", ":3010"], "bad address ':3010'"),
        (["--bogus"], "option --bogus not recognized"),
    ],
)
def test_bad_options(keys: Keys, args: list[str], says: str) -> None:
    with pytest.raises(usage.UsageError) as info:
        parse(*args, str(keys.worker), "cat")
    assert says in str(info.value)


def test_unknown_command(keys: Keys) -> None:
    with pytest.raises(usage.UsageError, match="command not found: no-such-command-here"):
        parse(str(keys.worker), "no-such-command-here")


@pytest.mark.parametrize("args", [[], ["KEYFILE"]])
def test_missing_arguments(args: list[str]) -> None:
    with pytest.raises(usage.UsageError, match="Wrong number of arguments"):
        parse(*args)


# -- the service tree -----------------------------------------------------------------


def test_make_service(keys: Keys) -> None:
    options = parse("--listen", "127.0.0.1:0", "--name", "w1", "--speed", "2", "--slots",
                    "3", "--join", "239.1.2.3", "--allow-args", str(keys.worker),
                    "sh", "-c", "echo x")

    top = makeService(options)

    assert isinstance(top, MultiService)
    children = list(top)
    # a worker started as root sandboxes its jobs: a helper service starts before it
    sandboxes = [c for c in children if isinstance(c, SandboxService)]
    assert len(sandboxes) == (1 if os.geteuid() == 0 else 0)
    assert len(children) == 1 + len(sandboxes)
    service = children[-1]
    assert isinstance(service, WorkerService)
    assert service.worker.settings.sandbox is (sandboxes[0].sandbox if sandboxes else None)
    if sandboxes:  # a spare per slot (at least 2), up to two per slot as jobs outrun them
        assert (sandboxes[0].sandbox.spares, sandboxes[0].sandbox.grow_to) == (3, 6)
    assert not service.running
    s = service.worker.settings
    assert s.credential.path == keys.worker
    assert (s.credential.app, s.credential.role) == ("testapp", "worker")
    assert s.command == (SH, "-c", "echo x")
    assert (s.name, s.slots, s.speed, s.allow_args) == ("w1", 3, 2.0, True)
    assert s.listen == ("127.0.0.1", 0)
    assert s.groups == ("239.1.2.3",)


def bad_worker_file(keys: Keys, tmp_path: Path, problem: str) -> Path:
    if problem == "missing":
        return tmp_path / "BADKEY"
    if problem == "client":
        return keys.client
    if problem == "ca":
        return keys.ca
    path = tmp_path / "testapp.worker"
    shutil.copyfile(keys.worker, path)
    path.chmod(0o640)
    return path


PROBLEMS = {
    "missing": "no such credential file",
    "client": "is a client credential, but a worker credential is needed",
    "ca": "is not a rexnet worker credential",
    "group-readable": "is readable by group or others (mode 0640)",
}


@pytest.mark.parametrize("problem", list(PROBLEMS))
def test_make_service_with_a_bad_credential(keys: Keys, tmp_path: Path, problem: str,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    path = bad_worker_file(keys, tmp_path, problem)
    options = parse("--listen", "127.0.0.1:0", str(path), "cat")

    with pytest.raises(SystemExit) as info:
        makeService(options)

    assert info.value.code == exitcodes.CREDENTIAL
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"rexnet-worker: {path}" if problem != "missing" else
                          "rexnet-worker: no such credential file")
    assert PROBLEMS[problem] in err


# -- under twistd ---------------------------------------------------------------------


@pytest.mark.parametrize("problem", list(PROBLEMS))
def test_twistd_with_a_bad_credential(keys: Keys, tmp_path: Path, problem: str) -> None:
    path = bad_worker_file(keys, tmp_path, problem)
    keyfile = "BADKEY" if problem == "missing" else str(path)

    proc = twistd("-n", "--pidfile=", "rexnet-worker", "--listen", "127.0.0.1:0", keyfile,
                  "cat", cwd=tmp_path)

    assert proc.returncode == exitcodes.CREDENTIAL, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("rexnet-worker: ")
    assert PROBLEMS[problem] in lines[0]
    assert list(tmp_path.glob("twistd.*")) == []


def test_twistd_starts_a_worker(keys: Keys, tmp_path: Path) -> None:
    """A good credential and port 0: the worker starts and says where it listens."""
    proc = subprocess.Popen(
        [str(TWISTD), "-n", "--pidfile=", "rexnet-worker", "--listen", "127.0.0.1:0",
         "--name", "w9", "--slots", "2", str(keys.worker), "cat"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        text=True, cwd=tmp_path,
    )
    watchdog = threading.Timer(30, proc.kill)
    watchdog.start()
    try:
        assert proc.stdout is not None
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if "listening on" in line:
                break
        assert seen, "twistd said nothing"
        assert f"worker w9 serves testapp ({CAT}) with 2 slots" in seen[-1], "".join(seen)
        port = int(seen[-1].rsplit(":", 1)[1])
        assert 0 < port < 65536
    finally:
        proc.terminate()
        rest = proc.communicate(timeout=30)[0]
        watchdog.cancel()
    # twistd ends by re-raising the signal it was stopped with (and a SIGTERM that comes
    # before the reactor installs its handlers just kills it).
    assert proc.returncode in (0, -signal.SIGTERM)
    assert "Traceback" not in "".join(seen) + rest


# -- job isolation ----------------------------------------------------------------------


def test_without_root_the_start_up_log_says_which_isolation_is_missing(
        keys: Keys, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(usage.UsageError, match="--job-users needs a worker started as root"):
        parse("--job-users", "61000-61003", str(keys.worker), "cat")
    options = parse("--listen", "127.0.0.1:0", "--job-pids", "10", str(keys.worker), "cat")
    with capturedLogs() as events:
        top = makeService(options)
    lines = [formatEvent(e) for e in events if "isolation" in formatEvent(e)]
    assert len(lines) == 1
    assert lines[0].startswith("job isolation missing: not started as root")
    assert "PID namespace" in lines[0] and "--job-pids cannot be enforced" in lines[0]
    assert isinstance(top, MultiService)
    assert not any(isinstance(c, SandboxService) for c in top)


def test_job_users_options(keys: Keys) -> None:
    if os.geteuid() != 0:
        pytest.skip("--job-users needs root")
    options = parse("--job-users", "61000-61001", str(keys.worker), "cat")
    assert options["slots"] == min(cpu_count(), 2)  # no more slots than job users
    with pytest.raises(usage.UsageError, match="give one user per slot"):
        parse("--job-users", "61000-61001", "--slots", "3", str(keys.worker), "cat")
    with pytest.raises(usage.UsageError, match="no such user"):
        parse("--job-users", "no-such-rexjob0-1", str(keys.worker), "cat")
    with pytest.raises(usage.UsageError, match="without --no-sandbox"):
        parse("--no-sandbox", "--job-users", "61000", str(keys.worker), "cat")
