"""SMTP conversations with other servers (a domain's primary, the smarthost), with aiosmtplib
kept behind this line.

Every outcome comes back as a `Reply`: the server's own code and text, or, when it could not be
reached (refused, timeout, dropped at any step, TLS or AUTH failure), a synthetic 4xx with
`reached=False`. Nothing above this module imports aiosmtplib or sees its exceptions.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import aiosmtplib

from relay.config import HostPort

log = logging.getLogger("relay.client")


@dataclass(frozen=True)
class Reply:
    code: int
    text: str
    reached: bool = True

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 300

    @property
    def permanent(self) -> bool:
        return 500 <= self.code < 600

    @property
    def temporary(self) -> bool:
        return not self.ok and not self.permanent


def _translate(exc: BaseException, step: str) -> Reply:
    """aiosmtplib's exceptions -> Reply; anything without a code counts as not reached."""
    if isinstance(exc, aiosmtplib.SMTPResponseException) and 400 <= exc.code < 600:
        if exc.code == 421:  # the server is closing the connection: it is going away
            return Reply(exc.code, exc.message, reached=False)
        return Reply(exc.code, exc.message)
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        reason = f"timeout during {step}"
    elif isinstance(exc, ssl.SSLError):
        reason = f"TLS failure during {step}"
    else:
        reason = f"connection failed during {step}"
    return Reply(451, reason, reached=False)


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

    @property
    def connected(self) -> bool:
        return self._smtp is not None and self._smtp.is_connected

    async def _connect(self) -> None:
        p = self.primary
        start_tls = {"off": False, "opportunistic": None, "required": True}[p.starttls]
        self._smtp = aiosmtplib.SMTP(
            hostname=p.address.host, port=p.address.port, local_hostname=self.helo,
            timeout=p.timeout, start_tls=start_tls, validate_certs=p.verify_cert,
            cert_bundle=str(p.ca_file) if p.ca_file else None)
        await self._smtp.connect(timeout=p.connect_timeout)
        if self.credentials is not None:
            await self._smtp.login(*self.credentials)
        self._in_transaction = False

    async def begin(self, sender: str, mail_options: list[str], size: int | None = None) -> Reply:
        """Connect if needed and send MAIL FROM; a failure closes the connection."""
        step = "connect"
        try:
            if not self.connected:
                await self._connect()
            assert self._smtp is not None
            if self._in_transaction:
                step = "RSET"
                await self._smtp.rset()
            step = "MAIL FROM"
            options = [o for o in mail_options if self._supported(o)]
            if size and self._smtp.supports_extension("size"):
                options.append(f"SIZE={size}")
            utf8 = "SMTPUTF8" in options
            response = await self._smtp.mail(sender, options=options,
                                             encoding="utf-8" if utf8 else "ascii")
            self._in_transaction = True
            return Reply(response.code, response.message)
        except (aiosmtplib.SMTPException, OSError, UnicodeError) as exc:
            reply = _translate(exc, step)
            if not reply.reached:
                self.close()
            return reply

    def _supported(self, option: str) -> bool:
        assert self._smtp is not None
        if option.upper() == "BODY=8BITMIME":
            return self._smtp.supports_extension("8bitmime")
        if option.upper() == "SMTPUTF8":
            return self._smtp.supports_extension("smtputf8")
        return False  # SIZE is recomputed; anything else was refused by our own listener

    async def rcpt(self, recipient: str) -> Reply:
        assert self._smtp is not None
        try:
            response = await self._smtp.rcpt(recipient, encoding="utf-8")
            return Reply(response.code, response.message)
        except (aiosmtplib.SMTPException, OSError, UnicodeError) as exc:
            reply = _translate(exc, "RCPT TO")
            if not reply.reached:
                self.close()
            return reply

    async def data(self, message: bytes) -> Reply:
        """Send the message; the transaction is over whatever the answer."""
        assert self._smtp is not None
        try:
            response = await self._smtp.data(message)
            return Reply(response.code, response.message)
        except (aiosmtplib.SMTPException, OSError) as exc:
            reply = _translate(exc, "DATA")
            if not reply.reached:
                self.close()
            return reply
        finally:
            self._in_transaction = False

    async def send(self, sender: str, rcpt: str, mail_options: list[str], data: bytes) -> Reply:
        """One whole transaction: MAIL, RCPT, DATA; the first reply that is not 2xx."""
        reply = await self.begin(sender, mail_options, size=len(data))
        if reply.ok:
            reply = await self.rcpt(rcpt)
        if reply.ok:
            reply = await self.data(data)
        return reply

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


async def probe(primary: Peer, helo: str) -> Reply:
    """Is the primary taking mail? Connect, EHLO (and STARTTLS as configured), QUIT."""
    upstream = Upstream(primary, helo)
    try:
        await upstream._connect()
        return Reply(250, "probe ok")
    except (aiosmtplib.SMTPException, OSError) as exc:
        return _translate(exc, "probe")
    finally:
        await upstream.quit()
