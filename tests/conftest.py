"""Shared fixtures: credentials made once per session, and the namespace test bed."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from rexnet.credentials import keygen


@dataclass(frozen=True)
class Keys:
    """Credential files of one application."""

    app: str
    ca: Path
    worker: Path
    client: Path


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
def bed() -> Iterator[object]:
    """A fresh network-namespace test bed (skips outside CI when not root)."""
    from netbed import netbed_fixture

    yield from netbed_fixture()
