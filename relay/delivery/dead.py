"""Primaries that could not be reached a moment ago, as Postfix's qmgr marks a destination
dead: for `RETRY` seconds after a connect to a primary failed, and while one new connect to it
is under way, inbound sessions do not open their own; their recipients get that failure at once
(kept, for a registered user). Without it a primary that drops packets cost every RCPT its
`connect_timeout` (10 s), so a few hundred waiting sessions capped what an outage could take.

New mail still tries the primary first: one session at a time does, at most `RETRY` seconds
after the last try, so mail flows to a primary that came back within about a second of the
first connect that succeeds. A kept primary connection (the cache) is used as ever.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from relay.delivery.client import CONNECT, Reply

__all__ = ["RETRY", "DeadPrimaries"]

RETRY = 1.0       # seconds after a failed connect before a session tries that primary again


class DeadPrimaries:
    """The last failed connect per primary address (the event loop's thread only)."""

    def __init__(self, retry: float = RETRY, clock: Callable[[], float] = time.monotonic) -> None:
        self.retry = retry
        self._clock = clock
        self._failed: dict[object, tuple[float, Reply]] = {}
        self._trying: set[object] = set()

    def skip(self, key: object) -> Reply | None:
        """The failure to answer with instead of connecting, or None: then connect, and say
        how it went with `tried` (in a `finally`: a session cut off mid-connect says None)."""
        last = self._failed.get(key)
        if last is None:
            return None
        when, reply = last
        if key in self._trying or self._clock() - when < self.retry:
            return reply
        self._trying.add(key)
        return None

    def tried(self, key: object, reply: Reply | None) -> None:
        """How a connect that `skip` let through went: a Reply that did not reach the primary
        at connect marks it dead again; anything else (it answered) clears it; None (cut off)
        changes nothing but lets the next session try."""
        self._trying.discard(key)
        if reply is None:
            return
        if not reply.reached and reply.stage == CONNECT:
            self._failed[key] = (self._clock(), reply)
        else:
            self._failed.pop(key, None)
