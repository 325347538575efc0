"""rexnet's configuration file: applications, their credentials, targets and worker settings.

One TOML format, read from ``./rexnet.toml``, ``~/.config/rexnet/config.toml`` and
``/etc/rexnet/config.toml`` (``$REXNET_CONFIG`` names one file instead); for every key the
first file that sets it wins, and command-line options win over all. A mistake in a file
is a :class:`ConfigError` naming the file and line.

    [worker]                      # defaults for every [applications.NAME.worker]
    metrics = "127.0.0.1:9310"    # Prometheus metrics of twistd rexnet-worker --config

    [applications.ogg]
    credential = "ogg.client"     # rexnet exec ogg: relative paths are the file's
    announce = ["10.0.0.255:3010"]
    alerts = ["10.0.0.9:3011"]
    timeout = 30

    [applications.ogg.worker]     # twistd rexnet-worker --config FILE serves it
    credential = "ogg.worker"
    command = ["oggenc", "-Q", "-"]
    slots = 4                     # any long option of twistd rexnet-worker --help
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Iterable, MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rexnet.protocol.request import DEFAULT_TIMEOUT

ENV = "REXNET_CONFIG"
APP_KEYS = {"credential", "announce", "alerts", "timeout", "worker"}
"""Keys of an [applications.NAME] table (rexnet exec, status and parallel use them)."""
WORKER_PROCESS_KEYS = {"metrics"}
"""Keys of the top-level [worker] table that concern the process, not one application."""


class ConfigError(Exception):
    """A mistake in a configuration file: the message starts with FILE:LINE."""


def search_path() -> list[Path]:
    """The files looked at, first first ($REXNET_CONFIG alone when it is set)."""
    if os.environ.get(ENV):
        return [Path(os.environ[ENV])]
    config_home = os.environ.get("XDG_CONFIG_HOME") or os.path.join(
        os.path.expanduser("~"), ".config")
    return [Path("rexnet.toml"), Path(config_home, "rexnet", "config.toml"),
            Path("/etc/rexnet/config.toml")]


# -- where a key is ----------------------------------------------------------------------


_HEADER = re.compile(r"^\s*\[+\s*([^\]]+?)\s*\]+")
_KEY = re.compile(r"""^\s*("[^"]*"|'[^']*'|[A-Za-z0-9_.-]+)\s*=""")


def _parts(dotted: str) -> list[str]:
    return [p.strip().strip("\"'") for p in re.findall(r"""("[^"]*"|'[^']*'|[^.]+)""", dotted)]


def line_of(text: str, table: Iterable[str], key: str | None = None) -> int:
    """The line of KEY in TABLE (a path such as ('applications', 'ogg')), or of the table's
    header; 1 when it cannot be told (a light scan, not a TOML parser)."""
    want = list(table)
    current: list[str] = []
    header_line = 0
    for number, line in enumerate(text.splitlines(), 1):
        header = _HEADER.match(line)
        if header:
            current = _parts(header.group(1))
            if current == want and not header_line:
                header_line = number
            if key is not None and current[:len(want) + 1] == [*want, key]:
                return number  # KEY is itself a table
            continue
        found = _KEY.match(line)
        if key is not None and found:
            path = current + _parts(found.group(1))
            if path == [*want, key]:
                return number
    return header_line or 1


# -- reading ----------------------------------------------------------------------------


@dataclass
class Source:
    """One configuration file, parsed."""

    path: Path
    text: str
    data: dict[str, Any]

    def where(self, table: Iterable[str], key: str | None = None) -> str:
        return f"{self.path}:{line_of(self.text, table, key)}"

    def error(self, table: Iterable[str], key: str | None, message: str) -> ConfigError:
        return ConfigError(f"{self.where(table, key)}: {message}")

    def resolve(self, value: str) -> str:
        """A path from this file: ~ expanded, relative to the file's directory."""
        path = Path(value).expanduser()
        return str(path if path.is_absolute() else self.path.parent.resolve() / path)


def read(path: Path) -> Source:
    """Read and parse one file (TOML syntax only; see validate)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    return parse(text, path)


def parse(text: str, path: Path) -> Source:
    """TEXT (the contents of PATH) as TOML, without touching the file system."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        found = re.search(r"\(at line (\d+), column \d+\)", str(e))
        message = re.sub(r"\s*\(at line \d+, column \d+\)", "", str(e))
        raise ConfigError(f"{path}:{found.group(1) if found else 1}: {message}") from None
    return Source(path, text, data)


def _table_name(path: Iterable[str]) -> str:
    return "[" + ".".join(path) + "]"


def _is_str_list(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


WorkerKeys = tuple[set[str], set[str], set[str]]  # parameters, flags, repeatable options


def validate(source: Source, worker_keys: WorkerKeys | None = None) -> None:
    """Check every table and key of SOURCE; raise ConfigError at the first mistake. The keys
    of worker tables are checked against WORKER_KEYS (rexnet.worker.tap.config_keys(), the
    worker's own option definitions) when given: the worker checks them, a client only
    reads the application tables."""
    from rexnet.net.announce import parse_target

    data = source.data
    for key in data:
        if key not in ("applications", "worker"):
            raise source.error([], key, f"unknown key {key!r} (use [applications.NAME] "
                               "or [worker])")
    worker = data.get("worker", {})
    if not isinstance(worker, dict):
        raise source.error([], "worker", "'worker' must be a table")
    validate_worker_table(source, ["worker"], worker, True, worker_keys)
    apps = data.get("applications", {})
    if not isinstance(apps, dict):
        raise source.error([], "applications", "'applications' must be a table")
    for name, app in apps.items():
        where = ["applications", name]
        if not isinstance(app, dict):
            raise source.error(["applications"], name, f"application {name!r} must be a table")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name) or "/" in name:
            raise source.error(where, None, f"bad application name {name!r}")
        for key, value in app.items():
            if key not in APP_KEYS:
                raise source.error(where, key, f"unknown key {key!r} in {_table_name(where)} "
                                   f"(known: {', '.join(sorted(APP_KEYS))})")
            if key == "credential" and not isinstance(value, str):
                raise source.error(where, key, "credential must be a file name (a string)")
            if key in ("announce", "alerts"):
                if not _is_str_list(value):
                    raise source.error(where, key, f"{key} must be a list of \"ADDR:PORT\" "
                                       "strings")
                for target in value:
                    try:
                        parse_target(target)
                    except ValueError as e:
                        raise source.error(where, key, f"{key}: {e}") from None
            if key == "timeout" and (isinstance(value, bool) or
                                     not isinstance(value, int | float) or value <= 0):
                raise source.error(where, key, "timeout must be a positive number of seconds")
            if key == "worker":
                if not isinstance(value, dict):
                    raise source.error(where, key, "worker must be a table")
                validate_worker_table(source, [*where, "worker"], value, False,
                                      worker_keys)


def validate_worker_table(source: Source, where: list[str], table: dict[str, Any],
                          top: bool, worker_keys: WorkerKeys | None) -> None:
    """Keys of a worker table are the long options of twistd rexnet-worker (WORKER_KEYS;
    None: not checked here)."""
    if worker_keys is None:
        return
    params, flags, lists = worker_keys
    known = params | flags | lists | {"command"} | (WORKER_PROCESS_KEYS if top else
                                                  {"credential"})
    for key, value in table.items():
        option = key.replace("_", "-")
        if option not in known:
            raise source.error(where, key, f"unknown key {key!r} in {_table_name(where)} "
                               f"(known: {', '.join(sorted(known))})")
        if option in flags and not isinstance(value, bool):
            raise source.error(where, key, f"{key} must be true or false")
        if option in lists and not _is_str_list(value):
            raise source.error(where, key, f"{key} must be a list of strings")
        if option in (params | WORKER_PROCESS_KEYS | {"credential"}) and (
                isinstance(value, bool) or not isinstance(value, str | int | float)):
            raise source.error(where, key, f"{key} must be a string or a number")
        if option == "command" and not (_is_str_list(value) and value):
            raise source.error(where, key, "command must be a non-empty list of strings, "
                               "e.g. [\"oggenc\", \"-Q\", \"-\"]")


# -- merged view -------------------------------------------------------------------------


@dataclass
class Setting:
    """A value and the file it came from."""

    value: Any
    source: Source


@dataclass
class Config:
    """The merged configuration: per key, the first file's value."""

    sources: list[Source] = field(default_factory=list)

    def get(self, table: list[str], key: str) -> Setting | None:
        for source in self.sources:
            node: Any = source.data
            for part in table:
                node = node.get(part) if isinstance(node, dict) else None
            if isinstance(node, dict) and key in node:
                return Setting(node[key], source)
        return None

    def table_keys(self, table: list[str]) -> list[str]:
        keys: dict[str, None] = {}
        for source in self.sources:
            node: Any = source.data
            for part in table:
                node = node.get(part) if isinstance(node, dict) else None
            if isinstance(node, dict):
                keys.update(dict.fromkeys(node))
        return list(keys)

    def applications(self) -> list[str]:
        return self.table_keys(["applications"])

    def application(self, name: str) -> Application | None:
        """Settings for rexnet exec/status/parallel of application NAME, or None."""
        if name not in self.applications():
            return None
        where = ["applications", name]
        credential = self.get(where, "credential")
        if credential is None:
            source = next(s for s in self.sources if name in s.data.get("applications", {}))
            raise source.error(where, None, f"application {name!r} has no credential "
                               "(its client credential file) for clients")
        app = Application(name, credential.source.resolve(credential.value))
        for key in ("announce", "alerts", "timeout"):
            found = self.get(where, key)
            if found is not None:
                setattr(app, key, found.value)
        return app


@dataclass
class Application:
    """What a client needs to know of an application."""

    name: str
    credential: str
    announce: list[str] = field(default_factory=list)
    alerts: list[str] = field(default_factory=list)
    timeout: float | None = None


def check_owner(path: Path) -> None:
    """A configuration file names credentials and where jobs go: it must belong to this user
    (or root) and be writable by nobody else, or another local user could steer this user's
    jobs (a ./rexnet.toml planted in a shared directory). ConfigError if not."""
    try:
        info = path.stat()
    except OSError:
        return  # read() says what is wrong with it
    if info.st_uid not in (os.getuid(), 0):
        raise ConfigError(f"{path}: owned by uid {info.st_uid}, not by you (uid "
                          f"{os.getuid()}) or root: refusing it (remove it, or run elsewhere)")
    if info.st_mode & 0o022:
        raise ConfigError(f"{path}: writable by others (mode {info.st_mode & 0o777:o}): "
                          f"refusing it (chmod go-w {path})")


def load(paths: Iterable[Path] | None = None) -> Config:
    """Read and check the files of PATHS (default: the search path) that exist; each must
    be owned by this user or root and writable by nobody else (check_owner)."""
    config = Config()
    explicit = paths is not None or bool(os.environ.get(ENV))
    for path in search_path() if paths is None else paths:
        if not explicit and not path.is_file():
            continue
        check_owner(path)
        source = read(path)
        validate(source)
        config.sources.append(source)
    return config


# -- the worker process ------------------------------------------------------------------


@dataclass
class WorkerApp:
    """One application a worker process serves: its argument list for twistd
    rexnet-worker's options, and where each option came from (for errors)."""

    name: str
    options: list[str]
    positional: list[str]
    origin: dict[str, str]
    table: str
    values: dict[str, str] = field(default_factory=dict)

    def argv(self, overrides: Sequence[str] = ()) -> list[str]:
        """The argument list, with OVERRIDES (options of the command line) after the
        file's options, so that they win."""
        return [*self.options, *overrides, *self.positional]


def worker_apps(source: Source, worker_keys: WorkerKeys) -> tuple[list[WorkerApp],
                                                                  dict[str, Any]]:
    """The applications of SOURCE with a worker table, as rexnet-worker argument lists
    ([worker] supplies defaults); and the process settings (metrics). WORKER_KEYS: the
    worker's options (rexnet.worker.tap.config_keys())."""
    params, flags, lists = worker_keys
    top: dict[str, Any] = source.data.get("worker", {})
    process = {k: v for k, v in top.items() if k in WORKER_PROCESS_KEYS}
    apps = []
    for name, app in source.data.get("applications", {}).items():
        if "worker" not in app:
            continue
        where = ["applications", name, "worker"]
        table = app["worker"]
        settings: dict[str, tuple[Any, str]] = {}
        for key, value in top.items():
            if key not in WORKER_PROCESS_KEYS:
                settings[key.replace("_", "-")] = (value, source.where(["worker"], key))
        for key, value in table.items():
            settings[key.replace("_", "-")] = (value, source.where(where, key))
        for required in ("credential", "command"):
            if required not in settings and not (required == "command" and any(
                    settings.get(key, (False, ""))[0]
                    for key in ("python", "commands", "any-command"))):
                raise source.error(where, None, f"[applications.{name}.worker] needs "
                                   f"{required} = ...")
        argv: list[str] = []
        origin: dict[str, str] = {}
        values: dict[str, str] = {}
        for option, (value, at) in settings.items():
            origin[option] = at
            values[option] = str(value)
            if option in flags:
                argv += [f"--{option}"] if value else []
            elif option in lists:
                for item in value:
                    argv += [f"--{option}", item]
            elif option in params:
                text = str(value)
                if option == "chdir":
                    text = source.resolve(text)
                argv.append(f"--{option}={text}")
        positional = [source.resolve(str(settings["credential"][0]))]
        origin["credential"] = settings["credential"][1]
        if "command" in settings:
            positional += settings["command"][0]
            origin["command"] = settings["command"][1]
        apps.append(WorkerApp(name, argv, positional, origin, f"[applications.{name}.worker]",
                              values))
    if not apps:
        raise ConfigError(f"{source.path}:1: no [applications.NAME.worker] table: nothing "
                          "to serve")
    return apps, process


def blame(app: WorkerApp, message: str) -> str:
    """MESSAGE about APP's options, prefixed with the FILE:LINE of the option it names."""
    for option, at in app.origin.items():
        if f"--{option}" in message or f"{option}:" in message:
            return f"{at}: {message} (in {app.table})"
    for option, value in app.values.items():  # a message that quotes the bad value
        if option in app.origin and repr(value) in message:
            return f"{app.origin[option]}: {message} (in {app.table})"
    at = app.origin.get("command" if "command" in message else "credential", "")
    return f"{at}: {message} (in {app.table})"



# -- the command line --------------------------------------------------------------------


def fill_in(app: Application, values: MutableMapping[str, Any]) -> None:
    """Take APP's credential into VALUES["keyfile"], and its announce and alert targets and
    timeout where VALUES has those keys and the command line gave none (then the timeout is
    DEFAULT_TIMEOUT). rexnet.cli.request.application calls it, for every command line."""
    values["keyfile"] = app.credential
    if not values["announce"]:
        values["announce"] = list(app.announce)
    if "alerts" in values and not values["alerts"]:
        values["alerts"] = list(app.alerts)
    if "timeout" in values and values["timeout"] is None:
        values["timeout"] = DEFAULT_TIMEOUT if app.timeout is None else float(app.timeout)
