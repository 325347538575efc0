"""The dashboard's web side: the resource tree with its security headers, the static
files (read from the installed package with importlib.resources), and the service.

Every response carries SECURITY_HEADERS (a strict Content-Security-Policy: the page has
no inline script or style); requests naming a host other than an address or a name of
this machine are refused (no DNS rebinding).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from importlib import resources
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.internet.interfaces import IListeningPort
from twisted.web import pages
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource
from twisted.web.server import Site

from rexnet.crat.core import Crat, CratError, host_port
from rexnet.crat.dashboard.events import HEARTBEAT, EventHub, EventsResource, StateResource
from rexnet.crat.dashboard.state import DashboardState

CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; "
       "frame-ancestors 'none'")
SECURITY_HEADERS = {
    b"content-security-policy": CSP.encode(),
    b"x-content-type-options": b"nosniff",
    b"x-frame-options": b"DENY",
    b"referrer-policy": b"no-referrer",
    b"cross-origin-resource-policy": b"same-origin",
    b"cross-origin-opener-policy": b"same-origin",
}
STATIC = {  # URL path under / : (file in static/, content type)
    b"": ("index.html", "text/html; charset=utf-8"),
    b"app.js": ("dashboard.js", "text/javascript; charset=utf-8"),
    b"app.css": ("dashboard.css", "text/css; charset=utf-8"),
    b"favicon.svg": ("icon.svg", "image/svg+xml"),
}
_TEXTS = {"PAGE": "index.html", "SCRIPT": "dashboard.js", "STYLE": "dashboard.css",
          "ICON": "icon.svg"}


def static_text(name: str) -> str:
    """The text of static/NAME in the installed package; CratError if it cannot be read
    (a broken install: the message says so, in one line)."""
    try:
        folder = resources.files("rexnet.crat.dashboard").joinpath("static")
        return folder.joinpath(name).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CratError(f"cannot read the dashboard's {name} from the rexnet package "
                        f"({e}): reinstall rexnet") from None


def __getattr__(name: str) -> str:
    """PAGE, SCRIPT, STYLE and ICON: the text of the page, its script, style and icon."""
    if name in _TEXTS:
        return static_text(_TEXTS[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class StaticText(Resource):
    """A fixed document with its content type; not cached (it changes with rexnet)."""

    isLeaf = True

    def __init__(self, body: str, content_type: str) -> None:
        super().__init__()
        self.body = body.encode("utf-8")
        self.content_type = content_type.encode("ascii")

    def render_GET(self, request: IRequest) -> bytes:
        request.setHeader(b"content-type", self.content_type)
        request.setHeader(b"cache-control", b"no-cache")
        return self.body


class Folder(Resource):
    """A resource of named children; anything else is not found (escaped, unlike
    Resource's default page)."""

    def getChild(self, path: bytes, request: IRequest) -> IResource:
        return pages.notFound()


class Root(Folder):
    """The dashboard's tree; every response gets the security headers, and requests
    naming a host other than an address or a name of this machine are refused (a web page
    elsewhere cannot read the dashboard through DNS rebinding)."""

    def __init__(self, state: DashboardState, hub: EventHub,
                 hosts: Iterable[str] = ()) -> None:
        super().__init__()
        machine = socket.gethostname()
        names = ("localhost", machine, machine.split(".")[0], *hosts)
        self.hosts = {h.lower().rstrip(".") for h in names if h}
        for path, (name, content_type) in STATIC.items():  # read now: CratError if not
            self.putChild(path, StaticText(static_text(name), content_type))
        api = Folder()
        api.putChild(b"state", StateResource(state))
        api.putChild(b"events", EventsResource(hub))
        self.putChild(b"api", api)

    def host_allowed(self, header: bytes | None) -> bool:
        if not header:
            return True  # HTTP/1.0 without Host: not a browser
        host = header.decode("latin-1").strip().lower()
        if host.startswith("["):
            host = host[1:host.find("]")] if "]" in host else host
        elif host.count(":") == 1:
            host = host.split(":", 1)[0]
        host = host.rstrip(".")
        try:
            ipaddress.ip_address(host)
            return True
        except ValueError:
            return host in self.hosts

    def getChildWithDefault(self, path: bytes, request: IRequest) -> IResource:
        for name, value in SECURITY_HEADERS.items():
            request.setHeader(name, value)
        if not self.host_allowed(request.getHeader(b"host")):
            return pages.errorPage(421, "Misdirected Request",
                                   "This dashboard answers to its addresses only.")
        return super().getChildWithDefault(path, request)


# -- the service --------------------------------------------------------------------------


def bind_tcp(host: str, port: int) -> socket.socket:
    """A listening TCP socket on HOST:PORT; CratError saying why not."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise CratError(f"cannot serve the dashboard on {host}: {e.strerror}") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(64)
    except OSError as e:
        sock.close()
        raise CratError(f"cannot serve the dashboard on {host_port(host, port)}: "
                        f"{e.strerror}") from None
    sock.setblocking(False)
    return sock


class Dashboard:
    """The dashboard of one Crat: its state (a sink of the Crat), event hub and site."""

    def __init__(self, crat: Crat, hosts: Iterable[str] = ()) -> None:
        self.crat = crat
        self.state = DashboardState(crat)
        self.state.feed(crat.recent)
        self.state.feed(crat.recent_unverified)
        self.hub = EventHub(self.state)
        crat.sinks.append(self.state)
        self.root = Root(self.state, self.hub, hosts)
        self.site = Site(self.root)
        self.site.displayTracebacks = False
        self.site.noisy = False


class DashboardService(Service):
    """Serves a Dashboard on a bound TCP socket; sends the event-stream heartbeats."""

    def __init__(self, dashboard: Dashboard, sock: socket.socket, reactor: Any) -> None:
        self.dashboard = dashboard
        self.sock = sock
        self.reactor = reactor
        self.port: IListeningPort | None = None
        self.heartbeat = task.LoopingCall(dashboard.hub.heartbeat)
        self.heartbeat.clock = reactor

    @property
    def url(self) -> str:
        host, port = self.sock.getsockname()[:2]
        return f"http://{host_port(host, port)}/"

    def startService(self) -> None:
        super().startService()
        url = self.url
        self.port = self.reactor.adoptStreamPort(self.sock.fileno(), self.sock.family,
                                                 self.dashboard.site)
        self.sock.close()  # the reactor holds its own copy
        self.heartbeat.start(HEARTBEAT, now=False)
        self.dashboard.crat.log.info("crat dashboard on {url}", url=url)

    def stopService(self) -> defer.Deferred[Any]:
        super().stopService()
        if self.heartbeat.running:
            self.heartbeat.stop()
        self.dashboard.hub.close()
        stopped = self.port.stopListening() if self.port is not None else None
        return stopped if stopped is not None else defer.succeed(None)


def make_dashboard(crat: Crat, host: str, port: int, reactor: Any) -> DashboardService:
    """The dashboard service of CRAT on HOST:PORT, its socket bound now (so that a busy
    port is a one-line error before twistd starts); CratError if it cannot be."""
    dashboard = Dashboard(crat, [host])
    return DashboardService(dashboard, bind_tcp(host, port), reactor)

