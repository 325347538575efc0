"""Manual pages, bash completion, --version and JSON logs: what an administrator expects."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cluster import BIN, REXNET, TWISTD, Proc, loopback_address, worker_argv
from conftest import Keys

from rexnet import __version__
from rexnet.cli.manpages import PLUGINS, Page, escape, options_of, pages, render

SHARE = Path(sys.prefix, "share")
EXPECTED = {"rexnet.1", "rexnet-exec.1", "rexnet-keygen.1", "rexnet-status.1",
            "rexnet-parallel.1", "rexnet-agent.1", "rexnet-worker.8", "crat.8", "cproxy.8",
            "rexnet-tunnel.8", "cexec.1", "rexnet-jobs.1", "rexnet-attach.1", "rexnet-output.1",
            "rexnet-cancel.1"}


def man(path: Path) -> str:
    """PATH rendered by man(1) as plain text; man's warnings fail the test."""
    if shutil.which("man") is None:
        if os.environ.get("CI"):
            raise AssertionError("man is missing: make tools installs man-db")
        pytest.skip("man is not installed (make tools installs man-db)")
    done = subprocess.run(["man", "--warnings", "-l", str(path)], capture_output=True,
                          text=True, timeout=60,
                          env=dict(os.environ, LC_ALL="C", MANWIDTH="250", MANPAGER="cat",
                                   PAGER="cat"))
    assert done.returncode == 0, done.stderr
    assert done.stderr == "", done.stderr
    return done.stdout


def test_every_page_is_installed_as_the_code_would_write_it_now() -> None:
    assert {page.filename for page in pages()} == EXPECTED
    for page in pages():
        installed = SHARE / "man" / f"man{page.section}" / page.filename
        assert installed.is_file(), f"{installed} not installed"
        assert installed.read_text() == render(page), \
            f"{installed} differs from the option definitions (reinstall the package)"


@pytest.mark.parametrize("page", pages(), ids=[p.filename for p in pages()])
def test_man_renders_each_page_with_every_option(page: Page) -> None:
    text = man(SHARE / "man" / f"man{page.section}" / page.filename)
    assert text.startswith(f"{page.name.upper()}({page.section})")
    assert "NAME" in text and "SYNOPSIS" in text and "DESCRIPTION" in text
    assert page.options, "a page with no options"
    for option in page.options:
        for name in option.names:
            assert re.search(rf"(^|[\s,]){re.escape(name)}([\s,]|$)", text, re.M), \
                f"{name} missing from {page.filename}"


def test_plugin_pages_list_the_options_twistd_parses() -> None:
    """The drift check from the other side: each plugin's --help options are on its page."""
    import importlib

    for plugin in PLUGINS:
        help_text = str(importlib.import_module(plugin.module).Options())
        longs = set(re.findall(r"^\s+(?:-\w, )?--([a-z][a-z-]+)", help_text, re.M))
        assert "help" in longs
        documented = {n[2:] for o in options_of(importlib.import_module(plugin.module)
                                                .Options) for n in o.names if n[:2] == "--"}
        assert longs <= documented, (plugin.name, longs - documented)
        assert "version" in documented
        if plugin.name == "rexnet-worker":
            assert {"config", "metrics"} <= documented


def test_roff_escaping() -> None:
    assert escape(".starts with a dot\n'and a quote") == "\\&.starts with a dot\n\\&'and a quote"
    assert escape("a\\b-c") == "a\\eb\\-c"


# -- bash completion -------------------------------------------------------------------


def complete(words: list[str], cwd: Path | None = None) -> list[str]:
    script = SHARE / "bash-completion" / "completions" / "rexnet"
    line = " ".join(f"'{w}'" for w in words)
    done = subprocess.run(
        ["bash", "--norc", "-c", f'source "{script}"; complete -p rexnet >/dev/null || exit 9; '
         f'COMP_WORDS=({line}); COMP_CWORD={len(words) - 1}; _rexnet; '
         'printf "%s\\n" "${COMPREPLY[@]}"'],
        capture_output=True, text=True, timeout=30, cwd=cwd,
        env=dict(os.environ, XDG_CONFIG_HOME=str(cwd or "/nonexistent")))
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_the_completion_is_installed_for_both_command_names() -> None:
    from rexnet.cli.completion import script

    for command in ("rexnet", "cexec"):
        assert (SHARE / "bash-completion" / "completions" / command).read_text() == script()


def test_bash_completion_offers_commands_options_and_applications(tmp_path: Path) -> None:
    assert complete(["rexnet", "e"]) == ["exec"]
    assert complete(["rexnet", "--config", "x", "st"]) == ["status"]
    assert complete(["rexnet", "exec", "--ti"]) == ["--timeout"]
    assert complete(["rexnet", "keygen", "--issue", ""]) == ["client", "worker", "relay",
                                                            "admin"]
    assert "--keep-order" in complete(["rexnet", "parallel", "--"])
    assert "--env" in complete(["cexec", "--"])
    (tmp_path / "rexnet.toml").write_text('[applications.ogg]\ncredential = "x"\n'
                                          '[applications.ogg.worker]\n[applications.gz]\n')
    (tmp_path / "go.client").write_text("")
    assert complete(["rexnet", "exec", "g"], cwd=tmp_path) == ["gz", "go.client"]
    assert complete(["rexnet", "status", "o"], cwd=tmp_path) == ["ogg"]
    (tmp_path / "other.toml").write_text("[applications.gzip]\n")
    assert complete(["rexnet", "--config", "other.toml", "exec", "gz"], cwd=tmp_path) == [
        "gzip"]


# -- --version and JSON logs ---------------------------------------------------------------


@pytest.mark.parametrize("argv", [[REXNET, "--version"], [str(BIN / "cexec"), "--version"],
                                  [TWISTD, "rexnet-worker", "--version"],
                                  [TWISTD, "crat", "--version"], [TWISTD, "cproxy", "--version"],
                                  [TWISTD, "rexnet-tunnel", "--version"]],
                         ids=lambda argv: " ".join(Path(a).name for a in argv))
def test_version_everywhere(argv: list[str]) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"rexnet {__version__}")


def test_twistd_logger_writes_json_lines(keys: Keys) -> None:
    addr = loopback_address()
    argv = worker_argv(keys.worker, ["cat"], f"{addr}:3010", "jsonny")
    argv.insert(argv.index("rexnet-worker"), "--logger=rexnet.logs.json_logger")
    worker = Proc(argv)
    try:
        worker.wait_for(r'"message": "worker jsonny serves testapp')
        done = subprocess.run([REXNET, "exec", "-a", f"{addr}:3010", str(keys.client)],
                              input=b"hi", capture_output=True, timeout=60)
        assert done.returncode == 0 and done.stdout == b"hi"
        worker.wait_for(r'"message": "job \w+ (ended|started [^"]*, ended after '
                        r'[\d.]+ s): exit 0"')  # (a short job's one line)
    finally:
        worker.stop()
    records = [json.loads(line) for line in worker.output.splitlines() if line.strip()]
    serving = next(r for r in records if r["message"].startswith("worker jsonny serves"))
    assert serving["namespace"] == "rexnet.worker.listener" and serving["level"] == "info"
    assert serving["name"] == "jsonny" and serving["port"] == 3010
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+\+00:00", serving["time"])
    assert any(r["message"].startswith("Received SIGTERM") for r in records)


def test_the_worker_page_lists_every_metric_the_worker_serves() -> None:
    from rexnet.worker.metrics import Metrics

    text = man(SHARE / "man" / "man8" / "rexnet-worker.8")
    names = [f.name + ("_total" if f.type == "counter" else "")
             for f in Metrics().registry.collect()]
    assert len(names) >= 12
    for name in names:
        assert re.search(rf"^\s+{name}$", text, re.M), f"{name} not on rexnet-worker(8)"


def test_cexec_has_its_page_with_the_exit_codes_and_command_workers() -> None:
    [page] = [p for p in pages() if p.name == "cexec"]
    text = render(page)
    assert "246" in text and "\\-\\-commands" in text
    assert {"\\-\\-all", "\\-\\-cwd", "\\-\\-worker"} <= {
        n for o in page.options for n in [escape(x) for x in o.names]}
