"""The worker's cache of passwd look-ups (rexnet.worker.environment.UserVariables): a job's
HOME, USER and LOGNAME come from it, and an edit of the passwd file reaches the next jobs
within a second."""

from __future__ import annotations

import os
from pathlib import Path

from rexnet.worker.environment import UserVariables, passwd_variables


class PasswdFile:
    """A passwd file of the test's own, read by a lookup that counts its reads."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.reads = 0

    def write(self, home: str, *, mtime_ns: int | None = None) -> None:
        self.path.write_text(f"root:x:0:0:root:/root:/bin/sh\nann:x:1000:1000::{home}:/bin/sh\n")
        if mtime_ns is not None:
            os.utime(self.path, ns=(mtime_ns, mtime_ns))

    def lookup(self, uid: int) -> dict[str, str]:
        self.reads += 1
        for line in self.path.read_text().splitlines():
            name, _, number, _, _, home, _ = line.split(":")
            if int(number) == uid:
                return {"HOME": home, "USER": name, "LOGNAME": name}
        return {"HOME": "/"}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def cache(tmp_path: Path) -> tuple[UserVariables, PasswdFile, Clock]:
    passwd, clock = PasswdFile(tmp_path / "passwd"), Clock()
    passwd.write("/home/ann")
    return UserVariables(str(passwd.path), passwd.lookup, clock), passwd, clock


def test_a_uid_is_read_once_while_the_file_stays_the_same(tmp_path: Path) -> None:
    users, passwd, clock = cache(tmp_path)
    for _ in range(3):
        assert users(1000) == {"HOME": "/home/ann", "USER": "ann", "LOGNAME": "ann"}
        clock.now += 5.0  # each check finds the file unchanged
    assert users(0)["HOME"] == "/root"
    assert users(4242) == {"HOME": "/"}
    assert users(4242) == {"HOME": "/"}
    assert passwd.reads == 3  # one per uid


def test_an_edit_is_seen_within_a_second(tmp_path: Path) -> None:
    users, passwd, clock = cache(tmp_path)
    assert users(1000)["HOME"] == "/home/ann"
    passwd.write("/srv/annabel")  # another size
    clock.now += 0.5
    assert users(1000)["HOME"] == "/home/ann"  # not checked yet: at most once a second
    clock.now += 0.5
    assert users(1000)["HOME"] == "/srv/annabel"
    assert passwd.reads == 2


def test_a_file_moved_in_place_of_the_same_size_and_time_is_seen(tmp_path: Path) -> None:
    users, passwd, clock = cache(tmp_path)
    stamp = passwd.path.stat().st_mtime_ns
    assert users(1000)["HOME"] == "/home/ann"
    new = PasswdFile(tmp_path / "passwd.new")
    new.write("/home/bob", mtime_ns=stamp)  # same length, same modification time
    os.replace(new.path, passwd.path)  # a new inode (as vipw and useradd leave it)
    clock.now += 1.0
    assert users(1000)["HOME"] == "/home/bob"


def test_an_edit_keeping_size_and_inode_is_seen_by_its_time(tmp_path: Path) -> None:
    users, passwd, clock = cache(tmp_path)
    stamp = passwd.path.stat().st_mtime_ns
    assert users(1000)["HOME"] == "/home/ann"
    passwd.write("/home/bob", mtime_ns=stamp + 1_000_000)
    clock.now += 1.0
    assert users(1000)["HOME"] == "/home/bob"


def test_entries_are_read_again_after_max_age(tmp_path: Path) -> None:
    users, passwd, clock = cache(tmp_path)
    users(1000)
    clock.now += UserVariables.MAX_AGE - 1
    users(1000)
    assert passwd.reads == 1
    clock.now += 1
    users(1000)  # entries from NSS sources other than the file (LDAP) age out too
    assert passwd.reads == 2


def test_without_a_passwd_file_nothing_is_kept(tmp_path: Path) -> None:
    users, passwd, _clock = cache(tmp_path)
    users.path = str(tmp_path / "absent")
    users(1000)
    users(1000)
    assert passwd.reads == 2


def test_the_cache_is_bounded_and_hands_out_copies(tmp_path: Path) -> None:
    users, _passwd, _clock = cache(tmp_path)
    for uid in range(UserVariables.LIMIT + 10):
        users(uid)
    assert len(users._entries) <= UserVariables.LIMIT
    users(1000)["HOME"] = "/changed by a caller"
    assert users(1000)["HOME"] == "/home/ann"


def test_the_default_cache_reads_the_system_passwd() -> None:
    users = UserVariables()
    assert users(os.getuid()) == passwd_variables(os.getuid())
    assert users(2**31 - 3) == {"HOME": "/"}
