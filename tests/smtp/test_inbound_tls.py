"""STARTTLS on the inbound listener, AUTH on port 25 with the submission port's rules, one
login throttle for every listener, and the certificate reload (issue 8, point 3).

The relay runs in-process from a real configuration (app.start), with certificates from
trustme written to files, a fake primary and a fake smarthost over loopback."""

from __future__ import annotations

import asyncio
import email
import email.policy
import logging
import re
import socket
import ssl

import pytest
import trustme

from relay import headers
from relay.addresses import parse_mailbox
from relay.directory import User
from relay.smtp import replies
from relay.web.site import SITE
from tests.helpers import free_port, wait_for
from tests.smtp.fakes import FakePrimary, InProcessRelay, Script, write_config
from tests.smtp.helpers import (
    PASSWORDS,
    auth_plain,
    b64,
    cheap_hash,
    fast_throttle,
    files,
    logged_in,
    outbound_config,
    tls_client,
)
from tests.smtp.helpers import plain_client as client
from tests.web.helpers import Client as WebClient

pytestmark = pytest.mark.timeout(60)

ALICE = "alice@example.com"
MESSAGE = (b"From: Alice <alice@example.com>\r\nTo: Bob <bob@example.org>\r\n"
           b"Subject: from port 25\r\n\r\nsent over port 25 after STARTTLS\r\n")


# -- certificates, the relay ---------------------------------------------------------------------

def write_cert(ca: trustme.CA, path, name: str) -> None:
    """A certificate for 127.0.0.1 whose subject's common name is `name`, key in the same file."""
    ca.issue_cert("127.0.0.1", "localhost", common_name=name) \
        .private_key_and_cert_chain_pem.write_to_path(str(path))


@pytest.fixture
def start_relay(tmp_path, ca):
    """start_relay(primary_port, tls=True, submission=False, web=False, extra="") -> a started
    InProcessRelay whose users have the PASSWORDS of tests/smtp/helpers.py (cheap hashes)."""
    started = []

    def start(primary_port: int | None = None, *, tls: bool = True, submission: bool = False,
              web: bool = False, extra: str = "") -> InProcessRelay:
        pem = tmp_path / "server.pem"
        if tls:
            write_cert(ca, pem, "first")
            extra += f"tls: {{cert: {pem}, key: {pem}}}\n"
        path = write_config(tmp_path, primary_port or free_port(), extra=extra)
        more = (f", submission: 127.0.0.1:{free_port()}" if submission else "") + \
               (f", web: 127.0.0.1:{free_port()}" if web else "")
        path.write_text(re.sub(r"listen: \{inbound: ([0-9.:]+)\}", rf"listen: {{inbound: \1{more}}}",
                               path.read_text()))
        users = [User(parse_mailbox(e), "", cheap_hash(e)) for e in PASSWORDS]
        (tmp_path / "users.passwd").write_text("".join(u.line() + "\n" for u in users))
        relay = InProcessRelay.from_file(path).start()
        started.append(relay)
        return relay

    yield start
    for relay in started:
        relay.stop()


def submission_port(relay: InProcessRelay) -> int:
    assert relay.running is not None and relay.running.submission is not None
    return relay.running.submission[0].sockets[0].getsockname()[1]


def served_name(port: int, client_tls: ssl.SSLContext, https: bool = False) -> str:
    """The common name of the certificate a new connection is shown (STARTTLS, or HTTPS)."""
    if https:
        with socket.create_connection(("127.0.0.1", port), timeout=15) as raw, \
                client_tls.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            cert = tls.getpeercert()
    else:
        with tls_client(port, client_tls) as smtp:
            cert = smtp.sock.getpeercert()
    return dict(pair[0] for pair in cert["subject"])["commonName"]


# -- what is offered, and when -------------------------------------------------------------------

def test_without_tls_no_starttls_and_no_auth(start_relay):
    relay = start_relay(tls=False)
    with client(relay.port) as smtp:
        assert not smtp.has_extn("starttls") and not smtp.has_extn("auth")
        assert auth_plain(smtp, ALICE, PASSWORDS[ALICE])[0] == 538   # encryption required


def test_with_tls_starttls_offered_and_auth_only_after_it(start_relay, client_tls):
    relay = start_relay()
    with client(relay.port) as smtp:
        assert smtp.has_extn("starttls") and not smtp.has_extn("auth")
        assert auth_plain(smtp, ALICE, PASSWORDS[ALICE])[0] == 538
        assert smtp.docmd("AUTH", "LOGIN")[0] == 538
    with tls_client(relay.port, client_tls) as smtp:
        assert smtp.esmtp_features["auth"].split() == ["LOGIN", "PLAIN"]
        assert not smtp.has_extn("starttls")


@pytest.mark.parametrize("secure", [False, True], ids=["plaintext", "starttls"])
def test_mail_from_mtas_still_passes_with_or_without_starttls(start_relay, primary, client_tls,
                                                              secure):
    """TLS stays optional on port 25, and AUTH is never required to hand mail to our users."""
    relay = start_relay(primary.port)
    with (tls_client if secure else lambda port, _: client(port))(relay.port, client_tls) as smtp:
        assert smtp.sendmail("someone@example.org", ["bob@example.com"], MESSAGE) == {}
    (got,) = primary.received
    assert got.rcpt_tos == ["bob@example.com"] and got.content.endswith(MESSAGE)
    assert (b"with ESMTPS id" in got.content) is secure


# -- unauthenticated sessions keep the inbound rules ------------------------------------------------

def test_after_starttls_without_auth_a_foreign_recipient_is_refused(start_relay, primary,
                                                                     smarthost, client_tls):
    relay = start_relay(primary.port, extra=outbound_config(smarthost.port))
    with tls_client(relay.port, client_tls) as smtp:
        assert smtp.mail(ALICE)[0] == 250
        assert smtp.rcpt("bob@example.org") == (550, replies.RELAY_DENIED.format(
            domain="example.org")[4:].encode())


def test_a_failed_auth_changes_nothing(start_relay, primary, smarthost, client_tls):
    relay = start_relay(primary.port, extra=outbound_config(smarthost.port))
    with tls_client(relay.port, client_tls) as smtp:
        assert auth_plain(smtp, ALICE, "wrong")[0] == 535
        assert smtp.mail(ALICE)[0] == 250
        assert smtp.rcpt("bob@example.org")[0] == 550
        assert smtp.rcpt("bob@example.com")[0] == 250      # to the primary, as any MTA's
        code, _ = smtp.data(MESSAGE)
        assert code == 250
    assert [r.rcpt_tos for r in primary.received] == [["bob@example.com"]]
    assert smarthost.received == []


def test_auth_in_the_middle_of_a_transaction_is_refused(start_relay, primary, smarthost,
                                                        client_tls):
    """aiosmtpd would take it, and the rest of the transaction would then get the sending
    rules with a sender that was never checked against the user."""
    relay = start_relay(primary.port, extra=outbound_config(smarthost.port))
    with tls_client(relay.port, client_tls) as smtp:
        assert smtp.mail("ceo@example.org")[0] == 250
        assert auth_plain(smtp, ALICE, PASSWORDS[ALICE]) == (
            503, replies.AUTH_IN_TRANSACTION[4:].encode())
        assert smtp.rcpt("bob@example.org")[0] == 550
        smtp.rset()
        assert auth_plain(smtp, ALICE, PASSWORDS[ALICE])[0] == 235


# -- authenticated sessions: the submission port's rules and pipeline ------------------------------

@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_after_starttls_and_auth_mail_goes_out_with_sent_and_cs_sent_copies(
        start_relay, smarthost, client_tls, mechanism):
    primary = FakePrimary(Script(mail="451 4.3.0 down")).start()
    try:
        relay = start_relay(primary.port, extra=outbound_config(smarthost.port))
        with tls_client(relay.port, client_tls) as smtp:
            if mechanism == "PLAIN":
                assert auth_plain(smtp, ALICE, PASSWORDS[ALICE])[0] == 235
            else:
                assert smtp.docmd("AUTH", "LOGIN " + b64(ALICE))[0] == 334
                assert smtp.docmd(b64(PASSWORDS[ALICE]))[0] == 235
            assert smtp.sendmail(ALICE, ["bob@example.org"], MESSAGE) == {}
        wait_for(lambda: len(smarthost.received) == 1)
        (out,) = smarthost.received
        assert out.mail_from == ALICE and out.rcpt_tos == ["bob@example.org"]
        # as received, plus the one Received header the sending path adds (ESMTPSA: TLS, AUTH)
        assert out.content.startswith(b"Received: from ") and b"with ESMTPSA id" in out.content
        assert headers.remove(out.content, "Received") == MESSAGE
        (sent,) = files(relay.config.storage.maildirs / "example.com" / "alice" / ".Sent" / "cur")
        assert headers.remove(sent.read_bytes(), "Received") == MESSAGE
        primary.script.mail = "250 2.1.0 Ok"
        wait_for(lambda: len(primary.received) == 1)
        (copy,) = primary.received
        assert copy.mail_from == ALICE and copy.rcpt_tos == [ALICE]
        subject = email.message_from_bytes(copy.content, policy=email.policy.default)["subject"]
        assert subject == "from port 25 (CS-SENT)"
    finally:
        primary.stop()


@pytest.mark.parametrize("sender", ["ceo@example.com", "bob@example.com", "<>"])
def test_a_foreign_sender_after_auth_gets_553(start_relay, primary, smarthost, client_tls, sender):
    relay = start_relay(primary.port, extra=outbound_config(smarthost.port))
    with logged_in(relay.port, client_tls) as smtp:
        assert smtp.mail(sender) == (
            553, replies.SENDER_NOT_OWN.format(address=ALICE)[4:].encode())
        assert smtp.rcpt("bob@example.org")[0] == 503        # no transaction was opened
    assert smarthost.received == [] and primary.received == []


def test_without_a_smarthost_an_authenticated_mail_gets_451(start_relay, primary, client_tls):
    relay = start_relay(primary.port)
    with logged_in(relay.port, client_tls) as smtp:
        assert smtp.mail(ALICE) == (451, replies.SENDING_DISABLED[4:].encode())


def test_one_throttle_locks_submission_port_25_and_the_web_login(start_relay, client_tls,
                                                                 monkeypatch):
    monkeypatch.setattr("relay.app.LoginThrottle", lambda: fast_throttle(account_limit=3))
    relay = start_relay(submission=True, web=True)
    with tls_client(submission_port(relay), client_tls) as smtp:
        assert [auth_plain(smtp, ALICE, "guess")[0] for _ in range(3)] == [535] * 3
    with tls_client(relay.port, client_tls) as smtp:
        assert auth_plain(smtp, ALICE, PASSWORDS[ALICE]) == (454, replies.AUTH_BLOCKED[4:].encode())
        assert auth_plain(smtp, "bob@example.com", PASSWORDS["bob@example.com"])[0] == 235
    assert relay.running is not None and relay.running.web is not None
    submission_throttle = relay.running.submission[1].throttle
    assert relay.running.handler.submission.throttle is submission_throttle
    assert relay.running.web.app[SITE].throttle is submission_throttle
    assert submission_throttle.blocked("127.0.0.9", ALICE)        # the web's key for alice too
    assert not submission_throttle.blocked("198.51.100.7", ALICE)  # locked for that network only


SPELLINGS = ["\talice@example.com", "ALICE@Example.COM", " alice@example.com",
             "alice@exam\u00adple.com", "alice@ex\u200bample.com", "alice@example.com\x0b"]


def test_every_spelling_of_a_login_is_logged_under_one_name(start_relay, client_tls, caplog,
                                                           monkeypatch):
    """Security review 9.4: one normalisation, done once, for the throttle, the check and the
    log. Each spelling of alice's login, wrong or refused before any check (a soft hyphen, a
    zero-width space, U+000B), is logged as alice@example.com on the submission port, on
    port 25 AUTH and on the web login, and no log line carries the raw characters."""
    monkeypatch.setattr("relay.app.LoginThrottle",
                        lambda: fast_throttle(account_limit=100, address_limit=100))
    relay = start_relay(submission=True, web=True)
    assert relay.running is not None and relay.running.web is not None
    browser = WebClient(relay.running.web.addresses[0][1])
    caplog.set_level(logging.INFO, logger="relay")
    for spelling in SPELLINGS[3:]:      # no address: refused even with the right password
        assert browser.login_user(spelling, PASSWORDS[ALICE]).status == 401, spelling
    caplog.clear()
    for spelling in SPELLINGS:
        assert browser.login_user(spelling, "guess").status == 401, spelling
        for port in (submission_port(relay), relay.port):
            with tls_client(port, client_tls) as smtp:
                assert auth_plain(smtp, spelling, "guess")[0] == 535, (port, spelling)
    failed = [r.getMessage() for r in caplog.records
              if r.getMessage().startswith(("submission.auth_failed", "web.login_failed"))]
    assert len(failed) == 3 * len(SPELLINGS), failed
    assert all(f" user={ALICE} " in f"{line} " for line in failed), failed
    raw = [r.getMessage() for r in caplog.records
           if any(c in r.getMessage() for c in "\t\x0b\u00ad\u200b") or "ALICE@" in r.getMessage()]
    assert raw == []


def test_a_lock_earned_on_the_web_login_locks_submission_and_port_25(start_relay, client_tls,
                                                                     monkeypatch):
    """The other way round from the test above: guesses at the web login form lock the SMTP
    AUTH of both ports (one throttle), and the spellings of the address with it."""
    monkeypatch.setattr("relay.app.LoginThrottle", lambda: fast_throttle(account_limit=3))
    relay = start_relay(submission=True, web=True)
    assert relay.running is not None and relay.running.web is not None
    browser = WebClient(relay.running.web.addresses[0][1])
    assert [browser.login_user(ALICE, "guess").status for _ in range(3)] == [401] * 3
    assert browser.login_user(ALICE, PASSWORDS[ALICE]).status == 429
    for port in (submission_port(relay), relay.port):
        with tls_client(port, client_tls) as smtp:
            assert auth_plain(smtp, ALICE, PASSWORDS[ALICE]) == (454, replies.AUTH_BLOCKED[4:].encode())
            assert auth_plain(smtp, "\tAlice@Example.COM", PASSWORDS[ALICE])[0] == 454
            assert auth_plain(smtp, "bob@example.com", PASSWORDS["bob@example.com"])[0] == 235


# -- STARTTLS itself --------------------------------------------------------------------------------

def read_reply(sock: socket.socket | ssl.SSLSocket) -> bytes:
    """One complete (possibly multi-line) SMTP reply."""
    data = b""
    while not re.search(rb"(^|\r\n)\d{3} [^\r\n]*\r\n$", data):
        chunk = sock.recv(4096)
        assert chunk, f"connection closed after {data!r}"
        data += chunk
    return data


@pytest.mark.parametrize("injected", [b"MAIL FROM:<x@y.example>\r\n",
                                      b"EHLO evil.test\r\nMAIL FROM:<x@y.example>\r\n"],
                         ids=["mail", "ehlo-mail"])
@pytest.mark.parametrize("listener", ["inbound", "submission"])
def test_plaintext_pipelined_after_starttls_is_discarded(start_relay, primary, client_tls,
                                                         listener, injected):
    """CVE-2024-34083 class: commands injected in the same packet as STARTTLS (by a man in the
    middle) must not be carried into the encrypted session."""
    relay = start_relay(primary.port, submission=True)
    port = relay.port if listener == "inbound" else submission_port(relay)
    with socket.create_connection(("127.0.0.1", port), timeout=15) as raw:
        assert read_reply(raw).startswith(b"220 ")
        raw.sendall(b"EHLO client.test\r\n")
        assert b"STARTTLS" in read_reply(raw)
        raw.sendall(b"STARTTLS\r\n" + injected)           # one packet
        assert read_reply(raw).startswith(b"220 ")
        with client_tls.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            tls.sendall(b"EHLO client.test\r\n")
            assert read_reply(tls).startswith(b"250-")     # the first reply is to our EHLO
            if listener == "submission":
                token = b64(f"\0{ALICE}\0{PASSWORDS[ALICE]}")
                tls.sendall(f"AUTH PLAIN {token}\r\n".encode())
                assert read_reply(tls).startswith(b"235 ")
            tls.sendall(b"RCPT TO:<bob@example.com>\r\n")
            assert read_reply(tls).startswith(b"503 ")     # need MAIL: the injected one is gone
            tls.sendall(b"QUIT\r\n")
            assert read_reply(tls).startswith(b"221 ")
    assert primary.received == [] and primary.handler.sessions == []


def test_starttls_keeps_the_primary_connection_of_the_session(start_relay, primary, client_tls):
    """aiosmtpd starts a new session after STARTTLS: the primary connection kept between
    transactions goes along (not left open, forgotten, until the primary times it out)."""
    relay = start_relay(primary.port)
    with client(relay.port) as smtp:
        assert smtp.mail("someone@example.org")[0] == 250
        assert smtp.rcpt("bob@example.com")[0] == 250
        smtp.rset()
        assert smtp.starttls(context=client_tls)[0] == 220
        smtp.ehlo()
        assert smtp.sendmail("someone@example.org", ["bob@example.com"], MESSAGE) == {}
    assert len(primary.received) == 1
    assert len(primary.handler.sessions) == 1     # one connection to the primary, reused


# -- reloading the certificate -----------------------------------------------------------------------

def reload_tls(relay: InProcessRelay) -> bool:
    assert relay.running is not None
    return asyncio.run_coroutine_threadsafe(relay.running.reload_tls(), relay.loop).result(10)


def test_reload_serves_the_new_certificate_and_a_broken_one_keeps_the_old(
        start_relay, ca, tmp_path, client_tls, caplog):
    relay = start_relay(submission=True, web=True, extra="web: {tls: true}\n")
    assert relay.running is not None and relay.running.web is not None

    def names() -> list[str]:    # port 25, the submission port, HTTPS
        return [served_name(relay.port, client_tls),
                served_name(submission_port(relay), client_tls),
                served_name(relay.running.web.addresses[0][1], client_tls, https=True)]

    with tls_client(relay.port, client_tls) as before:
        assert names() == ["first"] * 3
        write_cert(ca, tmp_path / "server.pem", "second")
        with caplog.at_level(logging.INFO, logger="relay.tls"):
            assert reload_tls(relay) is True
        assert "tls.reloaded" in caplog.text
        assert names() == ["second"] * 3
        assert before.noop()[0] == 250          # a session already encrypted goes on
    (tmp_path / "server.pem").write_text("not a certificate\n")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="relay.tls"):
        assert reload_tls(relay) is False
    (record,) = [r for r in caplog.records if "tls.reload_failed" in r.getMessage()]
    assert record.levelno == logging.ERROR and "server.pem" in record.getMessage()
    assert names() == ["second"] * 3
    with logged_in(relay.port, client_tls) as smtp:      # and everything still works
        assert smtp.noop()[0] == 250


def test_reload_without_tls_is_logged_and_harmless(start_relay, caplog):
    relay = start_relay(tls=False)
    with caplog.at_level(logging.INFO, logger="relay.tls"):
        assert reload_tls(relay) is False
    assert "tls.reload_skipped" in caplog.text
    with client(relay.port) as smtp:
        assert smtp.noop()[0] == 250
