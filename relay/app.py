"""Wires the components together and runs them in one asyncio loop (`continuity-relay serve`)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from relay.config import Config
from relay.delivery.health import Health
from relay.directory import Directory
from relay.errors import RelayError
from relay.log import event
from relay.runners.replay import ReplayRunner, Sweep
from relay.smtp.inbound import InboundHandler, InboundSMTP
from relay.storage.continuity import ContinuityStore
from relay.storage.durable import Owner, make_dirs
from relay.storage.maildir import MaildirStore

log = logging.getLogger("relay.app")

# Deliveries are fsync-bound: more threads than cores lets the disk batch them.
STORAGE_THREADS = 32


def build_store(config: Config) -> ContinuityStore:
    owner = Owner.named(config.storage.owner)
    return ContinuityStore(MaildirStore(config.storage.maildirs, owner), config.storage.spool, owner)


def recover(config: Config, store: ContinuityStore) -> None:
    """Start-up rescan of every queue: the directories are the truth."""
    for domain in config.domains:
        result = store.replay_queue(domain).recover()
        if any(result.values()):
            event(log, "queue.recovered", domain=domain, **result)


@dataclass
class Running:
    """What `start` opened; `close()` shuts it down in order."""

    inbound: asyncio.Server
    handler: InboundHandler
    replay: ReplayRunner
    runners: asyncio.Task

    async def close(self) -> None:
        """Stop accepting connections, let the messages in hand finish (see drain), then stop
        the runners (an entry in flight goes back to waiting at the next start)."""
        self.inbound.close()
        await self.handler.drain()
        self.runners.cancel()
        try:
            await self.runners
        except asyncio.CancelledError:
            pass  # what we asked for


async def start(config: Config) -> Running:
    """Prepare storage, recover the queues and open the inbound listener."""
    loop = asyncio.get_running_loop()
    loop.set_default_executor(ThreadPoolExecutor(STORAGE_THREADS, thread_name_prefix="storage"))
    owner = Owner.named(config.storage.owner)
    for root in (config.storage.maildirs, config.storage.spool):
        make_dirs(root, owner)
    store = build_store(config)
    await asyncio.to_thread(recover, config, store)
    directory = Directory(config)
    health = Health(config.storage.spool, owner)
    replay = _replay_runner(config, store, health)
    health.listen(replay.kick)
    handler = InboundHandler(config.domains, config.hostname, health,
                             directory.is_registered, store.keep, config.max_recipients)
    inbound = config.listen.inbound
    try:
        server = await loop.create_server(
            lambda: InboundSMTP(handler, hostname=config.hostname, ident="continuity-relay",
                                data_size_limit=config.message_size_limit, enable_SMTPUTF8=True,
                                decode_data=False),
            inbound.host, inbound.port)
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise RelayError(f"listen.inbound {inbound}: {reason}") from None
    event(log, "inbound.listening", address=str(inbound), domains=len(config.domains))
    return Running(server, handler, replay, loop.create_task(replay.run(), name="replay"))


def _replay_runner(config: Config, store: ContinuityStore, health: Health) -> ReplayRunner:
    return ReplayRunner(config.domains, config.replay, health, store.replay_queue,
                        lambda notice, rcpt: store.bounce(notice, rcpt, config.domains),
                        config.hostname)


async def replay_once(config: Config, domain: str, progress: Callable[[int], None]) -> Sweep:
    """One sweep of one domain now, whatever its state (the `replay` command).

    No queue recovery here: a running `serve` may hold entries in active/.
    """
    store = build_store(config)
    health = Health(config.storage.spool, Owner.named(config.storage.owner))
    result = await _replay_runner(config, store, health).sweep(config.domains[domain], progress)
    if result.fault:
        health.primary_failed(domain, result.fault)
    elif result.total and not await asyncio.to_thread(store.replay_queue(domain).count):
        health.primary_ok(domain)
        health.replay_done(domain)
    return result


async def serve(config: Config) -> None:
    """Run every listener until SIGTERM or SIGINT."""
    running = await start(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    stopping = loop.create_task(stop.wait())
    await asyncio.wait([stopping, running.runners], return_when=asyncio.FIRST_COMPLETED)
    if running.runners.done():  # a runner's own loop failed: end non-zero, systemd restarts
        stopping.cancel()
        running.inbound.close()
        running.runners.result()
    await running.close()
    event(log, "app.stopped")
