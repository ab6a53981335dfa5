"""Sending: what every path a user sends through (submission, the Outbox folder, webmail)
shares, so the checks, the queue, the Sent copy and the "(CS-SENT)" replay are the same.

`Sender.submit()` (blocking) checks that the From: header is the user's own address, then
makes durable, in this order:
  1. one outbound queue entry per recipient (`<spool>/outbound/`), the message written once
     and hard-linked, Bcc: removed;
  2. a copy in the user's `.Sent` folder, as the user wrote it;
  3. a copy for the user's own mailbox on the primary, its Subject ending in " (CS-SENT)",
     in the domain's replay queue (replayed like inbound mail once the primary is back).
Only then may the caller answer 250. A crash part-way leaves some of these done; the client
gets no 250 and sends again, so nothing is lost and at worst a recipient gets two copies.
"""

from __future__ import annotations

import time

from relay import headers
from relay.addresses import AddressError, Mailbox, parse_mailbox
from relay.errors import PermFail
from relay.storage.continuity import ContinuityStore
from relay.storage.queue import Envelope

CS_SENT = " (CS-SENT)"


def own_from(user: Mailbox, data: bytes) -> None:
    """The From: header must name exactly the user's own address (RFC 5322 allows several)."""
    found = headers.addresses(data, "From")
    try:
        ok = len(found) == 1 and parse_mailbox(found[0]) == user
    except AddressError:
        ok = False
    if not ok:
        raise PermFail(553, f"5.7.1 The From: header must be your own address <{user}>")


def options_for(data: bytes) -> tuple[str, ...]:
    return () if data.isascii() else ("BODY=8BITMIME",)


class Sender:
    """The one way mail leaves on a user's behalf."""

    def __init__(self, store: ContinuityStore) -> None:
        self.store = store

    def submit(self, user: Mailbox, sender: str, rcpts: list[str], data: bytes) -> str:
        """Check and queue a message from `user`; returns the first outbound queue id."""
        own_from(user, data)
        if not rcpts:
            raise PermFail(554, "5.5.1 No recipients")
        outgoing = headers.remove(data, "Bcc")
        now = time.time()
        ids = self.store.outbound.enqueue_many(outgoing, [
            Envelope(mail_from=sender, rcpt=rcpt, received_at=now, mail_options=options_for(outgoing),
                     extra={"user": str(user)})
            for rcpt in rcpts])
        self.store.maildirs.deliver(user, data, folder="Sent", seen=True)
        copy = headers.append_to_subject(data, CS_SENT)
        self.store.replay_queue(user.domain).enqueue_bytes(copy, Envelope(
            mail_from=str(user), rcpt=str(user), received_at=now, mail_options=options_for(copy)))
        return ids[0]
