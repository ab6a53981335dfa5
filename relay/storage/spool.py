"""The spool as an administrator sees it: every queue, and one row per entry.

    <spool>/replay/<domain>/   each domain's replay queue ("replay")
    <spool>/outbound/          users' mail and notices for the smarthost ("outbound")

`rows()` reads envelopes only, never a message body. An entry's state is its folder, except
that a waiting entry that was tried and failed for now is shown as "deferred" (Postfix's word).
An outbound entry belongs to the domain of the user who sent it (`extra["user"]`, else its
envelope sender; "" for the relay's own notices), so a domain's selection, on the command line
and on the panel's domain page, holds its replay queue and its users' outbound mail.
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
    """(queue name, domain, Queue) for the selection. The outbound queue's domain is the one
    selected ("" for all): its rows are filtered by their sender's domain."""
    found = []
    if queue in (None, "replay"):
        found += [("replay", d, Queue(replay_queue_path(spool, d))) for d in sorted(domains)
                  if domain in (None, d)]
    if queue in (None, "outbound"):
        found.append(("outbound", domain or "", Queue(spool / "outbound")))
    return found


def rows(selected: list[tuple[str, str, Queue]], state: str | None = None) -> Iterator[Row]:
    """Every entry of the selected queues, oldest first in each, optionally in one state."""
    now = time.time()
    for name, domain, queue in selected:
        for folder in STATES:
            for entry in queue.list(folder):
                row = _row(name, domain, queue, folder, entry, now)
                if row is not None and state in (None, row.state) and domain in ("", row.domain):
                    yield row


def sender_domain(envelope: Envelope) -> str:
    """The domain an outbound entry belongs to: its user's, else its sender's ("" for <>)."""
    who = str(envelope.extra.get("user") or envelope.mail_from)
    return who.rpartition("@")[2].lower() if "@" in who else ""


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
    if name == "outbound":
        domain = sender_domain(envelope)
    return Row(entry, name, domain, shown, envelope.mail_from or "<>", envelope.rcpt, size, age,
               envelope.attempts, envelope.note)


def find(selected: list[tuple[str, str, Queue]], entry: str) -> tuple[str, str, Queue, str]:
    """(queue name, domain, Queue, state) of an entry id, or EntryError."""
    if not entry or "/" in entry or entry.startswith("."):
        raise EntryError(f"{entry!r}: not a queue id")
    for name, domain, queue in selected:
        state = queue.state_of(entry)
        if state is not None and (name != "outbound" or domain in ("", _domain_of(queue, state, entry))):
            return name, domain, queue, state
    raise EntryError(f"{entry}: no such entry in any queue")


def _domain_of(queue: Queue, state: str, entry: str) -> str:
    try:
        return sender_domain(queue.envelope(entry, state))
    except CorruptEntryError:
        return ""
