"""The worker runs unprivileged and its jobs cannot read its credential (issue P6, point 5).

Design (README, SECURITY.md): start the worker as root with twistd's ``-u USER -g GROUP``.
twistd builds the service first (makeService reads the credential and binds the
announcement port as root), then drops to USER/GROUP, then starts it.  The credential
stays a root-owned 0600 file, so the jobs, which run as USER, cannot open it; and the
worker is non-dumpable (the kernel makes it so on the uid change, and the worker asks
for it too), so jobs of the same user cannot read its memory through /proc or ptrace.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from cluster import TWISTD, Proc, loopback_address, run_exec
from conftest import Keys

SCRIPT = """
echo "uid=$(id -u)"
cat "$KEYFILE" >/dev/null 2>&1 && echo "key: READ" || echo "key: refused"
head -c 1 /proc/$PPID/environ >/dev/null 2>&1 && echo "environ: READ" || echo "environ: refused"
head -c 1 /proc/$PPID/mem >/dev/null 2>&1 && echo "mem: READ" || echo "mem: refused"
"""


@pytest.fixture
def root() -> None:
    if os.geteuid() != 0:
        if os.environ.get("CI") == "true":
            pytest.fail("CI must run as root to test the privilege drop", pytrace=False)
        pytest.skip("needs root to start a worker that drops privileges")


@pytest.fixture
def keydir(keys: Keys, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A world-traversable directory with the worker credential, root-owned 0600: only its
    file mode keeps other users out."""
    directory = Path(tmp_path_factory.mktemp("privkeys"))
    directory.chmod(0o755)
    shutil.copy(keys.worker, directory / "testapp.worker")
    (directory / "testapp.worker").chmod(0o600)
    yield directory


def test_worker_drops_privileges_and_jobs_cannot_read_its_key(root: None, keys: Keys,
                                                             keydir: Path) -> None:
    keyfile = keydir / "testapp.worker"
    addr = f"{loopback_address()}:3010"
    worker = Proc([TWISTD, "-n", "--pidfile=", "-u", "nobody", "-g", "nogroup",
                   "rexnet-worker", "--listen", addr, "--name", "dropped", "--chdir", "/tmp",
                   "--allow-args", "--accept-env", "KEYFILE", str(keyfile), "sh", "-c"])
    try:
        worker.wait_for(r"listening on")
        me = psutil.Process(worker.pid)
        assert me.uids().real == me.uids().effective == me.uids().saved == 65534
        assert set(me.gids()) == {65534}
        done = run_exec(keys.client, [addr], "--env", f"KEYFILE={keyfile}", "--", SCRIPT)
        assert done.returncode == 0, done.stderr
        assert done.stdout.decode().split("\n")[:4] == [
            "uid=65534", "key: refused", "environ: refused", "mem: refused"]
        # the control: root (the test) reads the same file, so "refused" means the mode
        assert keyfile.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
        # and the worker keeps serving after its jobs tried
        again = run_exec(keys.client, [addr], "--", "echo still serving")
        assert again.stdout == b"still serving\n"
    finally:
        worker.stop()
