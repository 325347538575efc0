"""Whether a job's user can read the worker's key file (said in the start-up log)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable


def readable_by(path: str, uid: int, gids: Iterable[int]) -> bool:
    """Whether the user UID with groups GIDS may read PATH, by its owner and mode (root
    reads everything; the directories on the way are not looked at)."""
    info = os.stat(path)
    if uid == 0:
        return True
    if info.st_uid == uid:
        return bool(info.st_mode & stat.S_IRUSR)
    if info.st_gid in set(gids):
        return bool(info.st_mode & stat.S_IRGRP)
    return bool(info.st_mode & stat.S_IROTH)


def key_warning(path: str, uid: int, gids: Iterable[int]) -> str | None:
    """A warning when jobs run as UID (groups GIDS) could read the key file at PATH."""
    try:
        exposed = readable_by(path, uid, gids)
    except OSError:
        return None  # gone or unreachable: nothing a job could read either
    if not exposed:
        return None
    who = "root" if uid == 0 else f"uid {uid}"
    return (f"jobs run as {who}, which can read the worker's key {path}: a job (or an "
            "argument such as its path, with --allow-args) can print it; start the worker "
            "as root with twistd -u USER -g GROUP (the key stays root's, 0600)")


def jobs_identity() -> tuple[int, list[int]]:
    """The uid and groups jobs run with: this process's (after twistd's privilege drop)."""
    return os.getuid(), sorted({os.getgid(), *os.getgroups()})
