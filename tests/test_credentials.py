"""Making credentials with keygen/issue, and load_credential refusing every unsafe or
wrong file with a CredentialError that says what is wrong."""

from __future__ import annotations

import datetime
import os
import random
import shutil
import stat
from pathlib import Path

import pytest
from conftest import Keys, make_keys

from rexnet.security.credentials import (
    Credential,
    CredentialCache,
    CredentialError,
    Role,
    app_id_of,
    credential_file_bytes,
    identity,
    issue,
    keygen,
    load_ca,
    load_credential,
    write_private,
)

NOW = datetime.datetime.now(datetime.UTC)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def private_file(path: Path, data: bytes) -> Path:
    write_private(path, data)
    return path


def issued_file(
    path: Path, ca_path: Path, role: Role, holder: str, **kwargs: object
) -> Path:
    """A credential file of ROLE for HOLDER issued by the CA in CA_PATH."""
    ca = load_ca(ca_path)
    key, cert = issue(ca.key, ca.cert, role, holder, **kwargs)  # type: ignore[arg-type]
    return private_file(path, credential_file_bytes(key, cert, ca.cert))


def refused(path: Path, role: Role) -> str:
    with pytest.raises(CredentialError) as info:
        load_credential(path, role)
    message = str(info.value)
    assert "\n" not in message
    return message


# -- keygen ---------------------------------------------------------------------------


def test_keygen_writes_three_private_files(tmp_path: Path) -> None:
    paths = keygen("myapp", tmp_path / "new" / "dir")

    assert paths == [tmp_path / "new" / "dir" / f"myapp.{s}" for s in ("ca", "worker", "client")]
    for path in paths:
        assert mode_of(path) == 0o600
    ca = load_ca(paths[0])
    assert ca.app == "myapp"
    worker = load_credential(paths[1], "worker")
    client = load_credential(paths[2], "client")
    assert (worker.app, worker.role, worker.name) == ("myapp", "worker", "worker")
    assert (client.app, client.role, client.name) == ("myapp", "client", "client")
    assert worker.ca_cert == client.ca_cert == ca.cert


def test_keygen_files_are_private_despite_a_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        paths = keygen("myapp", tmp_path)
    finally:
        os.umask(old)
    assert [mode_of(p) for p in paths] == [0o600] * 3


@pytest.mark.parametrize("existing", ["ca", "worker", "client"])
def test_keygen_refuses_to_overwrite(tmp_path: Path, existing: str) -> None:
    (tmp_path / f"myapp.{existing}").write_bytes(b"precious")

    with pytest.raises(CredentialError, match="already exists"):
        keygen("myapp", tmp_path)

    # Nothing was written, and the existing file is untouched.
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"myapp.{existing}"]
    assert (tmp_path / f"myapp.{existing}").read_bytes() == b"precious"


def test_keygen_twice_keeps_the_first_credentials(tmp_path: Path) -> None:
    paths = keygen("myapp", tmp_path)
    before = [p.read_bytes() for p in paths]

    with pytest.raises(CredentialError, match="already exists"):
        keygen("myapp", tmp_path)

    assert [p.read_bytes() for p in paths] == before


def test_keygen_into_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(CredentialError, match="cannot create directory"):
        keygen("myapp", tmp_path / "file")


@pytest.mark.parametrize(
    "app",
    ["", "MyApp", "-app", "app-", "my_app", "my.app", "my/app", "../app", "my app",
     "app\n", "a" * 62, "é"],
)
def test_bad_app_names_are_refused(tmp_path: Path, app: str) -> None:
    with pytest.raises(CredentialError, match="bad application name"):
        keygen(app, tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("app", ["a", "my-app", "app2", "9", "a" * 61])
def test_good_app_names_are_accepted(tmp_path: Path, app: str) -> None:
    keygen(app, tmp_path)
    assert load_credential(tmp_path / f"{app}.worker", "worker").app == app


# -- issue ----------------------------------------------------------------------------


@pytest.mark.parametrize("role", ["worker", "client"])
def test_issue_for_another_holder(keys: Keys, tmp_path: Path, role: Role) -> None:
    path = issued_file(tmp_path / "alice", keys.ca, role, "alice@host.example")

    cred = load_credential(path, role)
    assert (cred.app, cred.role, cred.name) == ("testapp", role, "alice@host.example")
    assert cred.app_id == load_credential(getattr(keys, role), role).app_id
    assert cred.peer_identity() == identity(
        "client" if role == "worker" else "worker", "testapp"
    )


@pytest.mark.parametrize(
    "holder", ["", "-alice", ".alice", "al/ice", "../alice", "al ice", "alice\n", "a" * 65,
               "al:ice"],
)
def test_bad_holder_names_are_refused(keys: Keys, holder: str) -> None:
    ca = load_ca(keys.ca)
    with pytest.raises(CredentialError, match="bad credential name"):
        issue(ca.key, ca.cert, "client", holder)


def test_bad_role_is_refused(keys: Keys) -> None:
    ca = load_ca(keys.ca)
    with pytest.raises(CredentialError, match="bad role 'ca'"):
        issue(ca.key, ca.cert, "ca", "alice")  # type: ignore[arg-type]


# -- loading --------------------------------------------------------------------------


def test_load_accepts_the_right_roles(keys: Keys) -> None:
    worker = load_credential(keys.worker, "worker")
    client = load_credential(keys.client, "client")

    assert isinstance(worker, Credential)
    assert (worker.role, worker.app, worker.path) == ("worker", "testapp", keys.worker)
    assert (client.role, client.app, client.path) == ("client", "testapp", keys.client)
    assert worker.peer_identity() == "client.testapp.rexnet"
    assert client.peer_identity() == "worker.testapp.rexnet"


def test_app_id_is_stable_for_one_application(keys: Keys) -> None:
    first = load_credential(keys.worker, "worker").app_id
    assert len(first) == 16
    assert load_credential(keys.worker, "worker").app_id == first
    assert load_credential(keys.client, "client").app_id == first
    assert app_id_of(load_ca(keys.ca).cert) == first


def test_app_id_differs_between_applications(
    keys: Keys, other_keys: Keys, tmp_path: Path
) -> None:
    ours = load_credential(keys.client, "client").app_id
    theirs = load_credential(other_keys.client, "client").app_id
    # A second CA of the same name is another application too.
    namesake = make_keys(tmp_path, "testapp")
    assert len({ours, theirs, load_credential(namesake.client, "client").app_id}) == 3


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660, 0o606, 0o620])
def test_group_or_world_accessible_file_is_refused(
    keys: Keys, tmp_path: Path, mode: int
) -> None:
    path = tmp_path / "testapp.worker"
    shutil.copyfile(keys.worker, path)
    path.chmod(mode)

    message = refused(path, "worker")
    assert f"{path} is readable by group or others (mode {mode:04o})" in message
    assert f"chmod 600 {path}" in message


def test_missing_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.client"
    assert refused(path, "client") == f"no such credential file: {path}"


def test_directory_is_refused(tmp_path: Path) -> None:
    tmp_path.chmod(0o700)
    assert refused(tmp_path, "client") == f"{tmp_path} is not a regular file"


@pytest.mark.parametrize("damage", ["empty", "random", "truncated", "text", "key-only"])
def test_corrupt_file_is_refused(keys: Keys, tmp_path: Path, damage: str) -> None:
    good = keys.worker.read_bytes()
    data = {
        "empty": b"",
        "random": random.Random(1).randbytes(1024),
        "truncated": good[: len(good) // 2],
        "text": b"hello, I am not a credential\n",
        "key-only": good[: good.index(b"-----BEGIN CERTIFICATE")],
    }[damage]
    path = private_file(tmp_path / "testapp.worker", data)

    message = refused(path, "worker")
    assert message.startswith(f"{path} is not a rexnet ")
    assert "credential" in message


def test_file_that_is_too_large_is_refused(keys: Keys, tmp_path: Path) -> None:
    path = private_file(tmp_path / "big", keys.worker.read_bytes() + b"\n" * 70_000)
    assert refused(path, "worker") == f"{path} is too large to be a rexnet credential"


@pytest.mark.parametrize(
    ("have", "need"), [("worker", "client"), ("client", "worker")]
)
def test_wrong_role_is_refused(keys: Keys, have: Role, need: Role) -> None:
    path = getattr(keys, have)
    message = refused(path, need)
    assert message == (
        f"{path} is a {have} credential, but a {need} credential is needed here "
        f"(use the APP.{need} file)"
    )


@pytest.mark.parametrize("role", ["worker", "client"])
def test_ca_file_is_not_a_credential(keys: Keys, role: Role) -> None:
    message = refused(keys.ca, role)
    assert message.startswith(f"{keys.ca} is not a rexnet {role} credential")


def test_credential_is_not_a_ca_file(keys: Keys) -> None:
    with pytest.raises(CredentialError, match="is not an application CA file"):
        load_ca(keys.worker)


def test_cert_of_another_application_bundled_with_our_ca_is_refused(
    keys: Keys, other_keys: Keys, tmp_path: Path
) -> None:
    theirs = load_ca(other_keys.ca)
    ours = load_ca(keys.ca)
    key, cert = issue(theirs.key, theirs.cert, "worker", "intruder")
    path = private_file(tmp_path / "mixed", credential_file_bytes(key, cert, ours.cert))

    message = refused(path, "worker")
    assert message == (
        f"{path}: the certificate was not issued by the application CA in the same file"
    )


def test_cert_of_a_namesake_ca_bundled_with_our_ca_is_refused(
    keys: Keys, tmp_path: Path
) -> None:
    """Another CA calling itself testapp has the same names but not the same key."""
    namesake = load_ca(make_keys(tmp_path / "namesake", "testapp").ca)
    ours = load_ca(keys.ca)
    assert namesake.cert.subject == ours.cert.subject
    key, cert = issue(namesake.key, namesake.cert, "client", "client")
    path = private_file(tmp_path / "mixed", credential_file_bytes(key, cert, ours.cert))

    assert "not issued by the application CA" in refused(path, "client")


def test_key_not_matching_cert_is_refused(keys: Keys, tmp_path: Path) -> None:
    ca = load_ca(keys.ca)
    _, cert = issue(ca.key, ca.cert, "worker", "w1")
    other_key, _ = issue(ca.key, ca.cert, "worker", "w1")
    path = private_file(tmp_path / "w", credential_file_bytes(other_key, cert, ca.cert))

    assert refused(path, "worker") == f"{path}: the private key does not match the certificate"


def test_expired_certificate_is_refused(keys: Keys, tmp_path: Path) -> None:
    path = issued_file(tmp_path / "old", keys.ca, "client", "bob", days=1,
                       now=NOW - datetime.timedelta(days=10))

    message = refused(path, "client")
    assert message.startswith(f"{path}: certificate expired on ")
    assert "rexnet keygen --issue client --name bob testapp.ca" in message


def test_not_yet_valid_certificate_is_refused(keys: Keys, tmp_path: Path) -> None:
    path = issued_file(tmp_path / "future", keys.ca, "worker", "w2",
                       now=NOW + datetime.timedelta(days=10))

    message = refused(path, "worker")
    assert message.startswith(f"{path}: certificate not valid before ")


def test_short_lived_certificate_is_accepted_while_valid(keys: Keys, tmp_path: Path) -> None:
    path = issued_file(tmp_path / "short", keys.ca, "worker", "w3", days=1,
                       now=NOW - datetime.timedelta(hours=23))
    assert load_credential(path, "worker").name == "w3"


# -- the cache of loaded credentials -----------------------------------------------------

def test_a_kept_credential_is_read_again_when_its_file_changes(
        keys: Keys, tmp_path: Path) -> None:
    """Loaded once while the file stays as it was; a file replaced by another holder's
    credential gives that one, a file made readable by others is refused, a file gone is
    refused in load_credential's words."""
    path = tmp_path / "testapp.client"
    shutil.copyfile(keys.client, path)
    path.chmod(0o600)
    cache = CredentialCache("client")
    first = cache.load(path)
    assert cache.load(str(path)) is first

    other = issued_file(tmp_path / "other.client", keys.ca, "client", "someone-else")
    os.replace(other, path)
    replaced = cache.load(path)
    assert replaced is not first and replaced.name != first.name
    assert cache.load(path) is replaced

    path.chmod(0o644)
    with pytest.raises(CredentialError, match="readable by group or others"):
        cache.load(path)
    path.unlink()
    with pytest.raises(CredentialError, match="no such credential file"):
        cache.load(path)
