"""Every message the relay handles reaches the archive once, with its envelope: passed to the
primary, kept in an outage (a hard link to the kept file), sent from the Outbox (a Bcc
recipient listed), and the relay's own notices (issue 11, point 1)."""

from __future__ import annotations

import os

import pytest

from relay.addresses import parse_mailbox
from relay.storage.archive import Archive
from tests.helpers import free_port, wait_for
from tests.smtp.fakes import FakePrimary, send
from tests.smtp.helpers import drop_in_outbox, outbound_config, sender_of

pytestmark = pytest.mark.timeout(60)

MESSAGE = b"From: s@sender.test\r\nTo: alice@example.com\r\nSubject: archived\r\n\r\nbody\r\n"


def archive_of(relay) -> Archive:
    return Archive(relay.config.storage.archive)


def test_passed_and_kept_mail_is_archived_once_with_every_recipient(make_relay):
    primary = FakePrimary().start()
    try:
        relay = make_relay(primary.port, storage="archive: archive")
        archive = archive_of(relay)
        assert send(relay.port, "s@sender.test", ["alice@example.com"], MESSAGE)[1][0] == 250
        (passed,) = wait_for(lambda: list(archive.records()), 10, "the passed message archived")
        assert (passed.direction, passed.kind, passed.rcpts, passed.outcome) == (
            "in", "passed", ("alice@example.com",), "primary 250")
        assert archive.read(passed).endswith(MESSAGE) and archive.read(passed).startswith(b"Received:")
        primary.script.rcpt = "451 4.3.0 down"
        assert send(relay.port, "s@sender.test", ["alice@example.com", "bob@example.com"],
                    MESSAGE.replace(b"archived", b"kept"))[1][0] == 250
        records = wait_for(lambda: list(archive.records())[1:], 10, "the kept message archived")
        (kept,) = records
        assert (kept.kind, kept.rcpts, kept.outcome) == (
            "kept", ("alice@example.com", "bob@example.com"), "kept (2)")
        home = relay.config.storage.maildirs / "example.com" / "alice" / "new"
        (copy,) = home.iterdir()
        assert os.path.samefile(archive.object_path(kept), copy)     # no second copy written
        assert copy.read_bytes().endswith(archive.read(kept)) and archive.verify() == []
    finally:
        primary.stop()


def test_sent_mail_lists_a_bcc_recipient_and_a_refusal_notice_is_archived(smarthost, make_relay):
    relay = make_relay(free_port(), extra=outbound_config(smarthost.port), storage="archive: archive")
    archive = archive_of(relay)
    sender_of(relay).store.maildirs.ensure(parse_mailbox("alice@example.com"))
    drop_in_outbox(relay, "alice", b"From: alice@example.com\r\nTo: x@else.test\r\n"
                   b"Bcc: hidden@else.test\r\nSubject: out\r\n\r\nhi\r\n")
    (sent,) = wait_for(lambda: list(archive.records()), 10, "the sent message archived")
    assert (sent.direction, sent.kind, sent.user) == ("out", "sent", "alice@example.com")
    assert sent.rcpts == ("x@else.test", "hidden@else.test")
    assert b"Bcc:" not in archive.read(sent)                        # what left
    drop_in_outbox(relay, "alice", b"From: ceo@example.com\r\nTo: x@else.test\r\nSubject: f\r\n\r\n")
    notice = wait_for(lambda: [r for r in archive.records() if r.kind == "notice"], 10, "the notice")
    assert notice[0].rcpts == ("alice@example.com",) and notice[0].sender == ""
    assert b"Not sent: a message in your Outbox" in archive.read(notice[0])
