"""The Python launcher's modules in one file, read at once (P11, 3).

An ordinary `rexnet-py exec` runs nine modules (MODULES). Imported one by one, each costs
the import system a directory lookup, a stat of its source and a read of its .pyc (some
0.1-0.2 ms apiece here), and the first `from __future__ import annotations` imports
__future__. rexnet.cli.entry writes them compiled into one bundle (build) beside the
package's bytecode; the entry script reads it with marshal and calls load (whose code is
in the bundle too), which puts the modules into sys.modules as the import system would,
but only while the interpreter is the one that built it and every source file is as it
was then (size and mtime, as a .pyc is checked). Otherwise, or if the bundle is missing
or damaged, nothing is loaded and the script imports the modules as usual.

The modules are compiled as the import system compiles them, but for two things that do
not change what they do: `from __future__ import annotations` is passed as a compiler
flag instead of run (annotations stay strings), and docstrings are left out (optimize=2;
these modules have no assert and do not read their docstrings).
"""

from __future__ import annotations

import ast
import marshal
import os
import sys
import tempfile
from types import CodeType

MODULES = (
    ("rexnet.version", "version.py"),
    ("rexnet", "__init__.py"),
    ("rexnet.protocol", "protocol/__init__.py"),
    ("rexnet.protocol.agentjson", "protocol/agentjson.py"),
    ("rexnet.agent", "agent/__init__.py"),
    ("rexnet.agent.paths", "agent/paths.py"),
    ("rexnet.cli", "cli/__init__.py"),
    ("rexnet.cli.quick", "cli/quick.py"),
    ("rexnet.cli.launcher", "cli/launcher.py"),
)
"""What an ordinary exec imports of rexnet (tests/test_launcher_imports.py holds it so),
in an order in which each one's imports come before it, relative to the package."""

PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

Stamp = tuple[str, int, int]
Module = tuple[str, str, bool, CodeType]


def default_path(package: str = PACKAGE) -> str:
    """Where rexnet.cli.entry writes the bundle: with the bytecode of rexnet.cli."""
    return os.path.join(package, "cli", "__pycache__",
                        f"launcher.{sys.implementation.cache_tag}.bundle")


def compile_module(source: bytes, path: str) -> CodeType:
    """SOURCE (the file PATH) compiled as the import system would, its __future__ imports
    given as compiler flags (not run) and without docstrings."""
    import __future__

    tree = ast.parse(source, path)
    flags = 0
    for node in list(tree.body):
        if isinstance(node, ast.ImportFrom) and node.module == "__future__":
            for alias in node.names:
                flags |= getattr(__future__, alias.name).compiler_flag
            tree.body.remove(node)
    return compile(tree, path, "exec", flags=flags, dont_inherit=True, optimize=2)


def build(target: str | None = None, package: str = PACKAGE) -> str:
    """Write the bundle of PACKAGE's MODULES to TARGET (default_path), replacing it in one
    step; the path written."""
    target = target or default_path(package)
    stamps: list[Stamp] = []
    modules: list[Module] = []
    for name, relative in MODULES:
        path = os.path.join(package, relative)
        info = os.stat(path)  # before reading: a change while we read makes it stale
        with open(path, "rb") as f:
            source = f.read()
        stamps.append((path, info.st_mtime_ns, info.st_size))
        modules.append((name, path, relative.endswith("__init__.py"),
                        compile_module(source, path)))
    data = marshal.dumps((load.__code__, sys.version, tuple(stamps), tuple(modules)))
    os.makedirs(os.path.dirname(target), exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=".rexnet-bundle-", dir=os.path.dirname(target))
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(temporary, 0o644)
    os.replace(temporary, target)
    return target


def load(version: str, stamps: tuple[Stamp, ...], modules: tuple[Module, ...]) -> bool:
    """Put MODULES into sys.modules, run, as importing them would; False (and nothing
    loaded) if VERSION is not this interpreter's or a source file differs from its stamp.

    The entry script runs this function from the bundle's copy of its code, before rexnet
    is imported: it uses builtins and modules every interpreter has loaded already."""
    import _frozen_importlib_external as external
    import posix
    import sys

    if version != sys.version:
        return False
    for path, mtime, size in stamps:
        info = posix.stat(path)
        if info.st_mtime_ns != mtime or info.st_size != size:
            return False
    added: list[str] = []
    try:
        for name, path, package, code in modules:
            if name in sys.modules:
                continue
            directory = path.rpartition("/")[0]
            spec = external.spec_from_file_location(
                name, path, submodule_search_locations=[directory] if package else None)
            module = type(sys)(name)
            module.__spec__ = spec
            module.__loader__ = spec.loader if spec else None
            module.__file__ = path
            module.__package__ = name if package else name.rpartition(".")[0]
            if package:
                module.__path__ = [directory]
            sys.modules[name] = module
            added.append(name)
            exec(code, module.__dict__)
        for name in added:  # (rexnet.version runs before its package exists)
            parent, _, child = name.rpartition(".")
            if parent:
                setattr(sys.modules[parent], child, sys.modules[name])
    except BaseException:
        for name in added:
            sys.modules.pop(name, None)
        raise
    return True
