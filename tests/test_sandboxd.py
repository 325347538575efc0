"""The root sandbox helper's event loop, through the real helper (P11 #5).

Each test starts `python -m rexnet.worker.sandboxd` as root (real PID and mount namespaces,
real control groups, the C init or the Python one) and speaks to it as the worker does
(rexnet.worker.sandbox): a socket per sandbox on the control socket, "ready", the job's
request with its descriptors, signals, the end. One helper runs every job: these tests
check that one job's misbehaviour (or a bad message, or a worker that goes) ends that job
only, and that the others report what they did.
"""

from __future__ import annotations

import contextlib
import glob
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from cluster import sleep_marker

from rexnet.worker import nativeinit
from rexnet.worker import sandboxwire as wire
from rexnet.worker.sandbox import Sandbox

TIMEOUT = 30.0
FORKS = """import os, time
n = 0
for i in range(100):
    try:
        pid = os.fork()
    except OSError:
        break
    if pid == 0:
        time.sleep(60)
        os._exit(0)
    n += 1
print(n, flush=True)
os._exit(7)
"""


def test_a_reader_gives_each_message_its_own_descriptors_and_never_waits() -> None:
    a, b = socket.socketpair()
    b.setblocking(False)
    reader = wire.Reader(b)
    r, w = os.pipe()
    wire.send(a, {"n": 1})
    wire.send(a, {"n": 2}, [r])
    a.sendall(wire.HEADER.pack(4) + b"nope")
    wire.send(a, {"n": 3}, [w, r])
    got = reader.read()  # all at once; a read that crossed a message would misplace them
    assert [(m["n"], len(fds)) for m, fds in got] == [(1, 0), (2, 1), (3, 2)]
    assert reader.bad and "bad JSON" in reader.bad[0]
    os.write(got[2][1][0], b"x")
    assert os.read(got[1][1][0], 1) == b"x"
    for _, fds in got:
        for fd in fds:
            os.close(fd)
    a.sendall(wire.HEADER.pack(10) + b'{"n"')  # the rest never comes: read() does not wait
    assert reader.read() == [] and not reader.ended
    a.sendall(b': 4}     ')
    assert reader.read() == [({"n": 4}, [])]
    a.sendall(wire.HEADER.pack(wire.MAX_MESSAGE + 1))
    with pytest.raises(wire.WireError, match="at most"):
        reader.read()
    assert reader.ended and reader.read() == []
    for fd in (r, w):
        os.close(fd)
    a.close()
    b.close()


def _require_root() -> None:
    if os.geteuid() == 0 and os.path.isdir("/sys/fs/cgroup"):
        return
    if os.environ.get("CI") == "true":
        pytest.fail("the sandbox helper's tests need root", pytrace=False)
    pytest.skip("the sandbox helper's tests need root")


class Job:
    """One sandbox as the worker holds it: its socket, the init's pid, the job's output."""

    def __init__(self, sock: socket.socket, init: int) -> None:
        self.sock = sock
        self.init = init
        self.out = -1
        self.stdin = -1

    def start(self, script: str, limits: dict[str, Any] | None = None, cwd: str = "/"
              ) -> None:
        """`sh -c SCRIPT` with stdin, stdout and stderr as pipes (stderr into stdout)."""
        in_r, self.stdin = os.pipe()
        self.out, out_w = os.pipe()
        try:
            wire.send(self.sock, {
                "argv": ["sh", "-c", script], "env": {"PATH": os.environ["PATH"]},
                "cwd": cwd, "tty": False, "user": None, "fds": [0, 1, 2],
                "limits": limits or {}}, [in_r, out_w, out_w])
        finally:
            os.close(in_r)
            os.close(out_w)

    def output(self) -> bytes:
        chunks = []
        while chunk := os.read(self.out, 65536):
            chunks.append(chunk)
        return b"".join(chunks)

    def line(self) -> bytes:
        data = b""
        while not data.endswith(b"\n"):
            chunk = os.read(self.out, 1)
            if not chunk:
                break
            data += chunk
        return data

    def end(self) -> dict[str, Any] | None:
        """The helper's report of the job's end (None: it closed the socket instead)."""
        got = wire.receive(self.sock)
        return got[0] if got is not None else None

    def signal(self, number: int) -> None:
        wire.send(self.sock, {"signal": number})

    def close(self) -> None:
        for fd in (self.out, self.stdin):
            if fd >= 0:
                os.close(fd)
        self.out = self.stdin = -1
        self.sock.close()


WORKER_NOFILE = 512  # the worker's soft bound on descriptors, below its hard one


def _worker_nofile() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE,
                       (WORKER_NOFILE, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))


class Helper:
    """The real helper, started as the worker starts it."""

    def __init__(self, init: str) -> None:
        ours, theirs = socket.socketpair()
        self.init = init
        env = {**os.environ, "REXNET_SANDBOX_INIT": init}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "rexnet.worker.sandboxd", "--control", str(theirs.fileno())],
            pass_fds=[theirs.fileno()], start_new_session=True, stdin=subprocess.DEVNULL,
            stderr=subprocess.PIPE, env=env, preexec_fn=_worker_nofile)
        theirs.close()
        self.control = ours
        self._bases: list[Path] = []

    def job(self, bounds: list[str] | None = None) -> Job:
        """A sandbox, once the helper says it is ready (BOUNDS: the limits its worker sets,
        as rexnet.worker.sandbox says them; None: not said)."""
        mine, theirs = socket.socketpair()
        wire.send(self.control, {"job": True, **({} if bounds is None else {"bounds": bounds})},
                  [theirs.fileno()])
        theirs.close()
        mine.settimeout(TIMEOUT)
        got = wire.receive(mine)
        assert got is not None, "the helper closed a sandbox before it was ready"
        init = got[0]["ready"]
        assert isinstance(init, int) and init > 0
        return Job(mine, init)

    def groups(self) -> list[str]:
        """The job groups this helper made that still exist (every hierarchy)."""
        if not self._bases:
            for line in Path(f"/proc/{self.proc.pid}/cgroup").read_text().splitlines():
                _, controllers, path = line.split(":", 2)
                for name in controllers.split(",") if controllers else [""]:
                    self._bases.append(Path("/sys/fs/cgroup") / name / path.lstrip("/")
                                       / "rexnet-jobs")
        return [g for base in self._bases
                for g in glob.glob(str(base / f"job-{self.proc.pid}-*"))]

    def stop(self) -> str:
        """Let the helper go (as a worker that ends); its complaints."""
        self.control.close()
        try:
            _, err = self.proc.communicate(timeout=TIMEOUT)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        return err.decode(errors="replace")


@pytest.fixture(params=["native", "python"])
def helper(request: pytest.FixtureRequest) -> Iterator[Helper]:
    _require_root()
    native = os.path.join(os.path.dirname(sys.executable), nativeinit.NAME)
    if request.param == "native" and not os.access(native, os.X_OK):
        if os.environ.get("CI") == "true":
            pytest.fail(f"no {nativeinit.NAME} next to {sys.executable}")
        pytest.skip(f"no {nativeinit.NAME} (no C compiler?)")
    h = Helper(request.param)
    yield h
    if h.proc.poll() is None:  # a test that failed midway: its jobs are still open
        h.proc.kill()
        h.proc.wait()


def _gone(cmdline: str, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(" ".join(p.info["cmdline"] or ()) == cmdline
                   for p in psutil.process_iter(["cmdline"])):
            return True
        time.sleep(0.05)
    return False


def _until(check: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return bool(check())


def test_many_concurrent_jobs_each_in_its_own_namespace(helper: Helper) -> None:
    jobs = [helper.job() for _ in range(24)]
    assert len({j.init for j in jobs}) == 24
    limits = Path(f"/proc/{helper.proc.pid}/limits").read_text()
    [files] = [line.split()[3:5] for line in limits.splitlines()
               if line.startswith("Max open files")]
    assert files[0] == files[1] != str(WORKER_NOFILE)  # the helper's own: raised
    for n, job in enumerate(jobs):  # all running at once: each waits for its stdin
        job.start(f'echo "$$ $(ls -d /proc/[0-9]* | wc -l) $(ulimit -n)"; read x; echo "$x"; '
                  f'exit {n}')
    for n, job in enumerate(jobs):
        os.write(job.stdin, f"job {n}\n".encode())
    for n, job in enumerate(jobs):
        # the command is PID 2 of its own namespace (its init is 1), and sees only those
        # and its own subshell's processes
        first, second = job.output().decode().splitlines()
        pid, count, nofile = first.split()
        assert pid == "2" and int(count) <= 6 and second == f"job {n}"
        # the worker's bound on descriptors, not the helper's (which holds every sandbox's)
        assert int(nofile) == WORKER_NOFILE
        assert job.end() == {"code": n, "signal": None, "limit": ""}
        job.close()
    assert _until(lambda: helper.groups() == [])
    assert helper.proc.poll() is None
    assert helper.stop() == ""
    assert helper.proc.returncode == 0


def test_a_fresh_tmp_prepared_ahead_keeps_the_jobs_directory_below_it(helper: Helper,
                                                                     tmp_path: Path) -> None:
    kept = Path("/tmp") / f"rexnet-kept-{os.getpid()}-{time.monotonic_ns()}"
    kept.mkdir()
    try:
        (kept / "here").write_text("kept\n")
        job = helper.job()  # its /tmp was made before the job (and its directory) came
        job.start("cat here; ls -A /tmp; find /var/tmp /dev/shm -mindepth 1 | wc -l; "
                  "touch /tmp/new", cwd=str(kept))
        assert job.output().decode().split() == ["kept", kept.name, "0"]
        assert job.end() == {"code": 0, "signal": None, "limit": ""}
        job.close()
        assert not Path("/tmp/new").exists()
    finally:
        (kept / "here").unlink()
        kept.rmdir()
    assert helper.stop() == ""


def _held(helper: Helper, namespace: str) -> int:
    """How many of the helper's descriptors are the mount namespace NAMESPACE."""
    held = 0
    for fd in os.listdir(f"/proc/{helper.proc.pid}/fd"):
        with contextlib.suppress(OSError):  # closed meanwhile
            held += os.readlink(f"/proc/{helper.proc.pid}/fd/{fd}") == namespace
    return held


def test_the_helper_holds_a_jobs_mount_namespace_and_lets_it_go_after_the_end(
        helper: Helper, request: pytest.FixtureRequest) -> None:
    """The C init hands its mount namespace over with "joined", before any job (nothing
    goes to the helper while the command starts); the Python init once the command runs.
    Either way the helper holds it (its teardown is not the init's exit) until the end."""
    native = request.node.callspec.params["helper"] == "native"
    job = helper.job()
    if native:  # made before the job, and already with the helper at "ready"
        namespace = os.readlink(f"/proc/{job.init}/ns/mnt")
        assert _held(helper, namespace) == 1
    job.start("echo up; read x; echo got $x")
    assert job.line() == b"up\n"
    if not native:
        namespace = os.readlink(f"/proc/{job.init}/ns/mnt")
    assert namespace != os.readlink(f"/proc/{helper.proc.pid}/ns/mnt")
    assert _until(lambda: _held(helper, namespace) == 1)
    if native:  # the init sent nothing more: its socket is still open (it ends with it)
        assert os.path.exists(f"/proc/{job.init}/fd/3")
    os.write(job.stdin, b"on\n")
    assert job.line() == b"got on\n"
    assert job.end() == {"code": 0, "signal": None, "limit": ""}
    job.close()
    assert _until(lambda: _held(helper, namespace) == 0)
    assert helper.stop() == ""


def test_a_job_killed_midway_and_one_whose_worker_socket_closes(helper: Helper) -> None:
    killed, dropped, neighbour = helper.job(), helper.job(), helper.job()
    marks = [sleep_marker() + str(n) for n in range(2)]
    killed.start(f"echo up; sleep {marks[0]} & sleep {marks[0]}")
    dropped.start(f"echo up; (setsid sleep {marks[1]} &); sleep {marks[1]}")
    neighbour.start("echo up; read x; echo got $x")
    for job in (killed, dropped, neighbour):
        assert job.line() == b"up\n"
    killed.signal(signal.SIGKILL)
    assert killed.end() == {"code": None, "signal": signal.SIGKILL, "limit": ""}
    assert _gone(f"sleep {marks[0]}")  # every process of its namespace, the kernel's doing
    dropped.sock.close()  # the worker ended the job, or died: no report, nothing left
    assert _gone(f"sleep {marks[1]}")
    os.write(neighbour.stdin, b"on\n")
    assert neighbour.line() == b"got on\n"
    assert neighbour.end() == {"code": 0, "signal": None, "limit": ""}
    for job in (killed, dropped, neighbour):
        job.close()
    assert _until(lambda: helper.groups() == [])
    assert helper.stop() == ""


def job_python() -> str:
    """An interpreter a job can run: the venv's may lie under /tmp (a clone there), which
    the job's private /tmp hides."""
    python = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
    if python.startswith(("/tmp/", "/var/tmp/", "/dev/shm/")):
        pytest.skip(f"no Python outside the job's private /tmp: {python}")
    return python


def test_memory_bound_and_misbehaving_jobs_leave_their_neighbours_alone(
        helper: Helper) -> None:
    python = job_python()
    neighbours = [helper.job() for _ in range(3)]
    for n, job in enumerate(neighbours):
        job.start(f"read x; echo {n} $x; exit {n + 3}")
    hog, forks, closer, killer = (helper.job() for _ in range(4))
    hog.start(f"exec {python} -c 'x = bytearray(400 << 20); print(len(x))'",
              {"memory": 64 << 20})
    forks.start(f"exec {python} -c '{FORKS}'", {"pids": 16})
    closer.start("exec 0<&- 1>&- 2>&-; sleep 0.3; exit 5")
    mark = sleep_marker()
    killer.start(f"sleep {mark} & kill -9 -1; wait $!; echo $?")
    assert hog.end() == {"code": None, "signal": signal.SIGKILL, "limit": "memory"}
    out = forks.output().decode()
    assert forks.end() == {"code": 7, "signal": None, "limit": ""}
    assert 0 < int(out) < 16  # the pids bound held
    assert closer.output() == b""
    assert closer.end() == {"code": 5, "signal": None, "limit": ""}
    # `kill -9 -1` inside a namespace reaches its own processes only
    assert killer.output().endswith(b"137\n")
    assert killer.end() == {"code": 0, "signal": None, "limit": ""}
    for n, job in enumerate(neighbours):
        os.write(job.stdin, b"fine\n")
        assert job.output() == f"{n} fine\n".encode()
        assert job.end() == {"code": n + 3, "signal": None, "limit": ""}
    for job in (*neighbours, hog, forks, closer, killer):
        job.close()
    assert _until(lambda: helper.groups() == [])
    assert helper.stop() == ""


def _hierarchies(pid: int) -> set[str]:
    """The v1 hierarchies in which process PID is in a job's group."""
    found = set()
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "/rexnet-jobs/job-" in path:
            found.update(controllers.split(","))
    return found


def test_groups_only_in_the_hierarchies_of_the_bounds_and_a_bound_added_later(
        helper: Helper) -> None:
    if not Path("/sys/fs/cgroup/pids/cgroup.procs").exists():
        pytest.skip("no cgroup v1 pids hierarchy here")
    python = job_python()
    # a worker that sets no bounds: its jobs' groups are in the pids hierarchy only
    plain, hog = helper.job([]), helper.job([])
    assert _hierarchies(plain.init) == {"pids"}
    plain.start("cat /proc/self/cgroup")
    inside = {line.split(":")[1] for line in plain.output().decode().splitlines()
              if "/rexnet-jobs/job-" in line}
    assert inside == {"pids"}
    assert plain.end() == {"code": 0, "signal": None, "limit": ""}
    # a job asks for a bound its group lacks: the hierarchy is added, its init moved in,
    # and the bound holds
    hog.start(f"exec {python} -c 'x = bytearray(400 << 20); print(len(x))'",
              {"memory": 64 << 20, "pids": 16})
    assert hog.end() == {"code": None, "signal": signal.SIGKILL, "limit": "memory"}
    # a worker that sets a memory bound: its spares are in the memory hierarchy already
    bounded = helper.job(["memory"])
    assert _hierarchies(bounded.init) == {"pids", "memory"}
    # and one that says nothing (an older worker) gets every hierarchy
    legacy = helper.job()
    assert {"pids", "memory", "cpu"} <= _hierarchies(legacy.init)
    for job in (plain, hog, bounded, legacy):
        job.close()
    assert _until(lambda: helper.groups() == [])
    assert helper.stop() == ""


def test_the_helper_survives_malformed_requests_and_a_stalled_peer(helper: Helper) -> None:
    # on the control socket: bad JSON, no socket, two sockets: each is refused alone
    helper.control.sendall(wire.HEADER.pack(3) + b"{x]")
    a, b = socket.socketpair()
    wire.send(helper.control, {"job": True})
    wire.send(helper.control, {"job": True}, [a.fileno(), b.fileno()])
    for s in (a, b):
        s.close()
    # on a sandbox's socket: bad JSON, descriptors that do not match, an unknown job user;
    # each ends that sandbox only; a peer that stops mid-message blocks nobody
    stalled, bad_json, bad_fds, bad_user, good = (helper.job() for _ in range(5))
    stalled.sock.sendall(wire.HEADER.pack(100) + b'{"argv"')  # and nothing more
    bad_json.sock.sendall(wire.HEADER.pack(4) + b"nope")
    r, w = os.pipe()
    wire.send(bad_fds.sock, {"argv": ["true"], "env": {}, "fds": [0, 1]}, [r])
    wire.send(bad_user.sock, {"argv": ["true"], "env": {}, "fds": [0], "user": 3}, [r])
    for sock in (bad_json.sock, bad_fds.sock, bad_user.sock):
        assert wire.receive(sock) is None  # that sandbox ends, without a job
    good.start("echo fine; exit 4")
    assert good.output() == b"fine\n"
    assert good.end() == {"code": 4, "signal": None, "limit": ""}
    stalled.sock.close()
    for job in (stalled, bad_json, bad_fds, bad_user, good):
        job.close()
    for fd in (r, w):
        os.close(fd)
    assert _until(lambda: helper.groups() == [])
    # a frame over the bounds: the control stream cannot be trusted past it, so the helper
    # takes it as the worker's end (the jobs it runs would run on)
    helper.control.sendall(wire.HEADER.pack(wire.MAX_MESSAGE + 1) + b"....")
    assert helper.proc.wait(timeout=TIMEOUT) == 0
    err = helper.stop()
    for complaint in ("a bad request from the worker: bad JSON", "with 0 sockets",
                      "with 2 sockets", "a bad message from the worker", "cannot start it",
                      f"a message of {wire.MAX_MESSAGE + 1} bytes"):
        assert complaint in err


def test_a_worker_that_goes_ends_its_spares_and_jobs_and_the_helper(helper: Helper) -> None:
    spares = [helper.job() for _ in range(3)]
    running = helper.job()
    mark = sleep_marker()
    running.start(f"echo up; sleep {mark}")
    assert running.line() == b"up\n"
    inits = [psutil.Process(j.init) for j in (*spares, running)]
    helper.control.close()  # the worker let the helper go: its spares end, its job runs on
    assert _until(lambda: not any(p.is_running() for p in inits[:3]))
    assert inits[3].is_running() and helper.proc.poll() is None
    for job in spares:
        assert job.end() is None  # a spare's socket closes
    groups = helper.groups()
    running.sock.close()  # ... until the worker is gone for good
    assert helper.proc.wait(timeout=TIMEOUT) == 0
    assert _gone(f"sleep {mark}")
    assert groups and not any(os.path.exists(g) for g in groups)
    for job in (*spares, running):
        job.close()


def test_jobs_that_find_no_spare_ready_grow_the_spares_and_refill_at_once(
        helper: Helper) -> None:
    """The worker's side (rexnet.worker.sandbox) with the real helper: jobs that come
    faster than spares are prepared each take one being prepared, ask for the missing
    spares at once (no reactor turn in between) and add one, up to the bound; a job that
    finds one ready adds none."""
    sandbox = Sandbox(spares=1, grow_to=3)
    sandbox.control = helper.control
    sandbox.fill()
    taken = [sandbox._take() for _ in range(5)]  # back to back: the helper needs ms each
    assert sandbox.spares == 3 and len(sandbox._ready) == 3
    assert _until(lambda: all(link.ready() for link in sandbox._ready))
    inits = {link.pid for link in sandbox._ready}
    assert len(inits) == 3 and all(psutil.pid_exists(pid) for pid in inits)
    taken.append(sandbox._take())  # ready: the pool does not grow
    assert sandbox.spares == 3 and taken[-1].pid in inits
    for link in taken:
        link.close()
    sandbox.control = None  # the helper's socket is the fixture's to close
    sandbox.stop()
    assert _until(lambda: helper.groups() == [])
    assert helper.stop() == ""



SERVER_CHECKS = r"""
import array, errno, os, socket, struct, sys
from pathlib import Path
from rexnet.worker import nativeinit
from rexnet.worker.nsutil import CLONE_NEWNS, MS_REC, MS_SLAVE, mount, unshare

# as the helper: a mount namespace of its own, a slave of the host's (the spares' private
# /tmp, /proc... never reach the host)
unshare(CLONE_NEWNS)
mount("none", "/", None, MS_REC | MS_SLAVE)
server = nativeinit.Server(sys.argv[1])


def spares():
    found = []
    for p in Path("/proc").glob("[0-9]*"):
        try:
            parent = (p / "stat").read_text().split(") ")[-1].split()[1]
            if parent == str(os.getpid()) and (p / "comm").read_text() == "rexnet-spare\n":
                found.append(p)
        except OSError:
            pass  # gone meanwhile
    return found


def ask(body, count=2):
    # the server's reply, and whether it kept a copy of the descriptors sent
    read, write = os.pipe()
    extra = [os.dup(write) for _ in range(count - 1)]
    fds = array.array("i", [write, *extra][:count])
    server.sock.sendmsg([body], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)] if count else [])
    (reply,) = struct.unpack("=i", server.sock.recv(4))
    for fd in (write, *extra):
        os.close(fd)
    os.set_blocking(read, False)
    try:
        kept = os.read(read, 1) != b""
    except BlockingIOError:
        kept = True  # a writer is still open somewhere
    os.close(read)
    return reply, kept


bound = nativeinit.SERVER_REQUEST
whole = b"\0\0\0\0/" + b"a" * (bound - 6) + b"\0"  # a good request, at the bound
assert len(whole) == bound
refused = [whole + b"/b\0",  # past the bound: cut by the kernel, refused (not served cut)
           b"\0\0\0\0" + b"/x" * bound,  # far past it
           b"\0\0",  # no bound on descriptors
           b"\0\0\0\0/sys/fs/cgroup/x",  # an unterminated path
           b"\0\0\0\0relative\0",  # not a path
           b"\0\0\0\0" + b"/p\0" * 9]  # more groups than any job has
for body in refused:
    assert ask(body) == (-errno.EPROTO, False), body[:20]
for count in (0, 1, 3):
    assert ask(b"\0\0\0\0", count) == (-errno.EPROTO, False), count
assert spares() == []
# served on: a good request (no group), as the helper makes it
control, theirs = socket.socketpair()
status_r, status_w = os.pipe()
pid = server.spawn(theirs, status_w, [], 64)
theirs.close()
os.close(status_w)
control.settimeout(30)
assert control.recv(1) == b"j"  # joined (no group) and made its mount namespace
assert [p.name for p in spares()] == [str(pid)]  # a child of this process, not the server's
nspid = [line for line in Path(f"/proc/{pid}/status").read_text().splitlines()
         if line.startswith("NSpid:")]
assert nspid and nspid[0].split()[-1] == "1", nspid  # PID 1 of a namespace of its own
control.close()  # no job: the spare ends
assert os.waitpid(pid, 0) == (pid, 0)
os.close(status_r)
server.close()  # the server ends at its socket's end
assert os.waitpid(server.pid, 0) == (server.pid, 0)
print("served")
"""


def test_the_init_server_refuses_bad_requests_whole_and_clones_spares() -> None:
    """The C init's fork server (run as the helper runs it): a request past its bound,
    with other than two descriptors or with a malformed body is refused whole (its
    descriptors closed, no spare); then a good one becomes a spare, PID 1 of a new PID
    namespace and a child of the server's parent; the server ends when its socket does."""
    _require_root()
    native = os.path.join(os.path.dirname(sys.executable), nativeinit.NAME)
    if not os.access(native, os.X_OK):
        if os.environ.get("CI") == "true":
            pytest.fail(f"no {nativeinit.NAME} next to {sys.executable}")
        pytest.skip(f"no {nativeinit.NAME} (no C compiler?)")
    done = subprocess.run([sys.executable, "-c", SERVER_CHECKS, native], capture_output=True,
                          timeout=TIMEOUT)
    assert done.returncode == 0 and done.stdout == b"served\n", done.stderr.decode()


def test_a_helper_whose_init_server_died_execs_its_inits(helper: Helper) -> None:
    """The fork server is a shortcut, not a dependency: killed, the helper says so once
    and spawns each spare's init itself again."""
    first = helper.job()
    servers = [p for p in psutil.Process(helper.proc.pid).children()
               if p.name() == nativeinit.SERVER_NAME]
    if helper.init == "python":
        assert servers == []  # forks of the helper: no server
        return
    [server] = servers
    server.kill()
    assert _until(lambda: not server.is_running() or server.status() == psutil.STATUS_ZOMBIE)
    jobs = [helper.job() for _ in range(2)]
    for job in (first, *jobs):
        assert psutil.Process(job.init).ppid() == helper.proc.pid
        job.start("echo $$")
        assert job.output() == b"2\n" and job.end() == {"code": 0, "signal": None, "limit": ""}
        job.close()
    assert "the init server" in helper.stop()


def _pids_base(helper: Helper) -> Path:
    """The jobs' parent group in the v1 pids hierarchy of HELPER."""
    for line in Path(f"/proc/{helper.proc.pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "pids" in controllers.split(","):
            return Path("/sys/fs/cgroup/pids") / path.lstrip("/") / "rexnet-jobs"
    pytest.skip("no cgroup v1 pids hierarchy here")


def _own_group(job: Job, script: str = "", limits: dict[str, Any] | None = None
               ) -> list[str]:
    """Run `sh -c` in JOB: its pids group (as /proc/self/cgroup says), the group's pids.max
    and the processes it holds (cgroup.procs as the job's namespace sees them), then
    SCRIPT's output; the job must exit 0."""
    job.start('g=$(sed -n "s/^[0-9]*:pids://p" /proc/self/cgroup); echo "$g"; '
              'cat "/sys/fs/cgroup/pids$g/pids.max"; '
              'echo $(cat "/sys/fs/cgroup/pids$g/cgroup.procs"); ' + script, limits)
    lines = job.output().decode().splitlines()
    assert job.end() == {"code": 0, "signal": None, "limit": ""}, lines
    return lines


def test_a_group_that_exists_is_never_joined_each_job_gets_a_fresh_one(
        helper: Helper) -> None:
    """A job's control group is made for it (by the C init, or the helper for the Python
    init): a group of the next job's name that is there already (say, with a tight bound
    and a process of another's) is refused, never joined, killed or removed, by either
    init; the next job's group is new, with only that job's bound and processes."""
    if not Path("/sys/fs/cgroup/pids/cgroup.procs").exists():
        pytest.skip("no cgroup v1 pids hierarchy here")
    first = helper.job(["pids"])  # job-PID-1
    trap = _pids_base(helper) / f"job-{helper.proc.pid}-2"  # the next spare's name
    trap.mkdir()
    other = subprocess.Popen(["sleep", sleep_marker()])
    try:
        (trap / "pids.max").write_text("3\n")
        (trap / "cgroup.procs").write_text(str(other.pid))
        # the spare's init (or, for the Python init, the helper) refuses it: the sandbox
        # closes before "ready"
        mine, theirs = socket.socketpair()
        wire.send(helper.control, {"job": True, "bounds": ["pids"]}, [theirs.fileno()])
        theirs.close()
        mine.settimeout(TIMEOUT)
        assert wire.receive(mine) is None
        mine.close()
        group, bound = _own_group(first, "", {"pids": 40})[:2]
        assert group.endswith(f"/rexnet-jobs/job-{helper.proc.pid}-1") and bound == "40"
        second = helper.job(["pids"])  # job-PID-3: fresh, no bound but its own
        group2, bound2, procs2 = _own_group(second, "", {})[:3]
        assert group2.endswith(f"/rexnet-jobs/job-{helper.proc.pid}-3"), group2
        assert bound2 == "max"
        assert set(procs2.split()) <= {"1", "2", "3", "4", "5"}  # its init, sh, a few
        for job in (first, second):
            job.close()
        assert _until(lambda: helper.groups() == [str(trap)])
        time.sleep(0.2)  # (a clean-up would have come by now)
        assert other.poll() is None  # neither killed
        assert (trap / "cgroup.procs").read_text().split() == [str(other.pid)]  # nor joined
        assert (trap / "pids.max").read_text() == "3\n"
    finally:
        other.kill()
        other.wait()
        assert _until(lambda: not (trap / "cgroup.procs").read_text().strip())
        trap.rmdir()
    err = helper.stop()
    assert f"job-{helper.proc.pid}-2" in err and "File exists" in err, err


def test_a_job_cannot_reach_the_previous_jobs_processes(helper: Helper) -> None:
    """A job that leaves a setsid'd process behind: gone with its namespace when it ends,
    and the next job (its group, its /proc, a signal) finds nothing of it."""
    base = Path("/sys/fs/cgroup/pids/cgroup.procs").exists()
    first = helper.job(["pids"])
    mark = sleep_marker()
    first.start(f"(setsid sleep {mark} &); echo up; read x; exit 0")
    assert first.line() == b"up\n"
    assert _until(lambda: any(" ".join(p.info["cmdline"] or ()) == f"sleep {mark}"
                              for p in psutil.process_iter(["cmdline"])))
    [left] = [p.pid for p in psutil.process_iter(["cmdline"])
              if " ".join(p.info["cmdline"] or ()) == f"sleep {mark}"]
    group = f"/job-{helper.proc.pid}-1"
    os.close(first.stdin)
    first.stdin = -1
    assert first.end() == {"code": 0, "signal": None, "limit": ""}
    assert _gone(f"sleep {mark}")
    second = helper.job(["pids"])
    script = (f"kill -0 {left} 2>/dev/null && echo reached; "
              f"ls -d /proc/[0-9]* | wc -l; pgrep -f 'slee[p] {mark}' || echo none")
    if base:  # its own group (pids.max, cgroup.procs: only its own), then the script's
        lines = _own_group(second, script)
        assert not lines[0].endswith(group) and lines[1] == "max", lines
        assert set(lines[2].split()) <= {"1", "2", "3", "4", "5"}, lines
        assert lines[3:] in (["3", "none"], ["4", "none"]), lines
    else:
        second.start(script)
        assert second.output().decode().split()[-1:] == ["none"]
        assert second.end() == {"code": 0, "signal": None, "limit": ""}
    for job in (first, second):
        job.close()
    assert _until(lambda: helper.groups() == [])
    assert helper.stop() == ""


def test_a_request_larger_than_the_sockets_buffer_reaches_the_init_whole(
        helper: Helper) -> None:
    """A job's request of ~360 KB (its environment): past what the init reads with its
    descriptors at once and past the socket's buffer, the helper's one message is sent in
    parts and the init reads the rest; the job gets all of it."""
    job = helper.job()
    in_r, job.stdin = os.pipe()
    job.out, out_w = os.pipe()
    env = {"PATH": os.environ["PATH"], **{f"BIG{n}": str(n) * 60_000 for n in range(6)}}
    try:
        wire.send(job.sock, {
            "argv": ["sh", "-c", 'echo ${#BIG0} ${#BIG5} "$1"', "sh", "x" * 1000],
            "env": env, "cwd": "/", "tty": False, "user": None, "fds": [0, 1, 2],
            "limits": {}}, [in_r, out_w, out_w])
    finally:
        os.close(in_r)
        os.close(out_w)
    assert job.output() == f"60000 60000 {'x' * 1000}\n".encode()
    assert job.end() == {"code": 0, "signal": None, "limit": ""}
    job.close()
    assert _until(lambda: helper.groups() == [])
    assert helper.stop() == ""
