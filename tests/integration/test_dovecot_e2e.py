"""End to end: mail the relay kept during an outage, read back through a real Dovecot.

The relay runs as root with `storage.owner: vmail` (as the tests must, see
tests/integration/dovecot.py), users and passwords are set with the `continuity-relay users`
commands, and Dovecot is started from contrib/dovecot/dovecot.conf on the very same Maildirs
and passwd-file.
"""

from __future__ import annotations

import imaplib
import io
import poplib
import smtplib
import time

import pytest

from relay.cli import main
from tests.helpers import free_port
from tests.smtp.fakes import InProcessRelay, send, write_config

pytestmark = pytest.mark.timeout(120)

SENT = (b"From: Sender <x@sender.test>\r\nTo: alice@example.com\r\nSubject: caf\xc3\xa9 outage\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
        b"Gr\xc3\xbc\xc3\x9fe \xe2\x82\xac 8-bit body\r\n..a line that started with a dot\r\nlast line\r\n")
MEANT = SENT.replace(b"\r\n..", b"\r\n.")


def cli(config, *args: str, password: str | None = None, monkeypatch=None) -> int:
    if password is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(password + "\n"))
    return main([*args, "-c", str(config)])


@pytest.fixture
def world(mail_tmp_path, dovecot_factory, monkeypatch):
    config = write_config(mail_tmp_path, free_port())
    config.write_text(config.read_text().replace("spool: spool}", "spool: spool, owner: vmail}"))
    assert cli(config, "users", "add", "alice@example.com", "--password-stdin",
               password="alice-pw", monkeypatch=monkeypatch) == 0
    assert cli(config, "users", "add", "nopw@example.com") == 0
    assert cli(config, "users", "add", "carol@example.com", "--password-stdin",
               password="carol-pw", monkeypatch=monkeypatch) == 0
    assert cli(config, "users", "deactivate", "carol@example.com") == 0
    relay = InProcessRelay.from_file(config).start()
    for rcpt in ("alice@example.com", "nopw@example.com", "carol@example.com"):
        _, reply = send(relay.port, "x@sender.test", [rcpt], SENT)
        assert reply[0] == 250, reply
    relay.stop()
    dovecot = dovecot_factory(mail_tmp_path / "dovecot", mail_tmp_path / "maildirs",
                              mail_tmp_path / "users.passwd")
    return config, mail_tmp_path / "maildirs", dovecot


def stored(maildirs, user: str):
    files = [p for sub in ("new", "cur") for p in (maildirs / "example.com" / user / sub).iterdir()]
    assert len(files) == 1, files
    return files[0]


def received_part(data: bytes) -> bytes:
    """The message as received: after Return-Path, Delivered-To and our Received header."""
    lines = data.split(b"\r\n")
    assert lines[0].startswith(b"Return-Path: ") and lines[1].startswith(b"Delivered-To: ")
    assert lines[2].startswith(b"Received: ")
    rest = 3
    while lines[rest].startswith(b"\t"):
        rest += 1
    return b"\r\n".join(lines[rest:])


def imap_fetch(port: int, user: str, password: str, select: bool) -> bytes:
    client = imaplib.IMAP4("127.0.0.1", port, timeout=15)
    try:
        client.login(user, password)
        client.select("INBOX", readonly=not select)
        status, data = client.fetch(b"1", "(BODY.PEEK[])")
        assert status == "OK"
        return data[0][1]
    finally:
        client.logout()


def test_kept_mail_reads_back_byte_identical_over_imap_and_pop3(world):
    _, maildirs, dovecot = world
    path = stored(maildirs, "alice")
    assert path.parent.name == "new"
    on_disk = path.read_bytes()
    assert received_part(on_disk) == MEANT
    assert imap_fetch(dovecot.imap_port, "alice@example.com", "alice-pw", select=False) == on_disk
    assert imap_fetch(dovecot.imap_port, "alice@example.com", "alice-pw", select=True) == on_disk
    moved = stored(maildirs, "alice")
    assert moved.parent.name == "cur" and moved.read_bytes() == on_disk
    assert imap_fetch(dovecot.imap_port, "alice@example.com", "alice-pw", select=True) == on_disk
    pop = poplib.POP3("127.0.0.1", dovecot.pop3_port, timeout=15)
    try:
        pop.user("alice@example.com")
        pop.pass_("alice-pw")
        _, lines, _ = pop.retr(1)
    finally:
        pop.quit()
    # poplib strips line ends and undoes dot-stuffing; put the CRLFs back.
    assert b"\r\n".join(lines) + b"\r\n" == on_disk


@pytest.mark.parametrize("user,password", [
    ("alice@example.com", "wrong-pw"),
    ("nopw@example.com", ""),
    ("nopw@example.com", "anything"),
    ("carol@example.com", "carol-pw"),
], ids=["wrong-password", "no-password-empty", "no-password", "deactivated"])
def test_refused_logins(world, user, password):
    _, maildirs, dovecot = world
    assert stored(maildirs, user.split("@")[0])  # the mail is there all the same
    with pytest.raises(imaplib.IMAP4.error):
        imap_fetch(dovecot.imap_port, user, password, select=False)
    pop = poplib.POP3("127.0.0.1", dovecot.pop3_port, timeout=15)
    try:
        pop.user(user)
        with pytest.raises(poplib.error_proto):
            pop.pass_(password)
    finally:
        pop.close()


def eventually_logs_in(port: int, user: str, password: str) -> bytes:
    """Dovecot looks at the passwd-file at most once a second: allow it a few."""
    deadline = time.monotonic() + 5
    while True:
        try:
            return imap_fetch(port, user, password, select=False)
        except imaplib.IMAP4.error:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


def test_password_changes_and_activation_take_effect_without_reload(world, monkeypatch):
    config, _, dovecot = world
    assert cli(config, "users", "activate", "carol@example.com") == 0
    assert eventually_logs_in(dovecot.imap_port, "carol@example.com", "carol-pw")
    assert cli(config, "users", "passwd", "alice@example.com", "--password-stdin",
               password="alice-new", monkeypatch=monkeypatch) == 0
    assert eventually_logs_in(dovecot.imap_port, "alice@example.com", "alice-new")
    with pytest.raises(imaplib.IMAP4.error):
        imap_fetch(dovecot.imap_port, "alice@example.com", "alice-pw", select=False)


def test_a_utf8_user_registered_with_the_command_reads_kept_mail_over_imap(world, monkeypatch):
    """Issue 8, point 2: `users add` takes a UTF-8 local part, and the line it writes is one
    Dovecot (contrib/dovecot/dovecot.conf) logs in with; the mail kept for that user reads back."""
    config, maildirs, dovecot = world
    user = "j\u00fcrgen@example.com"
    assert cli(config, "users", "add", user, "--password-stdin", password="j\u00fcrgen-pw",
               monkeypatch=monkeypatch) == 0
    relay = InProcessRelay.from_file(config).start()
    try:
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as smtp:
            smtp.ehlo("sender.test")
            smtp.command_encoding = "utf-8"          # what smtplib does for SMTPUTF8
            assert smtp.mail("x@sender.test", ["SMTPUTF8"])[0] == 250
            assert smtp.rcpt(user)[0] == 250
            assert smtp.data(MEANT)[0] == 250                # smtplib dot-stuffs it
    finally:
        relay.stop()
    deadline = time.monotonic() + 5       # Dovecot looks at the passwd-file once a second
    while True:
        client = imaplib.IMAP4("127.0.0.1", dovecot.imap_port, timeout=15)
        try:   # imaplib's LOGIN is ASCII-only; mail clients say AUTHENTICATE PLAIN in UTF-8
            client.authenticate("PLAIN", lambda _: f"\0{user}\0j\u00fcrgen-pw".encode())
            break
        except imaplib.IMAP4.error:
            client.shutdown()
            assert time.monotonic() < deadline, dovecot.log_text()[-2000:]
            time.sleep(0.3)
    try:
        client.select("INBOX", readonly=True)
        status, data = client.fetch(b"1", "(BODY.PEEK[])")
        assert status == "OK" and received_part(data[0][1]) == MEANT
    finally:
        client.logout()
    assert "Username character disallowed" not in dovecot.log_text()
