"""The relay as an Internet-facing MX (issue 8): EHLO before MAIL, SMTPUTF8, DSN parameters,
enhanced status codes, pipelining, and which 4xx mean "the primary is in trouble"."""

from __future__ import annotations

import json
import logging
import re
import smtplib
import socket
import ssl
import time

import pytest

from relay.delivery.submit import options_for
from relay.storage.state import read_state
from tests.helpers import free_port, wait_for
from tests.smtp.fakes import FakePrimary, Script, send, stored_files

pytestmark = pytest.mark.timeout(90)

FAST = "replay: {probe_interval: 1s, concurrency: 2}\n"
EIGHT_BIT = "From: s@sender.test\r\nSubject: caf\u00e9\r\n\r\nna\u00efve body\r\n".encode()


def entries(relay, state: str = "waiting", queue: str = "replay/example.com") -> list:
    return sorted((relay.config.storage.spool / queue / state).glob("*"))


def state_of(relay) -> str:
    return read_state(relay.config.storage.spool / "state", "example.com").state


def transaction(port: int, sender: str, rcpts: list[str], data: bytes, mail_options=(),
                rcpt_options=()) -> tuple[list[tuple[int, bytes]], tuple[int, bytes] | None]:
    """One SMTP transaction with smtplib, options passed as given."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("sender.test")
        code, text = client.mail(sender, list(mail_options))
        assert code == 250, (code, text)
        answers = [client.rcpt(r, list(rcpt_options)) for r in rcpts]
        if not any(c == 250 for c, _ in answers):
            return answers, None
        return answers, client.data(data)


# -- EHLO before the first MAIL -----------------------------------------------------------------

def tls_server_context(tmp_path) -> ssl.SSLContext:
    import trustme

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    trustme.CA().issue_cert("127.0.0.1").configure_cert(context)
    return context


# Without STARTTLS aiosmtplib's connect() says no EHLO at all; with it, STARTTLS forgets the
# first EHLO's answer. Opportunistic STARTTLS to a server without it happened to work.
PRIMARY_TLS = {"starttls-off": ("starttls: off", False),
               "starttls-required": ("starttls: required, verify_cert: false", True),
               "opportunistic-no-tls": ("", False)}


@pytest.mark.parametrize("how", list(PRIMARY_TLS))
def test_first_message_on_a_new_connection_says_body_8bitmime(make_relay, tmp_path, how):
    """Found in interop: the first message on every connection went out without BODY=8BITMIME
    and SMTPUTF8, whatever the primary offered (the options were chosen before any EHLO)."""
    settings, tls = PRIMARY_TLS[how]
    fake = FakePrimary(tls_context=tls_server_context(tmp_path) if tls else None).start()
    try:
        relay = make_relay(fake.port, primary=settings)
        answers, reply = transaction(relay.port, "j\u00f6s\u00e9@sender.test", ["alice@example.com"],
                                     EIGHT_BIT, ["BODY=8BITMIME", "SMTPUTF8"])
        assert reply[0] == 250, (answers, reply)
        (got,) = fake.received
        assert {"BODY=8BITMIME", "SMTPUTF8"} <= set(got.mail_options)
        assert got.mail_from == "j\u00f6s\u00e9@sender.test" and got.content.endswith(EIGHT_BIT)
        assert state_of(relay) == "normal"
    finally:
        fake.stop()


@pytest.mark.parametrize("how", ["starttls-off", "starttls-required"])
def test_first_replayed_message_says_body_8bitmime(make_relay, tmp_path, how):
    settings, tls = PRIMARY_TLS[how]
    port = free_port()
    relay = make_relay(port, extra=FAST, primary=settings)
    _, reply = transaction(relay.port, "s@sender.test", ["alice@example.com"], EIGHT_BIT,
                           ["BODY=8BITMIME"])
    assert reply[0] == 250
    fake = FakePrimary(port=port, tls_context=tls_server_context(tmp_path) if tls else None).start()
    try:
        wait_for(lambda: len(fake.received) == 1)
        assert "BODY=8BITMIME" in fake.received[0].mail_options
    finally:
        fake.stop()


# -- SMTPUTF8 ---------------------------------------------------------------------------------

def test_utf8_sender_kept_then_replayed_with_smtputf8(make_relay):
    port = free_port()
    relay = make_relay(port, users=("alice@example.com", "zo\u00eb@example.com"), extra=FAST)
    answers, reply = transaction(relay.port, "j\u00f6s\u00e9@sender.test", ["zo\u00eb@example.com"],
                                 EIGHT_BIT, ["SMTPUTF8", "BODY=8BITMIME"])
    assert answers == [(250, b"2.1.5 Recipient OK")] and reply[0] == 250
    (kept,) = stored_files(relay.config.storage.maildirs)
    assert b"with UTF8SMTP id " in kept.read_bytes()           # RFC 6531 3.7.3
    fake = FakePrimary(port=port).start()
    try:
        wait_for(lambda: len(fake.received) == 1)
        got = fake.received[0]
        assert got.mail_from == "j\u00f6s\u00e9@sender.test" and got.rcpt_tos == ["zo\u00eb@example.com"]
        assert "SMTPUTF8" in got.mail_options
        wait_for(lambda: state_of(relay) == "normal")
    finally:
        fake.stop()


def test_utf8_address_at_a_primary_without_smtputf8_fails_for_good(make_relay):
    """Found in interop: the local UnicodeEncodeError was reported as 'connection failed', the
    entry was tried 26 times and the domain stayed in outage while its primary was up."""
    port = free_port()
    relay = make_relay(port, extra=FAST)
    for sender in ("j\u00f6s\u00e9@sender.test", "plain@sender.test"):
        _, reply = transaction(relay.port, sender, ["alice@example.com"], EIGHT_BIT,
                               ["SMTPUTF8", "BODY=8BITMIME"])
        assert reply[0] == 250
    fake = FakePrimary(port=port, smtputf8=False).start()
    try:
        wait_for(lambda: len(fake.received) == 1 and len(entries(relay, "failed")) == 1)
        assert fake.received[0].mail_from == "plain@sender.test"      # the other one went on
        failed = json.loads(entries(relay, "failed")[0].read_bytes())
        assert failed["note"].startswith("553 5.6.7") and failed["attempts"] == 1
        # a DSN for the sender waits for the smarthost (none configured here)
        (dsn,) = entries(relay, "waiting", "outbound")
        assert json.loads(dsn.read_bytes())["rcpt"] == "j\u00f6s\u00e9@sender.test"
        wait_for(lambda: state_of(relay) == "normal")
        assert not entries(relay)
    finally:
        fake.stop()


def test_utf8_sender_passing_through_to_a_primary_without_smtputf8_gets_553(make_relay):
    fake = FakePrimary(smtputf8=False).start()
    try:
        relay = make_relay(fake.port)
        answers, reply = transaction(relay.port, "j\u00f6s\u00e9@sender.test", ["alice@example.com"],
                                     EIGHT_BIT, ["SMTPUTF8"])
        assert reply is None and answers[0][0] == 553 and answers[0][1].startswith(b"5.6.7 ")
        assert not stored_files(relay.config.storage.maildirs) and state_of(relay) == "normal"
    finally:
        fake.stop()


def test_sending_paths_ask_for_smtputf8_when_an_address_or_header_needs_it():
    ascii_message = b"From: a@example.com\r\nSubject: hi\r\n\r\nbody\r\n"
    assert options_for(ascii_message, "a@example.com", "b@example.org") == ()
    assert options_for(ascii_message, "zo\u00eb@example.com", "b@example.org") == ("SMTPUTF8",)
    assert options_for(ascii_message, "a@example.com", "j\u00f6@example.org") == ("SMTPUTF8",)
    utf8_header = "From: a@example.com\r\nSubject: caf\u00e9\r\n\r\nbody\r\n".encode()
    assert options_for(utf8_header, "a@example.com", "b@example.org") == ("BODY=8BITMIME", "SMTPUTF8")
    utf8_body = "From: a@example.com\r\n\r\ncaf\u00e9\r\n".encode()
    assert options_for(utf8_body, "a@example.com", "b@example.org") == ("BODY=8BITMIME",)
    assert options_for(ascii_message, "a@example.com", "b@example.org",
                       ("RET=HDRS", "ENVID=x+2By", "SIZE=9")) == ("RET=HDRS", "ENVID=x+2By")


# -- extensions and enhanced status codes --------------------------------------------------------

class Raw:
    """A line-by-line SMTP client on a plain socket, for exact replies."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.file = self.sock.makefile("rb")

    def reply(self) -> list[bytes]:
        lines = []
        while True:
            line = self.file.readline().rstrip(b"\r\n")
            lines.append(line)
            if line[3:4] != b"-":
                return lines

    def send(self, *commands: bytes) -> None:
        self.sock.sendall(b"".join(c + b"\r\n" for c in commands))

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def test_ehlo_offers_pipelining_enhancedstatuscodes_dsn_and_every_reply_has_a_code(make_relay):
    relay = make_relay(free_port())
    raw = Raw(relay.port)
    try:
        greeting = raw.reply()
        assert greeting[0].startswith(b"220 relay.test ")          # no enhanced code there
        raw.send(b"EHLO sender.test")
        ehlo = raw.reply()
        for extension in (b"PIPELINING", b"ENHANCEDSTATUSCODES", b"DSN", b"8BITMIME", b"SMTPUTF8"):
            assert any(line[4:] == extension for line in ehlo), ehlo
        checks = [
            (b"DATA", b"503 5.5.1 "),                     # aiosmtpd's "need RCPT command"
            (b"FROB", b"500 5.5.2 "),
            (b"NOOP " + b"x" * 1100, b"500 5.5.2 Command line too long"),  # aiosmtpd's own 500
            (b"NOOP", b"250 2.0.0 "),
            (b"MAIL FROM:<s@sender.test> SIZE=999999999", b"552 5.3.4 "),
            (b"MAIL FROM:<s@sender.test> NOTIFY=NEVER", b"555 5.5.4 "),   # a RCPT parameter
            (b"MAIL FROM:<s@sender.test> RET=ALL", b"501 5.5.4 "),
            (b"MAIL FROM:<s@sender.test> RET=HDRS ENVID=q+2Bx", b"250 2.1.0 "),
            (b"RCPT TO:<alice@example.com> NOTIFY=NEVER,SUCCESS", b"501 5.5.4 "),
            (b"RCPT TO:<alice@example.com> ORCPT=bad", b"501 5.5.4 "),
            (b"RSET", b"250 2.0.0 "),
            (b"QUIT", b"221 2.0.0 "),
        ]
        for command, expected in checks:
            raw.send(command)
            answer = raw.reply()
            assert answer[-1].startswith(expected), (command, answer)
    finally:
        raw.close()


def test_the_size_a_sender_declares_is_passed_to_the_primary(primary, make_relay):
    """As Postfix's before-queue proxy: the primary hears SIZE before the data (RFC 1870)."""
    relay = make_relay(primary.port)
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as client:
        client.ehlo("sender.test")
        for options in (["SIZE=4321"], []):
            assert client.mail("s@sender.test", options)[0] == 250
            assert client.rcpt("alice@example.com")[0] == 250
            assert client.data(b"Subject: s\r\n\r\nx\r\n")[0] == 250
    assert [r.mail_options for r in primary.received] == [["SIZE=4321"], []]


def test_a_pipelined_transaction_is_answered_in_order(primary, make_relay):
    relay = make_relay(primary.port)
    raw = Raw(relay.port)
    try:
        raw.reply()
        raw.send(b"EHLO sender.test")
        raw.reply()
        raw.send(b"MAIL FROM:<s@sender.test>", b"RCPT TO:<alice@example.com>",
                 b"RCPT TO:<nobody@elsewhere.test>", b"RCPT TO:<bob@example.com>", b"DATA")
        answers = [raw.reply()[-1][:9] for _ in range(5)]
        assert answers == [b"250 2.1.0", b"250 2.1.5", b"550 5.7.1", b"250 2.1.5", b"354 End d"]
        raw.send(b"Subject: piped\r\n\r\nbody\r\n.", b"QUIT")
        assert raw.reply()[-1].startswith(b"250 2.0.0 ")
        assert raw.reply()[-1].startswith(b"221 2.0.0 ")
    finally:
        raw.close()
    (got,) = primary.received
    assert got.rcpt_tos == ["alice@example.com", "bob@example.com"]


# -- DSN (RFC 3461) ---------------------------------------------------------------------------

DSN_MAIL = ["RET=HDRS", "ENVID=Abc+2Bdef"]
DSN_RCPT = ["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;Alice@Example.com"]


def test_dsn_parameters_pass_through_to_the_primary(make_relay):
    fake = FakePrimary(dsn=True).start()
    try:
        relay = make_relay(fake.port)
        _, reply = transaction(relay.port, "s@sender.test", ["alice@example.com"], b"Subject: x\r\n\r\nx\r\n",
                               DSN_MAIL, DSN_RCPT)
        assert reply[0] == 250
        (got,) = fake.received
        assert {"RET=HDRS", "ENVID=Abc+2Bdef"} <= set(got.mail_options)    # case kept
        assert got.rcpt_params == {"alice@example.com": tuple(DSN_RCPT)}
    finally:
        fake.stop()


def test_dsn_parameters_are_kept_and_replayed(make_relay):
    port = free_port()
    relay = make_relay(port, extra=FAST)
    _, reply = transaction(relay.port, "s@sender.test", ["alice@example.com"], b"Subject: x\r\n\r\nx\r\n",
                           DSN_MAIL, DSN_RCPT)
    assert reply[0] == 250
    fake = FakePrimary(port=port, dsn=True).start()
    try:
        wait_for(lambda: len(fake.received) == 1)
        got = fake.received[0]
        assert {"RET=HDRS", "ENVID=Abc+2Bdef"} <= set(got.mail_options)
        assert got.rcpt_params == {"alice@example.com": tuple(DSN_RCPT)}
    finally:
        fake.stop()


def test_dsn_parameters_are_dropped_for_a_primary_without_dsn(make_relay):
    fake = FakePrimary().start()          # plain aiosmtpd: NOTIFY would get 555
    try:
        relay = make_relay(fake.port)
        _, reply = transaction(relay.port, "s@sender.test", ["alice@example.com"], b"Subject: x\r\n\r\nx\r\n",
                               DSN_MAIL, DSN_RCPT)
        assert reply[0] == 250 and len(fake.received) == 1
        assert not any(o.startswith(("RET=", "ENVID=")) for o in fake.received[0].mail_options)
    finally:
        fake.stop()


@pytest.mark.parametrize("notify, told", [(None, True), ("NOTIFY=FAILURE", True),
                                          ("NOTIFY=NEVER", False), ("NOTIFY=SUCCESS,DELAY", False)])
def test_replay_refusal_notifies_the_sender_only_as_asked(make_relay, notify, told):
    port = free_port()
    relay = make_relay(port, extra=FAST)
    _, reply = transaction(relay.port, "s@sender.test", ["alice@example.com"], b"Subject: x\r\n\r\nx\r\n",
                           ["ENVID=env-1"], [notify, "ORCPT=rfc822;alice@example.com"] if notify else [])
    assert reply[0] == 250
    fake = FakePrimary(Script(rcpt="550 5.1.1 no such user"), port=port, name="mx.primary.test").start()
    try:
        wait_for(lambda: len(entries(relay, "failed")) == 1)
        dsns = entries(relay, "waiting", "outbound")
        assert len(dsns) == (1 if told else 0)
        if told:
            text = (dsns[0].parent.parent / "msg" / dsns[0].name).read_bytes()
            assert b"Remote-MTA: dns; mx.primary.test\r\n" in text     # a host name, not 127.0.0.1
            assert b"Original-Envelope-Id: env-1\r\n" in text
            if notify:
                assert b"Original-Recipient: rfc822;alice@example.com\r\n" in text
    finally:
        fake.stop()


@pytest.mark.parametrize("notify, dsn, relayed", [
    ("NOTIFY=SUCCESS", False, True), ("NOTIFY=SUCCESS,FAILURE", False, True),
    ("NOTIFY=FAILURE", False, False), (None, False, False), ("NOTIFY=SUCCESS", True, False),
], ids=["success", "success-failure", "failure-only", "no-notify", "primary-does-dsn"])
def test_a_replayed_message_asked_for_success_gets_a_relayed_notice(make_relay, notify, dsn, relayed):
    """Issue 8, point 4, RFC 3461 6.2.3: NOTIFY=SUCCESS, and the primary offers no DSN to pass
    it to, so the relay says "relayed" itself once the primary took the message; a primary
    that offers DSN gets the NOTIFY and answers for it (and the relay says nothing)."""
    port = free_port()
    relay = make_relay(port, extra=FAST)
    _, reply = transaction(relay.port, "s@sender.test", ["alice@example.com"], b"Subject: x\r\n\r\nx\r\n",
                           ["ENVID=env-2"], [notify, "ORCPT=rfc822;alice@example.com"] if notify else [])
    assert reply[0] == 250
    fake = FakePrimary(dsn=dsn, port=port, name="mx.primary.test").start()
    try:
        wait_for(lambda: len(fake.received) == 1 and not entries(relay, "waiting")
                 and not entries(relay, "active"))          # settled: any notice is queued
        dsns = entries(relay, "waiting", "outbound")
        assert len(dsns) == (1 if relayed else 0)
        if relayed:
            text = (dsns[0].parent.parent / "msg" / dsns[0].name).read_bytes()
            assert b"Subject: Successful Mail Delivery Report\r\n" in text
            assert b"Action: relayed\r\nStatus: 2.0.0\r\nRemote-MTA: dns; mx.primary.test\r\n" in text
            assert b"Original-Envelope-Id: env-2\r\n" in text and b"Subject: x" in text
        if dsn:
            assert fake.received[0].rcpt_params["alice@example.com"][0] == notify
    finally:
        fake.stop()


@pytest.mark.parametrize("dsn", [False, True], ids=["primary-without-dsn", "primary-with-dsn"])
def test_a_passed_message_asked_for_success_gets_a_relayed_notice(make_relay, dsn):
    """The same for mail passed straight through: the primary took it, and could not be told
    of the NOTIFY, so the relay says "relayed" (to the sender, through the outbound queue)."""
    fake = FakePrimary(dsn=dsn, name="mx.primary.test").start()
    try:
        relay = make_relay(fake.port)
        _, reply = transaction(relay.port, "s@sender.test", ["alice@example.com", "bob@example.com"],
                               b"Subject: passed\r\n\r\nx\r\n", [], ["NOTIFY=SUCCESS"])
        assert reply[0] == 250 and len(fake.received) == 1
        dsns = entries(relay, "waiting", "outbound")
        assert len(dsns) == (0 if dsn else 2)          # one for each recipient
        for path in dsns:
            text = (path.parent.parent / "msg" / path.name).read_bytes()
            assert b"To: <s@sender.test>\r\n" in text and b"Action: relayed\r\n" in text
            assert b"Remote-MTA: dns; mx.primary.test\r\n" in text and b"Subject: passed" in text
    finally:
        fake.stop()


# -- which 4xx mean the primary is in trouble ------------------------------------------------------

def test_a_policy_4_7_goes_back_to_the_sender_and_nothing_is_kept(make_relay):
    fake = FakePrimary(Script(rcpt="450 4.7.1 Greylisted, try again in 5 minutes")).start()
    try:
        relay = make_relay(fake.port)
        answers, reply = send(relay.port, "s@sender.test", ["alice@example.com"], b"Subject: x\r\n\r\nx\r\n")
        assert reply is None and answers == [(450, b"4.7.1 Greylisted, try again in 5 minutes")]
        assert not stored_files(relay.config.storage.maildirs) and not entries(relay)
        assert state_of(relay) == "normal"
    finally:
        fake.stop()


def test_a_policy_4_7_to_data_goes_back_to_the_sender_and_nothing_is_kept(make_relay):
    """The same split after the data (a content policy, a rate limit per message)."""
    fake = FakePrimary(Script(data="451 4.7.1 Rate limit for this sender, try later")).start()
    try:
        relay = make_relay(fake.port)
        answers, reply = send(relay.port, "s@sender.test", ["alice@example.com"], b"Subject: x\r\n\r\nx\r\n")
        assert answers == [(250, b"2.1.5 Recipient OK")]
        assert reply == (451, b"4.7.1 Rate limit for this sender, try later")
        assert not stored_files(relay.config.storage.maildirs) and not entries(relay)
        assert state_of(relay) == "normal"
    finally:
        fake.stop()


def test_a_busy_mailbox_is_kept_without_an_outage(make_relay):
    fake = FakePrimary(Script(rcpt_for={"alice@example.com": "450 4.2.1 Mailbox busy"})).start()
    try:
        relay = make_relay(fake.port)
        _, reply = send(relay.port, "s@sender.test", ["alice@example.com", "bob@example.com"],
                        b"Subject: x\r\n\r\nx\r\n")
        assert reply[0] == 250
        assert len(stored_files(relay.config.storage.maildirs)) == 1     # alice's, kept
        assert len(fake.received) == 1 and fake.received[0].rcpt_tos == ["bob@example.com"]
        assert state_of(relay) == "normal"
    finally:
        fake.stop()


def test_during_replay_a_busy_mailbox_waits_and_the_others_go_on(make_relay):
    """Found in interop: one 450 at RCPT stopped every worker and put the domain back in outage."""
    port = free_port()
    relay = make_relay(port, users=("alice@example.com", "bob@example.com", "carol@example.com"),
                       extra="replay: {probe_interval: 1s, concurrency: 1}\n")
    for n, user in enumerate(["alice", "bob", "alice", "carol", "alice"]):
        _, reply = send(relay.port, "s@sender.test", [f"{user}@example.com"],
                        f"Subject: {n}\r\n\r\nbody {n}\r\n".encode())
        assert reply[0] == 250
    busy = Script(rcpt_for={"alice@example.com": "452 4.2.2 Mailbox full"})
    fake = FakePrimary(busy, port=port).start()
    try:
        # The primary's 250 comes before the runner settles the entry: wait for both.
        wait_for(lambda: {r.rcpt_tos[0] for r in fake.received} == {"bob@example.com", "carol@example.com"}
                 and len(entries(relay)) == 3 and not entries(relay, "active"))    # alice's three wait
        first = json.loads(entries(relay)[0].read_bytes())
        assert first["rcpt"] == "alice@example.com" and first["note"].startswith("452 4.2.2")
        assert first["extra"]["next_try"] > time.time() - 1
        assert state_of(relay) != "outage"
        busy.rcpt_for.clear()
        wait_for(lambda: len(fake.received) == 5, 30)
        alice = [r.content for r in fake.received if r.rcpt_tos == ["alice@example.com"]]
        assert [c.rsplit(b"body ", 1)[1] for c in alice] == [b"0\r\n", b"2\r\n", b"4\r\n"]  # in order
        wait_for(lambda: state_of(relay) == "normal")
    finally:
        fake.stop()


def test_a_mailbox_that_keeps_answering_4xx_waits_longer_each_time(make_relay, caplog):
    """Issue 8, point 5: "with a growing delay", seen in the replay itself: 1 s, then 2 s, then
    4 s (probe_interval doubled, at most an hour), while the entry keeps its place."""
    caplog.set_level(logging.INFO, logger="relay.replay")
    port = free_port()
    relay = make_relay(port, extra="replay: {probe_interval: 1s, concurrency: 1}\n")
    assert send(relay.port, "s@sender.test", ["alice@example.com"], b"Subject: b\r\n\r\nb\r\n")[1][0] == 250
    fake = FakePrimary(Script(rcpt_for={"alice@example.com": "450 4.2.1 Mailbox busy"}), port=port).start()
    try:
        def deferrals() -> list[int]:
            return [int(re.search(r"retry_in=(\d+)", r.getMessage())[1]) for r in caplog.records
                    if r.getMessage().startswith("replay.deferred")]

        wait_for(lambda: len(deferrals()) >= 3, 30, "three deferrals")
        assert deferrals()[:3] == [1, 2, 4]
        (waiting,) = entries(relay)
        assert json.loads(waiting.read_bytes())["attempts"] >= 3 and fake.received == []
    finally:
        fake.stop()


def test_a_4xx_to_mail_still_means_outage(make_relay):
    fake = FakePrimary(Script(mail="451 4.3.0 Queue file write error")).start()
    try:
        relay = make_relay(fake.port)
        _, reply = send(relay.port, "s@sender.test", ["alice@example.com"], b"Subject: x\r\n\r\nx\r\n")
        assert reply[0] == 250 and len(stored_files(relay.config.storage.maildirs)) == 1
        assert state_of(relay) == "outage"
    finally:
        fake.stop()


# -- SMTPUTF8 on the sending paths (submission, Outbox and webmail share Submitter.submit) ---------

def _outbound(port: int) -> str:
    return (f"outbound: {{smarthost: {{address: 127.0.0.1:{port}, starttls: off}}, retry_delay: 1s}}\n"
            "replay: {probe_interval: 1s}\n")


def _submit_as_zoe(relay, rcpt: str) -> None:
    from relay.addresses import parse_mailbox
    from relay.delivery.submit import Submitter
    from relay.storage.continuity import ContinuityStore
    from relay.storage.maildir import MaildirStore

    store = ContinuityStore(MaildirStore(relay.config.storage.maildirs), relay.config.storage.spool)
    zoe = parse_mailbox("zo\u00eb@example.com")
    message = "From: Zo\u00eb <zo\u00eb@example.com>\r\nTo: <b@example.org>\r\nSubject: hi\r\n\r\nx\r\n"
    Submitter(store).submit(zoe, str(zoe), [rcpt], message.encode())  # the runner's 1 s timer sends it


def test_a_utf8_user_sends_with_smtputf8(make_relay):
    smarthost = FakePrimary().start()
    try:
        relay = make_relay(free_port(), users=("zo\u00eb@example.com",), extra=_outbound(smarthost.port))
        _submit_as_zoe(relay, "b@example.org")
        wait_for(lambda: len(smarthost.received) == 1, 30)
        got = smarthost.received[0]
        assert got.mail_from == "zo\u00eb@example.com" and "SMTPUTF8" in got.mail_options
    finally:
        smarthost.stop()


def test_a_utf8_user_at_a_smarthost_without_smtputf8_is_told_why(make_relay):
    smarthost = FakePrimary(smtputf8=False).start()
    try:
        relay = make_relay(free_port(), users=("zo\u00eb@example.com",), extra=_outbound(smarthost.port))
        _submit_as_zoe(relay, "b@example.org")
        inbox = relay.config.storage.maildirs / "example.com" / "zo\u00eb" / "new"
        wait_for(lambda: inbox.exists() and any(inbox.iterdir()), 30)
        (notice,) = list(inbox.iterdir())
        assert b"5.6.7" in notice.read_bytes() and smarthost.received == []
    finally:
        smarthost.stop()


def test_a_message_with_nul_is_refused_and_the_session_goes_on(primary, make_relay):
    """Security review 9.1: NUL in inbound mail is refused (bare CR and LF are taken, as
    Postfix's smtpd_forbid_bare_newline = normalize does)."""
    relay = make_relay(primary.port)
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as client:
        client.ehlo("sender.test")
        client.mail("s@sender.test")
        client.rcpt("alice@example.com")
        assert client.data(b"Subject: nul\r\n\r\nbad \0 byte\r\n") == (
            550, b"5.6.0 Message refused: it contains NUL characters")
        assert client.sendmail("s@sender.test", ["alice@example.com"], b"Subject: ok\r\n\r\nfine\r\n") == {}
    assert [r.content.endswith(b"fine\r\n") for r in primary.received] == [True]
    assert not stored_files(relay.config.storage.maildirs)


@pytest.mark.parametrize("address", ["0@", "<0@[>", "<a@[1.2.3.4>"])
def test_an_address_the_parser_trips_on_is_malformed_and_the_session_goes_on(primary, make_relay, address):
    """aiosmtpd's parser (the email package's) raises IndexError or AttributeError on these;
    aiosmtpd then answered "500 Error: (IndexError) string index out of range"."""
    relay = make_relay(primary.port)
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as client:
        client.ehlo("sender.test")
        code, text = client.docmd(f"MAIL FROM:{address}")
        assert (code, text.startswith(b"5.1.")) == (553, True), text
        client.mail("s@sender.test")
        code, text = client.docmd(f"RCPT TO:{address}")
        assert (code, text.startswith(b"5.1.")) == (553, True), text
        client.rset()
        assert client.sendmail("s@sender.test", ["alice@example.com"], b"Subject: ok\r\n\r\nfine\r\n") == {}
    assert len(primary.received) == 1
