"""The inbound listener: a before-queue proxy to each domain's primary server.

Per recipient, in the sender's session:
  - not a configured domain -> 550 5.7.1; malformed or unsafe address -> 553, nothing on disk
  - RCPT is forwarded to the primary (with its DSN parameters); its 2xx or 5xx is our answer
  - a 4xx or no answer: the recipient is kept for continuity when the domain's subscription is
    active today and the user is registered; otherwise the sender gets the 4xx and retries.
    Only a failure that says the primary itself is in trouble (`Reply.server_trouble`: no
    connection, 421, a 4xx to the greeting, EHLO or MAIL) puts the domain in outage. A 4xx to
    RCPT or DATA is the primary's word on this one mailbox or message (4.2.x busy or full,
    4.3.x a lookup that failed): kept, and the domain's health stays as it is. Except:
      4.7.x (policy, greylisting): goes back to the sender as it is and nothing is kept, so
            the primary's policy still holds.
At DATA, the message (plus our Received header) goes to the primary for the recipients it took;
those it now fails temporarily fall back to continuity by the same rules. The primary's DATA
command goes out as our sender says DATA (`start_data`), so its 354 comes while the message
arrives; its refusal answers the message, and a message that does not follow (refused here,
the sender gone) closes that primary connection mid-DATA (`Transaction.abandon_data`). Continuity copies are
written to the Maildir and the replay queue, and only then does the sender get 250. When one
reply cannot be right for every recipient, the answer is 451 and nothing is kept.

With `tls` configured the listener offers STARTTLS (optional: plaintext mail from MTAs is still
taken) and, only after it, AUTH. A session authenticated as a registered user is a sending
session: `SubmissionHandler` answers its AUTH, MAIL, RCPT and DATA with the submission port's
rules (own address only, the same pipeline). Every other session keeps the rules above.

With `rspamd.url` set, a message about to be kept goes through the spam filter first
(relay/smtp/spam.py says what each verdict does).

During a planned outage (relay/delivery/planned.py) the primary is not asked at all: every
recipient is treated as if it were unreachable, so mail is kept by the rules above (or the
sender gets 451 4.4.1 and retries) and nothing reaches the primary until the outage ends.

The message is never held whole in memory: DATA arrives into a file of the incoming spool
(server.py), and the primary, the Maildir copies and the archive each read it from there
(`MessageFile`, our Received header in front). The session holds the file until every copy
is made; the archive writer gets a hard link of its own.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Coroutine
from enum import Enum
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, Session, TLSSetupException

from relay import metrics
from relay.addresses import AddressError, Mailbox, parse_mailbox, parse_sender
from relay.config import Domain, HostPort, Limits, Primary
from relay.delivery.client import CONNECT, Reply, Upstream
from relay.delivery.dead import DeadPrimaries
from relay.delivery.dsn import build_dsn, dsn_field, notify_says
from relay.delivery.health import Health
from relay.delivery.pool import UpstreamPool
from relay.delivery.rspamd import Scan
from relay.directory import User
from relay.log import event
from relay.smtp import replies
from relay.smtp.limits import ConnectionLimits, LimitedConnections
from relay.smtp.server import FewNames, RelayEnvelope, RelaySMTP, received_header
from relay.smtp.spam import Screen
from relay.smtp.submission import SubmissionHandler, SubmissionSession
from relay.smtp.tls import ServerTLS
from relay.storage.incoming import Incoming, MessageFile
from relay.storage.keeper import Keeper

Keep = Callable[[Mailbox, str, MessageFile, tuple[str, ...], tuple[str, ...]], str | Awaitable[str]]
"""(user, envelope sender, message, MAIL FROM options, RCPT TO options) -> queue id: blocking
(run in a worker thread), or a coroutine function (awaited: `Keeper.keep`)."""

KEPT_MAIL_OPTIONS = ("BODY", "SMTPUTF8", "RET", "ENVID")   # what replay passes on later
PLANNED_TEXT = "planned outage"    # the reply that stands for a primary not asked


class Route(Enum):
    PRIMARY = "primary"          # the primary accepted the RCPT
    CONTINUITY = "continuity"    # kept here: the primary failed temporarily


class Transaction(RelayEnvelope):
    """aiosmtpd's envelope plus where each recipient goes."""

    def __init__(self) -> None:
        super().__init__()
        self.id = secrets.token_hex(6)
        self.routes: dict[Mailbox, Route] = {}
        self.options: dict[Mailbox, tuple[str, ...]] = {}   # each recipient's DSN parameters
        self.used: dict[HostPort, Upstream] = {}    # got MAIL FROM in this transaction
        self.failed: dict[HostPort, Reply] = {}     # could not be used in this transaction
        self.client: tuple[str | None, str | None] = (None, None)  # (IP, HELO), for the spam filter
        self.starting: dict[HostPort, asyncio.Task[Reply | None]] = {}  # DATA sent ahead (start_data)

    def abandon_data(self, starting: dict[HostPort, asyncio.Task[Reply | None]] | None = None) -> None:
        """The primaries' DATA sent ahead (`starting`, else this transaction's own) for a
        message that will not follow (refused here, the sender gone): their connections are
        closed, the one way to end a DATA unsent; the primary discards it. The next
        transaction connects afresh."""
        starting = self.starting if starting is None else starting
        for key, task in starting.items():
            task.cancel()
            self.used[key].close()
        starting.clear()


class RelaySession(SubmissionSession):
    """aiosmtpd's session plus the primary connections it keeps open between transactions."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self.upstreams: dict[HostPort, Upstream] = {}
        self.finishing = 0      # messages still going to the primary after the sender's DATA


class InboundSMTP(LimitedConnections, RelaySMTP):
    """The shared protocol with our session and envelope types, closing primaries on hang-up,
    within the listener's connection limits (pass `limits=`)."""

    def _create_session(self) -> Session:
        session = RelaySession(self.loop)
        if isinstance(self.session, RelaySession):  # STARTTLS starts a new session (RFC 3207)
            session.upstreams = self.session.upstreams
        return session

    def _create_envelope(self) -> Envelope:
        return Transaction()

    def _starting_data(self) -> None:
        if isinstance(self.event_handler, InboundHandler):
            self.event_handler.start_data(self.session, self.envelope)

    async def smtp_DATA(self, arg: str) -> None:
        envelope = self.envelope
        try:
            await super().smtp_DATA(arg)
        finally:            # whatever the hook did not take was refused, or its sender left
            if isinstance(envelope, Transaction):
                envelope.abandon_data()

    def connection_lost(self, error: Exception | None) -> None:
        session, envelope = self.session, self.envelope
        super().connection_lost(error)
        if isinstance(envelope, Transaction):   # gone mid-DATA: closed now, never pooled
            envelope.abandon_data()
        if isinstance(session, RelaySession) and isinstance(self.event_handler, InboundHandler):
            handler = self.event_handler
            for upstream in session.upstreams.values():
                if session.finishing:     # still in use by a message the sender left behind
                    handler.spawn(upstream.quit())
                else:
                    handler.pool.give(upstream)
            session.upstreams.clear()


ArchiveHook = Callable[[str, str, MessageFile, dict[Mailbox, str], dict[Mailbox, str]], None]
"""(session id, sender, message, outcome per recipient, kept queue id per recipient): archive
an accepted message without waiting (app.py hands it to the archive writer, which releases
the message's file once copied)."""


class InboundHandler(FewNames):
    """aiosmtpd hooks for the inbound listener."""

    takes_spooled = True        # DATA is read from `envelope.spooled` (server.py)

    def __init__(self, domains: dict[str, Domain], hostname: str, health: Health,
                 is_registered: Callable[[Mailbox], bool], keep: Keep,
                 max_recipients: int = 100, submission: SubmissionHandler | None = None,
                 screen: Screen | None = None, known: Callable[[Mailbox], bool] | None = None,
                 archive: ArchiveHook | None = None,
                 notice: Callable[[bytes, str], None] | None = None,
                 keeper: Keeper | None = None) -> None:
        self.domains = domains
        self.hostname = hostname
        self.health = health
        self.is_registered = is_registered   # blocking: reads the passwd-file if it changed
        self.known = known                   # from memory (Directory.is_known), may lag a second
        self.archive = archive               # every accepted message, once (never waits)
        self.notice = notice                 # queues a DSN for an address (blocking)
        self.keep = keep
        self.keeper = keeper                 # the process behind `keep`, if any: closed at the end
        self.max_recipients = max_recipients
        self.submission = submission    # AUTH and sending sessions (after STARTTLS); None: no AUTH
        self.screen = screen            # the spam filter on copies about to be kept (spam.py)
        self._background: set[asyncio.Task] = set()
        self._in_flight: set[asyncio.Task] = set()
        self.pool = UpstreamPool(self.spawn)  # primary connections between sessions
        self.dead = DeadPrimaries()           # primaries a connect just failed to reach

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
        self.pool.close()
        if self._background:
            await asyncio.wait(list(self._background), timeout=10)
        if self.submission is not None:
            await self.submission.drain(timeout)
        if self.keeper is not None:
            await self.keeper.close()

    async def handle_exception(self, error: Exception) -> str:
        if isinstance(error, TLSSetupException):  # a sender that cannot do our TLS: not our fault
            event("inbound.tls_failed", detail=error.__cause__ or error)
            return replies.LOCAL_ERROR
        event("inbound.error", logging.ERROR, error=type(error).__name__, detail=error)
        return replies.LOCAL_ERROR

    # -- AUTH, and the sessions it opens: the submission port's rules -------------------------

    def _sending(self, session: Session) -> SubmissionHandler | None:
        return self.submission if isinstance(session.auth_data, User) else None

    async def auth_PLAIN(self, server: SMTP, args: list[str]) -> AuthResult:
        if refused := self._auth_refused(server):
            return refused
        assert self.submission is not None
        return await self.submission.auth_PLAIN(server, args)

    async def auth_LOGIN(self, server: SMTP, args: list[str]) -> AuthResult:
        if refused := self._auth_refused(server):
            return refused
        assert self.submission is not None
        return await self.submission.auth_LOGIN(server, args)

    def _auth_refused(self, server: SMTP) -> AuthResult | None:
        # aiosmtpd takes AUTH at any time; a transaction begun without it must not end with
        # the sending rules (its sender was never checked against the user).
        if server.envelope is not None and server.envelope.mail_from is not None:
            return AuthResult(success=False, handled=False, message=replies.AUTH_IN_TRANSACTION)
        if self.submission is None:
            return AuthResult(success=False, handled=False, message=replies.AUTH_UNAVAILABLE)
        return None

    # -- the transaction -------------------------------------------------------------------

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, mail_options: list[str]) -> str:
        if sending := self._sending(session):
            return await sending.handle_MAIL(server, session, envelope, address, mail_options)
        try:
            parse_sender(address)
        except AddressError as exc:
            return replies.BAD_SENDER.format(reason=exc)
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        if isinstance(envelope, Transaction):
            peer = session.peer[0] if isinstance(session.peer, tuple) else None
            envelope.client = (peer, session.host_name)
        return replies.SENDER_OK

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        if sending := self._sending(session):
            return await sending.handle_RCPT(server, session, envelope, address, rcpt_options)
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
        options = tuple(envelope.next_rcpt_options)
        if self.health.get(domain.name).planned:      # diverted on purpose: never asked
            reply = Reply(421, PLANNED_TEXT, reached=False, stage="connect")
        else:
            reply = await self._primary_rcpt(session, envelope, domain, address, options)
        if reply.ok:
            route = Route.PRIMARY
        elif reply.permanent or _policy(reply):
            return replies.relayed(reply.code, reply.text)
        else:
            self._failed(domain, reply)
            if not await self._may_keep(domain, user):
                return self._temporary(domain, reply)
            route = Route.CONTINUITY
        envelope.routes[user] = route
        envelope.options[user] = options
        envelope.rcpt_tos.append(address)
        return replies.RECIPIENT_OK

    def _failed(self, domain: Domain, reply: Reply) -> None:
        """A temporary failure: the domain is in outage if it says the primary is in trouble,
        as replay decides (a 4xx to RCPT or DATA is about one mailbox: Postfix's qmgr does not
        throttle a destination for it either)."""
        if reply.server_trouble:
            self.health.primary_failed(domain.name, f"{reply.code} {reply.text}")

    async def _may_keep(self, domain: Domain, user: Mailbox) -> bool:
        """Subscribed and registered. Memory answers a registered user; a miss is asked again
        of the file in a worker thread, so a user added a moment ago (the panel, the command
        line) is kept at once, and the loop never reads the file."""
        if not domain.continuity_active():
            return False
        if self.known is not None and self.known(user):
            return True
        return await asyncio.to_thread(self.is_registered, user)

    @staticmethod
    def _temporary(domain: Domain, reply: Reply) -> str:
        if reply.reached:
            return replies.relayed(reply.code, reply.text)
        return replies.PRIMARY_UNREACHABLE.format(domain=domain.name)

    async def _primary_rcpt(self, session: RelaySession, tx: Transaction, domain: Domain,
                            address: str, options: tuple[str, ...]) -> Reply:
        primary: Primary = domain.primary
        key = primary.address
        if key in tx.failed:
            return tx.failed[key]
        upstream = tx.used.get(key)
        if upstream is None:
            upstream = session.upstreams.get(key) or self.pool.take(primary)
            fresh = upstream is None or not upstream.connected
            if fresh and (dead := self.dead.skip(key)) is not None:
                tx.failed[key] = dead       # a connect failed a moment ago, or one is under way
                return dead
            upstream = upstream or Upstream(primary, self.hostname)
            session.upstreams[key] = upstream
            mail: Reply | None = None
            try:
                mail, first = await upstream.begin_rcpt(parse_sender(tx.mail_from), list(tx.mail_options),
                                                        _declared_size(tx.mail_options), address, options)
            finally:
                if fresh or (mail is not None and not mail.reached and mail.stage == CONNECT):
                    # a kept connection found gone is replaced by a new one (Upstream.begin):
                    # its failure to connect is news of the primary, as a fresh session's is
                    self.dead.tried(key, mail)
            if first is None:
                tx.failed[key] = mail
                return mail
            tx.used[key] = upstream
            reply = first
        else:
            reply = await upstream.rcpt(address, options)
        if not reply.reached:
            tx.failed[key] = reply
            del tx.used[key]
        return reply

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        assert isinstance(envelope, Transaction) and envelope.spooled is not None
        if sending := self._sending(session):    # the submission pipeline takes bytes
            envelope.content = await asyncio.to_thread(envelope.spooled.read)
            return await sending.handle_DATA(server, session, envelope)
        assert isinstance(session, RelaySession)
        if envelope.has_nul:
            # RFC 5321 2.3.8 allows no NUL; the primary, Dovecot and rspamd each treat one
            # differently, so none of them gets it (the primary's open transaction is reset
            # by the next one).
            event("inbound.refused", id=envelope.id, code=550, reason="NUL")
            metrics.inbound("refused")
            return replies.NUL_REFUSED
        # A sender hanging up mid-way must not cut a store or a primary conversation in half.
        spooled = envelope.spooled
        spooled.hold()           # until _finish is done, even if the sender hangs up
        starting, envelope.starting = envelope.starting, {}     # _finish's from now on
        task = asyncio.get_running_loop().create_task(
            self._finish(session, envelope, spooled, starting))
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)
        session.finishing += 1
        task.add_done_callback(lambda _: setattr(session, "finishing", session.finishing - 1))
        if spooled.path is not None:
            task.add_done_callback(lambda _: self.spawn(asyncio.to_thread(spooled.release)))
        return await asyncio.shield(task)

    def start_data(self, session: Session, tx: Envelope | None) -> None:
        """As our sender says DATA, before our 354: DATA to each primary that took a recipient,
        so its 354 comes while the message arrives, not after (a round trip off every
        message). Its refusal is the DATA reply `_finish` gets, as if it came after the
        message; a message that does not follow closes the connection (`abandon_data`)."""
        if not isinstance(tx, Transaction) or self._sending(session):
            return
        loop = asyncio.get_running_loop()
        for key in self._primary_keys(tx):
            if key not in tx.starting:
                tx.starting[key] = loop.create_task(tx.used[key].start_data())

    def _primary_keys(self, tx: Transaction) -> list[HostPort]:
        """The primaries that took a recipient of `tx` and can still get its message."""
        keys = {self.domains[u.domain].primary.address: None
                for u, route in tx.routes.items() if route is Route.PRIMARY}
        return [key for key in keys if key not in tx.failed and key in tx.used]

    async def _finish(self, session: RelaySession, tx: Transaction, spooled: MessageFile,
                      starting: dict[HostPort, asyncio.Task[Reply | None]]) -> str:
        try:
            return await self._deliver(session, tx, spooled, starting)
        finally:            # any still unsent (an error here) must not stay open in DATA
            tx.abandon_data(starting)

    @staticmethod
    async def _data(tx: Transaction, key: HostPort, message: MessageFile,
                    starting: dict[HostPort, asyncio.Task[Reply | None]]) -> Reply:
        """The primary's reply to the message: to the DATA sent ahead when it refused that."""
        started = starting.pop(key, None)
        refused = await started if started is not None else None
        return refused or await tx.used[key].data(message)

    async def _deliver(self, session: RelaySession, tx: Transaction, spooled: MessageFile,
                       starting: dict[HostPort, asyncio.Task[Reply | None]]) -> str:
        message = spooled.with_prefix(self._received(session, tx))
        by_key: dict[HostPort, Reply] = {}
        outcome = dict(tx.routes)
        answers: dict[Mailbox, Reply] = {}
        for user, route in tx.routes.items():
            if route is not Route.PRIMARY:
                continue
            domain = self.domains[user.domain]
            key = domain.primary.address
            if key not in by_key:
                by_key[key] = tx.failed.get(key) or await self._data(tx, key, message, starting)
            answers[user] = reply = by_key[key]
            if reply.ok:
                self.health.primary_ok(domain.name)
            elif reply.temporary and not _policy(reply):
                self._failed(domain, reply)
                if await self._may_keep(domain, user):
                    outcome[user] = Route.CONTINUITY
        answer = await self._answer(tx, message, outcome, answers)
        if answer.startswith("250") and self.notice is not None:
            await self._relayed(tx, message, outcome, answers)
        return answer

    async def _relayed(self, tx: Transaction, message: MessageFile, outcome: dict[Mailbox, Route],
                       answers: dict[Mailbox, Reply]) -> None:
        """RFC 3461 6.2.3: a recipient whose NOTIFY asked for SUCCESS, taken by a primary that
        offers no DSN (so the NOTIFY could not go with it), hears "relayed" from us. Kept
        recipients hear it from the replay runner once the primary has them."""
        sender = parse_sender(tx.mail_from)
        told = [u for u, route in outcome.items()
                if route is Route.PRIMARY and sender and notify_says(tx.options[u], "SUCCESS")
                and not tx.used[self.domains[u.domain].primary.address].offers("dsn")]
        if not told:
            return
        head = await asyncio.to_thread(message.head, 64 * 1024)
        for user in told:
            reply = answers[user]
            upstream = tx.used[self.domains[user.domain].primary.address]
            notice = build_dsn(reporting_mta=self.hostname, original=head, mail_from=sender,
                               rcpt=str(user), code=reply.code, text=reply.text,
                               remote_mta=upstream.server_name, arrival=time.time(),
                               action="relayed", envid=dsn_field(list(tx.mail_options), "ENVID"),
                               orcpt=dsn_field(tx.options[user], "ORCPT"))
            assert self.notice is not None
            await asyncio.to_thread(self.notice, notice, sender)

    async def _answer(self, tx: Transaction, message: MessageFile, outcome: dict[Mailbox, Route],
                      answers: dict[Mailbox, Reply]) -> str:
        kept = [u for u, route in outcome.items() if route is Route.CONTINUITY]
        failed = {u: r for u, r in answers.items() if not r.ok and outcome[u] is Route.PRIMARY}
        if failed:
            first = next(iter(failed.values()))
            if len(failed) == len(outcome) and len({(r.code, r.text) for r in failed.values()}) == 1:
                event("inbound.refused", id=tx.id, code=first.code, rcpts=len(failed))
                metrics.inbound("refused" if first.permanent else "deferred")
                if first.reached:
                    return replies.relayed(first.code, first.text)
                user = next(iter(failed))
                return replies.PRIMARY_UNREACHABLE.format(domain=user.domain)
            event("inbound.split", logging.WARNING, id=tx.id, failed=len(failed),
                  rcpts=len(outcome))
            metrics.inbound("deferred")
            return replies.SPLIT_OUTCOME
        sender = parse_sender(tx.mail_from)
        options = tuple(o for o in tx.mail_options
                        if o.split("=", 1)[0].upper() in KEPT_MAIL_OPTIONS and o.upper() != "BODY=7BIT")
        if kept and self.screen is not None:
            delivered = any(r.ok and outcome[u] is Route.PRIMARY for u, r in answers.items())
            scan = Scan(tx.id, sender, tuple(str(u) for u in kept), *tx.client)
            screened = await self.screen(message, scan, delivered)
            if screened.reply is not None:
                return screened.reply
            message = screened.message
        kept_ids: dict[Mailbox, str] = {}
        try:
            for user in kept:
                kept_ids[user] = await self._keep(user, sender, message, options, tx.options[user])
        except Exception as exc:  # noqa: BLE001 - any local fault is a 451, never a 5xx
            event("inbound.keep_failed", logging.ERROR, id=tx.id, error=exc)
            metrics.inbound("deferred")
            return replies.LOCAL_ERROR
        if self.archive is not None:
            outcomes = {u: "kept" if u in kept_ids else f"primary {answers[u].code}" for u in outcome}
            await self._archive(tx, sender, message, outcomes, kept_ids)
        event("inbound.accepted", id=tx.id, size=len(message), rcpts=len(outcome),
              kept=len(kept))
        metrics.inbound("kept" if kept else "passed")
        if kept:
            return replies.QUEUED.format(id=tx.id)
        return replies.DELIVERED.format(id=tx.id)

    async def _keep(self, user: Mailbox, sender: str, message: MessageFile,
                    options: tuple[str, ...], rcpt_options: tuple[str, ...]) -> str:
        """One kept copy: awaited when `keep` is a coroutine (the keeper's process, which
        needs no thread hop and shares no interpreter lock: storage/keeper.py), else in a
        worker thread."""
        if inspect.iscoroutinefunction(self.keep):
            return await self.keep(user, sender, message, options, rcpt_options)
        return await asyncio.to_thread(self.keep, user, sender, message, options, rcpt_options)

    async def _archive(self, tx: Transaction, sender: str, message: MessageFile,
                       outcomes: dict[Mailbox, str], kept_ids: dict[Mailbox, str]) -> None:
        """Hand the archive a link of its own to the message (the session's goes with it)."""
        assert self.archive is not None
        try:    # in memory, there is nothing to link: no thread hop (and its wake-ups) for it
            own = message.detached() if message.path is None else await asyncio.to_thread(message.detached)
        except OSError as exc:      # the archive's trouble never costs a sender its 250
            event("inbound.archive_failed", logging.ERROR, id=tx.id, error=exc.strerror or exc)
            return
        self.archive(tx.id, sender, own, outcomes, kept_ids)

    def _received(self, session: Session, tx: Transaction) -> bytes:
        rcpts = list(tx.routes)
        return received_header(session, self.hostname, tx.id, str(rcpts[0]) if len(rcpts) == 1 else None,
                               utf8=tx.smtp_utf8)


def _declared_size(mail_options: list[str]) -> int | None:
    """The SIZE the sender declared (RFC 1870), passed on as Postfix's before-queue proxy does:
    the primary may refuse a message too big for it before the data is sent."""
    for option in mail_options:
        name, _, value = option.partition("=")
        if name.upper() == "SIZE" and value.isdigit():
            return int(value)
    return None


def _policy(reply: Reply) -> bool:
    """A 4.7.x: the primary's policy (greylisting, a rate limit) speaks; the sender must hear it."""
    return reply.temporary and reply.reached and reply.enhanced.startswith("4.7.")


def make_server_factory(handler: InboundHandler, hostname: str, tls: ServerTLS | None,
                        data_size_limit: int, limits: ConnectionLimits | None = None,
                        incoming: Incoming | None = None) -> Callable[[], SMTP]:
    """What `loop.create_server` needs for the inbound port. With `tls`: STARTTLS offered,
    never required, and AUTH only after it (never required either). Each connection gets the
    context current when it opens (`ServerTLS.reload`)."""

    if limits is None:
        limits = ConnectionLimits.of("inbound", Limits())

    def factory() -> SMTP:
        return InboundSMTP(handler, limits=limits, hostname=hostname, ident="continuity-relay",
                           tls_context=tls.context if tls else None, require_starttls=False,
                           auth_required=False, auth_require_tls=True,
                           data_size_limit=data_size_limit, enable_SMTPUTF8=True,
                           decode_data=False, incoming=incoming)

    return factory
