"""The worker's policies, pure (issue P10 items 9, 10, 13): the job's environment, the
extra arguments a client may append, whether jobs can read the key, and another
application's datagrams spending none of the worker's rate limits (with a Clock).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import Keys
from test_impostors import announcement
from twisted.internet.task import Clock

from rexnet.protocol import wire
from rexnet.security.credentials import load_credential
from rexnet.worker.arguments import ArgPolicy, matches
from rexnet.worker.environment import BASE_PATH, EnvPolicy, never_accepted, parse_job_env
from rexnet.worker.keyexposure import key_warning, readable_by
from rexnet.worker.load import HostLoad
from rexnet.worker.service import GLOBAL_BURST, Worker, WorkerSettings

# -- environment ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["LD_PRELOAD", "LD_AUDIT", "PATH", "BASH_ENV", "ENV",
                                  "PYTHONPATH", "PYTHONSTARTUP", "PERL5LIB", "PERL5OPT",
                                  "GCONV_PATH", "GLIBC_TUNABLES", "REXNET_CLIENT", "IFS",
                                  "SHELLOPTS", "BASHOPTS", "NODE_OPTIONS", "RUBYOPT",
                                  "JAVA_TOOL_OPTIONS", "BASH_FUNC_ls%%", "HOME", "TERMINFO"])
def test_hooks_are_never_accepted_whatever_the_patterns(name: str) -> None:
    assert never_accepted(name)
    policy = EnvPolicy(accept=("*",))
    assert not policy.accepts(name)
    sorted_ = policy.sort([(name, "x"), ("LANGUAGE", "fr")])
    assert sorted_.forbidden == (name,) and sorted_.accepted == {"LANGUAGE": "fr"}
    assert f"never lets a client set {name}:" in sorted_.forbidden_message()


@pytest.mark.parametrize("name", ["LANG", "LC_ALL", "TZ", "MY_VAR", "PATHOLOGY", "LDX"])
def test_ordinary_variables_follow_the_patterns(name: str) -> None:
    assert not never_accepted(name)
    assert EnvPolicy(accept=("*",)).accepts(name)
    assert not EnvPolicy(accept=("NOTHING",)).accepts(name)


def test_refused_and_forbidden_are_apart() -> None:
    got = EnvPolicy(accept=("LC_*",)).sort([("LC_ALL", "C"), ("OTHER", "1"), ("PATH", "/x"),
                                            ("PATH", "/y")])
    assert (got.accepted, got.refused, got.forbidden) == ({"LC_ALL": "C"}, ("OTHER",),
                                                          ("PATH",))


def test_the_job_environment_is_built_from_a_minimal_base() -> None:
    worker_env = {"SECRET": "hunter2", "LANG": "fr_FR.UTF-8", "KEEP": "kept",
                  "PATH": "/worker/bin", "LD_PRELOAD": "/worker.so"}
    policy = EnvPolicy(accept=("*",), configured=(("KEEP", None), ("TZ", "UTC"),
                                                  ("ABSENT", None)))
    env = policy.build({"MINE": "1"}, {"REXNET_JOB_ID": "j"}, uid=0, term="xterm",
                       source=worker_env)
    assert env == {"PATH": BASE_PATH, "HOME": "/root", "USER": "root", "LOGNAME": "root",
                   "LANG": "fr_FR.UTF-8", "KEEP": "kept", "TZ": "UTC", "MINE": "1",
                   "TERM": "xterm", "REXNET_JOB_ID": "j"}
    assert "TERM" not in policy.build({}, {}, uid=0, source={})
    assert policy.build({}, {}, uid=0, term="", source={})["TERM"] == "dumb"
    assert policy.build({}, {}, uid=2**31 - 3, source={})["HOME"] == "/"  # no passwd entry


@pytest.mark.parametrize(("spec", "parsed"), [("TZ", ("TZ", None)), ("TZ=UTC", ("TZ", "UTC")),
                                              ("A=b=c", ("A", "b=c")), ("E=", ("E", ""))])
def test_job_env_specs(spec: str, parsed: tuple[str, str | None]) -> None:
    assert parse_job_env(spec) == parsed


@pytest.mark.parametrize("spec", ["", "=x", "A B=1", "A\0=1"])
def test_bad_job_env_specs(spec: str) -> None:
    with pytest.raises(ValueError, match="use NAME or NAME=VALUE"):
        parse_job_env(spec)


# -- arguments ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("arg", "pattern", "ok"), [
    ("a.csv", "*.csv", True), ("../a.csv", "*.csv", False), ("/etc/a.csv", "*.csv", False),
    ("d/a.csv", "*/*.csv", True), ("../a.csv", "*/*.csv", False), (".a.csv", "*.csv", False),
    (".a.csv", ".*.csv", True), ("-n", "[!-]*", False), ("n", "[!-]*", True),
    ("--help", "*", True), ("42", "[0-9]*", True), ("A.CSV", "*.csv", False),
])
def test_arguments_match_as_file_names_do(arg: str, pattern: str, ok: bool) -> None:
    assert matches(arg, pattern) is ok


def test_the_argument_policy() -> None:
    assert ArgPolicy().refusal([]) is None
    assert "does not accept extra arguments" in (ArgPolicy().refusal(["x"]) or "")
    assert ArgPolicy(any=True).refusal(["/etc/shadow"]) is None
    assert ArgPolicy(any=True).warning() is not None
    strict = ArgPolicy(any=True, patterns=("[!-]*.txt", "[0-9]*"))
    assert strict.warning() is None and strict.allows_args
    assert strict.refusal(["a.txt", "12"]) is None
    why = strict.refusal(["a.txt", "/k/app.worker"]) or ""
    assert "does not accept the argument '/k/app.worker'" in why
    assert "--allow-arg patterns ([!-]*.txt, [0-9]*)" in why
    assert len(strict.refusal(["x" * 5000]) or "") < 300  # long arguments are shortened


# -- the key ------------------------------------------------------------------------------------


def test_who_can_read_the_key(tmp_path: Path) -> None:
    key = tmp_path / "app.worker"
    key.write_text("secret")
    if os.geteuid() == 0:
        os.chown(key, 1000, 2000)  # a key of another user than the test's
    owner, group = key.stat().st_uid, key.stat().st_gid
    key.chmod(0o600)
    assert readable_by(str(key), owner, [])
    assert not readable_by(str(key), owner + 1, [group])
    assert readable_by(str(key), 0, [])  # root reads everything
    key.chmod(0o640)
    assert readable_by(str(key), owner + 1, [group]) and not readable_by(str(key), owner + 1, [])
    key.chmod(0o604)
    assert readable_by(str(key), owner + 1, [])
    key.chmod(0o000)
    assert not readable_by(str(key), owner, [group])
    warning = key_warning(str(key), 0, [0]) or ""
    assert "jobs run as root, which can read the worker's key" in warning
    assert key_warning(str(key), owner + 1, []) is None
    assert key_warning(str(tmp_path / "missing"), 0, []) is None


# -- another application's datagrams -------------------------------------------------------


def test_another_applications_flood_spends_no_tokens(keys: Keys, other_keys: Keys) -> None:
    """Before this fix the global bucket was spent before the application filter, so a
    flood of another application's datagrams from many sources starved this one."""
    clock = Clock()
    clock.advance(1000)
    worker = Worker(WorkerSettings(load_credential(keys.worker, "worker"), ("true",), "w", 2),
                    clock, sample=lambda: HostLoad(0.0, 1, 1 << 30))
    other = load_credential(other_keys.client, "client")
    junk = announcement(other.app_id, other.key, other.cert_der, 9)
    for n in range(int(GLOBAL_BURST) * 3):  # many sources, all within 0.1 s
        worker.datagram(junk, f"10.2.{n >> 8}.{n & 255}", 1)
        clock.advance(0.1 / (GLOBAL_BURST * 3))
    assert worker.foreign == GLOBAL_BURST * 3 and worker.rate_limited == 0
    assert worker.complain.count == 0
    ours = load_credential(keys.client, "client")
    real = announcement(ours.app_id, ours.key, ours.cert_der, 9)
    worker.datagram(real, "127.0.0.1", 1)
    message = wire.decode_datagram(real).message
    assert isinstance(message, wire.Announce)
    assert message.job_id in worker.pending  # answered
