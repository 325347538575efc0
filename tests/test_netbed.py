"""Tests proving the network-namespace test bed (tests/netbed.py) behaves as advertised."""

from __future__ import annotations

import os
import selectors
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest

# Without tests/__init__.py pytest puts tests/ on sys.path (so `netbed`); with it, the rootdir.
if TYPE_CHECKING:
    import netbed as nb
else:
    try:
        import netbed as nb
    except ImportError:
        from tests import netbed as nb

PORT = 47011

ECHO_SERVER = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
print("ready", flush=True)
while True:
    data, peer = s.recvfrom(2048)
    s.sendto(data, peer)
"""

ECHO_CLIENT = """
import socket, sys
host, port, tries, timeout = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(timeout)
for _ in range(tries):
    try:
        s.sendto(b"hello", (host, port))
        data, peer = s.recvfrom(2048)
    except OSError:  # timeout, or EHOSTUNREACH reported for an earlier datagram
        continue
    if data == b"hello":
        print("ok", peer[0])
        sys.exit(0)
sys.exit(1)
"""

RTT_CLIENT = """
import socket, sys, time
host, port, count, timeout = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(timeout)
for n in range(count):
    t0 = time.monotonic()
    s.sendto(str(n).encode(), (host, port))
    try:
        while s.recv(64) != str(n).encode():  # a late answer to an earlier probe
            pass
    except OSError:
        continue
    print(time.monotonic() - t0)
"""

BCAST_RECEIVER = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("", int(sys.argv[1])))
s.settimeout(float(sys.argv[2]))
print("ready", flush=True)
try:
    data, peer = s.recvfrom(2048)
    print("got", data.decode(), peer[0], flush=True)
except TimeoutError:
    print("timeout", flush=True)
"""

BCAST_SENDER = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
for _ in range(3):
    s.sendto(sys.argv[2].encode(), ("255.255.255.255", int(sys.argv[1])))
    time.sleep(0.05)
"""


@pytest.fixture
def bed() -> Iterator[nb.NetBed]:
    yield from nb.netbed_fixture()


def _py(code: str, *args: object) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code), *map(str, args)]


def _readline(proc: subprocess.Popen[Any], timeout: float = 5.0) -> str:
    """Read one line of ``proc``'s stdout, failing the test instead of hanging."""
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            pytest.fail(f"no output from pid {proc.pid} within {timeout}s")
    line: str = proc.stdout.readline()
    return line.strip()


def start_echo(host: nb.Host) -> subprocess.Popen[Any]:
    proc = host.popen(_py(ECHO_SERVER, PORT), stdout=subprocess.PIPE, text=True)
    assert _readline(proc) == "ready"
    return proc


def _udp_reachable(src: nb.Host, addr: str, tries: int = 3, timeout: float = 0.4) -> bool:
    """True if an echo server on ``addr`` answers a datagram sent from ``src``."""
    return src.run(_py(ECHO_CLIENT, addr, PORT, tries, timeout)).returncode == 0


def udp_rtts(src: nb.Host, dst: nb.Host, count: int = 10, timeout: float = 1.0) -> list[float]:
    """Round-trip times (s) of ``count`` datagrams from ``src`` to an echo server on ``dst``;
    lost probes are left out. Start the echo server first: ``start_echo(dst)``."""
    out = src.run(_py(RTT_CLIENT, dst.addr(), PORT, count, timeout),
                  timeout=count * timeout + 10).stdout
    return [float(line) for line in out.split()]


def _our_namespaces(prefix: str) -> list[str]:
    return [n for n in nb.list_netns() if n.startswith(prefix)]


def _gone(pid: int) -> bool:
    """True if ``pid`` no longer runs (absent, or a zombie waiting for an init to reap it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


def _wait_gone(pid: int, timeout: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout
    while not _gone(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_hosts_on_one_subnet_reach_each_other(bed: nb.NetBed) -> None:
    lan = bed.add_subnet("lan")
    a = bed.add_host("a", [lan])
    b = bed.add_host("b", [lan])
    assert lan.cidr.startswith("10.") and lan.cidr.endswith(".0/24")
    assert a.addr() == lan.cidr.replace(".0/24", ".1")
    assert b.addr(lan) == b.addr("lan") == lan.cidr.replace(".0/24", ".2")
    assert lan.broadcast == lan.cidr.replace(".0/24", ".255")
    assert "default dev " + a.iface() in a.run(["ip", "route"]).stdout
    if shutil.which("ping"):
        assert a.run(["ping", "-c1", "-W1", b.addr()]).returncode == 0
    start_echo(b)
    assert _udp_reachable(a, b.addr())
    # The host namespaces really are separate: b's address is not local to a.
    assert b.addr() not in a.run(["ip", "-br", "addr"]).stdout


def test_limited_broadcast_stays_on_its_subnet(bed: nb.NetBed) -> None:
    lan1, lan2 = bed.add_subnet("lan1"), bed.add_subnet("lan2")
    assert lan1.cidr != lan2.cidr
    a = bed.add_host("a", [lan1])
    b = bed.add_host("b", [lan1])
    c = bed.add_host("c", [lan2])
    receivers = {
        h.name: h.popen(_py(BCAST_RECEIVER, PORT, t), stdout=subprocess.PIPE, text=True)
        for h, t in ((b, 3.0), (c, 1.0))
    }
    for proc in receivers.values():
        assert _readline(proc) == "ready"
    assert a.run(_py(BCAST_SENDER, PORT, "hi-from-a")).returncode == 0
    assert _readline(receivers["b"]) == f"got hi-from-a {a.addr()}"
    assert _readline(receivers["c"]) == "timeout"


def test_two_homed_host_without_forwarding_does_not_route(bed: nb.NetBed) -> None:
    s1, s2 = bed.add_subnet("s1"), bed.add_subnet("s2")
    a = bed.add_host("a", [s1])
    b = bed.add_host("b", [s2])
    r = bed.add_host("r", [s1, s2])
    assert r.ifaces == [r.iface(s1), r.iface(s2)]
    # Give a and b explicit routes through r, so only r's forwarding setting decides.
    a.run(["ip", "route", "add", s2.cidr, "via", r.addr(s1)], check=True)
    b.run(["ip", "route", "add", s1.cidr, "via", r.addr(s2)], check=True)
    assert r.run(["cat", "/proc/sys/net/ipv4/ip_forward"]).stdout.strip() == "0"
    start_echo(b)
    assert _udp_reachable(r, b.addr())  # r sits on both subnets
    assert not _udp_reachable(a, b.addr(), tries=2, timeout=0.4)
    # Control: the same topology does route once forwarding is on.
    r.set_forwarding(True)
    assert _udp_reachable(a, b.addr())


def test_close_removes_namespaces_and_processes() -> None:
    nb.require_netns()
    with nb.NetBed(term_timeout=0.5) as bed:
        lan = bed.add_subnet("lan")
        h = bed.add_host("h", [lan])
        prefix = bed.prefix
        assert sorted(_our_namespaces(prefix)) == sorted(bed.namespaces)
        assert len(bed.namespaces) == 2  # switch + h
        root_links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
        assert lan.bridge not in root_links and lan.iface_name not in root_links
        sleeper = h.popen(["sleep", "60"])
        stubborn = h.popen(
            _py("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
                "print('ready', flush=True); time.sleep(60)"),
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert _readline(stubborn) == "ready"
        shell = h.popen(["sh", "-c", "sleep 60 & echo $!; wait"], stdout=subprocess.PIPE, text=True)
        grandchild = int(_readline(shell))
        started = time.monotonic()
    assert time.monotonic() - started < 2.0
    assert _our_namespaces(prefix) == []
    for proc in (sleeper, stubborn, shell):
        assert proc.returncode is not None
        with pytest.raises(ProcessLookupError):
            os.kill(proc.pid, 0)
    assert stubborn.returncode == -signal.SIGKILL
    assert sleeper.returncode == -signal.SIGTERM
    assert _wait_gone(grandchild), "process left behind in the host's process group"
    bed.close()  # idempotent
    with pytest.raises(nb.NetBedError):
        h.popen(["true"])


def test_failing_body_still_cleans_up() -> None:
    nb.require_netns()
    with pytest.raises(RuntimeError, match="boom"), nb.NetBed() as bed:
        h = bed.add_host("h", [bed.add_subnet("lan")])
        proc = h.popen(["sleep", "60"])
        raise RuntimeError("boom")
    assert _our_namespaces(bed.prefix) == []
    with pytest.raises(ProcessLookupError):
        os.kill(proc.pid, 0)


def test_two_beds_do_not_collide() -> None:
    nb.require_netns()
    with nb.NetBed() as one, nb.NetBed() as two:
        assert one.prefix != two.prefix
        assert one.prefix.startswith(f"rxt{os.getpid()}-")
        h1 = one.add_host("h", [one.add_subnet("lan")])
        h2 = two.add_host("h", [two.add_subnet("lan")])
        assert h1.netns != h2.netns
        assert one.subnets["lan"].cidr != two.subnets["lan"].cidr
        assert len(h1.iface()) <= 15 and len(one.subnets["lan"].bridge) <= 15
    assert _our_namespaces(one.prefix) == _our_namespaces(two.prefix) == []


CHILD = """
import os, signal, sys
sys.path.insert(0, sys.argv[1])
import netbed
bed = netbed.NetBed()
proc = bed.add_host("h", [bed.add_subnet("lan")]).popen(["sleep", "30"], stdout=-3, stderr=-3)
print(bed.prefix, proc.pid, flush=True)
if sys.argv[2] == "stop":
    os.kill(os.getpid(), signal.SIGSTOP)
"""


def test_atexit_handler_cleans_up_unclosed_bed() -> None:
    nb.require_netns()
    here = os.path.dirname(os.path.abspath(nb.__file__))
    res = subprocess.run(_py(CHILD, here, "exit"), capture_output=True, text=True, timeout=10)
    assert res.returncode == 0, res.stderr
    prefix, pid = res.stdout.split()
    assert _our_namespaces(prefix) == []
    assert _wait_gone(int(pid))


def test_sweep_stale_removes_only_dead_owners(bed: nb.NetBed) -> None:
    bed.add_host("live", [bed.add_subnet("lan")])
    here = os.path.dirname(os.path.abspath(nb.__file__))
    # The child stops itself so its namespaces cannot be swept (even by a concurrent test run)
    # before we have checked they exist; then we SIGKILL it, i.e. simulate a crashed run.
    child = subprocess.Popen(_py(CHILD, here, "stop"), stdout=subprocess.PIPE, text=True)
    try:
        stale_prefix, orphan = _readline(child).split()
        assert len(_our_namespaces(stale_prefix)) == 2  # switch + h
        assert stale_prefix not in "".join(nb.sweep_stale())  # owner still alive
        assert len(_our_namespaces(stale_prefix)) == 2
    finally:
        child.kill()
        child.wait()
        assert child.stdout is not None
        child.stdout.close()
    try:
        nb.sweep_stale()
    finally:
        os.kill(int(orphan), signal.SIGKILL)  # the crashed run's `sleep`, orphaned
    assert _our_namespaces(stale_prefix) == []
    assert set(bed.namespaces) <= set(nb.list_netns())  # our own (live pid) survive


def test_netem_loss_blocks_traffic(bed: nb.NetBed) -> None:
    ok, reason = nb.netem_available()
    if not ok:
        pytest.skip(reason)
    lan = bed.add_subnet("lan")
    a, b = bed.add_host("a", [lan]), bed.add_host("b", [lan])
    start_echo(b)
    a.netem(loss_percent=100)
    assert "netem" in a.run(["tc", "qdisc", "show", "dev", a.iface()]).stdout
    assert not _udp_reachable(a, b.addr(), tries=2, timeout=0.3)
    a.netem(loss_percent=0, delay_ms=1)
    assert _udp_reachable(a, b.addr())


def test_impair_delays_egress_on_each_host_and_cleans_up(bed: nb.NetBed) -> None:
    lan = bed.add_subnet("lan")
    a, b = bed.add_host("a", [lan]), bed.add_host("b", [lan])
    start_echo(b)
    assert max(udp_rtts(a, b, count=3)) < 0.05  # the plain veth: well under a millisecond
    macs = [h.run(["ip", "-o", "link", "show", h.iface()]).stdout.split("link/ether")[1][:18]
            for h in (a, b)]
    a.impair(delay_ms=50)
    b.impair(delay_ms=30)
    assert [h.run(["ip", "-o", "link", "show", h.iface()]).stdout.split("link/ether")[1][:18]
            for h in (a, b)] == macs  # same MACs: peers' ARP caches stay right
    assert "default dev" in a.run(["ip", "route"]).stdout
    rtts = udp_rtts(a, b, count=10)
    print(f"RTT with 50 + 30 ms egress delay: min {min(rtts) * 1000:.1f} ms, "
          f"max {max(rtts) * 1000:.1f} ms")
    assert len(rtts) == 10  # no loss asked, none happened
    assert min(rtts) >= 0.080 and max(rtts) < 0.5
    counters = a.impair_counters()
    assert counters["frames"] >= 10 and counters["lost"] == counters["overflow"] == 0
    assert counters["delivered"] + counters["waiting"] == counters["frames"]
    pids = a.shuttle_pids + b.shuttle_pids
    assert len(pids) == 2
    ours = [f"t{h.index:04x}" for h in (a, b)]
    bed.close()
    assert all(_wait_gone(pid) for pid in pids)
    root_links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert not any(name in root_links for name in [*ours, lan.iface_name])


def test_impair_loses_frames_at_its_rate(bed: nb.NetBed) -> None:
    lan = bed.add_subnet("lan")
    a, b, c = (bed.add_host(name, [lan]) for name in ("a", "b", "c"))
    start_echo(b)
    a.impair(loss_percent=100)
    assert not _udp_reachable(a, b.addr(), tries=2, timeout=0.3)
    assert a.impair_counters()["lost"] == a.impair_counters()["frames"] > 0
    # c resolves b's address before the loss starts: one run saw 0 of 40 answered with only
    # 15 frames through c's shuttle (the datagrams waited on ARP that went through the loss)
    assert _udp_reachable(c, b.addr())
    c.impair(loss_percent=50)
    rtts = udp_rtts(c, b, count=40, timeout=0.2)  # c's requests lost half the time
    lost = c.impair_counters()
    print(f"50% loss: {len(rtts)}/40 answered; shuttle: {lost}")
    assert 0 < len(rtts) < 40
    assert 0 < lost["lost"] < lost["frames"]
    with pytest.raises(nb.NetBedError, match="already impaired"):
        c.impair(loss_percent=1)
    with pytest.raises(ValueError, match="loss_percent"):
        b.impair(loss_percent=110)
    assert _udp_reachable(c, b.addr(), tries=10, timeout=0.3)  # b's veth is untouched


CRASHED_IMPAIR = """
import os, signal, sys
sys.path.insert(0, sys.argv[1])
import netbed
bed = netbed.NetBed()
host = bed.add_host("h", [bed.add_subnet("lan")])
host.impair(loss_percent=10, delay_ms=50)
print(bed.prefix, *host.shuttle_pids, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_shuttle_ends_when_its_test_run_crashes() -> None:
    nb.require_netns()
    here = os.path.dirname(os.path.abspath(nb.__file__))
    res = subprocess.run(_py(CRASHED_IMPAIR, here), capture_output=True, text=True, timeout=20)
    assert res.returncode == -signal.SIGKILL, res.stderr
    prefix, pid = res.stdout.split()
    assert _wait_gone(int(pid))  # its stdin pipe closed with the crashed run
    nb.sweep_stale()
    assert _our_namespaces(prefix) == []


def test_require_netns_skips_locally_and_fails_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nb, "netns_available", lambda: (False, "no namespaces here"))
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no namespaces here"):
        nb.require_netns()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="no namespaces here"):
        nb.require_netns()
