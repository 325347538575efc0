"""Job isolation (P10): every job in a sandbox of its own, nothing of it left after its end.

The end-to-end tests start a real worker as root in a namespace of the test bed (so it
sandboxes its jobs: rexnet.worker.sandbox) and real clients in another; each performs
the attack (a daemonized leftover, kill -9 of the worker and of every process, reading
the key, another job's /tmp, a forged --python result), checks it fails, and where it
can shows with a control (--no-sandbox) that the attack works without the sandbox.
"""

from __future__ import annotations

import functools
import os
import pickle
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from cluster import Proc, exec_argv, host_pid, sleep_marker, start_worker
from conftest import Keys
from netbed import Host, NetBed
from twisted.internet.task import Clock

from rexnet.protocol import exitcodes
from rexnet.protocol import remotecall as remote
from rexnet.worker import nativeinit
from rexnet.worker import sandboxwire as wire
from rexnet.worker.sandbox import (
    NOT_STARTED,
    READY_TIMEOUT,
    SPARES,
    JobUsers,
    Sandbox,
    parse_job_users,
)
from rexnet.worker.sandboxd import SPARE_NAME

BROADCAST = "255.255.255.255:3010"
TESTS = Path(__file__).resolve().parent


# -- units ------------------------------------------------------------------------------


def test_job_users_ranges_lists_and_refusals() -> None:
    assert parse_job_users("61000-61002") == [(61000, 61000, ""), (61001, 61001, ""),
                                              (61002, 61002, "")]
    [(uid, _, name)] = parse_job_users("nobody")
    assert (uid, name) == (65534, "nobody")
    for bad, why in [("root", "root cannot"), ("0-3", "root cannot"),
                     ("no-such-user-x", "no such user"), ("61000,61000", "named twice"),
                     ("rexjob5-2", "empty range")]:
        with pytest.raises(ValueError, match=why):
            parse_job_users(bad)
    pool = JobUsers(parse_job_users("61000-61001"))
    first, second = pool.acquire(), pool.acquire()
    assert {first, second} == {0, 1}
    with pytest.raises(OSError, match="no free job user"):
        pool.acquire()
    pool.release(first)
    assert pool.acquire() == first


def test_sandbox_messages_are_bounded_and_carry_descriptors() -> None:
    a, b = socket.socketpair()
    r, w = os.pipe()
    wire.send(a, {"argv": ["x"]}, [w])
    got = wire.receive(b)
    assert got is not None
    message, fds = got
    assert message == {"argv": ["x"]} and len(fds) == 1
    os.write(fds[0], b"through")
    assert os.read(r, 10) == b"through"
    for fd in (r, w, *fds):
        os.close(fd)
    a.sendall(wire.HEADER.pack(wire.MAX_MESSAGE + 1))
    with pytest.raises(wire.WireError, match="bytes"):
        wire.receive(b)
    a.sendall(wire.HEADER.pack(3) + b"[1]")
    with pytest.raises(wire.WireError, match="JSON object"):
        wire.receive(b)
    a.close()
    assert wire.receive(b) is None
    b.close()


def test_the_c_inits_request_refuses_what_it_cannot_carry() -> None:
    def encode(argv: list[object], env: dict[str, object]) -> bytes:
        return nativeinit.encode(argv, env, "/", False, (61000, 61000, ""), [0, 1], [])

    data = encode(["sh", "-c", "true"], {"PATH": "/bin"})
    (size,) = nativeinit.HEADER.unpack(data[:4])
    assert size == len(data) - 4 and data.endswith(b"/\0sh\0-c\0true\0PATH=/bin\0")
    bad: list[tuple[list[object], dict[str, object], str]] = [
        ([], {}, "no command"), (["a\0b"], {}, "argument"), (["sh"], {"A=B": "c"}, "holds '='"),
        (["sh"], {"": "c"}, "empty"), (["sh"], {"A": 1}, "variable"), ([1], {}, "argument")]
    for argv, env, why in bad:
        with pytest.raises(ValueError, match=why):
            encode(argv, env)


class _Reactor(Clock):
    """A Clock that keeps the readers added to it (the test reads for the reactor)."""

    def __init__(self) -> None:
        super().__init__()
        self.readers: list[Any] = []

    def addReader(self, reader: Any) -> None:
        self.readers.append(reader)

    def removeReader(self, reader: Any) -> None:
        self.readers.remove(reader)


class _Ended:
    """What a sandboxed job's transport gets from its supervisor's link."""

    def __init__(self) -> None:
        self.pid = 0
        self.proto = self
        self.statuses: list[int] = []

    def processEnded(self, status: int) -> None:
        self.statuses.append(status)


def _spare(sandbox: Sandbox, helper: socket.socket) -> socket.socket:
    """The supervisor's end of the socket the worker sent the helper for a spare."""
    got = wire.receive(helper)
    assert got is not None and got[0] == {"job": True} and len(got[1]) == 1
    return socket.socket(fileno=got[1][0])


def test_a_job_waits_for_a_supervisor_being_prepared_without_blocking() -> None:
    sandbox = Sandbox(spares=1)
    sandbox.control, helper = socket.socketpair()
    sandbox.fill()
    supervisor = _spare(sandbox, helper)
    started = time.monotonic()
    link = sandbox._take()  # no supervisor is ready: the job takes the one being prepared
    assert time.monotonic() - started < 0.5 and link.pid == 0
    r, w = os.pipe()
    assert link.start({0: r}) == 0  # nothing sent yet: the request and a copy of R wait
    os.close(r)
    link.signal(signal.SIGTERM)
    reactor, transport = _Reactor(), _Ended()
    link.watch(reactor, transport)
    [reader] = reactor.readers
    supervisor.setblocking(False)
    with pytest.raises(BlockingIOError):
        supervisor.recv(1)  # not a byte of the job before the supervisor is ready
    supervisor.setblocking(True)
    wire.send(supervisor, {"ready": 4242})
    reader.doRead()
    assert transport.pid == 4242 and transport.statuses == []
    got = wire.receive(supervisor)
    assert got is not None
    request, fds = got
    assert request["fds"] == [0] and len(fds) == 1
    os.write(w, b"stdin")
    assert os.read(fds[0], 10) == b"stdin"
    assert wire.receive(supervisor) == ({"signal": signal.SIGTERM}, [])
    wire.send(supervisor, {"code": 3, "signal": None, "limit": ""})
    reader.doRead()
    assert transport.statuses == [3 << 8] and reactor.readers == []
    reactor.advance(READY_TIMEOUT)
    assert transport.statuses == [3 << 8]  # the bound was cancelled once it was ready
    for fd in (w, *fds):
        os.close(fd)
    for sock in (supervisor, helper):
        sock.close()
    sandbox.stop()


def test_a_supervisor_never_ready_ends_its_job_and_one_that_fails_too() -> None:
    sandbox = Sandbox(spares=2)
    sandbox.control, helper = socket.socketpair()
    sandbox.fill()
    silent, failing = _spare(sandbox, helper), _spare(sandbox, helper)
    reactor = _Reactor()
    ended = []
    for _ in range(2):
        link = sandbox._take()
        r, w = os.pipe()
        assert link.start({0: r}) == 0
        os.close(r)
        transport = _Ended()
        link.watch(reactor, transport)
        ended.append((link, transport, w))
    failing.close()  # its supervisor ends before saying it is ready
    ended[1][0]._reader.doRead()  # type: ignore[union-attr]
    assert ended[1][1].statuses == [NOT_STARTED]
    reactor.advance(READY_TIMEOUT - 0.1)
    assert ended[0][1].statuses == []
    reactor.advance(0.2)
    assert ended[0][1].statuses == [NOT_STARTED] and reactor.readers == []
    for link, _, w in ended:  # the waiting copies of the job's descriptors are closed
        assert link.sock is None
        with pytest.raises(BrokenPipeError):
            os.write(w, b"x")
        os.close(w)
    for sock in (silent, helper):
        sock.close()
    sandbox.stop()


def test_the_root_helper_does_not_import_from_the_workers_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker started as root in a directory others can write (say /tmp): a rexnet/
    planted there must not be what its root helper runs (`python -m` puts the current
    directory first on sys.path)."""
    marker = tmp_path / "ran-as-root"
    planted = tmp_path / "rexnet" / "worker"
    planted.mkdir(parents=True)
    for package in (planted.parent, planted):
        (package / "__init__.py").write_text("")
    (planted / "sandboxd.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.chdir(tmp_path)
    sandbox = Sandbox(spares=1)
    sandbox.start()
    assert sandbox.helper is not None
    try:
        sandbox.fill()  # the real helper prepares a spare and says it is ready
        [link] = sandbox._ready
        deadline = time.monotonic() + 10
        while not link.ready() and link.sock is not None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert link.pid > 0 and sandbox.helper.poll() is None
    finally:
        sandbox.stop()
        sandbox.helper.wait(10)
    assert not marker.exists()


def _marker(path: str) -> None:
    Path(path).write_text("the forged result ran code")


def test_a_result_not_authenticated_with_the_calls_key_is_never_unpickled(
        tmp_path: Path) -> None:
    key = remote.new_key()
    marker = tmp_path / "ran"
    envelope = {"ok": True, "value": pickle.dumps(_Runs(str(marker)))}
    forged = remote.MAGIC_RESULT + bytes(32) + pickle.dumps(envelope)
    with pytest.raises(remote.NoResult, match="not authenticated"):
        remote.decode_result(forged, "w1", key)
    other = remote.encode_result(envelope, remote.new_key())  # another call's key
    with pytest.raises(remote.NoResult, match="not authenticated"):
        remote.decode_result(other, "w1", key)
    assert not marker.exists()
    # the control: with the call's own key, the same bytes are loaded (and run)
    remote.decode_result(remote.encode_result(envelope, key), "w1", key)
    assert marker.exists()


class _Runs:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, ...]:
        return (_marker, (self.path,))


def test_only_the_runner_holds_the_result_channel() -> None:
    """What the call and its children write on fd 1 (forked or exec'd) goes to stderr; the
    result is intact and authenticated."""
    key = remote.new_key()
    payload = remote.encode_call(_noisy, (), {}, key)
    done = subprocess.run([sys.executable, *remote.RUNNER_ARGV], input=payload,
                          capture_output=True, timeout=60, env=dict(os.environ,
                                                                    PYTHONPATH=str(TESTS)))
    assert done.returncode == 0, done.stderr
    assert remote.decode_result(done.stdout, "w1", key) == (True, "value")
    assert b"from the call" in done.stderr and b"from a forked child" in done.stderr
    assert b"from an exec'd child" in done.stderr
    assert b"cannot write into the result" in done.stderr


def test_a_file_planted_in_the_jobs_directory_is_not_imported_before_ours(
        tmp_path: Path) -> None:
    """The runner's working directory (the worker's --chdir, maybe shared) comes after the
    standard library and rexnet on sys.path: a planted pickle.py never runs, while a
    callable's module that lives there still imports."""
    marker = tmp_path / "planted ran"
    (tmp_path / "pickle.py").write_text(
        f"open({str(marker)!r}, 'w').write('the planted module saw the call')\n")
    (tmp_path / "rexnet_cwd_callable.py").write_text("def f(x):\n    return ('cwd', x)\n")
    sys.path.insert(0, str(tmp_path))
    try:
        import rexnet_cwd_callable  # type: ignore[import-not-found]
        key = remote.new_key()
        payload = remote.encode_call(rexnet_cwd_callable.f, (7,), {}, key)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("rexnet_cwd_callable", None)
    done = subprocess.run([sys.executable, *remote.RUNNER_ARGV], input=payload,
                          capture_output=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert remote.decode_result(done.stdout, "w1", key) == (True, ("cwd", 7))
    assert not marker.exists()
    # the control: the same directory on the front of sys.path (plain -c) runs the plant
    subprocess.run([sys.executable, "-c", remote.RUNNER], input=payload,
                   capture_output=True, timeout=60, cwd=tmp_path)
    assert marker.exists()


def _noisy() -> str:
    print("from the call", flush=True)
    subprocess.run(["echo", "from an exec'd child"], check=True)
    pid = os.fork()
    if pid == 0:
        os.write(1, b"from a forked child\n")
        try:  # the result channel's descriptors are closed in a forked child
            for fd in range(3, 64):
                if os.path.realpath(f"/proc/self/fd/{fd}").startswith("pipe:"):
                    os.write(fd, remote.MAGIC_RESULT + b"forged")
        except OSError:
            pass
        os.write(2, b"cannot write into the result\n")
        os._exit(0)
    os.waitpid(pid, 0)
    return "value"


# -- on the namespace test bed ------------------------------------------------------------


def worker(bed: NetBed, keys: Keys, *options: str, command: tuple[str, ...] = ("sh", "-c")
           ) -> tuple[Host, Host, Proc]:
    lan = bed.add_subnet("lan")
    client, host = bed.add_host("client", [lan]), bed.add_host("w1", [lan])
    proc = start_worker(keys.worker, list(command), "0.0.0.0:3010", "w1", *options,
                        popen=host.popen)
    return client, host, proc


def run(client: Host, keys: Keys, script: str, *options: str, timeout: float = 30
        ) -> subprocess.CompletedProcess[str]:
    return client.run(exec_argv(keys.client, [BROADCAST], *options, "--", script),
                      timeout=timeout)


def processes_with(text: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        if text in " ".join(p.info["cmdline"] or ()):
            found.append(p)
    return found


@pytest.mark.parametrize("sandbox", [True, False])
def test_a_daemonized_grandchild_does_not_outlive_its_job(bed: NetBed, keys: Keys,
                                                          sandbox: bool) -> None:
    client, _, _ = worker(bed, keys, "--allow-args", *([] if sandbox else ["--no-sandbox"]))
    mark = f"{random.randint(1000, 9999)}.{os.getpid()}"
    # a double fork and setsid: the daemon leaves the job's process group and session
    done = run(client, keys, f"(setsid sleep {mark} </dev/null >/dev/null 2>&1 &); "
               "echo forked")
    assert done.returncode == 0 and done.stdout == "forked\n", done.stderr
    time.sleep(0.5)
    left = processes_with(f"sleep {mark}")
    try:
        if sandbox:
            assert left == []
        else:  # the control: without a sandbox the daemon survives its job
            assert len(left) == 1
    finally:
        for p in left:
            p.kill()


def test_jobs_run_as_their_own_users_and_cannot_reach_the_worker_each_other_or_the_key(
        bed: NetBed, keys: Keys, tmp_path_factory: pytest.TempPathFactory) -> None:
    keydir = Path(tmp_path_factory.mktemp("sandboxkeys"))
    keydir.chmod(0o755)
    keyfile = keydir / "testapp.worker"
    shutil.copy(keys.worker, keyfile)
    keyfile.chmod(0o600)
    client, _, proc = worker(bed, keys, "--allow-args", "--slots", "2", "--chdir", "/tmp",
                             "--job-users", "61000-61003", "--accept-env", "KEYFILE",
                             "--accept-env", "WORKER_PID")
    proc.wait_for(r"job isolation: .* 4 job users")
    first = client.popen(exec_argv(keys.client, [BROADCAST], "--", (
        'id -u; echo secret > /tmp/first; echo ready; sleep 3; cat /tmp/first; echo alive')),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert first.stdout is not None
    first_uid = int(first.stdout.readline())
    assert first.stdout.readline() == "ready\n"
    second = run(client, keys, (
        'id -u; ls -A /tmp; echo "files: $(ls -A /tmp | wc -l)"; '
        'kill -9 "$WORKER_PID" 2>/dev/null; echo "kill worker: $?"; '
        'kill -9 -1 2>/dev/null; echo "kill all: done"; '
        'cat "$KEYFILE" >/dev/null 2>&1 && echo "key: READ" || echo "key: refused"; '
        'echo "processes: $(ls -d /proc/[0-9]* | wc -l)"'),
        "--env", f"KEYFILE={keyfile}", "--env", f"WORKER_PID={proc.pid}")
    out = second.stdout.splitlines()
    assert second.returncode == 0, second.stderr
    second_uid = int(out[0])
    assert {first_uid, second_uid} <= set(range(61000, 61004)) and first_uid != second_uid
    assert "files: 0" in out  # not the first job's /tmp
    assert "kill worker: 1" in out  # the worker is not even visible
    assert "key: refused" in out
    processes = int(next(line for line in out if line.startswith("processes:")).split()[1])
    assert processes < 10  # its own namespace: init, sh and the commands of the line
    # the first job lived through `kill -9 -1` and kept its /tmp; the worker too
    rest, err = first.communicate(timeout=30)
    assert first.returncode == 0, err
    assert rest == "secret\nalive\n"
    assert proc.process.poll() is None and psutil.Process(proc.pid).is_running()
    # the control: the key's mode keeps them out (root, the test, reads it)
    assert keyfile.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")


def test_memory_and_pids_limits(bed: NetBed, keys: Keys) -> None:
    client, _, proc = worker(bed, keys, "--allow-args", "--job-memory", "100M",
                             "--job-pids", "16")
    hog = f"{sys.executable} -c 'import time; x = bytearray(400 << 20); time.sleep(30)'"
    done = run(client, keys, hog, timeout=40)
    assert done.returncode == exitcodes.MEMORY_LIMIT, done.stderr
    assert "hit its memory limit" in done.stderr
    forks = ("import os, time\nn = 0\nfor i in range(40):\n    try:\n        pid = os.fork()\n"
             "    except OSError:\n        break\n    if pid == 0:\n        time.sleep(30)\n"
             "        os._exit(0)\n    n += 1\nprint(n)\n")
    done = run(client, keys, f"{sys.executable} -c '{forks}'")
    assert done.returncode == 0, done.stderr
    assert 0 < int(done.stdout) < 16  # the sh, python and its children count
    small = run(client, keys, f"{sys.executable} -c 'x = bytearray(10 << 20)'")
    assert small.returncode == 0
    assert proc.process.poll() is None


def pids_group(pid: int) -> Path:
    """The pids control group of process PID (cgroup v1, as on the CI machines)."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "pids" in controllers.split(","):
            return Path("/sys/fs/cgroup/pids") / path.lstrip("/")
    pytest.skip("no cgroup v1 pids hierarchy here")


@pytest.mark.parametrize("init", ["native", "python"])
def test_jobs_start_in_prepared_fresh_groups_and_the_worker_forks_nothing(
        bed: NetBed, keys: Keys, init: str) -> None:
    native = os.path.join(os.path.dirname(sys.executable), nativeinit.NAME)
    if init == "native" and not os.access(native, os.X_OK):
        message = f"no {nativeinit.NAME} next to {sys.executable} (no C compiler?)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    lan = bed.add_subnet("lan")
    client, host = bed.add_host("client", [lan]), bed.add_host("w1", [lan])
    env = {**os.environ, "REXNET_SANDBOX_INIT": init}
    proc = start_worker(keys.worker, ["sh", "-c"], "0.0.0.0:3010", "w1", "--allow-args",
                        "--job-pids", "16", popen=functools.partial(host.popen, env=env))
    helper = next(p for p in psutil.Process(proc.pid).children()
                  if "rexnet.worker.sandboxd" in " ".join(p.cmdline()))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and len(
            [p for p in helper.children() if p.name() == SPARE_NAME]) < SPARES:
        time.sleep(0.1)  # SPARES inits, each in its group and namespace, before any job
    # one process per spare: its init, the helper's own child (no supervisor between);
    # the C init's fork server beside them (the spares are its clones)
    children = helper.children(recursive=True)
    spares = [p for p in children if p.name() != nativeinit.SERVER_NAME]
    servers = [p for p in children if p.name() == nativeinit.SERVER_NAME]
    assert len(servers) == (1 if init == "native" else 0)
    assert len(spares) >= SPARES and all(p.name() == SPARE_NAME for p in spares)
    assert all(p.ppid() == helper.pid for p in spares)
    # each spare's init is the C program where it was built, else a fork of the helper
    inits = [p for p in spares if p.exe() == native]
    assert len(inits) == (len(spares) if init == "native" else 0)
    groups = []
    for _ in range(2):
        mark = sleep_marker()
        job = client.popen(exec_argv(keys.client, [BROADCAST], "--",
                                     f"echo up; exec sleep {mark}"), stdout=subprocess.PIPE)
        assert job.stdout is not None and job.stdout.readline() == b"up\n"
        sleeper = psutil.Process(host_pid(f"sleep {mark}"))
        group = pids_group(sleeper.pid)
        # the job's group holds the job's namespace only (its init and the command), with
        # the worker's bound; the worker has no child of its own for the job
        members = {int(p) for p in (group / "cgroup.procs").read_text().split()}
        assert sleeper.pid in members and len(members) == 2
        assert (group / "pids.max").read_text().strip() == "16"
        assert [c.pid for c in psutil.Process(proc.pid).children()] == [helper.pid]
        sleeper.kill()
        assert job.wait(timeout=10) == 128 + signal.SIGKILL
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and group.exists():
            time.sleep(0.05)
        assert not group.exists()  # removed once the job has ended, never reused
        groups.append(group)
    assert groups[0] != groups[1]


HIJACK_SECONDS = 4.0


def plant_hijacker() -> str:
    """A --python call that leaves a daemon behind which writes a forged result into the
    result pipe of every other call runner it can see (those of its own worker) for a
    while; and tries the same itself meanwhile."""
    me = os.getpid()
    worker_pid = os.getppid()
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            _hijack(me, worker_pid, time.monotonic() + HIJACK_SECONDS)
        os._exit(0)
    _hijack(me, worker_pid, time.monotonic() + 1.0)
    return "A"


def _hijack(me: int, worker_pid: int, until: float) -> None:
    forged = remote.MAGIC_RESULT + bytes(32) + pickle.dumps({"ok": True, "value": pickle.dumps(
        "HIJACKED")})
    while time.monotonic() < until:
        for pid in psutil.pids():
            try:
                p = psutil.Process(pid)
                if pid == me or p.ppid() != worker_pid or "remotecall" not in " ".join(
                        p.cmdline()):
                    continue
                for fd in os.listdir(f"/proc/{pid}/fd"):
                    if fd == "0":
                        continue  # its input: the result pipe and stderr are the targets
                    if not os.readlink(f"/proc/{pid}/fd/{fd}").startswith("pipe:"):
                        continue  # pipes only: re-opening a file would truncate it (a
                        # runner reading a .pth file at start-up, say)
                    with open(f"/proc/{pid}/fd/{fd}", "wb") as f:
                        f.write(forged)
            except (OSError, psutil.Error):
                pass
        time.sleep(0.02)
    if os.getpid() != me:
        os._exit(0)


def slow_identity(value: str, seconds: float) -> str:
    time.sleep(seconds)
    return value


CLIENT_A = """
import sys, test_sandbox
from rexnet import Executor
with Executor(sys.argv[1], [sys.argv[2]], timeout=20) as ex:
    print(ex.call(test_sandbox.plant_hijacker), flush=True)
"""
CLIENT_B = """
import sys, time, test_sandbox
from rexnet import Executor, CallFailed
with Executor(sys.argv[1], [sys.argv[2]], timeout=20) as ex:
    deadline = time.monotonic() + test_sandbox.HIJACK_SECONDS + 1
    while time.monotonic() < deadline:
        try:
            print(ex.call(test_sandbox.slow_identity, "B", 0.5), flush=True)
        except CallFailed as e:
            print("failed:", e, flush=True)
"""


@pytest.mark.parametrize("sandbox", [True, False])
def test_python_clients_cannot_reach_each_others_results(bed: NetBed, keys: Keys,
                                                        sandbox: bool) -> None:
    lan = bed.add_subnet("lan")
    a, b, host = (bed.add_host(n, [lan]) for n in ("ca", "cb", "w1"))
    env = dict(os.environ, PYTHONPATH=str(TESTS))
    start_worker(keys.worker, [], "0.0.0.0:3010", "w1", "--python", "--slots", "4",
                 *([] if sandbox else ["--no-sandbox"]),
                 popen=lambda argv, **kw: host.popen(argv, env=env, **kw))
    argv = [str(keys.client), BROADCAST]
    first = a.popen([sys.executable, "-c", CLIENT_A, *argv], env=env,
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.3)
    second = b.run([sys.executable, "-c", CLIENT_B, *argv], env=env, timeout=60)
    out_a, err_a = first.communicate(timeout=60)
    assert out_a == "A\n", err_a
    results = second.stdout.splitlines()
    assert results and "HIJACKED" not in results, second.stderr  # never the forged value
    if sandbox:
        assert set(results) == {"B"}, second.stdout + second.stderr
    else:  # the control: the leftover reached B's result pipe, and B refused what it read
        assert any("not authenticated" in line for line in results), second.stdout
    # (the leftover of the control ends by itself after HIJACK_SECONDS)
