"""A kept copy's writes, in the order that lets them share the file system's commits
(issue 13): the queue's envelope and msg/ link are made before the Maildir file is fsync'd,
so a keep waits for three commits, not five one after the other; every name is still
fsync'd before `keep` returns, and the queue's commit marker still comes only after the
message and msg/ are durable, and before the file appears in new/."""

from __future__ import annotations

import os

from relay.addresses import parse_mailbox
from relay.storage.continuity import ContinuityStore
from relay.storage.maildir import MaildirStore

ALICE = parse_mailbox("alice@example.com")


def test_a_keep_writes_the_queue_entry_before_the_first_fsync_and_commits_it_before_new(
        tmp_path, monkeypatch):
    store = ContinuityStore(MaildirStore(tmp_path / "m"), tmp_path / "s")
    store.keep(ALICE, "x@sender.test", b"Subject: warm-up\r\n\r\n")   # the trees exist now
    box = tmp_path / "m" / "example.com" / "alice"
    queue = tmp_path / "s" / "replay" / "example.com"
    before = {sub: set(os.listdir(queue / sub)) for sub in ("msg", "tmp", "waiting")}
    before["new"] = set(os.listdir(box / "new"))
    real_fsync = os.fsync
    seen = []

    def fsync(fd: int) -> None:
        name = os.readlink(f"/proc/self/fd/{fd}")
        there = {sub: set(os.listdir(queue / sub)) - before[sub] for sub in ("msg", "tmp", "waiting")}
        there["new"] = set(os.listdir(box / "new")) - before["new"]
        what = ("maildir file" if name.startswith(f"{box}/tmp/") else
                "envelope" if name.startswith(f"{queue}/tmp/") else
                os.path.relpath(name, tmp_path))
        seen.append((what, {sub: len(names) for sub, names in there.items()}))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    entry = store.keep(ALICE, "x@sender.test", b"Subject: hi\r\n\r\nbody\r\n")
    monkeypatch.undo()

    assert [what for what, _ in seen] == [
        "maildir file", "envelope", "s/replay/example.com/msg",
        "s/replay/example.com/waiting", "m/example.com/alice/new"]
    at = dict(seen)
    # the Maildir file's fsync commits the envelope's and msg/'s new names with it
    assert at["maildir file"] == {"msg": 1, "tmp": 1, "waiting": 0, "new": 0}
    # the commit marker only once the message, its envelope and msg/ are durable ...
    assert at["s/replay/example.com/msg"]["waiting"] == 0
    # ... and it is there before the message is in new/; both fsync'd before keep returns
    assert at["s/replay/example.com/waiting"] == {"msg": 1, "tmp": 0, "waiting": 1, "new": 1}
    assert (queue / "waiting" / entry).is_file() and len(os.listdir(box / "new")) == 2
