"""Where and what a job runs: its argv and working directory, from START and the worker's
COMMAND or allow-list of programs; and whether its client may still run jobs."""

from __future__ import annotations

import os
from typing import Any

from rexnet.protocol import wire
from rexnet.security.credentials import check_validity
from rexnet.security.tls import Revocations
from rexnet.worker.commands import CommandPolicy, CommandRefused
from rexnet.worker.machine import Refusal
from rexnet.worker.settings import WorkerSettings


def place(commands: CommandPolicy, command: tuple[str, ...], start: wire.Start,
          chdir: str | None, name: str) -> tuple[list[str], str | None] | Refusal:
    """The argv and directory of START's job: COMMAND and its arguments in CHDIR (a fixed
    COMMAND), or the program START names if COMMANDS allows it, in the client's directory
    when this host has it (else CHDIR, unless the client required its own); or why not."""
    if not commands.enabled:
        if start.cwd_required:
            return Refusal("cwd", f"worker {name} runs its fixed command in its own "
                           "directory: --cwd is for command workers (--commands)")
        return [*command, *start.args], chdir
    if not start.args:
        return Refusal("command", "this worker runs the program the client names: give "
                       "one after --, as in `rexnet exec APP -- cc -c foo.c`")
    program = commands.resolve(start.args[0])
    if isinstance(program, CommandRefused):
        return Refusal(program.reason, program.message)
    cwd = chdir
    if start.cwd:
        if os.path.isdir(start.cwd):
            cwd = start.cwd
        elif start.cwd_required:
            return Refusal("cwd", f"worker {name} has no directory {start.cwd[:300]}")
    return [program, *start.args[1:]], cwd


def refusal_before_queue(s: WorkerSettings, start: wire.Start) -> Refusal | None:
    """Why worker S will not run START whatever its load, or None (checked before a job
    waits in the queue; the worker checks everything again when it starts the job)."""
    if not s.commands.enabled:
        bad_args = s.arg_policy.refusal(start.args)
        if bad_args:
            return Refusal("args", bad_args)
    if start.tty and start.fds:
        return Refusal("fds", "--fd cannot be combined with a terminal (use -T)")
    if (start.workers and s.name not in start.workers) or start.cpus > s.slots:
        return Refusal("placement", f"worker {s.name} cannot take this job (its "
                       "--worker or --cpus)")
    return None


def client_refusal(cert: Any, revoked: Revocations | None) -> str | None:
    """Why a warm channel's client may no longer run jobs (its certificate CERT expired or
    was revoked since the handshake), or None."""
    expired = check_validity(cert)
    if expired:
        return f"the client's certificate {expired}"
    reason = revoked.reason(cert) if revoked else None
    return f"the client's {reason}" if reason else None
