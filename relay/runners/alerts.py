"""The alerts runner: hands events to the Alerter off the loop, delivers the webhook queue, and
runs the periodic checks (relay/delivery/alerts.py says what each alert is).

Three loops in one supervised runner:
  events     the hooks (`health_changed`, `replay_finished`, called on the loop or in a worker
             thread) only put the event on an in-memory queue; this loop runs each, in order,
             in a worker thread (they write queue files), then kicks the outbound runner
  webhook    `<spool>/alerts/webhook/`, like the outbound runner's sweep: every due entry,
             oldest first; a 2xx ends it, a 5xx/408/429 defers it (`alerts.retry_delay`,
             doubling, at most an hour), an unreachable server stops the sweep, anything else
             or an entry older than `alerts.max_age` goes to failed/ (logged, nobody to tell)
  checks     every TICK: entries gone wrong (batched), free disk every `alerts.disk_interval`,
             subscriptions at start-up and every day
Claiming, crash counting and the moves are the queue runner base's (runners/queue_runner.py).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Callable

from relay.config import Alerts as Settings
from relay.delivery.alerts import Alerter
from relay.delivery.client import Reply, Upstream
from relay.delivery.health import State
from relay.delivery.webhook import Webhook
from relay.log import event
from relay.runners.queue_runner import QueueRunner, Verdict
from relay.storage.queue import Envelope

TICK = 1.0
SUBSCRIPTION_CHECK = 86400.0


class AlertRunner(QueueRunner):
    """Owns `<spool>/alerts/webhook/` and the Alerter's timing."""

    name = "alerts"

    def __init__(self, alerter: Alerter, settings: Settings, hostname: str,
                 kick_outbound: Callable[[], None]) -> None:
        super().__init__(hostname, lambda notice, rcpt: None, settings.retry_delay)
        self.alerter = alerter
        self.settings = settings
        self.kick_outbound = kick_outbound
        self.webhook = Webhook(settings.webhook, settings.webhook_timeout) if settings.webhook else None
        self._loop = asyncio.get_running_loop()
        self._events: asyncio.Queue[Callable[[], None]] = asyncio.Queue()

    # -- hooks: called on the loop or in another thread; they only hand the event over ------------

    def _post(self, job: Callable[[], None]) -> None:
        self._loop.call_soon_threadsafe(self._events.put_nowait, job)

    def health_changed(self, domain: str, state: State) -> None:
        self._post(lambda: self.alerter.health_changed(domain, state))

    def replay_finished(self, domain: str, delivered: int, failed: int, held: int, seconds: float) -> None:
        self._post(lambda: self.alerter.replay_finished(domain, delivered, failed, held, seconds))

    # -- the loops ------------------------------------------------------------------------------

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(self._work())
            group.create_task(self._checks())
            if self.webhook is not None:
                group.create_task(self._webhooks())

    async def _work(self) -> None:
        while True:
            job = await self._events.get()
            await self._run(job)

    async def _run(self, job: Callable[[], None]) -> None:
        """One event or check in a worker thread; its failure is logged and the next goes on."""
        try:
            await asyncio.to_thread(job)
        except Exception as exc:  # noqa: BLE001 - one alert that cannot be queued must not stop the others
            event("alerts.error", logging.ERROR, error=type(exc).__name__, detail=exc)
        self.kick_outbound()
        self.wake()

    async def _checks(self) -> None:
        next_disk = next_subscriptions = 0.0
        while True:
            now = time.time()
            if self.alerter.has_trouble():
                await self._run(self.alerter.flush_troubles)
            if self.alerter.users_ends_due():
                await self._run(self.alerter.tell_users_ends)
            if self.settings.disk_days is not None and now >= next_disk:
                await self._run(self.alerter.check_disk)
                next_disk = now + self.settings.disk_interval
            if now >= next_subscriptions:
                await self._run(lambda: self.alerter.check_subscriptions(dt.date.today()))
                next_subscriptions = now + SUBSCRIPTION_CHECK
            await asyncio.sleep(TICK)

    async def _webhooks(self) -> None:
        while True:
            await self.sweep()
            await self.sleep(min(self.settings.retry_delay, 60.0))

    async def sweep(self) -> int:
        """POST every due webhook entry, oldest first; returns how many were delivered."""
        queue = self.alerter.webhooks
        assert queue is not None and self.webhook is not None
        now = time.time()
        due = [p.id for p in await asyncio.to_thread(queue.pending) if p.next_try <= now]
        delivered = 0
        for entry in due:
            outcome = await self.attempt(queue, entry, self.webhook)    # type: ignore[arg-type]
            if outcome is None or outcome.reply is None:
                continue
            delivered += outcome.reply.ok
            if outcome.verdict is Verdict.STOP:
                event("alerts.webhook_unreachable", logging.WARNING, host=self.webhook.server_name,
                      reason=outcome.reply.text)
                break
        return delivered

    def passed_notify(self, upstream: Upstream) -> bool:
        return True     # a webhook post: no NOTIFY to answer, no "relayed" notice

    async def deliver(self, envelope: Envelope, data: bytes, upstream: Upstream) -> tuple[Verdict, Reply]:
        """The entry's JSON to the webhook (`upstream` is the Webhook: the base only reads its
        `server_name`)."""
        assert self.webhook is not None
        reply = await self.webhook.post(data)
        return (Verdict.DELIVERED if reply.ok else self.judge(envelope, reply)), reply

    def judge(self, envelope: Envelope, reply: Reply) -> Verdict:
        if reply.permanent or time.time() - envelope.received_at >= self.settings.max_age:
            return Verdict.REFUSED
        return Verdict.RETRY if reply.reached else Verdict.STOP
