"""Releasing an archived message: a copy goes to the user again, as many times as asked.

While the user's domain is `normal` or `replaying`, the copy goes into the domain's replay
queue, which hands it to the primary on the next sweep; during an `outage` it is kept like new
mail (continuity INBOX and replay queue, `ContinuityStore.keep`), so the user reads it in the
webmail or over IMAP now and it reaches the primary once it is back. Each copy carries
`X-Continuity-Released: <archive id> by <who> at <UTC time>` on top. Nothing calls this on its
own: only the `archive release` command and the panel do, for someone who asked.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import UTC, datetime

from relay import headers
from relay.addresses import AddressError, Mailbox, parse_mailbox
from relay.errors import CorruptEntryError, EntryError
from relay.storage.archive import Archive
from relay.storage.continuity import ContinuityStore
from relay.storage.queue import Envelope
from relay.storage.state import OUTAGE, read_state, state_dir

RELEASED = "X-Continuity-Released"


@dataclass(frozen=True)
class Released:
    user: Mailbox
    went: str                   # "primary" (through the replay queue) or "continuity mailbox"
    queue_id: str


def release(archive: Archive, store: ContinuityStore, record_id: str, by: str,
            local_domains: Collection[str], registered: Callable[[Mailbox], bool],
            to: Mailbox | None = None) -> list[Released]:
    """Release one archived message to `to`, or to each of its envelope recipients in our
    domains (an "out" message: to its sending user). Blocking; EntryError when there is no
    such message or nobody of ours to give it to."""
    try:
        record = archive.get(record_id)
    except CorruptEntryError as exc:
        raise EntryError(str(exc)) from None
    targets = [to] if to is not None else _ours(
        (record.user,) if record.direction == "out" and record.user else record.rcpts, local_domains)
    if not targets:
        raise EntryError(f"{record_id}: none of its recipients is in a configured domain; say --to")
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    data = headers.prepend(archive.read(record), RELEASED, f"{record.id} by {by} at {stamp}")
    done = []
    for user in targets:
        if user.domain not in local_domains:
            raise EntryError(f"{user}: not in a configured domain")
        outage = read_state(state_dir(store.spool), user.domain).state == OUTAGE
        if outage and registered(user):
            done.append(Released(user, "continuity mailbox", store.keep(user, record.sender, data)))
        else:
            options = () if data.isascii() else ("BODY=8BITMIME",)
            entry = store.replay_queue(user.domain).enqueue_bytes(data, Envelope(
                mail_from=record.sender, rcpt=str(user), received_at=time.time(), mail_options=options))
            done.append(Released(user, "primary", entry))
    return done


def _ours(addresses: Collection[str], local_domains: Collection[str]) -> list[Mailbox]:
    found = []
    for address in addresses:
        try:
            user = parse_mailbox(address)
        except AddressError:
            continue
        if user.domain in local_domains and user not in found:
            found.append(user)
    return found
