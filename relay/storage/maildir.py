"""User Maildirs: the only writer of `<storage.maildirs>/<domain>/<localpart>/`.

Layout is Maildir++ as Dovecot reads it (`mail_location = maildir:ROOT/%d/%n`): INBOX is the
top folder, other folders are `.Name/` with a `maildirfolder` marker. Names follow stdlib
`mailbox.Maildir` (a test reads our trees back with it). Messages are written here directly
rather than with `mailbox.Maildir.add` because the spool must take its own hard link to a
message *before* it becomes visible in new/ (Dovecot may rename it to cur/ at any moment after
that), and `add` does not fsync the directory.

A delivery, step by step, and what a crash at each step leaves:
  1. tmp/<name> written and fsync'd      -> a stray tmp file (Dovecot removes those after 36 h)
  2. `before_publish(tmp/<name>)`          -> whatever that callback leaves (the spool cleans up)
  3. link tmp/<name> -> new/<name>, unlink tmp, fsync new/
                                           -> the message is in the mailbox
"""

from __future__ import annotations

import itertools
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

from relay.addresses import Mailbox
from relay.storage.durable import Owner, fsync_dir, make_dirs, write_new

FOLDERS = ("Sent", "Outbox")


def _safe_hostname() -> str:
    # Maildir's own escaping of the two characters a file name cannot carry here.
    return socket.gethostname().replace("/", r"\057").replace(":", r"\072")


class MaildirStore:
    """Creates Maildir++ trees and delivers messages into them, durably."""

    def __init__(self, root: Path, owner: Owner = Owner()) -> None:
        self.root = root
        self.owner = owner
        self._host = _safe_hostname()
        self._counter = itertools.count()
        self._ready: set[Path] = set()
        self._lock = threading.Lock()

    def path(self, user: Mailbox) -> Path:
        return user.path_under(self.root)

    def ensure(self, user: Mailbox) -> Path:
        """Create or complete the user's Maildir++ tree (INBOX, .Sent, .Outbox).

        Run once per user and process, and idempotent: a tree half-made by a crash (a user
        folder without new/, a folder without its maildirfolder marker, a directory not yet
        handed to the mail user) is completed, not trusted. `mailbox.Maildir(create=True)`
        would only build a tree whose top folder does not exist yet.
        """
        path = self.path(user)
        if path in self._ready:
            return path
        with self._lock:
            make_dirs(path.parent, self.owner)
            for folder in (path, *(path / f".{name}" for name in FOLDERS)):
                self._complete(folder, marker=folder != path)
            fsync_dir(path.parent)
            fsync_dir(path)
            self._ready.add(path)
        return path

    def _complete(self, folder: Path, marker: bool) -> None:
        for sub in (folder, folder / "cur", folder / "new", folder / "tmp"):
            sub.mkdir(mode=0o700, exist_ok=True)
            self.owner.claim(sub)
        if marker:
            flag = folder / "maildirfolder"
            flag.touch(mode=0o600, exist_ok=True)
            self.owner.claim(flag)
        fsync_dir(folder)

    def unique_name(self, size: int) -> str:
        now = time.time()
        seconds, micro = int(now), int((now % 1) * 1e6)
        return f"{seconds}.M{micro}P{os.getpid()}Q{next(self._counter)}.{self._host},S={size}"

    def deliver(self, user: Mailbox, data: bytes, folder: str | None = None,
                before_publish: Callable[[Path], None] | None = None, seen: bool = False) -> Path:
        """Write `data` into the user's folder (INBOX by default); return the new file's path.

        Returns only once the file and new/ are fsync'd. `before_publish` sees the fsync'd
        temp file before it appears in new/. `seen` files it in cur/ already read (a Sent copy).
        """
        box = self.ensure(user)
        if folder:
            box = box / f".{folder}"
        name = self.unique_name(len(data))
        tmp = box / "tmp" / name
        write_new(tmp, data, owner=self.owner)
        try:
            if before_publish is not None:
                before_publish(tmp)
            final = box / "cur" / f"{name}:2,S" if seen else box / "new" / name
            os.link(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        fsync_dir(final.parent)
        return final

    def move(self, path: Path, user: Mailbox, folder: str) -> Path:
        """Move a message file into another folder of the same user (cur/, flags kept)."""
        box = self.ensure(user)
        if folder != "INBOX" and not (box / f".{folder}").is_dir():
            self._complete(box / f".{folder}", marker=True)
        name = path.name if ":2," in path.name else f"{path.name}:2,"
        target = (box if folder == "INBOX" else box / f".{folder}") / "cur" / name
        os.rename(path, target)
        fsync_dir(target.parent)
        fsync_dir(path.parent)
        return target
