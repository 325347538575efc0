"""The page's live data: Server-Sent Events (/api/events) and the polling fallback
(/api/state, also what the page loads first).

Every update DashboardState makes is sent to each event-stream client as one compact
"update" event; a client that does not read has its updates dropped and gets one
"resync" event (reload /api/state) once it reads again.  Clients are bounded
(MAX_CLIENTS; more get 503 and the page polls); a heartbeat comment keeps idle streams.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

from twisted.internet.interfaces import IPushProducer
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer

from rexnet.crat.dashboard.state import DashboardState

MAX_CLIENTS = 32
"""Event-stream clients at once; more get 503 and the page falls back to polling."""
HEARTBEAT = 15.0
"""Seconds between comments on the event stream, so idle proxies and browsers keep it."""


def to_json(value: object) -> bytes:
    """Compact JSON, ASCII only (no raw U+2028 and friends in the event stream)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode("ascii")


# -- the event stream ---------------------------------------------------------------------


@implementer(IPushProducer)
class EventClient:
    """One /api/events response.  When its connection cannot take more (the client is not
    reading), updates are dropped and a "resync" event is sent once it can again."""

    def __init__(self, request: Any) -> None:
        self.request = request
        self.paused = False
        self.missed = False
        self.gone = False

    def send(self, data: bytes) -> None:
        if self.gone:
            return
        if self.paused:
            self.missed = True
            return
        self.request.write(data)

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        if self.missed and not self.gone:
            self.missed = False
            self.request.write(b"event: resync\ndata: {}\n\n")

    def stopProducing(self) -> None:
        self.gone = True

    def close(self) -> None:
        if not self.gone:
            self.gone = True
            with contextlib.suppress(Exception):
                self.request.unregisterProducer()
                self.request.finish()


class EventHub:
    """The event-stream clients, each sent every update and a heartbeat."""

    def __init__(self, state: DashboardState, max_clients: int = MAX_CLIENTS) -> None:
        self.state = state
        self.max_clients = max_clients
        self.clients: list[EventClient] = []
        self.sent = 0
        state.listeners.append(self.publish)

    def publish(self, update: dict[str, Any]) -> None:
        if not self.clients:
            return
        data = b"event: update\ndata: " + to_json(update) + b"\n\n"
        for client in list(self.clients):
            try:
                client.send(data)
            except Exception:
                self.drop(client)
        self.sent += 1

    def heartbeat(self) -> None:
        for client in list(self.clients):
            try:
                client.send(b": heartbeat\n\n")
            except Exception:
                self.drop(client)

    def add(self, client: EventClient) -> None:
        self.clients.append(client)

    def drop(self, client: EventClient) -> None:
        client.gone = True
        if client in self.clients:
            self.clients.remove(client)

    def close(self) -> None:
        for client in list(self.clients):
            client.close()
            self.drop(client)



class StateResource(Resource):
    isLeaf = True

    def __init__(self, state: DashboardState) -> None:
        super().__init__()
        self.state = state

    def render_GET(self, request: IRequest) -> bytes:
        request.setHeader(b"content-type", b"application/json; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        return to_json(self.state.snapshot())


class EventsResource(Resource):
    isLeaf = True

    def __init__(self, hub: EventHub) -> None:
        super().__init__()
        self.hub = hub

    def render_GET(self, request: IRequest) -> bytes | int:
        req: Any = request  # an IRequest that also takes a producer (as server.Request)
        if len(self.hub.clients) >= self.hub.max_clients:
            req.setResponseCode(503)
            req.setHeader(b"content-type", b"text/plain; charset=utf-8")
            req.setHeader(b"retry-after", b"30")
            return b"too many event-stream clients; poll /api/state\n"
        req.setHeader(b"content-type", b"text/event-stream; charset=utf-8")
        req.setHeader(b"cache-control", b"no-store")
        req.setHeader(b"x-accel-buffering", b"no")
        client = EventClient(req)
        req.registerProducer(client, True)
        self.hub.add(client)
        req.notifyFinish().addBoth(lambda _: self.hub.drop(client))
        req.write(b"retry: 3000\n: connected\n\n")
        return NOT_DONE_YET

    def render_HEAD(self, request: IRequest) -> bytes:
        request.setHeader(b"content-type", b"text/event-stream; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        return b""

