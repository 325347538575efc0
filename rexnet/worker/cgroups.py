"""A control group per job: its memory, pids and CPU bounds, and a kill of all it holds.

Used by the root sandbox helper (rexnet.worker.sandboxd). cgroup v2 where /sys/fs/cgroup
is the unified hierarchy (cgroup.kill, or cgroup.freeze and SIGKILL on older kernels);
otherwise v1 with one directory per controller among memory, pids, cpu and freezer
(freezer.state FROZEN, SIGKILL every task, THAWED). A job's group is created below the
helper's own group of each hierarchy (as /proc/self/cgroup names it), so the worker's
own limits still bound its jobs together.

In v1 a job gets a directory only in the hierarchies it needs: pids always (its members,
a kill of all it holds), and those of the bounds the worker sets (memory, cpu); each
directory more costs a mkdir, a migration and an rmdir per job (~60 us of kernel time
together). A bound whose hierarchy a group lacks is added later (add), its init moved in.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import time
from collections.abc import Iterable
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")
V1_CONTROLLERS = ("memory", "pids", "cpu", "freezer")
ALWAYS = "pids"  # the v1 hierarchy every job's group is in
BOUNDS = {"memory": "memory", "pids": "pids", "cpus": "cpu"}  # a job's limit: its controller
CPU_PERIOD = 100_000  # microseconds
PARENT = "rexnet-jobs"


@functools.cache
def _own_paths() -> dict[str, str]:
    """This process's group in each hierarchy: {controller or "" (v2): path} (read once:
    the helper stays where it started)."""
    paths: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            for name in controllers.split(",") if controllers else [""]:
                paths[name] = path
    return paths


@functools.cache
def version() -> int:
    """2 on a unified hierarchy, 1 when v1 controllers are mounted, 0 without cgroups
    (looked at once: the helper mounts what it lacks before its first job)."""
    if (ROOT / "cgroup.controllers").exists():
        return 2
    return 1 if any((ROOT / c / "cgroup.procs").exists() for c in V1_CONTROLLERS) else 0


def forget() -> None:
    """Look again at what is mounted (after mounting the hierarchies: nsutil.mount_cgroups)."""
    for cached in (version, _v1_controllers, _own_paths, _v1_parent):
        cached.cache_clear()


@functools.cache
def _v1_controllers() -> tuple[str, ...]:
    return tuple(c for c in V1_CONTROLLERS if (ROOT / c / "cgroup.procs").exists())


@functools.cache
def _v1_parent(controller: str) -> str:
    """The jobs' parent group in CONTROLLER's hierarchy, below this process's own."""
    own = _own_paths().get(controller, "/").strip("/")
    return f"{ROOT}/{controller}/{own}/{PARENT}".replace("//", "/")


_delegated: set[str] = set()  # the v2 jobs' parents this process has delegated to


def _read(path: str) -> str:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, 1 << 16).decode()
    finally:
        os.close(fd)


def _write(path: str | Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


class JobCgroup:
    """The control group(s) of one job, NAME, below this process's own."""

    def __init__(self, name: str, controllers: Iterable[str] | None = None,
                 make: bool = True) -> None:
        """NAME's group; in v1 in the hierarchies of CONTROLLERS and ALWAYS (None: every
        one mounted). MAKE: make its directories (else the job's C init makes them, the
        parents of procs(), before it joins)."""
        self.version = version()
        self.name = name
        self.made = make  # whether it is known to be this job's (made for it): else only
        # once the job's init said it made and joined it (sandboxd), and until then it is
        # never killed, only removed if empty (a group of that name that was there before
        # is another's)
        if self.version == 2:
            own = _own_paths()
            base = f"{ROOT}/{own.get('', '/').strip('/')}/{PARENT}".replace("//", "/")
            if base not in _delegated:
                self._enable_v2(Path(base))
                _delegated.add(base)
            self.paths = {"": f"{base}/{name}"}
        else:
            mounted = _v1_controllers()
            wanted = [c for c in mounted if controllers is None or c == ALWAYS
                      or c in controllers] or list(mounted[:1])
            self.paths = {c: self._v1_dir(c) for c in wanted}  # (strings: a Path costs
            # ~10 us to make, and a job's group is made and removed with them only)
        self._procs = [f"{d}/cgroup.procs" for d in self.paths.values()]
        for d in self.paths.values() if make else ():
            self._make(d)

    @property
    def dirs(self) -> dict[str, Path]:
        """The group's directory in each hierarchy: {controller or "" (v2): path}."""
        return {c: Path(d) for c, d in self.paths.items()}

    def _v1_dir(self, controller: str) -> str:
        return f"{_v1_parent(controller)}/{self.name}"

    @staticmethod
    def _make(d: str) -> None:
        try:
            os.mkdir(d)
        except FileNotFoundError:  # the first job's: its parent too
            Path(d).mkdir(parents=True, exist_ok=True)

    def add(self, controllers: Iterable[str], pid: int) -> None:
        """In v1, the group in the hierarchies of CONTROLLERS it lacks (those mounted), with
        process PID (the job's init, before it starts the job) moved in."""
        if self.version != 1:
            return
        for controller in controllers:
            if controller in self.paths or controller not in _v1_controllers():
                continue
            d = self.paths[controller] = self._v1_dir(controller)
            self._make(d)
            self._procs.append(f"{d}/cgroup.procs")
            _write(f"{d}/cgroup.procs", str(pid))

    def procs(self) -> list[str]:
        """The group's cgroup.procs files: writing "0" to each moves the writer in."""
        return list(self._procs)

    @staticmethod
    def _enable_v2(base: Path) -> None:
        """Delegate memory, pids and cpu to the jobs' parent group (created if needed)."""
        base.mkdir(exist_ok=True)
        parent = base.parent
        available = (parent / "cgroup.controllers").read_text().split()
        wanted = " ".join(f"+{c}" for c in ("memory", "pids", "cpu") if c in available)
        for group in (parent, base):
            if wanted:
                with contextlib.suppress(OSError):  # EBUSY: processes in PARENT
                    _write(group / "cgroup.subtree_control", wanted)

    def _file(self, controller: str, v1: str, v2: str) -> Path | None:
        if self.version == 2:
            return Path(self.paths[""]) / v2
        d = self.paths.get(controller)
        return Path(d) / v1 if d is not None else None

    def limit(self, memory: int = 0, pids: int = 0, cpus: float = 0.0) -> list[str]:
        """Set the bounds that are not 0; return the names of those this host cannot set."""
        missing = []
        settings: list[tuple[str, str, str, str]] = []
        if memory:
            settings.append(("memory", "memory.limit_in_bytes", "memory.max", str(memory)))
            settings.append(("memory", "memory.memsw.limit_in_bytes", "memory.swap.max",
                             str(memory) if self.version == 1 else "0"))
        if pids:
            settings.append(("pids", "pids.max", "pids.max", str(pids)))
        if cpus:
            quota = max(1000, int(cpus * CPU_PERIOD))
            if self.version == 2:
                settings.append(("cpu", "", "cpu.max", f"{quota} {CPU_PERIOD}"))
            else:
                settings.append(("cpu", "cpu.cfs_period_us", "", str(CPU_PERIOD)))
                settings.append(("cpu", "cpu.cfs_quota_us", "", str(quota)))
        for controller, v1, v2, value in settings:
            path = self._file(controller, v1, v2)
            try:
                if path is None or not path.name:
                    raise OSError
                _write(path, value)
            except OSError:
                if "swap" not in (v1 + v2):  # swap accounting is often off: not a bound
                    missing.append(controller)
        return sorted(set(missing))

    def join(self, pid: int = 0) -> None:
        """Move process PID (0: the calling one) into the group (its children follow)."""
        for d in self.dirs.values():
            _write(d / "cgroup.procs", str(pid))

    def pids(self) -> set[int]:
        found: set[int] = set()
        for procs in self._procs:
            with contextlib.suppress(OSError, ValueError):
                found.update(int(p) for p in _read(procs).split())
        return found

    def _empty(self) -> bool:
        """Whether the group holds no process (a job's are in every hierarchy or none)."""
        try:
            return not self._procs or not _read(self._procs[0]).strip()
        except OSError:
            return True

    def kill(self) -> None:
        """SIGKILL every process in the group, new ones forked meanwhile included."""
        if self.version == 2:
            with contextlib.suppress(OSError):
                _write(self.dirs[""] / "cgroup.kill", "1")
                return
        if self._empty():  # its namespace is gone (the usual case): nothing to freeze
            return
        freezer = self.dirs.get("freezer") if self.version == 1 else self.dirs.get("")
        frozen = False
        if freezer is not None:
            state = freezer / ("freezer.state" if self.version == 1 else "cgroup.freeze")
            with contextlib.suppress(OSError):
                _write(state, "FROZEN" if self.version == 1 else "1")
                frozen = True
        for _ in range(100):
            found = self.pids()
            if not found:
                break
            for pid in found:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if frozen:  # a frozen group gets its SIGKILLs once thawed
                with contextlib.suppress(OSError):
                    _write(state, "THAWED" if self.version == 1 else "0")
                frozen = False
            time.sleep(0.005)

    def memory_exceeded(self) -> bool:
        """Whether the kernel ended a process of the group for its memory bound."""
        if self.version == 2:
            path, key = f"{self.paths['']}/memory.events", "oom_kill"
        elif "memory" in self.paths:
            path, key = f"{self.paths['memory']}/memory.oom_control", "oom_kill"
        else:
            return False
        with contextlib.suppress(OSError, ValueError):
            for line in _read(path).splitlines():
                name, _, value = line.partition(" ")
                if name in (key, "oom_group_kill") and int(value) > 0:
                    return True
        return False

    def discard(self) -> None:
        """Remove the group if it is there and empty (one that was not known to be made for
        the job: never killed)."""
        for d in self.paths.values():
            with contextlib.suppress(OSError):
                os.rmdir(d)

    def release(self) -> None:
        """Kill what the group still holds and remove it. An ended job's group is empty
        (its namespace's processes are gone): removed at once, its kill (belt and braces)
        only for a group that is not (rmdir refuses a group that holds a process)."""
        for d in self.paths.values():
            try:
                os.rmdir(d)
            except FileNotFoundError:
                continue
            except OSError:
                self.kill()
                self.remove()
                return

    def remove(self) -> None:
        """Remove the (empty) group; retried while its last processes are reaped."""
        for d in self.paths.values():
            for _ in range(200):
                try:
                    os.rmdir(d)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.005)
