"""Manual pages, written from the option definitions the commands use (argparse for
`rexnet`, usage.Options for the twistd plugins), so that they cannot drift.

setup.py calls write_all() at build time; the pages install into share/man.
`python -m rexnet.cli.manpages DIR` writes them by hand.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rexnet.version import __version__

DATE = "2026"
SOURCE = f"rexnet {__version__}"


@dataclass
class Option:
    """One option as a manual page shows it."""

    names: list[str]
    metavar: str | None
    help: str


Section = tuple[str, str | list[Option]]
"""A section of a page: its title, and its text or a list of terms."""


@dataclass
class Page:
    """What a manual page says."""

    name: str
    section: int
    summary: str
    synopsis: list[str]
    description: str
    options: list[Option] = field(default_factory=list)
    sections: list[Section] = field(default_factory=list)
    arguments: list[Option] = field(default_factory=list)

    @property
    def filename(self) -> str:
        return f"{self.name}.{self.section}"


# -- roff ------------------------------------------------------------------------------


def escape(text: str) -> str:
    """TEXT safe for roff: backslashes, leading dots and quotes, and hyphens as \\-."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join("\\&" + line if line[:1] in (".", "'") else line
                     for line in text.split("\n"))


def bold(text: str) -> str:
    return f"\\fB{escape(text)}\\fR"


def italic(text: str) -> str:
    return f"\\fI{escape(text)}\\fR"


def paragraphs(text: str) -> str:
    """Plain text with blank-line paragraphs (and indented lines kept as they are)."""
    out = []
    for block in re.split(r"\n\s*\n", text.strip()):
        lines = block.split("\n")
        if any(line.startswith("  ") for line in lines):
            out.append(".nf\n" + escape(block) + "\n.fi")
        else:
            out.append(escape(" ".join(line.strip() for line in lines)))
    return "\n.PP\n".join(out)


def render(page: Page) -> str:
    """PAGE in man(7) roff."""
    lines = [
        f'.TH "{page.name.upper()}" "{page.section}" "{DATE}" "{SOURCE}" '
        f'"{"rexnet manual" if page.section == 1 else "rexnet administration"}"',
        ".SH NAME", f"{escape(page.name)} \\- {escape(page.summary)}",
        ".SH SYNOPSIS",
    ]
    for i, synopsis in enumerate(page.synopsis):
        if i:
            lines.append(".br")
        lines.append(escape(synopsis))
    lines += [".SH DESCRIPTION", paragraphs(page.description)]
    if page.arguments:
        lines.append(".SH ARGUMENTS")
        for argument in page.arguments:
            lines += [".TP", italic(argument.names[0]), escape(argument.help)]
    if page.options:
        lines.append(".SH OPTIONS")
        for option in page.options:
            head = ", ".join(bold(n) + (" " + italic(option.metavar) if option.metavar else "")
                             for n in option.names)
            lines += [".TP", head, escape(option.help or "")]
    for title, body in page.sections:
        if title:  # an untitled section goes on with the one before
            lines.append(f".SH {title}")
        if isinstance(body, str):
            lines.append(paragraphs(body))
        else:  # a list of terms and their explanations
            for item in body:
                lines += [".TP", bold(item.names[0]) if item.metavar is None else
                          italic(item.names[0]), escape(item.help)]
    return "\n".join(lines) + "\n"


# -- from argparse ---------------------------------------------------------------------


def argparse_options(parser: argparse.ArgumentParser) -> list[Option]:
    options = []
    for action in parser._actions:
        if not action.option_strings or action.help == argparse.SUPPRESS:
            continue
        metavar = None
        if action.nargs != 0:
            metavar = action.metavar or (action.dest.upper() if not action.choices else
                                         "{" + ",".join(map(str, action.choices)) + "}")
        text = (action.help or "") % {"default": action.default, "prog": parser.prog}
        options.append(Option(list(action.option_strings), str(metavar) if metavar else None,
                              text))
    return options


def positionals(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions
            if not a.option_strings and not isinstance(a, argparse._SubParsersAction)]


def subcommands(parser: argparse.ArgumentParser) -> dict[str, tuple[str,
                                                                     argparse.ArgumentParser]]:
    """NAME: (one-line help, parser) of each subcommand."""
    found: dict[str, tuple[str, argparse.ArgumentParser]] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            for name, sub in action.choices.items():
                found[name] = (helps.get(name, ""), sub)
    return found


def usage_line(parser: argparse.ArgumentParser) -> str:
    return " ".join(parser.format_usage().split())[len("usage: "):]


FILES = """\
./rexnet.toml, ~/.config/rexnet/config.toml (or $XDG_CONFIG_HOME/rexnet/config.toml), \
/etc/rexnet/config.toml: applications (credential, announce, alerts, timeout) and their \
worker settings, in TOML; for each key the first file that sets it wins, and options on \
the command line win over all. A mistake in a file is reported as FILE:LINE with exit \
status 249."""

ENVIRONMENT = """\
GROUP: the announce target when no --announce is given (as cexec's).

REXNET_CONFIG: read this configuration file only, instead of the three above."""


def exit_status() -> str:
    from rexnet.protocol import exitcodes

    return ("The job's own status (128+N when the job was killed by signal N), or one of "
            "rexnet's own:\n\n" + "\n".join(f"  {code}  {text}" for code, text in
                                             sorted(exitcodes.DESCRIPTIONS.items())))


def cli_pages() -> Iterator[Page]:
    from rexnet.cli.main import parser

    top = parser()
    subs = subcommands(top)
    command_list = "\n".join(f"  {name:<9} {help_}" for name, (help_, _) in subs.items())
    see_also = ", ".join(f"rexnet-{n}(1)" for n in subs) + \
        ", rexnet-worker(8), crat(8), cproxy(8), rexnet-tunnel(8)"
    yield Page("rexnet", 1, top.description or "", [usage_line(top)],
               (top.description or "") + "\n\nCommands:\n\n" + command_list +
               "\n\nEach command has its own page, rexnet-COMMAND(1), and --help. " +
               (top.epilog or ""), argparse_options(top),
               [("FILES", FILES), ("ENVIRONMENT", ENVIRONMENT),
                ("SEE ALSO", see_also)])
    for name, (help_, sub) in subs.items():
        args = [Option([str(a.metavar or a.dest)], None, a.help or "") for a in positionals(sub)]
        sections: list[Section] = [("FILES", FILES), ("ENVIRONMENT", ENVIRONMENT)]
        if name == "exec":
            sections.insert(0, ("EXIT STATUS", exit_status()))
        elif sub.epilog:
            sections.insert(0, ("NOTES", sub.epilog))
        sections.append(("SEE ALSO", "rexnet(1), rexnet-worker(8)"))
        yield Page(f"rexnet-{name}", 1, help_, [usage_line(sub)], sub.description or help_,
                   argparse_options(sub), sections, args)
    yield cexec_page()


def cexec_page() -> Page:
    """cexec(1): rexnet exec under the name the cexec suite gave its client."""
    from rexnet.cli.execute import cexec_parser

    p = cexec_parser()
    args = [Option([str(a.metavar or a.dest)], None, a.help or "") for a in positionals(p)]
    return Page("cexec", 1, "run a job on the least-loaded worker (alias of rexnet exec)",
                [usage_line(p)], (p.description or "") + "\n\n" + CEXEC, argparse_options(p),
                [("EXIT STATUS", exit_status()), ("FILES", FILES),
                 ("ENVIRONMENT", ENVIRONMENT),
                 ("SEE ALSO", "rexnet-exec(1), rexnet(1), rexnet-worker(8), crat(8)")], args)


CEXEC = """\
cexec KEYFILE announces a job of KEYFILE's application (on $GROUP, else 255.255.255.255, \
port 3010), runs it on the first authenticated worker to connect back (the least loaded), \
streams stdin, stdout and stderr, and exits with the job's status, exactly as \
rexnet exec does. KEYFILE may also be the NAME of an application in rexnet.toml.

On a command worker (twistd rexnet-worker --commands PATTERN) the arguments after -- \
name the program, which runs in this directory when the worker has the same path:

  make -j8 CC="cexec build -- cc"
  cexec --all build -- uptime"""


# -- from usage.Options ----------------------------------------------------------------


def options_of(options_class: Any) -> list[Option]:
    """The options of a twisted usage.Options class, in the order --help shows them."""
    opts = options_class()
    shorts = {long: short for short, long in opts.synonyms.items() if len(short) == 1}
    defaults = {str(p[0]): p[2] for p in getattr(options_class, "optParameters", [])}
    found = []
    for long in sorted(opts.longOpt):
        name = long.rstrip("=")
        doc = " ".join((opts.docs.get(name) or "").split())
        metavar = None
        if long.endswith("="):
            metavar = metavar_of(name, doc)
            if defaults.get(name) not in (None, "0"):
                doc += f" (default: {defaults[name]})"
        names = ([f"-{shorts[name]}"] if name in shorts else []) + [f"--{name}"]
        found.append(Option(names, metavar, doc))
    return found


NOT_METAVARS = {"UDP", "TCP", "HTTP", "TOML", "TLS", "NAT", "CPU", "CPUS", "JSON", "CA",
                "PEM", "KEYFILE", "COMMAND", "APP", "K", "M", "G"}


def metavar_of(name: str, doc: str) -> str:
    """The placeholder an option's help names (HOST:PORT, FILE...), else its name."""
    words = [w for w in re.findall(r"\b[A-Z]{2,}(?:\[:[A-Z]+\]|:[A-Z]+)?", doc)
             if w not in NOT_METAVARS]
    with_port = [w for w in words if ":" in w]
    return (with_port or words or [name.upper()])[0]


@dataclass(frozen=True)
class Plugin:
    name: str
    module: str
    summary: str
    notes: str = ""


PLUGINS = [
    Plugin("rexnet-worker", "rexnet.worker.tap", "serve rexnet applications (cexec's "
           "cservice)"),
    Plugin("crat", "rexnet.crat.tap", "receive, check and log the signed alerts of rexnet"),
    Plugin("cproxy", "rexnet.relay.cproxy_tap", "relay a rexnet cluster between two networks"),
    Plugin("rexnet-tunnel", "rexnet.relay.tunnel_tap", "join the announce domains of several "
           "sites over TLS"),
]

TWISTD = """\
The command runs as a twistd plugin: twistd [twistd options] NAME [options]. Useful \
twistd options: -n (stay in the foreground, as under systemd), --pidfile= (no pid file), \
-l FILE (log file), --logger rexnet.logs.json_logger (one JSON object a line on stdout), \
-u USER -g GROUP. See twistd(1). The same service is made by the .tac files in \
rexnet's etc/ (twistd -ny FILE.tac)."""


WORKER_CONFIG = """\
With --config FILE, one process serves every [applications.NAME.worker] table of FILE \
(TOML, as etc/rexnet.toml.example shows): each table's keys are the long options above \
(with - or _), plus credential (the worker credential) and command (a list); a [worker] \
table gives defaults for every application, and metrics. Options given on the command \
line win over the file's. Applications that listen on the same address share one \
socket. A mistake in the file is reported as FILE:LINE with exit status 249."""


METRICS = """\
With --metrics HOST:PORT (or metrics in the [worker] table of --config), Prometheus \
metrics are served over HTTP at /metrics, each labelled with the application (app):"""


def metrics_list() -> list[Option]:
    """The metrics a worker serves, from the metric definitions themselves."""
    from rexnet.worker.metrics import Metrics

    found = []
    for family in Metrics().registry.collect():
        suffix = "_total" if family.type == "counter" else ""
        found.append(Option([family.name + suffix], None,
                            f"({family.type}) {family.documentation}"))
    return found


def plugin_pages() -> Iterator[Page]:
    import importlib

    for plugin in PLUGINS:
        options_class = importlib.import_module(plugin.module).Options
        synopsis = f"twistd [twistd options] {plugin.name} {options_class.synopsis}"
        sections: list[Section] = [("RUNNING", TWISTD)]
        if plugin.name == "rexnet-worker":
            sections += [("CONFIGURATION", WORKER_CONFIG), ("METRICS", METRICS),
                         ("", metrics_list())]
        if plugin.notes:
            sections.append(("NOTES", plugin.notes))
        sections.append(("SEE ALSO", "rexnet(1), rexnet-exec(1), " + ", ".join(
            f"{p.name}(8)" for p in PLUGINS if p is not plugin) + ", twistd(1)"))
        yield Page(plugin.name, 8, plugin.summary, [synopsis], options_class.longdesc,
                   options_of(options_class), sections)


def pages() -> list[Page]:
    """Every manual page of rexnet."""
    return [*cli_pages(), *plugin_pages()]


def write_all(directory: Path) -> list[Path]:
    """Write every page to DIRECTORY/manN/NAME.N; return the files."""
    written = []
    for page in pages():
        path = directory / f"man{page.section}" / page.filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render(page), encoding="utf-8")
        written.append(path)
    return written


if __name__ == "__main__":
    for path in write_all(Path(sys.argv[1] if len(sys.argv) > 1 else "man")):
        print(path)
