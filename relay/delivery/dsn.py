"""Delivery status notifications (RFC 3464 inside an RFC 6522 multipart/report), built as bytes.

This module owns the text of every bounce the relay sends: `build_dsn` returns the complete
message, CRLF line endings, ready to hand to SMTP with envelope sender `<>`. It does no I/O.

Three parts: a short human explanation, the machine-readable `message/delivery-status`, and the
original message's header block copied byte for byte as `text/rfc822-headers` (never its body).
The original is never parsed and re-serialised (docs/architecture.md rule 3): the header block
is cut out of the bytes; the only changes are bare LF -> CRLF and splitting any line longer
than 998 octets.

Whatever comes from outside is treated as hostile: the remote server's text is reduced to one line
of printable ASCII and folded; addresses with line breaks or control characters raise ValueError.

`notify_says` and `dsn_field` read the sender's RFC 3461 wishes (NOTIFY=, ENVID=, ORCPT=) from
the options kept with a queue entry.

Sending the result: if it holds 8-bit bytes (`not dsn.isascii()`), send with BODY=8BITMIME; if
`mail_from` or `rcpt` is non-ASCII, the report follows RFC 6533 (message/global-delivery-status,
`utf-8` address type) and needs SMTPUTF8.
"""

from __future__ import annotations

import re
import secrets
import textwrap
import time
from datetime import UTC, datetime
from email.utils import format_datetime

CRLF = "\r\n"
MAX_LINE = 998  # octets, without the CRLF (RFC 5322 2.1.1)
FOLD_AT = 78  # where we fold our own lines (RFC 5322 "SHOULD")
MAX_TEXT = 1000  # characters kept of the remote server's reply text
MAX_ADDRESS = 900  # octets: keeps "Final-Recipient: rfc822; <address>" under MAX_LINE
MAX_HOST = 255

SUBJECTS = {
    "failed": "Undelivered Mail Returned to Sender",
    "delayed": "Delayed Mail (still being retried)",
    "relayed": "Successful Mail Delivery Report",
}

_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?!\S)")
_HOST = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?|\[[A-Za-z0-9.:]+\]")
# A header field's first line (RFC 5322 field-name, obsolete WSP before the colon allowed), or a
# continuation line.
_HEADER_LINE = re.compile(rb"[\x21-\x39\x3b-\x7e]+[ \t]*:|[ \t]")


def build_dsn(*, reporting_mta: str, original: bytes, mail_from: str, rcpt: str,
              code: int, text: str, remote_mta: str, arrival: float,
              now: float | None = None, action: str = "failed", envid: str | None = None,
              orcpt: str | None = None) -> bytes:
    """The bytes of a DSN telling `mail_from` what happened to its message for `rcpt`.

    `code` and `text` are the remote server's reply (text without the code, as aiosmtplib gives
    it); `arrival` and `now` are Unix times. `action` is "failed" or "delayed" (a 4xx or 5xx
    reply), or "relayed" (RFC 3461 6.2.3: the 2xx of a server that offers no DSN, for a
    recipient whose NOTIFY asked for SUCCESS). `envid` and
    `orcpt` are the sender's RFC 3461 ENVID and ORCPT (`rfc822;addr`), reported as given when they
    are well-formed xtext and left out otherwise. Raises ValueError for an unusable address, host
    name, code or action.
    """
    _check_host(reporting_mta)
    _check_address("mail_from", mail_from)
    _check_address("rcpt", rcpt)
    if action not in SUBJECTS:
        raise ValueError(f"action must be one of {sorted(SUBJECTS)}, not {action!r}")
    low, high = (200, 299) if action == "relayed" else (400, 599)
    if not low <= code <= high:
        raise ValueError(f"a {action!r} DSN reports a {str(low)[0]}xx reply, not {code!r}")
    now = time.time() if now is None else now
    text, remote_mta = _clean(text, MAX_TEXT), _clean(remote_mta, MAX_HOST)
    utf8 = not (mail_from + rcpt).isascii()
    parts = [
        _notice_part(reporting_mta, rcpt, code, text, remote_mta, action, utf8),
        _status_part(reporting_mta, rcpt, code, text, remote_mta, action, arrival, utf8,
                     _xtext(envid), _xtext(orcpt)),
        _headers_part(original),
    ]
    boundary = _pick_boundary(original, *parts)
    eight_bit = not all(part.isascii() for part in parts)
    head = _top_headers(reporting_mta, mail_from, action, now, boundary, eight_bit)
    body = b"".join(b"--" + boundary.encode() + b"\r\n" + part for part in parts)
    preamble = b"This is a MIME-encapsulated message.\r\n\r\n"
    return head + b"\r\n" + preamble + body + b"--" + boundary.encode() + b"--\r\n"


def notify_says(rcpt_options: tuple[str, ...] | list[str], what: str) -> bool:
    """Whether the sender wants a notice of `what` (FAILURE, DELAY, SUCCESS) for a recipient
    with these RCPT options: without NOTIFY, failures and delays yes, success no (RFC 3461 4.1)."""
    for option in rcpt_options:
        name, _, value = option.partition("=")
        if name.upper() == "NOTIFY":
            return what.upper() in value.upper().split(",")
    return what.upper() in ("FAILURE", "DELAY")


def dsn_field(options: tuple[str, ...] | list[str], name: str) -> str | None:
    """The value of option `name` (ENVID, ORCPT...) among `options`, or None."""
    for option in options:
        key, eq, value = option.partition("=")
        if eq and key.upper() == name:
            return value
    return None


def _check_address(name: str, address: str) -> None:
    """Refuse anything that could break out of a header line or an angle-bracketed path."""
    if not address or "@" not in address:
        raise ValueError(f"{name}: not an address: {address!r}")
    if any(ord(c) < 33 or 127 <= ord(c) < 160 or c in "<>" for c in address):
        raise ValueError(f"{name}: control characters, spaces or angle brackets in address")
    if len(address.encode("utf-8")) > MAX_ADDRESS:
        raise ValueError(f"{name}: address too long")


def _check_host(host: str) -> None:
    if len(host) > MAX_HOST or not _HOST.fullmatch(host):
        raise ValueError(f"reporting_mta: not a host name: {host!r}")


def _clean(text: str, limit: int) -> str:
    """One line of printable ASCII: controls and line breaks become spaces, runs of spaces one."""
    chars = (c if " " < c < "\x7f" else " " if c.isspace() or not c.isprintable() else "?"
             for c in text)
    cleaned = " ".join("".join(chars).split())
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 3].rstrip() + "..."


def _enhanced_status(code: int, text: str) -> str:
    """`x.y.z` from the start of `text` when its class matches `code`, else `4.0.0` / `5.0.0`."""
    match = _ENHANCED.match(text.lstrip())
    if match and match.group(1) == str(code)[0]:
        return ".".join(str(int(g)) for g in match.groups())
    return f"{str(code)[0]}.0.0"


def _date(timestamp: float) -> str:
    return format_datetime(datetime.fromtimestamp(timestamp, UTC))


def _fold(name: str, value: str) -> list[str]:
    """`Name: value` folded at spaces (a word too long for a line is split) into FOLD_AT lines."""
    return textwrap.wrap(value, width=FOLD_AT, initial_indent=f"{name}: ", subsequent_indent=" ",
                         break_long_words=True, break_on_hyphens=False) or [f"{name}:"]


def _top_headers(reporting_mta: str, mail_from: str, action: str, now: float,
                 boundary: str, eight_bit: bool) -> bytes:
    lines = [
        f"From: Mail Delivery System <MAILER-DAEMON@{reporting_mta}>",
        f"To: <{mail_from}>",
        f"Subject: {SUBJECTS[action]}",
        f"Date: {_date(now)}",
        f"Message-ID: <{int(now)}.{_token()}@{reporting_mta}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        "Content-Type: multipart/report; report-type=delivery-status;",
        f' boundary="{boundary}"',
        f"Content-Transfer-Encoding: {'8bit' if eight_bit else '7bit'}",
    ]
    return "".join(line + CRLF for line in lines).encode("utf-8")


def _notice_part(reporting_mta: str, rcpt: str, code: int, text: str, remote_mta: str,
                 action: str, utf8: bool) -> bytes:
    """The text/plain part a person reads."""
    server = f"The server {remote_mta}" if remote_mta else "The remote server"
    if action == "failed":
        what = f"Your message to <{rcpt}> could not be delivered. {server} said:"
        after = "The headers of your message are attached. The message itself was not delivered."
    elif action == "relayed":
        what = f"Your message to <{rcpt}> was passed on. {server} took it, and said:"
        after = ("That server sends no delivery notices, so this is the last one you will get "
                 "for this message. Its headers are attached.")
    else:
        what = f"Your message to <{rcpt}> has not been delivered yet. {server} said:"
        after = "Delivery will be retried; you do not need to send the message again."
    paragraphs = [
        textwrap.fill(f"This is the mail system at host {reporting_mta}.", 76),
        textwrap.fill(what, 76, break_long_words=False, break_on_hyphens=False),
        textwrap.fill(f"{code} {text}".rstrip(), 76, initial_indent="    ", subsequent_indent="    ",
                      break_on_hyphens=False),
        textwrap.fill(after, 76),
    ]
    charset, cte = ("utf-8", "8bit") if utf8 else ("us-ascii", "7bit")
    head = (f"Content-Type: text/plain; charset={charset}\r\nContent-Transfer-Encoding: {cte}\r\n"
            "Content-Description: Notification\r\n\r\n")
    body = "\n\n".join(paragraphs).replace("\n", CRLF) + CRLF + CRLF
    return (head + body).encode("utf-8")


def _status_part(reporting_mta: str, rcpt: str, code: int, text: str, remote_mta: str,
                 action: str, arrival: float, utf8: bool, envid: str | None = None,
                 orcpt: str | None = None) -> bytes:
    """The message/delivery-status part: per-message fields, blank line, per-recipient fields."""
    per_message = [f"Reporting-MTA: dns; {reporting_mta}",
                   *([f"Original-Envelope-Id: {envid}"] if envid else []),
                   f"Arrival-Date: {_date(arrival)}"]
    per_recipient = [
        *([f"Original-Recipient: {orcpt}"] if orcpt else []),
        f"Final-Recipient: {'utf-8' if utf8 else 'rfc822'}; {rcpt}",
        f"Action: {action}",
        f"Status: {_enhanced_status(code, text)}",
        *([f"Remote-MTA: dns; {remote_mta}"] if remote_mta else []),
        *_fold("Diagnostic-Code", f"smtp; {code} {text}".rstrip()),
    ]
    kind, cte = ("message/global-delivery-status", "8bit") if utf8 else ("message/delivery-status", "7bit")
    head = (f"Content-Type: {kind}\r\nContent-Transfer-Encoding: {cte}\r\n"
            "Content-Description: Delivery report\r\n\r\n")
    body = CRLF.join(per_message) + CRLF + CRLF + CRLF.join(per_recipient) + CRLF + CRLF
    return (head + body).encode("utf-8")


def _headers_part(original: bytes) -> bytes:
    """The text/rfc822-headers part: the original header block, its bytes kept."""
    block = _header_block(original)
    cte = "7bit" if block.isascii() else "8bit"
    head = (f"Content-Type: text/rfc822-headers\r\nContent-Transfer-Encoding: {cte}\r\n"
            "Content-Description: Undelivered message headers\r\n\r\n").encode("ascii")
    return head + block + b"\r\n"  # the empty line that ended the header block


def _raw_header_block(original: bytes) -> bytes:
    """The original's header lines, verbatim up to the first empty line (or the first line that
    is not a header, as the email package reads it), without the empty line itself."""
    end = pos = 0
    while pos < len(original):
        nl = original.find(b"\n", pos)
        line = original[pos:] if nl < 0 else original[pos:nl + 1]
        if line in (b"\n", b"\r\n") or not _HEADER_LINE.match(line):
            break
        pos = end = pos + len(line)
    return original[:end]


def _header_block(original: bytes) -> bytes:
    """_raw_header_block() with CRLF line endings and no line over MAX_LINE octets; ends with CRLF."""
    lines = _raw_header_block(original).split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    out = []
    for line in lines:
        line = line.removesuffix(b"\r")
        while len(line) > MAX_LINE:  # cannot be folded at a space without knowing the field:
            out.append(line[:MAX_LINE])  # split it, the rest goes on as a continuation line
            line = b" " + line[MAX_LINE:]
        out.append(line)
    return b"".join(line + b"\r\n" for line in out)


def _pick_boundary(*texts: bytes) -> str:
    """A random boundary that occurs (in any letter case) in none of `texts`."""
    lowered = [t.lower() for t in texts]
    while True:
        boundary = f"----=_DSN_{_token()}"
        if not any(boundary.lower().encode() in t for t in lowered):
            return boundary


def _xtext(value: str | None) -> str | None:
    """`value` when it is printable ASCII without blanks and short enough for a line, else None."""
    if value and len(value) <= 500 and all("!" <= c <= "~" for c in value):
        return value
    return None


def _token() -> str:
    return secrets.token_hex(16)
