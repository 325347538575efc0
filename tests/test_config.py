"""rexnet.toml: errors with file and line, precedence of the files, `rexnet exec NAME`,
and `twistd rexnet-worker --config FILE` serving several applications from one process."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from cluster import REXNET, TWISTD, Proc, loopback_address
from conftest import Keys

from rexnet import config
from rexnet.protocol import exitcodes
from rexnet.worker.tap import config_keys


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.mark.parametrize("text,line,message", [
    ('[applications.ogg]\ncredential = "a"\n\ncolour = "red"\n', 4,
     "unknown key 'colour' in [applications.ogg]"),
    ('[applications.ogg]\nannounce = "10.0.0.1"\n', 2, "announce must be a list"),
    ('[applications.ogg]\nannounce = ["10.0.0.1:99999"]\n', 2, "announce:"),
    ('[applications.ogg]\ntimeout = -1\n', 2, "timeout must be a positive number"),
    ('[applications.ogg.worker]\ncredential = "w"\ncommand = ["cat"]\nslotz = 3\n', 4,
     "unknown key 'slotz' in [applications.ogg.worker]"),
    ('[applications.ogg.worker]\nallow_args = "yes"\n', 2, "allow_args must be true or false"),
    ('[worker]\nmetrics = "127.0.0.1:9310"\n\n[workers]\nx = 1\n', 4, "unknown key 'workers'"),
    ('[applications.ogg]\ncredential = "a"\ncredential = "b"\n', 3, "Cannot overwrite"),
    ('[applications.ogg]\ncredential = \n', 2, "Invalid value"),
])
def test_mistakes_name_the_file_and_line(tmp_path: Path, text: str, line: int,
                                         message: str) -> None:
    """The worker's check (all of them, worker tables too); a client only reads the
    application tables and leaves worker tables to the worker."""
    path = write(tmp_path / "rexnet.toml", text)
    with pytest.raises(config.ConfigError) as e:
        config.validate(config.read(path), config_keys())
    assert str(e.value).startswith(f"{path}:{line}: "), e.value
    assert message in str(e.value)


def test_line_of_finds_keys_in_their_table() -> None:
    text = ('x = 1\n[applications.a]\nslots = 1\n[applications.b]\n# slots = 0\n'
            ' slots = 2\n[applications."b".worker]\nslots=3\n')
    assert config.line_of(text, ["applications", "b"], "slots") == 6
    assert config.line_of(text, ["applications", "b", "worker"], "slots") == 8
    assert config.line_of(text, ["applications", "b"], "missing") == 4


def test_the_first_file_wins_per_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                     ) -> None:
    here, home = tmp_path / "here", tmp_path / "home"
    write(here / "rexnet.toml", '[applications.ogg]\nannounce = ["10.0.0.1:3010"]\n')
    write(home / "rexnet" / "config.toml", '[applications.ogg]\ncredential = "ogg.client"\n'
          'announce = ["10.0.0.2:3010"]\ntimeout = 5\n[applications.gz]\n'
          'credential = "/keys/gz.client"\n')
    monkeypatch.chdir(here)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home))
    monkeypatch.delenv(config.ENV, raising=False)
    loaded = config.load()
    assert [s.path for s in loaded.sources][:2] == [Path("rexnet.toml"),
                                                    home / "rexnet" / "config.toml"]
    ogg = loaded.application("ogg")
    assert ogg is not None
    assert ogg.announce == ["10.0.0.1:3010"]  # ./rexnet.toml wins
    assert ogg.timeout == 5  # only the second file says
    assert ogg.credential == str(home / "rexnet" / "ogg.client")  # relative to its file
    gz = loaded.application("gz")
    assert gz is not None and gz.credential == "/keys/gz.client"
    assert loaded.application("nothing") is None
    monkeypatch.setenv(config.ENV, str(home / "rexnet" / "config.toml"))  # one file only
    only = config.load().application("ogg")
    assert only is not None and only.announce == ["10.0.0.2:3010"]


TWO_APPS = """\
[worker]
name = "both"                  # defaults for every application's worker table
slots = 2

[applications.testapp]
credential = "{keys.client}"
announce = ["{addr}:3010"]
timeout = 20

[applications.testapp.worker]
credential = "{keys.worker}"
command = ["sh", "-c"]
allow_args = true
listen = "{addr}:3010"
accept_env = ["COLOUR"]

[applications.otherapp]
credential = "{other.client}"
announce = ["{addr}:3010"]

[applications.otherapp.worker]
credential = "{other.worker}"
command = ["tr", "a-z", "A-Z"]
listen = "{addr}:3010"          # the same socket as testapp's
"""


def test_one_worker_process_serves_two_applications_and_exec_finds_them_by_name(
        tmp_path: Path, keys: Keys, other_keys: Keys) -> None:
    addr = loopback_address()
    path = write(tmp_path / "rexnet.toml", TWO_APPS.format(keys=keys, other=other_keys,
                                                           addr=addr))
    worker = Proc([TWISTD, "-n", "--pidfile=", "rexnet-worker", "--config", str(path),
                   "--slots", "3"])  # the command line wins over the file's slots = 2
    try:
        worker.wait_for(r"serves otherapp .* sharing")
        worker.wait_for(r"serves testapp .* listening on")
        env = dict(os.environ, COLOUR="green")
        done = subprocess.run([REXNET, "exec", "-v", "--env", "COLOUR", "testapp", "--",
                               "echo $REXNET_WORKER $COLOUR"], cwd=tmp_path, env=env,
                              capture_output=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert done.stdout == b"both green\n"
        assert b"0/3 slots busy" in done.stderr
        # an application's name goes through the agent too: the next job reuses its channel
        done = subprocess.run([REXNET, "exec", "-v", "testapp", "--", "echo again"],
                              cwd=tmp_path, capture_output=True, timeout=60)
        assert done.returncode == 0 and done.stdout == b"again\n", done.stderr
        assert b"reused warm channel" in done.stderr
        done = subprocess.run([REXNET, "exec", "otherapp"], cwd=tmp_path, input=b"shout\n",
                              capture_output=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert done.stdout == b"SHOUT\n"
        # the same through --config, from anywhere
        done = subprocess.run([REXNET, "--config", str(path), "status", "otherapp"],
                              cwd="/", capture_output=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert b"both" in done.stdout
    finally:
        worker.stop()


def test_bad_worker_values_are_errors_with_file_and_line(tmp_path: Path, keys: Keys) -> None:
    path = write(tmp_path / "w.toml", f'[applications.testapp.worker]\ncredential = '
                 f'"{keys.worker}"\ncommand = ["cat"]\n\nslots = 0\n')
    done = subprocess.run([TWISTD, "-n", "--pidfile=", "rexnet-worker", "--config", str(path)],
                          capture_output=True, timeout=30)
    assert done.returncode == exitcodes.CONFIG, done.stderr
    assert done.stderr.decode().strip() == (
        f"rexnet-worker: {path}:5: --slots must be a whole number of at least 1 "
        "(in [applications.testapp.worker])")
    path.write_text('[applications.testapp.worker]\ncommand = ["cat"]\n')
    done = subprocess.run([TWISTD, "-n", "--pidfile=", "rexnet-worker", "--config", str(path)],
                          capture_output=True, timeout=30)
    assert done.returncode == exitcodes.CONFIG
    assert f"{path}:1: [applications.testapp.worker] needs credential".encode() in done.stderr


def test_exec_with_a_broken_config_says_where(tmp_path: Path) -> None:
    write(tmp_path / "rexnet.toml", '[applications.ogg]\ncredential = "ogg.client"\n'
          'annonce = ["10.0.0.1"]\n')
    done = subprocess.run([REXNET, "exec", "ogg"], cwd=tmp_path, capture_output=True,
                          timeout=30, env=dict(os.environ, XDG_CONFIG_HOME=str(tmp_path)))
    assert done.returncode == exitcodes.CONFIG
    assert done.stderr.decode() == ("rexnet: rexnet.toml:3: unknown key 'annonce' in "
                                    "[applications.ogg] (known: alerts, announce, "
                                    "credential, timeout, worker)\n")


def test_exec_of_neither_a_file_nor_an_application(tmp_path: Path) -> None:
    done = subprocess.run([REXNET, "exec", "nosuch"], cwd=tmp_path, capture_output=True,
                          timeout=30, env=dict(os.environ, XDG_CONFIG_HOME=str(tmp_path)))
    assert done.returncode == exitcodes.CREDENTIAL
    assert done.stderr.decode().startswith(
        "rexnet: no such credential file: nosuch, nor an application [applications.nosuch] "
        f"in rexnet.toml, {tmp_path}/rexnet/config.toml, /etc/rexnet/config.toml")


def test_a_keyfile_that_exists_is_used_without_reading_any_config(tmp_path: Path,
                                                                  keys: Keys) -> None:
    write(tmp_path / "rexnet.toml", "this is not TOML")
    done = subprocess.run([REXNET, "exec", "--timeout", "0.5", "-a", "127.0.0.1:9",
                           str(keys.client)], cwd=tmp_path, capture_output=True, timeout=30)
    assert done.returncode == exitcodes.NO_WORKER, done.stderr


@pytest.mark.parametrize("line,message", [
    ('listen = "localhost:3010"', "--listen: 'localhost' is no IP address"),
    ('job_memory = "lots"', "bad size 'lots': use BYTES or a number with K, M or G"),
    ('speed = 0', "--speed must be a number between 0.01 and 1000"),
    ('alerts = ["x:99999"]', "--alerts: bad address 'x:99999': use HOST[:PORT]"),
    ('chdir = "no/such/dir"', "--chdir: no such directory:"),
])
def test_each_bad_worker_value_names_its_line(tmp_path: Path, keys: Keys,
                                              capsys: pytest.CaptureFixture[str], line: str,
                                              message: str) -> None:
    from rexnet.worker.tap import from_config

    path = write(tmp_path / "w.toml", f'[worker]\nname = "w"\n\n[applications.testapp.worker]\n'
                 f'credential = "{keys.worker}"\ncommand = ["cat"]\n{line}\n')
    with pytest.raises(SystemExit) as e:
        from_config(str(path), [])
    assert e.value.code == exitcodes.CONFIG
    error = capsys.readouterr().err
    assert error.startswith(f"rexnet-worker: {path}:7: {message}"), error
    assert error.rstrip().endswith("(in [applications.testapp.worker])")


def test_a_missing_worker_credential_names_its_line(tmp_path: Path) -> None:
    path = write(tmp_path / "w.toml", '[applications.testapp.worker]\n'
                 'command = ["cat"]\ncredential = "missing.worker"\n')
    done = subprocess.run([TWISTD, "-n", "--pidfile=", "rexnet-worker", "--config", str(path)],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == exitcodes.CREDENTIAL
    assert done.stderr == (f"rexnet-worker: {path}:3: no such credential file: "
                           f"{tmp_path}/missing.worker\n")


def test_a_client_leaves_worker_tables_to_the_worker(tmp_path: Path) -> None:
    """rexnet exec NAME reads the application's own table; a worker option it does not know
    is the worker's to refuse (twistd rexnet-worker --config), not the client's."""
    path = write(tmp_path / "rexnet.toml", '[applications.ogg]\ncredential = "a"\n'
                 '[applications.ogg.worker]\ncredential = "w"\ncommand = ["cat"]\nslotz = 3\n')
    app = config.load([path]).application("ogg")
    assert app is not None and app.credential == str(tmp_path / "a")
    with pytest.raises(config.ConfigError, match="unknown key 'slotz'"):
        config.validate(config.read(path), config_keys())


def test_a_configuration_file_another_user_can_write_is_refused(tmp_path: Path) -> None:
    """An attacker who can write ./rexnet.toml (a shared directory) could point rexnet exec
    NAME at their own credential and workers: such a file is refused, with what to do."""
    path = write(tmp_path / "rexnet.toml", '[applications.ogg]\ncredential = "a"\n')
    path.chmod(0o666)
    with pytest.raises(config.ConfigError, match=r"writable by others .*\(chmod go-w"):
        config.load([path])
    path.chmod(0o644)
    assert config.load([path]).application("ogg") is not None
    os.chown(path, 65534, 65534) if os.getuid() == 0 else pytest.skip("chown needs root")
    with pytest.raises(config.ConfigError, match="owned by uid 65534, not by you"):
        config.load([path])


def test_rexnet_exec_refuses_a_planted_rexnet_toml(tmp_path: Path) -> None:
    """Through the real command: exit 249 and a one-line message, nothing announced."""
    write(tmp_path / "rexnet.toml", '[applications.ogg]\ncredential = "ogg.client"\n'
          'announce = ["127.0.0.1:9"]\n').chmod(0o666)
    env = {k: v for k, v in os.environ.items() if k != "REXNET_CONFIG"}
    done = subprocess.run([REXNET, "exec", "--timeout", "1", "ogg"], cwd=tmp_path, env=env,
                          capture_output=True, timeout=30)
    assert done.returncode == exitcodes.CONFIG, done.stderr
    assert b"rexnet.toml: writable by others" in done.stderr
    assert done.stderr.count(b"\n") == 1
