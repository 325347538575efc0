"""The C init of a sandboxed job (rexnet/worker/native/init.c): its build, start and request.

The root sandbox helper (rexnet.worker.sandboxd) needs a PID 1 for each job's namespace.
A fork of the Python helper costs ~1 ms of page-table copying and as much again in
copy-on-write faults, and its fork of the command the same again; `rexnet-sandbox-init`,
built next to the venv's python where a C compiler works (rexnet.cli.entry builds it), is
spawned instead (vfork and exec of a small program), joins the job's control group itself
and vforks only itself for the command. Where it was not built (or
REXNET_SANDBOX_INIT=python) the helper forks its Python init (rexnet.worker.sandboxinit).

It makes the job's mount namespace (fresh /tmp, /var/tmp, /dev/shm and /proc) while a
spare, before the job comes (and hands it to the helper with its "joined" byte), and
binds a job's kept directories back once it comes. The
request it reads is checked by the helper first: a 4-byte big-endian length, then (with
the job's descriptors) native u32 words - numbers of targets, argv, env, kept directories
and groups; uid, gid, tty; the targets; the groups - then NUL-terminated strings: cwd,
argv, env ("NAME=value"), and per kept directory the index of its private directory ("0"
to "2") and its path.
"""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import struct
import sys
from collections.abc import Sequence

from rexnet.worker import sandboxwire

NAME = "rexnet-sandbox-init"
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


def _text(value: object, what: str) -> bytes:
    if not isinstance(value, str) or "\0" in value:
        raise ValueError(f"{what} is not a string without NUL")
    return value.encode() + b"\0"


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
    body = [struct.pack(f"={len(words)}I", *words), _text(cwd, "the directory")]
    body += [_text(a, "an argument") for a in argv]
    body += [_text(f"{k}={v}" if isinstance(v, str) else v, "a variable")
             for k, v in env.items()]
    for index, path in kept:
        body += [str(index).encode() + b"\0", _text(path, "a directory")]
    data = b"".join(body)
    return HEADER.pack(len(data)) + data


def send(control: socket.socket, request: bytes, fds: Sequence[int]) -> None:
    """The request to the init: its length alone, then the rest with the descriptors."""
    control.sendall(request[:HEADER.size])
    sandboxwire.send_with_fds(control, request[HEADER.size:], fds)

