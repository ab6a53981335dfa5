"""The SMTP server protocol both listeners share: aiosmtpd's `SMTP`, plus what real MTAs expect.

    - EHLO also offers PIPELINING (aiosmtpd reads commands from a buffer, so a pipelined group
      works as it is), ENHANCEDSTATUSCODES and DSN.
    - Every reply carries an enhanced status code (RFC 2034), aiosmtpd's own built-in replies
      ("503 Error: need RCPT command", "552 Error: Too much mail data") included: `push()` adds
      one by the basic code where the text has none. The greeting and the replies to EHLO and
      HELO carry none, as RFC 2034 says; 3xx replies have no enhanced codes at all.
    - RFC 3461 (DSN): aiosmtpd refuses every parameter it does not know with 555, so RET= and
      ENVID= (MAIL) and NOTIFY= and ORCPT= (RCPT) are taken off the command before aiosmtpd
      sees it, checked, and kept with their case (ENVID and ORCPT are case-sensitive xtext):
      MAIL's go into `envelope.mail_options`; a RCPT's are `envelope.next_rcpt_options` while
      its hook runs and `envelope.rcpt_params[address]` once it was accepted.
    - `received_header()` writes our Received line, naming the protocol as RFC 3848 and
      RFC 6531 do (ESMTPSA, UTF8SMTPS...).
    - DATA streams into a file of the incoming spool (storage/incoming.py) as it arrives,
      instead of aiosmtpd's list of lines (a message of at most 256 KiB stays in memory and
      never makes a file): `envelope.spooled` is the message (a MessageFile)
      while the DATA hook runs. A handler that says `takes_spooled = True` reads it from there;
      any other gets `envelope.content` as bytes, as aiosmtpd gives it. The reading is
      aiosmtpd 1.4.6's own, line for line, and the same rules for a block of the whole lines
      already received (`_buffered_lines`: no await a line), so its defences against SMTP
      smuggling (CVE-2024-27305) hold: only CRLF "." CRLF ends the data (a bare LF or CR is content,
      never a line end), a leading dot is removed only after CRLF, a line over the limit gives
      500 and more than `data_size_limit` bytes 552, both after the data, with the file
      already gone; so does a spool file that cannot be written (disk full: 451), so the rest
      of the data is never read as commands. The file is removed once the hook and whoever
      it handed the message to (`MessageFile.hold`) are done.
    - Once a line is read, a bare LF or a bare CR in it becomes CRLF, as Postfix's
      `smtpd_forbid_bare_newline = normalize` does for LF (and does not for CR: see README,
      "Where we differ"): the primary, the continuity copy, the archive and the spam filter
      all get the same lines, the ones an SMTP client sends on (aiosmtplib, our own DATA
      writer), so what a user reads over IMAP is what reaches the primary on replay. A line
      that starts with a dot after a bare line end is text: its dot is kept (the sender did
      not stuff it), and the DATA writer stuffs it on the way out.
"""

from __future__ import annotations

import asyncio
import email.utils
import functools
import logging
import os
import re
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from aiosmtpd.smtp import MISSING, SMTP, Envelope, Session

from relay.log import event
from relay.smtp import replies
from relay.storage.incoming import CHUNK, Incoming, MessageFile, write_all

_T = TypeVar("_T")
EXTENSIONS = ("PIPELINING", "ENHANCEDSTATUSCODES", "DSN")

MAIL_DSN = ("RET", "ENVID")
RCPT_DSN = ("NOTIFY", "ORCPT")
MAX_ENVID = 100        # RFC 3461 4.4
MAX_ORCPT = 500        # RFC 3461 4.2: the address part, generously
_XTEXT = re.compile(r"(?:[!-*,-<>-~]|\+[0-9A-F]{2})+")     # RFC 3461 4: xchar or "+" HEXCHAR
_ADDR_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
_NOTIFY = frozenset({"SUCCESS", "FAILURE", "DELAY"})
_CODE_LINE = re.compile(r"^([245])(\d\d)([ -])(.*)$", re.S)
_HAS_ENHANCED = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}(?: |$)")

# The enhanced code for a reply that has none, by its basic code; else the class's x.0.0.
ENHANCED_FOR = {
    "221": "2.0.0", "235": "2.7.0", "250": "2.0.0", "220": "2.0.0",
    "421": "4.3.0", "450": "4.2.0", "451": "4.3.0", "452": "4.3.1", "454": "4.7.0",
    "500": "5.5.2", "501": "5.5.4", "502": "5.5.1", "503": "5.5.1", "504": "5.5.4",
    "530": "5.7.0", "534": "5.7.9", "535": "5.7.8", "538": "5.7.11", "550": "5.0.0",
    "552": "5.3.4", "553": "5.1.3", "554": "5.7.0", "555": "5.5.4",
}

_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_PLAIN_PATH = re.compile(rf"<({_ATOM}(?:\.{_ATOM})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)>"
                         r"(?:[ \t]+([^\s(][^\r\n]*)?)?\Z")
_BARE_LINE_END = re.compile(rb"\r\n|\n|\r(?!\n)")   # each line end, as aiosmtplib sees them


class RelayEnvelope(Envelope):
    """aiosmtpd's envelope plus the DSN parameters of each accepted recipient."""

    def __init__(self) -> None:
        super().__init__()
        self.next_rcpt_options: list[str] = []           # the RCPT being handled now
        self.rcpt_params: dict[str, tuple[str, ...]] = {}
        self.spooled: MessageFile | None = None          # while the DATA hook runs
        self.has_nul = False                             # the spooled message holds a NUL


def with_enhanced_code(reply: str) -> str:
    """`reply` (one or more CRLF-separated lines) with an enhanced status code on every line."""
    lines = []
    for line in reply.split("\r\n"):
        match = _CODE_LINE.match(line)
        if match and not _HAS_ENHANCED.match(match.group(4)):
            code = match.group(1) + match.group(2)
            enhanced = ENHANCED_FOR.get(code, f"{match.group(1)}.0.0")
            line = f"{code}{match.group(3)}{enhanced} {match.group(4)}".rstrip()
        lines.append(line)
    return "\r\n".join(lines)


def take_params(arg: str, names: tuple[str, ...]) -> tuple[str, dict[str, str]]:
    """(`arg` without the ESMTP parameters called `names`, those parameters by upper-case name).

    Parameters follow the path: after its closing `>`, or after the first word when the client
    sent a bare address. A name given twice raises ValueError."""
    close = arg.rfind(">")
    if close == -1:
        head, _, tail = arg.strip().partition(" ")
    else:
        head, tail = arg[: close + 1], arg[close + 1 :]
    kept, found = [], {}
    for word in tail.split():
        name, eq, value = word.partition("=")
        if name.upper() in names and eq:
            if name.upper() in found:
                raise ValueError(f"{name.upper()} given twice")
            found[name.upper()] = value
        else:
            kept.append(word)
    return " ".join([head, *kept]), found


def check_mail_dsn(params: dict[str, str]) -> list[str]:
    """RET= and ENVID= as MAIL FROM options to pass on; ValueError when malformed."""
    options = []
    if "RET" in params:
        if params["RET"].upper() not in ("FULL", "HDRS"):
            raise ValueError("RET must be FULL or HDRS")
        options.append(f"RET={params['RET'].upper()}")
    if "ENVID" in params:
        envid = params["ENVID"]
        if len(envid) > MAX_ENVID or not _XTEXT.fullmatch(envid):
            raise ValueError("ENVID must be xtext of at most 100 characters")
        options.append(f"ENVID={envid}")
    return options


def check_rcpt_dsn(params: dict[str, str]) -> list[str]:
    """NOTIFY= and ORCPT= as RCPT TO options to pass on; ValueError when malformed."""
    options = []
    if "NOTIFY" in params:
        words = [w.upper() for w in params["NOTIFY"].split(",")]
        if words != ["NEVER"] and not (words and set(words) <= _NOTIFY and len(set(words)) == len(words)):
            raise ValueError("NOTIFY must be NEVER, or one or more of SUCCESS, FAILURE, DELAY")
        options.append("NOTIFY=" + ",".join(words))
    if "ORCPT" in params:
        kind, semi, address = params["ORCPT"].partition(";")
        if not semi or not _ADDR_TYPE.fullmatch(kind) or len(address) > MAX_ORCPT \
                or not _XTEXT.fullmatch(address):
            raise ValueError("ORCPT must be addr-type;xtext")
        options.append(f"ORCPT={kind};{address}")
    return options


@functools.cache
def hook_names(cls: type) -> list[str]:
    """The smtp_, auth_ and handle_ names of `cls`, as dir() lists them."""
    return [name for name in dir(cls) if name.startswith(("smtp_", "auth_", "handle_"))]


class FewNames:
    """dir() of this object is only its smtp_, auth_ and handle_ methods, found once per class.

    aiosmtpd's `SMTP.__init__` builds its command, AUTH and hook tables on every connection with
    `dir()` and `inspect.getmembers()` over the protocol and the handler, touching every
    attribute: 225 us a connection, a tenth of the event loop's time when passing mail
    through (bench/README.md). The tables only take names with those prefixes, so they come
    out the same (tests/unit/test_smtp_server.py compares them with plain dir()'s)."""

    def __dir__(self) -> list[str]:
        return hook_names(type(self))


class RelaySMTP(FewNames, SMTP):
    """aiosmtpd's SMTP protocol with PIPELINING, ENHANCEDSTATUSCODES and DSN (see the module)."""

    def __init__(self, *args, incoming: Incoming | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._greeted = False
        self._plain_replies = False    # answering EHLO or HELO: no enhanced codes
        self._held: list[str] = []     # lines of a multi-line reply not written yet (push)
        self.incoming = incoming or _default_incoming()

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """aiosmtpd's, with a fast path for the common `<local@domain> PARAMS`: its parser (the
        email package's) costs about 40 us an address. The fast path takes only a dot-atom
        address in angle brackets, which that parser gives back as it is, and leaves the rest
        (comments, quoted or UTF-8 local parts, source routes, odd spacing) to it;
        tests/unit/test_smtp_server.py checks the two agree. An address its parser trips on
        (`0@`, `<a@[1.2.3.4>`: IndexError, AttributeError) is malformed (553), not a 500 that
        names the fault."""
        match = _PLAIN_PATH.match(arg)
        if match is None:
            try:
                return SMTP._getaddr(self, arg)
            except (IndexError, AttributeError):
                return None, None
        address = match[1]
        if self.local_part_limit and len(address.rpartition("@")[0]) > self.local_part_limit:
            return None, None
        return address, match[2] or ""

    def _create_envelope(self) -> Envelope:
        return RelayEnvelope()

    async def push(self, status) -> None:
        """Our extensions and enhanced codes added; the lines of a multi-line reply (EHLO's
        dozen) held back and written with its last line, in one write: the client reads none
        of them before that one, and each write is a send(2), and a wake-up of the client."""
        if isinstance(status, str):
            if not self._greeted and status.startswith("220"):
                self._greeted = True
            elif self._plain_replies:
                if status == "250 HELP":
                    self._held.extend(f"250-{extension}" for extension in EXTENSIONS)
            else:
                status = with_enhanced_code(status)
            if status.rpartition("\n")[2][3:4] == "-":
                self._held.append(status)
                return
            if self._held:
                status = "\r\n".join((*self._held, status))
                self._held.clear()
        await super().push(status)

    async def smtp_EHLO(self, hostname: str) -> None:
        self._plain_replies = True
        try:
            await super().smtp_EHLO(hostname)
        finally:
            self._plain_replies = False

    async def smtp_HELO(self, hostname: str) -> None:
        self._plain_replies = True
        try:
            await super().smtp_HELO(hostname)
        finally:
            self._plain_replies = False

    async def _take_dsn(self, arg: str | None, names: tuple[str, ...],
                        check: Callable[[dict[str, str]], list[str]]) -> tuple[str | None, list[str]] | None:
        """(`arg` without the DSN parameters `names`, those checked), or None once a malformed
        one was answered with 501. Only ESMTP sessions take parameters at all."""
        if not arg or self.session is None or not self.session.extended_smtp:
            return arg, []
        try:
            arg, params = take_params(arg, names)
            return arg, check(params)
        except ValueError as exc:
            await self.push(replies.BAD_PARAMETER.format(reason=exc))
            return None

    async def smtp_MAIL(self, arg: str | None) -> None:
        taken = await self._take_dsn(arg, MAIL_DSN, check_mail_dsn)
        if taken is None:
            return
        arg, dsn = taken
        await super().smtp_MAIL(arg)
        envelope = self.envelope
        if dsn and envelope is not None and envelope.mail_from is not None:
            envelope.mail_options.extend(dsn)

    async def smtp_RCPT(self, arg: str | None) -> None:
        envelope = self.envelope
        taken = await self._take_dsn(arg, RCPT_DSN, check_rcpt_dsn)
        if taken is None:
            return
        arg, dsn = taken
        if not isinstance(envelope, RelayEnvelope):
            await super().smtp_RCPT(arg)
            return
        before = len(envelope.rcpt_tos)
        envelope.next_rcpt_options = dsn
        try:
            await super().smtp_RCPT(arg)
        finally:
            envelope.next_rcpt_options = []
        for address in envelope.rcpt_tos[before:]:
            envelope.rcpt_params[address] = tuple(dsn)


    async def smtp_DATA(self, arg: str) -> None:
        """aiosmtpd's DATA (see the module), streamed into the incoming spool."""
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        spool = _Spool(self.incoming)
        message: MessageFile | None = None
        try:
            self._starting_data()
            await self.push("354 End data with <CR><LF>.<CR><LF>")
            refusal, nul = await self._receive(spool)
            if refusal is not None:
                await spool.discard()
                if self.transport is not None:
                    await self.push(refusal)
                self._set_post_data_state()
                return
            try:
                message = await spool.finish()
            except OSError as exc:
                event("smtp.spool_failed", logging.ERROR, error=exc.strerror or exc)
                await self.push(replies.LOCAL_ERROR)
                self._set_post_data_state()
                return
            await self._hand_over(message, nul)
        finally:
            if message is None:
                await asyncio.shield(spool.discard())
            elif message.path is not None:
                await asyncio.shield(asyncio.to_thread(message.release))

    def _starting_data(self) -> None:
        """DATA is taken, the 354 about to go: a subclass's moment to start its own work on
        the message (the inbound listener sends the primary its DATA)."""

    async def _receive(self, spool: _Spool) -> tuple[str | None, bool]:
        """Read DATA up to the lone dot into `spool`: (the refusal, or None; NUL seen).
        aiosmtpd's loop, line for line, written in chunks of `CHUNK` from a worker thread."""
        size, nul, refusal, ended = 0, False, None, False
        limit = self.data_size_limit
        pending = bytearray()
        fragments: list[bytes] = []
        while self.transport is not None:
            try:
                line = await self._reader.readuntil(b"\r\n")
            except asyncio.CancelledError:
                self._writer.close()            # the connection went during DATA
                raise
            except asyncio.LimitOverrunError as exc:
                refusal = refusal or "500 Line too long (see RFC5321 4.5.3.1.6)"
                pending.clear()
                line = await self._reader.read(exc.consumed)
            if not fragments and line == b".\r\n":
                ended = True
                break
            if not fragments and line.endswith(b"\r\n"):
                block, ended = self._buffered_lines()
                block = line + block
                size += len(block)
                if refusal is None:
                    refusal = self._refusal(block, size)
                if refusal is None:
                    nul = nul or b"\0" in block
                    pending += _unstuffed(block)
                else:
                    pending.clear()
                if ended:
                    break
                if refusal is None and len(pending) >= CHUNK:
                    refusal = await self._write(spool, pending)
                    pending = bytearray()
                continue
            size += len(line)
            if refusal is None and limit and size > limit:
                refusal = "552 Error: Too much mail data"
                pending.clear()
            fragments.append(line)
            if not line.endswith(b"\r\n"):
                continue
            whole = b"".join(fragments)
            fragments.clear()
            if refusal is not None:
                continue
            if len(whole) > self.line_length_limit:
                refusal = "500 Line too long (see RFC5321 4.5.3.1.6)"
                pending.clear()
                continue
            nul = nul or b"\0" in whole
            whole = whole[1:] if whole.startswith(b".") else whole
            if b"\n" in whole[:-2] or b"\r" in whole[:-2]:
                whole = _BARE_LINE_END.sub(b"\r\n", whole)   # see the module: one kind of line end
            pending += whole
            if len(pending) >= CHUNK:
                refusal = await self._write(spool, pending)
                pending = bytearray()
        if not ended:                            # the connection is gone: nothing to hand over
            return "421 4.4.2 Connection lost during DATA", nul
        if refusal is None:
            spool.tail = bytes(pending)
        return refusal, nul

    def _buffered_lines(self) -> tuple[bytes, bool]:
        """The complete lines already in the reader's buffer, up to the lone dot's (not given):
        (those lines, whether the dot came). aiosmtpd reads a line an await; a message that
        arrived whole is taken in one piece instead, with the same rules (`_refusal`,
        `_unstuffed`): a line ends only at CRLF, and the data only at CRLF "." CRLF."""
        buffer = self._reader._buffer
        if buffer.startswith(b".\r\n"):
            del buffer[:3]
            ended, end = True, 0
        else:
            found = buffer.find(b"\r\n.\r\n")
            ended = found >= 0
            end = found + 2 if ended else buffer.rfind(b"\r\n") + 2
            if end < 2:
                return b"", False
        lines = bytes(buffer[:end])
        del buffer[:end + (3 if ended and end else 0)]
        self._reader._maybe_resume_transport()
        return lines, ended

    def _refusal(self, block: bytes, size: int) -> str | None:
        """What refuses the data for a block of whole lines (read `size` bytes so far)."""
        if self.data_size_limit and size > self.data_size_limit:
            return "552 Error: Too much mail data"
        if len(block) > self.line_length_limit and \
                max(map(len, block.split(b"\r\n"))) + 2 > self.line_length_limit:
            return "500 Line too long (see RFC5321 4.5.3.1.6)"
        return None

    async def _write(self, spool: _Spool, pending: bytearray) -> str | None:
        """A CHUNK of the message into the spool; the refusal if our disk failed (451 once the
        data is read, never mid-way)."""
        try:
            await self._not_idle(spool.write(pending))
        except OSError as exc:
            event("smtp.spool_failed", logging.ERROR, error=exc.strerror or exc)
            return replies.LOCAL_ERROR
        return None

    async def _hand_over(self, message: MessageFile, nul: bool) -> None:
        """The DATA hook, with the message in `envelope.spooled` (or read into `content`)."""
        envelope = self.envelope
        assert envelope is not None
        if isinstance(envelope, RelayEnvelope):
            envelope.spooled, envelope.has_nul = message, nul
        if not getattr(self.event_handler, "takes_spooled", False):
            content = message.body if message.path is None else await asyncio.to_thread(message.read)
            envelope.content = envelope.original_content = content
        status = await self._call_handler_hook("DATA") if "DATA" in self._handle_hooks else MISSING
        self._set_post_data_state()
        await self.push("250 OK" if status is MISSING or status is None else status)


    async def _not_idle(self, work: Awaitable[_T]) -> _T:
        """Our own work in a session; LimitedConnections (smtp/limits.py) stops its idle timer."""
        return await work


def _unstuffed(block: bytes) -> bytes:
    """Whole lines as stored: a leading dot taken off each (RFC 5321 4.5.2), then a bare CR or
    LF made CRLF (see the module), as the line-by-line reading does."""
    if block.startswith(b"."):
        block = block[1:]
    block = block.replace(b"\r\n.", b"\r\n")
    crlf = block.count(b"\r\n")
    if block.count(b"\r") != crlf or block.count(b"\n") != crlf:
        block = _BARE_LINE_END.sub(b"\r\n", block)
    return block


class _Spool:
    """One DATA on its way into the incoming spool: in memory up to `CHUNK`, then a file."""

    def __init__(self, incoming: Incoming) -> None:
        self.incoming = incoming
        self.fd: int | None = None
        self.path: Path | None = None
        self.size = 0
        self.tail = b""           # what came after the last chunk written

    async def write(self, chunk: bytearray) -> None:
        if self.fd is None:
            self.fd, self.path = await asyncio.to_thread(self.incoming.create)
        await asyncio.to_thread(write_all, self.fd, chunk)
        self.size += len(chunk)

    async def finish(self) -> MessageFile:
        """The message received: in memory when it never needed a file."""
        if self.fd is None:
            return MessageFile(None, len(self.tail), body=self.tail)
        assert self.path is not None
        if self.tail:
            await asyncio.to_thread(write_all, self.fd, self.tail)
        await asyncio.to_thread(os.close, self.fd)
        self.fd = None
        return MessageFile(self.path, self.size + len(self.tail))

    async def discard(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self.path is not None:
            await asyncio.to_thread(self.path.unlink, missing_ok=True)
            self.path = None


def _default_incoming() -> Incoming:
    """Where a server started without a spool (a test's fake primary) streams DATA."""
    return Incoming(Path(tempfile.gettempdir()) / "continuity-relay-incoming")


def protocol_name(session: Session, utf8: bool = False) -> str:
    """The `with` word of a Received header: ESMTP, plus S for TLS and A for AUTH (RFC 3848),
    or UTF8SMTP... for a transaction with SMTPUTF8 (RFC 6531 3.7.3)."""
    if not session.extended_smtp:
        return "SMTP"
    suffix = ("S" if session.ssl is not None else "") + ("A" if session.authenticated else "")
    return ("UTF8SMTP" if utf8 else "ESMTP") + suffix


def received_header(session: Session, hostname: str, queue_id: str, rcpt: str | None,
                    utf8: bool = False) -> bytes:
    """Our trace header for a message received in `session` (RFC 5321 4.4)."""
    helo = "".join(c for c in (session.host_name or "unknown") if c.isprintable() and
                   not c.isspace())[:120] or "unknown"
    peer = session.peer[0] if isinstance(session.peer, tuple) else "unknown"
    target = f"\r\n\tfor <{rcpt}>" if rcpt else ""
    date = email.utils.formatdate(localtime=True)
    return (f"Received: from {helo} ([{peer}])\r\n\tby {hostname} (continuity-relay) "
            f"with {protocol_name(session, utf8)} id {queue_id}{target};\r\n\t{date}\r\n").encode()
