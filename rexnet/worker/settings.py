"""What a worker is told at start (WorkerSettings), and what it knows of a running job."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from rexnet.security.credentials import Credential
from rexnet.security.tls import Revocations
from rexnet.worker.arguments import ArgPolicy
from rexnet.worker.channel import WorkerChannel
from rexnet.worker.commands import CommandPolicy
from rexnet.worker.detached import DEFAULT_KEEP, DEFAULT_OUTPUT, OutputLog
from rexnet.worker.environment import EnvPolicy
from rexnet.worker.files import DEFAULT_JOB_FILES, FileSettings, default_state_dir
from rexnet.worker.job import JobProcess, Limits
from rexnet.worker.jobqueue import default_places
from rexnet.worker.spawn import Isolator


@dataclass(frozen=True)
class WorkerSettings:
    """What a worker serves and how."""

    credential: Credential
    command: tuple[str, ...]
    name: str
    slots: int
    speed: float = 1.0
    allow_args: bool = False
    listen: tuple[str, int] = ("0.0.0.0", 3010)
    groups: tuple[str, ...] = ()
    accept_env: tuple[str, ...] = ()
    job_env: tuple[tuple[str, str | None], ...] = ()  # --job-env NAME[=VALUE]
    allow_arg: tuple[str, ...] = ()  # --allow-arg PATTERN
    keyfile: str | None = None  # where the credential was read (for the start-up check)
    alert_targets: tuple[tuple[str, int], ...] = ()
    chdir: str | None = None
    limits: Limits = field(default_factory=Limits)
    revoked: Revocations | None = None  # rexnet.security.revocation.RevokedFile
    commands: CommandPolicy = field(default_factory=CommandPolicy)
    """--commands / --any-command: the client names the program (then COMMAND is empty)."""
    sandbox: Isolator | None = None  # rexnet.worker.sandbox.Sandbox (a worker started as root)
    state_dir: str = ""  # detached jobs' output and jobs' directories ("": the default)
    job_files: int = DEFAULT_JOB_FILES  # bytes a job's --put (and --get) files may total
    detached_output: int = DEFAULT_OUTPUT  # bytes of a detached job's output kept
    keep_finished: float = DEFAULT_KEEP  # seconds finished jobs are listed (and kept)

    queue: int | None = None  # places in the queue for a slot (None: 4 per slot)

    @property
    def queue_places(self) -> int:
        return default_places(self.slots) if self.queue is None else self.queue

    @property
    def env_policy(self) -> EnvPolicy:
        return EnvPolicy(self.accept_env, self.job_env)

    @property
    def arg_policy(self) -> ArgPolicy:
        return ArgPolicy(self.allow_args, self.allow_arg)

    @property
    def files(self) -> FileSettings:
        """Where this application's job directories and detached output go."""
        root = os.path.join(self.state_dir or default_state_dir(), self.credential.app)
        return FileSettings(root, self.job_files)

    def accepts_env(self, name: str) -> bool:
        """Whether a job may set variable NAME (sshd's AcceptEnv patterns; never a
        loader or interpreter hook: rexnet.worker.environment)."""
        return self.env_policy.accepts(name)


@dataclass
class Running:
    job: str
    channel: WorkerChannel | OutputLog  # an OutputLog for a detached job
    process: JobProcess
    client: str
    argv: list[str] = field(default_factory=list)
    started: float = 0.0
    keep: bool = False  # the client asked to keep the channel for its next job
    slots: int = 1  # the slots it takes (the client's --cpus)
    get: tuple[str, ...] = ()  # the files to send back when the job ends
