"""The one heartbeat of rexnet's TLS links (job channels, tunnel and registration links).

A link pings its peer when it has sent nothing for INTERVAL seconds, and gives the peer
up once nothing has come from it for DEAD_AFTER seconds. The owner says when it sent and
when it heard something; the heartbeat only keeps time (sans-IO apart from its clock).
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall

INTERVAL = 1.0  # seconds of sending nothing before a PING
DEAD_AFTER = 3.0  # seconds of hearing nothing before the peer is given up


class Heartbeat:
    """Calls PING when the link has been quiet for INTERVAL seconds, and DEAD (with the
    seconds of silence) once the peer has been silent for more than DEAD_AFTER; then it
    stops."""

    def __init__(self, clock: IReactorTime, ping: Callable[[], None],
                 dead: Callable[[float], None], interval: float = INTERVAL,
                 dead_after: float = DEAD_AFTER) -> None:
        self.clock = clock
        self.ping = ping
        self.dead = dead
        self.interval = interval
        self.dead_after = dead_after
        self.sent_at = self.heard_at = clock.seconds()
        self._loop = LoopingCall(self._beat)
        self._loop.clock = clock

    @property
    def running(self) -> bool:
        return self._loop.running

    def start(self) -> None:
        """Start counting from now (the first check is one INTERVAL from now)."""
        self.sent_at = self.heard_at = self.clock.seconds()
        if not self._loop.running:
            self._loop.start(self.interval, now=False)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    def sent(self) -> None:
        """The owner sent something to the peer (a ping is due only after a quiet spell)."""
        self.sent_at = self.clock.seconds()

    def heard(self) -> None:
        """Something came from the peer."""
        self.heard_at = self.clock.seconds()

    def _beat(self) -> None:
        now = self.clock.seconds()
        if now - self.heard_at > self.dead_after:
            self.stop()
            self.dead(now - self.heard_at)
        elif now - self.sent_at >= self.interval:
            self.ping()
            self.sent_at = now
