"""Complaints about peers, logged and sent as alerts, at a bounded rate."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from twisted.logger import Logger

from rexnet.net.announce import RateLimiter

COMPLAINT_INTERVAL = 1.0
COMPLAINT_RATE = 20.0  # complaint lines (and alerts) a second, all sources together

log = Logger()


class Complaints:
    """Logs complaints about peers (and sends them as alerts): at most one line per source
    per interval, and at most COMPLAINT_RATE lines a second from all sources together, so
    that a flood from many sources cannot flood the log or the network with alerts. WHO
    (a relay: "cproxy", "tunnel") names the process that refused a datagram."""

    def __init__(self, clock: Callable[[], float],
                 alert: Callable[..., None] = lambda event, **fields: None,
                 who: str = "") -> None:
        self.clock = clock
        self.alert = alert
        self.who = who
        self._last: OrderedDict[str, tuple[float, int]] = OrderedDict()
        self._all = RateLimiter(COMPLAINT_RATE, COMPLAINT_RATE * 2, 1)
        self.count = 0
        self.logged = 0

    def __call__(self, source: str, what: str) -> None:
        self.count += 1
        now = self.clock()
        last, suppressed = self._last.pop(source, (-1e18, 0))
        if now - last < COMPLAINT_INTERVAL or not self._all.allow("", now):
            self._last[source] = (last, suppressed + 1)
        else:
            if self.who:
                log.warn("complaint: {who} refused a datagram from {source}: {what} ({n} more "
                         "suppressed)", who=self.who, source=source, what=what, n=suppressed)
            else:
                log.warn("complaint: {what} (from {source}; {suppressed} more suppressed)",
                         what=what, source=source, suppressed=suppressed)
            self.alert("complaint", what=what, source=source, suppressed=suppressed)
            self.logged += 1
            self._last[source] = (now, 0)
        while len(self._last) > 4096:
            self._last.popitem(last=False)
