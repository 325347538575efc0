"""The client agent with real launchers, agents, workers and TLS on loopback: started on
demand, reused with warm channels, stale sockets, dying launchers and agents, SO_PEERCRED."""

from __future__ import annotations

import os
import re
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster import (
    LAUNCHERS,
    REXNET,
    Proc,
    exec_argv,
    host_pid,
    loopback_address,
    run_exec,
    sleep_marker,
    start_worker,
)
from conftest import Keys, stop_agents
from netbed import NetBed

from rexnet.agent import paths
from rexnet.protocol import exitcodes


@pytest.fixture(scope="module")
def worker(keys: Keys) -> Iterator[tuple[Proc, str]]:
    addr = f"{loopback_address()}:3010"
    proc = start_worker(keys.worker, ["sh", "-c"], addr, "agented", "--allow-args",
                        "--slots", "4")
    yield proc, addr
    proc.stop()


def sh(keys: Keys, addr: str, script: str, *options: str, **kw: object
       ) -> subprocess.CompletedProcess[bytes]:
    return run_exec(keys.client, [addr], *options, "--", script, **kw)  # type: ignore[arg-type]


# The core cases run with each launcher (`launcher`: rexnet-py, then rexnet-native).


def agent_pid(runtime: Path) -> int:
    (pidfile,) = runtime.rglob("agent-*.sock.pid")
    return int(pidfile.read_text())


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except (FileNotFoundError, ProcessLookupError):  # (gone between the open and the read)
        return False


def wait_gone(pid: int, timeout: float = 8.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive(pid):
        time.sleep(0.05)
    return not alive(pid)


def test_exec_starts_an_agent_and_the_next_exec_reuses_it_and_its_channel(
        keys: Keys, worker: tuple[Proc, str], agent_sockets: Path, launcher: str) -> None:
    proc, addr = worker
    first = sh(keys, addr, "echo one", "-v", rexnet=launcher)
    assert first.returncode == 0 and first.stdout == b"one\n", first.stderr
    assert b"first of 1 to connect back" in first.stderr
    pid = agent_pid(agent_sockets)
    path = Path(paths.socket_path())
    assert path.parent == agent_sockets / "rexnet"
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    second = sh(keys, addr, "echo two", "-v", rexnet=launcher)
    assert second.returncode == 0 and second.stdout == b"two\n", second.stderr
    assert b"reused warm channel" in second.stderr
    assert agent_pid(agent_sockets) == pid and alive(pid)
    # the worker saw one connection: both jobs came from the same client port
    first_job = re.search(rb"job (\w+) runs", first.stderr)
    second_job = re.search(rb"job (\w+) runs", second.stderr)
    assert first_job and second_job
    one = proc.wait_for(rf"job {first_job[1].decode()} started for client from (\S+):")
    two = proc.wait_for(rf"job {second_job[1].decode()} started for client from (\S+) on a "
                        "warm channel")
    assert one[1] == two[1]


def test_a_stale_socket_is_replaced(keys: Keys, worker: tuple[Proc, str],
                                    agent_sockets: Path, launcher: str) -> None:
    path = paths.socket_path()
    paths.safe_directory(path)
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(path)
    dead.close()  # the file stays; connecting to it is refused, as after an agent's crash
    with pytest.raises(ConnectionRefusedError):
        socket.socket(socket.AF_UNIX).connect(path)
    done = sh(keys, worker[1], "echo fine", rexnet=launcher)
    assert done.returncode == 0 and done.stdout == b"fine\n", done.stderr
    assert alive(agent_pid(agent_sockets))


def test_a_directory_of_another_user_is_refused(keys: Keys, worker: tuple[Proc, str],
                                                agent_sockets: Path, launcher: str) -> None:
    directory = agent_sockets / "rexnet"
    directory.mkdir()
    os.chown(directory, 65534, 65534)
    done = sh(keys, worker[1], "echo fine", rexnet=launcher)
    assert b"is not a directory of this user" in done.stderr
    assert b"running without one" in done.stderr  # the job still runs, standalone
    assert done.returncode == 0 and done.stdout == b"fine\n"
    assert not list(agent_sockets.rglob("*.pid"))


@pytest.mark.parametrize("how", ["option", "environment"])
def test_without_the_agent(keys: Keys, worker: tuple[Proc, str], agent_sockets: Path,
                           how: str, monkeypatch: pytest.MonkeyPatch) -> None:
    options = ["--no-agent", "-v"] if how == "option" else ["-v"]
    if how == "environment":
        monkeypatch.setenv("REXNET_NO_AGENT", "1")
    done = sh(keys, worker[1], "echo alone", *options)
    assert done.returncode == 0 and done.stdout == b"alone\n", done.stderr
    assert b"first of 1 to connect back" in done.stderr
    assert not list(agent_sockets.rglob("*.pid"))


def test_errors_read_the_same_with_and_without_the_agent(
        keys: Keys, worker: tuple[Proc, str], tmp_path: Path, launcher: str) -> None:
    unsafe = tmp_path / "unsafe.client"
    unsafe.write_bytes(keys.client.read_bytes())
    unsafe.chmod(0o644)
    cases = [
        ([str(unsafe)], "--"),
        ([str(keys.client), "--announce", "nowhere:99999"], "--"),
        ([str(keys.client), "--announce", "127.0.0.1:9", "--timeout", "0.5"], "--"),
        ([str(tmp_path / "missing.client")], "--"),
    ]
    for argv, _ in cases:
        through = subprocess.run([launcher, "exec", *argv, "--", "true"], capture_output=True,
                                 timeout=60)
        alone = subprocess.run([launcher, "exec", "--no-agent", *argv, "--", "true"],
                               capture_output=True, timeout=60)
        assert through.returncode == alone.returncode != 0, (argv, through, alone)
        assert through.stderr == alone.stderr, argv


def test_a_killed_launcher_ends_its_job(keys: Keys, worker: tuple[Proc, str],
                                       launcher: str) -> None:
    proc, addr = worker
    marker = sleep_marker()
    job = subprocess.Popen(exec_argv(keys.client, [addr], "--", f"sleep {marker} & echo $!; wait",
                                     rexnet=launcher),
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert job.stdout is not None
    job.stdout.readline()
    grandchild = host_pid(f"sleep {marker}")
    job.kill()
    job.wait()
    proc.wait_for(r"client of job \w+ went away")
    assert wait_gone(grandchild), "the job's processes outlived their launcher"


def test_a_killed_agent_gives_255_and_ends_the_job(keys: Keys, worker: tuple[Proc, str],
                                                   agent_sockets: Path, launcher: str) -> None:
    addr = worker[1]
    assert sh(keys, addr, "true").returncode == 0  # an agent runs: the native launcher's case
    marker = sleep_marker()
    job = subprocess.Popen(exec_argv(keys.client, [addr], "--", f"sleep {marker} & echo $!; wait",
                                     rexnet=launcher),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert job.stdout is not None and job.stderr is not None
    job.stdout.readline()
    grandchild = host_pid(f"sleep {marker}")
    os.kill(agent_pid(agent_sockets), signal.SIGKILL)
    assert job.wait(10) == exitcodes.WORKER_LOST
    assert b"lost the agent before the job finished" in job.stderr.read()
    assert wait_gone(grandchild), "the job's processes outlived the agent"


def test_signals_and_statuses_go_through_the_agent(keys: Keys, worker: tuple[Proc, str],
                                                   launcher: str) -> None:
    assert sh(keys, worker[1], "true").returncode == 0  # an agent runs: the native launcher's case
    job = subprocess.Popen(
        exec_argv(keys.client, [worker[1]], "--",
                  "trap 'echo got USR1; exit 42' USR1; echo ready; while :; do sleep 0.1; done",
                  rexnet=launcher),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert job.stdout is not None
    assert job.stdout.readline() == b"ready\n"
    job.send_signal(signal.SIGUSR1)
    assert job.wait(10) == 42
    assert job.stdout.read() == b"got USR1\n"
    assert sh(keys, worker[1], "kill -TERM $$", rexnet=launcher).returncode == 128 + signal.SIGTERM


def test_descriptors_beyond_stdio_go_through_the_agent(keys: Keys, worker: tuple[Proc, str],
                                                       tmp_path: Path, launcher: str) -> None:
    assert sh(keys, worker[1], "true").returncode == 0  # an agent runs: the native launcher's case
    out = tmp_path / "extra"
    with open(out, "wb") as f:
        fd = f.fileno()
        done = subprocess.run(exec_argv(keys.client, [worker[1]], "--fd", str(fd), "--",
                                        f"echo extra > /dev/fd/{fd}; echo one", rexnet=launcher),
                              capture_output=True, pass_fds=(fd,), timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"one\n" and out.read_bytes() == b"extra\n"


def test_the_pipe_of_a_job_ends_when_the_launcher_exits(keys: Keys, worker: tuple[Proc, str],
                                                        launcher: str) -> None:
    # `rexnet exec ... | cat` must not hang: the agent lets go of the launcher's stdout
    assert sh(keys, worker[1], "true").returncode == 0  # an agent runs: the native launcher's case
    argv = " ".join(exec_argv(keys.client, [worker[1]], "--", "'echo piped'", rexnet=launcher))
    done = subprocess.run(["sh", "-c", f"{argv} | cat"], capture_output=True, timeout=30)
    assert done.stdout == b"piped\n"


NOBODY_CONNECTS = """
import os, socket, sys
os.setgroups([]); os.setgid(65534); os.setuid(65534)
sock = socket.socket(socket.AF_UNIX)
sock.connect(sys.argv[1])
try:
    sock.sendall(b"\\0\\0\\0\\2{}")
    print("answered" if sock.recv(100) else "closed")
except OSError:
    print("closed")
"""


def test_the_agent_refuses_another_uid(keys: Keys, worker: tuple[Proc, str]) -> None:
    directory = Path(tempfile.mkdtemp(prefix="rexnet-peercred-", dir="/tmp"))
    path = directory / "agent.sock"
    agent = Proc([REXNET, "agent", "--foreground", "--socket", str(path)])
    try:
        agent.wait_for(r"serves")
        directory.chmod(0o711)  # a mistake that lets others reach the socket...
        path.chmod(0o666)
        # ...but the agent checks the peer's uid (SO_PEERCRED) and refuses it
        nobody = subprocess.run([sys.executable, "-c", NOBODY_CONNECTS, str(path)],
                                capture_output=True, timeout=30)
        agent.wait_for(r"complaint: refused a connection from pid \d+ of uid 65534")
        assert nobody.stdout == b"closed\n", nobody
        # and a launcher of uid 65534 does not use a socket in root's directory at all (the
        # Python one: uid 65534 cannot reach this interpreter under /root, but setpriv can
        # start it; the native launcher would have to start it again)
        launcher = subprocess.run(
            ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups",
             LAUNCHERS["python"], "exec", "--announce", worker[1], str(keys.client), "--",
             "echo no"],
            capture_output=True, timeout=30,
            env={**os.environ, "REXNET_AGENT_SOCKET": str(path)})
        refusal = (f"will not use the agent at {path}: {directory} is not a directory of this "
                   "user (uid 65534")
        assert refusal.encode() in launcher.stderr, launcher.stderr
        assert launcher.stdout == b"" and launcher.returncode != 0  # it cannot read the key
        assert agent.output.count("complaint: refused a connection") == 1
    finally:
        agent.stop()
        stop_agents(directory)
        for leftover in directory.iterdir():
            leftover.unlink()
        directory.rmdir()


def test_agent_stop(keys: Keys, worker: tuple[Proc, str], agent_sockets: Path) -> None:
    assert sh(keys, worker[1], "true").returncode == 0
    pid = agent_pid(agent_sockets)
    stopped = subprocess.run([REXNET, "agent", "--stop"], capture_output=True, timeout=30)
    assert stopped.returncode == 0
    assert f"stopped the agent {pid}".encode() in stopped.stderr
    assert wait_gone(pid)
    assert not Path(paths.socket_path()).exists()


def test_an_idle_agent_stops_by_itself(agent_sockets: Path) -> None:
    path = agent_sockets / "idle.sock"
    started = subprocess.run([REXNET, "agent", "--socket", str(path), "--idle-timeout", "0.5"],
                             capture_output=True, timeout=30)
    assert started.returncode == 0, started.stderr
    assert path.exists()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and path.exists():
        time.sleep(0.05)
    assert not path.exists()
    assert "idle for 0.5 s: the agent stops" in (agent_sockets / "idle.log").read_text()


def test_a_warm_worker_that_became_loaded_is_passed_over(bed: NetBed, keys: Keys) -> None:
    subnet = bed.add_subnet("lan")
    client, a, b = (bed.add_host(name, [subnet]) for name in ("client", "wa", "wb"))
    workers = {host.name: start_worker(keys.worker, ["sh", "-c"], "0.0.0.0:3010", host.name,
                                       "--allow-args", "--slots", "2", popen=host.popen)
               for host in (a, b)}
    hosts = {"wa": a, "wb": b}

    def job(*options: str) -> subprocess.CompletedProcess[bytes]:
        return run_exec(keys.client, ["255.255.255.255:3010"], "-v", *options, "--",
                        "echo $REXNET_WORKER", wrap=client.argv)

    first = job()
    warm = first.stdout.strip().decode()
    assert first.returncode == 0 and warm in hosts, first.stderr
    second = job()
    assert second.stdout.strip().decode() == warm
    assert b"reused warm channel" in second.stderr, second.stderr
    other = "wb" if warm == "wa" else "wa"
    # another client (no agent: another process) loads the warm worker
    blocker = client.popen(exec_argv(keys.client, [f"{hosts[warm].addr()}:3010"], "--no-agent",
                                     "--", "sleep 60 # blocker"),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers[warm].wait_for(r"job \w+ started for client .*blocker")
    time.sleep(1.5)  # its warm channel reports the new load within a second
    after = [job() for _ in range(3)]
    placed = [done.stdout.strip().decode() for done in after]
    assert all(done.returncode == 0 for done in after)
    assert not any(f"worker {warm} ".encode() in done.stderr and b"reused warm channel"
                   in done.stderr for done in after), [d.stderr for d in after]
    assert placed.count(other) >= 2, placed
    blocker.kill()


def test_the_launcher_imports_nothing_heavy(keys: Keys, worker: tuple[Proc, str]) -> None:
    assert sh(keys, worker[1], "true").returncode == 0  # the agent runs
    script = Path(LAUNCHERS["python"])
    shebang = script.read_text().splitlines()[0]
    assert shebang.endswith(" -IS"), shebang  # no site processing
    argv = exec_argv(keys.client, [worker[1]], "--", "true", rexnet=str(script))
    # -I ignores PYTHONPROFILEIMPORTTIME: the interpreter is started as the script would be
    done = subprocess.run([shebang[2:].split()[0], "-X", "importtime", "-I", "-S", *argv],
                          capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
    imported = {line.split("|")[-1].strip() for line in done.stderr.decode().splitlines()
                if line.startswith("import time:")}
    assert "_socket" in imported  # and rexnet's modules from its bundle (rexnet.cli.bundle):
    assert not {m for m in imported if m.startswith("rexnet")}, imported
    heavy = {"twisted", "cryptography", "OpenSSL", "json", "re", "enum", "socket", "signal",
             "typing", "collections", "rexnet.cli.main", "argparse", "site"}
    assert not imported & heavy, imported & heavy
