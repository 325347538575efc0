"""The C init of a sandboxed job (rexnet/worker/native/init.c): its build, start and request.

The root sandbox helper (rexnet.worker.sandboxd) needs a PID 1 for each job's namespace.
A fork of the Python helper costs ~1 ms of page-table copying and as much again in
copy-on-write faults, and its fork of the command the same again; `rexnet-sandbox-init`,
built next to the venv's python where a C compiler works (rexnet.cli.entry builds it), is
spawned instead (vfork and exec of a small program), joins the job's control group itself
and vforks only itself for the command. Where it was not built (or
REXNET_SANDBOX_INIT=python) the helper forks its Python init (rexnet.worker.sandboxinit).

It makes the job's control group (cgroups.JobCgroup(make=False): the group's directories,
the parent of each cgroup.procs file it is given; a mkdir waits for the cgroup lock,
which spares joining their groups hold for ~10 ms: here, not in the helper's loop) and
the job's mount namespace (fresh /tmp, /var/tmp, /dev/shm and /proc) while a spare,
before the job comes (and hands it to the helper with its "joined" byte), and binds a
job's kept directories back once it comes. The request it reads is checked by the helper
first: one message (the init reads it, its descriptors with its first bytes, at once),
a 4-byte big-endian length, then native u32 words - numbers of targets, argv, env, kept directories
and groups; uid, gid, tty; the targets; the groups - then NUL-terminated strings: cwd,
argv, env ("NAME=value"), and per kept directory the index of its private directory ("0"
to "2") and its path.

Where it was built, the helper starts one `rexnet-sandbox-init --server` (Server) and asks
it for each spare: the server clones itself (a small static program: no exec, no page
tables of Python to copy) as PID 1 of a new PID namespace and a child of the helper; its
socket is a socketpair that only the helper holds, and a request past SERVER_REQUEST bytes
or with other than two descriptors is refused whole.
"""

from __future__ import annotations

import array
import errno
import fcntl
import os
import signal
import socket
import struct
import sys
from collections.abc import Sequence

NAME = "rexnet-sandbox-init"
SERVER_NAME = "rexnet-initsrv"  # the fork server's process name (init.c's serve)
SERVER_REQUEST = 4096  # bytes of a request to the fork server at most (MAX_SERVER_REQUEST)
SERVER_TIMEOUT = 5.0  # seconds the server may take to answer
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "native", "init.c")
HEADER = struct.Struct(">I")


def find() -> str | None:
    """The built init next to this python, unless REXNET_SANDBOX_INIT=python; else None."""
    if os.environ.get("REXNET_SANDBOX_INIT") == "python":
        return None
    path = os.path.join(os.path.dirname(sys.executable), NAME)
    return path if os.access(path, os.X_OK) else None


def spawn(path: str, control: socket.socket, status: int, procs: Sequence[str] = (),
          nofile: int = 0) -> int:
    """Start the init at PATH (in the caller's new PID namespace) with CONTROL as its fd 3,
    the status pipe STATUS as its fd 4, and the cgroup.procs files PROCS of the job's
    control group to join; its pid. Nothing else of the caller's is inherited (all its
    descriptors are close-on-exec). NOFILE: the command's soft limit of descriptors
    (0: the caller's)."""
    sources = [control.fileno(), status]
    moved = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 5) if fd in (3, 4) else fd
             for fd in sources]  # so that neither dup2 closes the other's source
    try:
        env = {"REXNET_NOFILE": str(nofile)} if nofile else {}
        return os.posix_spawn(path, [path, *procs], env, file_actions=[
            (os.POSIX_SPAWN_DUP2, moved[0], 3), (os.POSIX_SPAWN_DUP2, moved[1], 4)],
            setsigdef=(signal.SIGCHLD, signal.SIGINT, signal.SIGHUP))  # the helper ignores them
    finally:
        for fd, source in zip(moved, sources, strict=True):
            if fd != source:
                os.close(fd)


class Server:
    """`rexnet-sandbox-init --server` at PATH, the helper's fork server of spare inits (see
    the module docstring); started by the helper (in its mount namespace, as root)."""

    def __init__(self, path: str) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        source = theirs.fileno()
        moved = fcntl.fcntl(source, fcntl.F_DUPFD_CLOEXEC, 5) if source == 3 else source
        try:
            self.pid = os.posix_spawn(path, [path, "--server"], {}, file_actions=[
                (os.POSIX_SPAWN_DUP2, moved, 3)],
                setsigdef=(signal.SIGCHLD, signal.SIGINT, signal.SIGHUP))
        except BaseException:
            ours.close()
            raise
        finally:
            if moved != source:
                os.close(moved)
            theirs.close()
        # the kernel's timeouts (EAGAIN after SERVER_TIMEOUT), not the socket module's: those
        # poll before every send and receive
        timeval = struct.pack("@ll", int(SERVER_TIMEOUT), 0)
        for option in (socket.SO_RCVTIMEO, socket.SO_SNDTIMEO):
            ours.setsockopt(socket.SOL_SOCKET, option, timeval)
        self.sock = ours

    def spawn(self, control: socket.socket, status: int, procs: Sequence[str] = (),
              nofile: int = 0) -> int:
        """As spawn() below, by the server: the spare's pid (a child of this process)."""
        request = struct.pack("=I", nofile) + b"".join(_text(p, "a path") for p in procs)
        if len(request) > SERVER_REQUEST:
            raise ValueError("a request too big for the init server")
        self.sock.sendmsg([request], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                       array.array("i", [control.fileno(), status]))])
        reply = self.sock.recv(4)
        if len(reply) != 4:
            raise OSError(errno.EPIPE, "the init server is gone")
        (pid,) = struct.unpack("=i", reply)
        if pid <= 0:
            raise OSError(-pid, f"the init server: {os.strerror(-pid)}")
        return int(pid)

    def close(self) -> None:
        """Let the server go (it ends at its socket's end)."""
        self.sock.close()


def _text(value: object, what: str) -> bytes:
    if not isinstance(value, str) or "\0" in value:
        raise ValueError(f"{what} is not a string without NUL")
    return value.encode() + b"\0"


def _texts(values: list[object], what: str) -> bytes:
    """Strings without NUL, each NUL-terminated (one join, not one call a string)."""
    if not values:
        return b""
    try:
        joined = "\0".join(values)  # type: ignore[arg-type]  # TypeError: not all strings
    except TypeError:
        raise ValueError(f"{what} is not a string without NUL") from None
    if joined.count("\0") != len(values) - 1:
        raise ValueError(f"{what} is not a string without NUL")
    return joined.encode() + b"\0"


def encode(argv: Sequence[object], env: dict[str, object], cwd: str, tty: bool,
           identity: tuple[int, int, str], targets: Sequence[int],
           kept: Sequence[tuple[int, str]]) -> bytes:
    """The init's request (see the module docstring); ValueError for what it cannot carry."""
    uid, gid, name = identity
    groups = os.getgrouplist(name, gid) if name else ([gid] if uid else [0])
    if not argv:
        raise ValueError("no command")
    if any("=" in k or not k for k in env):
        raise ValueError("an environment variable's name is empty or holds '='")
    words = [len(targets), len(argv), len(env), len(kept), len(groups), uid, gid, int(tty),
             *targets, *groups]
    body = [struct.pack(f"={len(words)}I", *words), _text(cwd, "the directory"),
            _texts(list(argv), "an argument"),
            _texts([f"{k}={v}" if isinstance(v, str) else v for k, v in env.items()],
                   "a variable")]
    for index, path in kept:
        body += [str(index).encode() + b"\0", _text(path, "a directory")]
    data = b"".join(body)
    return HEADER.pack(len(data)) + data


def send(control: socket.socket, request: bytes, fds: Sequence[int], timeout: float
         ) -> None:
    """The request to the init on CONTROL (non-blocking): one message, the descriptors
    FDS on its first bytes (one wake-up of the init, which reads it at once); what the
    socket's buffer did not take is sent waiting up to TIMEOUT seconds."""
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    try:
        sent = control.sendmsg([request], ancillary)
    except BlockingIOError:
        sent = -1
    if sent == len(request):
        return
    control.settimeout(timeout)
    try:
        if sent < 0:
            sent = control.sendmsg([request], ancillary)
        control.sendall(request[sent:])
    finally:
        control.setblocking(False)

