"""The Python launcher's fast path (P11, 3): an ordinary `rexnet-py exec` imports only what
it must (no os, re, argparse, enum, typing, json, struct...), from compiled bytecode, and
sends the very message the full path (rexnet.cli.request.build, ExecRequest, agentwire)
would send."""

from __future__ import annotations

import os
import posixpath
import re
import subprocess
import sys
from pathlib import Path

import pytest
import test_launcher_checks
from cluster import LAUNCHERS
from conftest import Keys
from hypothesis import given
from hypothesis import strategies as st
from test_launcher_checks import FakeAgent

from rexnet.agent import paths
from rexnet.cli import launcher, quick
from rexnet.cli.request import build
from rexnet.protocol import agentjson, agentwire, request
from rexnet.protocol.request import RequestError

fake_agent = test_launcher_checks.fake_agent  # the fixture: an agent that answers Say, Exit 5

# what an ordinary exec must not import (each costs start-up time, or pulls in re)
HEAVY = {"os", "re", "argparse", "enum", "typing", "json", "struct", "dataclasses",
         "collections", "socket", "signal", "fcntl", "termios", "inspect", "contextlib",
         "rexnet.cli.main", "rexnet.cli.request", "rexnet.protocol.request",
         "rexnet.protocol.agentwire", "rexnet.protocol.record", "rexnet.config"}


def imported(stderr: bytes) -> set[str]:
    """The modules `python -X importtime` says were imported."""
    return {line.split("|")[-1].strip() for line in stderr.decode().splitlines()
            if line.startswith("import time:") and "|" in line}


def run_python_launcher(*options: str, key: Path, flags: tuple[str, ...] = ("-X", "importtime")
                        ) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-I", "-S", *flags, LAUNCHERS["python"], "exec",
                           *options, str(key)], stdin=subprocess.DEVNULL, capture_output=True,
                          timeout=30)


def test_an_ordinary_exec_imports_nothing_heavy(fake_agent: FakeAgent, keys: Keys) -> None:
    done = run_python_launcher("-a", "h:1", "-v", "--timeout", "5", key=keys.client)
    assert done.returncode == 5 and done.stderr.endswith(b"said\nbye\n"), done.stderr
    modules = imported(done.stderr)
    assert "_socket" in modules, modules
    assert not modules & HEAVY, modules & HEAVY
    # rexnet's own come from the bundle (rexnet.cli.bundle): none through the import
    # system (tests/test_launcher_bundle.py: which they are, and without the bundle)
    assert not {m for m in modules if m.startswith("rexnet")}, modules
    (message, fds), = fake_agent.received
    assert isinstance(message, agentwire.Exec) and fds == 3
    assert message.request.announce == ("h:1",) and message.request.verbose


def test_what_the_fast_path_leaves_goes_the_full_way(fake_agent: FakeAgent, keys: Keys,
                                                     tmp_path: Path) -> None:
    """--fd (and a terminal, an application's name, --mem) take the full path, which
    imports what it needs: the test above would fail if the fast path took them."""
    done = subprocess.run(["sh", "-c", f'exec "$@" 5>"{tmp_path}/five"', "sh", sys.executable,
                           "-I", "-S", "-X", "importtime", LAUNCHERS["python"], "exec", "--fd",
                           "5", "--mem", "1G", str(keys.client)], stdin=subprocess.DEVNULL,
                          capture_output=True, timeout=30)
    assert done.returncode == 5 and done.stderr.endswith(b"said\nbye\n"), done.stderr
    assert "rexnet.protocol.agentwire" in imported(done.stderr)
    (message, fds), = fake_agent.received
    assert isinstance(message, agentwire.Exec) and fds == 4
    assert message.request.fds == ((5, "w"),) and message.request.mem == 1 << 30


def test_the_fast_path_runs_from_compiled_bytecode(fake_agent: FakeAgent, keys: Keys,
                                                   tmp_path: Path) -> None:
    """-I -S does not bypass the install's bytecode: the installed script reads no rexnet
    module (its bundle has them), and without the bundle every one is read from a .pyc
    (python -v says "code object from" it), none compiled from source."""
    done = run_python_launcher(key=keys.client, flags=("-v",))
    assert done.returncode == 5, done.stderr
    assert "/rexnet/" not in done.stderr.decode(), done.stderr
    script = tmp_path / "rexnet-py"
    missing = f"open({str(tmp_path / 'none')!r}, 'rb')"  # the installed one, without bundle
    script.write_text(re.sub(r"open\('[^']*', 'rb'\)", lambda _: missing,
                             Path(LAUNCHERS["python"]).read_text()))
    assert missing in script.read_text()
    done = subprocess.run([sys.executable, "-I", "-S", "-v", str(script), "exec",
                           str(keys.client)], stdin=subprocess.DEVNULL, capture_output=True,
                          timeout=30)
    assert done.returncode == 5, done.stderr
    lines = done.stderr.decode().splitlines()
    loaded = [line for line in lines if "/rexnet/" in line and "code object from" in line]
    assert all(line.rstrip("'").endswith(".pyc") for line in loaded), loaded
    for package, name in (("cli", "launcher"), ("cli", "quick"), ("agent", "paths"),
                          ("protocol", "agentjson")):
        assert any(f"/{package}/__pycache__/{name}.cpython-" in line for line in loaded), name


COMMAND_LINES = [
    ["KEY"], ["-a", "h:1", "KEY", "--", "a", "-b", ""], ["-vT", "--timeout=2.5", "KEY", "x"],
    ["--alerts", "c:2", "--announce=x:3", "-ay:4", "KEY"],
    ["--env", "A=1", "-eB", "-eMISSING", "--env=C=", "KEY"],
    ["--revoked", "../r/./x.revoked", "KEY"], ["--cwd", "sub/../d", "KEY"], ["--cwd", "/", "KEY"],
    ["--cpus", "3", "--worker", "w1", "--worker", "w2", "--queue-timeout", "9", "KEY"],
    ["-T", "../keys/./KEY", "tab\there", "quote\"\\", "ünï€ode 😀", "ctl\x01\x1f", "\udcff"],
    ["--env", "U=\udcfe", "KEY"],
]
# what the fast path leaves to the full one (which builds it, or says what is wrong)
LEFT = [["-t", "KEY"], ["--fd", "3", "KEY"], ["--mem", "1G", "KEY"], ["an-application"],
        ["--timeout", "0", "KEY"], ["--timeout", "nan", "KEY"], ["--timeout", "2e9", "KEY"],
        ["--queue-timeout=-1", "KEY"], ["--cpus", "0", "KEY"], ["--cwd", "", "KEY"],
        ["--env", "=x", "KEY"], ["--worker", "", "KEY"], ["--worker", "x" * 65, "KEY"],
        ["KEY", "a\0b"], ["-a", "x" * 301, "KEY"],
        ["KEY", *["a"] * 4097], [*[f"-eV{i}=1" for i in range(257)], "KEY"],
        ["--cwd", "/" + "d" * 4096, "KEY"]]


def options(tokens: list[str], keyfile: Path) -> dict[str, object]:
    argv = [str(keyfile) if t == "KEY" else t.replace("KEY", keyfile.name) for t in tokens]
    opts = launcher.parse(argv)
    assert opts is not None, tokens
    return opts


@pytest.mark.parametrize("tokens", COMMAND_LINES, ids=range(len(COMMAND_LINES)))
def test_the_fast_path_writes_what_the_full_path_writes(
        tokens: list[str], keys: Keys, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    environ = {"B": "from the environment", "GROUP": "239.1.2.3", "TERM": "xterm"}
    for env in (environ, {}):
        opts = options(tokens, keys.client)
        fast = quick.message(opts, env, 4026531993)
        assert fast is not None, tokens
        assert fast == agentwire.Exec(build(opts, env), 4026531993).encode()


@pytest.mark.parametrize("tokens", LEFT, ids=range(len(LEFT)))
def test_the_fast_path_leaves_the_rest(tokens: list[str], keys: Keys) -> None:
    opts = options(tokens, keys.client)
    assert quick.message(opts, {}, 1) is None
    if tokens[0] not in ("-t", "--fd", "--mem", "an-application"):
        with pytest.raises(RequestError):  # which then says what is wrong
            build(opts, {})


def test_the_fast_path_leaves_a_gone_directory(keys: Keys, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    assert quick.message(options(["KEY"], keys.client), {}, 1) is None


def test_a_request_too_long_for_the_agent_runs_without_it(keys: Keys) -> None:
    opts = options(["KEY", *["x" * 60000] * 20], keys.client)  # 1.2 MB: the agent takes 1 MiB
    assert quick.message(opts, {}, 1) is None
    assert launcher.full_job(opts, {}, 1) is None  # then the full command line runs it
    assert launcher.full_job(options(["KEY", "x" * 60000], keys.client), {}, 1) is not None


def test_the_fast_paths_bounds_are_the_requests() -> None:
    for name in ("DEFAULT_ANNOUNCE", "DEFAULT_TIMEOUT", "MAX_TIMEOUT", "MAX_ARGS", "MAX_ARG",
                 "MAX_TARGETS", "MAX_TARGET", "MAX_ENV", "MAX_NAME", "MAX_PATH", "MAX_CPUS",
                 "MAX_WORKERS", "MAX_WORKER_NAME"):
        assert getattr(quick, name) == getattr(request, name), name
    assert launcher.FORWARDED == request.FORWARDED
    assert agentjson.MAX_MESSAGE == agentwire.MAX_MESSAGE
    assert agentjson.frame({"op": "signal", "number": 2}) == agentwire.Signal(2).encode()
    assert agentjson.frame({"op": "winch", "rows": 3, "cols": 4}) == agentwire.Winch(3, 4).encode()


PATHS = st.lists(st.sampled_from(["", ".", "..", "a", "b.c", "/", "//", "\udcff"]),
                 max_size=8).map("/".join)


@given(PATHS)
def test_abspath_and_normpath_are_posixpaths(path: str) -> None:
    assert paths.normpath(path) == posixpath.normpath(path)
    assert paths.abspath(path) == posixpath.abspath(path)
    assert paths.dirname(path) == posixpath.dirname(path)


@given(st.sampled_from([agentwire.Say("x\n"), agentwire.Exit(3, "m"), agentwire.Exit(0),
                        agentwire.Stopped(5), agentwire.Signal(2)]),
       st.dictionaries(st.sampled_from(["op", "text", "status", "message", "x"]),
                       st.none() | st.integers(-2, 300) | st.text(max_size=3)
                       | st.sampled_from(["say", "exit"]), max_size=4))
def test_answers_are_read_as_agentwire_reads_them(message: agentwire.Message,
                                                  mangled: dict[str, object]) -> None:
    for obj in (agentjson.loads(message.encode()[4:].decode()), mangled):
        try:
            theirs = agentwire.check(obj)
        except agentwire.AgentWireError as e:
            with pytest.raises(agentwire.AgentWireError, match=re.escape(str(e))):
                launcher.answer(obj)
            continue
        said, status, text = launcher.answer(obj)
        if isinstance(theirs, agentwire.Say):
            assert (said, status) == (theirs.text, None)
        elif isinstance(theirs, agentwire.Exit):
            assert (said, status, text) == (None, theirs.status, theirs.message)
        else:
            assert (said, status) == (None, None)


def test_the_environment_is_os_environs() -> None:
    assert dict(launcher.environment()) == dict(os.environ)  # os is imported here: its own
    done = subprocess.run([sys.executable, "-I", "-S", "-c", "import sys; sys.path[:0] = "
                           f"{sys.path!r}; from rexnet.cli import launcher; e = "
                           "launcher.environment(); assert 'os' not in sys.modules; "
                           "import os; assert e == dict(os.environ), e"],
                          env={"A": "1", "U": "\udcff"}, capture_output=True, timeout=30)
    assert done.returncode == 0, done.stderr
