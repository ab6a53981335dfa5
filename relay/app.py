"""Wires the components together and runs them in one asyncio loop (`continuity-relay serve`)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from relay.config import Config
from relay.delivery.health import Health
from relay.directory import Directory
from relay.errors import RelayError
from relay.log import event
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

    async def close(self) -> None:
        """Stop accepting connections, then let the messages in hand finish (see drain)."""
        self.inbound.close()
        await self.handler.drain()


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
    handler = InboundHandler(config.domains, config.hostname, Health(config.storage.spool, owner),
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
    return Running(server, handler)


async def serve(config: Config) -> None:
    """Run every listener until SIGTERM or SIGINT."""
    running = await start(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await running.close()
    event(log, "app.stopped")
