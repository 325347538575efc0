"""A worker process's announcement socket: datagrams in, by application, and replies out."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from twisted.internet.protocol import DatagramProtocol

from rexnet.protocol import wire

Handler = Callable[[bytes, str, int], None]


class AnnounceSocket(DatagramProtocol):
    """One UDP socket shared by the workers of one listening address.

    Each worker serves its application id here when it is made; a datagram goes to the
    worker of the application id in its header, and one of no served application to the
    first worker (which ignores it, or complains, as usual). Replies (STATUS answers) go
    out from this socket; before it is bound they are dropped.
    """

    def __init__(self) -> None:
        self.handlers: dict[bytes, Handler] = {}
        self.first: Handler | None = None

    def serve(self, app_id: bytes, handler: Handler) -> None:
        self.handlers[app_id] = handler
        if self.first is None:
            self.first = handler

    def datagramReceived(self, datagram: bytes, addr: tuple[str, int]) -> None:  # type: ignore[override]
        handler = self.handlers.get(wire.peek_app_id(datagram) or b"", self.first)
        if handler is not None:
            handler(datagram, addr[0], addr[1])

    def reply(self, data: bytes, target: tuple[str, int]) -> None:
        if self.transport is not None:
            with contextlib.suppress(OSError):
                self.transport.write(data, target)  # type: ignore[attr-defined]
