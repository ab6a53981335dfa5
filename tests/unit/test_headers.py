"""Header edits are byte edits: only the bytes asked for change, whatever the line endings or 8-bit data."""

from __future__ import annotations

import email
import email.policy
import random

import pytest

from relay import headers

# A body that must never be touched: 8-bit bytes, a dot-line, lines that look like headers.
BODY = (b"Hello\r\n.dot line\r\nSubject: not a header\r\nBcc: hidden@example.com\r\n"
        b"\x80\xff raw\r\n\r\nend\r\n")


def crlf(text: bytes) -> bytes:
    return text.replace(b"\n", b"\r\n")


# --- split ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "head", "body"),
    [
        (b"A: 1\r\nB: 2\r\n\r\nbody\r\n", b"A: 1\r\nB: 2\r\n\r\n", b"body\r\n"),
        (b"A: 1\nB: 2\n\nbody\n", b"A: 1\nB: 2\n\n", b"body\n"),
        (b"A: 1\r\nB: 2\n\r\nbody\n\nmore", b"A: 1\r\nB: 2\n\r\n", b"body\n\nmore"),
        (b"A: 1\r\nB: 2\r\n", b"A: 1\r\nB: 2\r\n", b""),
        (b"A: 1\r\nB: 2", b"A: 1\r\nB: 2", b""),
        (b"\r\nbody", b"\r\n", b"body"),
        (b"", b"", b""),
        (b"A: 1\r\n \r\nB: 2\r\n\r\nx", b"A: 1\r\n \r\nB: 2\r\n\r\n", b"x"),  # blank-ish line continues
        (b"A: 1\rB: 2\r\n\r\nx", b"A: 1\rB: 2\r\n\r\n", b"x"),  # a bare CR ends nothing
        (b"A: 1\r\n\r\n" + BODY, b"A: 1\r\n\r\n", BODY),
    ],
)
def test_split(data, head, body):
    assert headers.split(data) == (head, body)
    assert head + body == data


# --- values ---------------------------------------------------------------------------------------


def test_values_unfolded_every_occurrence_case_insensitive():
    data = crlf(b"Received: one\n\tfolded\nsUbJeCt: first\n  part two\nReceived: two\n\n") + BODY
    assert headers.values(data, "received") == ["one\tfolded", "two"]
    assert headers.values(data, "Subject") == ["first  part two"]
    assert headers.values(data, "Bcc") == []  # only in the body


def test_values_lf_and_mixed_endings():
    assert headers.values(b"Subject: a\n b\r\n c\nX: y\n\n", "subject") == ["a b c"]


def test_values_decoded_for_reading():
    data = (
        b"Subject: =?UTF-8?B?w6l0w6k=?= =?utf-8?q?_d=C3=A9j=C3=A0?=\r\n"
        b"X-Utf8: caf\xc3\xa9\r\n"
        b"X-Latin1: caf\xe9\r\n"
        b"X-Mixed: caf\xc3\xa9 =?utf-8?q?x?=  =?utf-8?q?y?= z\r\n"
        b"X-Broken: =?utf-8?b?abc?=\r\n"
        b"X-Unknown: =?x-nonsense?q?abc?=\r\n"
        b"X-Empty:\r\n"
        b"\r\n"
    )
    assert headers.values(data, "subject") == ["été déjà"]
    assert headers.values(data, "x-utf8") == ["café"]
    assert headers.values(data, "x-latin1") == ["caf\ufffd"]
    assert headers.values(data, "x-mixed") == ["café xy z"]
    assert headers.values(data, "x-broken") == ["=?utf-8?b?abc?="]
    assert headers.values(data, "x-unknown") == ["=?x-nonsense?q?abc?="]
    assert headers.values(data, "x-empty") == [""]


def test_values_name_is_the_whole_name():
    data = b"Subject-Extra: no\r\nX-Subject: no\r\nSubject : obsolete space\r\n\r\n"
    assert headers.values(data, "Subject") == ["obsolete space"]
    assert headers.values(data, "subject-extra") == ["no"]


def test_values_message_without_blank_line():
    assert headers.values(b"A: 1\r\nSubject: s", "subject") == ["s"]


# --- addresses ------------------------------------------------------------------------------------


def test_addresses_from_to_cc_bcc():
    data = crlf(
        b'To: "Smith, John" <John@Example.com>, b@example.com\n'
        b"Cc: =?utf-8?q?M=C3=BCller=2C_Anna?= <anna@example.com>,\n"
        b"\tundisclosed-recipients:;, ,\n"
        b"Bcc: Team: c@example.com, d@example.com;, john@example.com\n"
        b"Reply-To: r@example.com\n"
        b"Bcc: =?utf-8?b?w6k=?= <e@example.com> (comment, with comma)\n"
        b"\n"
    ) + BODY
    assert headers.addresses(data, "To", "Cc", "Bcc") == [
        "John@Example.com", "b@example.com", "anna@example.com", "c@example.com", "d@example.com",
        "e@example.com",
    ]
    assert headers.addresses(data, "cc") == ["anna@example.com"]
    assert headers.addresses(data, "X-None") == []
    assert headers.addresses(data) == []


def test_addresses_keep_header_order_and_8bit():
    data = (b"Cc: c@example.com\nTo: J\xc3\xa9r\xc3\xb4me <j\xc3\xa9@example.com>\n"
            b"To: undisclosed-recipients:;\n\n")
    assert headers.addresses(data, "To", "Cc") == ["c@example.com", "jé@example.com"]


# --- remove ---------------------------------------------------------------------------------------


def test_remove_folded_and_repeated_bcc_crlf():
    data = crlf(
        b"From: a@example.com\n"
        b"Bcc: one@example.com,\n"
        b"  two@example.com\n"
        b"To: t@example.com\n"
        b"bcc: three@example.com\n"
        b"Subject: hi\n"
        b"BCC:\n"
        b"\n"
    ) + BODY
    expected = crlf(b"From: a@example.com\nTo: t@example.com\nSubject: hi\n\n") + BODY
    assert headers.remove(data, "Bcc") == expected


def test_remove_lf_and_mixed():
    data = b"A: 1\nBcc: x\r\n\ty\nB: \xc3\xa9\r\n\nBcc: body\n"
    assert headers.remove(data, "bcc") == b"A: 1\nB: \xc3\xa9\r\n\nBcc: body\n"


def test_remove_last_field_without_blank_line():
    assert headers.remove(b"A: 1\r\nBcc: x\r\n y", "Bcc") == b"A: 1\r\n"
    assert headers.remove(b"Bcc: x", "Bcc") == b""


def test_remove_absent_or_prefix_name_is_identity():
    data = crlf(b"Subject-Extra: keep\nX-Bcc: keep\n\n") + BODY
    assert headers.remove(data, "Subject") == data
    assert headers.remove(data, "Bcc") == data


# --- append_to_subject ----------------------------------------------------------------------------


@pytest.mark.parametrize("eol", [b"\r\n", b"\n"])
def test_append_plain(eol):
    data = b"From: a@example.com" + eol + b"Subject: Hello" + eol + b"To: b@example.com" + eol + eol
    expected = data.replace(b"Hello", b"Hello (CS-SENT)")
    assert headers.append_to_subject(data + BODY) == expected + BODY


def test_append_mixed_endings_keep_their_own():
    data = b"From: a\nSubject: hi\r\nTo: b\n\r\n" + BODY
    assert headers.append_to_subject(data) == b"From: a\nSubject: hi (CS-SENT)\r\nTo: b\n\r\n" + BODY


@pytest.mark.parametrize("raw", [b"caf\xc3\xa9 \xe2\x82\xac", b"caf\xe9", b"\x80\xff"])
def test_append_8bit_subject(raw):
    data = b"Subject: " + raw + b"\r\nX: \xff\r\n\r\n" + BODY
    assert headers.append_to_subject(data) == b"Subject: " + raw + b" (CS-SENT)\r\nX: \xff\r\n\r\n" + BODY


def test_append_encoded_word_subject_stays_valid():
    data = b"From: a@example.com\r\nSubject: =?UTF-8?B?w6l0w6kg4oKs?=\r\n\r\n" + BODY
    result = headers.append_to_subject(data)
    assert result == b"From: a@example.com\r\nSubject: =?UTF-8?B?w6l0w6kg4oKs?= (CS-SENT)\r\n\r\n" + BODY
    assert email.message_from_bytes(result, policy=email.policy.default)["subject"] == "été € (CS-SENT)"
    assert headers.values(result, "Subject") == ["été € (CS-SENT)"]


def test_append_folded_subject_goes_on_last_line():
    subject = b"Subject: =?utf-8?q?premi=C3=A8re?=\n =?utf-8?q?_ligne?=\n and more"
    data = crlf(subject + b"\nTo: b\n\n") + BODY
    expected = crlf(subject + b" (CS-SENT)\nTo: b\n\n")
    result = headers.append_to_subject(data)
    assert result == expected + BODY
    assert email.message_from_bytes(result, policy=email.policy.default)["subject"] == (
        "première ligne and more (CS-SENT)"
    )


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (crlf(b"From: a\nTo: b\n\n") + BODY, crlf(b"From: a\nTo: b\nSubject: (CS-SENT)\n\n") + BODY),
        (b"From: a\nTo: b\n\n" + BODY, b"From: a\nTo: b\nSubject: (CS-SENT)\n\n" + BODY),
        (b"From: a\nTo: b\r\n\r\nx", b"From: a\nTo: b\r\nSubject: (CS-SENT)\n\r\nx"),  # first line's ending
        (b"From: a\r\nTo: b\r\n", b"From: a\r\nTo: b\r\nSubject: (CS-SENT)\r\n"),  # all headers
        (b"From: a\nTo: b", b"From: a\nTo: b\nSubject: (CS-SENT)\n"),  # no final line ending
        (b"From: a", b"From: a\r\nSubject: (CS-SENT)\r\n"),  # no line ending at all: CRLF
        (b"", b"Subject: (CS-SENT)\r\n"),
        (b"\r\nbody", b"Subject: (CS-SENT)\r\n\r\nbody"),
        (b"Subject-Extra: x\r\n\r\n", b"Subject-Extra: x\r\nSubject: (CS-SENT)\r\n\r\n"),
    ],
)
def test_append_missing_subject(data, expected):
    assert headers.append_to_subject(data) == expected


def test_append_empty_subject():
    assert headers.append_to_subject(b"Subject:\r\nTo: b\r\n\r\n") == b"Subject: (CS-SENT)\r\nTo: b\r\n\r\n"
    assert headers.append_to_subject(b"Subject:") == b"Subject: (CS-SENT)"
    assert headers.values(headers.append_to_subject(b"Subject: \n\n"), "subject") == ["(CS-SENT)"]


def test_append_odd_case_and_prefix_names():
    data = b"Subject-Extra: no\r\nsUbJeCt: yes\r\nSubject: second\r\n\r\n" + BODY
    expected = b"Subject-Extra: no\r\nsUbJeCt: yes (CS-SENT)\r\nSubject: second\r\n\r\n" + BODY
    assert headers.append_to_subject(data) == expected


def test_append_twice_appends_twice_and_custom_suffix():
    once = headers.append_to_subject(b"Subject: x\r\n\r\n")
    assert headers.append_to_subject(once) == b"Subject: x (CS-SENT) (CS-SENT)\r\n\r\n"
    assert headers.append_to_subject(b"Subject: x\n\n", " [tag]") == b"Subject: x [tag]\n\n"


def test_append_subject_line_without_line_ending():
    assert headers.append_to_subject(b"From: a\r\nSubject: x") == b"From: a\r\nSubject: x (CS-SENT)"


@pytest.mark.parametrize("eol", [b"\r\n", b"\n"])
def test_append_folds_before_998_octets(eol):
    prefix = b"Subject: "
    fits = prefix + b"x" * (998 - len(prefix) - len(b" (CS-SENT)"))
    assert len(fits + b" (CS-SENT)") == 998
    assert headers.append_to_subject(fits + eol + eol) == fits + b" (CS-SENT)" + eol + eol

    long = fits + b"x"
    result = headers.append_to_subject(long + eol + eol + BODY)
    assert result == long + eol + b" (CS-SENT)" + eol + eol + BODY
    assert all(len(line.rstrip(b"\r\n")) <= 998 for line in headers.split(result)[0].split(b"\n"))
    assert headers.values(result, "Subject") == [long[len(prefix) :].decode() + " (CS-SENT)"]


def test_append_fold_on_last_continuation_line_uses_first_line_ending():
    long = b" " + b"y" * 997
    data = b"From: a\r\nSubject: s\n" + long + b"\nTo: b\n\n"
    expected = b"From: a\r\nSubject: s\n" + long + b"\r\n (CS-SENT)\nTo: b\n\n"
    assert headers.append_to_subject(data) == expected


# --- has_suffix -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "answer"),
    [
        (b"Subject: hi (CS-SENT)\r\n\r\n", True),
        (b"Subject: hi\r\n (CS-SENT)  \r\n\r\n", True),
        (b"Subject: hi(CS-SENT)\r\n\r\n", True),
        (b"Subject: =?utf-8?q?hi_=28CS-SENT=29?=\r\n\r\n", True),
        (b"Subject: (CS-SENT) hi\r\n\r\n", False),
        (b"Subject: hi\r\nSubject: x (CS-SENT)\r\n\r\n", False),  # only the first Subject counts
        (b"Subject-Extra: (CS-SENT)\r\n\r\nSubject: (CS-SENT)\r\n", False),
        (b"To: b\r\n\r\n", False),
        (b"", False),
    ],
)
def test_has_suffix(data, answer):
    assert headers.has_suffix(data) is answer


def test_has_suffix_after_append():
    for data in (b"", b"Subject: \xe9t\xe9\n\n", b"Subject: =?UTF-8?B?w6l0w6k=?=\r\n\r\n", b"Subject:\r\n"):
        assert not headers.has_suffix(data)
        assert headers.has_suffix(headers.append_to_subject(data))
    assert headers.has_suffix(b"Subject: x [tag]\n\n", " [tag]")


# --- set_header -----------------------------------------------------------------------------------


def test_set_header_replaces_all_at_first_place():
    data = crlf(b"A: 1\nX-Relay: old\n  folded\nB: 2\nx-relay: again\n\n") + BODY
    assert headers.set_header(data, "X-Relay", "new") == crlf(b"A: 1\nX-Relay: new\nB: 2\n\n") + BODY


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"A: 1\r\n\r\n" + BODY, b"A: 1\r\nX-Relay: v\r\n\r\n" + BODY),
        (b"A: 1\n\n" + BODY, b"A: 1\nX-Relay: v\n\n" + BODY),
        (b"A: 1\nB: 2\r\n\r\n", b"A: 1\nB: 2\r\nX-Relay: v\n\r\n"),
        (b"A: 1", b"A: 1\r\nX-Relay: v\r\n"),
        (b"", b"X-Relay: v\r\n"),
    ],
)
def test_set_header_appends_when_absent(data, expected):
    assert headers.set_header(data, "X-Relay", "v") == expected


def test_set_header_utf8_value_and_lf_message():
    data = b"X-Relay: a\nB: \xff\n\n\x80"
    assert headers.set_header(data, "X-Relay", "café") == b"X-Relay: caf\xc3\xa9\nB: \xff\n\n\x80"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("X-Relay", "a\r\nBcc: evil@example.com"),
        ("X-Relay", "a\nBcc: evil@example.com"),
        ("X-Relay", "a\rb"),
        ("X-Relay", "a\x00b"),
        ("X-Relay", "\ud800"),
        ("X-Relay: a\r\nBcc", "evil@example.com"),
        ("X Relay", "v"),
        ("X-Relay:", "v"),
        ("", "v"),
        ("X-Rélay", "v"),
    ],
)
def test_set_header_injection_refused(name, value):
    with pytest.raises(ValueError):
        headers.set_header(b"A: 1\r\n\r\n", name, value)


# --- property: edits stay where they belong -------------------------------------------------------

NAMES = [b"Subject", b"sUbJeCt", b"SUBJECT", b"Subject-Extra", b"X-Subject", b"To", b"Bcc", b"From",
         b"Received", b"X-Absent-Not", b"Content-Type"]
WORDS = [b"hello", b"caf\xc3\xa9", b"caf\xe9", b"\x80\xff", b"=?UTF-8?B?w6l0w6k=?=", b"a@example.com",
         b"<b@example.com>", b'"x, y"', b"(CS-SENT)", b":", b"=?", b"\r"]
BODY_LINES = [b"", b".", b"..dot", b"Subject: body", b"Bcc: body@example.com", b"\x80\xff\xfe",
              b" leading space", b"From nobody", b"X-Absent: in body"]


def random_line(rng: random.Random) -> bytes:
    return b" ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 4)))


def random_field(rng: random.Random) -> list[bytes]:
    """One header field as lines, each with its own (random) line ending."""
    lines = [rng.choice(NAMES) + rng.choice([b":", b": ", b" : "]) + random_line(rng)]
    lines += [rng.choice([b" ", b"\t", b"  "]) + random_line(rng) for _ in range(rng.choice([0, 0, 1, 2]))]
    return [line + rng.choice([b"\r\n", b"\n"]) for line in lines]


def random_message(rng: random.Random) -> tuple[list[list[bytes]], bytes, bytes]:
    fields = [random_field(rng) for _ in range(rng.randint(0, 6))]
    if fields and rng.random() < 0.1:
        fields[-1][-1] = fields[-1][-1].rstrip(b"\r\n")  # all headers, no final line ending
        return fields, b"", b""
    if rng.random() < 0.1:
        return fields, b"", b""  # all headers
    blank = rng.choice([b"\r\n", b"\n"])
    body = b"".join(rng.choice(BODY_LINES) + rng.choice([b"\r\n", b"\n"]) for _ in range(rng.randint(0, 5)))
    return fields, blank, body


def ending(line: bytes) -> tuple[bytes, bytes]:
    cut = 2 if line.endswith(b"\r\n") else 1 if line.endswith(b"\n") else 0
    return line[: len(line) - cut], line[len(line) - cut :]


def test_random_messages_edit_only_the_subject():
    rng = random.Random(20240601)
    for _ in range(200):
        fields, blank, body = random_message(rng)
        data = b"".join(b"".join(field) for field in fields) + blank + body

        assert headers.remove(data, "X-Absent") == data
        assert headers.split(data) == (data[: len(data) - len(body)], body)

        result = headers.append_to_subject(data)
        names = [field[0].partition(b":")[0].strip().lower() for field in fields]
        if b"subject" in names:
            index = names.index(b"subject")
            before = b"".join(b"".join(field) for field in fields[:index])
            subject = b"".join(fields[index])
            after = data[len(before) + len(subject) :]
            content, end = ending(subject)
            assert result == before + content + b" (CS-SENT)" + end + after
        else:
            head = data[: len(data) - len(blank + body)]
            eol = b"\n" if b"\n" in data and not data.split(b"\n")[0].endswith(b"\r") else b"\r\n"
            ended = head + eol if head and not head.endswith(b"\n") else head
            assert result == ended + b"Subject: (CS-SENT)" + eol + blank + body
        assert headers.has_suffix(result)
        assert headers.remove(result, "X-Absent") == result


@pytest.mark.parametrize(("data", "expected"), [
    (b"Received: x\r\n\r\n" + BODY, b"X-Spam: Yes\r\nReceived: x\r\n\r\n" + BODY),
    (b"A: 1\n\n\x80\xff", b"X-Spam: Yes\nA: 1\n\n\x80\xff"),
    (b"", b"X-Spam: Yes\r\n"),
], ids=["crlf", "lf-8bit", "empty"])
def test_prepend_puts_one_line_on_top_and_keeps_every_byte(data, expected):
    assert headers.prepend(data, "X-Spam", "Yes") == expected


@pytest.mark.parametrize(("name", "value"), [("X-Spam", "Yes\r\nBcc: x"), ("X-Spam", "a\nb"),
                                             ("X Spam", "Yes"), ("X-Spam:", "Yes")])
def test_prepend_refuses_injection(name, value):
    with pytest.raises(ValueError):
        headers.prepend(b"A: 1\r\n\r\n", name, value)


def test_crlf_makes_every_line_end_crlf():
    from relay.headers import crlf

    assert crlf(b"a\rb\nc\r\nd\r\r\n") == b"a\r\nb\r\nc\r\nd\r\n\r\n"
    assert crlf(b"") == b"" and crlf(b"no end") == b"no end"
