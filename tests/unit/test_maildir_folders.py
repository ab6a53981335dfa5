"""The webmail's view of a Maildir: folders, pages of summaries, flags, moves and deletes, as
Dovecot writes them, and nothing done on a path that is not a folder or message of the user."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import relay.storage.maildir as maildir_module
from relay.addresses import parse_mailbox
from relay.storage.continuity import ContinuityStore
from relay.storage.durable import Owner
from relay.storage.maildir import (
    FolderError,
    MaildirStore,
    MessageKeyError,
    check_folder,
    check_key,
    folder_label,
)

ALICE = parse_mailbox("alice@example.com")


def message(n: int, subject: str | None = None, extra: bytes = b"") -> bytes:
    subject = subject if subject is not None else f"message {n}"
    return (f"From: Bob <bob@sender.test>\r\nTo: Alice <alice@example.com>\r\nSubject: {subject}\r\n"
            f"Date: Sat, 28 Nov 2026 03:0{n % 10}:00 +0000\r\n\r\nbody {n}\r\n").encode() + extra


def put(box: Path, name: str, data: bytes, sub: str = "new") -> Path:
    path = box / sub / name
    path.write_bytes(data)
    return path


def snapshot(root: Path) -> list[tuple[str, bool, int, int]]:
    """Every path under root with its type, size and mtime: equal snapshots mean nothing changed."""
    found = []
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        found.append((str(path.relative_to(root)), path.is_dir(), info.st_size, info.st_mtime_ns))
    return found


def names(box: Path, sub: str) -> list[str]:
    return sorted(os.listdir(box / sub))


@pytest.fixture
def store(tmp_path):
    return MaildirStore(tmp_path / "maildirs")


@pytest.fixture
def box(store):
    return store.ensure(ALICE)


# --- folders --------------------------------------------------------------------------------------


def test_folders_inbox_first_then_sent_drafts_outbox_then_others_as_a_tree(store, box):
    for name in ("Zeta", "Drafts", "archive", "Work.Projects", "Work", "Trash", "Sent.2025", "Work Stuff"):
        store._complete(box / f".{name}", marker=True)
    # Dovecot's own files, a directory that is not a Maildir, a symlink, a stray file: not folders.
    for name in ("dovecot.index", "dovecot.index.log", "dovecot.index.cache", "dovecot-uidlist",
                 "dovecot-uidvalidity", "dovecot-keywords", "dovecot.list.index.log", "subscriptions",
                 ".hidden-file"):
        (box / name).write_bytes(b"x")
    (box / ".notmaildir").mkdir()
    (box / ".Link").symlink_to(box / ".Zeta")
    (box / ".INBOX").mkdir()
    for sub in ("cur", "new", "tmp"):
        (box / ".INBOX" / sub).mkdir()
    assert store.folders(ALICE) == ["INBOX", "Sent", "Sent.2025", "Drafts", "Outbox", "archive", "Trash",
                                    "Work", "Work.Projects", "Work Stuff", "Zeta"]


def test_folders_of_a_new_user_makes_the_tree(store, tmp_path):
    assert store.folders(parse_mailbox("new@example.com")) == ["INBOX", "Sent", "Outbox"]
    assert (tmp_path / "maildirs" / "example.com" / "new" / ".Outbox" / "maildirfolder").exists()


@pytest.mark.parametrize("disk,shown", [
    ("Entw&APw-rfe", "Entwürfe"), ("A&-B", "A&B"), ("Plain", "Plain"), ("&ZeVnLIqe-", "日本語"),
    ("broken&-x&", "broken&-x&"), ("bad&!!!-", "bad&!!!-"),
])
def test_folder_label_decodes_modified_utf7(disk, shown):
    assert folder_label(disk) == shown


# --- listing --------------------------------------------------------------------------------------


def test_messages_newest_first_with_paging_and_flags(store, box):
    put(box, "1700000001.M1P1Q1.host,S=10", message(1))
    put(box, "1700000003.M5P1Q3.host,S=10:2,S", message(3), sub="cur")
    put(box, "1700000003.M20P1Q4.host:2,RS", message(4), sub="cur")
    put(box, "1700000002.M1P1Q2.host", message(2, subject="=?utf-8?q?caf=C3=A9?= \xe9t\xe9".encode(
        "latin-1").decode("latin-1")), sub="new")
    odd = put(box, "no-timestamp-here", message(0))
    os.utime(odd, (1600000000, 1600000000))
    put(box, "1700000009.M1P1Q9.host", b"x", sub="tmp")  # half-delivered: not listed
    total, page = store.messages(ALICE, "INBOX", 0, 2)
    assert total == 5
    assert [s.key for s in page] == ["1700000003.M20P1Q4.host", "1700000003.M5P1Q3.host,S=10"]
    assert page[0].flags == "RS" and page[0].seen and page[0].answered and not page[0].flagged
    assert page[1].flags == "S" and not page[1].answered
    total, rest = store.messages(ALICE, "INBOX", 2, 10)
    assert [s.key for s in rest] == ["1700000002.M1P1Q2.host", "1700000001.M1P1Q1.host,S=10",
                                     "no-timestamp-here"]
    assert not rest[0].seen and rest[0].flags == ""
    assert rest[2].received == 1600000000
    assert store.messages(ALICE, "INBOX", 5, 10) == (5, [])


def test_summary_headers_are_decoded_from_the_header_block(store, box):
    data = (b"From: =?utf-8?b?Wm/DqyBXZWnDnw==?= <zoe@x.test>\r\nTo: a@example.com,\r\n b@example.com\r\n"
            b"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?= and 8-bit \xc3\xa9\r\n"
            b"Date: Tue, 01 Dec 2026 10:00:00 +0100\r\n\r\nSubject: not this one\r\n")
    put(box, "1700000001.M1P1Q1.host", data)
    (summary,) = store.messages(ALICE, "INBOX")[1]
    assert summary.from_ == "Zoë Weiß <zoe@x.test>"
    assert summary.to == "a@example.com, b@example.com"
    assert summary.subject == "Grüße and 8-bit é"
    assert summary.date is not None and summary.date.isoformat() == "2026-12-01T10:00:00+01:00"
    assert summary.size == len(data)


def test_summary_of_broken_headers_does_not_fail(store, box):
    put(box, "1700000001.M1P1Q1.host", b"Subject: =?bogus?x?zz?= \x01\x02ctl\r\nDate: yesterday\r\n")
    (summary,) = store.messages(ALICE, "INBOX")[1]
    assert summary.date is None and "\x01" not in summary.subject and summary.from_ == ""


def test_listing_reads_only_the_header_block(store, box, monkeypatch):
    big = message(1) + b"x" * (8 * 1024 * 1024)
    put(box, "1700000001.M1P1Q1.host", big)
    read = []
    real_open = open

    class Counting:
        def __init__(self, file):
            self.file = file

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def fileno(self):
            return self.file.fileno()

        def read(self, size=-1):
            chunk = self.file.read(size)
            read.append(len(chunk))
            return chunk

    monkeypatch.setattr(maildir_module, "open", lambda *args, **kwargs: Counting(real_open(*args, **kwargs)),
                        raising=False)
    (summary,) = store.messages(ALICE, "INBOX")[1]
    assert summary.subject == "message 1" and summary.size == len(big)
    assert sum(read) <= 64 * 1024


def test_messages_of_subfolder_and_bad_paging(store, box):
    store._complete(box / ".Work.Projects", marker=True)
    put(box / ".Work.Projects", "1700000001.M1P1Q1.host", message(1))
    assert store.messages(ALICE, "Work.Projects")[0] == 1
    with pytest.raises(ValueError):
        store.messages(ALICE, "INBOX", -1, 10)
    with pytest.raises(ValueError):
        store.messages(ALICE, "INBOX", 0, 0)


def test_a_file_seen_in_new_and_cur_during_a_rename_counts_once(store, box):
    put(box, "1700000001.M1P1Q1.host", message(1))
    put(box, "1700000001.M1P1Q1.host:2,S", message(1), sub="cur")
    total, page = store.messages(ALICE, "INBOX")
    assert total == 1 and page[0].seen


def test_read_returns_the_stored_bytes(store):
    data = b"Subject: \xe9\r\n\r\nbody\nlf\r\n"
    path = store.deliver(ALICE, data)
    assert store.read(ALICE, "INBOX", path.name) == data
    assert store.read(ALICE, "inbox", path.name) == data


# --- flags ----------------------------------------------------------------------------------------


def test_set_flags_renames_like_dovecot(store, box):
    key = store.deliver(ALICE, message(1)).name
    assert store.set_flags(ALICE, "INBOX", key, add="S") == "S"
    assert names(box, "new") == [] and names(box, "cur") == [f"{key}:2,S"]
    assert store.set_flags(ALICE, "INBOX", key, add="R") == "RS"
    assert names(box, "cur") == [f"{key}:2,RS"]
    assert store.set_flags(ALICE, "INBOX", key, add=["F", "T"], remove="S") == "FRT"
    assert names(box, "cur") == [f"{key}:2,FRT"]
    assert store.set_flags(ALICE, "INBOX", key, remove="FRT") == ""
    assert names(box, "cur") == [f"{key}:2,"]
    (summary,) = store.messages(ALICE, "INBOX")[1]
    assert summary.key == key and summary.flags == "" and not summary.seen


def test_set_flags_without_change_moves_new_to_cur(store, box):
    key = store.deliver(ALICE, message(1)).name
    assert store.set_flags(ALICE, "INBOX", key) == ""
    assert names(box, "cur") == [f"{key}:2,"]


def test_set_flags_keeps_dovecot_keywords(store, box):
    put(box, "1700000001.M1P1Q1.host:2,Sab", message(1), sub="cur")
    assert store.set_flags(ALICE, "INBOX", "1700000001.M1P1Q1.host", add="F") == "FSab"
    assert names(box, "cur") == ["1700000001.M1P1Q1.host:2,FSab"]


@pytest.mark.parametrize("add,remove", [("x", ""), ("", "a"), ("S", "S"), ("s", "")])
def test_set_flags_refuses_unknown_flags(store, box, add, remove):
    key = store.deliver(ALICE, message(1)).name
    before = snapshot(box)
    with pytest.raises(ValueError):
        store.set_flags(ALICE, "INBOX", key, add=add, remove=remove)
    assert snapshot(box) == before


def test_dovecot_renaming_at_the_same_moment_is_retried(store, box, monkeypatch):
    """The file is renamed (Dovecot: new/ -> cur/ with its own flags) between our lookup and our
    rename: the key is looked up again and the change applied to the file's new name."""
    key = store.deliver(ALICE, message(1)).name
    real = MaildirStore._locate
    calls = []

    def racing(self, folder, wanted):
        found = real(self, folder, wanted)
        if not calls:
            os.rename(found, folder / "cur" / f"{wanted}:2,F")  # Dovecot was quicker
        calls.append(found)
        return found

    monkeypatch.setattr(MaildirStore, "_locate", racing)
    assert store.set_flags(ALICE, "INBOX", key, add="S") == "FS"
    assert names(box, "cur") == [f"{key}:2,FS"] and len(calls) == 2
    calls.clear()
    assert store.read(ALICE, "INBOX", key) == message(1)
    calls.clear()
    store._complete(box / ".Archive", marker=True)
    assert store.move_message(ALICE, "INBOX", key, "Archive") == key
    assert names(box / ".Archive", "cur") == [f"{key}:2,F"]


def test_a_message_that_vanishes_twice_is_reported_gone(store, box, monkeypatch):
    key = store.deliver(ALICE, message(1)).name
    real = MaildirStore._locate

    def vanishing(self, folder, wanted):
        found = real(self, folder, wanted)
        target = folder / "cur" / f"{wanted}:2,{len(os.listdir(folder / 'cur'))}"
        os.rename(found, target)
        return found

    monkeypatch.setattr(MaildirStore, "_locate", vanishing)
    with pytest.raises(MessageKeyError):
        store.read(ALICE, "INBOX", key)


# --- moves and deletes ----------------------------------------------------------------------------


def test_move_keeps_key_flags_and_place(store, box):
    store._complete(box / ".Archive", marker=True)
    unread = store.deliver(ALICE, message(1)).name
    read = store.deliver(ALICE, message(2)).name
    store.set_flags(ALICE, "INBOX", read, add="S")
    assert store.move_message(ALICE, "INBOX", unread, "Archive") == unread
    assert store.move_message(ALICE, "INBOX", read, "Archive") == read
    assert names(box / ".Archive", "new") == [unread]
    assert names(box / ".Archive", "cur") == [f"{read}:2,S"]
    assert names(box, "new") == names(box, "cur") == []
    assert store.move_message(ALICE, "Archive", read, "INBOX") == read
    assert names(box, "cur") == [f"{read}:2,S"]


def test_move_to_a_folder_holding_the_same_key_gets_a_new_key(store, box):
    store._complete(box / ".Archive", marker=True)
    put(box, "1700000001.M1P1Q1.host:2,S", message(1), sub="cur")
    put(box / ".Archive", "1700000001.M1P1Q1.host:2,", message(9), sub="cur")
    new_key = store.move_message(ALICE, "INBOX", "1700000001.M1P1Q1.host", "Archive")
    assert new_key != "1700000001.M1P1Q1.host"
    assert sorted(names(box / ".Archive", "cur")) == sorted(["1700000001.M1P1Q1.host:2,", f"{new_key}:2,S"])
    assert store.read(ALICE, "Archive", new_key) == message(1)


def test_move_to_the_same_folder_changes_nothing(store, box):
    key = store.deliver(ALICE, message(1)).name
    before = snapshot(box)
    assert store.move_message(ALICE, "INBOX", key, "inbox") == key
    assert snapshot(box) == before


def test_move_to_a_missing_folder_is_refused(store, box):
    key = store.deliver(ALICE, message(1)).name
    before = snapshot(box)
    with pytest.raises(FolderError):
        store.move_message(ALICE, "INBOX", key, "Nowhere")
    assert snapshot(box) == before


def test_delete_moves_to_trash_then_removes(store, box):
    key = store.deliver(ALICE, message(1)).name
    store.set_flags(ALICE, "INBOX", key, add="S")
    assert not (box / ".Trash").exists()
    assert store.delete(ALICE, "INBOX", key) == key
    assert (box / ".Trash" / "maildirfolder").exists()
    assert names(box / ".Trash", "cur") == [f"{key}:2,S"] and names(box, "cur") == []
    assert "Trash" in store.folders(ALICE)
    assert store.delete(ALICE, "Trash", key) is None
    assert names(box / ".Trash", "cur") == []
    with pytest.raises(MessageKeyError):
        store.read(ALICE, "Trash", key)


def test_delete_of_an_unknown_key_makes_no_trash(store, box):
    before = snapshot(box)
    with pytest.raises(MessageKeyError):
        store.delete(ALICE, "INBOX", "1700000001.M1P1Q1.nohost")
    assert snapshot(box) == before


def test_trash_is_handed_to_the_mail_user(tmp_path):
    assert os.geteuid() == 0, "the test suite runs as root (scripts/test), as CI does"
    vmail = Owner.named("vmail")
    store = MaildirStore(tmp_path / "m", vmail)
    box = store.ensure(ALICE)
    key = store.deliver(ALICE, message(1)).name
    store.delete(ALICE, "INBOX", key)
    trash = box / ".Trash"
    made = [trash, trash / "cur", trash / "new", trash / "tmp", trash / "maildirfolder"]
    assert [(os.lstat(p).st_uid, os.lstat(p).st_gid) for p in made] == [(vmail.uid, vmail.gid)] * 5


def test_deleting_a_kept_message_leaves_it_to_replay(tmp_path):
    """docs/architecture.md rule 7: the replay queue has its own hard link."""
    continuity = ContinuityStore(MaildirStore(tmp_path / "maildirs"), tmp_path / "spool")
    entry = continuity.keep(ALICE, "s@sender.test", b"Subject: x\r\n\r\nhi\r\n")
    store = continuity.maildirs
    (summary,) = store.messages(ALICE, "INBOX")[1]
    store.delete(ALICE, "INBOX", summary.key)
    store.delete(ALICE, "Trash", summary.key)
    assert store.messages(ALICE, "Trash") == (0, [])
    assert continuity.replay_queue("example.com").read(entry)[1] == b"Subject: x\r\n\r\nhi\r\n"


# --- paths that are not folders or messages ------------------------------------------------------

BAD_FOLDERS = ["", ".", "..", "../bob", "../../example.com/bob", "/etc", "Sent/../..", "a/b", ".Sent",
               "..Sent", "Sent.", "Work..Projects", "x\x00", "x\ny", "x\r", "\x1b[31m", "a\\b", "x" * 300,
               "Nowhere"]
BAD_KEYS = ["", ".", "..", "../../../bob/new/x", "a/b", "/etc/passwd", ".hidden", "k:2,S", "k\x00",
            "k\n", "1700000001.M1P1Q1.nohost", "é"]


@pytest.mark.parametrize("folder", BAD_FOLDERS)
def test_bad_folder_names_are_refused_with_nothing_touched(store, box, folder):
    key = store.deliver(ALICE, message(1)).name
    store._complete(box / ".Archive", marker=True)
    before = snapshot(store.root)
    calls = [
        lambda: store.messages(ALICE, folder),
        lambda: store.read(ALICE, folder, key),
        lambda: store.set_flags(ALICE, folder, key, add="S"),
        lambda: store.move_message(ALICE, folder, key, "Archive"),
        lambda: store.move_message(ALICE, "INBOX", key, folder),
        lambda: store.delete(ALICE, folder, key),
    ]
    for call in calls:
        with pytest.raises(FolderError) as caught:
            call()
        assert isinstance(caught.value, ValueError)
    assert snapshot(store.root) == before


@pytest.mark.parametrize("key", BAD_KEYS)
def test_bad_keys_are_refused_with_nothing_touched(store, box, key):
    store.deliver(ALICE, message(1))
    store._complete(box / ".Archive", marker=True)
    (box.parent / "bob").mkdir()
    before = snapshot(store.root)
    calls = [
        lambda: store.read(ALICE, "INBOX", key),
        lambda: store.set_flags(ALICE, "INBOX", key, add="S"),
        lambda: store.move_message(ALICE, "INBOX", key, "Archive"),
        lambda: store.delete(ALICE, "INBOX", key),
    ]
    for call in calls:
        with pytest.raises(MessageKeyError) as caught:
            call()
        assert isinstance(caught.value, ValueError)
    assert snapshot(store.root) == before


def test_a_bad_folder_for_a_user_without_a_tree_creates_nothing(store):
    with pytest.raises(FolderError):
        store.messages(parse_mailbox("nobody@example.com"), "../alice")
    assert not store.root.exists()


def test_a_symlinked_folder_is_not_followed(store, box, tmp_path):
    outside = tmp_path / "outside"
    for sub in ("cur", "new", "tmp"):
        (outside / sub).mkdir(parents=True)
    put(outside, "1700000001.M1P1Q1.host", message(1))
    (box / ".Escape").symlink_to(outside)
    assert "Escape" not in store.folders(ALICE)
    with pytest.raises(FolderError):
        store.read(ALICE, "Escape", "1700000001.M1P1Q1.host")


def test_a_symlinked_message_is_not_read(store, box, tmp_path):
    secret = tmp_path / "secret"
    secret.write_bytes(b"secret")
    (box / "new" / "1700000001.M1P1Q1.host").symlink_to(secret)
    (box / "cur" / "1700000002.M1P1Q1.host:2,S").symlink_to(secret)
    for key in ("1700000001.M1P1Q1.host", "1700000002.M1P1Q1.host"):
        with pytest.raises(MessageKeyError):
            store.read(ALICE, "INBOX", key)
    total, page = store.messages(ALICE, "INBOX")
    assert page == []


def test_checks_accept_ordinary_names():
    assert check_folder("inbox") == "INBOX"
    assert check_folder("Work.Projects") == "Work.Projects"
    assert check_folder("Entw&APw-rfe") == "Entw&APw-rfe"
    assert check_folder("My Folder") == "My Folder"
    assert check_key("1700000001.M1P1Q1.host\\057name,S=10") == "1700000001.M1P1Q1.host\\057name,S=10"
