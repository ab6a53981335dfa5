"""The submission port over loopback with a real client: STARTTLS, AUTH, own-address sending,
throttling, and what the client hears when the pipeline refuses or fails."""

from __future__ import annotations

import logging
import ssl
import time
from dataclasses import dataclass, field

import pytest

from relay import headers
from relay.addresses import parse_mailbox
from relay.auth import LoginThrottle
from relay.config import load
from relay.directory import Directory, User
from relay.errors import PermFail, RelayError, StorageError
from relay.smtp import replies
from relay.smtp.submission import SubmissionHandler
from relay.smtp.tls import ServerTLS, tls_context
from tests.helpers import free_port
from tests.loopwatch import no_blocking_calls_on_loops
from tests.smtp.fakes import write_config
from tests.smtp.helpers import (
    PASSWORDS,
    SubmissionServer,
    auth_plain,
    b64,
    cheap_hash,
    fast_throttle,
    logged_in,
    plain_client,
    tls_client,
)

pytestmark = pytest.mark.timeout(60)

MESSAGE = (b"From: Alice <alice@example.com>\r\nTo: x@elsewhere.org\r\nSubject: hi\r\n\r\n"
           b".a line that starts with a dot\r\n8-bit: \xc3\xa9t\xc3\xa9\r\n")


# -- certificates, users, a fake pipeline --------------------------------------------------------

@pytest.fixture(scope="module")
def server_tls(ca, tmp_path_factory):
    """Made by our own ServerTLS from files, as the app does."""
    cert = ca.issue_cert("localhost", "127.0.0.1")
    folder = tmp_path_factory.mktemp("tls")
    cert.cert_chain_pems[0].write_to_path(folder / "cert.pem")
    for extra in cert.cert_chain_pems[1:]:
        extra.write_to_path(folder / "cert.pem", append=True)
    cert.private_key_pem.write_to_path(folder / "key.pem")
    return ServerTLS(folder / "cert.pem", folder / "key.pem")


@pytest.fixture
def directory(tmp_path):
    directory = Directory(load(write_config(tmp_path, free_port())))
    users = [User(parse_mailbox(e), "", cheap_hash(e), active=not e.startswith("gone"))
             for e in PASSWORDS]
    users.append(User(parse_mailbox("nopass@example.com")))
    directory.file.write_text("".join(u.line() + "\n" for u in users))
    return directory


@dataclass
class Pipeline:
    """A fake `submit`: records each call, answers an id or raises `error`."""

    error: Exception | None = None
    calls: list[tuple[User, str, list[str], bytes]] = field(default_factory=list)

    options: list[tuple[tuple[str, ...], dict[str, tuple[str, ...]]]] = field(default_factory=list)

    async def __call__(self, user: User, sender: str, rcpts: list[str], message: bytes,
                       mail_options: tuple[str, ...] = (),
                       rcpt_options: dict[str, tuple[str, ...]] | None = None) -> str:
        self.calls.append((user, sender, rcpts, message))
        self.options.append((mail_options, dict(rcpt_options or {})))
        if self.error is not None:
            raise self.error
        return f"Q{len(self.calls)}"


# -- the server (tests/smtp/helpers.SubmissionServer), watched for blocking calls --------------------

@pytest.fixture
def make_server(directory, server_tls):
    started = []

    def make(submit=None, *, disabled=False, throttle=None, max_recipients=100):
        handler = SubmissionHandler("relay.test", directory, None if disabled else submit or Pipeline(),
                                    max_recipients, throttle or fast_throttle())
        server = SubmissionServer(handler, server_tls).start()
        started.append(server)
        return server

    with no_blocking_calls_on_loops() as blocking:
        yield make
        for server in started:
            server.stop()
        assert blocking == [], f"blocking calls on the event loop: {blocking}"


@pytest.fixture
def pipeline():
    return Pipeline()


@pytest.fixture
def server(make_server, pipeline):
    return make_server(pipeline)


# -- before TLS, before AUTH -------------------------------------------------------------------------

def test_before_starttls_only_starttls_is_offered_and_nothing_else_works(server):
    with plain_client(server.port) as client:
        assert client.has_extn("starttls") and not client.has_extn("auth")
        assert auth_plain(client, "alice@example.com", PASSWORDS["alice@example.com"])[0] == 530
        assert client.mail("alice@example.com")[0] == 530
        assert client.rcpt("x@elsewhere.org")[0] == 530
        assert client.docmd("DATA")[0] == 530


def test_after_starttls_auth_is_offered_and_mail_needs_it(server, client_tls):
    with tls_client(server.port, client_tls) as client:
        assert client.esmtp_features["auth"].split() == ["LOGIN", "PLAIN"]
        assert not client.has_extn("starttls")
        assert client.mail("alice@example.com") == (530, b"5.7.0 Authentication required")
        assert client.rcpt("x@elsewhere.org")[0] == 530


# -- AUTH --------------------------------------------------------------------------------------------

def login_with_smtplib(client, login, password):
    client.login(login, password)   # picks PLAIN, the first of ours it knows
    return 235


def plain_after_challenge(client, login, password):
    assert client.docmd("AUTH", "PLAIN") == (334, b"")
    return client.docmd(b64(f"{login}\0{login}\0{password}"))[0]   # authzid = login is fine


def login_with_initial_user(client, login, password):
    assert client.docmd("AUTH", "LOGIN " + b64(login)) == (334, b64("Password:").encode())
    return client.docmd(b64(password))[0]


def login_after_challenges(client, login, password):
    assert client.docmd("AUTH", "LOGIN") == (334, b64("Username:").encode())
    assert client.docmd(b64(login))[0] == 334
    return client.docmd(b64(password))[0]


@pytest.mark.parametrize("how", [login_with_smtplib, plain_after_challenge, login_with_initial_user,
                                 login_after_challenges])
@pytest.mark.parametrize("login", ["alice@example.com", "BOB@Example.COM"])  # bcrypt, argon2
def test_auth_plain_and_login_work(server, pipeline, client_tls, how, login):
    with tls_client(server.port, client_tls) as client:
        assert how(client, login, PASSWORDS[login.lower()]) == 235
        assert client.docmd("AUTH", "PLAIN")[0] == 503       # already authenticated
        client.sendmail(login.lower(), ["x@elsewhere.org"], MESSAGE)
    ((user, *_),) = pipeline.calls
    assert user.email == login.lower()


def test_utf8_password(server, client_tls):
    with tls_client(server.port, client_tls) as client:   # smtplib's login() is ASCII-only
        assert login_after_challenges(client, "carol@example.com", "carol passwort") == 535
        assert login_after_challenges(client, "carol@example.com", PASSWORDS["carol@example.com"]) == 235


@pytest.mark.parametrize("login, password", [
    ("alice@example.com", "wrong"),
    ("nobody@example.com", "anything"),
    ("nopass@example.com", ""),
    ("nopass@example.com", "anything"),
    ("gone@example.com", PASSWORDS["gone@example.com"]),    # deactivated: right password, refused
    ("not an address", "x"),
])
def test_refused_logins(server, client_tls, login, password):
    with tls_client(server.port, client_tls) as client:
        assert auth_plain(client, login, password) == (535, b"5.7.8 Authentication credentials invalid")
        assert client.mail(login)[0] == 530


def test_malformed_auth_data(server, client_tls):
    with tls_client(server.port, client_tls) as client:
        assert client.docmd("AUTH", "PLAIN not!base64")[0] == 501
        assert client.docmd("AUTH", "PLAIN " + b64("no NULs at all"))[0] == 501
        assert client.docmd("AUTH", "PLAIN =")[0] == 501
        assert client.docmd("AUTH", "LOGIN")[0] == 334
        assert client.docmd("*")[0] == 501                    # the client gave up
        assert client.docmd("AUTH", "CRAM-MD5")[0] == 504
        # someone else's identity as authzid: refused even with a right password
        blob = b64(f"bob@example.com\0alice@example.com\0{PASSWORDS['alice@example.com']}")
        assert client.docmd("AUTH", "PLAIN " + blob)[0] == 535
        assert client.docmd("AUTH", "PLAIN " + b64(b"\0alice@example.com\0\xff\xfe"))[0] == 535
        assert auth_plain(client, "alice@example.com", PASSWORDS["alice@example.com"])[0] == 235


def test_account_lock_applies_across_the_client_network(make_server, client_tls):
    """Decision: `account_limit` failures lock the account for every address of the client
    network they came from (an IPv4 /24), until the oldest failure leaves the window."""
    server = make_server(throttle=fast_throttle(account_limit=3, address_limit=50))
    alice = PASSWORDS["alice@example.com"]
    with tls_client(server.port, client_tls) as client:
        assert [auth_plain(client, "alice@example.com", "guess")[0] for _ in range(3)] == [535] * 3
        assert auth_plain(client, "alice@example.com", alice) == (454, replies.AUTH_BLOCKED[4:].encode())
        assert auth_plain(client, "ALICE@example.com", alice)[0] == 454
    with tls_client(server.port, client_tls, source="127.0.0.2") as client:
        assert auth_plain(client, "alice@example.com", alice)[0] == 454
    for source in ("127.0.0.1", "127.0.0.2"):      # other accounts are not affected
        with tls_client(server.port, client_tls, source=source) as client:
            assert auth_plain(client, "bob@example.com", PASSWORDS["bob@example.com"])[0] == 235


@pytest.mark.parametrize("variant", ["\talice@example.com", "alice@example.com\x0b",
                                     "alice@exam\u00adple.com", "alice@ex\u200bample.com",
                                     " alice@example.com"])
def test_a_locked_account_stays_locked_under_any_spelling(make_server, client_tls, variant):
    """Security review 9.4: after the lock, these spellings got 535 (a fresh throttle key), and
    one of them 235 with the right password, because the throttle and the password check
    normalised the login differently."""
    server = make_server(throttle=fast_throttle(account_limit=3, address_limit=50))
    alice = PASSWORDS["alice@example.com"]
    with tls_client(server.port, client_tls) as client:
        assert [auth_plain(client, "alice@example.com", "guess")[0] for _ in range(3)] == [535] * 3
        assert auth_plain(client, variant, alice)[0] == 454
        assert auth_plain(client, variant, "guess")[0] == 454


def test_a_login_that_is_no_address_never_logs_in(make_server, client_tls):
    server = make_server(throttle=fast_throttle(account_limit=50, address_limit=50))
    alice = PASSWORDS["alice@example.com"]
    with tls_client(server.port, client_tls) as client:
        for variant in ("alice@example.com\x0b", "alice@exam\u00adple.com", "alice@ex\u200bample.com",
                        "alice@example.com\u00a0", "al ice@example.com"):
            assert auth_plain(client, variant, alice)[0] == 535
        assert auth_plain(client, "alice@example.com", alice)[0] == 235


def test_account_lock_is_no_lever_against_the_user_elsewhere(make_server, client_tls):
    """Security review 9.4: whoever types alice's address with wrong passwords locks out only
    their own network; alice from another network (127.0.1.x is another /24) still logs in."""
    server = make_server(throttle=fast_throttle(account_limit=3, address_limit=50))
    alice = PASSWORDS["alice@example.com"]
    with tls_client(server.port, client_tls, source="127.0.0.5") as client:
        assert [auth_plain(client, "alice@example.com", "guess")[0] for _ in range(3)] == [535] * 3
        assert auth_plain(client, "alice@example.com", alice)[0] == 454
    with tls_client(server.port, client_tls, source="127.0.1.1") as client:
        assert auth_plain(client, "alice@example.com", alice)[0] == 235


def test_address_lock_applies_to_every_account(make_server, client_tls):
    """Decision: `address_limit` failures from one address lock it for every account, even
    one it has never tried; the same accounts still work from elsewhere."""
    server = make_server(throttle=fast_throttle(account_limit=10, address_limit=3))
    with tls_client(server.port, client_tls, source="127.0.0.3") as client:
        for login in ("alice@example.com", "bob@example.com", "carol@example.com"):
            assert auth_plain(client, login, "guess")[0] == 535
        assert auth_plain(client, "erin@example.com", PASSWORDS["erin@example.com"])[0] == 454
    with tls_client(server.port, client_tls, source="127.0.0.4") as client:
        assert auth_plain(client, "erin@example.com", PASSWORDS["erin@example.com"])[0] == 235


def test_success_clears_the_account_count(make_server, client_tls):
    server = make_server(throttle=fast_throttle(account_limit=3, address_limit=50))
    alice = PASSWORDS["alice@example.com"]
    for _ in range(3):
        with tls_client(server.port, client_tls) as client:
            assert [auth_plain(client, "alice@example.com", "typo")[0] for _ in range(2)] == [535, 535]
            assert auth_plain(client, "alice@example.com", alice)[0] == 235


def test_failures_are_answered_after_a_growing_delay(make_server, client_tls):
    server = make_server(throttle=LoginThrottle(base_delay=0.3, max_delay=0.3))
    with tls_client(server.port, client_tls) as client:
        auth_plain(client, "alice@example.com", "guess")           # the first: no delay
        started = time.monotonic()
        assert auth_plain(client, "alice@example.com", "guess")[0] == 535
        assert time.monotonic() - started >= 0.3


def test_unreadable_passwd_file_is_temporary(server, directory, client_tls):
    # A bad line is only skipped now (issue 9.10): make the file itself unreadable.
    directory.file.unlink()
    directory.file.mkdir()
    with tls_client(server.port, client_tls) as client:
        reply = auth_plain(client, "alice@example.com", PASSWORDS["alice@example.com"])
        assert reply == (454, replies.AUTH_UNAVAILABLE[4:].encode())


def test_password_never_logged_and_hash_checks_leave_the_loop_free(server, client_tls, caplog):
    caplog.set_level(logging.DEBUG)          # every logger, aiosmtpd's and asyncio's included
    alice = PASSWORDS["alice@example.com"]
    with tls_client(server.port, client_tls) as client:
        assert auth_plain(client, "alice@example.com", "secret guess 1")[0] == 535
        assert login_after_challenges(client, "nobody@example.com", "secret guess 2") == 535
        assert login_with_initial_user(client, "alice@example.com", alice) == 235
    text = caplog.text
    for secret in ("secret guess 1", "secret guess 2", alice):
        assert secret not in text
        assert b64(secret) not in text
        assert b64(f"\0alice@example.com\0{secret}") not in text
    ours = [r.getMessage() for r in caplog.records if r.name == "relay.submission"]
    assert ours[0].startswith("submission.auth_failed peer=127.0.0.1 user=alice@example.com ")
    assert ours[1].startswith("submission.auth_failed peer=127.0.0.1 user=nobody@example.com ")
    assert ours[2] == "submission.auth_ok peer=127.0.0.1 user=alice@example.com mechanism=LOGIN"
    # nobody@ cost a cost-12 bcrypt check (about 180 ms), in a worker thread: `make_server`
    # fails the test if any check ran on the loop
    assert not [r for r in caplog.records if r.name == "mail.log" and r.levelno >= logging.WARNING]


# -- the transaction ---------------------------------------------------------------------------------

def test_message_reaches_submit_with_exact_envelope_and_bytes(server, pipeline, client_tls):
    with logged_in(server.port, client_tls) as client:
        assert client.mail("Alice@Example.COM", ["BODY=8BITMIME"]) == (250, b"2.1.0 Sender OK")
        assert client.rcpt("x@elsewhere.org") == (250, b"2.1.5 Recipient OK")
        assert client.rcpt("y@example.com")[0] == 250
        assert client.data(MESSAGE) == (250, b"2.0.0 OK: queued as Q1")
        # a second transaction in the same session
        client.sendmail("alice@example.com", ["z@example.net"], b"Subject: 2\r\n\r\nsecond\r\n")
    (user, sender, rcpts, message), second = pipeline.calls
    assert (user.email, sender, rcpts, without_received(message)) == (
        "alice@example.com", "Alice@Example.COM", ["x@elsewhere.org", "y@example.com"], MESSAGE)
    assert (*second[1:3], without_received(second[3])) == (
        "alice@example.com", ["z@example.net"], b"Subject: 2\r\n\r\nsecond\r\n")


def without_received(message: bytes) -> bytes:
    """The message as the client sent it: our one Received header on top taken off."""
    assert message.startswith(b"Received: from ")
    assert b"with ESMTPSA id " in message.split(b";", 1)[0]   # RFC 3848: TLS and AUTH
    return headers.remove(message, "Received")


@pytest.mark.parametrize("sender", ["bob@example.com", "alice@example.org", "alice+tag@example.com",
                                    "<>", "mallory@elsewhere.org"])
def test_foreign_envelope_sender_refused(server, pipeline, client_tls, sender):
    with logged_in(server.port, client_tls) as client:
        code, text = client.mail(sender)
        assert (code, text) == (553, b"5.7.1 Sender address rejected: you may send only as "
                                     b"alice@example.com")
        assert client.rcpt("x@elsewhere.org")[0] == 503      # no transaction was opened
    assert pipeline.calls == []


def test_recipients_anywhere_up_to_the_limit(make_server, pipeline, client_tls):
    server = make_server(pipeline, max_recipients=3)
    with logged_in(server.port, client_tls) as client:
        client.mail("alice@example.com")
        assert client.rcpt("someone@elsewhere.org")[0] == 250
        assert client.rcpt("b@xn--bcher-kva.example")[0] == 250
        assert client.rcpt("alice@example.com")[0] == 250
        assert client.rcpt("fourth@example.net") == (452, b"4.5.3 Too many recipients")
        assert client.rcpt("SomeOne@Elsewhere.org")[0] == 250   # already there: one copy
        assert client.rcpt("a/b@elsewhere.org")[0] == 553
        assert client.data(MESSAGE)[0] == 250
    ((_, _, rcpts, _),) = pipeline.calls
    assert rcpts == ["someone@elsewhere.org", "b@xn--bcher-kva.example", "alice@example.com"]


def test_permanent_refusal_from_the_pipeline_is_passed_on(make_server, client_tls):
    pipeline = Pipeline(PermFail(553, "5.7.1 From: header must be your own address"))
    server = make_server(pipeline)
    with logged_in(server.port, client_tls) as client:
        client.mail("alice@example.com")
        client.rcpt("x@elsewhere.org")
        assert client.data(MESSAGE) == (553, b"5.7.1 From: header must be your own address")


@pytest.mark.parametrize("error", [StorageError("/var/spool/relay/outbound: No space left on device"),
                                   RuntimeError("internal detail"),
                                   PermFail(451, "not really permanent")])
def test_local_fault_is_451_without_internals(make_server, client_tls, caplog, error):
    server = make_server(Pipeline(error))
    with logged_in(server.port, client_tls) as client:
        client.mail("alice@example.com")
        client.rcpt("x@elsewhere.org")
        code, text = client.data(MESSAGE)
        assert (code, text.decode()) == (451, replies.LOCAL_ERROR[4:])
        assert client.noop()[0] == 250                       # the session goes on
    assert str(error) in caplog.text                          # the administrator sees it


def test_sending_disabled_without_smarthost(make_server, client_tls):
    server = make_server(disabled=True)
    with logged_in(server.port, client_tls) as client:
        assert client.mail("alice@example.com") == (
            451, b"4.3.2 Sending is disabled on this relay: no smarthost configured")


def test_ehlo_offers_pipelining_and_enhancedstatuscodes_and_a_pipelined_group_is_answered_in_order(
        server, pipeline, client_tls):
    """Issue 8, point 4: submission speaks the extensions real clients use, and every reply
    carries an enhanced code, aiosmtpd's built-in ones (503, 500 line too long) included."""
    with logged_in(server.port, client_tls) as client:
        for extension in ("pipelining", "enhancedstatuscodes", "8bitmime", "smtputf8", "size"):
            assert client.has_extn(extension), extension
        client.send(b"MAIL FROM:<alice@example.com>\r\nRCPT TO:<x@elsewhere.org>\r\n"
                    b"RCPT TO:<y@elsewhere.org>\r\nDATA\r\n")
        answers = [client.getreply() for _ in range(4)]
        assert [(code, text[:5]) for code, text in answers] == [
            (250, b"2.1.0"), (250, b"2.1.5"), (250, b"2.1.5"), (354, b"End d")], answers
        client.send(MESSAGE.replace(b"\r\n.", b"\r\n..") + b".\r\nRSET\r\nDATA\r\n")
        assert client.getreply()[1].startswith(b"2.0.0 ")
        assert client.getreply() == (250, b"2.0.0 OK")
        assert client.getreply()[1].startswith(b"5.5.1 ")                # 503: no MAIL yet
        client.send(b"NOOP " + b"x" * 1100 + b"\r\n")
        code, text = client.getreply()
        assert (code, text[:6]) == (500, b"5.5.2 ") and b"too long" in text.lower(), text
        assert client.noop() == (250, b"2.0.0 OK")                        # the session goes on
    ((_, sender, rcpts, message),) = pipeline.calls
    assert (sender, rcpts) == ("alice@example.com", ["x@elsewhere.org", "y@elsewhere.org"])
    assert message.endswith(MESSAGE)


def test_oversized_message_552(server, pipeline, client_tls):
    with logged_in(server.port, client_tls) as client:
        client.mail("alice@example.com")
        client.rcpt("x@elsewhere.org")
        assert client.data(b"x" * 990 + b"\r\n" * 1 + (b"y" * 998 + b"\r\n") * 1100)[0] == 552
    assert pipeline.calls == []


# -- TLS context -------------------------------------------------------------------------------------

def test_tls_context_is_tls12_or_later_and_says_which_file_is_bad(server_tls, tmp_path):
    assert server_tls.context.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert server_tls.context.verify_mode == ssl.CERT_NONE          # no client certificates asked for
    (tmp_path / "cert.pem").write_text("not a certificate")
    with pytest.raises(RelayError, match="cert.pem"):
        tls_context(tmp_path / "cert.pem", tmp_path / "key.pem")
