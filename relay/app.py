"""Wires the components together and runs them in one asyncio loop (`continuity-relay serve`)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from aiohttp.web import AppRunner

from relay.admins import Admins
from relay.auth import LoginThrottle
from relay.config import Config, HostPort
from relay.delivery.health import Health
from relay.delivery.outbound import Sender
from relay.directory import Directory, User
from relay.errors import RelayError
from relay.log import event
from relay.runners.outbound import OutboundRunner
from relay.runners.outbox import OutboxRunner
from relay.runners.replay import ReplayRunner, Sweep
from relay.smtp.inbound import InboundHandler, InboundSMTP
from relay.smtp.submission import SubmissionHandler, Submit, make_server_factory, tls_context
from relay.storage.continuity import ContinuityStore
from relay.storage.durable import Owner, make_dirs
from relay.storage.maildir import MaildirStore
from relay.web import start_web

log = logging.getLogger("relay.app")

# Deliveries are fsync-bound: more threads than cores lets the disk batch them.
STORAGE_THREADS = 32


def build_store(config: Config) -> ContinuityStore:
    owner = Owner.named(config.storage.owner)
    return ContinuityStore(MaildirStore(config.storage.maildirs, owner), config.storage.spool, owner)


def recover(config: Config, store: ContinuityStore) -> None:
    """Start-up rescan of every queue: the directories are the truth."""
    queues = [(domain, store.replay_queue(domain)) for domain in config.domains]
    for name, queue in [*queues, ("(outbound)", store.outbound)]:
        result = queue.recover()
        if any(result.values()):
            event(log, "queue.recovered", queue=name, **result)


@dataclass
class Running:
    """What `start` opened; `close()` shuts it down in order."""

    inbound: asyncio.Server
    handler: InboundHandler
    replay: ReplayRunner
    runners: asyncio.Task
    submission: tuple[asyncio.Server, SubmissionHandler] | None = None
    web: AppRunner | None = None

    async def close(self) -> None:
        """Stop accepting connections, let the messages in hand finish (see drain), then stop
        the runners (an entry in flight goes back to waiting at the next start)."""
        if self.web is not None:
            await self.web.cleanup()    # stops listening; requests in hand get a few seconds
        self.inbound.close()
        if self.submission is not None:
            self.submission[0].close()
            await self.submission[1].drain()
        await self.handler.drain()
        # Python 3.11's wait_for can swallow a cancellation (see runners/wake.py): ask again
        # until the runners have stopped.
        while not self.runners.done():
            self.runners.cancel()
            await asyncio.wait([self.runners], timeout=2)
        if not self.runners.cancelled() and self.runners.exception() is not None:
            raise self.runners.exception()


async def _listen(name: str, factory: Callable[[], asyncio.Protocol], address: HostPort) -> asyncio.Server:
    try:
        server = await asyncio.get_running_loop().create_server(factory, address.host, address.port)
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise RelayError(f"listen.{name} {address}: {reason}") from None
    event(log, f"{name}.listening", address=str(address))
    return server


def _credentials(config: Config) -> tuple[str, str] | None:
    smarthost = config.outbound.smarthost
    if smarthost is None or smarthost.username is None or smarthost.password_file is None:
        return None
    try:
        return smarthost.username, smarthost.password_file.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise RelayError(f"outbound.smarthost.password_file: {exc.strerror or exc}") from None


async def _run_all(*runners: Coroutine[Any, Any, None]) -> None:
    async with asyncio.TaskGroup() as group:
        for runner in runners:
            group.create_task(runner)


async def start(config: Config) -> Running:
    """Prepare storage, recover the queues, open the listeners and start the runners."""
    asyncio.get_running_loop().set_default_executor(
        ThreadPoolExecutor(STORAGE_THREADS, thread_name_prefix="storage"))
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
    inbound = await _listen("inbound", lambda: InboundSMTP(
        handler, hostname=config.hostname, ident="continuity-relay",
        data_size_limit=config.message_size_limit, enable_SMTPUTF8=True, decode_data=False),
        config.listen.inbound)
    runners = [replay.run()]
    submit = None
    if config.outbound.smarthost is not None:
        outbound = OutboundRunner(config.outbound, store.outbound, config.hostname,
                                  lambda user, notice: store.keep(user, "", notice), _credentials(config))
        sender = Sender(store)
        submit = _submit_pipeline(sender, outbound)
        runners += [outbound.run(), OutboxRunner(
            store.maildirs, sender, lambda: list(config.domains), directory.is_registered,
            outbound.kick, config.hostname, max_size=config.message_size_limit).run()]
    else:
        event(log, "outbound.disabled", reason="outbound.smarthost is not set")
    web = await _web(config, directory, store.maildirs, submit)
    submission = await _submission(config, directory, submit)
    return Running(inbound, handler, replay, asyncio.create_task(_run_all(*runners), name="runners"),
                   submission, web)


def _submit_pipeline(sender: Sender, outbound: OutboundRunner) -> Submit:
    async def submit(user: User, mail_from: str, rcpts: list[str], data: bytes) -> str:
        entry = await asyncio.to_thread(sender.submit, user.address, mail_from, rcpts, data)
        outbound.kick()
        return entry
    return submit


async def _submission(config: Config, directory: Directory,
                      submit: Submit | None) -> tuple[asyncio.Server, SubmissionHandler] | None:
    if config.listen.submission is None:
        return None
    assert config.tls is not None  # config validation demands it with listen.submission
    handler = SubmissionHandler(config.hostname, directory, submit, config.max_recipients, LoginThrottle())
    factory = make_server_factory(handler, config.hostname, tls_context(config.tls.cert, config.tls.key),
                                  config.message_size_limit)
    return await _listen("submission", factory, config.listen.submission), handler


async def _web(config: Config, directory: Directory, maildirs: MaildirStore,
               submit: Submit | None) -> AppRunner | None:
    """The control panel, self-service and webmail on listen.web (HTTPS when web.tls). The
    webmail reads the same Maildirs and sends through the same pipeline as submission (None:
    sending is disabled, and the compose page says so)."""
    if config.listen.web is None:
        return None
    context = tls_context(config.tls.cert, config.tls.key) if config.web.tls and config.tls else None
    return await start_web(config, directory, Admins(config), LoginThrottle(), ssl_context=context,
                           maildirs=maildirs, submit=submit)


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
