"""A single-node Slurm (slurmctld + slurmd in one namespace, munge on the machine) for
`srun true`, the peer of a warm job start.  Installs slurm-wlm's parts with apt if missing.

start() returns "" when `srun` works, else a one-line reason (recorded in RESULTS.md).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

PACKAGES = ["slurmd", "slurmctld", "slurm-client", "munge"]


class Slurm:
    def __init__(self, host: Any, work: Path) -> None:
        self.host = host
        self.work = work
        self.env = dict(os.environ, SLURM_CONF=str(work / "slurm.conf"))
        self.procs: list[Any] = []
        self.munged: subprocess.Popen[bytes] | None = None

    def _install(self) -> str:
        if all(shutil.which(t) for t in ("slurmd", "slurmctld", "srun", "munged")):
            return ""
        done = subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends",
                               *PACKAGES], capture_output=True, timeout=600,
                              env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        return "" if done.returncode == 0 else f"apt-get install failed: {done.stderr[-200:]!r}"

    def start(self) -> str:
        problem = self._install()
        if problem:
            return problem
        name, addr = socket.gethostname(), self.host.addr()
        for d in ("state", "spool", "log"):
            (self.work / d).mkdir(parents=True, exist_ok=True)
        w = self.work
        (w / "slurm.conf").write_text(f"""ClusterName=rexbench
SlurmctldHost={name}({addr})
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation={w}/state
SlurmdSpoolDir={w}/spool
SlurmctldPidFile={w}/slurmctld.pid
SlurmdPidFile={w}/slurmd.pid
SlurmctldLogFile={w}/log/slurmctld.log
SlurmdLogFile={w}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SwitchType=switch/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmctldPort=6817
SlurmdPort=6818
NodeName={name} NodeAddr={addr} CPUs={os.cpu_count() or 1} State=UNKNOWN
PartitionName=bench Nodes={name} Default=YES MaxTime=INFINITE State=UP
""")
        (w / "cgroup.conf").write_text("CgroupPlugin=cgroup/v1\nCgroupAutomount=no\n")
        socket_path = Path("/run/munge/munge.socket.2")
        if not socket_path.exists():
            Path("/run/munge").mkdir(exist_ok=True)
            key = Path("/etc/munge/munge.key")
            if not key.exists():
                subprocess.run(["mungekey", "--create"], capture_output=True)
            self.munged = subprocess.Popen(["munged", "--foreground", "--force"],
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for _ in range(50):
                if socket_path.exists():
                    break
                time.sleep(0.1)
        for argv in (["slurmctld", "-D", "-i"], ["slurmd", "-D", "-N", name]):
            self.procs.append(self.host.popen(argv, env=self.env, stdout=subprocess.DEVNULL,
                                              stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + 30
        last = ""
        while time.monotonic() < deadline:
            done = self.host.run(self.srun(["true"]), env=self.env, timeout=20)
            if done.returncode == 0:
                return ""
            lines = (done.stderr or "").strip().splitlines()
            last = lines[-1] if lines else ""
            time.sleep(1.0)
        self.stop()
        return f"srun did not work within 30 s: {last[:200]}"

    def srun(self, command: list[str]) -> list[str]:
        return ["srun", "-N1", "-n1", "--immediate=5", *command]

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.procs = []
        if self.munged is not None and self.munged.poll() is None:
            self.munged.terminate()
            self.munged.wait(10)
            self.munged = None
