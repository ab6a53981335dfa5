"""The replay runner: drains each domain's replay queue to its recovered primary server.

Per domain, a loop (inside `serve`):
  outage     probe the primary every `replay.probe_interval` (connect, EHLO, QUIT); when it
             greets, try a sweep: the first message it takes ends the outage. A kick from the
             inbound listener (a message the primary accepted) ends the wait early. A planned
             outage is never probed nor swept: it ends when the administrator (or its
             window) says, to `replaying` (delivery/planned.py)
  replaying  sweep: every waiting entry goes to the primary, per user oldest first, several
             users at once (`replay.concurrency`), at most `replay.rate` messages a second,
             one reused SMTP connection per worker; an empty queue -> normal
  normal     rescan the queue on the same timer (the directory is the truth, a kick a hint)

A message counts as replayed only after the primary's 250 (then its queue files go; the
user's Maildir copy stays). What a 4xx means depends on where it came (`Reply.server_trouble`):
  - no connection, 421, or a 4xx to the greeting, EHLO or MAIL: the primary is in trouble; the
    domain's sweep stops and the domain goes back to outage
  - a 4xx to RCPT or DATA (450 mailbox busy, 452 over quota): that mailbox waits, with a
    growing delay (`retry_delay` from `probe_interval`, at most an hour), and the others go on
Either way the entry goes back to waiting with its place in line. A 5xx sends a delivery status
notification to the sender (none for `<>`, nor when its RCPT said NOTIFY without FAILURE) and
moves the entry to failed/. Claiming, the moves, crash counting and the DSN are the queue runner
base's (runners/queue_runner.py); this module says what a reply means and keeps the order.

The order: each user's entries are a `Lane`. A worker takes a lane nobody works on; when there
is none left (fewer users than workers: one busy mailbox), it joins the lane with the most
entries left, once that lane's first message was taken, so one mailbox drains over several
connections at once. Then an `OrderGate`
holds each message's final dot (sent after the message itself) until the one before it in the
lane was answered: a primary commits a message at its dot, so it still takes a user's mail
oldest first, while the claim, the read, MAIL, RCPT, DATA and the message of the next ones and
the settling of the last one overlap; per mailbox only the dot and its 250 are serial (the
gate writes the held dot itself as the answer before it is read, `send_when_due`). When a
message of the lane must wait (a 4xx for the mailbox) or the sweep stops, the messages held
behind it are abandoned before their dot, their connections closed (RFC 5321 3.8: the primary
commits nothing), and go back to waiting as they were (Verdict.UNTRIED).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from relay import metrics
from relay.config import Domain, Replay
from relay.delivery.client import Reply, Upstream, probe
from relay.delivery.health import NORMAL, OUTAGE, REPLAYING, Health, State
from relay.log import event
from relay.runners.queue_runner import Notice, QueueRunner, Verdict
from relay.storage.queue import Envelope, Queue, due_by_user

HELD_BACK = "order"       # the stage of the Reply an OrderGate answers instead of the dot


class OrderGate:
    """One entry's place in its lane: its final dot waits for the entry before it (`before`), and
    its own verdict, once `decided`, tells the entry after it whether it may go (`mine`):
    yes after a 250, a 5xx or no try at all (set aside, crashed, another worker's), no when
    it or anything before it was told to wait, stopped the sweep or was held back.

    The entry after waits on a future of its own that `decided` sets directly (`_next`), not on
    `mine` through `asyncio.shield`: per mailbox the dots go one after another, each waking
    the next, and a shield costs every wake-up one more turn of a busy event loop."""

    GO_ON = (Verdict.DELIVERED, Verdict.REFUSED, None)

    def __init__(self, before: OrderGate | None) -> None:
        self.before = before
        self.mine: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._next: asyncio.Future[None] | None = None   # the wait of the entry after this one
        self._send_next: Callable[[], None] | None = None   # that entry's dot, sent at a go

    def due(self) -> bool:
        return self.before is None or self.before.mine.done()

    async def wait(self) -> Reply | None:
        before = self.before
        if before is None:
            return None
        if not before.mine.done():
            before._next = asyncio.get_running_loop().create_future()
            try:
                await before._next      # its own: a wait cancelled cancels nothing shared
            finally:
                before._send_next = None    # cancelled: its connection is closed, no dot
        if before.mine.result():
            return None
        return Reply(451, "4.4.0 held back: an older message for this mailbox must wait first",
                     stage=HELD_BACK)

    def send_when_due(self, send: Callable[[], None]) -> None:
        """`send` writes this entry's dot when the entry before says go (`_set`): in the
        loop turn that read its answer, where waking this entry's task first took one more
        turn of a busy loop, per mailbox one a message."""
        if self.before is not None and not self.before.mine.done():
            self.before._send_next = send

    def decided(self, verdict: Verdict | None) -> None:
        if self.mine.done():
            return
        go_on = verdict in self.GO_ON
        if self.before is None or not go_on:
            self._set(go_on)
        elif self.before.mine.done():
            self._set(self.before.mine.result())
        else:   # decided early (a 5xx to RCPT): the next still waits for the one before
            self.before.mine.add_done_callback(self._follow)

    def _follow(self, before: asyncio.Future[bool]) -> None:
        if not self.mine.done():
            self._set(before.result())

    def _set(self, go_on: bool) -> None:
        self.mine.set_result(go_on)
        send, self._send_next = self._send_next, None
        if go_on and send is not None:
            send()
        if self._next is not None and not self._next.done():
            self._next.set_result(None)


@dataclass
class Lane:
    """One user's due entries in a sweep, oldest first, and how many workers are on them."""

    entries: deque[str]
    workers: int = 0
    closed: bool = False        # told to wait, or held back: no more entries from it
    last: OrderGate | None = None               # the gate of the entry taken last
    first: asyncio.Future[bool] | None = None   # the first entry's verdict: did the mailbox take it

    def take(self) -> tuple[str, OrderGate]:
        gate = OrderGate(self.last)
        self.last = gate
        if self.first is None:
            self.first = gate.mine
        return self.entries.popleft(), gate

    @property
    def open(self) -> bool:
        return bool(self.entries) and not self.closed


@dataclass
class Sweep:
    """What one sweep of one domain did."""

    total: int = 0
    delivered: int = 0
    failed: int = 0
    held: int = 0
    deferred: int = 0          # mailboxes told to wait (a 4xx to RCPT or DATA)
    fault: str | None = None   # set when a temporary failure stopped the sweep
    next_due: float | None = None   # when the first mailbox that waits may be tried again
    waiting_users: set[str] = field(default_factory=set)   # deferred in this sweep


class RateLimit:
    """At most `rate` starts a second, shared by a domain's workers (None: no limit)."""

    def __init__(self, rate: float | None) -> None:
        self.interval = 1.0 / rate if rate else 0.0
        self._next = 0.0

    async def wait(self) -> None:
        if not self.interval:
            return
        now = time.monotonic()
        start = max(now, self._next)
        self._next = start + self.interval
        if start > now:
            await asyncio.sleep(start - now)


class ReplayRunner(QueueRunner):
    """Probes and drains; one instance serves every domain."""

    name = "replay"
    # Set by app.py (the alerts): (domain, delivered, failed, held, seconds) once a domain's
    # replay queue drained after an outage; blocking is not allowed (it runs on the loop).
    finished: Callable[[str, int, int, int, float], None] | None = None

    def __init__(self, domains: dict[str, Domain], settings: Replay, health: Health,
                 queue_for: Callable[[str], Queue], notice: Notice, hostname: str) -> None:
        super().__init__(hostname, notice, settings.probe_interval, wakes=domains)
        self.domains = domains
        self.settings = settings
        self.health = health
        self.queue_for = queue_for
        self._tallies: dict[str, Sweep] = {}    # per domain, since its last replay finished

    # -- the loop inside serve ---------------------------------------------------------------

    def kick(self, domain: str, state: State | None = None) -> None:
        """Wake the domain's loop early (from the event loop thread): the primary took mail.

        A health listener: only the change to `replaying` wakes the loop; the change to
        `outage` must not, or a sweep stopped by a 4xx would probe again at once."""
        if state is None or state.state == REPLAYING:
            self.wake(domain)

    async def _wait(self, domain: str, until: float | None = None) -> None:
        seconds = self.settings.probe_interval
        if until is not None:
            seconds = max(0.05, min(seconds, until - time.time()))
        await self.sleep(seconds, domain)

    async def run(self) -> None:
        """Run every domain's loop until cancelled; an error in the loop itself ends serve."""
        async with asyncio.TaskGroup() as group:
            for domain in self.domains.values():
                group.create_task(self._domain_loop(domain))

    async def _domain_loop(self, domain: Domain) -> None:
        queue = self.queue_for(domain.name)
        while True:
            domain = self.domains.get(domain.name, domain)    # a SIGHUP may change its primary
            state = self.health.get(domain.name).state
            if state == OUTAGE:
                await self._wait(domain.name)
                now = self.health.get(domain.name)
                if now.state == OUTAGE and not now.planned:
                    await self._probe(domain, queue)
                    self.forget_wakes(domain.name)  # our own trial sweep's kicks are not news
                continue
            if await asyncio.to_thread(queue.count) == 0:
                if state == REPLAYING:
                    since = self.health.get(domain.name).since
                    self.health.replay_done(domain.name)
                    self._finish(domain.name, since)
                await self._wait(domain.name)
                continue
            result = await self.sweep(domain)
            self.forget_wakes(domain.name)
            if state == NORMAL:      # mail queued with the primary up: no outage's replay
                self._tallies.pop(domain.name, None)
            if result.fault:
                self.health.primary_failed(domain.name, result.fault)
            elif not result.total:   # only mailboxes told to wait are left
                await self._wait(domain.name, result.next_due)

    def _finish(self, domain: str, since: float) -> None:
        """The queue drained: tell `finished` what this replay did (nothing when it replayed
        nothing: the outage's end was news enough)."""
        tally = self._tallies.pop(domain, Sweep())
        if self.finished is not None and (tally.delivered or tally.failed or tally.held):
            self.finished(domain, tally.delivered, tally.failed, tally.held,
                          max(0.0, time.time() - since) if since else 0.0)

    async def _probe(self, domain: Domain, queue: Queue) -> None:
        """A primary that greets may still refuse every message (a 451 for a broken mailbox
        store): with mail waiting, only a delivery ends the outage, so a sweep is the test,
        and a failed one leaves the outage as it is, unlogged."""
        started = time.monotonic()
        reply = await probe(domain.primary, self.hostname)
        metrics.probed(time.monotonic() - started)
        if not reply.ok:
            return
        if await asyncio.to_thread(queue.count):
            result = await self.sweep(domain)
            if result.fault:  # it took some, then refused: back to outage (no-op if still there)
                self.health.primary_failed(domain.name, result.fault)
        else:
            self.health.primary_ok(domain.name)

    # -- one sweep (also the `replay` command) -----------------------------------------------

    async def sweep(self, domain: Domain, progress: Callable[[int], None] | None = None,
                    force: bool = False) -> Sweep:
        """Deliver every due entry of `domain` until none is left or a fault stops it.

        `force` (the `replay` command, like `postqueue -f`) also tries the mailboxes told to
        wait, once each."""
        queue = self.queue_for(domain.name)
        result = Sweep()
        started = time.monotonic()
        while result.fault is None:
            users, result.next_due = await asyncio.to_thread(
                due_by_user, queue, None if force else time.time())
            for rcpt in result.waiting_users:
                users.pop(rcpt, None)
            if not users:
                break
            result.total += sum(len(ids) for ids in users.values())
            await self._sweep_once(domain, queue, deque(Lane(deque(ids)) for ids in users.values()),
                                   result, progress)
        tally = self._tallies.setdefault(domain.name, Sweep())
        tally.delivered += result.delivered
        tally.failed += result.failed
        tally.held += result.held
        if result.delivered or result.failed or result.held or result.deferred:
            event("replay.swept", domain=domain.name, delivered=result.delivered,
                  failed=result.failed, held=result.held, deferred=result.deferred,
                  seconds=round(time.monotonic() - started, 1), stopped_by=result.fault or "-")
        return result

    async def _sweep_once(self, domain: Domain, queue: Queue, lanes: deque[Lane], result: Sweep,
                          progress: Callable[[int], None] | None) -> None:
        limit = RateLimit(self.settings.rate)
        workers = min(self.settings.concurrency, sum(len(lane.entries) for lane in lanes))
        busy: list[Lane] = []       # the lanes workers are on: at most `workers`
        await asyncio.gather(*(self._worker(domain, queue, lanes, busy, result, limit, progress)
                               for _ in range(workers)))

    @staticmethod
    async def _next_lane(lanes: deque[Lane], busy: list[Lane]) -> Lane | None:
        """A lane nobody works on, else the busy lane with the most entries left, once its first
        message went (a mailbox, or a primary, that refuses the first is not tried in parallel)."""
        while lanes:
            lane = lanes.popleft()
            if lane.open:
                busy.append(lane)
                return lane
        while True:
            joinable = [lane for lane in busy if lane.open and lane.first is not None
                        and not (lane.first.done() and not lane.first.result())]
            if not joinable:
                return None
            undecided = [lane.first for lane in joinable if not lane.first.done()]
            if len(undecided) < len(joinable):
                return max((lane for lane in joinable if lane.first.done()),
                           key=lambda lane: len(lane.entries))
            await asyncio.wait(undecided, return_when=asyncio.FIRST_COMPLETED)  # never cancels them

    async def _worker(self, domain: Domain, queue: Queue, lanes: deque[Lane], busy: list[Lane],
                      result: Sweep, limit: RateLimit, progress: Callable[[int], None] | None) -> None:
        upstream = Upstream(domain.primary, self.hostname)
        try:
            while result.fault is None and (lane := await self._next_lane(lanes, busy)) is not None:
                lane.workers += 1
                try:
                    await self._drain_lane(domain, queue, upstream, lane, result, limit, progress)
                finally:
                    lane.workers -= 1
                    if not lane.workers:
                        busy.remove(lane)
        finally:
            await upstream.quit()

    async def _drain_lane(self, domain: Domain, queue: Queue, upstream: Upstream, lane: Lane,
                          result: Sweep, limit: RateLimit, progress: Callable[[int], None] | None) -> None:
        while lane.open and result.fault is None:
            entry, gate = lane.take()
            try:
                await limit.wait()
                waits = await self._replay(domain, queue, upstream, entry, gate, result)
            finally:
                gate.decided(Verdict.STOP)      # cancelled before it was tried: nothing goes on
            if progress is not None:
                progress(1)
            if waits:      # the rest of this mailbox keeps its order behind it
                lane.closed = True

    async def _replay(self, domain: Domain, queue: Queue, upstream: Upstream, entry: str,
                      gate: OrderGate, result: Sweep) -> bool:
        """Replay one entry; True when its mailbox was told to wait, or it was held back."""
        outcome = await self.attempt(queue, entry, upstream, gate)
        if outcome is None:
            return False  # another sweeper (the `replay` command, or serve) has it
        if outcome.verdict is None:
            result.held += outcome.moved_to == "hold"
            return False
        assert outcome.reply is not None and outcome.envelope is not None
        if outcome.verdict is Verdict.DELIVERED:
            self.health.primary_ok(domain.name)  # the first delivery ends an outage
            result.delivered += 1
        elif outcome.verdict is Verdict.REFUSED:
            result.failed += 1
        elif outcome.verdict is Verdict.STOP:
            result.fault = f"{outcome.reply.code} {outcome.reply.text}"
        elif outcome.verdict is Verdict.UNTRIED:
            return True
        else:
            result.deferred += 1
            result.waiting_users.add(outcome.envelope.rcpt)
            return True
        return False

    def judge(self, envelope: Envelope, reply: Reply) -> Verdict:
        """5xx: refused; the primary in trouble (`Reply.server_trouble`): the sweep stops; a
        4xx about one mailbox (RCPT, DATA): that mailbox waits; held back by its OrderGate:
        not tried."""
        if reply.stage == HELD_BACK:
            return Verdict.UNTRIED
        if reply.permanent:
            return Verdict.REFUSED
        return Verdict.STOP if reply.server_trouble else Verdict.RETRY

    def fields(self, queue: Queue) -> dict[str, object]:
        return {"domain": queue.root.name}
