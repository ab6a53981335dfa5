"""The metrics endpoint on `listen.metrics`: `GET /metrics` in Prometheus' text format (or
OpenMetrics, when the scraper asks), served by aiohttp on the relay's own event loop.

Beside the process-wide counts (relay/metrics.py), each scrape reads the status model that
`continuity-relay status` and the panel show (`storage/state.py`: `domain_status`,
`outbound_status`):

    relay_domain_state{domain,state}              1 for the current state, 0 for the others
    relay_domain_outage_seconds_total{domain}     seconds spent in outage (one going on at start-up
                                                  counts from its start)
    relay_queue_messages{queue,domain,state}      entries per state: queue replay (per domain)
                                                  or outbound (domain "")
    relay_queue_oldest_age_seconds{queue,domain}  the oldest waiting entry's age (0: none)

Reading them lists directories, so the whole answer is made in a worker thread, one scrape at
a time (a burst of scrapes must not take the threads the storage needs).

Outage seconds are counted from the states seen: by the health listener (`changed`, every
change this process makes, at once) and by each scrape (a change another process wrote, such
as the `replay` command ending an outage, or an outage already going on at start-up). An
outage is known by its start time, so one seen both ways counts once.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable, Iterator

from aiohttp import web

from relay import metrics
from relay.config import Config, HostPort
from relay.errors import RelayError
from relay.log import event
from relay.metrics import Metric
from relay.storage.state import NORMAL, OUTAGE, REPLAYING, State, domain_status, outbound_status

STATES = (NORMAL, OUTAGE, REPLAYING)


class StatusGauges:
    """A collector of the status model's gauges; `collect()` blocks (directory listings)."""

    def __init__(self, config: Config, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.clock = clock
        self._lock = threading.Lock()       # the health listener and a scrape's thread
        self._open: dict[str, float] = {}       # domain -> start of its outage going on
        self._closed: dict[str, float] = {}     # domain -> start of the last outage counted
        self._ended: dict[str, float] = {}      # domain -> seconds of the outages that ended
        self._shown: dict[str, float] = {}      # domain -> the last total shown (never less)

    def changed(self, domain: str, state: State) -> None:
        """A health listener (`Health.listen`): note a change when it happens."""
        with self._lock:
            self._note(domain, state)

    def _note(self, domain: str, state: State) -> None:
        """An outage opens at its `since` and closes at the `since` of a later state; a state
        older than the open outage (a scrape reading a file not yet rewritten) changes nothing."""
        start = self._open.get(domain)
        if state.state == OUTAGE:
            if state.since == self._closed.get(domain) or state.since == start:
                return                                  # counted already, or open already
            if start is not None and state.since > start:   # its end was never seen
                self._close(domain, start, state.since)
            if start is None or state.since > start:
                self._open[domain] = state.since
        elif start is not None and state.since >= start:
            self._close(domain, start, state.since)

    def _close(self, domain: str, start: float, end: float) -> None:
        # An end seen late may lie before a scrape that already showed more: count up to that.
        self._ended[domain] = max(self._ended.get(domain, 0.0) + max(0.0, end - start),
                                  self._shown.get(domain, 0.0))
        self._closed[domain] = start
        self._open.pop(domain, None)

    def _outage_seconds(self, domain: str, now: float) -> float:
        start = self._open.get(domain)
        total = self._ended.get(domain, 0.0) + (max(0.0, now - start) if start is not None else 0.0)
        self._shown[domain] = total = max(total, self._shown.get(domain, 0.0))
        return total

    def collect(self) -> Iterator[Metric]:
        statuses = [domain_status(self.config, name) for name in sorted(self.config.domains)]
        outbound = outbound_status(self.config)
        now = self.clock()
        with self._lock:
            for status in statuses:
                self._note(status.name, status.health)
            outage = [([s.name], self._outage_seconds(s.name, now)) for s in statuses]
        yield metrics.gauge("relay_domain_state", "The domain's health state (1: current)",
                            ["domain", "state"],
                            (([s.name, name], float(s.health.state == name))
                             for s in statuses for name in STATES))
        yield metrics.counter("relay_domain_outage_seconds", "Seconds the domain spent in outage",
                              ["domain"], outage)
        queues = [("replay", s.name, s.queue, s.oldest) for s in statuses]
        queues.append(("outbound", "", outbound.queue, outbound.oldest))
        yield metrics.gauge("relay_queue_messages", "Queue entries per state",
                            ["queue", "domain", "state"],
                            (([queue, domain, state], count) for queue, domain, counts, _ in queues
                             for state, count in counts.items()))
        yield metrics.gauge("relay_queue_oldest_age_seconds", "Age of the oldest waiting entry (0: none)",
                            ["queue", "domain"],
                            (([queue, domain], oldest or 0.0) for queue, domain, _, oldest in queues))


async def start_metrics(address: HostPort, gauges: StatusGauges) -> web.AppRunner:
    """Serve `GET /metrics` on `address`; stop it with `await runner.cleanup()`. A port that
    cannot be bound raises RelayError naming `listen.metrics`."""
    one_at_a_time = asyncio.Lock()

    async def scrape(request: web.Request) -> web.Response:
        async with one_at_a_time:
            body, content_type = await asyncio.to_thread(metrics.render, [gauges],
                                                         request.headers.get("Accept", ""))
        return web.Response(body=body, headers={"Content-Type": content_type})

    app = web.Application()
    app.router.add_get("/metrics", scrape)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, address.host, address.port).start()
    except OSError as exc:
        await runner.cleanup()
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise RelayError(f"listen.metrics {address}: {reason}") from None
    host, port = runner.addresses[0][:2]
    event("metrics.listening", address=f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    return runner
