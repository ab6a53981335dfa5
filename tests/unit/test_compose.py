"""Composing in the webmail: messages that parse back to what was typed, no header injection,
checked recipients, and replies and forwards as mail clients make them."""

from __future__ import annotations

import email.generator
import re
from email import policy
from email.parser import BytesParser
from email.utils import parsedate_to_datetime

import pytest

from relay import headers
from relay.addresses import parse_mailbox
from relay.delivery.submit import own_from
from relay.webmail.compose import ComposeError, Draft, build, forward, recipients, reply

ALICE = "alice@example.com"

ORIGINAL = (b"Return-Path: <zoe@other.test>\r\nDelivered-To: alice@example.com\r\n"
            b"From: =?utf-8?q?Zo=C3=AB?= Weiss <zoe@other.test>\r\n"
            b"To: Alice <Alice@Example.com>, \"Smith, Bob\" <bob@example.com>\r\n"
            b"Cc: carol@third.test, alice@example.com, zoe@other.test\r\n"
            b"Subject: RE: Re: caf\xc3\xa9 plans\r\nDate: Tue, 01 Dec 2026 10:00:00 +0100\r\n"
            b"Message-ID: <m2@other.test>\r\nReferences: <m0@other.test> <m1@other.test>\r\n"
            b"In-Reply-To: <m1@other.test>\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
            b"Gr\xc3\xbc\xc3\x9fe,\r\n> earlier quote\r\n\r\nZo\xc3\xab\r\n")


def parse(data: bytes):
    return BytesParser(policy=policy.default).parsebytes(data)


def content(part) -> str:
    """A text part's content with the message's CRLF line ends read as newlines."""
    return part.get_content().replace("\r\n", "\n")


def simple(**changes) -> bytes:
    fields = {"from_addr": f"Alice Example <{ALICE}>", "to": "bob@example.com", "cc": "", "bcc": "",
              "subject": "hello", "body_text": "hi\n"}
    fields.update(changes)
    return build(**fields)


# --- build ----------------------------------------------------------------------------------------


def test_build_round_trips_utf8_headers_body_and_attachments():
    body = "Grüße — €100\r\nline two\n\n" + "long " * 300 + "\n.leading dot\n"
    data = build(f"Älice Exämple <{ALICE}>", "Bob Smith <bob@example.com>, \"Doe, Jane\" <jane@example.org>",
                 "Zoë <zoe@bücher.test>", "hidden@example.net", "Ünïcödé subject — " + "x" * 120, body,
                 attachments=[("résumé.pdf", "application/pdf", b"%PDF-\x00\xff" * 50),
                              ("notes.txt", "text/plain", "Grüße".encode()),
                              ("../../etc/passwd", "Application/Octet-Stream", b"root")])
    assert data.isascii()  # 7-bit clean: encoded-words, quoted-printable, base64
    assert b"\n" not in data.replace(b"\r\n", b"")  # CRLF only
    assert max(len(line) for line in data.split(b"\r\n")) <= 998
    message = parse(data)
    assert str(message["From"]) == f"Älice Exämple <{ALICE}>"
    assert [a.addr_spec for a in message["To"].addresses] == ["bob@example.com", "jane@example.org"]
    assert message["To"].addresses[1].display_name == "Doe, Jane"
    assert message["Cc"].addresses[0].addr_spec == "zoe@xn--bcher-kva.test"
    assert str(message["Bcc"]) == "hidden@example.net"  # Submitter.submit strips it from what goes out
    assert str(message["Subject"]) == "Ünïcödé subject — " + "x" * 120
    assert message["MIME-Version"] == "1.0"
    assert parsedate_to_datetime(str(message["Date"])).tzinfo is not None
    assert re.fullmatch(r"<[^<>@\s]+@example\.com>", str(message["Message-ID"]))
    text = message.get_body(("plain",))
    assert content(text) == body.replace("\r\n", "\n")
    assert text["Content-Transfer-Encoding"] == "quoted-printable"
    found = [(p.get_filename(), p.get_content_type(), p.get_payload(decode=True))
             for p in message.iter_attachments()]
    assert found == [("résumé.pdf", "application/pdf", b"%PDF-\x00\xff" * 50),
                     ("notes.txt", "text/plain", "Grüße".encode()),
                     ("passwd", "application/octet-stream", b"root")]


def test_ascii_message_is_simple_and_passes_the_sender_check():
    data = simple(hostname="relay.example.com")
    message = parse(data)
    assert message.get_content_type() == "text/plain" and content(message) == "hi\n"
    assert str(message["Message-ID"]).endswith("@relay.example.com>")
    own_from(parse_mailbox(ALICE), data)  # what Submitter.submit checks first: no exception
    assert headers.addresses(data, "To", "Cc", "Bcc") == ["bob@example.com"]


def test_threading_headers():
    message = parse(simple(in_reply_to="<m2@other.test>", references="<m0@x> <m1@x>  <m2@other.test>"))
    assert str(message["In-Reply-To"]) == "<m2@other.test>"
    assert str(message["References"]) == "<m0@x> <m1@x> <m2@other.test>"
    many = " ".join(f"<id{n}@x>" for n in range(50))
    refs = str(parse(simple(references=many))["References"]).split()
    assert len(refs) == 20 and refs[0] == "<id0@x>" and refs[-1] == "<id49@x>"


@pytest.mark.parametrize("field", ["to", "cc", "bcc", "subject", "from_addr", "in_reply_to", "references"])
@pytest.mark.parametrize("evil", ["\r\nBcc: victim@evil.test", "\nX-Injected: 1", "\rX: 1", "a\x00b",
                                  "x\u2028y", "x\x85y", "x\x0bBcc: v@evil.test"])
def test_header_injection_is_refused(field, evil):
    base = {"to": "bob@example.com", "cc": "", "bcc": "", "subject": "s", "from_addr": ALICE,
            "in_reply_to": "<a@b>", "references": "<a@b>"}
    base[field] = (base[field] or "carol@example.com") + evil
    with pytest.raises(ComposeError) as caught:
        build(base.pop("from_addr"), base.pop("to"), base.pop("cc"), base.pop("bcc"), base.pop("subject"),
              "body", **base)
    assert isinstance(caught.value, ValueError)


def test_attachment_names_with_line_breaks_are_refused():
    with pytest.raises(ComposeError):
        simple(attachments=[("a\r\nContent-Type: text/html\r\n.txt", "text/plain", b"x")])


@pytest.mark.parametrize("to", ["not an address", "bob@", "@example.com", "bob@localhost", "a@b@c.example",
                                '"quoted local"@example.com', "bob@exa mple.com", "../etc@example.com",
                                "bob@example.com, , nobody", "Bob <bob@exa mple.com>",
                                "<>", "bob@-bad-.com"])
def test_bad_recipients_are_refused(to):
    with pytest.raises(ComposeError):
        simple(to=to)


def test_a_utf8_local_part_is_written_in_utf8_headers_not_as_an_encoded_word():
    """Issue 8.2: the webmail refused UTF-8 local parts (an encoded-word cannot be an address,
    RFC 2047 5); such a message is now written with UTF-8 headers (RFC 6532), for SMTPUTF8."""
    for sender, to in (("Jürgen <jürgen@example.com>", "bob@example.org"),
                       ("alice@example.com", "Müller <müller@example.org>")):
        data = build(sender, to, subject="grüße", body_text="hallo")
        head = headers.split(data)[0]
        assert b"=?" not in head and "Subject: grüße\r\n".encode() in head
        assert headers.addresses(data, "From") == [sender.split("<")[-1].rstrip(">")]
        assert headers.addresses(data, "To") == [to.split("<")[-1].rstrip(">")]
        assert recipients(to) == [to.split("<")[-1].rstrip(">")]
    ascii_only = build("alice@example.com", "bob@example.org", subject="grüße", body_text="x")
    assert headers.split(ascii_only)[0].isascii()        # encoded-words, as before


def test_no_recipient_and_bad_sender_are_refused():
    with pytest.raises(ComposeError):
        simple(to="", cc="", bcc="")
    with pytest.raises(ComposeError):
        simple(from_addr="alice@example.com, mallory@example.com")


def test_recipients_are_the_envelope():
    assert recipients("Bob <bob@example.com>, carol@example.com", ["BOB@example.com"], "x@y.test") == [
        "bob@example.com", "carol@example.com", "x@y.test"]
    assert build(ALICE, ["bob@example.com", "Carol <carol@example.com>"], subject="s", body_text="b")


def test_empty_groups_are_no_recipients():
    assert recipients("undisclosed-recipients:;", "", "x@y.test") == ["x@y.test"]


# --- reply ----------------------------------------------------------------------------------------


def test_reply_goes_to_the_sender_once_with_re():
    draft = reply(ORIGINAL, ALICE)
    assert draft.to == "Zoë Weiss <zoe@other.test>" and draft.cc == "" and draft.bcc == ""
    assert draft.subject == "Re: café plans"
    assert draft.in_reply_to == "<m2@other.test>"
    assert draft.references == "<m0@other.test> <m1@other.test> <m2@other.test>"
    assert draft.body == ("\n\nOn Tue, 01 Dec 2026 10:00, Zoë Weiss <zoe@other.test> wrote:\n"
                          "> Grüße,\n> > earlier quote\n>\n> Zoë\n")


def test_reply_prefers_reply_to():
    data = ORIGINAL.replace(b"Subject:", b"Reply-To: The List <list@lists.test>\r\nSubject:")
    assert reply(data, ALICE).to == "The List <list@lists.test>"


def test_reply_all_copies_everyone_but_the_user():
    draft = reply(ORIGINAL, parse_mailbox(ALICE), all=True)
    assert draft.to == "Zoë Weiss <zoe@other.test>"
    assert draft.cc == '"Smith, Bob" <bob@example.com>, carol@third.test'


def test_reply_to_ones_own_message_goes_to_its_recipients():
    sent = (b"From: Alice <alice@example.com>\r\nTo: bob@example.com\r\nCc: carol@example.com\r\n"
            b"Subject: x\r\n\r\nhi\r\n")
    assert reply(sent, ALICE) == Draft(to="bob@example.com", subject="Re: x",
                                       body="\n\nAlice <alice@example.com> wrote:\n> hi\n")
    assert reply(sent, ALICE, all=True).cc == "carol@example.com"


@pytest.mark.parametrize("subject,expected", [
    ("hello", "Re: hello"), ("Re: hello", "Re: hello"), ("RE: re:Re : hello", "Re: hello"),
    ("Re[2]: hello", "Re: hello"), ("Fwd: hello", "Re: Fwd: hello"), ("", "Re: "),
])
def test_reply_subject(subject, expected):
    data = f"From: z@other.test\r\nSubject: {subject}\r\n\r\nx\r\n".encode()
    assert reply(data, ALICE).subject == expected


def test_reply_to_a_message_with_html_only_quotes_its_text():
    data = (b"From: z@other.test\r\nSubject: s\r\nContent-Type: text/html\r\n\r\n"
            b"<p>Hello <b>there</b></p><script>evil()</script>")
    assert reply(data, ALICE).body.endswith("wrote:\n> Hello there\n")


def test_reply_round_trips_through_build():
    draft = reply(ORIGINAL, ALICE, all=True)
    data = build(ALICE, draft.to, draft.cc, draft.bcc, draft.subject, "Thanks!" + draft.body,
                 in_reply_to=draft.in_reply_to, references=draft.references)
    message = parse(data)
    assert [a.addr_spec for a in message["To"].addresses] == ["zoe@other.test"]
    assert [a.addr_spec for a in message["Cc"].addresses] == ["bob@example.com", "carol@third.test"]
    assert str(message["Subject"]) == "Re: café plans"
    assert str(message["In-Reply-To"]) == "<m2@other.test>"
    assert content(message).startswith("Thanks!\n\nOn Tue")


def test_reply_to_headers_with_line_breaks_in_names_is_still_buildable():
    data = b"From: =?utf-8?q?Evil=0D=0ABcc=3A_x=40y=2Etest?= <evil@other.test>\r\nSubject: s\r\n\r\nx\r\n"
    draft = reply(data, ALICE)
    assert "\r" not in draft.to and "\n" not in draft.to
    message = parse(build(ALICE, draft.to, subject=draft.subject, body_text=draft.body))
    assert message["Bcc"] is None and message["To"].addresses[0].addr_spec == "evil@other.test"


# --- forward --------------------------------------------------------------------------------------


def test_forward_attaches_the_original_byte_for_byte():
    draft = forward(ORIGINAL)
    assert draft.subject == "Fwd: RE: Re: café plans" and draft.to == "" and draft.in_reply_to is None
    assert "---------- Forwarded message ----------\nFrom: Zoë Weiss <zoe@other.test>\n" in draft.body
    assert "Date: Tue, 01 Dec 2026 10:00:00 +0100\nSubject: RE: Re: café plans\n" in draft.body
    ((name, content_type, payload),) = draft.attachments
    assert (name, content_type, payload) == ("RE_ Re_ café plans.eml", "message/rfc822", ORIGINAL)
    data = build(ALICE, "dave@example.org", subject=draft.subject, body_text="FYI" + draft.body,
                 attachments=draft.attachments)
    assert ORIGINAL in data  # 8-bit headers and body untouched (already CRLF)
    message = parse(data)
    (part,) = message.iter_attachments()
    assert part.get_content_type() == "message/rfc822" and part["Content-Transfer-Encoding"] == "8bit"
    assert part.get_filename() == "RE_ Re_ café plans.eml"
    inner = part.get_content()
    assert str(inner["Subject"]) == "RE: Re: café plans" and inner["Message-ID"] == "<m2@other.test>"
    assert content(message.get_body(("plain",))).startswith("FYI\n\n---------- Forwarded")


@pytest.mark.parametrize("subject,expected", [
    ("hello", "Fwd: hello"), ("Fwd: hello", "Fwd: hello"), ("FW: fwd:hello", "Fwd: hello"),
    ("Re: hello", "Fwd: Re: hello"),
])
def test_forward_subject(subject, expected):
    assert forward(f"From: z@other.test\r\nSubject: {subject}\r\n\r\nx\r\n".encode()).subject == expected


def test_forward_of_an_lf_message_is_made_crlf_and_ascii_stays_7bit():
    original = b"From: z@other.test\nSubject: lf\n\nline\n"
    data = build(ALICE, "d@example.org", subject="s", body_text="b",
                 attachments=forward(original).attachments)
    assert b"From: z@other.test\r\nSubject: lf\r\n\r\nline\r\n" in data
    assert b"\n" not in data.replace(b"\r\n", b"")
    (part,) = parse(data).iter_attachments()
    assert part["Content-Transfer-Encoding"] == "7bit"


def test_forwarded_message_holding_the_boundary_gets_another(monkeypatch):
    """The enclosed message is spliced in after `email` chose a boundary: one that occurs in it
    must be replaced, or the MIME structure would break."""
    monkeypatch.setattr(email.generator.Generator, "_make_boundary",
                        classmethod(lambda cls, text=None: "CLASH"))
    original = b"From: z@other.test\r\nSubject: tricky\r\n\r\n--CLASH\r\nnot a part\r\n--CLASH--\r\n"
    data = build(ALICE, "d@example.org", subject="s", body_text="b",
                 attachments=forward(original).attachments)
    message = parse(data)
    assert message.get_boundary() != "CLASH"
    (part,) = message.iter_attachments()
    assert content(part.get_content()) == "--CLASH\nnot a part\n--CLASH--\n"
