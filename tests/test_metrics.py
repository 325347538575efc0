"""twistd rexnet-worker --metrics: a real worker, real jobs, a real scrape over HTTP."""

from __future__ import annotations

import os
import socket
import subprocess
import time
import urllib.request

from cluster import loopback_address, run_exec, start_worker, worker_argv
from conftest import Keys
from prometheus_client.parser import text_string_to_metric_families

from rexnet.net.announce import now_ms
from rexnet.protocol import exitcodes, wire
from rexnet.security.credentials import load_credential
from rexnet.worker.metrics import exit_class


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
          **labels: str) -> float:
    return samples[(name, tuple(sorted({"app": "testapp", **labels}.items())))]


def impostor_client(keys: Keys, worker_addr: str) -> None:
    """A signed announcement whose connect-back meets plaintext instead of TLS."""
    client = load_credential(keys.client, "client")
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(10)
        port = listener.getsockname()[1]
        ann = wire.Announce(b"\7" * 16, 0, now_ms(), port, ("127.0.0.1",))
        data = wire.encode_datagram(ann, client.app_id, client.key, client.cert_der)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.sendto(data, (worker_addr, 3010))
        conn, _ = listener.accept()
        with conn:
            conn.sendall(b"HTTP/1.0 400 not TLS\r\n\r\n" * 4)


def test_exit_classes() -> None:
    assert [exit_class(0, None, ""), exit_class(3, None, ""), exit_class(None, 9, ""),
            exit_class(None, 9, "time")] == ["ok", "error", "signal", "time-limit"]


def test_a_scrape_counts_what_the_worker_did(keys: Keys) -> None:
    addr = loopback_address()
    metrics = f"127.0.0.1:{free_port('127.0.0.1')}"
    worker = start_worker(keys.worker, ["sh", "-c"], f"{addr}:3010", "counted", "--allow-args",
                          "--slots", "3", "--job-timeout", "2", "--metrics", metrics)
    url = f"http://{metrics}/metrics"
    try:
        worker.wait_for(r"Prometheus metrics at http://127\.0\.0\.1:\d+/metrics")
        before = scrape(url)
        assert value(before, "rexnet_slots") == 3
        assert value(before, "rexnet_jobs_started_total") == 0
        # run-queue per CPU (whatever else this machine is doing) + no job of its own
        host = os.getloadavg()[0] / (os.cpu_count() or 1)
        assert 0 <= value(before, "rexnet_load") <= host + 1

        announce = [f"{addr}:3010"]
        ok = run_exec(keys.client, announce, "--", "cat", input=b"x" * 1000)
        assert ok.returncode == 0 and ok.stdout == b"x" * 1000
        failed = run_exec(keys.client, announce, "--", "echo no >&2; exit 3")
        assert failed.returncode == 3
        limited = run_exec(keys.client, announce, "--", "sleep 30")
        assert limited.returncode == exitcodes.TIME_LIMIT
        impostor_client(keys, addr)
        worker.wait_for(r"TLS with client failed")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as flood:
            flood.bind(("127.0.0.7", 0))
            for _ in range(100):  # 2000 datagrams in about 0.2 s: over the burst of 400
                for _ in range(20):
                    flood.sendto(b"not rexnet", (addr, 3010))
                time.sleep(0.002)
        worker.wait_for(r"malformed datagram")
        deadline = time.monotonic() + 10
        after = scrape(url)
        while (value(after, "rexnet_announcements_rate_limited_total") == 0
               and time.monotonic() < deadline):
            time.sleep(0.2)
            after = scrape(url)
        assert value(after, "rexnet_jobs_started_total") == 3
        assert value(after, "rexnet_jobs_finished_total", exit_class="ok") == 1
        assert value(after, "rexnet_jobs_finished_total", exit_class="error") == 1
        assert value(after, "rexnet_jobs_finished_total", exit_class="time-limit") == 1
        assert value(after, "rexnet_jobs_finished_total", exit_class="signal") == 0
        assert value(after, "rexnet_jobs_running") == 0
        assert value(after, "rexnet_job_bytes_received_total") == 1000
        assert value(after, "rexnet_job_bytes_sent_total") >= 1000 + len(b"no\n")
        # the first job's connect-back won; later ones may come over its kept (warm) channel
        assert value(after, "rexnet_connect_backs_total", outcome="won") >= 1
        assert (value(after, "rexnet_connect_backs_total", outcome="won")
                + value(after, "rexnet_connect_backs_total", outcome="warm")) == 3
        assert value(after, "rexnet_auth_failures_total") == 1
        assert value(after, "rexnet_announcements_rate_limited_total") > 0
    finally:
        worker.stop()


def test_a_busy_metrics_port_is_a_one_line_error(keys: Keys) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        done = subprocess.run(worker_argv(keys.worker, ["true"], f"{loopback_address()}:3010",
                                          "busy", "--metrics", f"127.0.0.1:{port}"),
                              capture_output=True, timeout=30)
    assert done.returncode == exitcodes.USAGE
    assert b"--metrics: cannot listen on 127.0.0.1:" in done.stderr
    assert b"Traceback" not in done.stderr + done.stdout


def test_a_failing_load_figure_reads_as_nan_and_the_scrape_still_works() -> None:
    from rexnet.worker.metrics import Metrics

    def broken() -> float:
        raise OSError("no /proc")

    metrics = Metrics()
    counted = metrics.for_worker("app", 2, lambda: 1, lambda: 0, broken)
    counted.job_started()
    counted.job_refused("args")
    text = metrics.exposition().decode()
    assert 'rexnet_load{app="app"} NaN' in text
    assert 'rexnet_slots_busy{app="app"} 1.0' in text
    assert 'rexnet_jobs_started_total{app="app"} 1.0' in text
    assert 'rexnet_jobs_refused_total{app="app",reason="args"} 1.0' in text
    assert "_created" not in text
