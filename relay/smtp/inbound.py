"""The inbound listener: a before-queue proxy to each domain's primary server.

Per recipient, in the sender's session:
  - not a configured domain -> 550 5.7.1; malformed or unsafe address -> 553, nothing on disk
  - RCPT is forwarded to the primary; its 2xx or 5xx becomes our answer
  - a 4xx or no answer: the recipient is kept for continuity when the domain's subscription is
    active today and the user is registered; otherwise the sender gets the 4xx and retries
At DATA, the message (plus our Received header) goes to the primary for the recipients it took;
those it now fails temporarily also fall back to continuity. Continuity copies are written to
the Maildir and the replay queue, and only then does the sender get 250. When one reply cannot
be right for every recipient, the answer is 451 and nothing is kept.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import secrets
from collections.abc import Callable, Coroutine
from enum import Enum
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

from relay.addresses import AddressError, Mailbox, parse_mailbox, parse_sender
from relay.config import Domain, HostPort, Primary
from relay.delivery.client import Reply, Upstream
from relay.delivery.health import Health
from relay.log import event
from relay.smtp import replies
from relay.smtp.limits import LimitedConnections

log = logging.getLogger("relay.inbound")

Keep = Callable[[Mailbox, str, bytes, tuple[str, ...]], str]


class Route(Enum):
    PRIMARY = "primary"          # the primary accepted the RCPT
    CONTINUITY = "continuity"    # kept here: the primary failed temporarily


class Transaction(Envelope):
    """aiosmtpd's envelope plus where each recipient goes."""

    def __init__(self) -> None:
        super().__init__()
        self.id = secrets.token_hex(6)
        self.routes: dict[Mailbox, Route] = {}
        self.used: dict[HostPort, Upstream] = {}    # got MAIL FROM in this transaction
        self.failed: dict[HostPort, Reply] = {}     # could not be used in this transaction


class RelaySession(Session):
    """aiosmtpd's session plus the primary connections it keeps open between transactions."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self.upstreams: dict[HostPort, Upstream] = {}


class InboundSMTP(LimitedConnections, SMTP):
    """aiosmtpd's server with our session and envelope types, closing primaries on hang-up,
    within the listener's connection limits (pass `limits=`)."""

    def _create_session(self) -> Session:
        return RelaySession(self.loop)

    def _create_envelope(self) -> Envelope:
        return Transaction()

    def connection_lost(self, error: Exception | None) -> None:
        session = self.session
        super().connection_lost(error)
        if isinstance(session, RelaySession) and isinstance(self.event_handler, InboundHandler):
            for upstream in session.upstreams.values():
                self.event_handler.spawn(upstream.quit())
            session.upstreams.clear()


class InboundHandler:
    """aiosmtpd hooks for the inbound listener."""

    def __init__(self, domains: dict[str, Domain], hostname: str, health: Health,
                 is_registered: Callable[[Mailbox], bool], keep: Keep,
                 max_recipients: int = 100) -> None:
        self.domains = domains
        self.hostname = hostname
        self.health = health
        self.is_registered = is_registered
        self.keep = keep
        self.max_recipients = max_recipients
        self._background: set[asyncio.Task] = set()
        self._in_flight: set[asyncio.Task] = set()

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a clean-up (a QUIT to a primary) without holding up the session."""
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def drain(self, timeout: float = 25) -> None:
        """At shutdown: let messages already in hand finish and their senders get the reply,
        then let the clean-ups run. A sender cut off later retries; nothing acknowledged is
        lost either way."""
        if self._in_flight:
            await asyncio.wait(list(self._in_flight), timeout=timeout)
            await asyncio.sleep(0.1)  # the sessions push their replies
        if self._background:
            await asyncio.wait(list(self._background), timeout=10)

    async def handle_exception(self, error: Exception) -> str:
        event(log, "inbound.error", logging.ERROR, error=type(error).__name__, detail=error)
        return replies.LOCAL_ERROR

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, mail_options: list[str]) -> str:
        try:
            parse_sender(address)
        except AddressError as exc:
            return replies.BAD_SENDER.format(reason=exc)
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return replies.SENDER_OK

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        assert isinstance(envelope, Transaction) and isinstance(session, RelaySession)
        try:
            user = parse_mailbox(address)
        except AddressError as exc:
            return replies.BAD_RECIPIENT.format(reason=exc)
        domain = self.domains.get(user.domain)
        if domain is None:
            return replies.RELAY_DENIED.format(domain=user.domain)
        if user in envelope.routes:
            return replies.RECIPIENT_OK
        if len(envelope.routes) >= self.max_recipients:
            return replies.TOO_MANY_RECIPIENTS
        reply = await self._primary_rcpt(session, envelope, domain, address)
        if reply.ok:
            route = Route.PRIMARY
        elif reply.permanent:
            return replies.relayed(reply.code, reply.text)
        else:
            self.health.primary_failed(domain.name, f"{reply.code} {reply.text}")
            if not self._may_keep(domain, user):
                return self._temporary(domain, reply)
            route = Route.CONTINUITY
        envelope.routes[user] = route
        envelope.rcpt_tos.append(address)
        return replies.RECIPIENT_OK

    def _may_keep(self, domain: Domain, user: Mailbox) -> bool:
        return domain.continuity_active() and self.is_registered(user)

    @staticmethod
    def _temporary(domain: Domain, reply: Reply) -> str:
        if reply.reached:
            return replies.relayed(reply.code, reply.text)
        return replies.PRIMARY_UNREACHABLE.format(domain=domain.name)

    async def _primary_rcpt(self, session: RelaySession, tx: Transaction, domain: Domain,
                            address: str) -> Reply:
        primary: Primary = domain.primary
        key = primary.address
        if key in tx.failed:
            return tx.failed[key]
        upstream = tx.used.get(key)
        if upstream is None:
            upstream = session.upstreams.get(key) or Upstream(primary, self.hostname)
            session.upstreams[key] = upstream
            reply = await upstream.begin(parse_sender(tx.mail_from), list(tx.mail_options))
            if not reply.ok:
                tx.failed[key] = reply
                return reply
            tx.used[key] = upstream
        reply = await upstream.rcpt(address)
        if not reply.reached:
            tx.failed[key] = reply
            del tx.used[key]
        return reply

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        assert isinstance(envelope, Transaction) and isinstance(session, RelaySession)
        # A sender hanging up mid-way must not cut a store or a primary conversation in half.
        task = asyncio.get_running_loop().create_task(self._finish(session, envelope))
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)
        return await asyncio.shield(task)

    async def _finish(self, session: RelaySession, tx: Transaction) -> str:
        message = self._received(session, tx) + tx.content
        by_key: dict[HostPort, Reply] = {}
        outcome = dict(tx.routes)
        answers: dict[Mailbox, Reply] = {}
        for user, route in tx.routes.items():
            if route is not Route.PRIMARY:
                continue
            domain = self.domains[user.domain]
            key = domain.primary.address
            if key not in by_key:
                by_key[key] = tx.failed.get(key) or await tx.used[key].data(message)
            answers[user] = reply = by_key[key]
            if reply.ok:
                self.health.primary_ok(domain.name)
            elif reply.temporary:
                self.health.primary_failed(domain.name, f"{reply.code} {reply.text}")
                if self._may_keep(domain, user):
                    outcome[user] = Route.CONTINUITY
        return await self._answer(tx, message, outcome, answers)

    async def _answer(self, tx: Transaction, message: bytes, outcome: dict[Mailbox, Route],
                      answers: dict[Mailbox, Reply]) -> str:
        kept = [u for u, route in outcome.items() if route is Route.CONTINUITY]
        failed = {u: r for u, r in answers.items() if not r.ok and outcome[u] is Route.PRIMARY}
        if failed:
            first = next(iter(failed.values()))
            if len(failed) == len(outcome) and len({(r.code, r.text) for r in failed.values()}) == 1:
                event(log, "inbound.refused", id=tx.id, code=first.code, rcpts=len(failed))
                if first.reached:
                    return replies.relayed(first.code, first.text)
                user = next(iter(failed))
                return replies.PRIMARY_UNREACHABLE.format(domain=user.domain)
            event(log, "inbound.split", logging.WARNING, id=tx.id, failed=len(failed),
                  rcpts=len(outcome))
            return replies.SPLIT_OUTCOME
        sender = parse_sender(tx.mail_from)
        options = tuple(o for o in tx.mail_options if o.upper() in ("BODY=8BITMIME", "SMTPUTF8"))
        try:
            for user in kept:
                await asyncio.to_thread(self.keep, user, sender, message, options)
        except Exception as exc:  # noqa: BLE001 - any local fault is a 451, never a 5xx
            event(log, "inbound.keep_failed", logging.ERROR, id=tx.id, error=exc)
            return replies.LOCAL_ERROR
        event(log, "inbound.accepted", id=tx.id, size=len(message), rcpts=len(outcome),
              kept=len(kept))
        if kept:
            return replies.QUEUED.format(id=tx.id)
        return replies.DELIVERED.format(id=tx.id)

    def _received(self, session: Session, tx: Transaction) -> bytes:
        helo = "".join(c for c in (session.host_name or "unknown") if c.isprintable() and
                       not c.isspace())[:120] or "unknown"
        peer = session.peer[0] if isinstance(session.peer, tuple) else "unknown"
        proto = "ESMTP" if session.extended_smtp else "SMTP"
        if session.ssl is not None:
            proto += "S"
        rcpts = list(tx.routes)
        target = f"\r\n\tfor <{rcpts[0]}>" if len(rcpts) == 1 else ""
        date = email.utils.formatdate(localtime=True)
        return (f"Received: from {helo} ([{peer}])\r\n\tby {self.hostname} (continuity-relay) "
                f"with {proto} id {tx.id}{target};\r\n\t{date}\r\n").encode()
