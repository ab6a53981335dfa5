"""The outbound runner: delivers the outbound queue to `outbound.smarthost`.

A loop: wait for a kick (something was queued) or the timer, then send every entry that is
due, oldest first, over one reused connection: the entries of one message (one a recipient)
in one transaction, each settled by its own recipient's reply. The smarthost's 250 ends an entry. A 5xx, or a
temporary failure that lasted longer than `outbound.max_age`, puts a delivery status
notification to the sending user (`ContinuityStore.notify`: their continuity INBOX, and later
their mailbox on the primary) and files the entry under failed/. Any other temporary failure is
retried with growing delays: `outbound.retry_delay`, doubled each time, at most an hour apart.
When the smarthost cannot be reached the sweep stops at once; the rest waits for the next round.
Claiming, crash counting and the moves are the queue runner base's (runners/queue_runner.py).
"""

from __future__ import annotations

import asyncio
import logging
import time

from relay.config import Outbound
from relay.delivery.client import Reply, Upstream
from relay.log import event
from relay.runners.queue_runner import Notice, QueueRunner, Verdict
from relay.storage.queue import Envelope, Queue

# Entries claimed together, so a message's recipients (one entry each, queued side by side)
# go in one transaction, as Postfix sends one copy per destination; RFC 5321 4.5.3.1.8 has
# every server take at least 100 recipients a transaction.
GROUP = 100


class OutboundRunner(QueueRunner):
    """Owns `<spool>/outbound/`."""

    name = "outbound"

    def __init__(self, settings: Outbound, queue: Queue, hostname: str, notice: Notice,
                 credentials: tuple[str, str] | None = None) -> None:
        assert settings.smarthost is not None
        super().__init__(hostname, notice, settings.retry_delay)
        self.settings = settings
        self.smarthost = settings.smarthost
        self.queue = queue
        self.credentials = credentials

    def kick(self) -> None:
        """Something was queued: send it now rather than at the next rescan."""
        self.wake()

    async def run(self) -> None:
        while True:
            await self.sweep()
            await self.sleep(min(self.settings.retry_delay, 60.0))

    async def sweep(self) -> int:
        """Send every due entry, oldest first; returns how many were delivered."""
        now = time.time()
        due = [p.id for p in await asyncio.to_thread(self.queue.pending) if p.next_try <= now]
        delivered = 0
        if not due:
            return 0
        upstream = Upstream(self.smarthost, self.hostname, self.credentials)
        try:
            for start in range(0, len(due), GROUP):
                outcomes = await self.attempt_many(self.queue, due[start:start + GROUP], upstream)
                replied = [o for o in outcomes.values() if o is not None and o.reply is not None]
                delivered += sum(o.reply.ok for o in replied)
                stopped = next((o for o in replied if o.verdict is Verdict.STOP), None)
                if stopped is not None:
                    event("outbound.unreachable", logging.WARNING,
                          smarthost=str(self.smarthost.address), reason=stopped.reply.text)
                    break
        finally:
            await upstream.quit()
        return delivered

    def judge(self, envelope: Envelope, reply: Reply) -> Verdict:
        """5xx, or a temporary failure past `max_age`: refused; an unreachable smarthost stops
        the sweep; any other 4xx defers the entry."""
        if reply.permanent or time.time() - envelope.received_at >= self.settings.max_age:
            return Verdict.REFUSED
        return Verdict.RETRY if reply.reached else Verdict.STOP

    def tell_whom(self, envelope: Envelope) -> str | None:
        """The user who sent it (a notice of our own, sender `<>`, has nobody to tell)."""
        return envelope.extra.get("user") or envelope.mail_from or None
