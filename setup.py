"""Build step: the manual pages and the bash completion are written at build time from
the option definitions the commands use (rexnet.cli.manpages, rexnet.cli.completion), so they
cannot drift; they install into share/man and share/bash-completion. Everything else is
in pyproject.toml."""

import sys
from collections.abc import Sequence
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent
GENERATED = Path("build", "generated")


def generate() -> list[tuple[str, Sequence[str]]]:
    sys.path.insert(0, str(HERE))  # this source tree's rexnet, not an installed one
    from rexnet.cli.completion import script
    from rexnet.cli.manpages import write_all

    data: dict[str, Sequence[str]] = {}
    for path in write_all(HERE / GENERATED / "man"):
        section = f"share/man/{path.parent.name}"
        data[section] = [*data.get(section, []), str(path.relative_to(HERE))]
    completions = []
    for command in ("rexnet", "cexec"):  # bash-completion loads a file per command name
        completion = HERE / GENERATED / "completions" / command
        completion.parent.mkdir(parents=True, exist_ok=True)
        completion.write_text(script(), encoding="utf-8")
        completions.append(str(completion.relative_to(HERE)))
    data["share/bash-completion/completions"] = completions
    sys.path.remove(str(HERE))
    return sorted(data.items())


setup(data_files=generate())
