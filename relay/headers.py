"""Headers: read and edit a message's header block as bytes, never through `email`'s serialiser.

This module owns every header edit the relay makes to a message it passes on (rule 3, "Bytes are
preserved"): removing Bcc, the "(CS-SENT)" Subject suffix, setting a header. It parses only to
find where a header starts and ends; every byte it was not asked to change is copied as it came.

The header block ends at the first empty line (`\\n` or `\\r\\n`); a message without one is all
headers. Lines end with LF, optionally preceded by CR; each line keeps the ending it had, and a
line this module adds ends like the message's first line (CRLF when the message has no line end).
A field is a line that does not start with space or tab plus the continuation lines that follow
it. Header names match case-insensitively; `Name :` (obsolete space before the colon) counts.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from email.errors import HeaderParseError
from email.header import decode_header, make_header
from email.utils import getaddresses

__all__ = ["Block", "addresses", "append_to_subject", "crlf", "has_suffix", "prepend", "remove", "set_header",
           "split", "values"]

MAX_LINE = 998  # RFC 5322 2.1.1: octets per line, line ending excluded

_WSP = b" \t"
_ENCODED_WORD = re.compile(r"=\?[^?\s]+\?[QqBb]\?[^?\s]*\?=")
# Encoded-words separated only by blanks: RFC 2047 6.2 drops the blanks between them.
_ENCODED_RUN = re.compile(rf"{_ENCODED_WORD.pattern}(?:[ \t]+{_ENCODED_WORD.pattern})*")
_FIELD_NAME = re.compile(r"[!-9;-~]+")  # printable ASCII except ":" (RFC 5322 ftext)
# An entry of an address list that is only `local@domain` or `Display Name <local@domain>`, with
# none of the characters that make RFC 5322 parsing subtle (quotes, comments, groups, routes,
# literals, escapes) anywhere in the list: what nearly all mail has, read without the email
# package's parser (a third of the archive index's time went there). Anything else goes to it.
_SUBTLE = re.compile(r'["()\\:;\[\]\r\n]')
_ADDR = r"[^\s<>@,]+@[^\s<>@,]+"
_PLAIN_ENTRY = re.compile(rf"[ \t]*(?:[^<>@,]*?[ \t]*<({_ADDR})>|({_ADDR}))[ \t]*")

Field = list[bytes]  # the lines of one header field, each with its own line ending


def crlf(data: bytes) -> bytes:
    """`data` with every line ending as CRLF: a bare CR and a bare LF each become CRLF.

    This is what aiosmtplib does to every message on the way out, so a check made on the result
    sees the lines the receiving server will see (rule 11: a bare CR must not hide a header).
    """
    return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")


def split(data: bytes) -> tuple[bytes, bytes]:
    """(header block including the terminating empty line if any, body)."""
    head, blank, body = _sections(data)
    return head + blank, body


def values(data: bytes, name: str) -> list[str]:
    """Every occurrence of header `name`, unfolded and decoded for reading (not for passing on)."""
    return Block(data).values(name)


def addresses(data: bytes, *names: str) -> list[str]:
    """The addr-specs in the headers `names`, in header-block order, without case-insensitive repeats.

    Display names are never decoded before parsing, so an encoded comma cannot split an address;
    empty groups ("undisclosed-recipients:;") and empty entries give nothing.
    """
    return Block(data).addresses(*names)


class Block:
    """A message's header block split into fields once, to read several headers of it (what
    `values` and `addresses` do for one)."""

    def __init__(self, data: bytes) -> None:
        self.fields = _parse(data)[0]

    def values(self, name: str) -> list[str]:
        key = _key(name)
        return [_decode(_unfold(field)) for field in self.fields if _name(field) == key]

    def addresses(self, *names: str, first: bool = False) -> list[str]:
        """As `addresses`; with `first`, only the first field of those names (the newest
        resent block's, which is prepended)."""
        wanted = {_key(name) for name in names}
        fields = [field for field in self.fields if _name(field) in wanted]
        return _addresses(fields[:1] if first else fields)


def _addresses(fields: Iterable[Field]) -> list[str]:
    found: dict[str, str] = {}
    for field in fields:
        text = _unfold(field).decode("utf-8", errors="replace")
        for addr in _plain_addresses(text) or [addr for _display, addr in getaddresses([text])]:
            if addr:
                found.setdefault(addr.lower(), addr)
    return list(found.values())


def _plain_addresses(text: str) -> list[str] | None:
    """The addr-specs of a plain address list (see `_PLAIN_ENTRY`), as `getaddresses` gives them;
    None when the list is not plain (then `getaddresses` reads it)."""
    if _SUBTLE.search(text):
        return None
    found = []
    for entry in text.split(","):
        if not entry.strip(" \t"):
            continue
        match = _PLAIN_ENTRY.fullmatch(entry)
        if match is None:
            return None
        found.append(match.group(1) or match.group(2))
    return found or None


def remove(data: bytes, name: str) -> bytes:
    """`data` without any `name` field (continuation lines included); every other byte kept."""
    fields, blank, body = _parse(data)
    key = _key(name)
    return _join([field for field in fields if _name(field) != key], blank, body)


def append_to_subject(data: bytes, suffix: str = " (CS-SENT)") -> bytes:
    """`suffix` at the very end of the first Subject field, or a new `Subject:` + suffix line.

    The suffix goes on the field's last line, before its line ending; when that would make the line
    longer than 998 octets, the field is folded before the suffix (its leading blanks become the
    fold). Applying it twice appends twice: ask `has_suffix` first.
    """
    tail = suffix.encode("ascii")
    fields, blank, body = _parse(data)
    for index, field in enumerate(fields):
        if _name(field) == b"subject":
            edited = field[:-1] + _with_suffix(field[-1], tail, _eol(data))
            return _join(fields[:index] + [edited] + fields[index + 1 :], blank, body)
    return _join(_appended(fields, b"Subject:" + tail, _eol(data)), blank, body)


def has_suffix(data: bytes, suffix: str = " (CS-SENT)") -> bool:
    """Whether the first Subject, unfolded and decoded, already ends with `suffix` without its blanks."""
    subjects = values(data, "Subject")
    return bool(subjects) and subjects[0].rstrip().endswith(suffix.strip())


def set_header(data: bytes, name: str, value: str) -> bytes:
    """One `name: value` line in place of the first `name` field (or last in the block); others dropped.

    `value` is one line of text, written as UTF-8: CR, LF or NUL in it raise ValueError (no header
    injection), and so does a `name` that is not a valid field name.
    """
    if not _FIELD_NAME.fullmatch(name):
        raise ValueError(f"not a header field name: {name!r}")
    if any(char in value for char in "\r\n\0"):
        raise ValueError(f"header value must be one line: {value!r}")
    line, eol = f"{name}: {value}".encode(), _eol(data)
    fields, blank, body = _parse(data)
    key = _key(name)
    kept: list[Field] = []
    placed = False
    for field in fields:
        if _name(field) != key:
            kept.append(field)
        elif not placed:
            kept.append([line + eol])
            placed = True
    return _join(kept if placed else _appended(kept, line, eol), blank, body)


def prepend(data: bytes, name: str, value: str) -> bytes:
    """A `name: value` line before the first byte of `data` (trace style, newest on top).

    Every byte of `data` stays as it was; the new line ends like the message's first line.
    `name` and `value` are checked as in `set_header`.
    """
    if not _FIELD_NAME.fullmatch(name):
        raise ValueError(f"not a header field name: {name!r}")
    if any(char in value for char in "\r\n\0"):
        raise ValueError(f"header value must be one line: {value!r}")
    return f"{name}: {value}".encode() + _eol(data) + data


# --- the header block as fields ---------------------------------------------------------------


def _sections(data: bytes) -> tuple[bytes, bytes, bytes]:
    """(header lines, the empty line that ends them or b"", body)."""
    pos = 0
    while (nl := data.find(b"\n", pos)) != -1:
        if data[pos:nl] in (b"", b"\r"):
            return data[:pos], data[pos : nl + 1], data[nl + 1 :]
        pos = nl + 1
    return data, b"", b""


def _parse(data: bytes) -> tuple[list[Field], bytes, bytes]:
    """(fields, the terminating empty line or b"", body): joined again, they give `data` back."""
    head, blank, body = _sections(data)
    fields: list[Field] = []
    for line in _lines(head):
        if fields and line[:1] in (b" ", b"\t"):
            fields[-1].append(line)
        else:
            fields.append([line])
    return fields, blank, body


def _join(fields: list[Field], blank: bytes, body: bytes) -> bytes:
    return b"".join(b"".join(field) for field in fields) + blank + body


def _lines(block: bytes) -> list[bytes]:
    """The lines of `block`, each with its line ending; a bare CR is not a line end."""
    parts = block.split(b"\n")
    lines = [part + b"\n" for part in parts[:-1]]
    return lines + [parts[-1]] if parts[-1] else lines


def _name(field: Field) -> bytes | None:
    """The field's name, lower-cased, or None for a line without a colon."""
    name, colon, _rest = field[0].partition(b":")
    return name.rstrip(_WSP).lower() if colon else None


def _key(name: str) -> bytes:
    return name.encode("utf-8").lower()


def _eol(data: bytes) -> bytes:
    """The message's first line ending, CRLF when it has none."""
    nl = data.find(b"\n")
    return b"\r\n" if nl == -1 or data[nl - 1 : nl] == b"\r" else b"\n"


def _ending(line: bytes) -> tuple[bytes, bytes]:
    """(line without its line ending, the line ending)."""
    for end in (b"\r\n", b"\n"):
        if line.endswith(end):
            return line[: -len(end)], end
    return line, b""


def _appended(fields: list[Field], line: bytes, eol: bytes) -> list[Field]:
    """`fields` with `line` + eol as a new last field, ending the former last line first if needed."""
    fields = [list(field) for field in fields]
    if fields and not fields[-1][-1].endswith(b"\n"):
        fields[-1][-1] += eol
    return fields + [[line + eol]]


def _with_suffix(line: bytes, suffix: bytes, eol: bytes) -> list[bytes]:
    """`line` with `suffix` before its line ending, folded before the suffix past 998 octets."""
    content, end = _ending(line)
    if len(content) + len(suffix) <= MAX_LINE:
        return [content + suffix + end]
    return [content + eol, b" " + suffix.lstrip(_WSP) + end]


# --- reading values ---------------------------------------------------------------------------


def _unfold(field: Field) -> bytes:
    """The field's value with its line breaks removed (RFC 5322 2.2.3) and outer blanks stripped."""
    value = b"".join(field).partition(b":")[2]
    return re.sub(rb"\r?\n", b"", value).strip(_WSP)


# What `email.header` raises on a malformed encoded-word or charset name (an unknown charset is a
# LookupError, one with NUL in it a ValueError, a bad base64 a binascii.Error, which is one too):
# the text is then shown as it came, never an error for the page that shows it.
_UNDECODABLE = (HeaderParseError, LookupError, ValueError, AssertionError, TypeError)


def _decode(raw: bytes) -> str:
    """Text for reading: raw 8-bit bytes as UTF-8 (errors replaced), RFC 2047 encoded-words decoded.

    Never raises: a word that does not decode stays as it is."""
    text = raw.decode("utf-8", errors="replace")
    if "=?" not in text:
        return text
    if text.isascii():
        try:
            return str(make_header(decode_header(text)))
        except _UNDECODABLE:
            return text
    # Raw 8-bit text next to encoded-words: decode_header cannot take it, so decode word by word.
    return _ENCODED_RUN.sub(_decode_run, text)


def _decode_run(match: re.Match[str]) -> str:
    return "".join(_decode_word(word) for word in _ENCODED_WORD.findall(match.group()))


def _decode_word(word: str) -> str:
    try:
        return "".join(
            part.decode(charset or "ascii", errors="replace") if isinstance(part, bytes) else part
            for part, charset in decode_header(word)
        )
    except _UNDECODABLE:
        return word
