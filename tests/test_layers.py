"""The package's shape: imports flow one way, from the bottom layer up, with no cycle.

Every import in rexnet/ counts, also those inside functions and under TYPE_CHECKING: a
layer may import its own package and the layers below it, never one above. The layers,
bottom up, are LAYERS; ARCHITECTURE.md draws them."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "rexnet"

# bottom up; each entry: the modules or packages of that layer
LAYERS: list[set[str]] = [
    {"rexnet.version", "rexnet.protocol"},              # sans-IO formats, exit codes
    {"rexnet.security", "rexnet.logs"},                 # credentials, TLS; logging
    {"rexnet.net"},                                     # announcements, alerts, channel, links
    {"rexnet.config"},                                  # rexnet.toml
    {"rexnet.worker", "rexnet.client", "rexnet.crat", "rexnet.relay"},  # the processes
    {"rexnet.agent"},                                   # the user's agent (runs client jobs)
    {"rexnet.cli"},                                     # the command line on top
    {"rexnet"},  # the package itself: the Python API's names, imported on first use
]
MAX_LINES = 520


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def imports(path: Path, name: str, known: set[str]) -> set[str]:
    """The rexnet modules PATH imports, anywhere in it."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in known else base)
    return {m for m in found if m == "rexnet" or m.startswith("rexnet.")}


def layer_of(module: str) -> int:
    best, level = -1, -1
    for i, layer in enumerate(LAYERS):
        for prefix in layer:
            if (module == prefix or (module.startswith(prefix + ".") and prefix != "rexnet")
                    ) and len(prefix) > best:
                best, level = len(prefix), i
    assert level >= 0, f"{module} is in no layer: add it to LAYERS"
    return level


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports(path, name, known) - {name} for name, path in mods.items()}


def test_every_module_is_in_a_layer() -> None:
    for name in modules():
        layer_of(name)


def test_no_layer_imports_a_higher_one() -> None:
    wrong = [f"{a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)})"
             for a, targets in graph().items() for b in sorted(targets)
             if layer_of(b) > layer_of(a)]
    assert not wrong, "\n".join(wrong)


def test_processes_do_not_import_each_other() -> None:
    """worker, client, crat and relay stand side by side: none imports another."""
    side = ["rexnet.worker", "rexnet.client", "rexnet.crat", "rexnet.relay"]

    def package(m: str) -> str | None:
        return next((p for p in side if m == p or m.startswith(p + ".")), None)

    wrong = [f"{a} imports {b}" for a, targets in graph().items() for b in sorted(targets)
             if package(a) and package(b) and package(a) != package(b)]
    assert not wrong, "\n".join(wrong)


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in edges:
                continue
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle() -> None:
    # a package's __init__ importing its own submodules is how it exports them, and is no
    # cycle unless a submodule imports the package back
    cycle = find_cycle(graph())
    assert cycle is None, " -> ".join(cycle or [])


def test_the_cycle_finder_finds_cycles() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("name", sorted(modules()))
def test_no_module_is_over_about_500_lines(name: str) -> None:
    lines = len(modules()[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{name} has {lines} lines: split it by concern"


def test_protocol_is_sans_io() -> None:
    """rexnet.protocol: formats only, no reactor and no sockets of Twisted."""
    for name, path in modules().items():
        if name.startswith("rexnet.protocol"):
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and node.module:
                    assert not node.module.startswith("twisted.internet"), (name, node.module)
                if isinstance(node, ast.Import):
                    assert not any(a.name.startswith("twisted.internet") for a in node.names)
