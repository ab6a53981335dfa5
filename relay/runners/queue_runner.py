"""The queue runner base: one entry's life, the same for every queue (Mailman's runner).

The base also owns the waiting: each loop sleeps until a `wake` (a hint that work arrived) or
its timer (a rescan), whichever comes first.

`QueueRunner.attempt()` claims an entry (waiting -> active), reads it, sends it over the
connection it is given (`deliver()`) and settles the outcome; the subclass says only what a
failed reply means for the entry (`judge()`):

    Verdict.DELIVERED   the destination said 250: the entry's files go
    Verdict.RETRY       temporary, for this entry: deferred, `retry_delay` growing per attempt
    Verdict.STOP        temporary, for the destination: back to waiting with its place in line,
                        and the sweep stops (the runner paces the destination)
    Verdict.REFUSED     for good: the sender is told (`tell`), then the entry goes to failed/
    Verdict.UNTRIED     not tried after all (a `Gate` held it back before DATA): back to
                        waiting as it was, with its place in line, no attempt counted

A `Gate` lets a runner order entries that go over different connections (the replay runner's
per-mailbox order): the message goes out, and its final dot, which makes the destination
commit it, waits for `gate.wait()` (`delivery/client.py`'s `Turn`); the base calls
`gate.decided(verdict)` as soon as the entry's verdict is known, before its files are moved, so
the next entry's dot need not wait for this one's disk work. A 4xx before the dot (to MAIL,
RCPT or DATA) also waits for the gate: when the entry before it did not go on, it was not this
entry's turn, and it is UNTRIED rather than counted as a try.

The base also owns what no subclass should write again: an entry that cannot be read goes to
hold/, one whose handling raised is counted and goes to hold/ after `MAX_CRASHES`
(`Queue.crashed`, the same count `recover()` keeps), and the one log line per outcome,
`<name>.sent|deferred|failed|held|error`, from the logger `relay.<name>`, and telling `trouble`
(the alerts, when app.py sets it) of each entry that went to failed/ or hold/.
"""

from __future__ import annotations

import abc
import asyncio
import contextvars
import enum
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from relay import metrics
from relay.delivery.client import Reply, Upstream
from relay.delivery.dsn import build_dsn, dsn_field, notify_says
from relay.errors import CorruptEntryError
from relay.log import event
from relay.runners.wake import sleep_until_kick
from relay.storage.queue import Envelope, Queue
from relay.storage.spool import sender_domain

Notice = Callable[[bytes, str], None]
"""(DSN bytes, recipient): route the notice (`ContinuityStore.bounce`), blocking."""

Trouble = Callable[[str, str, str, str, "Envelope | None", str], None]
"""(runner name, domain, entry id, failed or hold, envelope if read, note): an entry went wrong.
Called from the event loop or a worker thread: it must neither block nor raise."""


class Verdict(enum.Enum):
    DELIVERED = "delivered"
    RETRY = "retry"
    STOP = "stop"
    REFUSED = "refused"
    UNTRIED = "untried"


class Gate(Protocol):
    """Orders one entry after another one (see the module docstring)."""

    def due(self) -> bool:
        """True when `wait()` would answer at once."""

    async def wait(self) -> Reply | None:
        """After the message, before its final dot: None to send the dot, or the Reply to
        settle with instead (`judge` then says UNTRIED; the message was abandoned)."""

    def send_when_due(self, send: Callable[[], None]) -> None:
        """`send` writes the final dot the moment `wait()` is to say None (client.py's `Turn`)."""

    def decided(self, verdict: Verdict | None) -> None:
        """The entry's verdict, None when it was not sent (another worker had it, set aside,
        crashed). Called at least once per attempt; the first call counts."""


# The gate of the attempt running in this task, for `deliver`: a context variable rather than a
# parameter keeps `deliver(envelope, data, upstream)` the one hook a subclass (or a test) wraps.
_GATE: contextvars.ContextVar[Gate | None] = contextvars.ContextVar("queue_runner_gate", default=None)


@dataclass(frozen=True)
class Outcome:
    """What one attempt came to (None from `attempt()`: nothing was tried)."""

    verdict: Verdict | None     # None: set aside or crashed
    reply: Reply | None = None
    envelope: Envelope | None = None
    retry_in: float = 0.0       # RETRY: seconds until the entry's next try
    told: bool = False          # REFUSED: a notice went to the sender
    moved_to: str = ""          # set aside or crashed: hold or waiting


class QueueRunner(abc.ABC):
    """Subclasses set `name` and implement `judge`; `tell_whom` picks a refusal's reader."""

    name = "queue"
    trouble: Trouble | None = None      # set by app.py: the alerts (relay/delivery/alerts.py)

    def __init__(self, hostname: str, notice: Notice, first_delay: float,
                 wakes: Iterable[str] = ("",)) -> None:
        self.hostname = hostname
        self.notice = notice
        self.first_delay = first_delay
        self._wakes = {key: asyncio.Event() for key in wakes}    # one per loop (a domain, or "")

    # -- waiting: a kick is a hint, the timer a rescan (the directory is the truth) ---------------

    def wake(self, key: str = "") -> None:
        """Cut the loop `key`'s wait short (from the event loop thread): work arrived."""
        if key in self._wakes:
            self._wakes[key].set()

    async def sleep(self, seconds: float, key: str = "") -> None:
        """Until a `wake(key)` or `seconds`, whichever comes first."""
        await sleep_until_kick(self._wakes[key], seconds)

    def forget_wakes(self, key: str = "") -> None:
        """Drop a wake that came meanwhile (the runner's own doing is not news)."""
        self._wakes[key].clear()

    # -- one entry ------------------------------------------------------------------------------

    @abc.abstractmethod
    def judge(self, envelope: Envelope, reply: Reply) -> Verdict:
        """What a reply other than 250 means: RETRY, STOP or REFUSED."""

    async def deliver(self, envelope: Envelope, data: bytes, upstream: Upstream) -> tuple[Verdict, Reply]:
        gate = _GATE.get()
        replies = await upstream.send_many(envelope.mail_from, [(envelope.rcpt, envelope.rcpt_options)],
                                           list(envelope.mail_options), data, gate)
        return self._verdict(envelope, replies[0]), replies[0]

    async def deliver_many(self, envelopes: list[Envelope], data: bytes,
                           upstream: Upstream) -> list[tuple[Verdict, Reply]]:
        """One transaction for entries of the same message, sender and MAIL options."""
        if len(envelopes) == 1:
            return [await self.deliver(envelopes[0], data, upstream)]
        first = envelopes[0]
        replies = await upstream.send_many(first.mail_from, [(e.rcpt, e.rcpt_options) for e in envelopes],
                                           list(first.mail_options), data)
        return [(self._verdict(e, r), r) for e, r in zip(envelopes, replies, strict=True)]

    def _verdict(self, envelope: Envelope, reply: Reply) -> Verdict:
        return Verdict.DELIVERED if reply.ok else self.judge(envelope, reply)

    def passed_notify(self, upstream: Upstream) -> bool:
        """Whether the next hop took the RCPT's NOTIFY with the message (it offered DSN); if
        not, a NOTIFY=SUCCESS is ours to answer, with a "relayed" notice."""
        return upstream.offers("dsn")

    def tell_whom(self, envelope: Envelope) -> str | None:
        """Who hears of a refusal: the envelope sender (None for `<>`)."""
        return envelope.mail_from or None

    def fields(self, queue: Queue) -> dict[str, object]:
        """Fields that name the queue in each log line (the replay runner adds the domain)."""
        return {}

    async def attempt(self, queue: Queue, entry: str, upstream: Upstream,
                      gate: Gate | None = None) -> Outcome | None:
        """Claim, read, deliver and settle one entry; None when another worker had it.
        With a `gate`, its DATA waits for `gate.wait()` (see the module docstring)."""
        token = _GATE.set(gate)
        try:
            outcome = (await self._attempt(queue, [entry], upstream, gate))[entry]
        finally:
            _GATE.reset(token)
        if gate is not None:
            gate.decided(None)          # not sent at all (a no-op when it was decided)
        return outcome

    async def attempt_many(self, queue: Queue, entries: list[str],
                           upstream: Upstream) -> dict[str, Outcome | None]:
        """`attempt` for several entries, those of one message (the same message file, sender
        and MAIL options: `Submitter` queues one entry per recipient) in one transaction each.
        A message's entries are claimed only when it is its turn, so a crash leaves one
        message's entries in active/, as the one-at-a-time runner did."""
        outcomes: dict[str, Outcome | None] = {}
        for members in await asyncio.to_thread(_by_message, queue, entries):
            outcomes |= await self._attempt(queue, members, upstream, None)
        return outcomes

    async def _attempt(self, queue: Queue, entries: list[str], upstream: Upstream,
                       gate: Gate | None) -> dict[str, Outcome | None]:
        outcomes: dict[str, Outcome | None] = {}
        groups: dict[tuple[str, tuple[str, ...], bytes], list[tuple[str, Envelope]]] = {}
        for entry in entries:
            try:   # claim and read in one trip to a thread: on a busy machine each trip costs
                got = await asyncio.to_thread(_claim_and_read, queue, entry)
            except CorruptEntryError as exc:
                await asyncio.to_thread(queue.set_aside, entry)
                event(f"{self.name}.held", logging.ERROR, **self.fields(queue), id=entry, error=exc)
                metrics.settled(self.name, "held", self.fields(queue))
                self._troubled(queue, entry, "hold", None, "unreadable")
                outcomes[entry] = Outcome(None, moved_to="hold")
                continue
            if got is None:
                outcomes[entry] = None
                continue
            envelope, data = got
            groups.setdefault((envelope.mail_from, envelope.mail_options, data), []).append((entry, envelope))
        for (_, _, data), members in groups.items():
            outcomes |= await self._send_group(queue, members, data, upstream, gate)
        return outcomes

    async def _send_group(self, queue: Queue, members: list[tuple[str, Envelope]], data: bytes,
                          upstream: Upstream, gate: Gate | None) -> dict[str, Outcome | None]:
        outcomes: dict[str, Outcome | None] = {}
        try:
            results = await self.deliver_many([e for _, e in members], data, upstream)
        except Exception as exc:  # noqa: BLE001 - one bad entry must not stop the runner
            for entry, envelope in members:
                outcomes[entry] = await self._crashed(queue, entry, envelope, exc)
            return outcomes
        if gate is not None:        # one entry: the next in line may go on while this one settles
            verdict, reply = results[0]
            if verdict in (Verdict.RETRY, Verdict.STOP) and await gate.wait() is not None:
                results = [(Verdict.UNTRIED, reply)]   # refused before DATA, and not its turn yet
            gate.decided(results[0][0])
        server = (upstream.server_name, self.passed_notify(upstream))
        for (entry, envelope), (verdict, reply) in zip(members, results, strict=True):
            try:
                outcomes[entry] = await asyncio.to_thread(self._settle, queue, entry, envelope, data,
                                                          verdict, reply, server)
            except Exception as exc:  # noqa: BLE001 - likewise
                outcomes[entry] = await self._crashed(queue, entry, envelope, exc)
        return outcomes

    async def _crashed(self, queue: Queue, entry: str, envelope: Envelope, exc: Exception) -> Outcome:
        target = await asyncio.to_thread(queue.crashed, entry, envelope, f"error: {type(exc).__name__}")
        event(f"{self.name}.error", logging.ERROR, **self.fields(queue), id=entry,
              error=type(exc).__name__, detail=exc, now_in=target)
        metrics.settled(self.name, "error", self.fields(queue))
        if target == "hold":
            self._troubled(queue, entry, "hold", envelope, f"error: {type(exc).__name__}")
        return Outcome(None, envelope=envelope, moved_to=target)

    def _settle(self, queue: Queue, entry: str, envelope: Envelope, data: bytes, verdict: Verdict,
                reply: Reply, server: tuple[str, bool]) -> Outcome:
        """Blocking: the move the verdict asks for, and its log line. `server`: its name, and
        whether it offered DSN (if not, a NOTIFY=SUCCESS is ours to answer: "relayed")."""
        where, note = self.fields(queue), f"{reply.code} {reply.text}"
        attempts = envelope.attempts + 1
        name, offers_dsn = server
        if verdict is Verdict.DELIVERED:
            if not offers_dsn and notify_says(envelope.rcpt_options, "SUCCESS"):
                self._tell(envelope, data, reply, name, "relayed")
            queue.finish(entry)
            event(f"{self.name}.sent", **where, id=entry, rcpt=envelope.rcpt, attempts=attempts)
            metrics.settled(self.name, "sent", where)
            return Outcome(verdict, reply, envelope)
        if verdict is Verdict.REFUSED:
            told = notify_says(envelope.rcpt_options, "FAILURE") and self._tell(
                envelope, data, reply, name, "failed")
            queue.fail(entry, envelope, note)
            event(f"{self.name}.failed", logging.WARNING, **where, id=entry,
                  rcpt=envelope.rcpt, reply=note, dsn="yes" if told else "no")
            metrics.settled(self.name, "failed", where)
            self._troubled(queue, entry, "failed", envelope, note)
            return Outcome(verdict, reply, envelope, told=told)
        if verdict is Verdict.UNTRIED:    # nothing happened to it: no log line, no count
            queue.unclaim(entry)
            return Outcome(verdict, reply, envelope)
        if verdict is Verdict.STOP:       # the runner logs the destination's trouble, once
            queue.requeue(entry, envelope, note)
            metrics.settled(self.name, "stopped", where)
            return Outcome(verdict, reply, envelope)
        delay = queue.defer(entry, envelope, note, self.first_delay)
        event(f"{self.name}.deferred", **where, id=entry, rcpt=envelope.rcpt, reply=note,
              attempts=attempts, retry_in=int(delay))
        metrics.settled(self.name, "deferred", where)
        return Outcome(verdict, reply, envelope, retry_in=delay)

    def _troubled(self, queue: Queue, entry: str, moved_to: str, envelope: Envelope | None,
                  note: str) -> None:
        if self.trouble is not None:
            domain = self.fields(queue).get("domain") or (sender_domain(envelope) if envelope else "")
            self.trouble(self.name, str(domain), entry, moved_to, envelope, note)

    def _tell(self, envelope: Envelope, data: bytes, reply: Reply, server: str, action: str) -> bool:
        """A DSN of `action` to whoever `tell_whom` names (the caller checked their NOTIFY).
        True when one was queued."""
        whom = self.tell_whom(envelope)
        if whom is None:
            return False
        code = reply.code if action == "relayed" or reply.code >= 400 else 451
        self.notice(build_dsn(reporting_mta=self.hostname, original=data, mail_from=whom,
                              rcpt=envelope.rcpt, code=code, text=reply.text, remote_mta=server,
                              arrival=envelope.received_at, action=action,
                              envid=dsn_field(envelope.mail_options, "ENVID"),
                              orcpt=dsn_field(envelope.rcpt_options, "ORCPT")), whom)
        return True


def _by_message(queue: Queue, entries: list[str]) -> list[list[str]]:
    """Blocking: `entries` in groups of one message each, in the order their first came."""
    groups: dict[object, list[str]] = {}
    for entry in entries:
        key = queue.same_message(entry)
        groups.setdefault(key if key is not None else entry, []).append(entry)
    return list(groups.values())


def _claim_and_read(queue: Queue, entry: str) -> tuple[Envelope, bytes] | None:
    """Blocking: claim the entry and read it; None when another worker had it. A
    CorruptEntryError leaves it claimed, for the caller to set aside."""
    if not queue.claim(entry):
        return None
    return queue.read(entry, "active")
