"""etc/: the systemd units, the .tac files and the README's deployment steps, run for real."""

from __future__ import annotations

import gzip
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster import BIN, REXNET, TWISTD, Proc, loopback_address
from conftest import Keys
from netbed import NetBed

from rexnet import config
from rexnet.protocol import exitcodes
from rexnet.worker.tap import config_keys

ROOT = Path(__file__).resolve().parent.parent
ETC = ROOT / "etc"
UNITS = ["rexnet-worker@.service", "crat.service", "cproxy.service"]
SANDBOX = {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
           "PrivateTmp": "yes", "PrivateDevices": "yes", "RestrictNamespaces": "yes",
           "RestrictSUIDSGID": "yes",
           "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX AF_NETLINK"}
# crat and cproxy run as the dedicated user; the worker starts as root with only the
# capabilities to drop to it (twistd --uid/--gid), after reading its root-only credential
RUN_AS = {"crat.service": {"User": "rexnet", "CapabilityBoundingSet": ""},
          "cproxy.service": {"User": "rexnet", "CapabilityBoundingSet": ""},
          "rexnet-worker@.service": {"CapabilityBoundingSet": "CAP_SETUID CAP_SETGID"}}


def service_section(name: str) -> dict[str, str]:
    """The [Service] settings of unit NAME (the last of repeated keys)."""
    settings, section = {}, ""
    for line in (ETC / "systemd" / name).read_text().splitlines():
        if line.startswith("["):
            section = line.strip("[]")
        elif section == "Service" and "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            settings[key] = value
    return settings


def exec_start(name: str, instance: str = "config", etc: str = "/etc/rexnet",
               env: dict[str, str] | None = None) -> list[str]:
    """The unit's command line as systemd would run it: %i, $VARIABLES (the unit's own
    Environment= unless ENV says), with /opt/rexnet/bin as this venv and /etc/rexnet as ETC."""
    settings = service_section(name)
    variables = dict(env or {})
    if "Environment" in settings and not variables:
        key, _, value = settings["Environment"].strip('"').partition("=")
        variables[key] = value
    line = settings["ExecStart"].replace("/opt/rexnet/bin/", f"{BIN}/")
    line = line.replace("%i", instance).replace("/etc/rexnet", etc)
    argv = []
    for word in shlex.split(line):
        if word.startswith("$"):
            argv += variables[word[1:]].split()  # systemd splits $VAR at whitespace
        else:
            argv.append(word)
    return argv


def test_units_run_as_a_dedicated_user_in_a_sandbox() -> None:
    for name in UNITS:
        settings = service_section(name)
        for key, value in {**SANDBOX, **RUN_AS[name]}.items():
            assert settings.get(key) == value, (name, key, settings.get(key))
        assert settings["ExecStart"].startswith("/opt/rexnet/bin/twistd --nodaemon --pidfile= "
                                                "--logger=rexnet.logs.json_logger ")
        assert settings["RestartPreventExitStatus"].split() == [
            str(exitcodes.CONFIG), str(exitcodes.USAGE), str(exitcodes.CREDENTIAL)]


def test_systemd_analyze_verifies_the_units(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed: the units are checked by parsing only")
    for name in UNITS:
        text = (ETC / "systemd" / name).read_text().replace("/opt/rexnet/bin/", f"{BIN}/")
        (tmp_path / name.replace("@.", "@config.")).write_text(text)
    done = subprocess.run(["systemd-analyze", "verify", "--man=no",
                           *sorted(str(p) for p in tmp_path.iterdir())],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stderr == "", done.stderr  # unknown keys are only warnings: none allowed


def test_exec_start_lines_parse_with_twistds_own_parser() -> None:
    from twisted.scripts.twistd import ServerOptions

    from rexnet.logs import json_logger

    example = re.search(r'CPROXY_OPTIONS="([^"]+)"',
                        (ETC / "systemd" / "cproxy.service").read_text())
    assert example is not None
    expected = {"rexnet-worker": ("config", "/etc/rexnet/web.toml"),
                "crat": ("trust", ["/etc/rexnet/crat.trust"]),
                "cproxy": ("listen_addr", ("10.0.0.1", 3010))}
    for name, env in [("rexnet-worker@.service", {}), ("crat.service", {}),
                      ("cproxy.service", {"CPROXY_OPTIONS": example.group(1)})]:
        # this machine has no rexnet user: the worker's drop to it is read as nobody's
        drop = {"--uid=rexnet": "--uid=nobody", "--gid=rexnet": "--gid=nogroup"}
        argv = [drop.get(word, word) for word in exec_start(name, instance="web", env=env)]
        assert argv[0] == TWISTD
        options = ServerOptions()
        options.parseOptions(argv[1:])
        assert options["nodaemon"] and options["pidfile"] == ""
        assert options["logger"] is json_logger
        if name.startswith("rexnet-worker"):
            assert (options["uid"], options["gid"]) == (65534, 65534)
        key, value = expected[str(options.subCommand)]
        assert options.subOptions[key] == value


# -- .tac files ------------------------------------------------------------------------


def tac(name: str, variable: str, options: str) -> Proc:
    return Proc([TWISTD, "-n", "--pidfile=", "-y", str(ETC / name)],
                env=dict(os.environ, **{variable: options}))


def test_worker_tac_serves_a_configuration(tmp_path: Path, keys: Keys) -> None:
    addr = loopback_address()
    path = tmp_path / "config.toml"
    path.write_text(f'[applications.testapp]\ncredential = "{keys.client}"\n'
                    f'announce = ["{addr}:3010"]\n[applications.testapp.worker]\n'
                    f'credential = "{keys.worker}"\ncommand = ["tr", "a-z", "A-Z"]\n'
                    f'listen = "{addr}:3010"\nname = "tacked"\n')
    worker = tac("worker.tac", "REXNET_WORKER_OPTIONS", f"--config {path}")
    try:
        worker.wait_for(r"worker tacked serves testapp")
        done = subprocess.run([REXNET, "--config", str(path), "exec", "testapp"],
                              input=b"from a tac\n", capture_output=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert done.stdout == b"FROM A TAC\n"
    finally:
        worker.stop()


def test_crat_and_cproxy_tacs_start_their_services(keys: Keys) -> None:
    addr, relay = loopback_address(), loopback_address()
    crat = tac("crat.tac", "CRAT_OPTIONS", f"--listen {addr}:3011 --trust {keys.ca_pem}")
    cproxy = tac("cproxy.tac", "CPROXY_OPTIONS", f"--listen {relay}:3010 --announce "
                 f"{loopback_address()}:3010 --trust {keys.ca_pem}")
    try:
        crat.wait_for(rf"crat listening on {re.escape(addr)}:3011, trusting testapp")
        cproxy.wait_for(rf"cproxy listening on {re.escape(relay)}:3010")
    finally:
        crat.stop()
        cproxy.stop()


def test_a_tac_with_bad_options_says_so_in_one_line() -> None:
    done = subprocess.run([TWISTD, "-n", "--pidfile=", "-y", str(ETC / "cproxy.tac")],
                          capture_output=True, text=True, timeout=30,
                          env=dict(os.environ, CPROXY_OPTIONS=""))
    assert done.returncode != 0
    assert "cproxy.tac: give at least one --announce target on the other network" in (
        done.stdout + done.stderr)


def test_the_example_configuration_is_valid_and_serves_two_applications() -> None:
    source = config.read(ETC / "rexnet.toml.example")
    config.validate(source, config_keys())
    apps, process = config.worker_apps(source, config_keys())
    assert [app.name for app in apps] == ["ogg", "gz"]
    assert process == {"metrics": "127.0.0.1:9310"}
    assert apps[0].argv()[-3:] == ["oggenc", "-Q", "-"]
    assert apps[1].argv()[-2:] == ["gzip", "-c"]
    assert apps[1].argv()[0] == "--slots=2"


# -- the README's deployment section on a namespace bed ----------------------------------


@pytest.fixture
def deploy_root() -> Iterator[Path]:
    """A directory the unprivileged user can reach (pytest's own tmp is root's alone)."""
    root = Path(tempfile.mkdtemp(prefix="rexnet-deploy-"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def as_dedicated_user() -> dict[str, str]:
    """How the units' `--uid=rexnet --gid=rexnet` are run here: as `nobody`/`nogroup` (this
    bed has no rexnet user); no drop at all when this checkout is not readable by nobody
    (the test then says so in its output)."""
    probe = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
             "--no-new-privs"]
    if shutil.which("setpriv") and subprocess.run(
            [*probe, TWISTD, "--version"], capture_output=True, timeout=30).returncode == 0:
        return {"--uid=rexnet": "--uid=nobody", "--gid=rexnet": "--gid=nogroup"}
    print("the venv is not readable by nobody: the worker stays root")
    return {"--uid=rexnet": "", "--gid=rexnet": ""}


def test_readme_deployment_on_a_namespace_bed(bed: NetBed, deploy_root: Path) -> None:
    lan = bed.add_subnet("lan")
    w1, w2, client = (bed.add_host(name, [lan]) for name in ("w1", "w2", "client"))
    # 2. credentials: made once; the worker's installed 0600 for root
    ca_dir = deploy_root / "admin"
    ca_dir.mkdir()
    for app in ("ogg", "gz"):
        subprocess.run([REXNET, "keygen", app, "--dir", str(ca_dir)], check=True,
                       capture_output=True, timeout=30)
    user = as_dedicated_user()
    readme = (ROOT / "README.md").read_text()
    deployment = readme[readme.index("## Deployment"):readme.index("## How a job")]
    system_toml, user_toml = re.findall(r"```toml\n(.*?)```", deployment, re.S)
    workers = []
    example = (ETC / "rexnet.toml.example").read_text()
    for host, system in ((w1, system_toml), (w2, example)):
        etc = deploy_root / host.name / "etc"
        state = deploy_root / host.name / "state"
        etc.mkdir(parents=True)
        state.mkdir()
        for credential in ("ogg.worker", "gz.worker"):
            shutil.copy(ca_dir / credential, etc / credential)
        # 3. w1: the README's configuration; w2: etc/rexnet.toml.example (ogg and gz), both
        # with this bed's broadcast address, and `cat` for oggenc
        text = system.replace("10.0.0.255:3010", f"{lan.broadcast}:3010")
        text = text.replace('["oggenc", "-Q", "-"]',
                            '["sh", "-c", "cat; echo \\" by $REXNET_WORKER\\""]')
        text = text.replace("[worker]\n", f'[worker]\nname = "{host.name}"\n', 1)
        (etc / "config.toml").write_text(text)
        # the credentials stay root's (0600); the unit's ExecStartPre gives the state to
        # the user the worker drops to
        if user["--uid=rexnet"]:
            os.chown(state, 65534, 65534)
        # 4. the unit's command line, started as root, in its working directory
        argv = [user.get(word, word)
                for word in exec_start("rexnet-worker@.service", "config", str(etc))]
        workers.append(Proc(host.argv([word for word in argv if word]), cwd=state))
    for worker in workers:
        worker.wait_for(r'"message": "worker w\d serves ogg .*listening on 0\.0\.0\.0:3010"')
    workers[1].wait_for(r'"message": "worker w2 serves gz .*sharing 0\.0\.0\.0:3010"')
    # a user's own configuration: the client credential in ~/.config/rexnet
    home = deploy_root / "home"
    (home / ".config" / "rexnet").mkdir(parents=True)
    for credential in ("ogg.client", "gz.client"):
        shutil.copy(ca_dir / credential, home / ".config" / "rexnet" / credential)
    # (no /etc/rexnet/config.toml on the client host here: the user's file says announce)
    (home / ".config" / "rexnet" / "config.toml").write_text(
        user_toml + f'announce = ["{lan.broadcast}:3010"]\n\n[applications.gz]\n'
        f'credential = "gz.client"\nannounce = ["{lan.broadcast}:3010"]\n')
    env = dict(os.environ, HOME=str(home), REXNET_CONFIG="")
    env.pop("XDG_CONFIG_HOME", None)
    seen = set()
    for _ in range(6):
        done = subprocess.run(client.argv([REXNET, "exec", "ogg"]), input=b"song",
                              capture_output=True, timeout=60, cwd=home, env=env)
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith(b"song by w")
        seen.add(done.stdout.split()[-1])
    assert seen <= {b"w1", b"w2"} and seen
    data = b"the example configuration's second application\n" * 100
    done = subprocess.run(client.argv([REXNET, "exec", "-v", "gz"]), input=data,
                          capture_output=True, timeout=60, cwd=home, env=env)
    assert done.returncode == 0, done.stderr
    assert gzip.decompress(done.stdout) == data
    assert b"runs on worker w2" in done.stderr  # only w2 serves gz
    # 5. watching: JSON logs name the jobs; metrics count them (on the host's own loopback)
    for worker in workers:
        for line in worker.output.splitlines():
            json.loads(line)
    scraped = subprocess.run(w1.argv([sys.executable, "-c", "import urllib.request; print(urllib."
                                      "request.urlopen('http://127.0.0.1:9310/metrics')"
                                      ".read().decode())"]),
                             capture_output=True, text=True, timeout=30)
    assert scraped.returncode == 0, scraped.stderr
    assert 'rexnet_slots{app="ogg"} 4.0' in scraped.stdout
    started = re.search(r'rexnet_jobs_started_total\{app="ogg"\} (\S+)', scraped.stdout)
    assert started is not None
    assert float(started.group(1)) == sum(
        1 for line in workers[0].output.splitlines() if "started for client" in line)
    if user["--uid=rexnet"]:  # served as nobody with a key only root can read
        status = Path(f"/proc/{workers[0].pid}/status").read_text()
        assert re.search(r"^Uid:\s+65534\s+65534", status, re.M), status
    for worker in workers:  # twistd ends by its signal, as systemd expects of a service
        assert worker.stop() == -signal.SIGTERM
        assert '"message": "Server Shut Down."' in worker.output

