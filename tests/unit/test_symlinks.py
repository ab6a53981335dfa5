"""Issue 9.2: running as root with `storage.owner`, the Maildir trees belong to the mail user, who
may plant symlinks, FIFOs and hard links in them. Nothing the relay does as root may follow one:
no chown, no write, no read through a link, no hang on a FIFO.

These run as root (scripts/test and CI do) with the `vmail` user that scripts/test creates.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import subprocess
from pathlib import Path

import pytest

from relay.addresses import parse_mailbox
from relay.delivery.submit import Submitter
from relay.errors import StorageError
from relay.runners.outbox import OutboxRunner
from relay.storage.continuity import ContinuityStore
from relay.storage.durable import Owner, UnsafePathError, make_dirs, write_new
from relay.storage.maildir import MaildirStore

DAVE = parse_mailbox("dave@example.com")
ALICE = parse_mailbox("alice@example.com")
BOB = parse_mailbox("bob@example.com")


@pytest.fixture
def vmail() -> Owner:
    assert os.geteuid() == 0, "the test suite runs as root (scripts/test), as CI does"
    owner = Owner.named("vmail")
    assert owner.uid not in (None, 0)
    return owner


def root_only(tmp_path: Path) -> tuple[Path, Path]:
    """A root-only file and a root-only directory, outside the storage roots."""
    vault = tmp_path / "vault"
    vault.mkdir(mode=0o700)
    secret = vault / "shadow"
    secret.write_bytes(b"root:secret\n")
    secret.chmod(0o600)
    private = vault / "private"
    private.mkdir(mode=0o700)
    return secret, private


def owners(*paths: Path) -> list[tuple[int, int]]:
    return [(os.stat(p).st_uid, os.stat(p).st_gid) for p in paths]


def refused_paths(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "maildir.symlink_refused" in r.getMessage()]


def test_planted_symlinks_in_a_tree_are_refused_not_chowned(tmp_path, vmail, caplog):
    """The reported attack: `.Sent/maildirfolder` -> a root-only file and `.Outbox/cur` -> a
    root-only directory, then one message for dave. Before the fix both targets became vmail's."""
    secret, private = root_only(tmp_path)
    maildirs = tmp_path / "maildirs"
    MaildirStore(maildirs, vmail).ensure(DAVE)          # an earlier process made dave's tree
    home = maildirs / "example.com" / "dave"
    (home / ".Sent" / "maildirfolder").unlink()
    (home / ".Sent" / "maildirfolder").symlink_to(secret)
    (home / ".Outbox" / "cur").rmdir()
    (home / ".Outbox" / "cur").symlink_to(private)
    store = ContinuityStore(MaildirStore(maildirs, vmail), tmp_path / "spool", vmail)  # a restart
    caplog.set_level(logging.INFO, logger="relay")
    with pytest.raises(StorageError):
        store.keep(DAVE, "x@sender.test", b"Subject: x\r\n\r\nx\r\n")
    assert owners(secret, private) == [(0, 0), (0, 0)]
    assert secret.read_bytes() == b"root:secret\n" and os.listdir(private) == []
    assert (os.stat(secret).st_mode & 0o777, os.stat(private).st_mode & 0o777) == (0o600, 0o700)
    assert refused_paths(caplog) and str(home / ".Sent" / "maildirfolder") in refused_paths(caplog)[0]


@pytest.mark.parametrize("link", ["tmp", "new", ".Sent/tmp", ".Sent", "."])
def test_delivery_never_writes_through_a_symlinked_directory(tmp_path, vmail, caplog, link):
    """A link planted after the tree was checked (the process already knows dave) is refused too:
    every delivery walks the tree again without following links."""
    _secret, private = root_only(tmp_path)
    store = MaildirStore(tmp_path / "maildirs", vmail)
    home = store.ensure(DAVE)
    victim = home if link == "." else home / link
    victim.rename(victim.with_name(victim.name + ".moved"))
    victim.symlink_to(private)
    caplog.set_level(logging.INFO, logger="relay")
    with pytest.raises(UnsafePathError):
        store.deliver(DAVE, b"Subject: x\r\n\r\nx\r\n", folder="Sent" if "Sent" in link else None)
    assert os.listdir(private) == [] and owners(private) == [(0, 0)]
    assert refused_paths(caplog)


def test_an_existing_hard_linked_marker_is_refused(tmp_path, vmail):
    secret, _private = root_only(tmp_path)
    maildirs = tmp_path / "maildirs"
    MaildirStore(maildirs, vmail).ensure(DAVE)
    marker = maildirs / "example.com" / "dave" / ".Outbox" / "maildirfolder"
    marker.unlink()
    os.link(secret, marker)  # root can; protected_hardlinks stops vmail, but never trust it
    with pytest.raises(UnsafePathError):
        MaildirStore(maildirs, vmail).ensure(DAVE)
    assert owners(secret) == [(0, 0)]


def test_files_and_directories_are_handed_over_through_their_descriptors(tmp_path, vmail):
    make_dirs(tmp_path / "a" / "b", vmail)
    write_new(tmp_path / "a" / "b" / "f", b"x", owner=vmail)
    assert owners(tmp_path / "a", tmp_path / "a" / "b", tmp_path / "a" / "b" / "f") == \
        [(vmail.uid, vmail.gid)] * 3
    (tmp_path / "link").symlink_to(tmp_path / "a")
    with pytest.raises(FileExistsError):
        write_new(tmp_path / "link", b"x", owner=vmail)


# --- the Outbox runner --------------------------------------------------------------------------

MESSAGE = (b"From: Bob <bob@example.com>\r\nTo: carol@example.org\r\nSubject: hi\r\n\r\nhello\r\n")


def runner(tmp_path: Path, vmail: Owner) -> OutboxRunner:
    store = ContinuityStore(MaildirStore(tmp_path / "maildirs", vmail), tmp_path / "spool", vmail)
    return OutboxRunner(store.maildirs, Submitter(store), lambda: ["example.com"], lambda user: True,
                        lambda: None, "relay.test", store.notify, max_size=1024)


def drop(home: Path, name: str, data: bytes) -> Path:
    path = home / ".Outbox" / "new" / name
    path.write_bytes(data)
    return path


def all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


def test_a_symlinked_outbox_is_not_followed(tmp_path, vmail, caplog):
    """bob's .Outbox -> alice's: before the fix, alice's message went to bob's... and bob's to
    alice's Drafts. Now the link is refused and both Outboxes are left as they are."""
    outbox = runner(tmp_path, vmail)
    alice_home = outbox.maildirs.ensure(ALICE)
    bob_home = outbox.maildirs.ensure(BOB)
    drop(alice_home, "1700000000.M1P1Q1.test", MESSAGE.replace(b"bob@", b"alice@"))
    os.rename(bob_home / ".Outbox", bob_home / ".Outbox.real")
    (bob_home / ".Outbox").symlink_to(alice_home / ".Outbox")
    caplog.set_level(logging.INFO, logger="relay")
    before = all_files(alice_home)
    bob_before = all_files(bob_home)
    assert outbox.scan() == 1  # alice's own, from alice's own Outbox
    after = all_files(alice_home)
    assert [k for k in after if k.startswith((".Outbox/new", ".Outbox/cur"))] == []
    assert all_files(bob_home).keys() == bob_before.keys()  # nothing moved into bob's folders
    assert not (bob_home / ".Drafts").exists() and not (alice_home / ".Drafts").exists()
    assert any(str(bob_home / ".Outbox") in line for line in refused_paths(caplog))
    assert before  # the message really was there to be taken


@pytest.mark.timeout(30)
def test_a_fifo_a_link_and_an_oversized_file_in_the_outbox(tmp_path, vmail, caplog):
    """Before the fix the FIFO hung the runner for good (read_bytes waits for a writer) and the
    link was read as root: its target went out as mail."""
    secret, _private = root_only(tmp_path)
    outbox = runner(tmp_path, vmail)
    home = outbox.maildirs.ensure(BOB)
    new = home / ".Outbox" / "new"
    os.mkfifo(new / "1700000000.M1P1Q1.fifo")
    (new / "1700000000.M1P1Q2.link").symlink_to(secret)
    drop(home, "1700000000.M1P1Q3.big", MESSAGE + b"x" * 2000)
    drop(home, "1700000000.M1P1Q4.good", MESSAGE)
    caplog.set_level(logging.INFO, logger="relay")
    assert outbox.scan() == 1
    assert sorted(os.listdir(new)) == ["1700000000.M1P1Q1.fifo", "1700000000.M1P1Q2.link"]
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("outbox.skipped")]
    assert len(skipped) == 2 and all("user=bob@example.com" in line for line in skipped)
    (draft,) = (home / ".Drafts" / "cur").iterdir()
    assert draft.read_bytes() == MESSAGE + b"x" * 2000  # too big: back to Drafts, not sent
    queued = b"".join(p.read_bytes() for p in (tmp_path / "spool" / "outbound" / "msg").iterdir())
    assert b"root:secret" not in queued and b"hello" in queued
    assert outbox.scan() == 0
    assert len([r for r in caplog.records if r.getMessage().startswith("outbox.skipped")]) == 2


def test_claim_by_path_never_follows_the_last_link(tmp_path, vmail):
    secret, _private = root_only(tmp_path)
    link = tmp_path / "link"
    link.symlink_to(secret)
    vmail.claim(link)
    assert owners(secret) == [(0, 0)] and os.lstat(link).st_uid == vmail.uid


@contextlib.contextmanager
def bound_onto(source: str, target: Path):
    """`source` bind-mounted onto the file `target` for the block (the tests run as root)."""
    target.touch()
    subprocess.run(["mount", "--bind", source, str(target)], check=True)
    try:
        yield target
    finally:
        subprocess.run(["umount", str(target)], check=False)


@pytest.mark.timeout(30)
def test_a_device_and_unreadable_files_in_the_outbox_are_skipped(tmp_path, vmail, caplog):
    """Issue 9.2, last bullet: a device node and two unreadable files sit in bob's Outbox next
    to a good message. The device is /dev/zero's (1, 5): read, it would fill `max_size` with
    zeros and go to Drafts (without a limit, eat memory for ever), so it must not even be read.
    Root reads any file whatever its mode, so "unreadable" is made real by the kernel: an entry
    bind-mounted from /proc/sys/vm/drop_caches (write-only: open(O_RDONLY) fails with EACCES,
    even for root) and one from this process's /proc/PID/mem (opens as a regular file, then
    read() fails with EIO at offset 0, which nothing maps). Each is skipped with one
    `outbox.skipped` line and left where it is, and the good message after them still goes out."""
    outbox = runner(tmp_path, vmail)
    home = outbox.maildirs.ensure(BOB)
    new = home / ".Outbox" / "new"
    os.mknod(new / "1700000000.M1P1Q1.zero", 0o600 | stat.S_IFCHR, os.makedev(1, 5))
    drop(home, "1700000000.M1P1Q4.good", MESSAGE)
    caplog.set_level(logging.INFO, logger="relay")
    with (bound_onto("/proc/sys/vm/drop_caches", new / "1700000000.M1P1Q2.eacces"),
          bound_onto(f"/proc/{os.getpid()}/mem", new / "1700000000.M1P1Q3.eio")):
        assert outbox.scan() == 1
        assert outbox.scan() == 0           # still there, not tried again in a loop of lines
        assert sorted(os.listdir(new)) == ["1700000000.M1P1Q1.zero", "1700000000.M1P1Q2.eacces",
                                           "1700000000.M1P1Q3.eio"]
    skipped = sorted(r.getMessage() for r in caplog.records
                     if r.getMessage().startswith("outbox.skipped"))
    assert len(skipped) == 3 and all("user=bob@example.com" in line for line in skipped)
    assert "Permission denied" in skipped[1] and "Input/output error" in skipped[2], skipped
    assert "not a plain file" in skipped[0], skipped
    assert not (home / ".Drafts").exists()      # the device was not read into a draft
    (queued,) = (tmp_path / "spool" / "outbound" / "msg").iterdir()
    assert b"hello" in queued.read_bytes()
