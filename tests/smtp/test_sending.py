"""Sending during an outage: outbound queue to the smarthost, Sent copy, "(CS-SENT)" replay,
the Outbox folder, and what the user is told when sending fails (issue 4)."""

from __future__ import annotations

import email
import email.policy
import ssl
import time

import pytest

from relay import headers
from relay.addresses import parse_mailbox
from relay.cli import main
from relay.delivery.submit import Submitter
from relay.storage.continuity import ContinuityStore
from relay.storage.maildir import MaildirStore
from tests.helpers import free_port, wait_for
from tests.smtp.fakes import FakePrimary, Script
from tests.smtp.helpers import drop_in_outbox, files, outbound_config, sender_of

pytestmark = pytest.mark.timeout(60)

MESSAGE = (b"From: Alice <alice@example.com>\r\nTo: Bob <bob@example.org>\r\n"
           b"Cc: carol@example.net\r\nBcc: secret@example.net\r\n"
           b"Subject: =?UTF-8?B?w6l0w6k=?=\r\n\r\nsent during the outage \xe2\x82\xac\r\n")


def test_sent_mail_reaches_smarthost_sent_folder_and_primary_with_cs_sent(smarthost, make_relay):
    primary = FakePrimary(Script(mail="451 4.3.0 down")).start()
    try:
        relay = make_relay(primary.port, extra=outbound_config(smarthost.port))
        alice = parse_mailbox("alice@example.com")
        sender_of(relay).submit(alice, "alice@example.com",
                                ["bob@example.org", "carol@example.net", "secret@example.net"], MESSAGE)
        wait_for(lambda: len(smarthost.received) == 1)
        (got,) = smarthost.received        # one transaction for the three, as Postfix sends it
        assert got.rcpt_tos == ["bob@example.org", "carol@example.net", "secret@example.net"]
        assert got.mail_from == "alice@example.com"
        assert got.content == MESSAGE.replace(b"Bcc: secret@example.net\r\n", b"")
        (sent,) = files(relay.config.storage.maildirs / "example.com" / "alice" / ".Sent" / "cur")
        assert sent.name.endswith(":2,S") and sent.read_bytes() == MESSAGE
        primary.script.mail = "250 2.1.0 Ok"
        wait_for(lambda: len(primary.received) == 1)
        (copy,) = primary.received
        assert copy.mail_from == "alice@example.com" and copy.rcpt_tos == ["alice@example.com"]
        subject = email.message_from_bytes(copy.content, policy=email.policy.default)["subject"]
        assert subject == "été (CS-SENT)"
        assert copy.content.endswith(b"\r\n\r\nsent during the outage \xe2\x82\xac\r\n")
    finally:
        primary.stop()


def test_each_recipient_of_one_transaction_is_settled_by_its_own_reply(make_relay):
    """One MAIL and DATA for three recipients: the refused one is told to the user and filed,
    the deferred one is sent alone later, the accepted one is done."""
    smarthost = FakePrimary(Script(rcpt_for={"bob@example.org": "550 5.1.1 no such user",
                                             "carol@example.net": "451 4.3.0 try later"})).start()
    try:
        relay = make_relay(free_port(), extra=outbound_config(smarthost.port))
        sender_of(relay).submit(parse_mailbox("alice@example.com"), "alice@example.com",
                                ["bob@example.org", "carol@example.net", "secret@example.net"], MESSAGE)
        outbound = relay.config.storage.spool / "outbound"
        wait_for(lambda: smarthost.received and files(outbound / "failed"))
        assert [r.rcpt_tos for r in smarthost.received] == [["secret@example.net"]]
        (failed,) = files(outbound / "failed")
        assert b'"rcpt": "bob@example.org"' in failed.read_bytes()
        inbox = relay.config.storage.maildirs / "example.com" / "alice" / "new"
        wait_for(lambda: files(inbox))
        assert b"Final-Recipient: rfc822; bob@example.org" in files(inbox)[0].read_bytes()
        smarthost.script.rcpt_for.clear()
        wait_for(lambda: len(smarthost.received) == 2)
        assert smarthost.received[1].rcpt_tos == ["carol@example.net"]
        wait_for(lambda: not files(outbound / "waiting") and not files(outbound / "active"))
    finally:
        smarthost.stop()


def test_smarthost_down_then_up_sends_after_a_retry(make_relay):
    port = free_port()
    relay = make_relay(free_port(), extra=outbound_config(port))
    sender_of(relay).submit(parse_mailbox("alice@example.com"), "alice@example.com",
                            ["bob@example.org"], MESSAGE)
    waiting = relay.config.storage.spool / "outbound" / "waiting"
    wait_for(lambda: any(b'"attempts": 1' in p.read_bytes() for p in files(waiting)))
    smarthost = FakePrimary()
    smarthost.port = port
    smarthost.controller.port = port
    smarthost.start()
    try:
        wait_for(lambda: len(smarthost.received) == 1)
        wait_for(lambda: not files(waiting))
    finally:
        smarthost.stop()


@pytest.mark.parametrize("extra,script", [
    ({}, Script(rcpt="550 5.1.1 <bob@example.org>: no such user")),
    ({"max_age": "1s"}, Script(rcpt="451 4.3.0 busy")),
], ids=["refused", "expired"])
def test_failure_puts_a_notice_in_the_users_inbox(make_relay, extra, script):
    smarthost = FakePrimary(script).start()
    try:
        relay = make_relay(free_port(), extra=outbound_config(smarthost.port, **extra))
        if extra:
            time.sleep(1.1)  # older than max_age by the first attempt
        sender_of(relay).submit(parse_mailbox("alice@example.com"), "alice@example.com",
                                ["bob@example.org"], MESSAGE)
        inbox = relay.config.storage.maildirs / "example.com" / "alice" / "new"
        wait_for(lambda: files(inbox))
        (notice,) = files(inbox)
        report = email.message_from_bytes(notice.read_bytes())
        assert report.get_content_type() == "multipart/report"
        assert b"Final-Recipient: rfc822; bob@example.org" in notice.read_bytes()
        # The notice is written first, then the entry filed under failed/ (a crash between
        # tells the user twice, never zero times): wait for the second step too.
        wait_for(lambda: files(relay.config.storage.spool / "outbound" / "failed"))
    finally:
        smarthost.stop()


def test_sent_mail_asked_for_success_gets_a_relayed_notice_from_a_smarthost_without_dsn(
        smarthost, make_relay):
    """Issue 8, point 4 (RFC 3461 6.2.3): the smarthost offers no DSN, so the relay answers the
    user's NOTIFY=SUCCESS itself, into their INBOX, once the smarthost took the message; the
    recipient without it gets nothing."""
    relay = make_relay(free_port(), extra=outbound_config(smarthost.port))
    sender_of(relay).submit(parse_mailbox("alice@example.com"), "alice@example.com",
                            ["bob@example.org", "carol@example.net"], MESSAGE,
                            rcpt_options={"bob@example.org": ("NOTIFY=SUCCESS",)})
    inbox = relay.config.storage.maildirs / "example.com" / "alice" / "new"
    wait_for(lambda: len(smarthost.received) == 1 and files(inbox))
    wait_for(lambda: not files(relay.config.storage.spool / "outbound" / "active"))
    (notice,) = files(inbox)
    text = notice.read_bytes()
    assert b"Action: relayed\r\n" in text and b"Final-Recipient: rfc822; bob@example.org" in text
    assert text.count(b"Final-Recipient:") == 1            # carol asked for nothing


def test_outbox_message_is_sent_to_to_cc_bcc_and_removed(smarthost, make_relay):
    relay = make_relay(free_port(), extra=outbound_config(smarthost.port))
    sender_of(relay).store.maildirs.ensure(parse_mailbox("alice@example.com"))
    time.sleep(0.3)
    drop_in_outbox(relay, "alice", MESSAGE, "cur", ":2,S")
    wait_for(lambda: smarthost.received)
    (got,) = smarthost.received
    assert sorted(got.rcpt_tos) == ["bob@example.org", "carol@example.net", "secret@example.net"]
    assert b"secret@" not in got.content
    outbox = relay.config.storage.maildirs / "example.com" / "alice" / ".Outbox"
    wait_for(lambda: not files(outbox / "cur") and not files(outbox / "new"))
    assert files(outbox.parent / ".Sent" / "cur")


def test_outbox_message_with_foreign_from_is_not_sent(smarthost, make_relay):
    relay = make_relay(free_port(), extra=outbound_config(smarthost.port))
    sender_of(relay).store.maildirs.ensure(parse_mailbox("alice@example.com"))
    forged = MESSAGE.replace(b"From: Alice <alice@example.com>", b"From: Boss <ceo@example.com>")
    drop_in_outbox(relay, "alice", forged)
    home = relay.config.storage.maildirs / "example.com" / "alice"
    wait_for(lambda: files(home / "new"))
    (notice,) = files(home / "new")
    assert b"Subject: Not sent: a message in your Outbox" in notice.read_bytes()
    assert b"own address <alice@example.com>" in notice.read_bytes()
    (draft,) = files(home / ".Drafts" / "cur")
    assert draft.read_bytes() == forged
    assert not files(home / ".Outbox" / "new") and smarthost.received == []
    # the notice takes the one notice route: it is also queued for alice's mailbox on the primary
    replay = relay.config.storage.spool / "replay" / "example.com"
    (queued,) = files(replay / "waiting")
    assert b'"rcpt": "alice@example.com"' in queued.read_bytes()
    assert (replay / "msg" / queued.name).read_bytes() == notice.read_bytes()


def test_check_says_sending_is_disabled_without_smarthost(make_relay, capsys):
    relay = make_relay(free_port())
    assert main(["check", "-c", str(relay.config.file)]) == 0
    assert "outbound.smarthost: not set, so sending is disabled" in capsys.readouterr().out


def test_submission_port_through_the_whole_relay(smarthost, tmp_path, monkeypatch):
    """The wiring in app.py: STARTTLS + AUTH on listen.submission, then the same sending path."""
    import io
    import re
    import smtplib
    import ssl

    import trustme

    from tests.smtp.fakes import InProcessRelay, write_config

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "server.pem"))
    path = write_config(tmp_path, free_port(), extra=outbound_config(smarthost.port) + (
        f"tls: {{cert: {tmp_path / 'server.pem'}, key: {tmp_path / 'server.pem'}}}\n"))
    port = free_port()
    path.write_text(re.sub(r"listen: \{inbound: ([0-9.:]+)\}",
                           rf"listen: {{inbound: \1, submission: 127.0.0.1:{port}}}", path.read_text()))
    monkeypatch.setattr("sys.stdin", io.StringIO("alice-pw\n"))
    assert main(["users", "add", "alice@example.com", "--password-stdin", "-c", str(path)]) == 0
    relay = InProcessRelay.from_file(path).start()
    try:
        context = ssl.create_default_context()
        ca.configure_trust(context)
        with smtplib.SMTP("127.0.0.1", port, timeout=15) as client:
            client.starttls(context=context)
            client.login("alice@example.com", "alice-pw")
            client.sendmail("alice@example.com", ["bob@example.org"], MESSAGE)
            forged = MESSAGE.replace(b"Alice <alice@example.com>", b"<ceo@example.com>")
            with pytest.raises(smtplib.SMTPDataError) as refused:
                client.sendmail("alice@example.com", ["bob@example.org"], forged)
            assert refused.value.smtp_code == 553
        wait_for(lambda: len(smarthost.received) == 1)
        content = smarthost.received[0].content
        assert content.startswith(b"Received: from ") and b"with ESMTPSA id" in content
        assert headers.remove(content, "Received") == MESSAGE.replace(b"Bcc: secret@example.net\r\n", b"")
        assert files(tmp_path / "maildirs" / "example.com" / "alice" / ".Sent" / "cur")
    finally:
        relay.stop()


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")  # the fake, on loopback
def _auth_smarthost(tmp_path, tls: bool):
    """An aiosmtpd smarthost requiring AUTH (with STARTTLS when `tls`); records the logins."""
    import trustme
    from aiosmtpd.smtp import AuthResult, LoginPassword

    seen: list[tuple[bytes, bytes]] = []

    def authenticator(server, session, envelope, mechanism, data):
        assert isinstance(data, LoginPassword)
        seen.append((data.login, data.password))
        return AuthResult(success=data.login == b"relay" and data.password == b"s3cret pass")

    context = None
    if tls:
        ca = trustme.CA()
        ca.cert_pem.write_to_path(str(tmp_path / "smarthost-ca.pem"))
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("127.0.0.1").configure_cert(context)
    # A FakePrimary: its stop() hangs up on the relay's connection first (a ResourceWarning else)
    smarthost = FakePrimary(auth_required=True, auth_require_tls=tls, authenticator=authenticator,
                            tls_context=context)
    (tmp_path / "smarthost.password").write_text("s3cret pass\n")
    return smarthost, smarthost.handler, seen, smarthost.port


def test_smarthost_auth_with_password_file(make_relay, tmp_path):
    """outbound.smarthost.username + password_file: the relay logs in (after STARTTLS)."""
    smarthost, handler, seen, port = _auth_smarthost(tmp_path, tls=True)
    smarthost.start()
    try:
        extra = (f"outbound: {{smarthost: {{address: 127.0.0.1:{port}, starttls: required, "
                 f"ca_file: smarthost-ca.pem, username: relay, password_file: smarthost.password}}, "
                 f"retry_delay: 1s}}\n")
        relay = make_relay(free_port(), extra=extra)
        sender_of(relay).submit(parse_mailbox("alice@example.com"), "alice@example.com",
                                ["bob@example.org"], MESSAGE)
        wait_for(lambda: len(handler.received) == 1)
        assert seen == [(b"relay", b"s3cret pass")]
    finally:
        smarthost.stop()


@pytest.mark.parametrize("starttls", ["off", "opportunistic"])
def test_smarthost_credentials_never_go_out_in_clear(make_relay, tmp_path, caplog, starttls):
    """A smarthost that offers no STARTTLS gets no AUTH: the entry waits, the log says why."""
    import logging

    caplog.set_level(logging.INFO, logger="relay.outbound")
    smarthost, handler, seen, port = _auth_smarthost(tmp_path, tls=False)
    smarthost.start()
    try:
        extra = (f"outbound: {{smarthost: {{address: 127.0.0.1:{port}, starttls: {starttls}, "
                 f"username: relay, password_file: smarthost.password}}, retry_delay: 1s}}\n")
        relay = make_relay(free_port(), extra=extra)
        sender_of(relay).submit(parse_mailbox("alice@example.com"), "alice@example.com",
                                ["bob@example.org"], MESSAGE)
        wait_for(lambda: "credentials are never sent in clear" in caplog.text)
        assert seen == [] and handler.received == []
        queue = relay.config.storage.spool / "outbound"
        assert len(list((queue / "waiting").iterdir())) + len(list((queue / "active").iterdir())) == 1
    finally:
        smarthost.stop()


def test_a_bare_cr_cannot_hide_a_forged_from(smarthost, make_relay):
    """Security review 9.1: the header reader took a bare CR as part of a line, aiosmtplib made
    it a line end, and the smarthost received `From: CEO <ceo@...>` from alice."""
    from relay.errors import PermFail

    relay = make_relay(free_port(), extra=outbound_config(smarthost.port))
    attack = (b"Subject: x\rFrom: CEO <ceo@example.com>\r\rTo: victim@ext.test\r\n"
              b"From: alice@example.com\r\n\r\nbody\r\n")
    with pytest.raises(PermFail) as refused:
        sender_of(relay).submit(parse_mailbox("alice@example.com"), "alice@example.com",
                                ["victim@ext.test"], attack)
    assert refused.value.code == 553
    with pytest.raises(PermFail) as nul:
        sender_of(relay).submit(parse_mailbox("alice@example.com"), "alice@example.com",
                                ["victim@ext.test"], b"From: alice@example.com\r\n\r\nnul \0 here\r\n")
    assert nul.value.code == 554
    # A bare LF message is fine: it is stored and sent with CRLF, as it would leave anyway.
    sender_of(relay).submit(parse_mailbox("alice@example.com"), "alice@example.com",
                            ["bob@example.org"], b"From: alice@example.com\nSubject: lf\n\nbody\n")
    wait_for(lambda: len(smarthost.received) == 1)
    assert smarthost.received[0].content == b"From: alice@example.com\r\nSubject: lf\r\n\r\nbody\r\n"
    sent = files(relay.config.storage.maildirs / "example.com" / "alice" / ".Sent" / "cur")
    assert sent[0].read_bytes() == smarthost.received[0].content


def test_resent_bcc_is_removed_and_a_foreign_sender_header_refused(smarthost, make_relay):
    """Security review 9.13: Resent-Bcc went out; a Sender: naming another address passed."""
    from relay.errors import PermFail

    relay = make_relay(free_port(), extra=outbound_config(smarthost.port))
    alice = parse_mailbox("alice@example.com")
    with pytest.raises(PermFail) as refused:
        sender_of(relay).submit(alice, "alice@example.com", ["b@example.org"],
                                b"From: alice@example.com\r\nSender: ceo@example.com\r\n\r\nx\r\n")
    assert refused.value.code == 553 and "Sender:" in refused.value.text
    sender_of(relay).submit(alice, "alice@example.com", ["b@example.org"],
                            b"From: alice@example.com\r\nSender: Alice <alice@example.com>\r\n"
                            b"Resent-Bcc: hidden@example.net\r\nSubject: r\r\n\r\nx\r\n")
    wait_for(lambda: len(smarthost.received) == 1)
    assert smarthost.received[0].content == (b"From: alice@example.com\r\nSender: Alice "
                                             b"<alice@example.com>\r\nSubject: r\r\n\r\nx\r\n")


def test_a_resent_from_or_sender_naming_another_address_is_refused_an_older_resend_is_kept(make_relay):
    """A bounce (mutt) or redirect (Thunderbird) says who sent the message on in Resent-From:;
    naming the CEO there passed (From: itself must be the user's, resent or not). The newest
    resent block is the first; older ones are others'."""
    from relay.errors import PermFail

    relay = make_relay(free_port(), extra=outbound_config(free_port()))
    alice = parse_mailbox("alice@example.com")
    for field in (b"Resent-From: ceo@example.com", b"Resent-Sender: The CEO <ceo@example.com>",
                  b"Resent-From: alice@example.com, ceo@example.com"):
        with pytest.raises(PermFail) as refused:
            sender_of(relay).submit(alice, "alice@example.com", ["b@example.org"],
                                    field + b"\r\nFrom: alice@example.com\r\nSubject: s\r\n\r\nx\r\n")
        assert refused.value.code == 553 and b"Resent-" in field and "Resent-" in refused.value.text
    sender_of(relay).submit(alice, "alice@example.com", ["b@example.org"],
                            b"Resent-From: Alice <alice@example.com>\r\nResent-To: b@example.org\r\n"
                            b"Resent-From: carol@example.net\r\nFrom: alice@example.com\r\n\r\nx\r\n")


def test_every_sending_path_keeps_to_the_limits(make_relay):
    """Security review 9.9: Submitter.submit, which every path goes through, enforces
    max_recipients and message_size_limit (the Outbox read a 3 MB file past a 1 MiB limit)."""
    from relay.errors import PermFail

    relay = make_relay(free_port())
    store = ContinuityStore(MaildirStore(relay.config.storage.maildirs), relay.config.storage.spool)
    sender = Submitter(store, max_recipients=2, max_size=100)
    alice = parse_mailbox("alice@example.com")
    small = b"From: alice@example.com\r\n\r\nhi\r\n"
    with pytest.raises(PermFail) as many:
        sender.submit(alice, "alice@example.com", ["a@x.org", "b@x.org", "c@x.org"], small)
    assert many.value.code == 550 and "at most 2" in many.value.text
    with pytest.raises(PermFail) as big:
        sender.submit(alice, "alice@example.com", ["a@x.org"], small + b"x" * 100)
    assert big.value.code == 552
    assert store.outbound.list() == []
    sender.submit(alice, "alice@example.com", ["a@x.org", "b@x.org"], small)
    assert len(store.outbound.list()) == 2
