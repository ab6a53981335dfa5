"""Showing messages in the webmail: text first, HTML only sanitised and without anything that
loads or runs, attachments with names that are only names, and malformed MIME shown raw."""

from __future__ import annotations

import base64
import re

import pytest

import relay.webmail.render as render
from relay.webmail.render import (
    NoAttachmentError,
    attachment,
    html_to_text,
    safe_filename,
    sanitise_html,
    view,
)

PLAIN = (b"From: =?utf-8?q?Zo=C3=AB?= <zoe@other.test>\r\nTo: alice@example.com\r\n"
         b"Cc: Bob <bob@example.com>\r\nReply-To: list@other.test\r\n"
         b"Subject: caf\xc3\xa9 =?utf-8?b?4oKs?=\r\nDate: Tue, 01 Dec 2026 10:00:00 +0100\r\n"
         b"Message-ID: <m1@other.test>\r\nMIME-Version: 1.0\r\n"
         b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
         b"Gr\xc3\xbc\xc3\x9fe\r\n<b>not html</b>\r\n")

HOSTILE_HTML = """<html><head><title>Title text</title>
<style>body { background: url(http://evil.test/css.png) }</style>
<script>alert('script body')</script><link rel="stylesheet" href="http://evil.test/x.css">
<meta http-equiv="refresh" content="0;url=http://evil.test/"><base href="http://evil.test/"></head>
<body onload="alert('onload')">
<p onclick="alert('click')" style="color: red">Hello <b>world</b></p>
<img src="http://evil.test/track.png" alt="tracker"><img src='https://evil.test/t2.gif'>
<img src="cid:logo@x" alt="logo"><img srcset="http://evil.test/a.png 1x" src="data:image/png;base64,iVBORw0K">
<div style="background:url(http://evil.test/bg.png)">styled</div>
<div style="background-image: u\\72l(http://evil.test/esc.png); color: blue">escaped</div>
<table background="http://evil.test/table.png"><tr><td background="http://evil.test/td.png">cell</td></tr></table>
<a href="javascript:alert('js')">js link</a> <a href=" JaVaScRiPt:alert(1)">js2</a>
<a href="vbscript:msgbox">vb</a> <a href="data:text/html,<script>alert(1)</script>">data link</a>
<a href="/logout">relative</a> <a href="https://good.test/page" target="_self">good link</a>
<a href="mailto:x@good.test">mail</a>
<iframe src="http://evil.test/frame">frame text</iframe><object data="http://evil.test/o">obj</object>
<embed src="http://evil.test/e"><svg><image href="http://evil.test/svg.png"/></svg>
<video poster="http://evil.test/p.png" src="http://evil.test/v.mp4"></video>
<form action="http://evil.test/steal"><input name="password" value="pw"><textarea>typed</textarea>
<button formaction="http://evil.test/">Go</button></form>
<p style="position: fixed; top: 0">overlay</p>
</body></html>"""


def mime(*parts: bytes, subtype: str = "mixed", boundary: str = "XYZ", head: bytes = b"") -> bytes:
    body = b"".join(b"--" + boundary.encode() + b"\r\n" + part + b"\r\n" for part in parts)
    return (b"From: a@x.test\r\nSubject: multi\r\nMIME-Version: 1.0\r\n" + head
            + f'Content-Type: multipart/{subtype}; boundary="{boundary}"\r\n\r\n'.encode()
            + body + b"--" + boundary.encode() + b"--\r\n")


def part(content_type: str, body: bytes, *extra: str) -> bytes:
    lines = [f"Content-Type: {content_type}", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def attached(name_header: str, data: bytes = b"payload", content_type: str = "application/pdf") -> bytes:
    return part(content_type, base64.b64encode(data), "Content-Transfer-Encoding: base64", name_header)


# --- text and headers -----------------------------------------------------------------------------


def test_plain_text_message():
    shown = view(PLAIN)
    assert shown.subject == "café €"
    assert shown.from_ == "Zoë <zoe@other.test>"
    assert shown.to == "alice@example.com" and shown.cc == "Bob <bob@example.com>"
    assert shown.reply_to == "list@other.test" and shown.message_id == "<m1@other.test>"
    assert shown.date is not None and shown.date.isoformat() == "2026-12-01T10:00:00+01:00"
    assert shown.text == "Grüße\n<b>not html</b>\n"
    assert shown.html is None and not shown.text_from_html and not shown.raw
    assert shown.attachments == ()


def test_message_without_mime_headers_is_text():
    shown = view(b"Subject: old\r\n\r\nplain old\r\nmail\r\n")
    assert shown.text == "plain old\nmail\n" and shown.html is None


def test_alternative_prefers_plain_and_keeps_sanitised_html():
    data = mime(part("text/plain; charset=utf-8", b"the text"),
                part("text/html; charset=utf-8", b"<p onclick='x()'>the <b>html</b></p><script>x()</script>"),
                subtype="alternative")
    shown = view(data)
    assert shown.text == "the text" and not shown.text_from_html
    assert shown.html == "<p>the <b>html</b></p>"
    assert shown.attachments == ()


def test_html_only_is_sanitised_with_a_text_fallback():
    shown = view(part("text/html; charset=utf-8", HOSTILE_HTML.encode()).replace(
        b"Content-Type", b"From: a@x.test\r\nMIME-Version: 1.0\r\nContent-Type", 1))
    assert shown.text_from_html and shown.html is not None
    html = shown.html
    for forbidden in ("<script", "alert", "<style", "<link", "<meta", "<base", "<iframe", "<object",
                      "<embed", "<svg", "<video", "<form", "<input", "<textarea", "<button", "onclick",
                      "onload", "evil.test", "url(", "javascript", "vbscript", "data:text", "cid:", "srcset",
                      "background=", "position", "/logout", "Title text", "typed"):
        assert forbidden.lower() not in html.lower(), forbidden
    assert '<p style="color:red">Hello <b>world</b></p>' in html
    assert '<img src="data:image/png;base64,iVBORw0K">' in html  # inline data: loads nothing
    assert 'alt="tracker"' in html  # the image is gone, its alt text stays
    good = re.search(r'<a [^>]*href="https://good.test/page"[^>]*>', html).group()
    assert 'rel="noopener noreferrer"' in good and 'target="_blank"' in good and "_self" not in good
    assert 'href="mailto:x@good.test"' in html
    for anchor in re.findall(r"<a [^>]*>", html):
        assert 'rel="noopener noreferrer"' in anchor and 'target="_blank"' in anchor
        assert re.search(r'href="(https://|mailto:)', anchor) or "href" not in anchor
    assert "Hello world" in shown.text and "cell" in shown.text and "good link" in shown.text
    for hidden in ("script body", "alert", "Title text", "background"):
        assert hidden not in shown.text


@pytest.mark.parametrize("dirty,clean", [
    ('<img src="http://evil.test/x.png">', "<img>"),
    ('<IMG SRC=http://evil.test/x.png>', "<img>"),
    ('<div style="background:url(http://evil.test/)">x</div>', "<div>x</div>"),
    ('<div style="BACKGROUND: URL(&quot;http://evil.test/&quot;)">x</div>', "<div>x</div>"),
    ('<p onclick="alert(1)" onmouseover="alert(2)">x</p>', "<p>x</p>"),
    ('<a href="javascript:alert(1)">x</a>', '<a target="_blank" rel="noopener noreferrer">x</a>'),
    ('<a href="java&#x09;script:alert(1)">x</a>', '<a target="_blank" rel="noopener noreferrer">x</a>'),
    ("<script>alert(1)</script>ok", "ok"),
    ("<scr<script>ipt>alert(1)</script>", "ipt&gt;alert(1)"),
    ('<svg onload="alert(1)"><circle/></svg>ok', "ok"),
    ("<!-- <img src=http://evil.test/> -->ok", "ok"),
])
def test_sanitiser_cases(dirty, clean):
    assert sanitise_html(dirty) == clean


def test_html_to_text():
    text = html_to_text("<html><head><title>T</title><style>p{}</style></head><body><p>One&nbsp;&amp;"
                        "<br>two</p><ul><li>a</li><li>b</li></ul><table><tr><td>c1</td><td>c2</td></tr>"
                        "</table><script>nope()</script></body></html>")
    assert text == "One &\ntwo\n\n* a\n* b\n\nc1 c2"


# --- attachments ----------------------------------------------------------------------------------


def test_attachments_with_hostile_and_encoded_names():
    data = mime(
        part("text/plain; charset=utf-8", b"see attached"),
        attached('Content-Disposition: attachment; filename="../../etc/passwd"', b"one"),
        attached('Content-Disposition: attachment; filename="con.txt"', b"two", "text/plain"),
        attached("Content-Disposition: attachment; filename*=utf-8''evil%0D%0Aname%00%1B.exe", b"three"),
        attached("Content-Disposition: attachment; filename*=utf-8''r%C3%A9sum%C3%A9.pdf", b"four"),
        attached("Content-Disposition: attachment; filename*0*=utf-8''Gr%C3%BC%C3%9Fe%20und; "
                 "filename*1*=%20mehr.txt", b"five", "text/plain"),
        attached('Content-Type: application/pdf; name="=?utf-8?b?w6l0w6kucGRm?="', b"six",
                 "application/pdf; name=\"=?utf-8?b?w6l0w6kucGRm?=\""),
        attached('Content-Disposition: attachment; filename="C:\\\\Users\\\\x\\\\..\\\\report.doc"',
                 b"seven"),
        attached("Content-Disposition: attachment", b"eight", "application/x-unknown"),
        attached("Content-Disposition: attachment; filename*=utf-8''%E2%80%AEgpj.exe", b"nine"),
    )
    shown = view(data)
    assert shown.text == "see attached"
    assert [a.filename for a in shown.attachments] == [
        "passwd", "_con.txt", "evilname.exe", "résumé.pdf", "Grüße und mehr.txt", "été.pdf",
        "report.doc", "attachment-8.bin", "gpj.exe"]
    assert [a.index for a in shown.attachments] == list(range(9))
    assert shown.attachments[0].content_type == "application/pdf" and shown.attachments[0].size == 3
    for index, expected in enumerate([b"one", b"two", b"three", b"four", b"five", b"six", b"seven", b"eight",
                                      b"nine"]):
        name, content_type, payload = attachment(data, index)
        assert payload == expected and name == shown.attachments[index].filename
        assert "/" not in name and "\\" not in name and name.isprintable()
    with pytest.raises(NoAttachmentError):
        attachment(data, 9)
    with pytest.raises(NoAttachmentError):
        attachment(data, -1)


def test_nested_parts_and_forwarded_messages():
    inner = b"From: x@y.test\r\nSubject: inner one\r\n\r\ninner body\r\n"
    data = mime(
        mime(part("text/plain", b"outer text"), part("text/html", b"<p>outer html</p>"),
             subtype="alternative", boundary="ALT").split(b"\r\n", 3)[3],  # drop From/Subject/MIME-Version
        part("message/rfc822", inner, "Content-Disposition: attachment"),
        mime(part("image/png", base64.b64encode(b"png"), "Content-Transfer-Encoding: base64",
                  'Content-Disposition: inline; filename="pic.png"'), subtype="related",
             boundary="REL").split(b"\r\n", 3)[3],
    )
    shown = view(data)
    assert shown.text == "outer text" and shown.html == "<p>outer html</p>"
    assert [(a.filename, a.content_type) for a in shown.attachments] == [
        ("attachment-1.eml", "message/rfc822"), ("pic.png", "image/png")]
    name, content_type, payload = attachment(data, 0)
    assert b"Subject: inner one" in payload and b"inner body" in payload
    assert attachment(data, 1) == ("pic.png", "image/png", b"png")


def test_content_types_that_could_inject_become_octet_stream():
    data = mime(part("text/plain", b"x"), part('application/x"evil\\; name=a.bin', b"y",
                                              'Content-Disposition: attachment; filename="a.bin"'))
    for found in view(data).attachments:
        assert re.fullmatch(r"[a-z0-9.+-]+/[a-z0-9.+-]+", found.content_type)


@pytest.mark.parametrize("name,expected", [
    ("../../etc/passwd", "passwd"), ("..\\..\\boot.ini", "boot.ini"), ("con.txt", "_con.txt"),
    ("CON", "_CON"), ("Nul.tar.gz", "_Nul.tar.gz"), ("lpt1", "_lpt1"), ("com9.log", "_com9.log"),
    ("a\x00b\r\nc\x7f.pdf", "abc.pdf"), ("tab\there.txt", "tabhere.txt"), ("..", "attachment-1.bin"),
    (".bashrc", "bashrc"), ("report.pdf.", "report.pdf"), ("  spaced  name .doc ", "spaced name .doc"),
    ('a<b>c:d"e|f?g*h.txt', "a_b_c_d_e_f_g_h.txt"), ("\u202egpj.exe", "gpj.exe"), ("", "attachment-1.bin"),
    (None, "attachment-1.bin"), ("???", "attachment-1.bin"), ("e\u0301te\u0301.txt", "été.txt"),
    ("no\u00a0break.txt", "no break.txt"),
])
def test_safe_filename(name, expected):
    assert safe_filename(name, 0) == expected


def test_safe_filename_limits_length_and_keeps_the_extension():
    name = safe_filename("ü" * 300 + ".pdf")
    assert name.endswith(".pdf") and len(name.encode()) <= render.MAX_FILENAME
    assert safe_filename(None, 4, "message/rfc822") == "attachment-5.eml"
    assert safe_filename(None, 0, "text/plain") == "attachment-1.txt"


# --- malformed MIME -------------------------------------------------------------------------------


def test_multipart_without_boundary_is_shown_raw():
    data = b"From: a@x.test\r\nSubject: broken\r\nContent-Type: multipart/mixed\r\n\r\n--zz\r\nsome text\r\n"
    shown = view(data)
    assert shown.raw and "some text" in shown.text and "Subject: broken" in shown.text
    assert shown.subject == "broken" and shown.attachments == ()
    with pytest.raises(NoAttachmentError):
        attachment(data, 0)


def test_parser_errors_fall_back_to_raw_text(monkeypatch):
    def broken(data):
        raise IndexError("bug in the email package")

    monkeypatch.setattr(render, "_parse", broken)
    shown = view(PLAIN)
    assert shown.raw and shown.subject == "café €" and "Grüße" in shown.text
    with pytest.raises(NoAttachmentError):
        attachment(PLAIN, 0)


@pytest.mark.parametrize("data", [
    b"",
    b"\x00\x01\x02\xff\xfe",
    b"no headers at all",
    b"Content-Type: text/plain; charset=x-no-such-charset\r\n\r\nbody \xe9\r\n",
    b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n\r\n"
    b"!!!not base64***\r\n",
    b"Content-Type: multipart/mixed; boundary=a\r\n\r\n--a\r\nContent-Type: text/plain\r\n\r\nno end\r\n",
    b"Content-Type: multipart/mixed; boundary=a\r\n\r\nno start boundary at all\r\n",
    b"Content-Type: text/html\r\n\r\n<p <<< <!-- <![CDATA[ <!DOCTYPE",
    b"Content-Type: ;;;\r\nContent-Disposition: attachment; filename*=bogus''%%%\r\n\r\nx",
    b"From: \"unterminated <a@b\r\nTo: ,,,@@@<<>>\r\nSubject: =?utf-8?b?####?=\r\n\r\nx",
    b"Content-Type: message/rfc822\r\n\r\nnot really a message",
    b"Content-Type: multipart/mixed; boundary=b\r\n\r\n"
    + b"--b\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n" * 200,
])
def test_malformed_messages_do_not_crash(data):
    shown = view(data)
    assert isinstance(shown.text, str)
    for found in shown.attachments[:3]:
        assert attachment(data, found.index)[0] == found.filename


def test_unknown_charset_is_read_as_utf8():
    shown = view(b"Content-Type: text/plain; charset=x-no-such-charset\r\n\r\ncaf\xc3\xa9\r\n")
    assert shown.text == "café\n"


def test_control_characters_do_not_reach_the_page():
    shown = view(b"Subject: a\x1b[31mred =?utf-8?q?x=0D=0Ay?=\r\n\r\nbody\x00with\x1bnul\r\n")
    assert shown.subject == "a [31mred x  y"
    assert shown.text == "bodywithnul\n"
