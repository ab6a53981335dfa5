"""Every sending path, end to end through the running relay (app.py's wiring, not a hand-built
Submitter): the submission port and port 25 after STARTTLS + AUTH, a file in the user's Outbox
folder, and the webmail's compose form over HTTP with a session cookie and CSRF token.

Issue 9 point 1 (a bare CR must not hide a forged From:, NUL is refused, what leaves is CRLF
and the Sent copy is what left), issue 9 point 9 (max_recipients and message_size_limit on every
path, and the user told why), issue 8 point 2 (a UTF-8 user sends with SMTPUTF8 on all three
paths; a smarthost without SMTPUTF8 gives a 5.6.7 notice, never an endless retry)."""

from __future__ import annotations

import re
import smtplib
import ssl
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import bcrypt
import pytest
import trustme

from relay import headers
from relay.addresses import parse_mailbox
from relay.directory import User
from tests.helpers import free_port, wait_for
from tests.smtp.fakes import FakePrimary, InProcessRelay, write_config
from tests.smtp.helpers import PASSWORDS, auth_plain, cheap_hash, files, outbound_config
from tests.web.helpers import ADMIN, ADMIN_PASSWORD, WEB_CONFIG, Client, Reply

pytestmark = pytest.mark.timeout(90)

ALICE, JURGEN = "alice@example.com", "jürgen@example.com"
JURGEN_PASSWORD = "jürgen pass"
LIMIT = 1024 * 1024          # write_config's message_size_limit: 1MiB
MAX_RCPTS = 3

ATTACK = (b"Subject: x\rFrom: CEO <ceo@example.com>\r\rTo: victim@ext.test\r\n"
          b"From: alice@example.com\r\n\r\nplease wire the money\r\n")
NUL = b"From: alice@example.com\r\nTo: victim@ext.test\r\nSubject: nul\r\n\r\nnul \0 here\r\n"
BARE_LF = b"From: alice@example.com\nTo: bob@example.org\nSubject: lf\n\nline one\nline two\n"
# Over SMTP the last line end is CRLF (CRLF.CRLF ends the data); every other one is a bare LF.
BARE_LF_DATA = BARE_LF[:-1] + b"\r\n"


# -- the relay: TLS, submission, port 25 AUTH, Outbox, webmail, one smarthost ---------------------

@dataclass
class Relay:
    relay: InProcessRelay
    smarthost: FakePrimary
    client_tls: ssl.SSLContext

    @property
    def config(self):
        return self.relay.config

    @property
    def submission_port(self) -> int:
        return self.relay.running.submission[0].sockets[0].getsockname()[1]

    @property
    def inbound_port(self) -> int:
        return self.relay.port

    @property
    def web_port(self) -> int:
        return self.relay.running.web.addresses[0][1]

    def home(self, local: str = "alice") -> Path:
        return self.config.storage.maildirs / "example.com" / local

    def sent(self, local: str = "alice") -> list[Path]:
        return files(self.home(local) / ".Sent" / "cur")

    def inbox(self, local: str = "alice") -> list[Path]:
        return files(self.home(local) / "new")

    def outbound(self, state: str = "waiting") -> list[Path]:
        return files(self.config.storage.spool / "outbound" / state)

    def nothing_sent(self, local: str = "alice") -> bool:
        """Nothing at the smarthost, nothing queued for it, no Sent copy, and no "(CS-SENT)" copy
        queued for replay (a notice to the user takes that queue too)."""
        replay = self.config.storage.spool / "replay" / "example.com" / "msg"
        return (self.smarthost.received == [] and self.sent(local) == []
                and not any(b"(CS-SENT)" in p.read_bytes() for p in files(replay))
                and all(self.outbound(s) == [] for s in ("waiting", "active", "failed")))


@pytest.fixture
def start(tmp_path) -> Callable[..., Relay]:
    """start(smarthost=None) -> the whole relay, with alice, bob and jürgen registered."""
    ca = trustme.CA()
    pem = tmp_path / "server.pem"
    ca.issue_cert("127.0.0.1", "localhost").private_key_and_cert_chain_pem.write_to_path(str(pem))
    client_tls = ssl.create_default_context()
    ca.configure_trust(client_tls)
    started: list[tuple[InProcessRelay, FakePrimary]] = []

    def make(smarthost: FakePrimary | None = None) -> Relay:
        smarthost = (smarthost or FakePrimary()).start()
        extra = (outbound_config(smarthost.port) + f"tls: {{cert: {pem}, key: {pem}}}\n"
                 + f"max_recipients: {MAX_RCPTS}\n" + WEB_CONFIG)
        path = write_config(tmp_path, free_port(), extra=extra)     # the primary is down
        path.write_text(re.sub(
            r"listen: \{inbound: ([0-9.:]+)\}",
            rf"listen: {{inbound: \1, submission: 127.0.0.1:{free_port()}, web: 127.0.0.1:{free_port()}}}",
            path.read_text()))
        users = [User(parse_mailbox(e), "", cheap_hash(e)) for e in ("alice@example.com", "bob@example.com")]
        cheap = bcrypt.hashpw(JURGEN_PASSWORD.encode(), bcrypt.gensalt(4)).decode()
        users.append(User(parse_mailbox(JURGEN), "Jürgen", "{BLF-CRYPT}" + cheap))
        (tmp_path / "users.passwd").write_text("".join(u.line() + "\n" for u in users))
        (tmp_path / "etc").mkdir(exist_ok=True)
        (tmp_path / "etc" / "admins.passwd").write_text(
            User(parse_mailbox(ADMIN), "", "{BLF-CRYPT}" + bcrypt.hashpw(
                ADMIN_PASSWORD.encode(), bcrypt.gensalt(4)).decode()).line() + "\n")
        relay = InProcessRelay.from_file(path).start()
        started.append((relay, smarthost))
        return Relay(relay, smarthost, client_tls)

    yield make
    for relay, smarthost in started:
        relay.stop()
        smarthost.stop()


def password(login: str) -> str:
    return JURGEN_PASSWORD if login == JURGEN else PASSWORDS[login]


def smtp_session(relay: Relay, port: int, login: str = ALICE) -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=15)
    client.starttls(context=relay.client_tls)
    client.ehlo()
    assert auth_plain(client, login, password(login))[0] == 235     # UTF-8, as RFC 4616 says
    return client


def send_smtp(relay: Relay, port: int, rcpts: list[str], data: bytes, login: str = ALICE,
              ) -> tuple[int, bytes]:
    """One transaction with exact DATA bytes (smtplib sends bytes as they are, dot-stuffed);
    the DATA reply, or the first refusal."""
    options = ["SMTPUTF8"] if not login.isascii() else []
    with smtp_session(relay, port, login) as client:
        try:
            client.sendmail(login, rcpts, data, mail_options=options)
        except smtplib.SMTPDataError as exc:
            return exc.smtp_code, exc.smtp_error
        except smtplib.SMTPRecipientsRefused as exc:
            return next(iter(exc.recipients.values()))
        return 250, b""


def drop(relay: Relay, local: str, data: bytes) -> Path:
    """What Dovecot does for an IMAP APPEND: write in tmp/, rename into new/ (a name of its own)."""
    outbox = relay.home(local) / ".Outbox"
    for sub in ("tmp", "new", "cur"):
        (outbox / sub).mkdir(parents=True, exist_ok=True)
    name = f"1700000000.M1P1Q{uuid.uuid4().hex[:12]}.test"
    (outbox / "tmp" / name).write_bytes(data)
    (outbox / "tmp" / name).rename(outbox / "new" / name)
    return outbox / "new" / name


def outbox_empty(relay: Relay, local: str = "alice") -> bool:
    outbox = relay.home(local) / ".Outbox"
    return not files(outbox / "new") and not files(outbox / "cur")


def web_login(relay: Relay, login: str = ALICE) -> Client:
    browser = Client(relay.web_port)
    browser.get("/login")
    assert browser.post("/login", {"email": login, "password": password(login)}).status == 303
    assert browser.get("/mail/compose").status == 200     # a page of the session: its CSRF token
    return browser


def compose(browser: Client, **values: str) -> Reply:
    """The compose form, posted as a browser posts it (multipart/form-data, the CSRF token)."""
    fields = {"csrf": browser.csrf or "", "to": "", "cc": "", "bcc": "", "subject": "", "body": "",
              "in_reply_to": "", "references": "", **values}
    boundary = uuid.uuid4().hex
    body = b"".join(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
                    + value.encode() + b"\r\n" for name, value in fields.items())
    body += f"--{boundary}--\r\n".encode()
    return browser.request("POST", "/mail/compose", body,
                           {"Content-Type": f"multipart/form-data; boundary={boundary}"})


def left(relay: Relay, count: int = 1) -> bytes:
    """The bytes of the count-th message the smarthost received, without the relay's Received."""
    wait_for(lambda: len(relay.smarthost.received) >= count, what=f"{count} message(s) at the smarthost")
    return headers.remove(relay.smarthost.received[count - 1].content, "Received")


# -- issue 9.1: a bare CR cannot hide a forged From:, NUL is refused, on every path --------------

@pytest.mark.parametrize("listener", ["submission", "port 25"])
def test_a_bare_cr_or_a_nul_is_refused_after_auth(start, listener):
    relay = start()
    port = relay.submission_port if listener == "submission" else relay.inbound_port
    code, text = send_smtp(relay, port, ["victim@ext.test"], ATTACK)
    assert code == 553 and b"5.7.1" in text and b"own address" in text
    code, text = send_smtp(relay, port, ["victim@ext.test"], NUL)
    assert code // 100 == 5 and b"5.6.0" in text
    assert relay.nothing_sent()


@pytest.mark.parametrize("listener", ["submission", "port 25"])
def test_a_bare_lf_message_leaves_with_crlf_and_the_sent_copy_is_what_left(start, listener):
    relay = start()
    port = relay.submission_port if listener == "submission" else relay.inbound_port
    assert send_smtp(relay, port, ["bob@example.org"], BARE_LF_DATA)[0] == 250
    out = left(relay)
    assert out == BARE_LF.replace(b"\n", b"\r\n")
    (sent,) = relay.sent()
    assert headers.remove(sent.read_bytes(), "Received") == out


def test_an_outbox_file_with_a_forged_from_behind_a_bare_cr_is_not_sent(start):
    """Made CRLF, the review's DATA has `From: CEO` as its only From and its To: in the body
    (the bare CR CR is an empty line): the Outbox finds no recipient. With the To: first, the
    From check refuses it. Either way it moves to Drafts and alice is told why."""
    relay = start()
    relay.home().joinpath("new").mkdir(parents=True, exist_ok=True)
    to_first = b"To: victim@ext.test\r\n" + ATTACK.replace(b"\rTo: victim@ext.test\r\n", b"\n")
    for number, (data, reason) in enumerate([
            (ATTACK, b"5.5.1 The message names no recipient"),
            (to_first, b"5.7.1 The From: header must be your own address <alice@example.com>"),
            (NUL, b"5.6.0 NUL characters are not allowed")], start=1):
        drop(relay, "alice", data)
        wait_for(lambda n=number: len(relay.inbox()) == n, what=f"notice {number} in alice's INBOX")
        assert any(reason in p.read_bytes() for p in relay.inbox()), reason
    wait_for(lambda: outbox_empty(relay))
    assert len(files(relay.home() / ".Drafts" / "cur")) == 3
    assert relay.nothing_sent()


def test_an_outbox_file_with_bare_line_ends_leaves_with_crlf_to_the_recipients_it_shows(start):
    """The Outbox read To/Cc/Bcc from the file as it was, where a bare CR is not a line end, so
    `Subject: s\\rTo: bob@...` named no recipient for the Outbox, yet left with a To: header."""
    relay = start()
    drop(relay, "alice", BARE_LF)
    out = left(relay)
    assert relay.smarthost.received[0].rcpt_tos == ["bob@example.org"]
    assert out == BARE_LF.replace(b"\n", b"\r\n")
    wait_for(lambda: relay.sent())
    assert relay.sent()[0].read_bytes() == out
    hidden = b"From: alice@example.com\r\nSubject: cr\rTo: carol@example.org\r\n\r\nbody\r\n"
    drop(relay, "alice", hidden)
    out = left(relay, 2)
    assert relay.smarthost.received[1].rcpt_tos == ["carol@example.org"]
    assert out == headers.crlf(hidden) and relay.inbox() == []


def test_the_webmail_cannot_be_made_to_send_a_forged_from_or_a_nul(start):
    """The form's fields never become header lines: a CR in the subject is refused, a CR in the
    body is a line end of the body; a NUL is refused; nothing leaves."""
    relay = start()
    alice = web_login(relay)
    for subject, body in (("x\rFrom: CEO <ceo@example.com>", "hi"), ("nul \0 here", "hi"),
                          ("s", "nul \0 here")):
        reply = compose(alice, to="victim@ext.test", subject=subject, body=body)
        assert reply.status == 400, (subject, body, reply.text)
        assert "Not sent:" in reply.text
    assert relay.nothing_sent()
    reply = compose(alice, to="victim@ext.test", subject="s",
                    body="x\rFrom: CEO <ceo@example.com>\r\rTo: victim@ext.test\r\n")
    assert reply.status == 303
    out = left(relay)
    assert headers.addresses(out, "From") == ["alice@example.com"]
    assert b"\r\n\r\nx\r\nFrom: CEO <ceo@example.com>\r\n\r\nTo: victim@ext.test\r\n" in out


def test_a_webmail_message_leaves_with_crlf_and_the_sent_copy_is_what_left(start):
    relay = start()
    alice = web_login(relay)
    assert compose(alice, to="bob@example.org", subject="lf", body="line one\nline two\n").status == 303
    out = left(relay)
    assert b"\n" not in out.replace(b"\r\n", b"") and b"\r" not in out.replace(b"\r\n", b"")
    assert out.endswith(b"\r\n\r\nline one\r\nline two\r\n")
    wait_for(lambda: relay.sent())
    assert relay.sent()[0].read_bytes() == out


# -- issue 9.9: the limits on every path, and the user told why ----------------------------------

def test_the_submission_port_answers_452_past_max_recipients(start):
    relay = start()
    with smtp_session(relay, relay.submission_port) as client:
        assert client.mail(ALICE)[0] == 250
        for n in range(MAX_RCPTS):
            assert client.rcpt(f"u{n}@example.org")[0] == 250
        code, text = client.rcpt("one-too-many@example.org")
        assert code == 452 and text.startswith(b"4.5.3 ")


def test_the_webmail_refuses_more_than_max_recipients_and_says_why(start):
    relay = start()
    alice = web_login(relay)
    many = ", ".join(f"u{n}@example.org" for n in range(MAX_RCPTS + 1))
    reply = compose(alice, to=many, subject="all", body="x")
    assert reply.status == 400
    assert f"Not sent: 5.5.3 Too many recipients: at most {MAX_RCPTS} a message" in reply.text
    assert relay.nothing_sent()


def test_the_webmail_refuses_a_message_over_the_size_limit_and_says_why(start):
    relay = start()
    alice = web_login(relay)
    reply = compose(alice, to="bob@example.org", subject="big", body="0123456789\n" * (LIMIT // 10))
    assert reply.status == 413
    assert "larger than the relay sends (1.0 MB at most)" in reply.text, reply.text
    assert relay.nothing_sent()


def _bytes_read() -> int:
    """Bytes this process has read through read(2) and friends (Linux /proc/self/io)."""
    with open("/proc/self/io") as io:
        return int(next(line for line in io if line.startswith("rchar:")).split()[1])


def test_an_outbox_file_over_the_size_limit_is_not_sent_nor_read_and_the_user_told(start):
    """The Outbox read up to the limit before refusing; now it looks at the size first. The file
    is sparse: 256 MiB that take no disk."""
    relay = start()
    relay.home().joinpath("new").mkdir(parents=True, exist_ok=True)
    before = _bytes_read()
    path = drop(relay, "alice", b"From: alice@example.com\r\nTo: bob@example.org\r\nSubject: big\r\n\r\n")
    big = path.parent.parent / "tmp" / path.name
    path.rename(big)
    with open(big, "r+b") as file:
        file.truncate(256 * LIMIT)
    big.rename(path)
    wait_for(lambda: relay.inbox(), what="the notice in alice's INBOX")
    read = _bytes_read() - before
    (notice,) = relay.inbox()
    text = notice.read_bytes()
    assert b"Subject: Not sent: a message in your Outbox" in text
    assert f"5.3.4 The message is over the size limit of {LIMIT} bytes".encode() in text
    assert read < LIMIT // 4, f"the Outbox read {read} bytes of a file over the limit"
    wait_for(lambda: outbox_empty(relay))
    (draft,) = files(relay.home() / ".Drafts" / "cur")
    assert draft.stat().st_size == 256 * LIMIT
    assert relay.nothing_sent()


def test_an_outbox_file_for_more_than_max_recipients_is_not_sent_and_the_user_told(start):
    relay = start()
    relay.home().joinpath("new").mkdir(parents=True, exist_ok=True)
    many = ", ".join(f"r{n}@example.org" for n in range(MAX_RCPTS + 1))
    drop(relay, "alice", f"From: alice@example.com\r\nTo: {many}\r\nSubject: many\r\n\r\nx\r\n".encode())
    wait_for(lambda: relay.inbox(), what="the notice in alice's INBOX")
    (notice,) = relay.inbox()
    text = notice.read_bytes()
    assert b"Subject: Not sent: a message in your Outbox" in text
    assert f"Too many recipients: at most {MAX_RCPTS} a message".encode() in text
    wait_for(lambda: outbox_empty(relay))
    assert len(files(relay.home() / ".Drafts" / "cur")) == 1 and relay.nothing_sent()


# -- issue 8.2: a UTF-8 user sends with SMTPUTF8 on every path -----------------------------------

UTF8_MESSAGE = ("From: Jürgen <jürgen@example.com>\r\nTo: bob@example.org\r\nSubject: grüße\r\n\r\n"
                "hallo\r\n").encode()


def _smtputf8_out(relay: Relay, count: int) -> bytes:
    out = left(relay, count)
    got = relay.smarthost.received[count - 1]
    assert got.mail_from == JURGEN and got.rcpt_tos == ["bob@example.org"]
    assert "SMTPUTF8" in got.mail_options
    return out


def test_a_utf8_user_sends_with_smtputf8_from_every_path(start):
    relay = start()
    assert send_smtp(relay, relay.submission_port, ["bob@example.org"], UTF8_MESSAGE, JURGEN)[0] == 250
    assert _smtputf8_out(relay, 1) == UTF8_MESSAGE
    drop(relay, "jürgen", UTF8_MESSAGE)
    assert _smtputf8_out(relay, 2) == UTF8_MESSAGE
    jurgen = web_login(relay, JURGEN)
    reply = compose(jurgen, to="bob@example.org", subject="grüße", body="hallo")
    assert reply.status == 303, reply.text
    out = _smtputf8_out(relay, 3)
    assert headers.addresses(out, "From") == [JURGEN]
    wait_for(lambda: len(relay.sent("jürgen")) == 3)
    assert relay.inbox("jürgen") == []


@pytest.mark.parametrize("path", ["submission", "outbox", "webmail"])
def test_a_smarthost_without_smtputf8_gives_a_5_6_7_notice_and_no_retry(start, path):
    relay = start(FakePrimary(smtputf8=False))
    if path == "submission":
        assert send_smtp(relay, relay.submission_port, ["bob@example.org"], UTF8_MESSAGE, JURGEN)[0] == 250
    elif path == "outbox":
        drop(relay, "jürgen", UTF8_MESSAGE)
    else:
        assert compose(web_login(relay, JURGEN), to="bob@example.org", subject="grüße",
                       body="hallo").status == 303
    wait_for(lambda: relay.inbox("jürgen"), what="the failure notice in jürgen's INBOX")
    (notice,) = relay.inbox("jürgen")
    text = notice.read_bytes()
    assert re.search(rb"Final-Recipient: (rfc822|utf-8); bob@example.org\r\n", text)
    assert re.search(rb"Status: 5\.6\.7\r\n", text) and b"553 5.6.7" in text
    wait_for(lambda: relay.outbound("failed"), what="the entry filed as failed")
    assert relay.outbound("waiting") == [] and relay.outbound("active") == []
    assert relay.smarthost.received == []
