"""The Python launcher's modules from one file (rexnet.cli.bundle; P11, 3): the entry
script loads them from the bundle while it is good, and imports them one by one, with the
same result, when the bundle is missing, stale, damaged or another interpreter's."""

from __future__ import annotations

import ast
import marshal
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import test_launcher_checks
from conftest import Keys
from test_launcher_checks import FakeAgent
from test_launcher_imports import HEAVY, imported

from rexnet.cli import bundle, entry
from rexnet.protocol import agentwire

fake_agent = test_launcher_checks.fake_agent  # the fixture: an agent that answers Say, Exit 5
SOURCE = Path(bundle.__file__).resolve().parent.parent  # the package these tests import
NAMES = {name for name, _ in bundle.MODULES}


def package_copy(tmp_path: Path) -> Path:
    """A copy of the bundled modules' sources (all an ordinary exec needs), to change."""
    root = tmp_path / "pkg"
    for _, relative in bundle.MODULES:
        (root / "rexnet" / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(SOURCE / relative, root / "rexnet" / relative)
    return root


def write_script(tmp_path: Path, root: Path, target: Path) -> Path:
    """An entry script like the installed one, for the package copy ROOT and bundle TARGET."""
    script = tmp_path / "rexnet-py"
    script.write_text(entry.script(sys.executable, [str(root), *entry.search_path()],
                                   "rexnet", str(target)))
    script.chmod(0o755)
    return script


def run(script: Path, key: Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-I", "-S", "-X", "importtime", str(script), "exec",
                           "-a", "h:1", "-v", str(key), "--", "x"], stdin=subprocess.DEVNULL,
                          capture_output=True, timeout=30)


def received(agent: FakeAgent, done: subprocess.CompletedProcess[bytes]) -> agentwire.Exec:
    assert done.returncode == 5 and done.stderr.endswith(b"said\nbye\n"), done.stderr
    message, fds = agent.received[-1]
    assert isinstance(message, agentwire.Exec) and fds == 3
    return message


def rexnet_imports(done: subprocess.CompletedProcess[bytes]) -> set[str]:
    modules = imported(done.stderr)
    assert "_socket" in modules and not modules & HEAVY, modules
    return {m for m in modules if m.split(".")[0] == "rexnet"}


def spoil(target: Path, root: Path, how: str) -> None:
    if how == "missing":
        target.unlink()
    elif how == "stale":  # a source changed since (as an upgrade without the entry step)
        with open(root / "rexnet" / "cli" / "quick.py", "a") as f:
            f.write("# changed\n")
    elif how == "damaged":
        target.write_bytes(target.read_bytes()[:1000])
    else:  # written by another interpreter
        load, _, stamps, modules = marshal.loads(target.read_bytes())
        target.write_bytes(marshal.dumps((load, "2.7.18 (another one)", stamps, modules)))


@pytest.mark.parametrize("how", ["missing", "stale", "damaged", "another interpreter"])
def test_a_bundle_that_is_not_good_is_left_for_the_usual_imports(
        fake_agent: FakeAgent, keys: Keys, tmp_path: Path, how: str) -> None:
    root = package_copy(tmp_path)
    target = Path(bundle.build(str(tmp_path / "launcher.bundle"), str(root / "rexnet")))
    script = write_script(tmp_path, root, target)
    good = run(script, keys.client)
    assert rexnet_imports(good) == set()  # every one came from the bundle
    spoil(target, root, how)
    usual = run(script, keys.client)
    assert rexnet_imports(usual) == NAMES  # the bundle holds what the fast path imports
    assert received(fake_agent, usual).request == received(fake_agent, good).request
    assert len(fake_agent.received) == 2


LOADED = """
import marshal, sys
sys.path[:0] = {path!r}
with open({target!r}, "rb") as f:
    load, *rest = marshal.loads(f.read())
assert (lambda: 0).__class__(load, globals())(*rest)
from rexnet.cli import launcher
import rexnet.agent.paths, rexnet.cli.quick
assert launcher.parse.__annotations__["tokens"] == "Sequence[str]"  # strings, as imported
assert launcher.__doc__ is None and launcher.__file__ == {launcher!r}
assert launcher.__spec__.origin == launcher.__file__ and launcher.__package__ == "rexnet.cli"
assert rexnet.cli.quick.abspath is rexnet.agent.paths.abspath
assert "__future__" not in sys.modules and "annotations" not in vars(launcher)
import rexnet.cli.request  # not in the bundle: found through its package's __path__
assert rexnet.cli.request.__spec__.parent == "rexnet.cli", rexnet.cli.request.__spec__
print(sorted(m for m in sys.modules if m.startswith("rexnet")))
"""


def test_bundled_modules_are_what_importing_them_makes(tmp_path: Path) -> None:
    target = bundle.build(str(tmp_path / "launcher.bundle"), str(SOURCE))
    done = subprocess.run([sys.executable, "-I", "-S", "-c", LOADED.format(
        path=[str(SOURCE.parent)], target=target, launcher=str(SOURCE / "cli" / "launcher.py"))],
        capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert set(ast.literal_eval(done.stdout)) > NAMES, done.stdout


def test_a_bundle_does_not_load_over_what_went_wrong(tmp_path: Path) -> None:
    """A module that fails while the bundle loads leaves none of the bundle's behind (the
    script then imports them as usual, and says what is wrong with the module)."""
    root = package_copy(tmp_path)
    (root / "rexnet" / "cli" / "quick.py").write_text("raise RuntimeError('broken')\n")
    target = bundle.build(str(tmp_path / "launcher.bundle"), str(root / "rexnet"))
    code = ("import marshal, sys\n"
            f"sys.path[:0] = [{str(root)!r}]\n"
            f"load, *rest = marshal.loads(open({target!r}, 'rb').read())\n"
            "try:\n    (lambda: 0).__class__(load, globals())(*rest)\n"
            "except RuntimeError as e:\n    print(e)\n"
            "print(sorted(m for m in sys.modules if m.startswith('rexnet')))\n")
    done = subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["broken", "[]"]
