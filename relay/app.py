"""Wires the components together and runs them in one asyncio loop (`continuity-relay serve`)."""

from __future__ import annotations

import asyncio
import dataclasses
import fnmatch
import logging
import os
import signal
import sys
import traceback
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from aiohttp.web import AppRunner

from relay.addresses import Mailbox
from relay.admins import Admins
from relay.auth import LoginThrottle
from relay.config import Config, HostPort, changed_keys, load
from relay.delivery import planned
from relay.delivery.alerts import Alerter, webhook_queue
from relay.delivery.health import REFRESH, Health
from relay.delivery.rspamd import Rspamd
from relay.delivery.submit import Submitter
from relay.directory import Directory, User
from relay.errors import ConfigErrors, RelayError
from relay.log import event, set_level
from relay.notify import Notifier
from relay.runners.alerts import AlertRunner
from relay.runners.outbound import OutboundRunner
from relay.runners.outbox import OutboxRunner
from relay.runners.queue_runner import Notice
from relay.runners.replay import ReplayRunner, Sweep
from relay.smtp import inbound as inbound_smtp
from relay.smtp import submission as submission_smtp
from relay.smtp.inbound import ArchiveHook, InboundHandler
from relay.smtp.limits import ConnectionLimits, listener_limits, log_accept_errors, log_limits
from relay.smtp.spam import Screen
from relay.smtp.submission import SubmissionHandler, Submit
from relay.smtp.tls import ServerTLS
from relay.storage.archive import Archive, Item
from relay.storage.archive_feed import ArchiveFeed
from relay.storage.archive_index import ArchiveIndex
from relay.storage.continuity import ContinuityStore, trace_headers
from relay.storage.disk import DiskWatch
from relay.storage.durable import Owner, make_dirs
from relay.storage.incoming import Incoming, MessageFile, incoming_path
from relay.storage.keeper import Keeper
from relay.storage.maildir import MaildirStore
from relay.storage.serve_lock import ServeLock
from relay.storage.state import domain_status, summary
from relay.web import start_web
from relay.web.metrics import StatusGauges, start_metrics

# Deliveries are fsync-bound: more threads than cores lets the disk batch them.
STORAGE_THREADS = 32

# A runner that failed starts again after RESTART_DELAY, doubled for each failure in a row, at
# most RESTART_DELAY_MAX; one that ran longer than RESTART_DELAY_MAX starts the count over.
RESTART_DELAY = 1.0
RESTART_DELAY_MAX = 60.0
PURGE_INTERVAL = 86400.0

Runner = tuple[str, Callable[[], Coroutine[Any, Any, None]]]
"""A runner's name (for the log) and what starts it: called again for every restart."""


def build_store(config: Config) -> ContinuityStore:
    owner = Owner.named(config.storage.owner)
    return ContinuityStore(MaildirStore(config.storage.maildirs, owner), config.storage.spool, owner)


def recover(config: Config, store: ContinuityStore) -> None:
    """Start-up rescan of every queue: the directories are the truth."""
    queues = [(domain, store.replay_queue(domain)) for domain in config.domains]
    alerts = webhook_queue(config.storage.spool, store.owner)
    for name, queue in [*queues, ("(outbound)", store.outbound), ("(alerts)", alerts)]:
        result = queue.recover()
        if any(result.values()):
            event("queue.recovered", queue=name, **result)


@dataclass
class Running:
    """What `start` opened; `close()` shuts it down in order."""

    inbound: asyncio.Server
    handler: InboundHandler
    replay: ReplayRunner
    runners: asyncio.Task
    submission: tuple[asyncio.Server, SubmissionHandler] | None = None
    web: AppRunner | None = None
    tls: ServerTLS | None = None
    archive: tuple[ArchiveFeed, ArchiveIndex] | None = None
    config: Config | None = None         # in effect: what SIGHUP reloads compare against
    store: ContinuityStore | None = None
    directory: Directory | None = None
    limits: dict[str, ConnectionLimits] = field(default_factory=dict)
    metrics: AppRunner | None = None
    ready_status: str = ""               # the status line READY=1 carries, counted in `start`
    lock: ServeLock | None = None        # held until close() is done (storage/serve_lock.py)

    async def reload_tls(self) -> bool:
        """SIGHUP: read tls.cert and tls.key again; a new connection gets the new certificate,
        a failed reload keeps the old one (relay/smtp/tls.py)."""
        if self.tls is None:
            event("tls.reload_skipped", reason="tls is not set")
            return False
        return await asyncio.to_thread(self.tls.reload)

    async def close(self) -> None:
        """Stop accepting connections, let the messages in hand finish (see drain), then stop
        the runners (an entry in flight goes back to waiting at the next start)."""
        if self.web is not None:
            await self.web.cleanup()    # stops listening; requests in hand get a few seconds
        if self.metrics is not None:
            await self.metrics.cleanup()
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
        await asyncio.to_thread(self.replay.health.flush)
        if self.archive is not None:       # what it holds is written (and indexed) first
            writer, index = self.archive
            await asyncio.to_thread(writer.stop)
            index.close()
        if self.lock is not None:
            self.lock.release()
        if not self.runners.cancelled() and self.runners.exception() is not None:
            raise self.runners.exception()


async def _listen(name: str, factory: Callable[[], asyncio.Protocol], address: HostPort) -> asyncio.Server:
    try:
        server = await asyncio.get_running_loop().create_server(factory, address.host, address.port)
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise RelayError(f"listen.{name} {address}: {reason}") from None
    event(f"{name}.listening", address=str(address))
    return server


def _credentials(config: Config) -> tuple[str, str] | None:
    smarthost = config.outbound.smarthost
    if smarthost is None or smarthost.username is None or smarthost.password_file is None:
        return None
    try:
        return smarthost.username, smarthost.password_file.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise RelayError(f"outbound.smarthost.password_file: {exc.strerror or exc}") from None


async def _run_all(*runners: Runner) -> None:
    """Every runner, each supervised: until cancelled (shutdown), nothing ends this."""
    async with asyncio.TaskGroup() as group:
        for name, run in runners:
            group.create_task(supervise(name, run), name=f"runner-{name}")


async def supervise(name: str, run: Callable[[], Coroutine[Any, Any, None]],
                    delay: float = RESTART_DELAY, max_delay: float = RESTART_DELAY_MAX) -> None:
    """Run `run()` until cancelled. When it fails (or returns: a runner loops until cancelled)
    log `app.runner_failed` and start it again after a delay that doubles with each failure in
    a row, up to `max_delay`; the listeners and the other runners go on meanwhile: one fault
    never stops the service. An error in one entry is the runner's own business; this is for
    its loop."""
    loop = asyncio.get_running_loop()
    failures = 0
    while True:
        started = loop.time()
        try:
            await run()
            error, where = "returned", ""
        except Exception as exc:  # noqa: BLE001 - one runner's fault must not stop the service
            error, where = _describe(exc)
        if loop.time() - started > max_delay:
            failures = 0
        wait = min(max_delay, delay * 2 ** min(failures, 30))
        failures += 1
        event("app.runner_failed", logging.ERROR, runner=name, error=error, at=where,
              failures=failures, restart_in=f"{wait:g}s")
        await asyncio.sleep(wait)


def _describe(exc: BaseException) -> tuple[str, str]:
    """`Type: text` of the error inside any task-group wrapping, and the file:line it came from."""
    more = 0
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        more += len(exc.exceptions) - 1
        exc = exc.exceptions[0]
    frames = traceback.extract_tb(exc.__traceback__)
    where = f"{os.path.basename(frames[-1].filename)}:{frames[-1].lineno}" if frames else ""
    text = f"{type(exc).__name__}: {exc}" + (f" (and {more} more)" if more else "")
    return text, where


async def start(config: Config) -> Running:
    """Prepare storage, recover the queues, open the listeners and start the runners."""
    asyncio.get_running_loop().set_default_executor(
        ThreadPoolExecutor(STORAGE_THREADS, thread_name_prefix="storage"))
    owner = Owner.named(config.storage.owner)
    for root in (config.storage.maildirs, config.storage.spool):
        make_dirs(root, owner)
    lock = ServeLock(config.storage.spool, owner)    # before the rescan: active/ is ours
    if not await asyncio.to_thread(lock.take):
        raise RelayError(f"{lock.path}: held by another serve or a `replay` command; not started")
    store = build_store(config)
    await asyncio.to_thread(recover, config, store)
    incoming = Incoming(incoming_path(config.storage.spool), owner)
    # The archive's writer first: one a killed serve left running still reads its links
    # in the incoming spool (storage/archive_feed.py).
    archiving = await asyncio.to_thread(_archive_writer, config, store)
    await asyncio.to_thread(_clear_incoming, incoming)
    archive = archiving[0] if archiving else None
    directory = Directory(config)
    health = Health(config.storage.spool, owner)
    await asyncio.to_thread(health.refresh, list(config.domains))   # from memory from now on
    await asyncio.to_thread(directory.refresh)
    replay = _replay_runner(config, store, health, directory)
    health.listen(replay.kick)
    runners: list[Runner] = [("replay", replay.run),     # run once every listener is up
                             ("refresh", lambda: _refresh(config, health, directory))]
    if archiving is not None:
        runners += [("archive", lambda: _purge_daily(archiving[0].archive)),
                    ("archive-index", lambda: _follow_index(config))]
    submit = None
    outbound: OutboundRunner | None = None
    if config.outbound.smarthost is not None:
        outbound = OutboundRunner(config.outbound, store.outbound, config.hostname,
                                  _notices(config, store, directory), _credentials(config))
        submitter = Submitter(store, config.max_recipients, config.message_size_limit)
        submit = _submit_and_kick(submitter, outbound)
        runners += [("outbound", outbound.run), ("outbox", OutboxRunner(
            store.maildirs, submitter, lambda: list(config.domains), directory.is_registered,
            outbound.kick, config.hostname, store.notify, max_size=config.message_size_limit).run)]
    runners.append(("alerts", _alerts(config, store, directory, health, replay, outbound).run))
    tls = ServerTLS(config.tls.cert, config.tls.key) if config.tls else None
    throttle = LoginThrottle()   # one count of failed logins: submission, port 25 AUTH, web
    # AUTH and sending, on the submission port and (after STARTTLS) on the inbound port
    sending = SubmissionHandler(config.hostname, directory, submit, config.max_recipients,
                                throttle) if tls else None
    # kept copies are written by a process of its own (storage/keeper.py), as store.keep would
    keeper = Keeper(config.storage.maildirs, config.storage.spool, owner)
    handler = InboundHandler(config.domains, config.hostname, health, directory.is_registered,
                             keeper.keep, config.max_recipients, sending, _screen(config),
                             directory.is_known, _inbound_archive(store, archive),
                             _notices(config, store, directory), keeper=keeper)
    log_accept_errors(asyncio.get_running_loop())
    limits = listener_limits(config.limits, ["inbound", *(["submission"] if config.listen.submission
                                                          else [])])
    inbound = await _listen("inbound", inbound_smtp.make_server_factory(
        handler, config.hostname, tls, config.message_size_limit, limits["inbound"], incoming),
        config.listen.inbound)
    web = await _web(config, directory, store, submit, throttle, tls, archiving)
    submission = await _submission(config, sending, tls, limits.get("submission"), incoming)
    metrics = await _metrics(config, health)
    if submit is None:
        event("outbound.disabled", reason="outbound.smarthost is not set")
    log_limits(limits, config.limits)
    # READY's status line is counted before the runners start: their first sweep reads every
    # waiting envelope in many threads, and the count would wait for the GIL behind it.
    ready = await asyncio.to_thread(_status_line, config, store)
    return Running(inbound, handler, replay, asyncio.create_task(_run_all(*runners), name="runners"),
                   submission, web, tls, archiving, config, store, directory, limits, metrics, ready,
                   lock=lock)


def _clear_incoming(incoming: Incoming) -> None:
    """DATA a crash cut off, or spooled for an archive copy that was never made: nobody
    acknowledged any of it (storage/incoming.py)."""
    removed = incoming.clear()
    if removed:
        event("inbound.spool_cleared", files=removed)


def _archive_writer(config: Config, store: ContinuityStore) -> tuple[ArchiveFeed, ArchiveIndex] | None:
    """The archive's writer (`storage.archive`), a process of its own fed by `ArchiveFeed`,
    started, with the store's hooks set, and its search index (for searches; the follower
    process writes it); None when the archive is off."""
    if config.storage.archive is None:
        return None
    archive = Archive(config.storage.archive, config.archive.days, Owner.named(config.storage.owner))
    index = ArchiveIndex(archive)       # for searches; the follower process writes it
    writer = ArchiveFeed(archive)
    writer.start()
    store.archive = writer.add          # sent mail and notices: from worker threads
    return writer, index


def _inbound_archive(store: ContinuityStore, writer: ArchiveFeed | None) -> ArchiveHook | None:
    """Inbound mail to the archive, from the event loop: never waits (the writer's backlog
    full, it waits in a worker thread). Kept mail is a hard link to its kept file."""
    if writer is None:
        return None

    def archive(tx_id: str, sender: str, message: MessageFile, outcomes: dict[Mailbox, str],
                kept: dict[Mailbox, str]) -> None:
        first = next(iter(kept.items()), None)
        counts: dict[str, int] = {}
        for text in outcomes.values():
            counts[text] = counts.get(text, 0) + 1
        item = Item(data=message, direction="in", kind="kept" if kept else "passed", sender=sender,
                    rcpts=tuple(str(u) for u in outcomes), queue_id=tx_id,
                    outcome=", ".join(f"{t} ({n})" if len(outcomes) > 1 else t for t, n in counts.items()),
                    link_from=store.kept_file(*first) if first else None,
                    skip=len(trace_headers(first[0], sender)) if first else 0)
        if not writer.offer(item):
            asyncio.get_running_loop().run_in_executor(None, writer.add, item)
    return archive


async def _purge_daily(archive: Archive) -> None:
    """At start-up and every day after: nothing older than its `keep_until` survives (the
    index follower sees the day files shrink and drops the same records)."""
    while True:
        result = await asyncio.to_thread(archive.purge)
        if any(result.values()):
            event("archive.purged", **result)
        await asyncio.sleep(PURGE_INTERVAL)


async def _follow_index(config: Config) -> None:
    """The search index follows the archive's files in a process of its own: parsing every
    message for it (about 2 ms of CPU each) must not take the listeners' interpreter. Its
    standard input is a pipe from here, so it ends when serve does; supervised like a runner."""
    assert config.storage.archive is not None
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay.storage.archive_index", str(config.storage.archive),
        config.storage.owner or "", stdin=asyncio.subprocess.PIPE)
    try:
        code = await proc.wait()
        raise RelayError(f"the archive index follower exited with status {code}")
    finally:
        if proc.returncode is None:
            assert proc.stdin is not None
            proc.stdin.close()
            try:
                await asyncio.wait_for(proc.wait(), 5)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def _refresh(config: Config, health: Health, directory: Directory) -> None:
    """Keep the hot path's answers (health states, the passwd-file) fresh, off the loop. Planned
    outage windows open and close here too (delivery/planned.py), and a state another process
    wrote (`outage start`, the panel) is announced to health's listeners on the loop."""
    while True:
        await asyncio.sleep(REFRESH)
        await asyncio.to_thread(planned.tick, config)
        health.announce(await asyncio.to_thread(health.refresh))
        await asyncio.to_thread(directory.refresh)


def _alerts(config: Config, store: ContinuityStore, directory: Directory, health: Health,
            replay: ReplayRunner, outbound: OutboundRunner | None) -> AlertRunner:
    """The alerts runner, hooked to what it alerts about: health changes, a replay's end, and
    queue entries refused or set aside (relay/delivery/alerts.py)."""
    disk = DiskWatch([config.storage.maildirs, config.storage.spool, config.storage.archive])
    alerter = Alerter(config, store, directory, health.get,
                      {name: health.get(name) for name in config.domains}, disk)
    runner = AlertRunner(alerter, config.alerts, config.hostname,
                         outbound.kick if outbound is not None else lambda: None)
    health.listen(runner.health_changed)
    replay.finished = runner.replay_finished
    replay.trouble = alerter.entry_trouble
    if outbound is not None:
        outbound.trouble = alerter.entry_trouble
    return runner


def _screen(config: Config) -> Screen | None:
    """The spam filter on mail about to be kept (`rspamd.url`), or None: no checks."""
    if config.rspamd.url is None:
        return None
    return Screen(Rspamd(config.rspamd, config.hostname).check, config.rspamd.on_failure)


def _submit_and_kick(submitter: Submitter, outbound: OutboundRunner) -> Submit:
    """The async `Submit` every sending path calls: `Submitter.submit` in a worker thread, then
    a kick of the outbound runner."""
    async def submit(user: User, mail_from: str, rcpts: list[str], data: bytes,
                     mail_options: tuple[str, ...] = (),
                     rcpt_options: dict[str, tuple[str, ...]] | None = None) -> str:
        entry = await asyncio.to_thread(submitter.submit, user.address, mail_from, rcpts, data,
                                        mail_options, rcpt_options)
        outbound.kick()
        return entry
    return submit


async def _submission(config: Config, handler: SubmissionHandler | None, tls: ServerTLS | None,
                      limits: ConnectionLimits | None, incoming: Incoming,
                      ) -> tuple[asyncio.Server, SubmissionHandler] | None:
    if config.listen.submission is None:
        return None
    assert handler is not None and tls is not None  # config validation demands tls with it
    factory = submission_smtp.make_server_factory(handler, config.hostname, tls,
                                                  config.message_size_limit, limits, incoming)
    return await _listen("submission", factory, config.listen.submission), handler


async def _web(config: Config, directory: Directory, store: ContinuityStore,
               submit: Submit | None, throttle: LoginThrottle, tls: ServerTLS | None,
               archiving: tuple[ArchiveFeed, ArchiveIndex] | None) -> AppRunner | None:
    """The control panel, self-service and webmail on listen.web (HTTPS when web.tls, following
    SIGHUP reloads). The webmail reads the same Maildirs and sends through the same pipeline as
    submission (None: sending is disabled, and the compose page says so); the archive pages
    search the writer's own index and release into the same store (no archive: they say so)."""
    if config.listen.web is None:
        return None
    context = tls.context if config.web.tls and tls else None
    writer, index = archiving if archiving else (None, None)
    return await start_web(config, directory, Admins(config), throttle, ssl_context=context,
                           maildirs=store.maildirs, submit=submit,
                           archive=writer.archive if writer else None, index=index, store=store)


async def _metrics(config: Config, health: Health) -> AppRunner | None:
    """Prometheus' endpoint on listen.metrics: the counts, and the status model's gauges, which
    hear every health change of this process at once."""
    if config.listen.metrics is None:
        return None
    gauges = StatusGauges(config)
    health.listen(gauges.changed)
    return await start_metrics(config.listen.metrics, gauges)


def _notices(config: Config, store: ContinuityStore, directory: Directory) -> Notice:
    """Where a runner's DSN goes: `ContinuityStore.bounce` (a registered user: `notify`)."""
    return lambda notice, rcpt: store.bounce(notice, rcpt, config.domains, directory.is_registered)


def _replay_runner(config: Config, store: ContinuityStore, health: Health,
                   directory: Directory) -> ReplayRunner:
    return ReplayRunner(config.domains, config.replay, health, store.replay_queue,
                        _notices(config, store, directory), config.hostname)


def claim_spool(config: Config, domains: list[str]) -> ServeLock | None:
    """For the `replay` command: the serve lock, and `domains`' replay queues recovered (what a
    stopped serve left in active/), when no serve holds it; None, and active/ left alone, when
    one does (its entries there are in flight). The caller releases the lock when done."""
    store = build_store(config)
    lock = ServeLock(config.storage.spool, store.owner)
    if not lock.take():
        return None
    try:
        for domain in domains:
            result = store.replay_queue(domain).recover()
            if any(result.values()):
                event("queue.recovered", queue=domain, **result)
    except BaseException:
        lock.release()
        raise
    return lock


async def replay_once(config: Config, domain: str, progress: Callable[[int], None]) -> Sweep:
    """One sweep of one domain now, whatever its state (the `replay` command).

    No queue recovery here (`claim_spool` does it when no serve runs): a running `serve` may
    hold entries in active/.
    """
    store = build_store(config)
    health = Health(config.storage.spool, Owner.named(config.storage.owner))
    runner = _replay_runner(config, store, health, Directory(config))
    result = await runner.sweep(config.domains[domain], progress, force=True)
    if result.fault:
        health.primary_failed(domain, result.fault)
    elif result.total and not await asyncio.to_thread(store.replay_queue(domain).count):
        health.primary_ok(domain)
        health.replay_done(domain)
    await asyncio.to_thread(health.flush)
    return result


async def serve(config: Config) -> None:
    """Run every listener until SIGTERM or SIGINT; SIGHUP reloads (see `reload`). Under systemd
    (`Type=notify`, relay/notify.py): READY=1 once every listener is bound and the queues are
    recovered, STATUS= a one-line summary, the watchdog pinged from this loop, STOPPING=1."""
    notifier = Notifier()
    running = await start(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    changed = asyncio.Event()
    running.replay.health.listen(lambda _domain, _state: loop.call_soon_threadsafe(changed.set))
    notifier.ready(running.ready_status)
    tasks: set[asyncio.Task] = set()
    if notifier.watchdog_interval is not None:
        tasks.add(loop.create_task(supervise("watchdog", notifier.watchdog), name="watchdog"))
    if notifier.enabled:
        tasks.add(loop.create_task(supervise("status", lambda: _report_status(running, notifier, changed)),
                                   name="status"))
    reloading = asyncio.Lock()            # one reload at a time, in the order the HUPs came

    async def reload_now() -> None:
        async with reloading:
            notifier.reloading()
            await reload(running)
            notifier.reloaded()
            changed.set()
    loop.add_signal_handler(signal.SIGHUP, lambda: tasks.add(loop.create_task(reload_now())))
    stopping = loop.create_task(stop.wait())
    await asyncio.wait([stopping, running.runners], return_when=asyncio.FIRST_COMPLETED)
    notifier.stopping()
    for task in tasks:
        task.cancel()
    if running.runners.done():  # supervision itself failed (a bug): end non-zero, systemd restarts
        stopping.cancel()
        running.inbound.close()
        running.runners.result()
    await running.close()
    notifier.close()
    event("app.stopped")


# -- systemd's STATUS= ----------------------------------------------------------------------------

STATUS_INTERVAL = 5.0      # seconds between recounts of the queues for STATUS=


def status_line(running: Running) -> str:
    """The summary `systemctl status` shows (blocking: directory listings)."""
    assert running.config is not None and running.store is not None
    return _status_line(running.config, running.store)


def _status_line(config: Config, store: ContinuityStore) -> str:
    statuses = [domain_status(config, name) for name in sorted(config.domains)]
    return summary(statuses, store.outbound.count())


async def _report_status(running: Running, notifier: Notifier, changed: asyncio.Event) -> None:
    """STATUS= again when a health state changes (at once) or the counts moved (every
    STATUS_INTERVAL); the notifier sends only a line that differs from the last."""
    while True:
        try:
            await asyncio.wait_for(changed.wait(), STATUS_INTERVAL)
        except TimeoutError:
            pass
        changed.clear()
        notifier.status(await asyncio.to_thread(status_line, running))


# -- SIGHUP: the configuration, the certificate and the passwd-file again --------------------------

# What a reload changes in the running service: a configured domain's primary, subscription and
# directory (every reader looks its domain up in the one `domains` mapping on each use), the
# connection limits (for new sessions) and the log level. Every other key is wired in at
# start-up (listen addresses, storage roots, TLS file names, the web, the smarthost, replay
# settings, a domain added or removed...): a change there is logged as needing a restart and
# the old value stays in use.
LIVE_KEYS = ("domains.*.primary", "domains.*.continuity", "domains.*.ldap", "limits", "log_level")


def is_live(key: str) -> bool:
    return any(fnmatch.fnmatchcase(key, pattern) or fnmatch.fnmatchcase(key, pattern + ".*")
               for pattern in LIVE_KEYS)


async def reload(running: Running) -> bool:
    """Read the configuration file again and apply what can change live; a file with problems
    is logged (file, key, what) and the configuration in use stays. Then, either way, the TLS
    certificate and the passwd-file. True when the file was good."""
    assert running.config is not None and running.directory is not None
    try:
        new = await asyncio.to_thread(load, running.config.file)
    except ConfigErrors as exc:
        for problem in exc.problems:
            event("config.reload_failed", logging.ERROR, file=problem.file, key=problem.key,
                  error=problem.message, kept="the configuration in use")
        new = None
    if new is not None:
        _apply(running, new)
    await running.reload_tls()
    await asyncio.to_thread(running.directory.refresh)
    return new is not None


def _apply(running: Running, new: Config) -> None:
    """The live keys of `new` into the running service (see LIVE_KEYS), one log line."""
    current = running.config
    assert current is not None
    changed = changed_keys(current, new)
    restart = [key for key in changed if not is_live(key)]
    for name in current.domains.keys() & new.domains.keys():
        current.domains[name] = new.domains[name]     # the mapping every component holds
    for name, limits in listener_limits(new.limits, list(running.limits)).items():
        running.limits[name].adopt(limits)
    set_level(new.log_level)
    running.config = dataclasses.replace(current, limits=new.limits, log_level=new.log_level)
    fields: dict[str, object] = {"applied": ",".join(k for k in changed if is_live(k)) or "none"}
    if restart:
        fields["restart_needed"] = ",".join(restart)
    event("config.reloaded", logging.WARNING if restart else logging.INFO,
          file=str(current.file), **fields)
