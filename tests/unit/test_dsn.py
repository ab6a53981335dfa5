"""Delivery status notifications: structure, status codes, the original's header bytes, hostile input."""

from __future__ import annotations

import email.policy
import itertools
import re
import time
from email.parser import BytesParser
from email.utils import parsedate_to_datetime

import pytest

from relay.delivery import dsn
from relay.delivery.dsn import build_dsn

NOW = 1_700_000_100.0
ARRIVAL = 1_700_000_000.0

ORIGINAL = (
    b"Received: from client.example.com (client.example.com [192.0.2.7])\r\n"
    b"\tby relay.example.net with ESMTP id 42\r\n"
    b"From: Sender <sender@example.com>\r\n"
    b"To: user@example.org\r\n"
    b"Subject: Gr\xc3\xbc\xc3\x9fe aus K\xc3\xb6ln\r\n"
    b"Message-ID: <orig-1@example.com>\r\n"
    b"\r\n"
    b"Secret body line one.\r\n"
    b"Secret body line two.\r\n"
)
ORIGINAL_HEADERS = ORIGINAL.split(b"\r\n\r\n")[0] + b"\r\n\r\n"


def make(**overrides) -> bytes:
    args = dict(reporting_mta="relay.example.net", original=ORIGINAL, mail_from="sender@example.com",
                rcpt="user@example.org", code=550, text="5.1.1 No such user",
                remote_mta="mx.example.org", arrival=ARRIVAL, now=NOW)
    args.update(overrides)
    return build_dsn(**args)


def parse(raw: bytes):
    return BytesParser(policy=email.policy.default).parsebytes(raw)


def raw_parts(raw: bytes) -> list[bytes]:
    """The three body parts as raw bytes (headers and content), split at the boundary."""
    boundary = parse(raw).get_boundary().encode()
    pieces = raw.split(b"--" + boundary)
    assert pieces[-1] == b"--\r\n"
    return [piece.removeprefix(b"\r\n") for piece in pieces[1:-1]]


def raw_content(part: bytes) -> bytes:
    """A part's bytes after its own header block, up to the boundary line (its CRLF included)."""
    return part.split(b"\r\n\r\n", 1)[1]


def status_fields(raw: bytes):
    blocks = parse(raw).get_payload()[1].get_payload()
    assert len(blocks) == 2
    return blocks


def test_structure_and_top_headers():
    raw = make()
    msg = parse(raw)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert msg["From"] == "Mail Delivery System <MAILER-DAEMON@relay.example.net>"
    assert msg["To"] == "sender@example.com"
    assert b"\r\nTo: <sender@example.com>\r\n" in raw
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["MIME-Version"] == "1.0"
    assert parsedate_to_datetime(msg["Date"]).timestamp() == NOW
    assert re.fullmatch(r"<[^<>@\s]+@relay\.example\.net>", msg["Message-ID"])
    assert not msg.defects
    parts = msg.get_payload()
    assert [p.get_content_type() for p in parts] == [
        "text/plain", "message/delivery-status", "text/rfc822-headers"]
    assert parts[0].get_content_charset() == "us-ascii"
    assert all(not p.defects for p in parts)


def test_human_part_names_recipient_server_and_reply():
    text = parse(make()).get_payload()[0].get_content()
    assert "<user@example.org> could not be delivered" in text
    assert "mx.example.org" in text
    assert "550 5.1.1 No such user" in text
    assert "Secret body" not in text


def test_delivery_status_fields():
    per_message, per_recipient = status_fields(make())
    assert per_message["Reporting-MTA"] == "dns; relay.example.net"
    assert parsedate_to_datetime(per_message["Arrival-Date"]).timestamp() == ARRIVAL
    assert per_recipient["Final-Recipient"] == "rfc822; user@example.org"
    assert per_recipient["Action"] == "failed"
    assert per_recipient["Status"] == "5.1.1"
    assert per_recipient["Remote-MTA"] == "dns; mx.example.org"
    assert per_recipient["Diagnostic-Code"] == "smtp; 550 5.1.1 No such user"


def test_delayed_action():
    raw = make(code=451, text="4.3.0 Try again later", action="delayed")
    msg = parse(raw)
    assert msg["Subject"] == "Delayed Mail (still being retried)"
    _, per_recipient = status_fields(raw)
    assert per_recipient["Action"] == "delayed"
    assert per_recipient["Status"] == "4.3.0"
    assert "not been delivered yet" in msg.get_payload()[0].get_content()


@pytest.mark.parametrize("code, text, status", [
    (550, "5.1.1 No such user", "5.1.1"),
    (550, "user unknown", "5.0.0"),
    (554, "4.4.1 nonsense", "5.0.0"),
    (452, "4.2.2 Mailbox full", "4.2.2"),
    (451, "5.7.1 wrong class", "4.0.0"),
    (421, "", "4.0.0"),
    (550, "5.7.1", "5.7.1"),
    (550, "5.7.26 DMARC policy", "5.7.26"),
    (550, "5.1.1x not a code", "5.0.0"),
    (550, "5.1 too short", "5.0.0"),
    (550, "No such user 5.1.1", "5.0.0"),
])
def test_status_code_derivation(code, text, status):
    _, per_recipient = status_fields(make(code=code, text=text))
    assert per_recipient["Status"] == status


def test_part3_holds_original_headers_byte_for_byte_and_not_the_body():
    raw = make()
    part3 = raw_parts(raw)[2]
    assert raw_content(part3) == ORIGINAL_HEADERS
    assert b"Subject: Gr\xc3\xbc\xc3\x9fe aus K\xc3\xb6ln\r\n" in part3
    assert b"(client.example.com [192.0.2.7])\r\n\tby relay.example.net" in part3
    assert b"Content-Transfer-Encoding: 8bit" in part3.split(b"\r\n\r\n")[0]
    assert b"Secret body" not in raw
    assert parse(raw).get_payload()[2]["Content-Transfer-Encoding"] == "8bit"
    assert parse(raw)["Content-Transfer-Encoding"] == "8bit"


def test_ascii_headers_are_declared_7bit():
    original = b"From: a@example.com\r\nSubject: plain\r\n\r\nbody\r\n"
    raw = make(original=original)
    part3 = raw_parts(raw)[2]
    assert b"Content-Transfer-Encoding: 7bit" in part3
    assert raw_content(part3) == b"From: a@example.com\r\nSubject: plain\r\n\r\n"
    assert raw.isascii()
    assert parse(raw)["Content-Transfer-Encoding"] == "7bit"


def test_lf_only_original_becomes_crlf_and_body_stays_out():
    original = b"From: a@example.com\nSubject: lf only\n  folded\n\nbody secret\n"
    raw = make(original=original)
    assert raw_content(raw_parts(raw)[2]) == b"From: a@example.com\r\nSubject: lf only\r\n  folded\r\n\r\n"
    assert b"body secret" not in raw


def test_original_without_blank_line_is_all_headers():
    original = b"From: a@example.com\r\nSubject: no body"
    raw = make(original=original)
    assert raw_content(raw_parts(raw)[2]) == b"From: a@example.com\r\nSubject: no body\r\n\r\n"


def test_header_block_stops_at_a_line_that_is_not_a_header():
    original = b"From: a@example.com\r\nSubject: missing separator\r\nthis is the body, secret\r\n"
    raw = make(original=original)
    assert raw_content(raw_parts(raw)[2]) == b"From: a@example.com\r\nSubject: missing separator\r\n\r\n"
    assert b"secret" not in raw


def test_original_without_headers():
    raw = make(original=b"\r\nonly a body, secret\r\n")
    assert raw_content(raw_parts(raw)[2]) == b"\r\n"
    assert b"secret" not in raw
    assert len(parse(raw).get_payload()) == 3


def test_injection_in_text_is_flattened():
    raw = make(text="5.1.1 gone\r\nBcc: victim@example.com\r\n\r\nX-Evil: 1\x00\x1b[31m\x7f")
    msg = parse(raw)
    assert "Bcc" not in msg and "X-Evil" not in msg
    assert not re.search(rb"^(Bcc|X-Evil):", raw, re.MULTILINE)
    assert len(msg.get_payload()) == 3
    per_message, per_recipient = status_fields(raw)
    assert "Bcc" not in per_recipient and "X-Evil" not in per_recipient
    assert per_recipient["Diagnostic-Code"] == "smtp; 550 5.1.1 gone Bcc: victim@example.com X-Evil: 1 [31m"
    assert per_recipient["Status"] == "5.1.1"
    assert b"\x00" not in raw and b"\x1b" not in raw and b"\x7f" not in raw


def test_remote_mta_is_sanitised():
    raw = make(remote_mta="mx.example.org\r\nBcc: victim@example.com")
    assert "Bcc" not in parse(raw)
    assert status_fields(raw)[1]["Remote-MTA"] == "dns; mx.example.org Bcc: victim@example.com"


def test_non_ascii_reply_text_becomes_ascii():
    raw = make(text="5.1.1 Benutzer unbekannt \u2028 K\u00f6ln", original=b"Subject: x\r\n\r\n")
    assert raw.isascii()
    assert status_fields(raw)[1]["Diagnostic-Code"] == "smtp; 550 5.1.1 Benutzer unbekannt K?ln"


def test_long_reply_is_limited_and_folded():
    raw = make(text="5.1.1 " + "word " * 2000)
    diagnostic = status_fields(raw)[1]["Diagnostic-Code"]
    assert diagnostic.startswith("smtp; 550 5.1.1 word word")
    assert diagnostic.endswith("...")
    assert len(diagnostic) < 1100
    block = raw_content(raw_parts(raw)[1])
    assert all(len(line) <= 78 for line in block.split(b"\r\n"))


@pytest.mark.parametrize("bad", [
    "", "<>", "no-at-sign", "a@example.com\r\nBcc: victim@example.com", "a@example.com\nX: y",
    "a@example.com\r", "a\x00@example.com", "a\tb@example.com", "a b@example.com", "<a@example.com>",
    "a\x85@example.com", "a@" + "x" * 1000 + ".com",
])
@pytest.mark.parametrize("field", ["mail_from", "rcpt"])
def test_bad_addresses_raise(field, bad):
    with pytest.raises(ValueError):
        make(**{field: bad})


@pytest.mark.parametrize("overrides", [
    {"reporting_mta": "relay.example.net\r\nBcc: x@example.com"},
    {"reporting_mta": ""},
    {"reporting_mta": "relay example"},
    {"code": 250},
    {"code": 600},
    {"action": "delivered"},
    {"action": "failed\r\nX: y"},
])
def test_bad_arguments_raise(overrides):
    with pytest.raises(ValueError):
        make(**overrides)


def test_ip_literal_reporting_mta():
    msg = parse(make(reporting_mta="[192.0.2.1]"))
    assert msg["From"].addresses[0].domain == "[192.0.2.1]"


def test_utf8_addresses_give_a_global_report():
    raw = make(rcpt="j\u00f6rg@example.org", mail_from="s\u00e9n@example.com")
    msg = parse(raw)
    assert "To: <s\u00e9n@example.com>\r\n".encode() in raw
    assert [p.get_content_type() for p in msg.get_payload()][:2] == [
        "text/plain", "message/global-delivery-status"]
    assert msg.get_payload()[0].get_content_charset() == "utf-8"
    assert "Final-Recipient: utf-8; j\u00f6rg@example.org\r\n".encode() in raw_parts(raw)[1]


def test_boundary_is_random_and_absent_from_original():
    first, second = parse(make()).get_boundary(), parse(make()).get_boundary()
    assert first != second
    assert first.encode() not in ORIGINAL


def test_boundary_avoids_a_collision_with_the_original(monkeypatch):
    """The first token drawn would give a boundary that the original contains (in other case)."""
    tokens = itertools.chain(["collide", "collide"], (f"fresh{n}" for n in itertools.count()))
    monkeypatch.setattr(dsn, "_token", lambda: next(tokens))
    original = b"Subject: x\r\nX-Trap: ------=_dsn_COLLIDE\r\n\r\n------=_DSN_collide\r\nbody\r\n"
    raw = make(original=original)
    boundary = parse(raw).get_boundary()
    assert "collide" not in boundary.lower()
    assert boundary.lower().encode() not in original.lower()
    assert len(parse(raw).get_payload()) == 3
    assert b"X-Trap: ------=_dsn_COLLIDE\r\n" in raw_parts(raw)[2]


def test_message_ids_are_unique():
    assert parse(make())["Message-ID"] != parse(make())["Message-ID"]


@pytest.mark.parametrize("overrides", [
    {},
    {"text": "5.1.1 " + "x" * 5000},
    {"text": "y" * 3000, "remote_mta": "m" * 400},
    {"rcpt": "r" * 800 + "@example.org", "mail_from": "s" * 800 + "@example.com"},
    {"original": b"Subject: " + b"z" * 3000 + b"\r\nX-Long:" + b" w" * 2000 + b"\r\n\r\nbody\r\n"},
    {"original": b"Subject: lf\n\nbody\n"},
])
def test_every_line_is_crlf_terminated_and_at_most_998_octets(overrides):
    raw = make(**overrides)
    assert raw.endswith(b"\r\n")
    lines = raw.split(b"\r\n")[:-1]
    assert all(b"\n" not in line and b"\r" not in line for line in lines)
    assert max(len(line) for line in lines) <= 998
    assert len(parse(raw).get_payload()) == 3


def test_overlong_original_header_line_is_split_keeping_every_byte():
    original = b"Subject: " + b"z" * 3000 + b"\r\nFrom: a@example.com\r\n\r\nbody\r\n"
    content = raw_content(raw_parts(make(original=original))[2])
    assert content.replace(b"\r\n ", b"") == b"Subject: " + b"z" * 3000 + b"\r\nFrom: a@example.com\r\n\r\n"


def test_now_defaults_to_the_current_time():
    raw = make(now=None)
    assert abs(parsedate_to_datetime(parse(raw)["Date"]).timestamp() - time.time()) < 5
