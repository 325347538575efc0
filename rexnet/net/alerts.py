"""Alerts: signed ALERT datagrams that workers and clients send to crat.

Sending never slows or fails a job: datagrams go out fire-and-forget, errors are
counted, never raised.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from twisted.logger import Logger

from rexnet.net.announce import DatagramSender, now_ms
from rexnet.protocol import wire
from rexnet.security.credentials import Credential

CRAT_PORT = 3011
MAX_FIELD = 256

log = Logger()


def crat_targets(targets: Sequence[tuple[str, int]]) -> list[tuple[str, int]]:
    """The same hosts as TARGETS, on the crat port (the default alert targets)."""
    return sorted({(host, CRAT_PORT) for host, _ in targets})


def _field(value: object) -> str | int | float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        value = str(value)
    if isinstance(value, str):
        return value[:MAX_FIELD]
    return value


class AlertSender:
    """Signs and sends alerts of one credential to a fixed list of targets."""

    def __init__(
        self,
        reactor: Any,
        credential: Credential,
        targets: Sequence[tuple[str, int]],
        now: Callable[[], int] = now_ms,
    ) -> None:
        self.reactor = reactor
        self.credential = credential
        self.targets = list(targets)
        self.now = now
        self.sent = 0
        self.failed = 0
        self._sender: DatagramSender | None = None

    def _port(self) -> DatagramSender:
        if self._sender is None:
            self._sender = DatagramSender(self._failed)
            port = self.reactor.listenUDP(0, self._sender)
            port.setBroadcastAllowed(True)
        return self._sender

    def _failed(self, target: tuple[str, int], error: OSError) -> None:
        self.failed += 1

    def send(self, event: str, **fields: object) -> None:
        """Send EVENT with FIELDS to every target (nothing if there are none)."""
        if not self.targets:
            return
        items = tuple(sorted((k, _field(v)) for k, v in fields.items() if v is not None))
        alert = wire.Alert(self.now(), event, items[:24])
        try:
            data = wire.encode_datagram(alert, self.credential.app_id, self.credential.key,
                                        self.credential.cert_der)
        except wire.WireError as e:
            log.debug("alert not sent: {e}", e=e)
            return
        sender = self._port()
        for target in self.targets:
            sender.send(data, target)
        self.sent += 1

    def stop(self) -> None:
        if self._sender is not None and self._sender.transport is not None:
            self._sender.transport.stopListening()
            self._sender = None
