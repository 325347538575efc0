"""Shared fixtures: credentials made once per session, the namespace test bed, and a reactor
of a test's own (files with another kind of reactor define their own `reactor`)."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from rexnet.security.credentials import keygen


@dataclass(frozen=True)
class Keys:
    """Credential files of one application."""

    app: str
    ca: Path
    worker: Path
    client: Path

    @property
    def ca_pem(self) -> Path:
        """The CA certificate alone (APP.ca.pem), what crat and cproxy --trust."""
        return self.ca.with_name(f"{self.app}.ca.pem")


def make_keys(directory: Path, app: str) -> Keys:
    ca, worker, client = keygen(app, directory)
    return Keys(app, ca, worker, client)


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    """Credentials of the application 'testapp'."""
    return make_keys(tmp_path_factory.mktemp("keys"), "testapp")


@pytest.fixture(scope="session")
def other_keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    """Credentials of another application, 'otherapp'."""
    return make_keys(tmp_path_factory.mktemp("otherkeys"), "otherapp")


@pytest.fixture
def reactor() -> Iterator[Any]:
    """A reactor of its own that runs only when a test turns it (reactor.iterate)."""
    from twisted.internet.epollreactor import EPollReactor

    reactor = EPollReactor()
    yield reactor
    reactor.removeAll()
    reactor.waker.connectionLost(None)  # type: ignore[attr-defined]


@pytest.fixture
def bed() -> Iterator[object]:
    """A fresh network-namespace test bed (skips outside CI when not root)."""
    from netbed import netbed_fixture

    yield from netbed_fixture()


@pytest.fixture(params=["python", "native"])
def launcher(request: pytest.FixtureRequest) -> str:
    """Each launcher behind `rexnet` (rexnet.cli.entry): the Python script (python -I -S)
    and the native one, which is built only where a C compiler works (else skipped; under
    CI=true it fails when a compiler is there)."""
    import shutil

    from cluster import LAUNCHERS

    path = LAUNCHERS[request.param]
    if not os.path.exists(path):
        if request.param == "native" and not (os.environ.get("CI") and shutil.which("cc")):
            pytest.skip("no native launcher: no C compiler when rexnet was installed")
        pytest.fail(f"{path} is missing: run make install")
    return path


@pytest.fixture(autouse=True)
def agent_sockets(tmp_path_factory: pytest.TempPathFactory,
                  monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Each test has its own agents (XDG_RUNTIME_DIR in a fresh directory: one agent per
    network namespace the test runs `rexnet exec` in); they are stopped afterwards."""
    runtime = tmp_path_factory.mktemp("run")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    monkeypatch.delenv("REXNET_AGENT_SOCKET", raising=False)
    monkeypatch.delenv("REXNET_NO_AGENT", raising=False)
    yield runtime
    stop_agents(runtime)


def stop_agents(directory: Path) -> None:
    """End the agents whose pid files are under DIRECTORY (they were started by a test)."""
    pids = []
    for pidfile in directory.rglob("*.pid"):
        try:
            pid = int(pidfile.read_text())
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"agent" not in f.read():
                    continue  # that agent is gone (killed by the test); its pid is reused
            os.kill(pid, signal.SIGTERM)
            pids.append(pid)
        except (OSError, ValueError):
            continue
    deadline = time.monotonic() + 5
    for pid in pids:
        while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
            time.sleep(0.02)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
