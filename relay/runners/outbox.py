"""The Outbox runner: sends what users' mail clients save into their `Outbox` folder.

A message that appears in `<maildirs>/<domain>/<user>/.Outbox/new/` or `cur/` (an IMAP APPEND
through Dovecot lands there, by rename from tmp/) is sent to the addresses in its To, Cc and
Bcc headers through the same path as submission (`Sender.submit`: From check, outbound queue,
Sent copy, "(CS-SENT)" replay), then removed from the Outbox. A message whose From is not the
user's own (or that names no recipient) is not sent: it moves to the user's Drafts folder and
an explanation arrives in INBOX, so it is not tried again.

watchdog's inotify events are only a hint: every Outbox is rescanned at start-up, on each hint
and every `RESCAN` seconds, and the directories are the truth. A crash between the send and
the removal sends that one message again at the next scan (the only possible duplicate).
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import os
from collections.abc import Callable
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from relay.addresses import AddressError, Mailbox, parse_mailbox
from relay.delivery.outbound import Sender
from relay.errors import PermFail, StorageError
from relay.headers import addresses
from relay.log import event
from relay.runners.wake import sleep_until_kick
from relay.storage.durable import fsync_dir
from relay.storage.maildir import MaildirStore

log = logging.getLogger("relay.outbox")

RESCAN = 30.0


class _Hint(FileSystemEventHandler):
    """watchdog thread -> event loop: something changed in an Outbox."""

    def __init__(self, loop: asyncio.AbstractEventLoop, kick: Callable[[], None]) -> None:
        self.loop, self.kick = loop, kick

    def on_any_event(self, event: FileSystemEvent) -> None:
        # A new folder anywhere we watch (a domain, a user, an Outbox) or a new message in an
        # Outbox; Dovecot's own index files in a user's folder are not our business.
        if event.event_type not in ("created", "moved"):
            return
        path = Path(os.fsdecode(event.dest_path or event.src_path))
        if event.is_directory or (path.parent.name in ("new", "cur")
                                  and path.parent.parent.name == ".Outbox"):
            self.loop.call_soon_threadsafe(self.kick)


class OutboxRunner:
    def __init__(self, maildirs: MaildirStore, sender: Sender, domains: Callable[[], list[str]],
                 is_registered: Callable[[Mailbox], bool], on_sent: Callable[[], None],
                 hostname: str, rescan: float = RESCAN) -> None:
        self.maildirs = maildirs
        self.sender = sender
        self.domains = domains
        self.is_registered = is_registered
        self.on_sent = on_sent
        self.hostname = hostname
        self.rescan = rescan
        self._kick = asyncio.Event()
        self._watched: set[Path] = set()

    def kick(self) -> None:
        self._kick.set()

    async def run(self) -> None:
        self._watched = set()   # a restarted run has a new observer, watching nothing yet
        observer = Observer()
        observer.daemon = True
        hint = _Hint(asyncio.get_running_loop(), self.kick)
        observer.start()
        try:
            while True:
                sent = await asyncio.to_thread(self.scan, observer, hint)
                if sent:
                    self.on_sent()
                await sleep_until_kick(self._kick, self.rescan)
        finally:
            observer.stop()
            await asyncio.to_thread(observer.join, 5)

    def _watch(self, observer: Observer | None, hint: _Hint | None, directory: Path) -> None:
        if observer is not None and directory not in self._watched and directory.is_dir():
            observer.schedule(hint, str(directory), recursive=False)
            self._watched.add(directory)

    def scan(self, observer: Observer | None = None, hint: _Hint | None = None) -> int:
        """Pick up every message in every registered user's Outbox (blocking).

        Watches are added before each listing, so a message arriving meanwhile is either
        listed or announced; a user's own folder is watched for its Outbox to appear."""
        picked = 0
        self._watch(observer, hint, self.maildirs.root)
        for domain in self.domains():
            self._watch(observer, hint, self.maildirs.root / domain)
        for user, home in self._homes():
            self._watch(observer, hint, home)
            for sub in ("new", "cur"):
                directory = home / ".Outbox" / sub
                self._watch(observer, hint, directory)
                if not directory.is_dir():
                    continue
                for name in sorted(os.listdir(directory)):
                    if not name.startswith("."):
                        picked += self._pickup(user, directory / name)
        return picked

    def _homes(self) -> list[tuple[Mailbox, Path]]:
        """Registered users with a Maildir, and its path."""
        found = []
        for domain in self.domains():
            root = self.maildirs.root / domain
            if not root.is_dir():
                continue
            for local in sorted(os.listdir(root)):
                try:
                    user = parse_mailbox(f"{local}@{domain}")
                except AddressError:
                    continue
                if (root / local).is_dir() and self.is_registered(user):
                    found.append((user, root / local))
        return found

    def _pickup(self, user: Mailbox, path: Path) -> int:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return 0  # the client or Dovecot moved it meanwhile: the next scan sees it
        rcpts = addresses(data, "To", "Cc", "Bcc")
        try:
            if not rcpts:
                raise PermFail(554, "5.5.1 The message names no recipient (To, Cc or Bcc)")
            entry = self.sender.submit(user, str(user), rcpts, data)
        except PermFail as exc:
            self._refuse(user, path, exc)
            return 0
        except StorageError as exc:
            event(log, "outbox.deferred", logging.ERROR, user=user, error=exc)
            return 0
        _remove(path)
        event(log, "outbox.sent", user=user, id=entry, rcpts=len(rcpts))
        return 1

    def _refuse(self, user: Mailbox, path: Path, exc: PermFail) -> None:
        self.maildirs.move(path, user, "Drafts")
        notice = _explanation(self.hostname, user, exc.text)
        self.maildirs.deliver(user, notice)
        event(log, "outbox.refused", logging.WARNING, user=user, reason=exc.text)


def _remove(path: Path) -> None:
    """Unlink a sent Outbox message, also when Dovecot renamed it (new flags) meanwhile."""
    try:
        path.unlink()
    except FileNotFoundError:
        base = path.name.split(":2,")[0]
        for sub in ("new", "cur"):
            for other in (path.parent.parent / sub).glob(f"{base}*"):
                other.unlink(missing_ok=True)
    fsync_dir(path.parent)


def _explanation(hostname: str, user: Mailbox, reason: str) -> bytes:
    text = (f"A message you put in your Outbox folder was not sent:\r\n\r\n    {reason}\r\n\r\n"
            f"It is now in your Drafts folder. Correct it and put it in the Outbox again.\r\n")
    head = (f"From: Mail Delivery System <MAILER-DAEMON@{hostname}>\r\nTo: <{user}>\r\n"
            f"Subject: Not sent: a message in your Outbox\r\n"
            f"Date: {email.utils.formatdate(localtime=True)}\r\n"
            f"Message-ID: {email.utils.make_msgid('outbox', domain=hostname)}\r\n"
            f"Auto-Submitted: auto-replied\r\nMIME-Version: 1.0\r\n"
            f"Content-Type: text/plain; charset=us-ascii\r\n\r\n")
    return (head + text).encode("ascii", "replace")
