"""`rexnet exec` against real workers on loopback: streams, statuses, errors, refusals."""

from __future__ import annotations

import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster import Proc, exec_argv, loopback_address, run_exec, start_worker
from conftest import Keys

from rexnet.protocol import exitcodes, wire
from rexnet.security.credentials import load_credential

SHELL = ["sh", "-c"]


@pytest.fixture(scope="module")
def shell_worker(keys: Keys) -> Iterator[tuple[Proc, str]]:
    """A worker running `sh -c SCRIPT`, SCRIPT given by the client."""
    addr = f"{loopback_address()}:3010"
    proc = start_worker(keys.worker, SHELL, addr, "shelly", "--allow-args", "--slots", "4")
    yield proc, addr
    proc.stop()


def sh(keys: Keys, addr: str, script: str, input: bytes = b"", *options: str
       ) -> subprocess.CompletedProcess[bytes]:
    return run_exec(keys.client, [addr], *options, "--", script, input=input)


def test_stdin_to_stdout_through_the_job(keys: Keys, shell_worker: tuple[Proc, str]) -> None:
    data = bytes(range(256)) * 4000
    done = sh(keys, shell_worker[1], "cat", data)
    assert done.returncode == 0, done.stderr
    assert done.stdout == data


def test_stdout_and_stderr_stay_apart(keys: Keys, shell_worker: tuple[Proc, str]) -> None:
    done = sh(keys, shell_worker[1], "echo out; echo err >&2; echo out2")
    assert done.stdout == b"out\nout2\n"
    assert done.stderr == b"err\n"


@pytest.mark.parametrize("script,status", [("exit 0", 0), ("exit 3", 3), ("exit 255", 255),
                                           ("kill -TERM $$", 128 + 15),
                                           ("kill -KILL $$", 128 + 9)])
def test_exit_status_is_the_jobs(keys: Keys, shell_worker: tuple[Proc, str], script: str,
                                 status: int) -> None:
    done = sh(keys, shell_worker[1], script)
    assert done.returncode == status, done.stderr


def test_output_is_complete_before_exit(keys: Keys, shell_worker: tuple[Proc, str]) -> None:
    done = sh(keys, shell_worker[1], "head -c 5000000 /dev/zero; exit 7")
    assert done.returncode == 7
    assert done.stdout == b"\0" * 5_000_000


def test_job_environment_names_job_worker_and_client(
    keys: Keys, shell_worker: tuple[Proc, str]
) -> None:
    done = sh(keys, shell_worker[1], 'echo "$REXNET_JOB_ID|$REXNET_WORKER|$REXNET_CLIENT"')
    job, worker, client = done.stdout.decode().strip().split("|")
    assert len(job) == 12 and worker == "shelly" and client == "client"


def test_verbose_says_which_worker_and_why(keys: Keys, shell_worker: tuple[Proc, str]) -> None:
    done = sh(keys, shell_worker[1], "true", b"", "-v")
    assert done.returncode == 0
    assert b"runs on worker shelly" in done.stderr
    assert b"first of 1 to connect back" in done.stderr


def test_stdin_closed_early_by_the_job(keys: Keys, shell_worker: tuple[Proc, str]) -> None:
    done = sh(keys, shell_worker[1], "head -c 10", b"x" * 3_000_000)
    assert done.returncode == 0
    assert done.stdout == b"x" * 10


def test_extra_arguments_refused_unless_allowed(keys: Keys) -> None:
    addr = f"{loopback_address()}:3010"
    worker = start_worker(keys.worker, ["echo"], addr, "strict")
    try:
        done = run_exec(keys.client, [addr], "--", "hello")
        assert done.returncode == exitcodes.REFUSED
        assert b"does not accept extra arguments" in done.stderr
        plain = run_exec(keys.client, [addr])
        assert plain.returncode == 0 and plain.stdout == b"\n"
    finally:
        worker.stop()


def test_no_worker_answers(keys: Keys) -> None:
    done = run_exec(keys.client, [f"{loopback_address()}:3010"], "--timeout", "0.5")
    assert done.returncode == exitcodes.NO_WORKER
    assert done.stderr.decode().strip().startswith("rexnet: no worker answered within 0.5 s")


def test_worker_of_another_application_never_answers(keys: Keys, other_keys: Keys) -> None:
    addr = f"{loopback_address()}:3010"
    worker = start_worker(other_keys.worker, ["true"], addr, "other")
    try:
        done = run_exec(keys.client, [addr], "--timeout", "1")
        assert done.returncode == exitcodes.NO_WORKER
        assert "job" not in worker.output.split("listening on")[1]
    finally:
        worker.stop()


# -- impostors at the connect-back port -------------------------------------------------


def impostor(sock: socket.socket, credential: Path | None, payload: bytes) -> dict[str, object]:
    """Wait for an announcement on SOCK, then connect back as an impostor would."""
    result: dict[str, object] = {}
    data, (source, _) = sock.recvfrom(wire.MAX_DATAGRAM)
    ann = wire.decode_datagram(data).message
    assert isinstance(ann, wire.Announce)
    with socket.create_connection((source, ann.port), timeout=10) as raw:
        if credential is None:
            raw.sendall(payload)
            result["reply"] = raw.recv(4096)
            return result
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.load_cert_chain(credential)
        try:
            with ctx.wrap_socket(raw) as tls:
                tls.sendall(payload)
                result["reply"] = tls.recv(4096)
        except (ssl.SSLError, OSError) as e:
            result["error"] = e
    return result


def run_against_impostor(keys: Keys, credential: Path | None, payload: bytes,
                         real_worker: str | None = None
                         ) -> tuple[subprocess.CompletedProcess[bytes], dict[str, object]]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((loopback_address(), 0))
    sock.settimeout(10)
    outcome: dict[str, object] = {}
    thread = threading.Thread(target=lambda: outcome.update(impostor(sock, credential, payload)))
    thread.start()
    targets = [f"{sock.getsockname()[0]}:{sock.getsockname()[1]}"]
    if real_worker:
        targets.append(real_worker)
    done = subprocess.run(exec_argv(keys.client, targets, "--timeout", "3", "--", "echo ok"),
                          capture_output=True, timeout=30)
    thread.join(15)
    sock.close()
    return done, outcome


@pytest.mark.parametrize("who", ["other application's worker", "client credential as worker",
                                 "plaintext", "garbage"])
def test_impostors_are_refused_and_the_job_never_starts(keys: Keys, other_keys: Keys,
                                                        who: str) -> None:
    credential, payload = {
        "other application's worker": (other_keys.worker, b"\0" * 64),
        "client credential as worker": (keys.client, b"\0" * 64),
        "plaintext": (None, b"GET / HTTP/1.0\r\n\r\n"),
        "garbage": (None, bytes(range(256))),
    }[who]
    done, outcome = run_against_impostor(keys, credential, payload)
    assert done.returncode == exitcodes.AUTH_FAILED, done.stderr
    assert b"complaint: connection from 127." in done.stderr
    assert b"failed authentication" in done.stderr
    # the impostor learnt nothing of the job: at most a TLS alert record, never a frame
    reply = outcome.get("reply", b"")
    assert isinstance(reply, bytes)
    assert reply == b"" or reply[0] == 0x15, outcome


def test_job_runs_despite_an_impostor(keys: Keys, shell_worker: tuple[Proc, str]) -> None:
    done, _ = run_against_impostor(keys, None, b"garbage", real_worker=shell_worker[1])
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"ok\n"


# -- bad datagrams at the worker --------------------------------------------------------


def test_worker_refuses_bad_announcements(keys: Keys) -> None:
    addr = loopback_address()
    worker = start_worker(keys.worker, ["true"], f"{addr}:3010", "picky")
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender.bind(("127.0.0.1", 0))
    try:
        as_worker = load_credential(keys.worker, "worker")
        ann = wire.Announce(b"\1" * 16, 0, wire_now(), 9, ("127.0.0.1",))
        forged = wire.encode_datagram(ann, as_worker.app_id, as_worker.key, as_worker.cert_der)
        sender.sendto(forged, (addr, 3010))
        worker.wait_for(r"complaint: announcement refused: certificate of role 'worker'")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other:
            other.bind(("127.0.0.2", 0))  # another source: complaints are per source
            other.sendto(b"RXN\x01garbage", (addr, 3010))
            worker.wait_for(r"complaint: announcement refused: malformed datagram")
    finally:
        sender.close()
        worker.stop()


def test_worker_refuses_a_replayed_announcement(keys: Keys) -> None:
    addr = loopback_address()
    worker = start_worker(keys.worker, ["true"], f"{addr}:3010", "replay")
    spy = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    spy.bind(("127.0.0.1", 0))
    spy.settimeout(10)
    try:
        done = run_exec(keys.client, [f"{addr}:3010", f"127.0.0.1:{spy.getsockname()[1]}"])
        assert done.returncode == 0
        captured, _ = spy.recvfrom(wire.MAX_DATAGRAM)
        replayer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        replayer.bind(("127.0.0.1", 0))
        replayer.sendto(captured, (addr, 3010))
        worker.wait_for(r"complaint: announcement refused: replayed announcement")
        replayer.close()
        assert worker.output.count("started for client") == 1
    finally:
        spy.close()
        worker.stop()


def wire_now() -> int:
    from rexnet.net.announce import now_ms

    return now_ms()


def test_a_busy_announcement_port_is_a_one_line_error(keys: Keys) -> None:
    from cluster import worker_argv

    addr = f"{loopback_address()}:3010"
    first = start_worker(keys.worker, ["true"], addr, "first")
    try:
        second = subprocess.run(worker_argv(keys.worker, ["true"], addr, "second"),
                                capture_output=True, timeout=30)
        assert second.returncode == exitcodes.USAGE
        assert second.stderr.decode().count("\n") == 1
        assert "cannot listen on" in second.stderr.decode()
        assert b"Traceback" not in second.stdout + second.stderr
    finally:
        first.stop()


def test_a_flood_of_silent_connections_to_the_clients_port_does_not_stop_the_job(
        keys: Keys) -> None:
    """An attacker who sees the announcement opens many TCP connections to the client's
    connect-back port and never speaks TLS: the client keeps at most a bounded number in
    their handshake (the rest are closed at once, with one complaint), and the real worker
    still gets the job (issue P10, point 13)."""
    from rexnet.client.connectback import MAX_HANDSHAKES, PER_SOURCE

    sniff = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sniff.bind((loopback_address(), 0))
    sniff.settimeout(10)
    worker_addr = loopback_address()
    client = subprocess.Popen(
        exec_argv(keys.client, [f"{sniff.getsockname()[0]}:{sniff.getsockname()[1]}",
                                f"{worker_addr}:3010"], "--no-agent", "--timeout", "30"),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    flood: list[socket.socket] = []
    worker = None
    try:
        announce = wire.decode_datagram(sniff.recv(65536)).message
        assert isinstance(announce, wire.Announce)
        sources = [loopback_address() for _ in range(3)]  # a few attacking addresses
        for i in range(3 * MAX_HANDSHAKES):
            sock = socket.socket()
            sock.bind((sources[i % len(sources)], 0))
            sock.connect((announce.addrs[0], announce.port))
            flood.append(sock)  # (the client may abort it at once: counted below)
        time.sleep(1.0)
        closed = 0
        for sock in flood:
            sock.settimeout(0.01)  # a socket the client aborted reads "" or a reset
            try:
                closed += sock.recv(1) == b""
            except ConnectionResetError:  # aborted: what a refusal looks like
                closed += 1
            except TimeoutError:  # still open, in its handshake
                pass
        # at most PER_SOURCE per address stay open in their handshake
        assert closed >= len(flood) - len(sources) * PER_SOURCE, closed
        worker = start_worker(keys.worker, ["echo", "ran"], f"{worker_addr}:3010", "real")
        out, err = client.communicate(timeout=40)
        assert client.returncode == 0, err
        assert out == b"ran\n"
        assert err.count(b"too many connections still in their TLS handshake") == 1, err
    finally:
        for sock in flood:
            sock.close()
        if client.poll() is None:
            client.kill()
        if worker is not None:
            worker.stop()
