"""Running as root with `storage.owner`: everything created is handed to the mail user."""

from __future__ import annotations

import os
import pwd

from relay.config import load
from relay.directory import Directory
from tests.helpers import free_port
from tests.smtp.fakes import InProcessRelay, send, write_config


def test_everything_created_belongs_to_the_mail_user(tmp_path):
    assert os.geteuid() == 0, "the test suite runs as root (scripts/test), as CI does"
    vmail = pwd.getpwnam("vmail")
    path = write_config(tmp_path, free_port(), extra="")
    path.write_text(path.read_text().replace("storage: {maildirs: maildirs, spool: spool}",
                                             "storage: {maildirs: maildirs, spool: spool, owner: vmail}"))
    Directory(load(path)).add("alice@example.com", password="pw")
    relay = InProcessRelay.from_file(path).start()
    try:
        _, reply = send(relay.port, "x@sender.test", ["alice@example.com"], b"Subject: x\r\n\r\nx\r\n")
        assert reply[0] == 250
    finally:
        relay.stop()
    created = [tmp_path / "users.passwd", tmp_path / "maildirs", tmp_path / "spool"]
    for root in ("maildirs", "spool"):
        for directory, dirs, files in os.walk(tmp_path / root):
            created += [os.path.join(directory, n) for n in dirs + files]
    assert len(created) > 20
    wrong = [p for p in created if (os.stat(p).st_uid, os.stat(p).st_gid) != (vmail.pw_uid, vmail.pw_gid)]
    assert wrong == []


def test_a_planted_symlink_gives_451_and_is_never_chowned(tmp_path, caplog):
    """Issue 9.2 end to end: dave (the mail user) plants `.Sent/maildirfolder` -> a root-only
    file and `.Outbox/cur` -> a root-only directory; one message for dave is answered 451 and
    neither target changes owner. Before the fix: 250, and both belonged to vmail."""
    vault = tmp_path / "vault"
    vault.mkdir(mode=0o700)
    secret, private = vault / "shadow", vault / "private"
    secret.write_bytes(b"root:x\n")
    secret.chmod(0o600)
    private.mkdir(mode=0o700)
    path = write_config(tmp_path, free_port(), extra="")
    path.write_text(path.read_text().replace("storage: {maildirs: maildirs, spool: spool}",
                                             "storage: {maildirs: maildirs, spool: spool, owner: vmail}"))
    Directory(load(path)).add("dave@example.com", password="pw")
    home = tmp_path / "maildirs" / "example.com" / "dave"
    for folder in (".Sent", ".Outbox"):
        for sub in ("cur", "new", "tmp"):
            (home / folder / sub).mkdir(parents=True)
    for sub in ("cur", "new", "tmp"):
        (home / sub).mkdir(exist_ok=True)
    (home / ".Outbox" / "maildirfolder").touch()
    (home / ".Sent" / "maildirfolder").symlink_to(secret)
    (home / ".Outbox" / "cur").rmdir()
    (home / ".Outbox" / "cur").symlink_to(private)
    relay = InProcessRelay.from_file(path).start()
    try:
        _, reply = send(relay.port, "x@sender.test", ["dave@example.com"], b"Subject: x\r\n\r\nx\r\n")
    finally:
        relay.stop()
    assert reply[0] == 451
    assert [(os.stat(p).st_uid, os.stat(p).st_gid) for p in (secret, private)] == [(0, 0), (0, 0)]
    assert secret.read_bytes() == b"root:x\n" and os.listdir(private) == []
    assert os.listdir(home / "new") == []
