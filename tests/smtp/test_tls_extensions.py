"""MAIL FROM options and Received headers where TLS is involved (issue 8, points 1 and 2).

- The smarthost, and a primary during replay, each over STARTTLS: the FIRST message on a fresh
  connection goes out with BODY=8BITMIME and SMTPUTF8 (the relay says EHLO again after
  STARTTLS, which forgets what the server offered before it).
- Our Received header names the protocol as RFC 3848 and RFC 6531 3.7.3 do: ESMTP, ESMTPS,
  ESMTPSA, and UTF8SMTP, UTF8SMTPS, UTF8SMTPSA for a transaction with SMTPUTF8, on port 25,
  port 25 after AUTH, and the submission port.

The servers behind the relay are aiosmtpd with `require_starttls=True`: a MAIL before STARTTLS
gets 530, so a message that arrives came over TLS (and the session it came in says so)."""

from __future__ import annotations

import re
import smtplib
import ssl

import pytest
import trustme
from aiosmtpd.controller import Controller

from relay.addresses import parse_mailbox
from relay.directory import User
from tests.helpers import free_port, wait_for
from tests.smtp.fakes import InProcessRelay, Script, ScriptedHandler, write_config
from tests.smtp.helpers import PASSWORDS, cheap_hash, outbound_config, sender_of

pytestmark = pytest.mark.timeout(60)

ALICE = "alice@example.com"
JOERG = "j\u00f6rg@example.org"              # a recipient that needs SMTPUTF8
JOSE = "j\u00f6s\u00e9@sender.test"           # a sender that needs it
ZOE = "zo\u00eb@example.com"
SENT = ("From: Alice <alice@example.com>\r\nTo: <j\u00f6rg@example.org>\r\n"
        "Subject: gr\u00fc\u00dfe\r\n\r\nna\u00efve 8-bit body \u20ac\r\n").encode()
EIGHT_BIT = "From: s@sender.test\r\nSubject: caf\u00e9\r\n\r\nna\u00efve body\r\n".encode()
ASCII = b"From: s@sender.test\r\nSubject: plain\r\n\r\nplain body\r\n"


class TLSOnlyServer:
    """An aiosmtpd server (smarthost or primary) that takes mail only after STARTTLS, with a
    certificate for 127.0.0.1 from its own CA (written to `ca_file` for the relay to trust)."""

    def __init__(self, ca_file, port: int | None = None, name: str = "tls-only.test") -> None:
        ca = trustme.CA()
        ca.cert_pem.write_to_path(str(ca_file))
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("127.0.0.1").configure_cert(context)
        self.handler = ScriptedHandler(Script())
        self.port = port or free_port()
        self.controller = Controller(self.handler, hostname="127.0.0.1", port=self.port,
                                     server_hostname=name, decode_data=False,
                                     enable_SMTPUTF8=True, tls_context=context,
                                     require_starttls=True)

    def __enter__(self) -> TLSOnlyServer:
        self.controller.start()
        return self

    def __exit__(self, *exc) -> None:
        self.controller.stop()

    def only_session_was_tls(self) -> bool:
        """One connection sent MAIL, and it had said STARTTLS first."""
        return len(self.handler.sessions) == 1 and self.handler.sessions[0].ssl is not None


# -- point 1: the first message on a fresh TLS connection ---------------------------------------

SMARTHOST_TLS = {"required-ca-file": "starttls: required, ca_file: smarthost-ca.pem",
                 "opportunistic-ca-file": "starttls: opportunistic, ca_file: smarthost-ca.pem",
                 "required-no-verify": "starttls: required, verify_cert: false"}


@pytest.mark.parametrize("how", list(SMARTHOST_TLS))
def test_first_message_to_a_starttls_smarthost_says_8bitmime_and_smtputf8(make_relay, tmp_path,
                                                                         how):
    with TLSOnlyServer(tmp_path / "smarthost-ca.pem", name="smarthost.test") as smarthost:
        extra = (f"outbound: {{smarthost: {{address: 127.0.0.1:{smarthost.port}, "
                 f"{SMARTHOST_TLS[how]}}}, retry_delay: 1s}}\n")
        relay = make_relay(free_port(), extra=extra)
        sender_of(relay).submit(parse_mailbox(ALICE), ALICE, [JOERG], SENT)
        wait_for(lambda: len(smarthost.handler.received) == 1)
        (got,) = smarthost.handler.received
        assert (got.mail_from, got.rcpt_tos, got.content) == (ALICE, [JOERG], SENT)
        assert {"BODY=8BITMIME", "SMTPUTF8"} <= set(got.mail_options), got.mail_options
        assert smarthost.only_session_was_tls()
        relay.stop()        # before the server, so no connection of the relay's is cut


def test_first_replayed_message_to_a_starttls_primary_says_8bitmime_and_smtputf8(make_relay,
                                                                               tmp_path):
    port = free_port()
    relay = make_relay(port, users=(ALICE, ZOE), extra="replay: {probe_interval: 1s}\n",
                       primary="starttls: required, ca_file: primary-ca.pem")
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as client:
        client.ehlo("sender.test")
        assert client.sendmail(JOSE, [ZOE], EIGHT_BIT, ["SMTPUTF8", "BODY=8BITMIME"]) == {}
    with TLSOnlyServer(tmp_path / "primary-ca.pem", port=port, name="primary.test") as primary:
        wait_for(lambda: len(primary.handler.received) == 1)
        (got,) = primary.handler.received
        assert (got.mail_from, got.rcpt_tos) == (JOSE, [ZOE])
        assert got.content.endswith(EIGHT_BIT)
        assert {"BODY=8BITMIME", "SMTPUTF8"} <= set(got.mail_options), got.mail_options
        assert primary.only_session_was_tls()
        relay.stop()


# -- point 2: the protocol our Received header names --------------------------------------------

@pytest.fixture
def tls_relay(tmp_path, ca, primary, smarthost):
    """The relay with `tls`, port 25 and a submission port, its users with the PASSWORDS of
    tests/smtp/helpers.py, the fake primary and a fake smarthost (plaintext) behind it; its
    certificate is from conftest's `ca`, which `client_tls` trusts."""
    pem = tmp_path / "server.pem"
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(pem))
    path = write_config(tmp_path, primary.port, extra=outbound_config(smarthost.port)
                        + f"tls: {{cert: {pem}, key: {pem}}}\n")
    path.write_text(re.sub(r"listen: \{inbound: ([0-9.:]+)\}",
                           rf"listen: {{inbound: \1, submission: 127.0.0.1:{free_port()}}}",
                           path.read_text()))
    users = [User(parse_mailbox(e), "", cheap_hash(e)) for e in PASSWORDS]
    (tmp_path / "users.passwd").write_text("".join(u.line() + "\n" for u in users))
    relay = InProcessRelay.from_file(path).start()
    yield relay
    relay.stop()


def protocol(content: bytes) -> str:
    """The `with` word of the message's first header, which must be our Received header."""
    found = re.match(rb"Received: from [^\r]*\r\n\tby relay\.test \(continuity-relay\) "
                     rb"with (\S+) id ", content)
    assert found, content[:300]
    return found.group(1).decode()


def session(port: int, context: ssl.SSLContext, tls: bool, login: bool) -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=15)
    client.ehlo()
    if tls:
        assert client.starttls(context=context)[0] == 220
        client.ehlo()
    if login:
        client.login(ALICE, PASSWORDS[ALICE])
    return client


# (listener, STARTTLS, AUTH) -> the word without SMTPUTF8; with it, UTF8SMTP + the same suffix.
SESSIONS = {"port-25-plain": ("inbound", False, False, "ESMTP"),
            "port-25-starttls": ("inbound", True, False, "ESMTPS"),
            "port-25-starttls-auth": ("inbound", True, True, "ESMTPSA"),
            "submission-starttls-auth": ("submission", True, True, "ESMTPSA")}


@pytest.mark.parametrize("utf8", [False, True], ids=["ascii", "smtputf8"])
@pytest.mark.parametrize("how", list(SESSIONS))
def test_received_header_names_esmtp_s_a_and_utf8smtp(tls_relay, primary, smarthost, client_tls,
                                                      how, utf8):
    listener, tls, login, word = SESSIONS[how]
    port = (tls_relay.port if listener == "inbound"
            else tls_relay.running.submission[0].sockets[0].getsockname()[1])
    if login:      # a sending session: own address only, out through the smarthost
        sender, rcpt, data, upstream = ALICE, (JOERG if utf8 else "bob@example.org"), SENT, smarthost
    else:          # an MTA's session: to a user, through the primary
        sender, rcpt, data, upstream = (JOSE if utf8 else "s@sender.test"), "bob@example.com", \
            EIGHT_BIT, primary
    options = ["SMTPUTF8", "BODY=8BITMIME"] if utf8 else ["BODY=8BITMIME"]
    with session(port, client_tls, tls, login) as client:
        assert client.sendmail(sender, [rcpt], data, options) == {}
    wait_for(lambda: len(upstream.received) == 1)
    (got,) = upstream.received
    assert got.rcpt_tos == [rcpt] and got.content.endswith(data)
    assert protocol(got.content) == ("UTF8SMTP" + word[len("ESMTP"):] if utf8 else word)
