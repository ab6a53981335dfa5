"""The spam filter's say over mail the inbound listener is about to keep (`rspamd.*` settings).

Only copies the relay keeps are checked: during an outage it stands in for the primary, whose
own filter judges everything else. Per verdict (relay/delivery/rspamd.py), when nobody has the
message yet:

    reject                       550 5.7.1 in the session, nothing kept: the sender's server
                                 tells its user, so the relay never sends backscatter
    soft reject, greylist        451 4.7.1, nothing kept: the sender tries again later
    add header, rewrite subject  kept with `X-Spam: Yes` and `X-Spam-Score: 7.50 / 15.00`
                                 (score / required, two decimals as in rspamd's own headers)
                                 on top, every other byte as received; the Subject is not
                                 rewritten
    no action                    kept as it is
    unavailable                  `rspamd.on_failure`: keep as it is (default) or 451 4.3.0

One reply to DATA has to be right for every recipient (Postfix's rule: one answer per DATA).
When the primary already took its copy for some recipients, a refusal would be wrong for them:
a 5xx tells the sender that nobody got the message, and a 4xx makes the sender send it again,
a duplicate for each of them at every retry. So then everybody gets 250: a copy rspamd refused
is kept marked (`X-Spam: Yes`), and one it could not check is kept as it is.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from relay import headers, metrics
from relay.delivery import rspamd
from relay.delivery.rspamd import Scan, Verdict
from relay.log import event
from relay.smtp import replies
from relay.storage.incoming import MessageFile

Check = Callable[[bytes, Scan], Awaitable[Verdict]]

_MARKED = (rspamd.ADD_HEADER, rspamd.REWRITE_SUBJECT)


@dataclass(frozen=True)
class Screened:
    reply: str | None    # refuse the whole DATA with this reply: nothing is kept
    message: bytes | MessageFile    # otherwise keep this message


class Screen:
    """Asks `check` about a message about to be kept and says what to answer or keep."""

    def __init__(self, check: Check, on_failure: str = "keep") -> None:
        self.check = check
        self.defer_unchecked = on_failure == "defer"

    async def __call__(self, message: bytes | MessageFile, scan: Scan, delivered: bool) -> Screened:
        """`delivered`: the primary already took this message for another recipient.

        rspamd is handed the message as bytes (a spooled one read from its file for the check
        only, one message per session at a time, at most the size limit); the copy kept stays
        the file, with the mark as its prefix."""
        data = message if isinstance(message, bytes) else await asyncio.to_thread(message.read)
        verdict = await self.check(data, scan)
        refusal = self._refusal(verdict)
        if refusal is not None and not delivered:
            event("rspamd.refused", id=scan.queue_id, action=verdict.action,
                  score=verdict.score, code=refusal[:3])
            metrics.inbound("deferred" if verdict.action == rspamd.UNAVAILABLE else "rejected_spam")
            return Screened(refusal, message)
        if verdict.action == rspamd.UNAVAILABLE or verdict.action == rspamd.NO_ACTION:
            return Screened(None, message)
        if refusal is not None:
            event("rspamd.marked", logging.WARNING, id=scan.queue_id, action=verdict.action,
                  score=verdict.score, why="the primary already took a copy")
        else:
            event("rspamd.marked", id=scan.queue_id, action=verdict.action, score=verdict.score)
        head = mark(data[:4096], verdict)
        if isinstance(message, bytes):
            return Screened(None, head + message)
        return Screened(None, message.with_prefix(head))

    def _refusal(self, verdict: Verdict) -> str | None:
        if verdict.action == rspamd.REJECT:
            if verdict.message:
                return replies.SPAM_REJECTED_BECAUSE.format(reason=verdict.message)
            return replies.SPAM_REJECTED
        if verdict.action in (rspamd.SOFT_REJECT, rspamd.GREYLIST):
            if verdict.message:
                return replies.SPAM_DEFERRED_BECAUSE.format(reason=verdict.message)
            return replies.SPAM_DEFERRED
        if verdict.action == rspamd.UNAVAILABLE and self.defer_unchecked:
            return replies.SPAM_FILTER_UNAVAILABLE
        return None


def mark(head: bytes, verdict: Verdict) -> bytes:
    """`X-Spam: Yes` and `X-Spam-Score: <score> / <required>`, to go on top of the message
    whose first bytes are `head` (the lines end as the message's first line does)."""
    score = "?" if verdict.score is None else f"{verdict.score:.2f}"
    required = "?" if verdict.required is None else f"{verdict.required:.2f}"
    marked = headers.prepend(headers.prepend(head, "X-Spam-Score", f"{score} / {required}"),
                             "X-Spam", "Yes")
    return marked[: len(marked) - len(head)]
