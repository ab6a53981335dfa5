"""The outbound runner: delivers the outbound queue to `outbound.smarthost`.

A loop: wait for a kick (something was queued) or the timer, then send every entry that is
due, oldest first, over one reused connection. The smarthost's 250 ends an entry. A 5xx, or a
temporary failure that lasted longer than `outbound.max_age`, puts a delivery status
notification into the sending user's continuity INBOX (and so, later, into their mailbox on
the primary) and files the entry under failed/. Any other temporary failure is retried with
growing delays: `outbound.retry_delay`, doubled each time, at most an hour apart. When the
smarthost cannot be reached the sweep stops at once; the rest waits for the next round.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import replace

from relay.addresses import AddressError, Mailbox, parse_mailbox
from relay.config import Outbound
from relay.delivery.client import Reply, Upstream
from relay.delivery.dsn import build_dsn, dsn_field, notify_says
from relay.errors import CorruptEntryError
from relay.log import event
from relay.runners.wake import retry_delay, sleep_until_kick
from relay.storage.queue import MAX_CRASHES, Envelope, Queue

log = logging.getLogger("relay.outbound")

Notify = Callable[[Mailbox, bytes], None]   # put a notice into a user's INBOX, blocking


class OutboundRunner:
    """Owns `<spool>/outbound/`."""

    def __init__(self, settings: Outbound, queue: Queue, hostname: str, notify: Notify,
                 credentials: tuple[str, str] | None = None) -> None:
        assert settings.smarthost is not None
        self.settings = settings
        self.smarthost = settings.smarthost
        self.queue = queue
        self.hostname = hostname
        self.notify = notify
        self.credentials = credentials
        self._kick = asyncio.Event()

    def kick(self) -> None:
        self._kick.set()

    async def run(self) -> None:
        while True:
            await self.sweep()
            await sleep_until_kick(self._kick, min(self.settings.retry_delay, 60.0))

    async def sweep(self) -> int:
        """Send every due entry; returns how many were delivered."""
        due = await asyncio.to_thread(self._due)
        delivered = 0
        if not due:
            return 0
        upstream = Upstream(self.smarthost, self.hostname, self.credentials)
        try:
            for entry in due:
                reply = await self._one(upstream, entry)
                delivered += reply is not None and reply.ok
                if reply is not None and not reply.reached:
                    event(log, "outbound.unreachable", logging.WARNING,
                          smarthost=str(self.smarthost.address), reason=reply.text)
                    break
        finally:
            await upstream.quit()
        return delivered

    def _due(self) -> list[str]:
        now = time.time()
        due = []
        for entry in self.queue.list("waiting"):
            try:
                if self.queue.envelope(entry).extra.get("next_try", 0) <= now:
                    due.append(entry)
            except CorruptEntryError:
                due.append(entry)  # claimed below and set aside
        return due

    async def _one(self, upstream: Upstream, entry: str) -> Reply | None:
        if not await asyncio.to_thread(self.queue.claim, entry):
            return None
        try:
            envelope, data = await asyncio.to_thread(self.queue.read, entry, "active")
        except CorruptEntryError as exc:
            await asyncio.to_thread(self.queue.move, entry, "active", "hold")
            event(log, "outbound.held", logging.ERROR, id=entry, error=exc)
            return None
        try:
            reply = await upstream.send(envelope.mail_from, envelope.rcpt, list(envelope.mail_options),
                                        data, envelope.rcpt_options)
            await asyncio.to_thread(self._settle, entry, envelope, data, reply, upstream.server_name)
            return reply
        except Exception as exc:  # noqa: BLE001 - one bad entry must not stop the runner
            crashed = replace(envelope, crashes=envelope.crashes + 1, note=f"error: {type(exc).__name__}")
            target = "hold" if crashed.crashes >= MAX_CRASHES else "waiting"
            await asyncio.to_thread(self.queue.move, entry, "active", target, crashed)
            event(log, "outbound.error", logging.ERROR, id=entry, error=type(exc).__name__,
                  detail=exc, now_in=target)
            return None

    def _settle(self, entry: str, envelope: Envelope, data: bytes, reply: Reply, server: str) -> None:
        """Blocking: finish, fail (with a notice to the user) or defer the entry."""
        if reply.ok:
            self.queue.finish(entry)
            event(log, "outbound.sent", id=entry, rcpt=envelope.rcpt, attempts=envelope.attempts + 1)
            return
        note = f"{reply.code} {reply.text}"
        attempts = envelope.attempts + 1
        expired = time.time() - envelope.received_at >= self.settings.max_age
        if reply.permanent or expired:
            self._tell_user(envelope, data, reply, server)
            self.queue.move(entry, "active", "failed", replace(envelope, attempts=attempts, note=note))
            event(log, "outbound.failed", logging.WARNING, id=entry, rcpt=envelope.rcpt, reply=note,
                  expired=expired)
            return
        later = time.time() + retry_delay(self.settings.retry_delay, attempts)
        extra = {**envelope.extra, "next_try": later}
        self.queue.move(entry, "active", "waiting",
                        replace(envelope, attempts=attempts, note=note, extra=extra))
        event(log, "outbound.deferred", id=entry, rcpt=envelope.rcpt, reply=note, attempts=attempts)

    def _tell_user(self, envelope: Envelope, data: bytes, reply: Reply, server: str) -> None:
        """A notice into the sending user's INBOX, unless their RCPT said NOTIFY without FAILURE."""
        if not notify_says(envelope.rcpt_options, "FAILURE"):
            return
        try:
            user = parse_mailbox(envelope.extra.get("user") or envelope.mail_from)
        except AddressError:
            return  # a notice of our own (sender <>) that could not be delivered: nobody to tell
        notice = build_dsn(reporting_mta=self.hostname, original=data, mail_from=str(user),
                           rcpt=envelope.rcpt, code=reply.code if reply.code >= 400 else 451,
                           text=reply.text, remote_mta=server, arrival=envelope.received_at,
                           envid=dsn_field(envelope.mail_options, "ENVID"),
                           orcpt=dsn_field(envelope.rcpt_options, "ORCPT"))
        self.notify(user, notice)
