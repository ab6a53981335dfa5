"""The replay runner: drains each domain's replay queue to its recovered primary server.

Per domain, a loop (inside `serve`):
  outage     probe the primary every `replay.probe_interval` (connect, EHLO, QUIT); when it
             greets, try a sweep: the first message it takes ends the outage. A kick from the
             inbound listener (a message the primary accepted) ends the wait early
  replaying  sweep: every waiting entry goes to the primary, per user oldest first, several
             users at once (`replay.concurrency`), at most `replay.rate` messages a second,
             one reused SMTP connection per worker; an empty queue -> normal
  normal     rescan the queue on the same timer (the directory is the truth, a kick a hint)

A message counts as replayed only after the primary's 250 (then its queue files go; the
user's Maildir copy stays). A 4xx or a lost connection stops the domain's sweep and puts it
back in outage; the entry goes back to waiting with its place in line. A 5xx sends a delivery
status notification to the sender (none for `<>`) and moves the entry to failed/. An entry
that cannot be read, or whose handling raised, is set aside after `MAX_CRASHES` tries.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace

from relay.config import Domain, Replay
from relay.delivery.client import Reply, Upstream, probe
from relay.delivery.dsn import build_dsn
from relay.delivery.health import OUTAGE, REPLAYING, Health, State
from relay.errors import CorruptEntryError
from relay.log import event
from relay.runners.wake import sleep_until_kick
from relay.storage.queue import MAX_CRASHES, Envelope, Queue, waiting_by_user

log = logging.getLogger("relay.replay")

Bounce = Callable[[bytes, str], None]   # (DSN bytes, recipient): queue it, blocking


@dataclass
class Sweep:
    """What one sweep of one domain did."""

    total: int = 0
    delivered: int = 0
    failed: int = 0
    held: int = 0
    fault: str | None = None   # set when a temporary failure stopped the sweep


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


class ReplayRunner:
    """Probes and drains; one instance serves every domain."""

    def __init__(self, domains: dict[str, Domain], settings: Replay, health: Health,
                 queue_for: Callable[[str], Queue], bounce: Bounce, hostname: str) -> None:
        self.domains = domains
        self.settings = settings
        self.health = health
        self.queue_for = queue_for
        self.bounce = bounce
        self.hostname = hostname
        self._kicks: dict[str, asyncio.Event] = {name: asyncio.Event() for name in domains}

    # -- the loop inside serve ---------------------------------------------------------------

    def kick(self, domain: str, state: State | None = None) -> None:
        """Wake the domain's loop early (from the event loop thread): the primary took mail.

        A health listener: only the change to `replaying` wakes the loop; the change to
        `outage` must not, or a sweep stopped by a 4xx would probe again at once."""
        if domain in self._kicks and (state is None or state.state == REPLAYING):
            self._kicks[domain].set()

    async def _wait(self, domain: str) -> None:
        await sleep_until_kick(self._kicks[domain], self.settings.probe_interval)

    async def run(self) -> None:
        """Run every domain's loop until cancelled; an error in the loop itself ends serve."""
        async with asyncio.TaskGroup() as group:
            for domain in self.domains.values():
                group.create_task(self._domain_loop(domain))

    async def _domain_loop(self, domain: Domain) -> None:
        queue = self.queue_for(domain.name)
        kick = self._kicks[domain.name]
        while True:
            state = self.health.get(domain.name).state
            if state == OUTAGE:
                await self._wait(domain.name)
                if self.health.get(domain.name).state == OUTAGE:
                    await self._probe(domain, queue)
                    kick.clear()  # our own trial sweep's kicks are not news
                continue
            if await asyncio.to_thread(queue.count) == 0:
                if state == REPLAYING:
                    self.health.replay_done(domain.name)
                await self._wait(domain.name)
                continue
            result = await self.sweep(domain)
            kick.clear()
            if result.fault:
                self.health.primary_failed(domain.name, result.fault)

    async def _probe(self, domain: Domain, queue: Queue) -> None:
        """A primary that greets may still refuse every message (a 451 for a broken mailbox
        store): with mail waiting, only a delivery ends the outage, so a sweep is the test,
        and a failed one leaves the outage as it is, unlogged."""
        reply = await probe(domain.primary, self.hostname)
        if not reply.ok:
            return
        if await asyncio.to_thread(queue.count):
            result = await self.sweep(domain)
            if result.fault:  # it took some, then refused: back to outage (no-op if still there)
                self.health.primary_failed(domain.name, result.fault)
        else:
            self.health.primary_ok(domain.name)

    # -- one sweep (also the `replay` command) -----------------------------------------------

    async def sweep(self, domain: Domain, progress: Callable[[int], None] | None = None) -> Sweep:
        """Deliver every waiting entry of `domain` until none is left or a fault stops it."""
        queue = self.queue_for(domain.name)
        result = Sweep()
        started = time.monotonic()
        while result.fault is None:
            users = await asyncio.to_thread(waiting_by_user, queue)
            if not users:
                break
            result.total += sum(len(ids) for ids in users.values())
            await self._sweep_once(domain, queue, deque(users.values()), result, progress)
        if result.delivered or result.failed or result.held:
            event(log, "replay.swept", domain=domain.name, delivered=result.delivered,
                  failed=result.failed, held=result.held, seconds=round(time.monotonic() - started, 1),
                  stopped_by=result.fault or "-")
        return result

    async def _sweep_once(self, domain: Domain, queue: Queue, users: deque[list[str]], result: Sweep,
                          progress: Callable[[int], None] | None) -> None:
        limit = RateLimit(self.settings.rate)
        workers = min(self.settings.concurrency, len(users))
        await asyncio.gather(*(self._worker(domain, queue, users, result, limit, progress)
                               for _ in range(workers)))

    async def _worker(self, domain: Domain, queue: Queue, users: deque[list[str]], result: Sweep,
                      limit: RateLimit, progress: Callable[[int], None] | None) -> None:
        upstream = Upstream(domain.primary, self.hostname)
        try:
            while users and result.fault is None:
                for entry in users.popleft():
                    if result.fault is not None:
                        break
                    await limit.wait()
                    await self._replay(domain, queue, upstream, entry, result)
                    if progress is not None:
                        progress(1)
        finally:
            await upstream.quit()

    async def _replay(self, domain: Domain, queue: Queue, upstream: Upstream, entry: str,
                      result: Sweep) -> None:
        if not await asyncio.to_thread(queue.claim, entry):
            return  # another sweeper (the `replay` command, or serve) has it
        try:
            envelope, data = await asyncio.to_thread(queue.read, entry, "active")
        except CorruptEntryError as exc:
            await asyncio.to_thread(queue.move, entry, "active", "hold")
            event(log, "replay.held", logging.ERROR, domain=domain.name, id=entry, error=exc)
            result.held += 1
            return
        try:
            reply = await self._send(upstream, envelope, data)
            await self._settle(domain, queue, entry, envelope, data, reply, result)
        except Exception as exc:  # noqa: BLE001 - one bad entry must not stop the runner
            await self._crashed(domain, queue, entry, envelope, exc, result)

    @staticmethod
    async def _send(upstream: Upstream, envelope: Envelope, data: bytes) -> Reply:
        return await upstream.send(envelope.mail_from, envelope.rcpt, list(envelope.mail_options), data)

    async def _settle(self, domain: Domain, queue: Queue, entry: str, envelope: Envelope,
                      data: bytes, reply: Reply, result: Sweep) -> None:
        if reply.ok:
            await asyncio.to_thread(queue.finish, entry)
            self.health.primary_ok(domain.name)  # the first delivery ends an outage
            result.delivered += 1
            return
        note = f"{reply.code} {reply.text}"
        if reply.permanent:
            await asyncio.to_thread(self._refused, domain, queue, entry, envelope, data, reply)
            event(log, "replay.refused", logging.WARNING, domain=domain.name, id=entry,
                  rcpt=envelope.rcpt, reply=note, dsn="no" if not envelope.mail_from else "yes")
            result.failed += 1
            return
        later = replace(envelope, attempts=envelope.attempts + 1, note=note)
        await asyncio.to_thread(queue.move, entry, "active", "waiting", later)
        result.fault = note

    def _refused(self, domain: Domain, queue: Queue, entry: str, envelope: Envelope, data: bytes,
                 reply: Reply) -> None:
        """5xx: tell the sender first, then file the entry under failed/ (blocking)."""
        if envelope.mail_from:
            self.bounce(build_dsn(reporting_mta=self.hostname, original=data,
                                  mail_from=envelope.mail_from, rcpt=envelope.rcpt, code=reply.code,
                                  text=reply.text, remote_mta=domain.primary.address.host,
                                  arrival=envelope.received_at), envelope.mail_from)
        failed = replace(envelope, attempts=envelope.attempts + 1, note=f"{reply.code} {reply.text}")
        queue.move(entry, "active", "failed", failed)

    async def _crashed(self, domain: Domain, queue: Queue, entry: str, envelope: Envelope,
                       exc: Exception, result: Sweep) -> None:
        crashed = replace(envelope, crashes=envelope.crashes + 1, note=f"error: {type(exc).__name__}")
        target = "hold" if crashed.crashes >= MAX_CRASHES else "waiting"
        await asyncio.to_thread(queue.move, entry, "active", target, crashed)
        event(log, "replay.error", logging.ERROR, domain=domain.name, id=entry,
              error=type(exc).__name__, detail=exc, now_in=target)
        if target == "hold":
            result.held += 1
