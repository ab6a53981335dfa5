"""User Maildirs: Maildir++ layout, exact bytes, and the continuity store on top."""

from __future__ import annotations

import mailbox
import os

from relay.addresses import parse_mailbox
from relay.storage.continuity import ContinuityStore
from relay.storage.maildir import MaildirStore


def test_layout_is_maildir_plus_plus(tmp_path):
    store = MaildirStore(tmp_path)
    path = store.ensure(parse_mailbox("alice@example.com"))
    assert path == tmp_path / "example.com" / "alice"
    for sub in ("cur", "new", "tmp", ".Sent/cur", ".Outbox/new"):
        assert (path / sub).is_dir()
    assert (path / ".Sent" / "maildirfolder").exists()
    assert sorted(mailbox.Maildir(str(path)).list_folders()) == ["Outbox", "Sent"]


def test_deliver_writes_exact_bytes_with_size_in_name(tmp_path):
    store = MaildirStore(tmp_path)
    data = b"Subject: \xe9\r\n\r\nbody\nlf\r\n"
    path = store.deliver(parse_mailbox("alice@example.com"), data)
    assert path.parent.name == "new" and path.read_bytes() == data
    assert path.name.endswith(f",S={len(data)}")
    assert os.listdir(path.parent.parent / "tmp") == []
    box = mailbox.Maildir(str(path.parent.parent), factory=None)
    assert [box.get_bytes(k) for k in box.keys()] == [data]


def test_keep_adds_delivery_headers_and_queues_a_link(tmp_path):
    store = ContinuityStore(MaildirStore(tmp_path / "maildirs"), tmp_path / "spool")
    user = parse_mailbox("bob@example.com")
    entry = store.keep(user, "s@sender.test", b"Subject: x\r\n\r\nhi\r\n", ("BODY=8BITMIME",))
    (stored,) = (tmp_path / "maildirs" / "example.com" / "bob" / "new").iterdir()
    assert stored.read_bytes() == (b"Return-Path: <s@sender.test>\r\nDelivered-To: bob@example.com\r\n"
                                   b"Subject: x\r\n\r\nhi\r\n")
    queue = store.replay_queue("example.com")
    envelope, data = queue.read(entry)
    assert data == b"Subject: x\r\n\r\nhi\r\n" and envelope.mail_options == ("BODY=8BITMIME",)
    assert (queue.root / "msg" / entry).stat().st_ino == stored.stat().st_ino


def test_keep_for_null_sender(tmp_path):
    store = ContinuityStore(MaildirStore(tmp_path / "m"), tmp_path / "s")
    entry = store.keep(parse_mailbox("bob@example.com"), "", b"x\r\n")
    envelope, _ = store.replay_queue("example.com").read(entry)
    assert envelope.mail_from == ""
    (stored,) = (tmp_path / "m" / "example.com" / "bob" / "new").iterdir()
    assert stored.read_bytes().startswith(b"Return-Path: <>\r\n")


def test_half_made_tree_is_completed(tmp_path):
    """A crash between creating a user's folder and its subfolders must not leave the user
    without a working Maildir."""
    root = tmp_path / "m"
    (root / "example.com" / "dave").mkdir(parents=True)
    (root / "example.com" / "dave" / ".Sent").mkdir()
    store = MaildirStore(root)
    path = store.deliver(parse_mailbox("dave@example.com"), b"x\r\n")
    assert path.read_bytes() == b"x\r\n"
    assert (root / "example.com" / "dave" / ".Sent" / "maildirfolder").exists()
    assert (root / "example.com" / "dave" / ".Sent" / "new").is_dir()
