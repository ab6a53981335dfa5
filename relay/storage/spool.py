"""The spool as an administrator sees it: every queue, and one row per entry.

    <spool>/replay/<domain>/   each domain's replay queue ("replay")
    <spool>/outbound/          users' mail and notices for the smarthost ("outbound")

`rows()` reads envelopes only, never a message body. An entry's state is its folder, except
that a waiting entry that was tried and failed for now is shown as "deferred" (Postfix's word).
This module only reads; the moves are `Queue.hold/release/retry/delete`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from relay.errors import CorruptEntryError, EntryError
from relay.storage.continuity import replay_queue_path
from relay.storage.queue import STATES, Envelope, Queue

QUEUES = ("replay", "outbound")
SHOWN_STATES = ("waiting", "active", "deferred", "failed", "hold")


@dataclass(frozen=True)
class Row:
    id: str
    queue: str
    domain: str
    state: str
    sender: str
    recipient: str
    size: int
    age: float
    attempts: int
    last_error: str


def queues(spool: Path, domains: Iterable[str], queue: str | None = None,
           domain: str | None = None) -> list[tuple[str, str, Queue]]:
    """(queue name, domain, Queue) for the selection; the outbound queue has domain ""."""
    found = []
    if queue in (None, "replay"):
        found += [("replay", d, Queue(replay_queue_path(spool, d))) for d in sorted(domains)
                  if domain in (None, d)]
    if queue in (None, "outbound") and domain is None:
        found.append(("outbound", "", Queue(spool / "outbound")))
    return found


def rows(selected: list[tuple[str, str, Queue]], state: str | None = None) -> Iterator[Row]:
    """Every entry of the selected queues, oldest first in each, optionally in one state."""
    now = time.time()
    for name, domain, queue in selected:
        for folder in STATES:
            for entry in queue.list(folder):
                row = _row(name, domain, queue, folder, entry, now)
                if row is not None and state in (None, row.state):
                    yield row


def _row(name: str, domain: str, queue: Queue, folder: str, entry: str, now: float) -> Row | None:
    try:
        envelope = queue.envelope(entry, folder)
    except CorruptEntryError:
        if not (queue.root / folder / entry).exists():
            return None          # moved on meanwhile
        envelope = Envelope(mail_from="?", rcpt="?", received_at=0.0, note="unreadable envelope")
    shown = "deferred" if folder == "waiting" and envelope.attempts else folder
    try:
        size = os.stat(queue.root / "msg" / entry).st_size - envelope.skip
    except OSError:
        size = 0
    age = max(0.0, now - envelope.received_at) if envelope.received_at else 0.0
    return Row(entry, name, domain, shown, envelope.mail_from or "<>", envelope.rcpt, size, age,
               envelope.attempts, envelope.note)


def find(selected: list[tuple[str, str, Queue]], entry: str) -> tuple[str, str, Queue, str]:
    """(queue name, domain, Queue, state) of an entry id, or EntryError."""
    if not entry or "/" in entry or entry.startswith("."):
        raise EntryError(f"{entry!r}: not a queue id")
    for name, domain, queue in selected:
        state = queue.state_of(entry)
        if state is not None:
            return name, domain, queue, state
    raise EntryError(f"{entry}: no such entry in any queue")
