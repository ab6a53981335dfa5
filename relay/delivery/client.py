"""SMTP conversations with other servers (a domain's primary, the smarthost), with aiosmtplib
kept behind this line.

Every outcome comes back as a `Reply`: the server's own code and text, or, when it could not be
reached (refused, timeout, dropped at any step, TLS or AUTH failure), a synthetic 4xx with
`reached=False`. Each reply says at which `stage` it came, so callers can tell a server in
trouble (`Reply.server_trouble`: no connection, 421, or a 4xx to the greeting, EHLO or MAIL)
from one mailbox or one message that must wait (a 4xx to RCPT or DATA). Nothing above this
module imports aiosmtplib or sees its exceptions.

Every connection says EHLO before its first MAIL, and again after STARTTLS (aiosmtplib's
`connect()` does not, and STARTTLS forgets what the server offered), so MAIL FROM options are
chosen from what this server said: BODY=8BITMIME, SMTPUTF8, SIZE, and RFC 3461's RET and ENVID
(NOTIFY and ORCPT on RCPT) only where offered. A message whose addresses need SMTPUTF8, sent to
a server that does not offer it, fails for good (553 5.6.7, RFC 6531 3.4) without a word sent:
it can never be delivered there, and must not look like a server that is down. Credentials are
never sent over a connection without TLS.

DATA is written here, not by aiosmtplib's `data()`, which builds the whole message three more
times (line endings, dot-stuffing, the final dot) and hands it to the transport at once: 4x a
50 MB message. Pieces are written a CHUNK at a time, so a small message (our Received header,
its body and the final dot) goes in one write. `_send_data` normalises line endings and
dot-stuffs a piece at a time, exactly as aiosmtplib does (a lone CR or LF becomes CRLF, a
leading dot is doubled, CRLF is added at the end when missing), writing once the transport
has room. A spooled message
(`MessageFile`) is read from its file in pieces; bytes (replay, the smarthost) are cut into
pieces of the same size, so one message in memory is the most a send holds. It uses
aiosmtplib's protocol below `data()` (its command lock, `read_response`, `_drain_helper`):
tests/smtp check the bytes that arrive, so an aiosmtplib that changes them fails there.

Round trips (RFC 2920): a server that offers PIPELINING gets a transaction's MAIL and first
RCPT in one write (`begin_rcpt`), and each reply is still its own: read in order, MAIL's
deciding whether the RCPT's counts. aiosmtplib reads one reply per command written and drops
what arrives while a reply waits to be picked up, so the connection's protocol is
`_Pipelining`, which keeps the replies behind the first inside a group (and only there). The
DATA command can go ahead of the message (`start_data`: inbound sends it as its own sender
says DATA, so the server's 354 comes while the message arrives); the command lock is held
from DATA to the reply after the message, and a DATA that will not get its message is ended
the only way SMTP has, by closing the connection (`close`): the server discards it.
A whole transaction of replay or the smarthost (`send_many`) goes as one group to such a
server: MAIL, its RCPTs and DATA in one write, the message after the 354 (`_send_grouped`),
two round trips a message instead of three and one a recipient.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import aiosmtplib
from aiosmtplib.email import quote_address
from aiosmtplib.protocol import COMMAND_INJECTION_REGEX, MAX_RESPONSE_LENGTH, SMTPProtocol

from relay.config import HostPort
from relay.storage.incoming import CHUNK, MessageFile

Message = bytes | MessageFile
_LINE_END = re.compile(rb"\r\n|\n|\r(?!\n)")     # aiosmtplib's LINE_ENDINGS_REGEX

# The stages of a conversation, as `Reply.stage` names them.
CONNECT, EHLO, MAIL, RCPT, DATA = "connect", "EHLO", "MAIL", "RCPT", "DATA"
_SERVER_STAGES = (CONNECT, EHLO, MAIL)
GROUP_RCPTS = 4     # recipients in one pipelined transaction (`Upstream._send_grouped`)



class Turn(Protocol):
    """Whether a message may be committed yet (the replay runner's per-mailbox order): DATA
    sends the message, then holds its final dot until `wait()` says None. Holding the dot, not
    DATA, leaves only the dot and its 250 waiting for the message before: the primary commits a
    message at its dot, so it still takes them in order."""

    def due(self) -> bool:
        """True when `wait()` would answer at once (the dot then goes with the message's end)."""

    async def wait(self) -> Reply | None:
        """None to send the final dot, or the Reply to answer instead (the message is then
        abandoned: the connection is closed before its dot, RFC 5321 3.8)."""

    def send_when_due(self, send: Callable[[], None]) -> None:
        """Call `send` (it writes the dot, and must not raise) the moment the turn comes, if
        it comes with a go, before `wait()` wakes to say None: the dot goes out from the
        event loop turn that read the answer before it, not one turn later."""

NEEDS_SMTPUTF8 = "5.6.7 The address needs SMTPUTF8, which {host} does not offer"
NO_TLS_FOR_AUTH = "4.7.0 {host} offered no TLS: credentials are never sent in clear"


@dataclass(frozen=True)
class Reply:
    code: int
    text: str
    reached: bool = True
    stage: str = ""

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 300

    @property
    def permanent(self) -> bool:
        return 500 <= self.code < 600

    @property
    def temporary(self) -> bool:
        return not self.ok and not self.permanent

    @property
    def server_trouble(self) -> bool:
        """The server itself is down or refusing work, rather than one mailbox or one message:
        no connection, a 421, or a 4xx to the greeting, EHLO or MAIL."""
        return self.temporary and (not self.reached or self.code == 421
                                   or self.stage in _SERVER_STAGES)

    @property
    def enhanced(self) -> str:
        """The enhanced status code at the start of the text (RFC 3463), or ''."""
        word = self.text.split(" ", 1)[0]
        parts = word.split(".")
        ok = len(parts) == 3 and all(p.isdigit() for p in parts) and parts[0] == str(self.code)[0]
        return word if ok else ""


def _translate(exc: BaseException, step: str) -> Reply:
    """aiosmtplib's exceptions -> Reply; anything without a code counts as not reached."""
    if isinstance(exc, aiosmtplib.SMTPResponseException) and 400 <= exc.code < 600:
        if exc.code == 421:  # the server is closing the connection: it is going away
            return Reply(exc.code, exc.message, reached=False, stage=step)
        return Reply(exc.code, exc.message, stage=step)
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        reason = f"timeout during {step}"
    elif isinstance(exc, ssl.SSLError):
        reason = f"TLS failure during {step}"
    else:
        reason = f"connection failed during {step}"
    return Reply(451, reason, reached=False, stage=step)


def needs_smtputf8(*addresses: str) -> bool:
    """RFC 6531: a transaction needs SMTPUTF8 when an envelope address is not ASCII."""
    return not all(address.isascii() for address in addresses)


class Peer(Protocol):
    """What a connection needs to know about the other server (config.Primary, Smarthost)."""

    address: HostPort
    starttls: str
    verify_cert: bool
    ca_file: Path | None
    timeout: float
    connect_timeout: float


class Upstream:
    """A connection to one server, reused for several transactions in a row."""

    def __init__(self, primary: Peer, helo: str, credentials: tuple[str, str] | None = None) -> None:
        self.primary = primary
        self.helo = helo
        self.credentials = credentials
        self._smtp: aiosmtplib.SMTP | None = None
        self._in_transaction = False
        self._utf8 = False          # this transaction's MAIL FROM carried SMTPUTF8
        self._lost = False          # the last command failed because the connection was gone
        self._opened = 0.0          # time.monotonic() when connected
        self._data_lock: asyncio.Lock | None = None   # the command lock, held from DATA on
        self.server_name = primary.address.host   # what the server calls itself, once it said

    @property
    def connected(self) -> bool:
        return self._smtp is not None and self._smtp.is_connected

    @property
    def idle(self) -> bool:
        """Connected and in no command: another session may use it (delivery/pool.py)."""
        if not self.connected:
            return False
        assert self._smtp is not None
        lock = self._smtp.protocol._command_lock if self._smtp.protocol is not None else None
        return lock is not None and not lock.locked()

    @property
    def age(self) -> float:
        """Seconds since this connection was made."""
        return time.monotonic() - self._opened

    async def _connect(self) -> None:
        """Connect, STARTTLS as configured, EHLO (again after STARTTLS), AUTH if configured."""
        p = self.primary
        start_tls = {"off": False, "opportunistic": None, "required": True}[p.starttls]
        self._smtp = aiosmtplib.SMTP(
            hostname=p.address.host, port=p.address.port, local_hostname=self.helo,
            timeout=p.timeout, start_tls=start_tls, validate_certs=p.verify_cert,
            cert_bundle=str(p.ca_file) if p.ca_file else None)
        self._in_transaction = False
        self._opened = time.monotonic()
        await self._smtp.connect(timeout=p.connect_timeout)
        if type(self._smtp.protocol) is SMTPProtocol:
            self._smtp.protocol.__class__ = _Pipelining     # the same object, pipelined groups read
        if self._smtp.is_ehlo_or_helo_needed:
            try:
                await self._smtp.ehlo()
            except aiosmtplib.SMTPHeloError:
                if not self._smtp.is_connected:
                    raise
                await self._smtp.helo()
        self._note_name()
        if self.credentials is not None:
            if self._smtp.get_transport_info("sslcontext") is None:
                raise _NoTLS(NO_TLS_FOR_AUTH.format(host=p.address.host))
            await self._smtp.login(*self.credentials)

    async def _open(self) -> Reply | None:
        """Connect unless connected; a Reply when that failed."""
        if self.connected:
            return None
        try:
            await self._connect()
        except _NoTLS as exc:
            self.close()
            return Reply(451, str(exc), reached=False, stage=CONNECT)
        except (aiosmtplib.SMTPException, OSError) as exc:
            self.close()
            return _translate(exc, CONNECT)
        return None

    async def begin(self, sender: str, mail_options: list[str], size: int | None = None,
                    rcpts: Iterable[str] = ()) -> Reply:
        """Connect if needed and send MAIL FROM with the options this server offers.

        `rcpts` are the recipients known in advance (replay, the smarthost), so SMTPUTF8 is
        asked for when one of them needs it. A failure that loses the connection closes it.

        A connection kept open since an earlier transaction (this session's, or the pool's:
        delivery/pool.py) may have been closed by the server meanwhile, its idle timeout: when
        RSET or MAIL finds it gone (or a 421), a new connection is tried once. That says
        nothing of the server; the new connection's answer does."""
        return (await self._begin_once(sender, mail_options, size, list(rcpts), None))[0]

    async def begin_rcpt(self, sender: str, mail_options: list[str], size: int | None,
                         recipient: str, options: Iterable[str] = ()) -> tuple[Reply, Reply | None]:
        """`begin`, then `rcpt(recipient, options)`: (MAIL's reply, the RCPT's, None when MAIL
        was refused). To a server that offers PIPELINING both go in one write, one round trip
        instead of two (see the module); the replies are what `begin` and `rcpt` give."""
        first = (recipient, tuple(options))
        mail, rcpt = await self._begin_once(sender, mail_options, size, [], first)
        if mail.ok and rcpt is None:        # not pipelined: the RCPT on its own
            rcpt = await self.rcpt(recipient, first[1])
        return mail, rcpt

    async def _begin_once(self, sender: str, mail_options: list[str], size: int | None,
                          rcpts: list[str], first: tuple[str, tuple[str, ...]] | None,
                          ) -> tuple[Reply, Reply | None]:
        """`_begin`, again on a new connection when a reused one turned out gone (`begin`)."""
        reused = self.connected
        with self._cut_off():
            replies = await self._begin(sender, mail_options, size, rcpts, first)
            if reused and self._lost:
                self.close()
                replies = await self._begin(sender, mail_options, size, rcpts, first)
        return replies

    @contextlib.contextmanager
    def _cut_off(self) -> Iterator[None]:
        """A command cancelled half-way (the sender hung up) leaves the server's answer unread:
        the connection is closed, never used again out of step."""
        try:
            yield
        except asyncio.CancelledError:
            self.close()
            raise

    async def _begin(self, sender: str, mail_options: list[str], size: int | None,
                     rcpts: list[str], first: tuple[str, tuple[str, ...]] | None,
                     ) -> tuple[Reply, Reply | None]:
        """MAIL (after RSET when a transaction is open), with the first RCPT in the same write
        when `first` is given and the server pipelines: (MAIL's reply, that RCPT's or None)."""
        self._lost = False
        failed = await self._open()
        if failed is not None:
            return failed, None
        assert self._smtp is not None
        utf8 = needs_smtputf8(sender, *rcpts) or any(o.upper() == "SMTPUTF8" for o in mail_options)
        if needs_smtputf8(sender, *rcpts) and not self._smtp.supports_extension("smtputf8"):
            return Reply(553, NEEDS_SMTPUTF8.format(host=self.primary.address.host), stage=MAIL), None
        step = MAIL
        try:
            if self._in_transaction:
                step = "RSET"
                await self._smtp.rset()
            step = MAIL
            options = [o for o in mail_options if self._supported(o)]
            if utf8 and self._smtp.supports_extension("smtputf8") and "SMTPUTF8" not in options:
                options.append("SMTPUTF8")
            if size and self._smtp.supports_extension("size"):
                options.append(f"SIZE={size}")
            self._utf8 = "SMTPUTF8" in options
            encoding = "utf-8" if self._utf8 else "ascii"
            group = self._pipeline(sender, options, encoding, first)
            if group is not None:
                return await self._pipelined(sender, group)
            response = await self._smtp.mail(sender, options=options, encoding=encoding)
            self._in_transaction = True
            return Reply(response.code, response.message, stage=MAIL), None
        except (UnicodeError, aiosmtplib.SMTPException, OSError) as exc:
            return self._failed(exc, step), None

    def _pipeline(self, sender: str, options: list[str], encoding: str,
                  first: tuple[str, tuple[str, ...]] | None) -> tuple[bytes, str] | None:
        """MAIL and the first RCPT as one write, as aiosmtplib's `mail` and `rcpt` would send
        them, with the recipient; None when they go one at a time: no PIPELINING, or a command
        that `rcpt` (SMTPUTF8) or aiosmtplib (encoding, control characters) would not send
        as it is, so that one keeps its own answer."""
        assert self._smtp is not None
        if first is None or not self._smtp.supports_extension("pipelining") \
                or not isinstance(self._smtp.protocol, _Pipelining):
            return None
        recipient, rcpt_options = first
        if needs_smtputf8(recipient) and not self._utf8:
            return None
        try:
            mail = [b"MAIL", b"FROM:" + quote_address(sender).encode(encoding),
                    *(o.encode("ascii") for o in options)]
            rcpt = [b"RCPT", b"TO:" + quote_address(recipient).encode("utf-8"),
                    *(o.encode("ascii") for o in self._dsn_options(rcpt_options))]
        except UnicodeError:
            return None
        if any(COMMAND_INJECTION_REGEX.search(arg) for arg in (*mail, *rcpt)):
            return None
        return b" ".join(mail) + b"\r\n" + b" ".join(rcpt) + b"\r\n", recipient

    async def _pipelined(self, sender: str, group: tuple[bytes, str]) -> tuple[Reply, Reply | None]:
        """Write MAIL and RCPT at once, then read MAIL's reply and the RCPT's, in order. A
        refused MAIL answers for both (the RCPT's reply, a 503, is read to stay in step)."""
        assert self._smtp is not None
        commands, recipient = group
        protocol, timeout = self._smtp.protocol, self._smtp.timeout
        if not isinstance(protocol, _Pipelining) or protocol._command_lock is None:
            raise aiosmtplib.SMTPServerDisconnected("Connection lost")
        async with protocol._command_lock:
            protocol._response_pending = True
            protocol.write(commands)
            self._in_transaction = True
            with protocol.group():
                mail = await protocol.next_reply(timeout)
                try:
                    rcpt: aiosmtplib.SMTPResponse | BaseException = await protocol.next_reply(timeout)
                except (aiosmtplib.SMTPException, OSError) as exc:
                    rcpt = exc
        if mail.code != 250:
            reply = self._failed(aiosmtplib.SMTPSenderRefused(mail.code, mail.message, sender), MAIL)
            if isinstance(rcpt, BaseException) and reply.reached:
                self.close()        # the RCPT's reply never came: out of step
            return reply, None
        if isinstance(rcpt, BaseException):
            return Reply(mail.code, mail.message, stage=MAIL), self._failed(rcpt, RCPT)
        if rcpt.code not in (250, 251):
            error = aiosmtplib.SMTPRecipientRefused(rcpt.code, rcpt.message, recipient)
            return Reply(mail.code, mail.message, stage=MAIL), self._failed(error, RCPT)
        return Reply(mail.code, mail.message, stage=MAIL), Reply(rcpt.code, rcpt.message, stage=RCPT)

    def _supported(self, option: str) -> bool:
        """Whether to pass on a MAIL FROM option our client gave us (SIZE is recomputed)."""
        assert self._smtp is not None
        name = option.split("=", 1)[0].upper()
        if option.upper() == "BODY=8BITMIME":
            return self._smtp.supports_extension("8bitmime")
        if name == "SMTPUTF8":
            return self._smtp.supports_extension("smtputf8")
        if name in ("RET", "ENVID"):
            return self._smtp.supports_extension("dsn")
        return False  # anything else was refused by our own listener

    async def rcpt(self, recipient: str, options: Iterable[str] = ()) -> Reply:
        """RCPT TO, with RFC 3461's NOTIFY and ORCPT when the server offers DSN."""
        assert self._smtp is not None
        if needs_smtputf8(recipient) and not self._utf8:
            return Reply(553, NEEDS_SMTPUTF8.format(host=self.primary.address.host), stage=RCPT)
        passed = self._dsn_options(options)
        try:
            with self._cut_off():
                response = await self._smtp.rcpt(recipient, options=passed, encoding="utf-8")
            return Reply(response.code, response.message, stage=RCPT)
        except (UnicodeError, aiosmtplib.SMTPException, OSError) as exc:
            return self._failed(exc, RCPT)

    def _dsn_options(self, options: Iterable[str]) -> list[str]:
        """RFC 3461's NOTIFY and ORCPT of a recipient, when the server offers DSN."""
        assert self._smtp is not None
        if not self._smtp.supports_extension("dsn"):
            return []
        return [o for o in options if o.split("=", 1)[0].upper() in ("NOTIFY", "ORCPT")]

    def _failed(self, exc: BaseException, step: str) -> Reply:
        """The Reply for a command that raised; a connection that is gone is closed. An address
        that could not be encoded needed SMTPUTF8: a permanent failure, never "not reached"."""
        if isinstance(exc, UnicodeError):
            return Reply(553, NEEDS_SMTPUTF8.format(host=self.primary.address.host), stage=step)
        self._lost = isinstance(exc, (aiosmtplib.SMTPServerDisconnected, ConnectionError)) or (
            isinstance(exc, aiosmtplib.SMTPResponseException) and exc.code == 421)
        reply = _translate(exc, step)
        if not reply.reached:
            self.close()
        return reply

    def _note_name(self) -> None:
        """The host name the server gave in its EHLO (or HELO) reply, for DSNs' Remote-MTA."""
        assert self._smtp is not None
        response = self._smtp.last_ehlo_response or self._smtp.last_helo_response
        words = response.message.split() if response is not None else []
        name = words[0] if words else ""
        if name and len(name) <= 255 and all(c.isalnum() or c in ".-" for c in name):
            self.server_name = name

    def offers(self, extension: str) -> bool:
        """Whether the connected server offered `extension` in its EHLO reply."""
        return self._smtp is not None and self._smtp.supports_extension(extension)

    async def start_data(self) -> Reply | None:
        """DATA ahead of the message: None once the server said 354 (then `data` sends the
        message, or `close` ends the DATA unsent), else the server's refusal, as `data` gives
        it (the transaction stays open on the server's side: the next `begin` says RSET)."""
        try:
            with self._cut_off():
                await self._open_data()
            return None
        except (aiosmtplib.SMTPException, OSError) as exc:
            return self._failed(exc, DATA)

    async def _open_data(self) -> None:
        """DATA and its 354, taking the command lock until the reply after the message."""
        if self._smtp is None:
            raise aiosmtplib.SMTPServerDisconnected("Connection lost")
        protocol, timeout = self._smtp.protocol, self._smtp.timeout
        if protocol is None or protocol._command_lock is None:
            raise aiosmtplib.SMTPServerDisconnected("Connection lost")
        lock = protocol._command_lock
        await lock.acquire()
        try:
            protocol._response_pending = True
            protocol.write(b"DATA\r\n")
            start = await protocol.read_response(timeout=timeout)
            if start.code != 354:
                raise aiosmtplib.SMTPDataError(start.code, start.message)
        except BaseException:
            lock.release()
            raise
        self._data_lock = lock

    async def data(self, message: Message, turn: Turn | None = None) -> Reply:
        """Send the message after DATA (sent here unless `start_data` did), its final dot once
        `turn` says so. Once the message went, the transaction is over whatever the answer; a
        DATA refused before it (no 354) leaves it open on the server (Postfix keeps it so),
        and the next `begin` says RSET. Held back by `turn`, the message is abandoned with its
        connection (a server commits nothing without the dot, RFC 5321 3.8), and `turn`'s
        Reply answers."""
        try:
            with self._cut_off():
                if self._data_lock is None:
                    await self._open_data()
                self._in_transaction = False
                response = await self._send_data(message, turn)
            if isinstance(response, Reply):
                self._release_data()
                self.close()
                return response
            return Reply(response.code, response.message, stage=DATA)
        except (aiosmtplib.SMTPException, OSError) as exc:     # a lost connection is closed
            return self._failed(exc, DATA)
        finally:
            self._release_data()

    def _release_data(self) -> None:
        lock, self._data_lock = self._data_lock, None
        if lock is not None and lock.locked():
            lock.release()

    async def _send_data(self, message: Message, turn: Turn | None) -> aiosmtplib.SMTPResponse | Reply:
        """The message a piece at a time after the server's 354, the final dot (see the
        module), under the command lock `_open_data` took; `turn`'s Reply when it held the
        dot back."""
        assert self._smtp is not None and self._data_lock is not None
        protocol, timeout = self._smtp.protocol, self._smtp.timeout
        if protocol is None:
            raise aiosmtplib.SMTPServerDisconnected("Connection lost")
        stuffer = DotStuffer()
        held: list[bytes] = []    # written once a CHUNK's worth is in hand: a small message
        size = 0                  # (our Received header, the body, the dot) is one write
        async for piece in _pieces(message):
            held.append(stuffer.feed(piece))
            size += len(held[-1])
            if size >= CHUNK:
                protocol.write(b"".join(held))
                held, size = [], 0
                await asyncio.wait_for(protocol._drain_helper(), timeout)
        tail = b"".join([*held, stuffer.end()])
        dot = _Dot(protocol)
        if turn is not None and not turn.due():     # the message goes now, its dot later
            protocol.write(tail)
            tail = b""
            turn.send_when_due(dot.send)
        if turn is not None and (waited := await turn.wait()) is not None:
            return waited
        if not dot.sent:
            dot.send(tail)
            if not dot.sent:
                raise aiosmtplib.SMTPServerDisconnected("Connection lost")
        response = await protocol.read_response(timeout=timeout)
        if response.code != 250:
            raise aiosmtplib.SMTPDataError(response.code, response.message)
        return response

    async def send(self, sender: str, rcpt: str, mail_options: list[str], data: Message,
                   rcpt_options: Iterable[str] = ()) -> Reply:
        """One whole transaction: MAIL, RCPT, DATA; the first reply that is not 2xx."""
        return (await self.send_many(sender, [(rcpt, tuple(rcpt_options))], mail_options, data))[0]

    async def send_many(self, sender: str, rcpts: list[tuple[str, tuple[str, ...]]],
                        mail_options: list[str], data: Message,
                        turn: Turn | None = None) -> list[Reply]:
        """One transaction for several recipients (each with its RCPT options), as Postfix
        sends one copy a destination: each recipient's reply, its RCPT's when refused, else
        DATA's. MAIL refused, or the connection lost, answers the rest the same way.

        `turn`, when given, holds the message's final dot (`Upstream.data`): the replay
        runner holds a message there until the one before it in line was answered. A Reply it
        returns answers the accepted recipients instead, and the message is abandoned.

        To a server that offers PIPELINING the commands go as one group (`_send_grouped`)."""
        grouped = await self._send_grouped(sender, rcpts, mail_options, data, turn)
        if grouped is not None:
            return grouped
        reply = await self.begin(sender, mail_options, size=len(data), rcpts=[r for r, _ in rcpts])
        if not reply.ok:
            return [reply] * len(rcpts)
        replies: list[Reply] = []
        for rcpt, options in rcpts:
            reply = await self.rcpt(rcpt, options)
            replies.append(reply)
            if not reply.reached:
                return replies + [reply] * (len(rcpts) - len(replies))
        if not any(r.ok for r in replies):
            return replies          # the transaction stays open: the next `begin` says RSET
        final = await self.data(data, turn)
        return [final if r.ok else r for r in replies]

    # -- a whole transaction as one group (RFC 2920): replay and the smarthost ----------------

    async def _send_grouped(self, sender: str, rcpts: list[tuple[str, tuple[str, ...]]],
                            mail_options: list[str], data: Message, turn: Turn | None,
                            ) -> list[Reply] | None:
        """`send_many` with (RSET,) MAIL, every RCPT and DATA in one write, then the message
        after the 354: two round trips a message where one at a time takes three and one a
        recipient, and one write of commands where it takes as many. Every reply is read in
        order and means what it means one at a time. None when the transaction must go one
        at a time: a server without PIPELINING, a command that path answers or sends
        differently (SMTPUTF8, an address it cannot send), or a reused connection found gone
        at MAIL (one at a time, `begin` tries a new connection once)."""
        reused = self.connected
        failed = await self._open()
        if failed is not None:
            return [failed] * len(rcpts)
        rset = self._in_transaction     # an open one (refused recipients) is reset first
        group = self._group_commands(sender, rcpts, mail_options, len(data), rset)
        if group is None:
            return None
        with self._cut_off():
            replies, error = await self._write_group(group)
        self._in_transaction = True
        lost = error or aiosmtplib.SMTPServerDisconnected("Connection lost")
        for step in ("RSET", MAIL) if rset else (MAIL,):
            if not replies:
                return self._group_refused(self._failed(lost, step), reused, len(rcpts), True)
            if step == "RSET" and (reset := replies.pop(0)).code != 250:
                refused = self._failed(aiosmtplib.SMTPResponseException(reset.code, reset.message), step)
                return self._group_refused(refused, reused, len(rcpts), True)
        mail = replies.pop(0)
        if mail.code != 250:
            refused = self._failed(aiosmtplib.SMTPSenderRefused(mail.code, mail.message, sender), MAIL)
            return self._group_refused(refused, reused, len(rcpts), error is not None)
        return await self._group_answers(rcpts, replies, error, data, turn)

    def _group_commands(self, sender: str, rcpts: list[tuple[str, tuple[str, ...]]],
                        mail_options: list[str], size: int, rset: bool) -> bytes | None:
        """The group's commands as aiosmtplib's `rset`, `mail`, `rcpt` and DATA send them, or
        None (see `_send_grouped`). At most `GROUP_RCPTS` recipients: `_Pipelining` keeps the
        replies behind the first within aiosmtplib's limit on one reply's length."""
        assert self._smtp is not None
        if (not self._smtp.supports_extension("pipelining") or len(rcpts) > GROUP_RCPTS
                or not isinstance(self._smtp.protocol, _Pipelining)
                or needs_smtputf8(sender, *(r for r, _ in rcpts))
                or any(o.upper() == "SMTPUTF8" for o in mail_options)):
            return None
        options = [o for o in mail_options if self._supported(o)]
        if size and self._smtp.supports_extension("size"):
            options.append(f"SIZE={size}")
        self._utf8 = False
        try:
            commands = [[b"MAIL", b"FROM:" + quote_address(sender).encode("ascii"),
                         *(o.encode("ascii") for o in options)]]
            commands += [[b"RCPT", b"TO:" + quote_address(rcpt).encode("ascii"),
                          *(o.encode("ascii") for o in self._dsn_options(rcpt_options))]
                         for rcpt, rcpt_options in rcpts]
        except UnicodeError:
            return None
        if any(COMMAND_INJECTION_REGEX.search(arg) for command in commands for arg in command):
            return None
        lines = [b"RSET"] * rset + [b" ".join(c) for c in commands] + [b"DATA"]
        return b"\r\n".join(lines) + b"\r\n"

    async def _write_group(self, commands: bytes,
                           ) -> tuple[list[aiosmtplib.SMTPResponse], BaseException | None]:
        """Write the group and read its replies in order, one a line written, until the first
        that cannot be read (the error then). A 354 to its DATA keeps the command lock, for
        `data` to send the message under (as `_open_data`)."""
        assert self._smtp is not None
        protocol, timeout = self._smtp.protocol, self._smtp.timeout
        if not isinstance(protocol, _Pipelining) or protocol._command_lock is None:
            return [], aiosmtplib.SMTPServerDisconnected("Connection lost")
        lock = protocol._command_lock
        await lock.acquire()
        replies: list[aiosmtplib.SMTPResponse] = []
        error: BaseException | None = None
        expected = commands.count(b"\r\n")
        try:
            protocol._response_pending = True
            protocol.write(commands)
            with protocol.group():
                for _ in range(expected):
                    try:
                        replies.append(await protocol.next_reply(timeout))
                    except (aiosmtplib.SMTPException, OSError) as exc:
                        error = exc
                        break
        finally:
            if len(replies) == expected and replies[-1].code == 354:
                self._data_lock = lock
            else:
                lock.release()
        return replies, error

    def _group_refused(self, reply: Reply, reused: bool, count: int, out_of_step: bool) -> list[Reply] | None:
        """MAIL (or the RSET before it) refused or unanswered: its Reply for every recipient.
        The RCPTs' and DATA's replies were read to stay in step (their 503s); a group not read
        to its end, or a DATA the server took anyway (354), leaves the connection out of
        step: closed. A reused connection found gone: None, one at a time tries a new one."""
        if out_of_step or self._data_lock is not None:
            self.close()
        if reused and self._lost:
            self.close()
            return None
        return [reply] * count

    async def _group_answers(self, rcpts: list[tuple[str, tuple[str, ...]]],
                             replies: list[aiosmtplib.SMTPResponse], error: BaseException | None,
                             data: Message, turn: Turn | None) -> list[Reply]:
        """MAIL was taken: each RCPT's reply, then DATA's for the accepted recipients (the
        message's, once it said 354), as one at a time answers them."""
        answers: list[Reply] = []
        for rcpt, _ in rcpts:
            if not replies:
                lost = error or aiosmtplib.SMTPServerDisconnected("Connection lost")
                reply = self._failed(lost, RCPT)
                return answers + [reply] * (len(rcpts) - len(answers))
            got = replies.pop(0)
            if got.code in (250, 251):
                answers.append(Reply(got.code, got.message, stage=RCPT))
                continue
            reply = self._failed(aiosmtplib.SMTPRecipientRefused(got.code, got.message, rcpt), RCPT)
            answers.append(reply)
            if not reply.reached:
                return answers + [reply] * (len(rcpts) - len(answers))
        if not any(r.ok for r in answers):
            if error is not None or self._data_lock is not None:
                self.close()        # the DATA went unanswered, or the server took it anyway
            return answers          # the transaction stays open: the next group says RSET
        if not replies:
            final = self._failed(error or aiosmtplib.SMTPServerDisconnected("Connection lost"), DATA)
        elif self._data_lock is None:   # DATA refused: the transaction stays open, as one at a time
            start = replies[0]
            final = self._failed(aiosmtplib.SMTPDataError(start.code, start.message), DATA)
        else:
            final = await self.data(data, turn)
        return [final if r.ok else r for r in answers]

    async def quit(self) -> None:
        """Say goodbye politely; a primary that does not answer is simply dropped. Inside a
        DATA whose message is on its way this waits for its reply (the command lock)."""
        try:
            if self.connected:
                assert self._smtp is not None
                await self._smtp.quit(timeout=5)
        except (aiosmtplib.SMTPException, OSError):
            pass  # closing anyway; nothing is lost by an unanswered QUIT
        finally:
            self.close()    # also when cancelled waiting for the 221 (a shutdown): no socket left

    def close(self) -> None:
        """Drop the connection (a DATA started and not sent is discarded by the server)."""
        self._release_data()
        if self._smtp is not None:
            self._smtp.close()
            self._smtp = None
        self._in_transaction = False


class _Dot:
    """A message's final dot (after what is left of its text), written once, with the reply
    it brings expected; on a connection already gone it is not written (`sent` stays False)."""

    def __init__(self, protocol: SMTPProtocol) -> None:
        self.protocol = protocol
        self.sent = False

    def send(self, tail: bytes = b"") -> None:
        if self.sent or self.protocol.transport is None or self.protocol.transport.is_closing():
            return
        self.protocol._response_pending = True
        self.protocol.write(tail + b".\r\n")
        self.sent = True


class _Pipelining(SMTPProtocol):
    """aiosmtplib's protocol, reading pipelined groups too (RFC 2920). Alone, it expects one
    reply per command written and drops data that arrives while a parsed reply waits to be
    picked up (it could only be paired with the wrong command). Inside a `group` the replies
    behind the first are expected: they are kept in the buffer, up to aiosmtplib's limit on a
    reply, and `next_reply` takes each in turn."""

    _grouped = False

    def data_received(self, data: bytes) -> None:
        waiter = self._response_waiter
        if (self._grouped and waiter is not None and waiter.done()
                and len(self._buffer) + len(data) <= MAX_RESPONSE_LENGTH):
            self._buffer.extend(data)       # the next reply of the group, read by next_reply
            return
        super().data_received(data)

    @contextlib.contextmanager
    def group(self) -> Iterator[None]:
        """While a group's replies are read; what is left after it was never asked for."""
        self._grouped = True
        try:
            yield
        finally:
            self._grouped = False
            del self._buffer[:]

    async def read_response(self, timeout: float | None = None) -> aiosmtplib.SMTPResponse:
        """aiosmtplib's, with `asyncio.timeout` for its `wait_for`: in Python 3.11 `wait_for`
        wakes its caller through a future of its own, a loop iteration more for every reply
        (four a passed message)."""
        if self._response_waiter is None:
            raise aiosmtplib.SMTPServerDisconnected("Connection lost")
        self._response_pending = True
        deadline = asyncio.timeout(timeout)
        try:
            async with deadline:
                return await self._response_waiter
        except TimeoutError as exc:
            if not deadline.expired():
                raise
            raise aiosmtplib.SMTPReadTimeoutError("Timed out waiting for server response") from exc
        finally:
            self._response_pending = False
            self._response_waiter = None if self.transport is None else self._loop.create_future()

    async def next_reply(self, timeout: float | None) -> aiosmtplib.SMTPResponse:
        """The next reply: the one parsed and waiting, else one already in the buffer (it came
        behind the one before), else the next to arrive."""
        waiter = self._response_waiter
        if waiter is not None and not waiter.done():
            ready = self._read_response_from_buffer()
            if ready is not None:
                return ready
        return await self.read_response(timeout=timeout)


def _crlf(text: bytes) -> bytes:
    """Every line end of `text` a CRLF; counted first, since a message from the inbound spool
    already has only CRLFs (server.py), and counting is cheaper than the substitution."""
    crlf = text.count(b"\r\n")
    if text.count(b"\r") == crlf and text.count(b"\n") == crlf:
        return text
    return _LINE_END.sub(b"\r\n", text)


class DotStuffer:
    """A message's bytes as DATA sends them, fed a piece at a time: every line ending CRLF
    (a lone CR or LF made one), a dot at the start of a line doubled, CRLF at the end."""

    def __init__(self) -> None:
        self._at_line_start = True
        self._held = b""            # a CR at the end of a piece: its LF may open the next
        self._last = b""

    def feed(self, piece: bytes) -> bytes:
        text = self._held + piece
        self._held = b""
        if text.endswith(b"\r"):
            text, self._held = text[:-1], b"\r"
        return self._stuff(_crlf(text))

    def end(self) -> bytes:
        """What is left, and the CRLF a message must end with (before the final dot)."""
        tail = self._stuff(_LINE_END.sub(b"\r\n", self._held))
        self._held = b""
        return tail if self._last.endswith(b"\n") else tail + b"\r\n"

    def _stuff(self, text: bytes) -> bytes:
        if not text:
            return text
        out = text.replace(b"\n.", b"\n..")
        if self._at_line_start and out.startswith(b"."):
            out = b"." + out
        self._at_line_start = out.endswith(b"\n")
        self._last = out[-2:]
        return out


async def _pieces(message: Message) -> AsyncIterator[bytes]:
    if isinstance(message, MessageFile):
        async for piece in message.achunks():
            yield piece
        return
    view = memoryview(message)
    for start in range(0, len(view), CHUNK):
        yield bytes(view[start:start + CHUNK])


async def probe(primary: Peer, helo: str) -> Reply:
    """Is the primary taking mail? Connect, EHLO (and STARTTLS as configured), QUIT."""
    upstream = Upstream(primary, helo)
    try:
        return await upstream._open() or Reply(250, "probe ok", stage=CONNECT)
    finally:
        await upstream.quit()


class _NoTLS(Exception):
    """Credentials would have gone out in clear: the connection is dropped instead."""
