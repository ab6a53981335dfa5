"""The submission listener: registered users send mail, from their own address, over TLS.

Rule 4 (never an open relay) is enforced here in three layers:
  - aiosmtpd answers 530 to everything but EHLO/NOOP/STARTTLS/QUIT until STARTTLS, shows AUTH
    only after it, and answers 530 to MAIL/RCPT/DATA until AUTH succeeded;
  - AUTH PLAIN and LOGIN are ours (not aiosmtpd's built-in ones, whose callback would run the
    hash check on the event loop): the password is checked in a worker thread against the
    passwd-file Dovecot uses, and failures are throttled per client address and per account;
  - MAIL must name the authenticated user's own address (case-insensitively), else 553 5.7.1.
Recipients may be anywhere. At DATA the message goes, as received plus our Received header,
with the client's SMTPUTF8 and DSN parameters, to the `submit` pipeline the app hands in; this
module keeps nothing on disk itself, so a crash loses only what was never acknowledged.
Without a smarthost (`submit is None`) MAIL answers 451 4.3.2.
"""

from __future__ import annotations

import asyncio
import binascii
import logging
import secrets
from base64 import b64decode
from collections.abc import Awaitable, Callable
from typing import Protocol

from aiosmtpd.smtp import MISSING, SMTP, AuthResult, Envelope, Session, TLSSetupException

from relay import metrics
from relay.addresses import AddressError, parse_mailbox, parse_sender
from relay.auth import LoginThrottle, account_key, check_password, login_address
from relay.config import Limits
from relay.directory import Directory, User
from relay.errors import PermFail
from relay.log import event
from relay.smtp import replies
from relay.smtp.limits import ConnectionLimits, LimitedConnections
from relay.smtp.server import FewNames, RelayEnvelope, RelaySMTP, received_header
from relay.smtp.tls import ServerTLS
from relay.storage.incoming import Incoming


class Submit(Protocol):
    """(authenticated user, envelope sender, recipients, message bytes, MAIL FROM options,
    RCPT TO options per recipient) -> an id for the reply. May raise PermFail(code, text) to
    refuse the message for good with that reply; anything else it raises is answered 451 with
    a generic text."""

    def __call__(self, user: User, sender: str, rcpts: list[str], data: bytes,
                 mail_options: tuple[str, ...] = (),
                 rcpt_options: dict[str, tuple[str, ...]] | None = None) -> Awaitable[str]: ...

USERNAME_CHALLENGE = b"Username:"
PASSWORD_CHALLENGE = b"Password:"


class SubmissionSession(Session):
    """aiosmtpd's session, minus a warning logged on every successful AUTH: aiosmtpd 1.4 still
    sets the deprecated `login_data` itself. The user is in `auth_data`."""

    @property
    def login_data(self) -> object:
        return self._login_data

    @login_data.setter
    def login_data(self, value: object) -> None:
        self._login_data = value


class SubmissionSMTP(LimitedConnections, RelaySMTP):
    """The shared protocol with our session type, within the listener's connection limits."""

    def _create_session(self) -> Session:
        return SubmissionSession(self.loop)


class SubmissionHandler(FewNames):
    """aiosmtpd hooks and AUTH mechanisms for the submission listener."""

    def __init__(self, hostname: str, directory: Directory, submit: Submit | None,
                 max_recipients: int, throttle: LoginThrottle) -> None:
        self.hostname = hostname
        self.directory = directory
        self.submit = submit
        self.max_recipients = max_recipients
        self.throttle = throttle
        self._in_flight: set[asyncio.Task] = set()

    async def drain(self, timeout: float = 25) -> None:
        """At shutdown: let messages already handed to `submit` finish, and their senders get
        the reply. A sender cut off later retries; nothing acknowledged is lost either way."""
        if self._in_flight:
            await asyncio.wait(list(self._in_flight), timeout=timeout)
            await asyncio.sleep(0.1)  # the sessions push their replies

    async def handle_exception(self, error: Exception) -> str:
        if isinstance(error, TLSSetupException):  # a client that cannot do our TLS: not our fault
            event("submission.tls_failed", detail=error.__cause__ or error)
        else:
            event("submission.error", logging.ERROR, error=type(error).__name__, detail=error)
        return replies.LOCAL_ERROR

    # -- AUTH --------------------------------------------------------------------------------

    async def auth_PLAIN(self, server: SMTP, args: list[str]) -> AuthResult:
        """RFC 4616: base64 of `authzid NUL authcid NUL password`, with the command or after
        an empty challenge. An authzid other than the login itself is refused."""
        if len(args) == 1:
            blob = await server.challenge_auth(b"")
            if blob is MISSING:
                return AuthResult(success=False)   # aiosmtpd answered (501, or '*' abort)
        else:
            blob = _initial_response(args[1])
            if blob is None:
                return _refuse(replies.AUTH_MALFORMED)
        assert isinstance(blob, bytes)
        parts = blob.split(b"\x00")
        if len(parts) != 3:
            return _refuse(replies.AUTH_MALFORMED)
        authzid, login, password = parts
        if authzid and account_key(_utf8(authzid)) != account_key(_utf8(login)):
            event("submission.auth_failed", logging.WARNING, peer=_peer(server.session),
                  user=_shown(login), mechanism="PLAIN", reason="authzid")
            return _refuse(replies.AUTH_FAILED)
        return await self._login(server, "PLAIN", login, password)

    async def auth_LOGIN(self, server: SMTP, args: list[str]) -> AuthResult:
        """The de-facto LOGIN mechanism: user name (with the command or on a challenge), then
        the password on a second challenge, each base64."""
        if len(args) == 1:
            login = await server.challenge_auth(USERNAME_CHALLENGE)
            if login is MISSING:
                return AuthResult(success=False)
        else:
            login = _initial_response(args[1])
            if login is None:
                return _refuse(replies.AUTH_MALFORMED)
        password = await server.challenge_auth(PASSWORD_CHALLENGE)
        if password is MISSING:
            return AuthResult(success=False)
        assert isinstance(login, bytes) and isinstance(password, bytes)
        return await self._login(server, "LOGIN", login, password)

    async def _login(self, server: SMTP, mechanism: str, raw_login: bytes,
                     raw_password: bytes) -> AuthResult:
        peer = _peer(server.session)
        login, password = _utf8(raw_login), _utf8(raw_password)
        account = account_key(login)     # the one normalisation: throttle, check and log
        if self.throttle.blocked(peer, account):
            event("submission.auth_blocked", logging.WARNING, peer=peer, user=account)
            return _refuse(replies.AUTH_BLOCKED)
        try:
            # A login that names no address is refused, after the same work as any refusal.
            user = await check_password(self.directory, account if login_address(login) else "",
                                        password)
        except Exception as exc:  # noqa: BLE001 - passwd-file or hash unreadable: our fault, 4xx
            event("submission.auth_error", logging.ERROR, peer=peer, user=account,
                  error=type(exc).__name__, detail=exc)
            return _refuse(replies.AUTH_UNAVAILABLE)
        if user is None:
            self.throttle.failed(peer, account)
            metrics.auth_failed("smtp")
            delay = self.throttle.delay(peer, account)
            event("submission.auth_failed", logging.WARNING, peer=peer, user=account,
                  mechanism=mechanism, delay=f"{delay:g}")
            await asyncio.sleep(delay)
            return _refuse(replies.AUTH_FAILED)
        self.throttle.succeeded(peer, account)
        event("submission.auth_ok", peer=peer, user=user.email, mechanism=mechanism)
        return AuthResult(success=True, auth_data=user)

    # -- the transaction ---------------------------------------------------------------------

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, mail_options: list[str]) -> str:
        user = session.auth_data
        if not isinstance(user, User):   # aiosmtpd already requires AUTH; never rely on it alone
            return replies.AUTH_REQUIRED
        if self.submit is None:
            return replies.SENDING_DISABLED
        try:
            sender = parse_sender(address)
            own = parse_mailbox(sender) == user.address if sender else False
        except AddressError as exc:
            return replies.BAD_SENDER.format(reason=exc)
        if not own:
            event("submission.sender_refused", logging.WARNING, peer=_peer(session),
                  user=user.email, sender=_printable(sender))
            return replies.SENDER_NOT_OWN.format(address=user.email)
        envelope.mail_from = sender
        envelope.mail_options.extend(mail_options)
        return replies.SENDER_OK

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        if not isinstance(session.auth_data, User):
            return replies.AUTH_REQUIRED
        try:
            rcpt = parse_mailbox(address)
        except AddressError as exc:
            return replies.BAD_RECIPIENT.format(reason=exc)
        if any(parse_mailbox(known) == rcpt for known in envelope.rcpt_tos):
            return replies.RECIPIENT_OK      # the same recipient twice gets one copy
        if len(envelope.rcpt_tos) >= self.max_recipients:
            return replies.TOO_MANY_RECIPIENTS
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return replies.RECIPIENT_OK

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        user = session.auth_data
        if not isinstance(user, User):
            return replies.AUTH_REQUIRED
        if self.submit is None:
            return replies.SENDING_DISABLED
        content = envelope.content
        assert isinstance(content, bytes) and envelope.mail_from is not None
        trace = received_header(session, self.hostname, secrets.token_hex(6), None,
                                utf8=envelope.smtp_utf8)
        params = envelope.rcpt_params if isinstance(envelope, RelayEnvelope) else {}
        # A client hanging up mid-way must not cut the hand-over to the pipeline in half.
        task = asyncio.get_running_loop().create_task(
            self._submit_now(self.submit, user, envelope.mail_from, list(envelope.rcpt_tos),
                            trace + content, tuple(envelope.mail_options), dict(params)))
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)
        return await asyncio.shield(task)

    @staticmethod
    async def _submit_now(submit: Submit, user: User, sender: str, rcpts: list[str], message: bytes,
                         mail_options: tuple[str, ...], rcpt_options: dict[str, tuple[str, ...]]) -> str:
        try:
            queue_id = await submit(user, sender, rcpts, message, mail_options, rcpt_options)
        except PermFail as exc:
            if not 500 <= exc.code <= 599:
                event("submission.error", logging.ERROR, user=user.email, error="PermFail",
                      detail=exc)
                return replies.LOCAL_ERROR
            event("submission.refused", user=user.email, code=exc.code, detail=exc.text)
            return replies.relayed(exc.code, exc.text)
        except Exception as exc:  # noqa: BLE001 - any local fault is a 451, never a 5xx
            event("submission.failed", logging.ERROR, user=user.email,
                  error=type(exc).__name__, detail=exc)
            return replies.LOCAL_ERROR
        event("submission.accepted", id=queue_id, user=user.email, size=len(message),
              rcpts=len(rcpts))
        return replies.QUEUED.format(id=queue_id)


def _refuse(reply: str) -> AuthResult:
    """A failed AUTH that aiosmtpd answers with `reply`."""
    return AuthResult(success=False, handled=False, message=reply)


def _initial_response(text: str) -> bytes | None:
    """An initial response given with the AUTH command; `=` is the empty one (RFC 4954)."""
    if text == "=":
        return b""
    try:
        return b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        return None


def _utf8(raw: bytes) -> str:
    """The text of a login or password; one that is not UTF-8 can match nothing, so it
    becomes '' (which check_password refuses after the same work as any other check)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return ""


def _printable(text: str, limit: int = 100) -> str:
    return "".join(c if c.isprintable() else "?" for c in text[:limit])


def _shown(raw: bytes) -> str:
    """A login as it may appear in a log line and a throttle key."""
    return _printable(raw.decode("utf-8", "replace"), 256)


def _peer(session: Session | None) -> str:
    peer = session.peer if session is not None else None
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return str(peer or "unknown")


def make_server_factory(handler: SubmissionHandler, hostname: str, tls: ServerTLS,
                        data_size_limit: int, limits: ConnectionLimits | None = None,
                        incoming: Incoming | None = None) -> Callable[[], SMTP]:
    """What `loop.create_server` needs for the submission port: STARTTLS before anything,
    AUTH only over TLS, nothing sent without AUTH, within `limits` (default: the defaults of
    `limits.*`, for this listener alone). Each connection gets the context current when it
    opens (`ServerTLS.reload`)."""
    if limits is None:
        limits = ConnectionLimits.of("submission", Limits())

    def factory() -> SMTP:
        return SubmissionSMTP(handler, limits=limits, hostname=hostname, ident="continuity-relay",
                              tls_context=tls.context, require_starttls=True, auth_required=True,
                              auth_require_tls=True, data_size_limit=data_size_limit,
                              decode_data=False, enable_SMTPUTF8=True, incoming=incoming)

    return factory

