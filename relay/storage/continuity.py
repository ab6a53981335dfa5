"""Continuity storage: what the relay does with a message the primary could not take, and
with a notice the relay writes to one of its users.

`keep()` puts one recipient's copy into that user's Maildir INBOX (with `Return-Path:` and
`Delivered-To:` on top, as a delivery agent writes them) and into the domain's replay queue,
which takes a hard link to the very same file before it becomes visible in new/. The queue
envelope records how many bytes of Maildir headers to skip, so replay sends the bytes that
were received.

`notify()` is the one route of every notice to a user (delivery status notifications, an
Outbox refusal, and later alerts): like kept mail it goes to the continuity INBOX, so the user
sees it now, and into the replay queue, so it reaches their mailbox on the primary too.
`bounce()` routes a DSN by its recipient: a registered user -> `notify()`; another address in
one of our domains -> that domain's replay queue; anyone else -> the outbound queue.

Crash points (see maildir.py and queue.py for each store's own):
  - before the queue commit: at most a stray file; the sender got no 250 and will retry
  - after the queue commit, before new/: replay has it, the Maildir not; the sender retries,
    so the primary may get it twice (never zero times)
  - new/ and waiting/ are fsync'd last, one after the other (they share a file system
    commit): a power cut between the two may leave new/ without the queue commit; the
    sender got no 250 and retries, so the user may see it twice (never zero times)
  - after both are fsync'd: complete; only now does the caller answer 250
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from pathlib import Path

from relay.addresses import AddressError, Mailbox, parse_mailbox
from relay.errors import StorageError
from relay.storage.archive import Item
from relay.storage.durable import Owner
from relay.storage.incoming import MessageFile
from relay.storage.maildir import MaildirStore
from relay.storage.queue import Envelope, Queue, Staged


def replay_queue_path(spool: Path, domain: str) -> Path:
    return spool / "replay" / domain


def outbound_queue_path(spool: Path) -> Path:
    return spool / "outbound"


def trace_headers(user: Mailbox, sender: str) -> bytes:
    """What a kept copy carries above the message, as a delivery agent writes it."""
    return f"Return-Path: <{sender}>\r\nDelivered-To: {user}\r\n".encode()


class _QueueEntry:
    """A kept copy's replay queue entry riding along its Maildir delivery (maildir.Companion):
    the envelope written and the file linked into msg/ before the Maildir file's fsync, the
    entry committed to waiting/ before the file appears in new/, and waiting/ fsync'd with
    new/. Every name is fsync'd before `keep` returns, as before; they share commits now."""

    def __init__(self, queue: Queue, envelope: Envelope) -> None:
        self.queue, self.envelope = queue, envelope
        self.staged: Staged | None = None

    def written(self, tmp: str) -> None:
        self.staged = self.queue.stage_link(tmp, self.envelope)

    def synced(self) -> None:
        assert self.staged is not None
        self.staged.commit()

    def published(self) -> None:
        assert self.staged is not None
        self.staged.settle()

    def abandon(self) -> None:
        if self.staged is not None:
            self.staged.abandon()


class ContinuityStore:
    """The Maildirs plus one replay queue per domain."""

    def __init__(self, maildirs: MaildirStore, spool: Path, owner: Owner = Owner()) -> None:
        self.maildirs = maildirs
        self.spool = spool
        self.owner = owner
        self._queues: dict[str, Queue] = {}
        self.outbound = Queue(outbound_queue_path(spool), owner)
        self.archive: Callable[[Item], None] | None = None    # set when storage.archive is

    def kept_file(self, user: Mailbox, queue_id: str) -> Path:
        """The kept copy's file, as the replay queue holds it (a hard link to the Maildir's)."""
        return self.replay_queue(user.domain).root / "msg" / queue_id

    def replay_queue(self, domain: str) -> Queue:
        if domain not in self._queues:
            self._queues[domain] = Queue(replay_queue_path(self.spool, domain), self.owner)
        return self._queues[domain]

    def keep(self, user: Mailbox, sender: str, message: bytes | MessageFile,
             mail_options: tuple[str, ...] = (), rcpt_options: tuple[str, ...] = ()) -> str:
        """Store one recipient's copy durably; returns the replay queue id. Blocking. A
        spooled message is copied from its file in chunks, never read whole."""
        trace = trace_headers(user, sender)
        envelope = Envelope(mail_from=sender, rcpt=str(user), received_at=time.time(),
                            skip=len(trace), mail_options=mail_options, rcpt_options=rcpt_options)
        entry = _QueueEntry(self.replay_queue(user.domain), envelope)
        try:
            data = trace + message if isinstance(message, bytes) else message.with_prefix(trace)
            self.maildirs.deliver(user, data, companion=entry)
        except OSError as exc:
            raise StorageError(f"cannot keep mail for {user}: {exc.strerror or exc}") from exc
        finally:
            entry.abandon()
        assert entry.staged is not None
        return entry.staged.entry

    def notify(self, user: Mailbox, notice: bytes) -> str:
        """A notice from the relay (envelope sender `<>`) to one of its users: into their
        continuity INBOX and their domain's replay queue. Blocking; returns the queue id."""
        options = () if notice.isascii() else ("BODY=8BITMIME",)
        entry = self.keep(user, "", notice, options)
        self._archive_notice(notice, str(user), entry, "in the INBOX, queued for the primary")
        return entry

    def bounce(self, notice: bytes, rcpt: str, local_domains: Collection[str],
               registered: Callable[[Mailbox], bool] = lambda user: False) -> str:
        """Queue a delivery status notification (envelope sender `<>`) for `rcpt`. Blocking."""
        try:
            user: Mailbox | None = parse_mailbox(rcpt)
        except AddressError:
            user = None
        if user is not None and user.domain in local_domains and registered(user):
            return self.notify(user, notice)
        options = () if notice.isascii() else ("BODY=8BITMIME",)
        envelope = Envelope(mail_from="", rcpt=rcpt, received_at=time.time(), mail_options=options)
        local = user is not None and user.domain in local_domains
        queue = self.replay_queue(user.domain) if local else self.outbound
        entry = queue.enqueue_bytes(notice, envelope)
        self._archive_notice(notice, rcpt, entry, "queued for the primary" if local else
                             "queued for the smarthost")
        return entry

    def _archive_notice(self, notice: bytes, rcpt: str, entry: str, outcome: str) -> None:
        if self.archive is not None:
            self.archive(Item(data=notice, direction="out", kind="notice", sender="", rcpts=(rcpt,),
                              queue_id=entry, outcome=outcome))
