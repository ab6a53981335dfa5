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
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import aiosmtplib

from relay.config import HostPort
from relay.storage.incoming import CHUNK, MessageFile

Message = bytes | MessageFile
_LINE_END = re.compile(rb"\r\n|\n|\r(?!\n)")     # aiosmtplib's LINE_ENDINGS_REGEX

# The stages of a conversation, as `Reply.stage` names them.
CONNECT, EHLO, MAIL, RCPT, DATA = "connect", "EHLO", "MAIL", "RCPT", "DATA"
_SERVER_STAGES = (CONNECT, EHLO, MAIL)



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
        reused = self.connected
        with self._cut_off():
            reply = await self._begin(sender, mail_options, size, list(rcpts))
            if reused and self._lost:
                self.close()
                reply = await self._begin(sender, mail_options, size, list(rcpts))
        return reply

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
                     rcpts: list[str]) -> Reply:
        self._lost = False
        failed = await self._open()
        if failed is not None:
            return failed
        assert self._smtp is not None
        utf8 = needs_smtputf8(sender, *rcpts) or any(o.upper() == "SMTPUTF8" for o in mail_options)
        if needs_smtputf8(sender, *rcpts) and not self._smtp.supports_extension("smtputf8"):
            return Reply(553, NEEDS_SMTPUTF8.format(host=self.primary.address.host), stage=MAIL)
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
            response = await self._smtp.mail(sender, options=options,
                                             encoding="utf-8" if self._utf8 else "ascii")
            self._in_transaction = True
            return Reply(response.code, response.message, stage=MAIL)
        except (UnicodeError, aiosmtplib.SMTPException, OSError) as exc:
            return self._failed(exc, step)

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
        wanted = [o for o in options if o.split("=", 1)[0].upper() in ("NOTIFY", "ORCPT")]
        passed = wanted if self._smtp.supports_extension("dsn") else []
        try:
            with self._cut_off():
                response = await self._smtp.rcpt(recipient, options=passed, encoding="utf-8")
            return Reply(response.code, response.message, stage=RCPT)
        except (UnicodeError, aiosmtplib.SMTPException, OSError) as exc:
            return self._failed(exc, RCPT)

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

    async def data(self, message: Message, turn: Turn | None = None) -> Reply:
        """Send the message, its final dot once `turn` says so; the transaction is over
        whatever the answer. Held back by `turn`, the message is abandoned with its connection
        (a server commits nothing without the dot, RFC 5321 3.8), and `turn`'s Reply answers."""
        assert self._smtp is not None
        try:
            with self._cut_off():
                response = await self._send_data(message, turn)
            if isinstance(response, Reply):
                self.close()
                return response
            return Reply(response.code, response.message, stage=DATA)
        except (aiosmtplib.SMTPException, OSError) as exc:     # a lost connection is closed
            return self._failed(exc, DATA)
        finally:
            self._in_transaction = False

    async def _send_data(self, message: Message, turn: Turn | None) -> aiosmtplib.SMTPResponse | Reply:
        """DATA, the message a piece at a time, the final dot (see the module); `turn`'s
        Reply when it held the dot back."""
        assert self._smtp is not None
        protocol, timeout = self._smtp.protocol, self._smtp.timeout
        if protocol is None or protocol._command_lock is None:
            raise aiosmtplib.SMTPServerDisconnected("Connection lost")
        async with protocol._command_lock:
            protocol._response_pending = True
            protocol.write(b"DATA\r\n")
            start = await protocol.read_response(timeout=timeout)
            if start.code != 354:
                raise aiosmtplib.SMTPDataError(start.code, start.message)
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
            if turn is not None and not turn.due():     # the message goes now, its dot later
                protocol.write(tail)
                tail = b""
            if turn is not None and (waited := await turn.wait()) is not None:
                return waited
            protocol._response_pending = True
            protocol.write(tail + b".\r\n")
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
        returns answers the accepted recipients instead, and the message is abandoned."""
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

    async def quit(self) -> None:
        """Say goodbye politely; a primary that does not answer is simply dropped."""
        if self.connected:
            assert self._smtp is not None
            try:
                await self._smtp.quit(timeout=5)
            except (aiosmtplib.SMTPException, OSError):
                pass  # closing anyway; nothing is lost by an unanswered QUIT
        self.close()

    def close(self) -> None:
        if self._smtp is not None:
            self._smtp.close()
            self._smtp = None
        self._in_transaction = False


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
        return self._stuff(_LINE_END.sub(b"\r\n", text))

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
