"""The Outbox runner: sends what users' mail clients save into their `Outbox` folder.

A message that appears in `<maildirs>/<domain>/<user>/.Outbox/new/` or `cur/` (an IMAP APPEND
through Dovecot lands there, by rename from tmp/) is sent to the addresses in its To, Cc and
Bcc headers through the same path as submission (`Submitter.submit`: From check, outbound queue,
Sent copy, "(CS-SENT)" replay), then removed from the Outbox. A message whose From is not the
user's own (or that names no recipient) is not sent: it moves to the user's Drafts folder and
an explanation takes the notice route (`ContinuityStore.notify`: INBOX now, the user's mailbox on
the primary after replay), so it is not tried again.

watchdog's inotify events are only a hint: every Outbox is rescanned at start-up, on each hint
and every `RESCAN` seconds, and the directories are the truth. A crash between the send and
the removal sends that one message again at the next scan (the only possible duplicate).

The Outboxes belong to the mail user, so nothing here follows a symlink: each Outbox directory is
opened one component at a time from the Maildir root (a link on the way is refused and logged,
`maildir.symlink_refused`), and each message is opened relative to it with O_NOFOLLOW|O_NONBLOCK
and read only when fstat says it is a regular file; a symlink, FIFO, device or unreadable file is
skipped with one `outbox.skipped` line, never followed and never waited on. A message over
`max_size` bytes is not sent (Drafts and an explanation, as for a foreign From), and is not read
either: its size is looked at first. Line ends are made CRLF before the recipients are read, so
they are read from the lines that leave.

The relay's own disk failing (full, read-only) leaves the message in the Outbox with one
`outbox.deferred` line per scan, and the next scan tries again; it is never half-sent: a
message is queued only when its Outbox directory will take the removal that follows, and
one queued whose removal still failed is remembered (`outbox.not_removed`), so that later
scans retry only the removal (a restart meanwhile sends it once more).
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import os
import stat
from collections.abc import Callable
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from relay.addresses import AddressError, Mailbox, parse_mailbox
from relay.delivery.submit import Submitter
from relay.errors import PermFail, StorageError
from relay.headers import addresses, crlf
from relay.log import event
from relay.runners.wake import sleep_until_kick
from relay.storage.durable import UnsafePathError, open_dir, open_file
from relay.storage.maildir import MaildirStore, refusing_symlinks, remove_sent

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
    def __init__(self, maildirs: MaildirStore, submitter: Submitter, domains: Callable[[], list[str]],
                 is_registered: Callable[[Mailbox], bool], on_sent: Callable[[], None],
                 hostname: str, notify: Callable[[Mailbox, bytes], object],
                 rescan: float = RESCAN, max_size: int | None = None) -> None:
        self.maildirs = maildirs
        self.submitter = submitter
        self.domains = domains
        self.is_registered = is_registered
        self.on_sent = on_sent
        self.hostname = hostname
        self.notify = notify
        self.rescan = rescan
        self.max_size = max_size
        self._kick = asyncio.Event()
        self._watched: set[Path] = set()
        self._skipped: set[Path] = set()  # logged once each
        self._sent: set[tuple[Mailbox, str]] = set()  # queued, not yet out of the Outbox

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
        if observer is not None and directory not in self._watched and _is_dir(directory):
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
            # The Outbox itself too: a client makes .Outbox, then new/ in it, then the message;
            # a scan between the first two steps would watch neither new/ nor see its birth.
            self._watch(observer, hint, home / ".Outbox")
            for sub in ("new", "cur"):
                directory = home / ".Outbox" / sub
                self._watch(observer, hint, directory)
                picked += self._scan_dir(user, directory)
        return picked

    def _homes(self) -> list[tuple[Mailbox, Path]]:
        """Registered users with a Maildir, and its path (a symlinked domain is refused)."""
        found = []
        for domain in self.domains():
            root = self.maildirs.root / domain
            try:
                with refusing_symlinks():
                    fd = open_dir(self.maildirs.root, (domain,))
            except (FileNotFoundError, UnsafePathError):
                continue
            try:
                locals_ = sorted(os.listdir(fd))
            finally:
                os.close(fd)
            for local in locals_:
                try:
                    user = parse_mailbox(f"{local}@{domain}")
                except AddressError:
                    continue
                if self.is_registered(user):
                    found.append((user, root / local))
        return found

    def _scan_dir(self, user: Mailbox, directory: Path) -> int:
        """Pick up every message in one Outbox directory, opened without following a link."""
        try:
            with refusing_symlinks():
                fd = open_dir(self.maildirs.root, directory.relative_to(self.maildirs.root).parts)
        except (FileNotFoundError, UnsafePathError):
            return 0
        try:
            return sum(self._pickup(user, directory, fd, name)
                       for name in sorted(os.listdir(fd)) if not name.startswith("."))
        finally:
            os.close(fd)

    def _read(self, directory: Path, fd: int, name: str) -> bytes:
        """The message file's bytes: a regular file only. One over `max_size` is refused
        (PermFail) before a byte of it is read, by its size; and since it may grow meanwhile,
        at most `max_size` + 1 bytes are ever read."""
        file = open_file(name, fd, directory / name)
        try:
            if self.max_size is not None and os.fstat(file).st_size > self.max_size:
                raise self._too_big()
            limit = self.max_size + 1 if self.max_size is not None else None
            chunks, size = [], 0
            while limit is None or size < limit:
                chunk = os.read(file, 1 << 20 if limit is None else min(1 << 20, limit - size))
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
            return b"".join(chunks)
        finally:
            os.close(file)

    def _too_big(self) -> PermFail:
        return PermFail(552, f"5.3.4 The message is over the size limit of {self.max_size} bytes")

    def _pickup(self, user: Mailbox, directory: Path, fd: int, name: str) -> int:
        path = directory / name
        key = (user, name.split(":2,")[0])
        if key in self._sent:                 # queued already; only its removal failed
            return self._remove(user, path, fd, name, None)
        try:
            data = self._read(directory, fd, name)
        except FileNotFoundError:
            return 0  # the client or Dovecot moved it meanwhile: the next scan sees it
        except (OSError, UnsafePathError) as exc:  # a link, FIFO or device; or unreadable
            if path not in self._skipped:
                self._skipped.add(path)
                event("outbox.skipped", logging.WARNING, user=user, path=path,
                      reason=getattr(exc, "strerror", None) or exc)
            return 0
        except PermFail as exc:
            self._refuse(user, path, exc)
            return 0
        try:
            _removable(fd, name)
        except FileNotFoundError:
            return 0  # moved meanwhile, as above
        except OSError as exc:    # a read-only disk: what is sent now could never be removed
            event("outbox.deferred", logging.ERROR, user=user, path=path, error=exc)
            return 0
        # The recipients are read from the lines that leave (rule 11): a bare CR or LF is a
        # line end there, so `Subject: s\rTo: bob@...` names bob, as Submitter.submit sees it.
        data = crlf(data)
        rcpts = addresses(data, "To", "Cc", "Bcc")
        try:
            if self.max_size is not None and len(data) > self.max_size:
                raise self._too_big()
            if not rcpts:
                raise PermFail(554, "5.5.1 The message names no recipient (To, Cc or Bcc)")
            entry = self.submitter.submit(user, str(user), rcpts, data)
        except PermFail as exc:
            return self._refuse(user, path, exc)
        except (StorageError, OSError) as exc:   # our own disk (full, read-only): try again later
            event("outbox.deferred", logging.ERROR, user=user, path=path, error=exc)
            return 0
        self._sent.add(key)
        return self._remove(user, path, fd, name, entry, len(rcpts))

    def _remove(self, user: Mailbox, path: Path, fd: int, name: str, entry: str | None,
                rcpts: int = 0) -> int:
        """Take a queued message out of the Outbox. When that fails (the disk went read-only
        after the send) it is remembered as sent, so that later scans retry only the removal
        and never queue it again; a restart meanwhile sends it once more."""
        try:
            remove_sent(fd, name)
        except OSError as exc:
            if entry is not None:
                event("outbox.not_removed", logging.ERROR, user=user, path=path, id=entry,
                      error=exc)
            return 1 if entry is not None else 0
        self._sent.discard((user, name.split(":2,")[0]))
        if entry is not None:
            event("outbox.sent", user=user, id=entry, rcpts=rcpts)
            return 1
        event("outbox.removed", user=user, path=path)
        return 0

    def _refuse(self, user: Mailbox, path: Path, exc: PermFail) -> int:
        try:
            self.maildirs.move(path, user, "Drafts")
        except (StorageError, OSError) as error:
            event("outbox.deferred", logging.ERROR, user=user, path=path, error=error)
            return 0
        self.notify(user, _explanation(self.hostname, user, exc.text))
        event("outbox.refused", logging.WARNING, user=user, reason=exc.text)
        return 0


def _removable(fd: int, name: str) -> None:
    """Raise OSError unless the Outbox directory `fd` will take the removal that follows the
    send. A rename onto itself changes nothing, but the kernel refuses it on a read-only file
    system (EROFS) as it would the unlink: a message that could not be taken out of the Outbox
    would be queued again at every scan."""
    os.rename(name, name, src_dir_fd=fd, dst_dir_fd=fd)


def _is_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


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
