"""Network test bed: simulated hosts as Linux network namespaces.

Every subnet is a Linux bridge inside a dedicated "switch" namespace owned by the bed;
every host is a namespace with ``lo`` up and one veth per subnet whose peer is enslaved to
that subnet's bridge. Nothing is created in the root namespace. Requires root and iproute2.

:meth:`Host.impair` puts loss and delay on a host's link without the netem qdisc (which the CI
kernel lacks): the veth is replaced by two TAPs joined by a userspace shuttle (tests/impair.py).

Typical use::

    @pytest.fixture
    def bed() -> Iterator[NetBed]:
        yield from netbed_fixture()

    def test_x(bed: NetBed) -> None:
        lan = bed.add_subnet("lan")
        a, b = bed.add_host("a", [lan]), bed.add_host("b", [lan])
        proc = b.popen([sys.executable, "-c", "..."])
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import itertools
import json
import os
import re
import selectors
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = [
    "Host",
    "NetBed",
    "NetBedError",
    "Subnet",
    "list_netns",
    "netbed_fixture",
    "netem_available",
    "netns_available",
    "require_netns",
    "sweep_stale",
]

NS_PREFIX = "rxt"
"""Every namespace created by this module is named ``rxt<pid>-...``."""

DEFAULT_RUN_TIMEOUT = 10.0
IMPAIR_SCRIPT = Path(__file__).with_name("impair.py")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")
_STALE_RE = re.compile(rf"^{NS_PREFIX}(\d+)-")

_bed_counter = itertools.count()
_subnet_counter = itertools.count()


class NetBedError(RuntimeError):
    """A namespace/link/address operation failed."""


def _run_checked(argv: Sequence[str], what: str) -> str:
    """Run an administrative command; raise :class:`NetBedError` with its stderr on failure."""
    try:
        res = subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            timeout=DEFAULT_RUN_TIMEOUT,
            check=False,
            env={**os.environ, "LC_ALL": "C"},  # stable error messages
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NetBedError(f"{what}: {' '.join(argv)}: {exc}") from exc
    if res.returncode != 0:
        detail = (res.stderr or res.stdout).strip()
        raise NetBedError(f"{what}: {' '.join(argv)} exited {res.returncode}: {detail}")
    return res.stdout


def _ns_argv(netns: str, argv: Sequence[str]) -> list[str]:
    return ["ip", "netns", "exec", netns, *argv]


def _netns_add(name: str) -> None:
    _run_checked(["ip", "netns", "add", name], "creating namespace")


def _netns_del(name: str) -> None:
    _run_checked(["ip", "netns", "del", name], "deleting namespace")


def list_netns() -> list[str]:
    """Names of all named network namespaces (``ip netns list``)."""
    out = _run_checked(["ip", "netns", "list"], "listing namespaces")
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale() -> list[str]:
    """Delete ``rxt<pid>-*`` namespaces whose creating process is gone; return their names.

    Only namespaces following this fixture's naming scheme are considered.
    """
    removed: list[str] = []
    for name in list_netns():
        m = _STALE_RE.match(name)
        if m is None or _pid_alive(int(m.group(1))):
            continue
        try:
            _netns_del(name)
        except NetBedError as exc:
            warnings.warn(f"netbed: could not sweep {name}: {exc}", RuntimeWarning, stacklevel=2)
        else:
            removed.append(name)
    return removed


@functools.cache
def netns_available() -> tuple[bool, str]:
    """Return ``(True, "")`` if namespaces, veths and bridges can be created, else a reason."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return False, "network namespace tests need root (not running as uid 0)"
    probe = f"{NS_PREFIX}{os.getpid()}-probe"
    try:
        _netns_add(probe)
    except NetBedError as exc:
        return False, f"`ip netns add` does not work here: {exc}"
    result = True, ""
    try:
        _run_checked(["ip", "-n", probe, "link", "add", "b0", "type", "bridge"], "bridge")
        _run_checked(
            ["ip", "-n", probe, "link", "add", "v0", "type", "veth", "peer", "name", "v1"], "veth"
        )
    except NetBedError as exc:
        result = False, f"cannot create bridge/veth links in a namespace: {exc}"
    try:
        _netns_del(probe)
    except NetBedError as exc:
        result = False, f"`ip netns del` does not work here: {exc}"
    return result


@functools.cache
def netem_available() -> tuple[bool, str]:
    """Return ``(True, "")`` if the kernel supports the ``netem`` qdisc, else a reason."""
    ok, reason = netns_available()
    if not ok:
        return ok, reason
    probe = f"{NS_PREFIX}{os.getpid()}-probenetem"
    try:
        _netns_add(probe)
    except NetBedError as exc:
        return False, f"`ip netns add` does not work here: {exc}"
    try:
        _run_checked(
            _ns_argv(probe, ["tc", "qdisc", "replace", "dev", "lo", "root", "netem"]), "netem"
        )
    except NetBedError as exc:
        return False, f"netem qdisc unavailable: {exc}"
    finally:
        _netns_del(probe)
    return True, ""


def require_netns() -> None:
    """Skip the current test if namespaces are unusable; fail instead when ``CI=true``."""
    import pytest

    ok, reason = netns_available()
    if ok:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"netns test bed required in CI: {reason}", pytrace=False)
    pytest.skip(reason)


def netbed_fixture() -> Iterator[NetBed]:
    """Generator body for a pytest fixture: ``yield from netbed_fixture()``."""
    require_netns()
    sweep_stale()
    with NetBed() as bed:
        yield bed


class Subnet:
    """A /24 IPv4 subnet, realised as a bridge in the bed's switch namespace."""

    def __init__(self, bed: NetBed, name: str, index: int, a: int, b: int) -> None:
        self.bed = bed
        self.name = name
        self.index = index
        self.prefix = f"10.{a}.{b}"
        self.network = f"{self.prefix}.0"
        self.prefixlen = 24
        self.cidr = f"{self.network}/{self.prefixlen}"
        self.broadcast = f"{self.prefix}.255"
        self.bridge = f"br{a:02x}{b:02x}"
        self.iface_name = f"rx{a:02x}{b:02x}"
        """Name of the interface every host on this subnet uses for it."""
        self.hosts: list[Host] = []
        self._next_host = 1

    def _allocate(self) -> str:
        if self._next_host > 254:
            raise NetBedError(f"subnet {self.name} is full")
        addr = f"{self.prefix}.{self._next_host}"
        self._next_host += 1
        return addr

    def __repr__(self) -> str:
        return f"<Subnet {self.name} {self.cidr} bridge={self.bridge}>"


class Host:
    """A simulated host: one network namespace with one interface per attached subnet."""

    def __init__(self, bed: NetBed, name: str, index: int, netns: str) -> None:
        self.bed = bed
        self.name = name
        self.index = index
        self.netns = netns
        self.subnets: list[Subnet] = []
        self._addrs: dict[str, str] = {}
        self._shuttles: dict[str, subprocess.Popen[str]] = {}

    def _subnet(self, subnet: Subnet | str | None) -> Subnet:
        if not self.subnets:
            raise NetBedError(f"host {self.name} has no interfaces")
        if subnet is None:
            return self.subnets[0]
        name = subnet if isinstance(subnet, str) else subnet.name
        for s in self.subnets:
            if s.name == name:
                return s
        raise NetBedError(f"host {self.name} is not on subnet {name}")

    def addr(self, subnet: Subnet | str | None = None) -> str:
        """IPv4 address of this host on ``subnet`` (default: its first subnet)."""
        return self._addrs[self._subnet(subnet).name]

    def iface(self, subnet: Subnet | str | None = None) -> str:
        """Interface name (inside this namespace) for ``subnet`` (default: first subnet)."""
        return self._subnet(subnet).iface_name

    @property
    def ifaces(self) -> list[str]:
        """All interface names of this host except ``lo``, in attachment order."""
        return [s.iface_name for s in self.subnets]

    def argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` prefixed to run inside this namespace (processes started so are untracked)."""
        return _ns_argv(self.netns, argv)

    def popen(self, argv: Sequence[str], **popen_kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` inside the namespace; the bed terminates it on close.

        ``ip netns exec`` execs, so ``proc.pid`` is the command's pid. Unless overridden the
        process gets its own session so its whole process group can be signalled on close.
        Pipes are closed on bed close: read output before that.
        """
        return self.bed._popen(self.argv(argv), popen_kwargs)

    def run(
        self, argv: Sequence[str], timeout: float | None = DEFAULT_RUN_TIMEOUT, **kw: Any
    ) -> subprocess.CompletedProcess[Any]:
        """Run ``argv`` inside the namespace to completion (captures text output by default)."""
        if "stdout" not in kw and "stderr" not in kw:
            kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        kw.setdefault("check", False)
        return subprocess.run(self.argv(argv), timeout=timeout, **kw)

    def set_forwarding(self, enabled: bool) -> None:
        """Turn IPv4 forwarding on or off in this namespace (off by default)."""
        value = "1" if enabled else "0"
        _run_checked(
            self.argv(["sh", "-c", f"echo {value} > /proc/sys/net/ipv4/ip_forward"]),
            f"setting ip_forward on {self.name}",
        )

    def netem(
        self, loss_percent: float = 0, delay_ms: float = 0, subnet: Subnet | str | None = None
    ) -> None:
        """Apply a netem qdisc (egress loss/delay) to all interfaces, or only ``subnet``'s."""
        ifaces = self.ifaces if subnet is None else [self.iface(subnet)]
        for iface in ifaces:
            _run_checked(
                self.argv(
                    [
                        "tc", "qdisc", "replace", "dev", iface, "root", "netem",
                        "loss", f"{loss_percent}%", "delay", f"{delay_ms}ms",
                    ]
                ),
                f"netem on {self.name}/{iface}",
            )  # fmt: skip

    def impair(
        self, loss_percent: float = 0, delay_ms: float = 0, subnet: Subnet | str | None = None
    ) -> None:
        """Egress loss/delay on all interfaces (or only ``subnet``'s), like :meth:`netem`,
        but in userspace: works on kernels without queueing disciplines.

        Each interface's veth is replaced by a TAP with the same name, MAC and address (and
        the default route, if it went through it), whose frames a shuttle process
        (tests/impair.py, tracked by the bed) forwards to a TAP port of the subnet's bridge:
        dropped with probability ``loss_percent``/100, otherwise ``delay_ms`` later, in
        order. Frames to the host pass unimpaired, as with netem (egress only). A shuttle
        exits when the bed closes or this process dies (its stdin pipe closes). Call it
        before adding routes of your own through the interface: they go with the veth.
        """
        if not 0 <= loss_percent <= 100 or delay_ms < 0:
            raise ValueError(f"want 0 <= loss_percent <= 100 and delay_ms >= 0, not "
                             f"{loss_percent}, {delay_ms}")
        for s in self.subnets if subnet is None else [self._subnet(subnet)]:
            if s.name in self._shuttles:
                raise NetBedError(f"host {self.name} is already impaired on {s.name}")
            self.bed._impair(self, s, loss_percent, delay_ms)

    @property
    def shuttle_pids(self) -> list[int]:
        """Pids of this host's shuttle processes (one per impaired interface)."""
        return [proc.pid for proc in self._shuttles.values()]

    def impair_counters(self) -> dict[str, int]:
        """Frames the shuttles of this host saw so far, summed over its impaired links:
        ``frames``, ``lost``, ``overflow``, ``delivered``, ``waiting``, ``unsent`` (egress)."""
        total: dict[str, int] = {}
        for name, proc in self._shuttles.items():
            assert proc.stdout is not None
            os.kill(proc.pid, signal.SIGUSR1)
            with selectors.DefaultSelector() as sel:
                sel.register(proc.stdout, selectors.EVENT_READ)
                if not sel.select(DEFAULT_RUN_TIMEOUT):
                    raise NetBedError(f"shuttle of {self.name} on {name} does not answer")
            line = proc.stdout.readline()
            if not line:
                raise NetBedError(f"shuttle of {self.name} on {name} exited {proc.poll()}")
            for key, value in json.loads(line)["egress"].items():
                total[key] = total.get(key, 0) + value
        return total

    def __repr__(self) -> str:
        addrs = ", ".join(f"{k}={v}" for k, v in self._addrs.items())
        return f"<Host {self.name} netns={self.netns} {addrs}>"


class NetBed:
    """A set of namespaces (hosts + one switch) that is torn down on :meth:`close`.

    Use as a context manager; an atexit hook is registered as a safety net.
    ``term_timeout`` is how long tracked processes get between SIGTERM and SIGKILL.
    """

    def __init__(self, term_timeout: float = 3.0) -> None:
        self.pid = os.getpid()
        self.term_timeout = term_timeout
        self.subnets: dict[str, Subnet] = {}
        self.hosts: dict[str, Host] = {}
        self.namespaces: list[str] = []
        self._procs: list[tuple[subprocess.Popen[Any], bool]] = []
        self._closed = False
        atexit.register(self.close)
        # Claim a prefix by creating its switch namespace: `ip netns add` uses O_EXCL, so this
        # stays unique even if this module is imported twice (e.g. as netbed and tests.netbed).
        for _ in range(1000):
            self.index = next(_bed_counter)
            self.prefix = f"{NS_PREFIX}{self.pid}-{self.index}-"
            self.switch_netns = f"{self.prefix}_switch"
            try:
                _netns_add(self.switch_netns)
            except NetBedError as exc:
                if "File exists" in str(exc):
                    continue
                raise
            break
        else:
            raise NetBedError("could not find a free namespace prefix")
        self.namespaces.append(self.switch_netns)
        _run_checked(["ip", "-n", self.switch_netns, "link", "set", "lo", "up"], "lo up")

    # -- construction -------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise NetBedError("NetBed is closed")

    def _add_netns(self, name: str) -> None:
        _netns_add(name)
        self.namespaces.append(name)
        _run_checked(["ip", "-n", name, "link", "set", "lo", "up"], f"lo up in {name}")

    def add_subnet(self, name: str) -> Subnet:
        """Create a subnet 10.<a>.<b>.0/24 (unique within this process) as a bridge."""
        self._check_open()
        if not _NAME_RE.fullmatch(name):
            raise ValueError(f"bad subnet name {name!r}")
        if name in self.subnets:
            raise ValueError(f"duplicate subnet {name!r}")
        key = ((self.pid * 40503) + next(_subnet_counter)) & 0xFFFF
        subnet = Subnet(self, name, len(self.subnets), key >> 8, key & 0xFF)
        sw = self.switch_netns
        _run_checked(["ip", "-n", sw, "link", "add", subnet.bridge, "type", "bridge"], "bridge")
        _run_checked(["ip", "-n", sw, "link", "set", subnet.bridge, "up"], "bridge up")
        self.subnets[name] = subnet
        return subnet

    def add_host(self, name: str, subnets: Sequence[Subnet | str] = ()) -> Host:
        """Create a host namespace attached to ``subnets`` (default route via the first)."""
        self._check_open()
        if not _NAME_RE.fullmatch(name):
            raise ValueError(f"bad host name {name!r} (want [A-Za-z0-9][A-Za-z0-9_.-]{{0,31}})")
        if name in self.hosts:
            raise ValueError(f"duplicate host {name!r}")
        resolved = [self.subnets[s] if isinstance(s, str) else s for s in subnets]
        if len({s.name for s in resolved}) != len(resolved):
            raise ValueError("a host can be attached to a subnet only once")
        for s in resolved:
            if s.bed is not self:
                raise ValueError(f"subnet {s.name} belongs to another bed")
        host = Host(self, name, len(self.hosts), f"{self.prefix}{name}")
        self._add_netns(host.netns)
        self.hosts[name] = host
        host.set_forwarding(False)  # IPv4 devconf is inherited from the root namespace
        for s in resolved:
            self._attach(host, s)
        if resolved:
            _run_checked(
                ["ip", "-n", host.netns, "route", "add", "default", "dev", resolved[0].iface_name],
                "default route",
            )
        return host

    def _attach(self, host: Host, subnet: Subnet) -> None:
        sw, ns, iface = self.switch_netns, host.netns, subnet.iface_name
        peer = f"p{host.index:04x}{subnet.bridge[2:]}"
        addr = subnet._allocate()
        veth = ["link", "add", peer, "type", "veth", "peer", "name", iface, "netns", ns]
        _run_checked(["ip", "-n", sw, *veth], f"veth for {host.name} on {subnet.name}")
        _run_checked(["ip", "-n", sw, "link", "set", peer, "master", subnet.bridge, "up"], "port")
        _run_checked(
            ["ip", "-n", ns, "addr", "add", f"{addr}/{subnet.prefixlen}", "brd", "+", "dev", iface],
            "address",
        )
        _run_checked(["ip", "-n", ns, "link", "set", iface, "up"], "link up")
        host.subnets.append(subnet)
        host._addrs[subnet.name] = addr
        subnet.hosts.append(host)

    def _impair(self, host: Host, subnet: Subnet, loss_percent: float, delay_ms: float) -> None:
        sw, ns, iface = self.switch_netns, host.netns, subnet.iface_name
        port = f"t{host.index:04x}{subnet.bridge[2:]}"
        link = _run_checked(["ip", "-n", ns, "-o", "link", "show", "dev", iface], "link")
        mac = re.search(r"link/ether ([0-9a-f:]{17})", link)
        if mac is None:
            raise NetBedError(f"no MAC address on {host.name}/{iface}: {link}")
        default = _run_checked(["ip", "-n", ns, "route", "show", "default", "dev", iface], "route")
        _run_checked(["ip", "-n", ns, "link", "del", iface], "deleting the veth")  # and its peer
        _run_checked(["ip", "-n", ns, "tuntap", "add", "dev", iface, "mode", "tap"], "host TAP")
        _run_checked(["ip", "-n", sw, "tuntap", "add", "dev", port, "mode", "tap"], "bridge TAP")
        _run_checked(["ip", "-n", sw, "link", "set", port, "master", subnet.bridge, "up"], "port")
        shuttle = self._popen(
            _ns_argv(ns, [
                sys.executable, str(IMPAIR_SCRIPT), "--host-tap", iface, "--switch-netns", sw,
                "--switch-tap", port, "--loss", str(loss_percent), "--delay-ms", str(delay_ms),
            ]),
            {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "text": True},
        )  # fmt: skip
        assert shuttle.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(shuttle.stdout, selectors.EVENT_READ)
            ready = sel.select(DEFAULT_RUN_TIMEOUT) and shuttle.stdout.readline() == "ready\n"
        if not ready:
            raise NetBedError(f"shuttle for {host.name}/{iface} did not start: {shuttle.poll()}")
        host._shuttles[subnet.name] = shuttle
        addr = f"{host._addrs[subnet.name]}/{subnet.prefixlen}"
        _run_checked(["ip", "-n", ns, "link", "set", iface, "address", mac.group(1)], "MAC")
        _run_checked(["ip", "-n", ns, "addr", "add", addr, "brd", "+", "dev", iface], "address")
        _run_checked(["ip", "-n", ns, "link", "set", iface, "up"], "link up")
        if default.strip():
            _run_checked(["ip", "-n", ns, "route", "add", "default", "dev", iface], "route")

    # -- processes ----------------------------------------------------------------------

    def _popen(self, argv: list[str], kwargs: dict[str, Any]) -> subprocess.Popen[Any]:
        self._check_open()
        if "process_group" not in kwargs:
            kwargs.setdefault("start_new_session", True)
        own_group = bool(kwargs.get("start_new_session")) or kwargs.get("process_group") == 0
        proc: subprocess.Popen[Any] = subprocess.Popen(argv, **kwargs)
        self._procs.append((proc, own_group))
        return proc

    @staticmethod
    def _exited_unreaped(pid: int) -> bool:
        """True if child ``pid`` has exited (left as a zombie so its pid stays reserved)."""
        try:
            res = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return True
        return res is not None

    @staticmethod
    def _signal(pid: int, group: bool, sig: signal.Signals) -> None:
        try:
            if group:
                os.killpg(pid, sig)
            else:
                os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def _stop_processes(self) -> None:
        # Signal only children not yet reaped: their pid (and pgid) cannot have been reused.
        live = [(p, g) for p, g in self._procs if p.returncode is None]
        for proc, group in live:
            self._signal(proc.pid, group, signal.SIGTERM)
        deadline = time.monotonic() + self.term_timeout
        pending = list(live)
        while pending and time.monotonic() < deadline:
            pending = [(p, g) for p, g in pending if not self._exited_unreaped(p.pid)]
            if pending:
                time.sleep(0.02)
        for proc, group in live:
            # Leaders are still unreaped, so this also kills stragglers left in their groups.
            if group or any(proc is p for p, _ in pending):
                self._signal(proc.pid, group, signal.SIGKILL)
        for proc, _ in self._procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                warnings.warn(f"netbed: pid {proc.pid} did not die", RuntimeWarning, stacklevel=3)
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()
        self._procs.clear()

    # -- teardown -----------------------------------------------------------------------

    def close(self) -> None:
        """Stop tracked processes and delete every namespace of this bed. Idempotent."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        if os.getpid() != self.pid:  # forked child: the parent owns the namespaces
            return
        self._stop_processes()
        # Hosts first, then the switch; deleting namespaces destroys their veths/bridges.
        for name in reversed(self.namespaces):
            try:
                _netns_del(name)
            except NetBedError as exc:
                warnings.warn(f"netbed: {exc}", RuntimeWarning, stacklevel=2)
        self.namespaces.clear()

    def __enter__(self) -> NetBed:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self.hosts)} hosts"
        return f"<NetBed {self.prefix}* {state}>"
