"""Sending: what every path a user sends through (submission, the Outbox folder, webmail)
shares, so the checks, the queue, the Sent copy and the "(CS-SENT)" replay are the same.

`Submitter.submit()` (blocking) first makes every line end CRLF (a bare CR or LF included, as the
SMTP client will on the way out, so every check sees the lines that leave) and refuses NUL;
then it checks that the From: header is the user's own address, and makes durable, in order:
  1. a copy in the user's `.Sent` folder, as the user wrote it;
  2. a copy for the user's own mailbox on the primary, its Subject ending in " (CS-SENT)",
     in the domain's replay queue (replayed like inbound mail once the primary is back);
  3. one outbound queue entry per recipient (`<spool>/outbound/`), the message written once
     and hard-linked, Bcc: and Resent-Bcc: removed.
Only then may the caller answer 250. A crash or a failed write part-way leaves some of these
done; the client gets no 250 and sends again, so nothing is lost, and the recipients' entries
come last so that a failure before them doubles only the user's own copies. A crash between
the outbound entries being durable and the 250 still gives a recipient two copies.
"""

from __future__ import annotations

import time

from relay import headers
from relay.addresses import AddressError, Mailbox, parse_mailbox
from relay.delivery.client import needs_smtputf8
from relay.errors import PermFail
from relay.storage.archive import Item
from relay.storage.continuity import ContinuityStore
from relay.storage.queue import Envelope

CS_SENT = " (CS-SENT)"


def own_from(user: Mailbox, data: bytes) -> None:
    """The From: header must name exactly the user's own address (RFC 5322 allows several), and
    so must a Sender: header, which mail clients show as "on behalf of", and the Resent-From:
    and Resent-Sender: of the newest resent block (the first: a block is prepended, RFC 5322
    3.6.6), which a client shows as who sent the message on (mutt's bounce, Thunderbird's
    redirect); older blocks are other people's resends and stay as they were."""
    block = headers.Block(data)
    for name, required in (("From", True), ("Sender", False), ("Resent-From", False),
                           ("Resent-Sender", False)):
        found = block.addresses(name, first=name.startswith("Resent-"))
        if not found and not required and not block.values(name):
            continue
        try:
            ok = len(found) == 1 and parse_mailbox(found[0]) == user
        except AddressError:
            ok = False
        if not ok:
            raise PermFail(553, f"5.7.1 The {name}: header must be your own address <{user}>")


def options_for(data: bytes, sender: str, rcpt: str, requested: tuple[str, ...] = ()) -> tuple[str, ...]:
    """MAIL FROM options for one copy: BODY=8BITMIME for 8-bit data; SMTPUTF8 when an address
    needs it (then a smarthost without it refuses the copy for good, RFC 6531), or when the
    client asked for it or the header block is UTF-8 (then it is passed on where offered, as
    Postfix does); RET= and ENVID= as the client gave them."""
    options = [] if data.isascii() else ["BODY=8BITMIME"]
    head = headers.split(data)[0]
    asked = any(o.upper() == "SMTPUTF8" for o in requested)
    if needs_smtputf8(sender, rcpt) or asked or not head.isascii():
        options.append("SMTPUTF8")
    options += [o for o in requested if o.split("=", 1)[0].upper() in ("RET", "ENVID")]
    return tuple(options)


class Submitter:
    """The one way mail leaves on a user's behalf."""

    def __init__(self, store: ContinuityStore, max_recipients: int | None = None,
                 max_size: int | None = None) -> None:
        self.store = store
        self.max_recipients = max_recipients     # `max_recipients`: every path, not only SMTP
        self.max_size = max_size                 # `message_size_limit`, likewise

    def submit(self, user: Mailbox, sender: str, rcpts: list[str], data: bytes,
               mail_options: tuple[str, ...] = (),
               rcpt_options: dict[str, tuple[str, ...]] | None = None) -> str:
        """Check and queue a message from `user`; returns the first outbound queue id.

        `mail_options` and `rcpt_options` (per recipient) are what an SMTP client gave: SMTPUTF8,
        RFC 3461's RET, ENVID, NOTIFY and ORCPT; they travel with each copy to the smarthost."""
        # Checks see the bytes that leave (rule 11): the SMTP client makes a bare CR or LF a
        # line end, so "Subject: x\rFrom: ceo@..." must be two headers here too.
        data = headers.crlf(data)
        if b"\0" in data:
            raise PermFail(554, "5.6.0 NUL characters are not allowed in a message")
        own_from(user, data)
        if not rcpts:
            raise PermFail(554, "5.5.1 No recipients")
        if self.max_recipients is not None and len(rcpts) > self.max_recipients:
            raise PermFail(550, f"5.5.3 Too many recipients: at most {self.max_recipients} a message")
        if self.max_size is not None and len(data) > self.max_size:
            raise PermFail(552, f"5.3.4 Message too big: at most {self.max_size} bytes")
        outgoing = headers.remove(headers.remove(data, "Bcc"), "Resent-Bcc")
        now = time.time()
        per_rcpt = rcpt_options or {}
        # The user's own copies first, the recipients' last: a write that fails part-way (the
        # Maildirs' disk full, the spool's not) gets no 250, and the client's retry then
        # doubles only the user's own copies, never what the recipients get.
        self.store.maildirs.deliver(user, data, folder="Sent", seen=True)
        copy = headers.append_to_subject(data, CS_SENT)
        self.store.replay_queue(user.domain).enqueue_bytes(copy, Envelope(
            mail_from=str(user), rcpt=str(user), received_at=now,
            mail_options=options_for(copy, str(user), str(user))))
        ids = self.store.outbound.enqueue_many(outgoing, [
            Envelope(mail_from=sender, rcpt=rcpt, received_at=now,
                     mail_options=options_for(outgoing, sender, rcpt, mail_options),
                     rcpt_options=tuple(per_rcpt.get(rcpt, ())), extra={"user": str(user)})
            for rcpt in rcpts])
        if self.store.archive is not None:        # what left, listed for every recipient
            self.store.archive(Item(data=outgoing, direction="out", kind="sent", sender=sender,
                                    rcpts=tuple(rcpts), queue_id=ids[0], user=str(user), when=now,
                                    outcome="queued for the smarthost"))
        return ids[0]
