"""Composing in the webmail: new messages, replies and forwards, as bytes for `Submitter.submit`.

These are messages the user authors, so `email` writes them (policy SMTP: CRLF line ends,
RFC 2047 encoded-words for non-ASCII headers, RFC 2231 for non-ASCII file names, a UTF-8 body
quoted-printable when it is not ASCII). When an address has a UTF-8 local part (a user such as
jürgen@, or a recipient), the headers are written in UTF-8 instead (policy SMTPUTF8, RFC 6532),
and `Submitter.submit` sends the message with SMTPUTF8, as it does from submission and the
Outbox. A message the user received is never re-serialised (docs/architecture.md rule 3):
a forward carries it byte for byte as a message/rfc822 attachment.

Every header field that comes from the form is refused (ComposeError, a ValueError) when it
holds CR, LF or another line-breaking or control character: no header injection. Recipients
are read with `email.utils.getaddresses` and each one must pass `relay.addresses.parse_mailbox`;
the Bcc header stays in the message (`Submitter.submit` removes it from what goes out and keeps it
in the Sent copy). `recipients()` gives the envelope recipients for `Submitter.submit`.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from email import policy
from email.errors import MessageError
from email.headerregistry import Address
from email.message import EmailMessage
from email.parser import BytesParser
from email.utils import formatdate, getaddresses, make_msgid

from relay import headers
from relay.addresses import AddressError, Mailbox, parse_mailbox
from relay.webmail.render import safe_filename, view

__all__ = ["ComposeError", "Draft", "build", "forward", "recipients", "reply"]

AttachmentData = tuple[str, str, bytes]  # (file name, content type, bytes)

MAX_REFERENCES = 20
# CR and LF, and every other character that ends a line for str.splitlines() or is a control.
_LINE_BREAKING = re.compile(r"[\x00-\x08\x0a-\x1f\x7f\x85\u2028\u2029]")
_CONTENT_TYPE = re.compile(r"[a-z0-9][a-z0-9!#$&^_.+-]{0,63}/[a-z0-9][a-z0-9!#$&^_.+-]{0,126}")
_MSG_ID = re.compile(r"<[^<>\s]+>")
_QUOTED_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_RE_PREFIX = re.compile(r"^(?:\s*re\s*(?:\[\d+\])?\s*:)+\s*", re.IGNORECASE)
_FWD_PREFIX = re.compile(r"^(?:\s*fwd?\s*:)+\s*", re.IGNORECASE)
_SPECIALS = set('()<>[]:;@\\,."')


class ComposeError(ValueError):
    """Form input that cannot become a message: a bad address, a header with a line break."""


@dataclass(frozen=True)
class Draft:
    """What the compose form starts with; pass it back through `build` to send."""

    to: str = ""
    cc: str = ""
    bcc: str = ""
    subject: str = ""
    body: str = ""
    in_reply_to: str | None = None
    references: str | None = None
    attachments: tuple[AttachmentData, ...] = ()


# --- new messages ------------------------------------------------------------------------------


def build(from_addr: str | Mailbox, to: str | Sequence[str], cc: str | Sequence[str] = "",
          bcc: str | Sequence[str] = "", subject: str = "", body_text: str = "",
          attachments: Iterable[AttachmentData] = (), in_reply_to: str | None = None,
          references: str | None = None, hostname: str | None = None) -> bytes:
    """A complete RFC 5322 / MIME message as bytes (CRLF), with Date, Message-ID (at
    `hostname`, by default the sender's domain) and MIME-Version. `to`, `cc`, `bcc` are
    comma-separated text or lists of it; at least one recipient is needed."""
    sender = _addresses("From", from_addr)
    if len(sender) != 1:
        raise ComposeError("From: needs exactly one address")
    fields = {name: _addresses(name, value) for name, value in (("To", to), ("Cc", cc), ("Bcc", bcc))}
    if not any(fields.values()):
        raise ComposeError("no recipient")
    _one_line("Subject", subject)
    domain = hostname or sender[0].domain
    _one_line("hostname", domain)
    # A UTF-8 local part cannot be an encoded-word (RFC 2047 5): such a message is written with
    # UTF-8 headers (RFC 6532) and goes out with SMTPUTF8, as submission and the Outbox send it.
    utf8 = any(not a.username.isascii() for a in [*sender, *(a for f in fields.values() for a in f)])
    message = EmailMessage(policy=policy.SMTPUTF8 if utf8 else policy.SMTP)
    message["Date"] = formatdate(localtime=True)
    message["From"] = sender
    for name, found in fields.items():
        if found:
            message[name] = found
    message["Subject"] = subject
    message["Message-ID"] = make_msgid(domain=domain)
    if in_reply_to:
        message["In-Reply-To"] = _message_ids("In-Reply-To", in_reply_to, limit=1)
    if references:
        message["References"] = _message_ids("References", references, limit=MAX_REFERENCES)
    text = body_text.replace("\r\n", "\n").replace("\r", "\n")
    message.set_content(text, charset="utf-8", cte=None if text.isascii() else "quoted-printable")
    embedded: list[tuple[bytes, bytes]] = []
    for number, (filename, content_type, data) in enumerate(attachments, start=1):
        _one_line("attachment file name", filename)
        content_type = content_type.strip().lower() if _CONTENT_TYPE.fullmatch(
            content_type.strip().lower()) else "application/octet-stream"
        name = safe_filename(filename, number, content_type)
        if content_type == "message/rfc822":
            embedded.append(_add_message(message, data, name))
        else:
            maintype, subtype = content_type.split("/")
            message.add_attachment(bytes(data), maintype=maintype, subtype=subtype, filename=name)
    return _with_embedded(message, embedded)


def recipients(to: str | Sequence[str], cc: str | Sequence[str] = "",
               bcc: str | Sequence[str] = "") -> list[str]:
    """The envelope recipients (To, Cc, Bcc), each address once, for `Submitter.submit`."""
    found: dict[str, str] = {}
    for name, value in (("To", to), ("Cc", cc), ("Bcc", bcc)):
        for address in _addresses(name, value):
            found.setdefault(address.addr_spec.lower(), address.addr_spec)
    return list(found.values())


def _one_line(name: str, value: str) -> None:
    if not isinstance(value, str) or _LINE_BREAKING.search(value):
        raise ComposeError(f"{name}: line breaks and control characters are not allowed")


def _addresses(name: str, value: str | Mailbox | Sequence[str]) -> list[Address]:
    """Each address of a form field, checked; ComposeError names the first bad one."""
    text = str(value) if isinstance(value, (str, Mailbox)) else ", ".join(value)
    _one_line(name, text)
    found: list[Address] = []
    for display, addr in getaddresses([text]):
        if not addr and not display:
            continue
        try:
            mailbox = parse_mailbox(addr)
        except AddressError as exc:
            raise ComposeError(f"{name}: not a valid address: {addr or display!r} ({exc})") from None
        if addr not in text:  # getaddresses joins "bob@exa mple.com" into another domain
            raise ComposeError(f"{name}: could not read {display or addr!r} as an address")
        local = addr.rpartition("@")[0]
        found.append(Address(display_name=display, username=local, domain=mailbox.domain))
    # getaddresses drops what it cannot read (3.11 has no strict mode): one address per "@".
    if len(found) != _QUOTED_STRING.sub("", text).count("@"):
        raise ComposeError(f"{name}: could not read every address in {text!r}")
    unique: dict[str, Address] = {}
    for address in found:
        unique.setdefault(address.addr_spec.lower(), address)
    return list(unique.values())


def _message_ids(name: str, value: str, limit: int) -> str:
    _one_line(name, value)
    ids = _MSG_ID.findall(value)
    if not ids:
        raise ComposeError(f"{name}: no message id in {value!r}")
    if len(ids) > limit:  # keep the thread's start and the most recent ones (RFC 5322 3.6.4)
        ids = [ids[0], *ids[len(ids) - limit + 1 :]] if limit > 1 else ids[-1:]
    return " ".join(ids)


def _add_message(message: EmailMessage, data: bytes, name: str) -> tuple[bytes, bytes]:
    """Attach a placeholder for a message/rfc822 part; (placeholder, the message's bytes).

    `email` can only write an 8-bit message/rfc822 part by re-serialising the enclosed message,
    so the original bytes (line ends made CRLF) replace the placeholder once the rest is written.
    """
    original = re.sub(rb"\r?\n", b"\r\n", bytes(data))
    if not original.endswith(b"\r\n"):
        original += b"\r\n"
    placeholder = f"X-Placeholder: {secrets.token_hex(16)}\r\n".encode("ascii")
    message.add_attachment(placeholder, maintype="message", subtype="rfc822", filename=name,
                           cte="7bit" if original.isascii() else "8bit")
    return placeholder, original


def _with_embedded(message: EmailMessage, embedded: list[tuple[bytes, bytes]]) -> bytes:
    """The message as bytes with each enclosed message spliced in, under a boundary that
    appears in none of them."""
    for _attempt in range(5):
        data = message.as_bytes()
        boundary = message.get_boundary()
        if not embedded:
            return data
        if boundary and not any(b"--" + boundary.encode("ascii") in original for _, original in embedded):
            for placeholder, original in embedded:
                data = data.replace(placeholder, original, 1)
            return data
        message.set_boundary(f"=_{secrets.token_hex(20)}")
    raise ComposeError("could not find a MIME boundary for the attached message")


# --- replies and forwards ----------------------------------------------------------------------


def reply(original: bytes, user: str | Mailbox, all: bool = False) -> Draft:
    """A reply to Reply-To (else From); with `all`, everyone else in To and Cc goes in Cc,
    never the user. Replying to one's own message goes to its recipients instead."""
    me = parse_mailbox(str(user))
    sender = _listed(original, "Reply-To") or _listed(original, "From")
    others = _listed(original, "To") + _listed(original, "Cc")
    if any(_is(addr, me) for _, addr in _listed(original, "From")):
        sender, others = _listed(original, "To"), _listed(original, "Cc")
    to = _unique(sender, exclude=[])
    cc = _unique(others, exclude=[addr for _, addr in to], me=me) if all else []
    message_id = _first_id(original, "Message-ID")
    earlier = _MSG_ID.findall(" ".join(headers.values(original, "References")))
    if not earlier and (parent := _first_id(original, "In-Reply-To")):
        earlier = [parent]
    refs = [*earlier, message_id] if message_id else earlier
    shown = view(original)
    author = shown.from_ or "someone"
    when = shown.date.strftime("%a, %d %b %Y %H:%M") if shown.date else ""
    intro = f"On {when}, {author} wrote:" if when else f"{author} wrote:"
    quoted = "\n".join(f"> {line}" if line else ">" for line in shown.text.rstrip("\n").split("\n"))
    return Draft(to=_format(to), cc=_format(cc), subject=_prefixed("Re: ", _RE_PREFIX, shown.subject),
                 body=f"\n\n{intro}\n{quoted}\n", in_reply_to=message_id,
                 references=" ".join(refs[-MAX_REFERENCES:]) or None)


def forward(original: bytes) -> Draft:
    """A forward: the original goes along unchanged as a message/rfc822 attachment, and the
    body starts with a summary of its headers. No recipients yet."""
    shown = view(original)
    lines = ["", "", "---------- Forwarded message ----------"]
    date = headers.values(original, "Date")
    for label, value in (("From", shown.from_), ("Date", date[0] if date else ""),
                         ("Subject", shown.subject), ("To", shown.to), ("Cc", shown.cc)):
        if value:
            lines.append(f"{label}: {_single(value)}")
    name = safe_filename(f"{shown.subject}.eml" if shown.subject else "", 0, "message/rfc822")
    return Draft(subject=_prefixed("Fwd: ", _FWD_PREFIX, shown.subject), body="\n".join(lines) + "\n",
                 attachments=((name, "message/rfc822", bytes(original)),))


def _listed(data: bytes, name: str) -> list[tuple[str, str]]:
    """(display name, address) pairs of a header in a received message, for the form."""
    try:
        field = BytesParser(policy=policy.default).parsebytes(data, headersonly=True)[name]
        if field is None:
            return []
        return [(_single(a.display_name), a.addr_spec) for a in field.addresses if "@" in a.addr_spec]
    except (MessageError, ValueError, LookupError, TypeError, AttributeError, IndexError):
        return [("", addr) for addr in headers.addresses(data, name)]


def _is(addr: str, me: Mailbox) -> bool:
    try:
        return parse_mailbox(addr) == me
    except AddressError:
        return False


def _unique(pairs: list[tuple[str, str]], exclude: list[str],
            me: Mailbox | None = None) -> list[tuple[str, str]]:
    seen = {addr.lower() for addr in exclude}
    kept = []
    for display, addr in pairs:
        if addr.lower() in seen or (me is not None and _is(addr, me)):
            continue
        seen.add(addr.lower())
        kept.append((display, addr))
    return kept


def _format(pairs: list[tuple[str, str]]) -> str:
    """"Name <addr>, ..." as a person types it: names quoted only when they need it."""
    out = []
    for display, addr in pairs:
        if not display:
            out.append(addr)
            continue
        if _SPECIALS & set(display):
            display = '"' + display.replace("\\", "\\\\").replace('"', '\\"') + '"'
        out.append(f"{display} <{addr}>")
    return ", ".join(out)


def _single(text: str) -> str:
    return " ".join(_LINE_BREAKING.sub(" ", text).split())


def _first_id(data: bytes, name: str) -> str | None:
    found = _MSG_ID.findall(" ".join(headers.values(data, name)))
    return found[0] if found else None


def _prefixed(prefix: str, existing: re.Pattern[str], subject: str) -> str:
    return prefix + existing.sub("", _single(subject))
