"""Idle connections to the primaries, kept open for the next inbound session (Postfix's
connection cache, scache(8)).

Most MTAs open one connection per message. Without a cache every one of them costs the relay
a second connection to the primary: connect, greeting, EHLO (and STARTTLS), then QUIT, on the
one event loop. An inbound session that ends gives its primary connections back here instead
of saying QUIT, and the next session to the same primary takes the one used last.

As Postfix does, a connection waits here at most IDLE seconds (`smtp_connection_cache_time_limit`,
2 s) and then gets its QUIT; one opened more than REUSE_LIMIT seconds ago is not kept again
(`smtp_connection_reuse_time_limit`, 300 s); at most MAX_IDLE wait per primary. A connection
the primary closed while it waited is found out by `Upstream.begin`, which connects afresh
once: a cached connection gone stale never counts as a primary in trouble.

The key is the primary's whole settings (`config.Primary`), so a SIGHUP that changes how to
reach it (TLS, the address) never hands out a connection made the old way.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any

from relay.delivery.client import Peer, Upstream

IDLE = 2.0
REUSE_LIMIT = 300.0
MAX_IDLE = 32

Spawn = Callable[[Coroutine[Any, Any, None]], None]


class UpstreamPool:
    """Connected `Upstream`s waiting for a session, per primary, the newest last."""

    def __init__(self, spawn: Spawn, idle: float | None = None) -> None:
        self.spawn = spawn              # runs a QUIT without anyone waiting for it
        self.idle = IDLE if idle is None else idle
        self._waiting: dict[Peer, deque[tuple[float, Upstream]]] = {}
        self._timer: asyncio.TimerHandle | None = None

    def take(self, primary: Peer) -> Upstream | None:
        """The connection to `primary` used last, if one is still open; else None."""
        waiting = self._waiting.get(primary)
        now = time.monotonic()
        while waiting:
            since, upstream = waiting.pop()
            if upstream.idle and now - since < self.idle:
                return upstream
            upstream.close()           # gone or too old: nothing to say to it
        return None

    def give(self, upstream: Upstream) -> None:
        """Keep `upstream` for the next session, or say QUIT when it cannot be kept."""
        waiting = self._waiting.setdefault(upstream.primary, deque())
        if (not upstream.idle or upstream.age > REUSE_LIMIT or len(waiting) >= MAX_IDLE
                or self.idle <= 0):
            self.spawn(upstream.quit())
            return
        waiting.append((time.monotonic(), upstream))
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.idle, self._expire)

    def _expire(self) -> None:
        """QUIT the connections that waited IDLE seconds; come back for the rest."""
        self._timer = None
        now = time.monotonic()
        first = None
        for waiting in self._waiting.values():
            while waiting and now - waiting[0][0] >= self.idle:
                self.spawn(waiting.popleft()[1].quit())
            if waiting:
                first = waiting[0][0] if first is None else min(first, waiting[0][0])
        if first is not None:
            self._timer = asyncio.get_running_loop().call_later(first + self.idle - now, self._expire)

    def close(self) -> None:
        """At shutdown: QUIT every connection waiting here."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for waiting in self._waiting.values():
            while waiting:
                self.spawn(waiting.popleft()[1].quit())
        self._waiting.clear()
