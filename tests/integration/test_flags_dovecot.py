"""Webmail and IMAP clients see the same mailbox: flags, moves and deletes made through
`MaildirStore` show over IMAP in a real Dovecot (started from contrib/dovecot/dovecot.conf), and
flags set over IMAP show in `MaildirStore.messages()`.

Runs as root, like the other integration tests: `MaildirStore(root, Owner.named("vmail"))` hands
what it creates to the mail user Dovecot serves as (tests/integration/dovecot.py says why).
"""

from __future__ import annotations

import imaplib
import os
import re
from pathlib import Path

import pytest

from relay.addresses import parse_mailbox
from relay.directory import hash_password
from relay.storage.durable import Owner, replace_file
from relay.storage.maildir import MaildirStore
from tests.helpers import wait_for

pytestmark = pytest.mark.timeout(90)

USER, PASSWORD = "alice@example.com", "alice flags pw"
ALICE = parse_mailbox(USER)


def message(n: int) -> bytes:
    return (f"From: Bob <bob@sender.test>\r\nTo: Alice <{USER}>\r\nSubject: message {n}\r\n"
            f"Message-ID: <flags-{n}@sender.test>\r\nDate: Sat, 28 Nov 2026 03:0{n}:00 +0000\r\n\r\n"
            f"body {n}\r\n").encode()


def ok(result: tuple[str, list]) -> list:
    status, data = result
    assert status == "OK", (status, data)
    return data


class Imap:
    """A logged-in IMAP session with the few commands the tests need."""

    def __init__(self, port: int) -> None:
        self.client = imaplib.IMAP4("127.0.0.1", port, timeout=15)
        ok(self.client.login(USER, PASSWORD))

    def select(self, folder: str) -> int:
        return int(ok(self.client.select(folder))[0])

    def uid_of(self, n: int) -> bytes | None:
        """The UID of message n in the selected folder (by its Message-ID), or None."""
        found = ok(self.client.uid("SEARCH", "HEADER", "Message-ID", f"<flags-{n}@sender.test>"))[0].split()
        return found[0] if found else None

    def flags(self, uid: bytes) -> set[str]:
        data = ok(self.client.uid("FETCH", uid, "(FLAGS)"))
        match = re.search(rb"FLAGS \(([^)]*)\)", data[0])
        assert match, data
        return set(match.group(1).decode().split())

    def subjects(self) -> list[str]:
        ok(self.client.noop())
        data = ok(self.client.uid("SEARCH", "ALL"))[0].split()
        if not data:
            return []
        fetched = ok(self.client.uid("FETCH", b",".join(data), "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])"))
        return sorted(item[1].decode().strip().removeprefix("Subject: ") for item in fetched
                      if isinstance(item, tuple))

    def folders(self) -> list[str]:
        return [line.decode().rsplit(" ", 1)[-1].strip('"') for line in ok(self.client.list())]

    def close(self) -> None:
        try:
            self.client.logout()
        except (OSError, imaplib.IMAP4.error):
            pass


@pytest.fixture
def world(mail_tmp_path: Path, dovecot_factory):
    maildirs = mail_tmp_path / "maildirs"
    etc = mail_tmp_path / "etc"
    etc.mkdir(mode=0o750)
    owner = Owner.named("vmail")
    owner.claim(etc)
    users = etc / "users.passwd"
    replace_file(users, f"{USER}:{hash_password(PASSWORD)}:::Alice:::\n".encode(), mode=0o640, owner=owner)
    store = MaildirStore(maildirs, owner)
    keys = {n: store.deliver(ALICE, message(n)).name for n in range(1, 6)}
    dovecot = dovecot_factory(mail_tmp_path / "dovecot", maildirs, users)
    sessions: list[Imap] = []

    def imap() -> Imap:
        sessions.append(Imap(dovecot.imap_port))
        return sessions[-1]

    yield store, keys, imap, dovecot
    for session in sessions:
        session.close()
    errors = [line for line in dovecot.log_text().splitlines() if re.search(r": (Error|Fatal|Panic):", line)]
    assert not errors, "Dovecot logged errors:\n" + "\n".join(errors)


def summary(store: MaildirStore, folder: str, key: str):
    return next((s for s in store.messages(ALICE, folder, 0, 100)[1] if s.key == key), None)


def test_flags_set_here_show_over_imap_and_back(world):
    store, keys, imap, _ = world
    # Before any IMAP session: the file goes new/ -> cur/ with the name Dovecot would give it.
    assert store.set_flags(ALICE, "INBOX", keys[1], add="S") == "S"
    home = store.path(ALICE)
    assert os.listdir(home / "cur") == [f"{keys[1]}:2,S"]
    session = imap()
    session.select("INBOX")
    assert "\\Seen" in session.flags(session.uid_of(1))
    assert "\\Seen" not in session.flags(session.uid_of(2))

    # Over IMAP, on other messages: messages() sees what Dovecot wrote into the file names.
    ok(session.client.uid("STORE", session.uid_of(2), "+FLAGS", "(\\Seen)"))
    ok(session.client.uid("STORE", session.uid_of(3), "+FLAGS", "(\\Seen \\Answered)"))
    ok(session.client.uid("STORE", session.uid_of(4), "+FLAGS", "(\\Flagged)"))
    assert summary(store, "INBOX", keys[2]).seen
    third = summary(store, "INBOX", keys[3])
    assert third.seen and third.answered and third.flags == "RS"
    assert summary(store, "INBOX", keys[4]).flagged and not summary(store, "INBOX", keys[4]).seen
    names = sorted(os.listdir(home / "cur"))
    assert f"{keys[2]}:2,S" in names and f"{keys[3]}:2,RS" in names and f"{keys[4]}:2,F" in names

    # Changed here while the IMAP session stays open on the folder: NOOP brings the news.
    store.set_flags(ALICE, "INBOX", keys[2], remove="S", add="F")
    store.set_flags(ALICE, "INBOX", keys[5], add="RS")

    def imap_sees_changes() -> bool:
        ok(session.client.noop())
        second, fifth = session.flags(session.uid_of(2)), session.flags(session.uid_of(5))
        return "\\Flagged" in second and "\\Seen" not in second and {"\\Seen", "\\Answered"} <= fifth

    wait_for(imap_sees_changes, 10, what="the open IMAP session to see the new flags")
    assert imap().select("INBOX") == 5  # the same five messages, nothing duplicated or lost


def test_moves_and_deletes_here_show_over_imap(world):
    store, keys, imap, _ = world
    session = imap()
    session.select("INBOX")
    ok(session.client.create("Archive"))  # a folder made by an IMAP client ...
    assert store.folders(ALICE) == ["INBOX", "Sent", "Outbox", "Archive"]  # ... is a folder here
    ok(session.client.uid("STORE", session.uid_of(1), "+FLAGS", "(\\Seen)"))

    assert store.move_message(ALICE, "INBOX", keys[1], "Archive") == keys[1]
    assert store.move_message(ALICE, "INBOX", keys[2], "Archive") == keys[2]
    wait_for(lambda: session.subjects() == ["message 3", "message 4", "message 5"],
             10, what="the moved messages to leave INBOX over IMAP")
    archive = imap()
    assert archive.select("Archive") == 2
    assert archive.subjects() == ["message 1", "message 2"]
    assert "\\Seen" in archive.flags(archive.uid_of(1)) and "\\Seen" not in archive.flags(archive.uid_of(2))

    assert store.delete(ALICE, "INBOX", keys[3]) == keys[3]
    wait_for(lambda: session.subjects() == ["message 4", "message 5"], 10,
             what="the deleted message to leave INBOX")
    assert "Trash" in imap().folders()
    vmail = Owner.named("vmail")
    for path in (store.path(ALICE) / ".Trash").rglob("*"):  # made here, as root: handed to vmail
        assert (path.stat().st_uid, path.stat().st_gid) == (vmail.uid, vmail.gid), path
    trash = imap()
    assert trash.select("Trash") == 1 and trash.subjects() == ["message 3"]
    assert store.delete(ALICE, "Trash", keys[3]) is None
    wait_for(lambda: trash.subjects() == [], 10,
             what="the message deleted from Trash to disappear over IMAP")

    # Dovecot's index files are in the tree by now: still neither folders nor messages here.
    home = store.path(ALICE)
    assert any(name.startswith("dovecot") for name in os.listdir(home))
    assert store.folders(ALICE) == ["INBOX", "Sent", "Outbox", "Archive", "Trash"]
    assert sorted(s.key for s in store.messages(ALICE, "INBOX")[1]) == sorted([keys[4], keys[5]])
    assert store.messages(ALICE, "Trash") == (0, [])


def test_a_message_expunged_over_imap_is_gone_here(world):
    store, keys, imap, _ = world
    session = imap()
    session.select("INBOX")
    ok(session.client.uid("STORE", session.uid_of(4), "+FLAGS", "(\\Deleted)"))
    assert summary(store, "INBOX", keys[4]).deleted
    ok(session.client.expunge())
    total, page = store.messages(ALICE, "INBOX")
    assert total == 4 and keys[4] not in {s.key for s in page}
