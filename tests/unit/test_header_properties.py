"""Properties of the header reader and editor, and of the webmail's MIME decoding (issue 9.3):
a remote sender controls every byte, so nothing may raise on any input, and an edit changes only
the field it was asked to change."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay import headers
from relay.webmail import render

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
NAMES = ["Subject", "From", "To", "Cc", "Bcc", "Reply-To", "Date", "Content-Type", "X-Odd"]

# Header names as ftext (printable ASCII but ":"), values as any bytes without line ends.
field_names = st.sampled_from(NAMES) | st.text(
    st.characters(min_codepoint=33, max_codepoint=126, blacklist_characters=":"), min_size=1, max_size=12)
line_bytes = st.binary(max_size=60).map(lambda b: b.replace(b"\n", b"").replace(b"\r", b""))
# Text that looks like RFC 2047 words with hostile charsets, encodings and payloads.
encoded_words = st.builds(
    lambda cs, enc, text: f"=?{cs}?{enc}?{text}?=".encode("utf-8", "surrogatepass"),
    st.sampled_from(["utf-8", "x\x00", "nonexistent", "iso-8859-1", "utf-8*en", "", "utf-16"])
    | st.text(max_size=8),
    st.sampled_from(["q", "b", "Q", "B", "x"]),
    st.text(max_size=20)).map(lambda b: b.replace(b"\n", b"").replace(b"\r", b""))
values_ = st.lists(line_bytes | encoded_words, max_size=4).map(b" ".join)


@st.composite
def messages(draw) -> tuple[list[tuple[str, list[bytes]]], bytes, bytes]:
    """(fields as (name, value lines), line ending, body): a header block we can rebuild by hand."""
    eol = draw(st.sampled_from([b"\r\n", b"\n"]))
    fields = draw(st.lists(st.tuples(field_names, values_, st.lists(line_bytes, max_size=2)), max_size=8))
    built = [(name, [name.encode() + b": " + value] + [b"\t" + more for more in continuation])
             for name, value, continuation in fields]
    body = draw(st.binary(max_size=100))
    return built, eol, body


def assemble(fields: list[tuple[str, list[bytes]]], eol: bytes, body: bytes) -> bytes:
    return b"".join(line + eol for _, lines in fields for line in lines) + eol + body


@SETTINGS
@given(st.binary(max_size=400), st.sampled_from(NAMES))
def test_readers_never_raise_on_any_bytes(data, name):
    assert all(isinstance(v, str) for v in headers.values(data, name))
    assert all(isinstance(a, str) for a in headers.addresses(data, "To", "Cc", "Bcc"))
    headers.has_suffix(data)
    head, body = headers.split(data)
    assert head + body == data


@SETTINGS
@given(messages())
def test_values_of_encoded_words_never_raise(message):
    data = assemble(*message)
    for name in NAMES:
        headers.values(data, name)


@SETTINGS
@given(messages(), st.sampled_from(NAMES))
def test_remove_keeps_every_other_fields_bytes(message, name):
    fields, eol, body = message
    data = assemble(fields, eol, body)
    kept = [(n, lines) for n, lines in fields if n.lower() != name.lower()]
    assert headers.remove(data, name) == assemble(kept, eol, body)


@SETTINGS
@given(st.binary(max_size=400), st.sampled_from(NAMES))
def test_editors_never_raise_on_any_bytes(data, name):
    removed = headers.remove(data, name)
    assert headers.values(removed, name) == []
    suffixed = headers.append_to_subject(data)
    assert headers.remove(suffixed, "Subject") == headers.remove(data, "Subject") or \
        headers.values(data, "Subject") == []
    assert headers.set_header(data, name, "value").count(f"{name}: value".encode()) >= 1


@SETTINGS
@given(messages(), st.sampled_from(NAMES), st.text(max_size=40))
def test_set_header_changes_only_its_field(message, name, value):
    fields, eol, body = message
    data = assemble(fields, eol, body)
    if any(char in value for char in "\r\n\0"):
        with pytest.raises(ValueError):
            headers.set_header(data, name, value)
        return
    try:
        edited = headers.set_header(data, name, value)
    except UnicodeEncodeError:  # a lone surrogate is not text that can be written
        assert any(0xD800 <= ord(c) <= 0xDFFF for c in value)
        return
    assert headers.remove(edited, name) == headers.remove(data, name)
    line = f"{name}: {value}".encode() + eol
    assert len(headers.Block(edited).values(name)) == 1
    assert line in edited


@SETTINGS
@given(messages())
def test_append_to_subject_changes_only_the_subject(message):
    fields, eol, body = message
    data = assemble(fields, eol, body)
    edited = headers.append_to_subject(data)
    assert headers.remove(edited, "Subject") == headers.remove(data, "Subject")
    assert headers.split(edited)[1] == body
    assert len(headers.Block(edited).values("Subject")) == max(1, len(headers.Block(data).values("Subject")))


@pytest.mark.parametrize("name", ["", "a b", "a:b", "é", "a\nb"])
def test_set_header_refuses_a_bad_name(name):
    with pytest.raises(ValueError):
        headers.set_header(b"Subject: x\r\n\r\n", name, "v")


# --- the webmail's MIME decoding ----------------------------------------------------------------

mime_params = st.sampled_from([
    b'Content-Type: text/plain; charset="x\x00"', b"Content-Type: text/plain; charset=nonexistent",
    b"Content-Type: text/html; charset=utf-16", b"Content-Type: multipart/mixed",
    b'Content-Type: multipart/mixed; boundary="b"', b"Content-Type: message/rfc822",
    b"Content-Transfer-Encoding: base64", b"Content-Transfer-Encoding: quoted-printable",
    b"Content-Transfer-Encoding: x-uuencode", b"Content-Disposition: attachment; filename*=x\x00''%ff",
    b'Content-Disposition: attachment; filename="=?x\x00?q?a?="',
    b"Content-Disposition: attachment; filename*0*=utf-8''%e9; filename*1=x",
    b"Content-Type: application/octet-stream; name*=bad''%zz"]) | line_bytes.map(
    lambda v: b"Content-Type: " + v)


@st.composite
def mime_messages(draw) -> bytes:
    head = draw(st.lists(mime_params, max_size=4))
    parts = draw(st.lists(st.tuples(st.lists(mime_params, max_size=3), st.binary(max_size=60)),
                          max_size=3))
    body = b"".join(b"--b\r\n" + b"".join(h + b"\r\n" for h in ph) + b"\r\n" + pb + b"\r\n"
                    for ph, pb in parts) + draw(st.sampled_from([b"--b--\r\n", b"", b"--b"]))
    return b"Subject: x\r\n" + b"".join(h + b"\r\n" for h in head) + b"\r\n" + body


def check_view(data: bytes) -> None:
    shown = render.view(data)
    assert isinstance(shown.text, str) and isinstance(shown.subject, str)
    for item in shown.attachments:
        try:
            name, content_type, payload = render.attachment(data, item.index)
        except render.NoAttachmentError:
            continue
        assert isinstance(name, str) and isinstance(payload, bytes)
    with pytest.raises(render.NoAttachmentError):
        render.attachment(data, len(shown.attachments) + 1000)


@SETTINGS
@given(st.binary(max_size=500))
def test_view_and_attachment_never_raise_on_any_bytes(data):
    check_view(data)


@SETTINGS
@given(mime_messages())
def test_view_and_attachment_never_raise_on_hostile_mime(data):
    check_view(data)


@SETTINGS
@given(st.text(max_size=80) | st.none(), st.integers(0, 50), st.text(max_size=30))
def test_safe_filename_never_raises(name, number, content_type):
    result = render.safe_filename(name, number, content_type)
    assert result and "/" not in result and "\x00" not in result


# Address lists made of the characters that decide how one is split: `headers.addresses` reads a
# plain list itself (for speed) and must read it exactly as `email.utils.getaddresses` does.
_ADDRESS_CHARS = st.sampled_from(list("ab.Z_-+=?'/%!#$&*^`{|}~ \t<>@,") + ["é", "\u00a0", "\x00", "\x0b"])
_address_text = st.lists(_ADDRESS_CHARS, max_size=30).map("".join)
_address_entries = st.one_of(
    _address_text,
    st.builds(lambda display, local, domain: f"{display} <{local}@{domain}>", _address_text, _address_text,
              _address_text),
    st.builds(lambda local, domain: f"{local}@{domain}", _address_text, _address_text))


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_address_entries, max_size=4), st.sampled_from([", ", ","]))
def test_a_plain_address_list_is_read_as_the_email_package_reads_it(entries, comma):
    from email.utils import getaddresses
    text = comma.join(entries)
    plain = headers._plain_addresses(text)
    if plain is not None:
        assert plain == [addr for _display, addr in getaddresses([text]) if addr]


def test_plain_and_subtle_address_lists_both_give_their_addresses():
    head = (b'From: Alice <alice@example.com>\r\nTo: bob@example.org, "Smith, C" <c@example.net>,\r\n'
            b" Dan <dan@example.com>\r\nCc: (comment) eve@example.com, undisclosed-recipients:;\r\n\r\n")
    assert headers._plain_addresses("Alice <alice@example.com>, bob@example.org") == [
        "alice@example.com", "bob@example.org"]
    assert headers._plain_addresses('"Smith, C" <c@example.net>') is None      # quotes: the parser's
    assert headers.addresses(head, "From", "To", "Cc") == [
        "alice@example.com", "bob@example.org", "c@example.net", "dan@example.com", "eve@example.com"]
