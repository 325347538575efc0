"""The launchers (Python and native) before they hand anything to an agent: the socket's
directory and the agent's uid are checked (P10, 1: an attacker's /tmp/rexnet-UID gets
nothing), closed descriptors 0-2 act as /dev/null (P12, 8), and the native launcher sends
the very request the Python one does, or leaves the command line to it."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster import LAUNCHERS, exec_argv, loopback_address, start_worker
from conftest import Keys

from rexnet.agent import paths
from rexnet.cli import entry
from rexnet.protocol import agentwire

JOB = "echo job ran; cat"


@pytest.fixture(scope="module")
def worker(keys: Keys) -> Iterator[str]:
    addr = f"{loopback_address()}:3010"
    proc = start_worker(keys.worker, ["sh", "-c"], addr, "checks", "--allow-args")
    yield addr
    proc.stop()


def need_root() -> None:
    if os.geteuid() != 0 or not shutil.which("unshare"):
        if os.environ.get("CI"):
            pytest.fail("this test needs root and unshare(1)")
        pytest.skip("needs root (another uid, a mount namespace) and unshare(1)")


# An impostor on the agent's socket path, as uid 65534: it reports every connection and
# what came over it (bytes, descriptors) as JSON once its stdin closes. With "mkdir" it
# makes the directory (its own); else the directory exists and it binds as root first,
# then becomes uid 65534 before listen() (which is what SO_PEERCRED reports).
IMPOSTOR = """
import json, os, select, socket, sys
path, how = sys.argv[1], sys.argv[2]
def nobody():
    os.setgroups([]); os.setgid(65534); os.setuid(65534)
if how == "mkdir":
    nobody()
    os.mkdir(os.path.dirname(path), 0o700)
listener = socket.socket(socket.AF_UNIX)
listener.bind(path)
if how != "mkdir":
    nobody()
listener.listen(8)
print("listening", flush=True)
got = []
while True:
    ready, _, _ = select.select([listener, sys.stdin], [], [])
    if sys.stdin in ready:
        break
    conn, _ = listener.accept()
    conn.settimeout(1)
    try:
        data, ancillary, _, _ = conn.recvmsg(1 << 20, socket.CMSG_SPACE(4 * 70))
    except OSError:
        data, ancillary = b"", []
    got.append({"bytes": len(data), "fds": sum(len(a[2]) // 4 for a in ancillary)})
    conn.close()
print(json.dumps(got), flush=True)
"""

# The attack of P10, 1 on the default path: in a mount namespace of its own with a fresh
# /tmp (the real one is left alone; a venv below /tmp is bound back in), uid 65534 makes
# /tmp/rexnet-0 and listens on agent-NETNS.sock in it; then root, with XDG_RUNTIME_DIR
# unset, runs a job.
ATTACK = """
import json, os, subprocess, sys
launcher, keyfile, addr, impostor = sys.argv[1:5]
from rexnet.worker.sandboxd import MS_BIND, MS_REC, mount  # (before /tmp is replaced)
key = open(keyfile, "rb").read()
# a checkout below /tmp (a CI clone) keeps its venv visible through the fresh /tmp
venv = os.path.dirname(os.path.dirname(os.path.abspath(launcher)))
keep = os.open(venv, os.O_PATH | os.O_DIRECTORY) if venv.startswith("/tmp/") else None
subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=1777", "tmpfs", "/tmp"], check=True)
if keep is not None:  # (mount(2) itself: mount(8) would resolve the path in the new /tmp)
    os.makedirs(venv)
    mount(f"/proc/self/fd/{keep}", venv, None, MS_BIND | MS_REC)
os.mkdir("/tmp/victim", 0o700)
with open(os.open("/tmp/victim/app.client", os.O_WRONLY | os.O_CREAT, 0o600), "wb") as f:
    f.write(key)
path = f"/tmp/rexnet-{os.getuid()}/agent-{os.stat('/proc/self/ns/net').st_ino}.sock"
spy = subprocess.Popen([sys.executable, "-c", impostor, path, "mkdir"], stdin=subprocess.PIPE,
                       stdout=subprocess.PIPE)
assert spy.stdout.readline() == b"listening\\n"
env = {k: v for k, v in os.environ.items() if k not in ("XDG_RUNTIME_DIR", "REXNET_AGENT_SOCKET")}
victim = subprocess.run([launcher, "exec", "-a", addr, "/tmp/victim/app.client", "--",
                         "echo job ran; cat"], input=b"secret\\n", capture_output=True,
                        env=env, timeout=60)
spy.stdin.close()
owner = os.lstat(os.path.dirname(path)).st_uid
print(json.dumps({"path": path, "owner": owner, "status": victim.returncode,
                  "stdout": victim.stdout.decode(), "stderr": victim.stderr.decode(),
                  "connections": json.loads(spy.stdout.readline())}))
"""


def test_an_attackers_directory_in_tmp_gets_nothing(keys: Keys, worker: str, launcher: str
                                                    ) -> None:
    need_root()
    done = subprocess.run(["unshare", "--mount", "--propagation", "private", sys.executable,
                           "-c", ATTACK, launcher, str(keys.client), worker, IMPOSTOR],
                          capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    directory = os.path.dirname(result["path"])
    assert directory == f"/tmp/rexnet-{os.getuid()}" and result["owner"] == 65534
    assert result["connections"] == [], "the launcher connected to the impostor"
    assert (f"rexnet: will not use the agent at {result['path']}: {directory} is not a "
            f"directory of this user (uid {os.getuid()}; it belongs to uid 65534); remove "
            "it or set REXNET_AGENT_SOCKET; running without one\n") in result["stderr"]
    # the job still runs, standalone, with its stdin
    assert result["status"] == 0 and result["stdout"] == "job ran\nsecret\n", result


def spy_on(path: Path, how: str) -> subprocess.Popen[bytes]:
    spy = subprocess.Popen([sys.executable, "-c", IMPOSTOR, str(path), how],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert spy.stdout is not None and spy.stdout.readline() == b"listening\n"
    return spy


def connections(spy: subprocess.Popen[bytes]) -> list[dict[str, int]]:
    assert spy.stdin is not None and spy.stdout is not None
    spy.stdin.close()
    found: list[dict[str, int]] = json.loads(spy.stdout.readline())
    spy.wait(10)
    return found


def run_job(keys: Keys, worker: str, launcher: str, *options: str
            ) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(exec_argv(keys.client, [worker], *options, "--", JOB,
                                    rexnet=launcher),
                          input=b"secret\n", capture_output=True, timeout=60)


def test_an_agent_of_another_uid_gets_nothing(keys: Keys, worker: str, launcher: str,
                                              agent_sockets: Path) -> None:
    need_root()
    path = Path(paths.socket_path())
    path.parent.mkdir(mode=0o700)  # our own private directory: only the listener is wrong
    spy = spy_on(path, "bind")
    done = run_job(keys, worker, launcher)
    found = connections(spy)
    # it had to connect to learn the peer's uid, and sent nothing
    assert found and all(c == {"bytes": 0, "fds": 0} for c in found), found
    assert (f"rexnet: will not use the agent at {path}: the process listening there runs as "
            f"uid 65534, not as this user (uid {os.getuid()}); running without one\n"
            ).encode() in done.stderr
    assert done.returncode == 0 and done.stdout == b"job ran\nsecret\n", done.stderr


@pytest.mark.parametrize("how", ["symlink", "0755"])
def test_a_symlinked_or_open_directory_gets_nothing(keys: Keys, worker: str, launcher: str,
                                                    agent_sockets: Path, how: str) -> None:
    path = Path(paths.socket_path())
    if how == "symlink":
        real = agent_sockets / "elsewhere"
        real.mkdir(mode=0o700)  # ours and private: the link alone is refused
        path.parent.symlink_to(real)
        said = f"{path.parent} is a symbolic link; remove it or set REXNET_AGENT_SOCKET"
    else:
        path.parent.mkdir()
        path.parent.chmod(0o755)
        said = f"{path.parent} has mode 0755, not 0700: others may reach its socket"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen(8)
    done = run_job(keys, worker, launcher)
    listener.setblocking(False)
    with pytest.raises(BlockingIOError):
        listener.accept()  # nobody connected
    listener.close()
    assert f"rexnet: will not use the agent at {path}: {said}".encode() in done.stderr
    assert done.returncode == 0 and done.stdout == b"job ran\nsecret\n", done.stderr


@pytest.mark.parametrize("closed", [0, 1, 2])
@pytest.mark.parametrize("agent", ["agent", "no-agent"])
def test_closed_standard_descriptors_act_as_dev_null(keys: Keys, worker: str, launcher: str,
                                                     closed: int, agent: str) -> None:
    if agent == "agent":  # an agent runs (else the native launcher leaves it to Python)
        assert run_job(keys, worker, launcher).returncode == 0
    options = ["--no-agent"] if agent == "no-agent" else []
    argv = exec_argv(keys.client, [worker], *options, "--", "cat; echo out; echo err >&2; "
                     "exit 7", rexnet=launcher)
    done = subprocess.run(["sh", "-c", f'exec "$@" {closed}<&-' if closed == 0 else
                           f'exec "$@" {closed}>&-', "sh", *argv],
                          input=b"in\n", capture_output=True, timeout=60)
    assert done.returncode == 7, done.stderr
    # exactly the job's output: no agent error, no traceback
    assert done.stdout == {0: b"out\n", 1: b"", 2: b"in\nout\n"}[closed], done.stdout
    assert done.stderr == {0: b"err\n", 1: b"err\n", 2: b""}[closed], done.stderr


# -- the native launcher ------------------------------------------------------------------


class FakeAgent:
    """An agent of this uid on a private socket that records what each launcher sends and
    answers with a Say and an Exit."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(mode=0o700)
        self.path = str(directory / "agent.sock")
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(self.path)
        self.listener.listen(8)
        self.received: list[tuple[agentwire.Message, int]] = []
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                decoder = agentwire.Decoder(json.loads)
                messages: list[agentwire.Message] = []
                fds: list[int] = []
                while not messages:
                    data, fds_now, _, _ = socket.recv_fds(conn, 1 << 20, 70)
                    fds += fds_now
                    if not data:
                        break
                    messages = decoder.feed(data)
                for fd in fds:
                    os.close(fd)
                self.received += [(m, len(fds)) for m in messages]
                conn.sendall(agentwire.Say("said\n").encode() +
                             agentwire.Exit(5, "bye").encode())

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def fake_agent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeAgent]:
    agent = FakeAgent(tmp_path / "agent")
    monkeypatch.setenv("REXNET_AGENT_SOCKET", agent.path)
    yield agent
    agent.close()


COMMAND_LINES = [
    ["-a", "h:1", "KEY", "--", "a", "-b", ""],
    ["-v", "--timeout", "2.5", "--alerts", "c:2", "--announce=x:3", "-ay:4", "KEY"],
    ["-vT", "--env", "A=1", "-eB", "-eMISSING", "--env=C=", "--revoked", "../r.revoked",
     "KEY", "x"],
    ["--fd", "5", "--fd=6", "--fd", "5", "-T", "../keys/./KEY", "tab\there", "quote\"\\",
     "ünï€ode 😀", "ctl\x01\x1f"],
]


@pytest.mark.parametrize("tokens", COMMAND_LINES, ids=range(len(COMMAND_LINES)))
def test_the_native_launcher_sends_what_the_python_one_sends(
        fake_agent: FakeAgent, keys: Keys, tmp_path: Path, tokens: list[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    if not os.path.exists(LAUNCHERS["native"]):
        pytest.skip("no native launcher (no C compiler at install)")
    monkeypatch.setenv("B", "from the environment")
    monkeypatch.setenv("GROUP", "239.1.2.3")
    work = tmp_path / "work"
    work.mkdir()
    argv = [str(keys.client) if t == "KEY" else t.replace("KEY", keys.client.name)
            for t in tokens]
    monkeypatch.delenv("MISSING", raising=False)
    for launcher in ("python", "native"):  # --fd 5 (write-only) and 6 (read-only)
        done = subprocess.run(["sh", "-c", f'exec "$@" 5>"{tmp_path}/five" 6</dev/null', "sh",
                               LAUNCHERS[launcher], "exec", *argv], cwd=work,
                              stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
        assert done.returncode == 5 and done.stderr == b"said\nbye\n", (launcher, done)
    (python, python_fds), (native, native_fds) = fake_agent.received
    assert isinstance(python, agentwire.Exec) and isinstance(native, agentwire.Exec)
    assert native == python and native_fds == python_fds


def fallback_launcher(directory: Path) -> dict[str, Path]:
    """A native launcher built here whose Python launchers only say they were called."""
    scripts = {}
    for command in ("rexnet", "cexec"):
        scripts[command] = directory / f"{command}-fallback"
        scripts[command].write_text(f'#!/bin/sh\necho "{command} fallback: $*" >&2\nexit 99\n')
        scripts[command].chmod(0o755)
    native = directory / "rexnet-native"
    why = entry.build_native(str(native), {k: str(v) for k, v in scripts.items()})
    if why:
        if os.environ.get("CI") and shutil.which("cc"):
            pytest.fail(why)
        pytest.skip(why)
    (directory / "cexec").symlink_to("rexnet-native")
    return {"rexnet": native, "cexec": directory / "cexec"}


def test_the_native_launcher_leaves_all_else_to_python(
        fake_agent: FakeAgent, keys: Keys, tmp_path: Path) -> None:
    built = fallback_launcher(tmp_path)
    key = str(keys.client)

    def run(command: str, *args: str, **env: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([str(built[command]), *args], stdin=subprocess.DEVNULL,
                              capture_output=True, timeout=30, env={**os.environ, **env})

    # its own case: an ordinary exec, as rexnet or cexec, through a running agent
    for command, argv in (("rexnet", ["exec", "-a", "h:1", key]), ("cexec", [key, "x"])):
        done = run(command, *argv)
        assert done.returncode == 5 and done.stderr == b"said\nbye\n", done
    # everything else goes to the Python launcher, with the same arguments
    cases = [("rexnet", ["--help"], {}), ("rexnet", ["status", key], {}),
             ("rexnet", ["exec", "--no-agent", key], {}),
             ("rexnet", ["exec", key], {"REXNET_NO_AGENT": "1"}),
             ("rexnet", ["exec", "an-application-name"], {}),
             ("rexnet", ["exec", "-t", key], {}), ("rexnet", ["exec", "--timeout", "1e3", key], {}),
             ("rexnet", ["exec", key, "-x"], {}), ("rexnet", ["exec", "--bogus", key], {}),
             ("rexnet", ["exec", "--fd", "9", key], {}),
             ("rexnet", ["exec", key], {"REXNET_AGENT_SOCKET": str(tmp_path / "none" / "s")}),
             ("rexnet", ["exec", key], {"REXNET_AGENT_SOCKET": "/tmp/agent.sock"}),
             ("cexec", ["-h"], {})]
    for command, argv, env in cases:
        done = run(command, *argv, **env)
        assert done.returncode == 99, (argv, env, done)
        assert done.stderr == f"{command} fallback: {' '.join(argv)}\n".encode(), (argv, env)
    # an argument that is not UTF-8 too
    done = subprocess.run([str(built["rexnet"]), "exec", key, b"\xff".decode(
        errors="surrogateescape")], stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
    assert done.returncode == 99, done
    assert len(fake_agent.received) == 2


def test_make_install_wrote_the_launchers() -> None:
    bindir = Path(LAUNCHERS["python"]).parent
    for command in ("rexnet", "cexec"):
        script = bindir / f"{command}-py"
        interpreter, flags = script.read_text().splitlines()[0].removeprefix("#!").split(" ")
        # the venv's python (pytest's own script may name it python3: the same file)
        assert flags == "-IS" and Path(interpreter).parent == Path(sys.executable).parent
        assert os.path.samefile(interpreter, sys.executable)
        target = os.readlink(bindir / command)
        assert target in ("rexnet-native", f"{command}-py")
    version = subprocess.run([LAUNCHERS["python"], "--version"], capture_output=True, timeout=30)
    assert version.returncode == 0 and version.stdout.startswith(b"rexnet ")
