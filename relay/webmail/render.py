"""Showing a stored message in the webmail: display headers, a text body, sanitised HTML and
the attachments, with safe file names.

Parsing here is for reading only (docs/architecture.md rule 3): nothing parsed here is passed on. Display
headers are read from the bytes with `relay.headers` (which copes with raw 8-bit and broken
encoded-words); the MIME structure with `email` (policy.default). A message `email` cannot
make sense of (a multipart without its boundary, a parser error) is shown as its raw text.

HTML is never shown as sent. `nh3` keeps a small set of layout tags; scripts, styles, forms,
frames, objects and every event handler go; no URL that would load anything survives (src,
srcset, background, CSS url(), relative URLs that would hit the webmail itself): only `data:`
images stay. Links keep http, https and mailto targets and get rel="noopener noreferrer"
target="_blank". The web layer should still show the result in a sandboxed iframe under a
Content-Security-Policy without remote sources (defence in depth).
"""

from __future__ import annotations

import logging
import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from email import policy
from email.errors import MessageError
from email.message import EmailMessage, Message
from email.parser import BytesParser
from email.utils import parsedate_to_datetime
from html.parser import HTMLParser

import nh3

from relay import headers
from relay.log import event

__all__ = ["Attachment", "MessageView", "NoAttachmentError", "attachment", "html_to_text",
           "safe_filename", "sanitise_html", "view"]


MAX_DEPTH = 20          # MIME nesting followed; deeper parts count as attachments
MAX_FILENAME = 150      # bytes (UTF-8) of a download's file name
# What the email package raises on input it cannot make sense of: these mean "show it raw".
_UNREADABLE = (MessageError, ValueError, LookupError, TypeError, AttributeError, IndexError,
               AssertionError, RecursionError)
_CONTENT_TYPE = re.compile(r"[a-z0-9][a-z0-9!#$&^_.+-]{0,63}/[a-z0-9][a-z0-9!#$&^_.+-]{0,126}")
_RESERVED = re.compile(r"(con|prn|aux|nul|com[0-9¹²³]|lpt[0-9¹²³]|conin\$|conout\$)", re.IGNORECASE)
_UNSAFE_CHARS = re.compile(r'[<>:"/\\|?*]')
_FALLBACK_SUFFIX = {"text/plain": ".txt", "message/rfc822": ".eml"}


class NoAttachmentError(LookupError):
    """There is no attachment with that index in the message."""


@dataclass(frozen=True)
class Attachment:
    index: int              # the argument for `attachment()`
    filename: str           # safe to offer as a download name
    content_type: str       # "type/subtype", lower case, a token pair (no parameters)
    size: int               # bytes, decoded


@dataclass(frozen=True)
class MessageView:
    subject: str
    from_: str
    to: str
    cc: str
    reply_to: str
    date: datetime | None
    message_id: str
    text: str                   # always set: text/plain, else text made from the HTML, else raw
    html: str | None            # sanitised HTML when the message has an HTML body, else None
    text_from_html: bool        # no text/plain body: `text` was made from the HTML (show `html`)
    attachments: tuple[Attachment, ...]
    raw: bool = False           # MIME could not be read: `text` is the whole message as text


def view(data: bytes) -> MessageView:
    """Everything the webmail shows of a message; never raises for a malformed message."""
    fields = _display_headers(data)
    try:
        return _structured(data, fields)
    except _UNREADABLE as exc:
        event("webmail.unreadable_message", logging.WARNING, error=type(exc).__name__)
    return MessageView(**fields, text=_raw_text(data), html=None, text_from_html=False,
                       attachments=(), raw=True)


def attachment(data: bytes, index: int) -> tuple[str, str, bytes]:
    """(safe file name, content type, decoded bytes) of attachment `index` as listed by view()."""
    try:
        message = _parse(data)
        if _is_broken(message):
            raise NoAttachmentError(index)
        body_parts = _bodies(message)
        for number, part in enumerate(_attachment_parts(message, body_parts)):
            if number == index:
                return _describe(part, number)[0], _content_type(part), _payload(part)
    except _UNREADABLE as exc:
        raise NoAttachmentError(index) from exc
    raise NoAttachmentError(index)


# --- structure ---------------------------------------------------------------------------------


def _parse(data: bytes) -> EmailMessage:
    return BytesParser(policy=policy.default).parsebytes(data)


def _is_broken(message: Message) -> bool:
    """Declared multipart, but the parser found no parts (no boundary, no start boundary)."""
    return message.get_content_maintype() == "multipart" and not message.is_multipart()


def _structured(data: bytes, fields: dict) -> MessageView:
    message = _parse(data)
    if _is_broken(message):
        event("webmail.unreadable_message", logging.WARNING, error="multipart without parts")
        return MessageView(**fields, text=_raw_text(data), html=None, text_from_html=False,
                           attachments=(), raw=True)
    plain, html_part = _bodies(message)
    source = _text_of(html_part) if html_part is not None else None
    html = sanitise_html(source) if source is not None else None
    if plain is not None:
        text, from_html = _text_of(plain), False
    elif source is not None:
        text, from_html = html_to_text(source), True
    else:
        text, from_html = "", False
    found = tuple(Attachment(number, *_describe(part, number))
                  for number, part in enumerate(_attachment_parts(message, (plain, html_part))))
    return MessageView(**fields, text=_clean_text(text), html=html, text_from_html=from_html,
                       attachments=found)


def _bodies(message: EmailMessage) -> tuple[EmailMessage | None, EmailMessage | None]:
    """(the text/plain body, the text/html body), either None when there is none."""
    plain = message.get_body(preferencelist=("plain",))
    html = message.get_body(preferencelist=("html",))
    return plain, html


def _attachment_parts(message: Message, bodies: tuple) -> Iterator[Message]:
    """Every leaf part that is not one of the bodies, in document order; message/rfc822 parts
    are one attachment each (not opened)."""
    chosen = {id(part) for part in bodies if part is not None}

    def leaves(part: Message, depth: int) -> Iterator[Message]:
        if part.get_content_maintype() == "multipart" and part.is_multipart() and depth < MAX_DEPTH:
            for sub in part.get_payload():
                yield from leaves(sub, depth + 1)
        elif id(part) not in chosen:
            yield part

    return leaves(message, 0)


def _describe(part: Message, number: int) -> tuple[str, str, int]:
    content_type = _content_type(part)
    try:
        name = part.get_filename()
    except _UNREADABLE:
        name = None
    return safe_filename(name, number, content_type), content_type, len(_payload(part))


def _content_type(part: Message) -> str:
    declared = part.get_content_type()
    return declared if _CONTENT_TYPE.fullmatch(declared) else "application/octet-stream"


def _payload(part: Message) -> bytes:
    if part.get_content_maintype() == "message" and part.is_multipart():
        # The enclosed message(s), serialised again (for a download only: never passed on).
        try:
            whole = part.as_bytes(policy=policy.compat32.clone(linesep="\r\n"))
        except _UNREADABLE:
            whole = str(part).encode("utf-8", errors="replace")
        return headers.split(whole)[1]
    payload = part.get_payload(decode=True)
    return payload if isinstance(payload, bytes) else b""


def _text_of(part: Message) -> str:
    try:
        content = part.get_content()
        if isinstance(content, str):
            return content
    except _UNREADABLE:  # an unknown charset, mostly
        pass
    return _payload(part).decode("utf-8", errors="replace")


# --- headers and text --------------------------------------------------------------------------


def _display_headers(data: bytes) -> dict:
    def first(name: str) -> str:
        found = headers.values(data, name)
        return _one_line(found[0]) if found else ""

    try:
        date = parsedate_to_datetime(first("Date"))
    except (TypeError, ValueError, IndexError, OverflowError):
        date = None
    return {"subject": first("Subject"), "from_": first("From"), "to": first("To"), "cc": first("Cc"),
            "reply_to": first("Reply-To"), "date": date, "message_id": first("Message-ID")}


def _one_line(text: str) -> str:
    return "".join(char if char.isprintable() else " " for char in text).strip()


def _clean_text(text: str) -> str:
    """Line ends as \\n, and no NUL or other C0 controls apart from tab and newline."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return "".join(char for char in text if char in "\t\n" or unicodedata.category(char) != "Cc")


def _raw_text(data: bytes) -> str:
    return _clean_text(data.decode("utf-8", errors="replace"))


# --- file names --------------------------------------------------------------------------------


def safe_filename(name: str | None, number: int = 0, content_type: str = "") -> str:
    """A download name that is only a name: no directories, control or format characters,
    Windows-reserved names or characters, leading dots; at most MAX_FILENAME bytes with the
    extension kept. Nothing usable left gives `attachment-<number+1>.bin` (`.txt` for text/plain,
    `.eml` for message/rfc822)."""
    text = unicodedata.normalize("NFC", name or "")
    text = re.split(r"[/\\]", text)[-1]
    text = "".join(" " if unicodedata.category(char)[0] == "Z" else char for char in text
                   if unicodedata.category(char)[0] != "C")
    text = _UNSAFE_CHARS.sub("_", text)
    text = re.sub(r" {2,}", " ", text).strip(" .")
    if _RESERVED.fullmatch(text.split(".")[0].strip()):
        text = "_" + text
    text = _shorten(text)
    if not any(char.isalnum() for char in text):
        return f"attachment-{number + 1}{_FALLBACK_SUFFIX.get(content_type, '.bin')}"
    return text


def _shorten(text: str) -> str:
    if len(text.encode("utf-8")) <= MAX_FILENAME:
        return text
    stem, dot, extension = text.rpartition(".")
    if not dot or len(extension) > 16:
        stem, dot, extension = text, "", ""
    room = MAX_FILENAME - len((dot + extension).encode("utf-8"))
    cut = stem.encode("utf-8")[:room].decode("utf-8", errors="ignore").rstrip(" .")
    return cut + dot + extension


# --- HTML --------------------------------------------------------------------------------------

_TAGS = {
    "a", "abbr", "b", "big", "blockquote", "br", "caption", "center", "cite", "code", "col", "colgroup",
    "dd", "del", "dfn", "div", "dl", "dt", "em", "font", "h1", "h2", "h3", "h4", "h5", "h6", "hr", "i",
    "img", "ins", "kbd", "li", "mark", "ol", "p", "pre", "q", "s", "samp", "small", "span", "strike",
    "strong", "sub", "sup", "table", "tbody", "td", "tfoot", "th", "thead", "tr", "tt", "u", "ul",
    "var",
}
# Dropped with everything inside them (their text is code, or not meant to be read).
_DROP_WITH_CONTENT = {
    "script", "style", "title", "noscript", "template", "textarea", "select", "iframe", "frame",
    "frameset", "noframes", "object", "embed", "applet", "svg", "math", "noembed", "xmp", "button",
}
_ATTRIBUTES = {
    "*": {"align", "valign", "dir", "lang", "title", "width", "height", "style", "bgcolor"},
    "a": {"href", "name"},
    "img": {"src", "alt"},
    "font": {"color", "face", "size"},
    "table": {"border", "cellpadding", "cellspacing", "summary"},
    "td": {"colspan", "rowspan", "nowrap"},
    "th": {"colspan", "rowspan", "nowrap", "scope"},
    "col": {"span"},
    "colgroup": {"span"},
    "ol": {"start", "type"},
    "ul": {"type"},
    "li": {"value"},
}
# CSS properties that cannot name a URL; `background`, `list-style`, `content`, `border-image`,
# `cursor`, `filter`, `position` and the rest are dropped.
_STYLE_PROPERTIES = {
    "color", "background-color", "font", "font-family", "font-size", "font-style", "font-weight",
    "font-variant", "text-align", "text-decoration", "text-indent", "text-transform", "line-height",
    "letter-spacing", "word-spacing", "white-space", "vertical-align", "direction", "display",
    "width", "height", "max-width", "min-width", "max-height", "min-height",
    "margin", "margin-top", "margin-right", "margin-bottom", "margin-left",
    "padding", "padding-top", "padding-right", "padding-bottom", "padding-left",
    "border", "border-top", "border-right", "border-bottom", "border-left", "border-color",
    "border-style", "border-width", "border-radius", "border-collapse", "border-spacing",
    "table-layout", "list-style-type", "word-break", "word-wrap", "overflow-wrap",
}
_LINK_SCHEMES = ("http:", "https:", "mailto:")
_DATA_IMAGE = re.compile(r"data:image/(png|gif|jpeg|webp);base64,[A-Za-z0-9+/=\s]*", re.IGNORECASE)
# Anything in a style value that could fetch, run or smuggle (CSS escapes) something.
_STYLE_DANGER = re.compile(r"url\s*\(|image|expression|@import|behavior|binding|\\|javascript:",
                           re.IGNORECASE)


def _attribute_filter(tag: str, attribute: str, value: str) -> str | None:
    """Second line after nh3's lists: links only to the web or mail, images only inline."""
    if attribute == "href":
        return value if value.strip().lower().startswith(_LINK_SCHEMES) else None
    if attribute == "src":
        return value if _DATA_IMAGE.fullmatch(value.strip()) else None
    if attribute == "style":
        return None if _STYLE_DANGER.search(value) else value
    return value


_CLEANER = nh3.Cleaner(
    tags=_TAGS,
    clean_content_tags=_DROP_WITH_CONTENT,
    attributes=_ATTRIBUTES,
    attribute_filter=_attribute_filter,
    strip_comments=True,
    link_rel="noopener noreferrer",
    set_tag_attribute_values={"a": {"target": "_blank"}},
    url_schemes={"http", "https", "mailto", "data"},
    url_relative="deny",
    filter_style_properties=_STYLE_PROPERTIES,
)


def sanitise_html(html: str) -> str:
    """HTML safe to show: allowed tags and attributes only, nothing that loads or runs."""
    return _CLEANER.clean(html)


class _TextExtractor(HTMLParser):
    _SKIP = {"script", "style", "head", "title", "noscript", "template"}
    _BLOCK = {"address", "blockquote", "br", "div", "dl", "dd", "dt", "h1", "h2", "h3", "h4", "h5",
              "h6", "hr", "li", "ol", "p", "pre", "table", "tr", "ul"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skipping = 0

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag in self._SKIP:
            self.skipping += 1
        elif tag in self._BLOCK:
            self.parts.append("\n* " if tag == "li" else "\n")
        elif tag in ("td", "th"):
            self.parts.append(" ")

    def handle_endtag(self, tag: str) -> None:
        if tag in self._SKIP:
            self.skipping = max(0, self.skipping - 1)
        elif tag in self._BLOCK and tag != "li":
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self.skipping:
            self.parts.append(data)


def html_to_text(html: str) -> str:
    """Readable text from HTML: tags gone, entities decoded, one blank line between blocks."""
    extractor = _TextExtractor()
    try:
        extractor.feed(html)
        extractor.close()
    except (AssertionError, ValueError):  # HTMLParser on some broken declarations
        pass
    lines = [re.sub(r"[ \t\r\f\v\xa0]+", " ", line).strip() for line in "".join(extractor.parts).split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip("\n")
