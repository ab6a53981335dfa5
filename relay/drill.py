"""The drill (`continuity-relay drill --domain D --user U`): a rehearsal of an outage for one
test user, while the primary stays up and every other user and message is left alone.

    ready        the domain is in its normal state (a drill during an outage would mix with
                 real kept mail) and the user is registered and may log in
    keep         one generated message is kept for the user as in an outage (the same
                 `ContinuityStore.keep`: the Maildir and the replay queue); its queue entry is
                 held at once, so no runner replays it before the drill does
    imap         it is read back over IMAP through Dovecot (`readiness.imap`), as the user
    submission   a reply goes out through the relay's submission port (STARTTLS, AUTH as the
                 user) to the drill message's sender, postmaster@<hostname>, by the smarthost
    sent copy    the reply's "(CS-SENT)" copy, which serve put in the replay queue, is found
                 and held too
    replay       those two entries, and only those, are replayed to the primary

Each step is timed and passes or fails; after a failure the next steps are skipped, but the
replay step always runs for the entries the drill made, so nothing it held is left behind.
A serve that sweeps the queue between a `keep` and its hold may replay an entry first: the
drill then waits for it to leave the queue and counts that as replayed.
"""

from __future__ import annotations

import asyncio
import email.utils
import imaplib
import secrets
import smtplib
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from relay.addresses import Mailbox
from relay.app import build_store
from relay.config import Config
from relay.delivery.client import Upstream
from relay.delivery.health import NORMAL, Health
from relay.delivery.readiness import login_imap
from relay.directory import Directory
from relay.errors import EntryError, RelayError
from relay.runners.queue_runner import Verdict
from relay.runners.replay import ReplayRunner
from relay.storage.durable import Owner
from relay.storage.queue import Queue

FIND_SECONDS = 15.0       # how long the sent copy may take to appear, and serve to replay one
SMTP_TIMEOUT = 30.0
HEADER = "X-Continuity-Drill"


@dataclass
class Step:
    name: str
    passed: bool | None = None       # None: skipped
    seconds: float = 0.0
    detail: str = ""


@dataclass
class Drill:
    config: Config
    user: Mailbox
    password: str
    token: str = field(default_factory=lambda: secrets.token_hex(8))
    steps: list[Step] = field(default_factory=list)
    entries: list[str] = field(default_factory=list)     # the replay queue entries made

    @property
    def queue(self) -> Queue:
        return build_store(self.config).replay_queue(self.user.domain)

    @property
    def sender(self) -> str:
        return f"postmaster@{self.config.hostname}"

    async def step(self, name: str, work: Callable[[], Awaitable[str]]) -> bool:
        step = Step(name)
        self.steps.append(step)
        if any(s.passed is False for s in self.steps[:-1]) and name != "replay":
            step.detail = "skipped: an earlier step failed"
            return False
        started = time.monotonic()
        try:
            step.detail = await work()
            step.passed = True
        except (DrillFailed, RelayError) as exc:    # the relay's own faults (a disk) too
            step.detail, step.passed = str(exc), False
        step.seconds = time.monotonic() - started
        return bool(step.passed)


class DrillFailed(Exception):
    """A step that did not pass, with what went wrong."""


async def run(config: Config, user: Mailbox, password: str) -> list[Step]:
    drill = Drill(config, user, password)
    await drill.step("ready", lambda: _ready(drill))
    await drill.step("keep", lambda: asyncio.to_thread(_keep, drill))
    await drill.step("imap", lambda: asyncio.to_thread(_imap, drill))
    await drill.step("submission", lambda: asyncio.to_thread(_submit, drill))
    await drill.step("sent copy", lambda: asyncio.to_thread(_sent_copy, drill))
    await drill.step("replay", lambda: _replay(drill))
    return drill.steps


async def _ready(drill: Drill) -> str:
    config, user = drill.config, drill.user
    health = Health(config.storage.spool)
    state = await asyncio.to_thread(health.get, user.domain)
    if state.state != NORMAL:
        raise DrillFailed(f"{user.domain} is in {state.state}{' (planned)' if state.planned else ''}: "
                          f"drill while it is normal")
    found = await asyncio.to_thread(Directory(config).get, user)
    if found is None or not found.can_log_in:
        raise DrillFailed(f"{user} is not a registered, active user with a password")
    for needed, key in ((config.readiness.imap, "readiness.imap"),
                        (config.listen.submission, "listen.submission"),
                        (config.outbound.smarthost, "outbound.smarthost")):
        if needed is None:
            raise DrillFailed(f"{key} is not set")
    return f"{user.domain} normal, {user} may log in"


def _message(drill: Drill) -> bytes:
    return (f"From: Continuity drill <{drill.sender}>\r\nTo: <{drill.user}>\r\n"
            f"Subject: Continuity drill {drill.token}\r\nDate: {email.utils.formatdate()}\r\n"
            f"Message-ID: <drill.{drill.token}@{drill.config.hostname}>\r\n{HEADER}: {drill.token}\r\n"
            f"\r\nA rehearsal of an outage: this message was kept for you by the continuity "
            f"relay, and will be replayed to your mailbox.\r\n").encode()


def _keep(drill: Drill) -> str:
    store = build_store(drill.config)
    entry = store.keep(drill.user, drill.sender, _message(drill))
    drill.entries.append(entry)
    _hold(drill.queue, entry)
    return f"kept as {entry}"


def _hold(queue: Queue, entry: str) -> None:
    """Set the drill's entry aside, so that no runner replays it but the drill."""
    try:
        queue.hold(entry)
    except EntryError:
        pass     # serve's sweep claimed it first: the replay step waits for its outcome


def _imap(drill: Drill) -> str:
    imap = drill.config.readiness.imap
    assert imap is not None
    try:
        client = login_imap(imap.host, imap.port, str(drill.user), drill.password)
        try:
            client.select("INBOX", readonly=True)
            _, found = client.search(None, "HEADER", HEADER, drill.token)
            numbers = found[0].split() if found and found[0] else []
            if not numbers:
                raise DrillFailed(f"logged in at {imap}, but the kept message is not in INBOX")
            _, data = client.fetch(numbers[-1], "(BODY.PEEK[])")
        finally:
            client.logout()
    except (imaplib.IMAP4.error, OSError) as exc:
        raise DrillFailed(f"IMAP at {imap}: {exc}") from None
    body = next((part[1] for part in data if isinstance(part, tuple)), b"")
    if drill.token.encode() not in body:
        raise DrillFailed("the message read back is not the one kept")
    return f"read back as message {numbers[-1].decode()} of INBOX at {imap}"


def _reply(drill: Drill) -> bytes:
    return (f"From: <{drill.user}>\r\nTo: <{drill.sender}>\r\n"
            f"Subject: Re: Continuity drill {drill.token}\r\nDate: {email.utils.formatdate()}\r\n"
            f"Message-ID: <drill-reply.{drill.token}@{drill.config.hostname}>\r\n"
            f"In-Reply-To: <drill.{drill.token}@{drill.config.hostname}>\r\n{HEADER}: {drill.token}\r\n"
            f"\r\nThe drill's reply, sent through the submission port.\r\n").encode()


def _tls(config: Config) -> ssl.SSLContext:
    """Trusts exactly our own certificate (tls.cert), whoever issued it: the drill talks to
    this relay, whose address (often 127.0.0.1) is not the certificate's name."""
    context = ssl.create_default_context()
    assert config.tls is not None
    context.load_verify_locations(config.tls.cert)
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    context.check_hostname = False
    return context


def _submit(drill: Drill) -> str:
    address = drill.config.listen.submission
    assert address is not None
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(address.host, address.host)
    try:
        with smtplib.SMTP(host, address.port, timeout=SMTP_TIMEOUT) as client:
            client.ehlo(drill.config.hostname)
            client.starttls(context=_tls(drill.config))
            client.ehlo(drill.config.hostname)
            client.login(str(drill.user), drill.password)
            refused = client.sendmail(str(drill.user), [drill.sender], _reply(drill))
    except (smtplib.SMTPException, OSError) as exc:
        raise DrillFailed(f"submission at {host}:{address.port}: {exc}") from None
    if refused:
        raise DrillFailed(f"refused: {refused}")
    return f"sent to {drill.sender} through {host}:{address.port} as {drill.user}"


def _sent_copy(drill: Drill) -> str:
    queue, mark = drill.queue, f"drill-reply.{drill.token}@".encode()
    deadline = time.monotonic() + FIND_SECONDS
    while time.monotonic() < deadline:
        for entry in queue.list("waiting"):
            if entry in drill.entries or not _carries(queue, entry, str(drill.user), mark):
                continue
            drill.entries.append(entry)
            _hold(queue, entry)
            return f"queued for replay as {entry}"
        time.sleep(0.1)
    raise DrillFailed("the reply's (CS-SENT) copy did not appear in the replay queue")


def _carries(queue: Queue, entry: str, rcpt: str, mark: bytes) -> bool:
    """Is this waiting entry for `rcpt` with `mark` in its bytes? (False when it went meanwhile.)"""
    try:
        envelope, data = queue.read(entry)
    except (RelayError, OSError):
        return False
    return envelope.rcpt == rcpt and mark in data


async def _replay(drill: Drill) -> str:
    if not drill.entries:
        raise DrillFailed("nothing to replay")
    config, store = drill.config, build_store(drill.config)
    domain = config.domains[drill.user.domain]
    health = Health(config.storage.spool, Owner.named(config.storage.owner))
    runner = ReplayRunner(config.domains, config.replay, health, store.replay_queue,
                          lambda notice, rcpt: store.bounce(notice, rcpt, config.domains,
                                                            Directory(config).is_registered),
                          config.hostname)
    upstream = Upstream(domain.primary, config.hostname)
    done, problems = [], []
    try:
        for entry in drill.entries:
            problem = await _replay_one(runner, drill.queue, entry, upstream)
            (problems.append(f"{entry}: {problem}") if problem else done.append(entry))
    finally:
        await upstream.quit()
    if problems:
        raise DrillFailed("; ".join(problems))
    return f"{len(done)} entries taken by the primary ({', '.join(done)})"


async def _replay_one(runner: ReplayRunner, queue: Queue, entry: str, upstream: Upstream) -> str:
    """'' when the primary took it; else what happened."""
    if await asyncio.to_thread(queue.state_of, entry) == "hold":
        await asyncio.to_thread(queue.release, entry)
    outcome = await runner.attempt(queue, entry, upstream)
    if outcome is None:                       # serve's sweep had it: wait for its word
        deadline = time.monotonic() + FIND_SECONDS
        while (state := await asyncio.to_thread(queue.state_of, entry)) in ("waiting", "active"):
            if time.monotonic() > deadline:
                return f"still {state} (a running serve is replaying it)"
            await asyncio.sleep(0.1)
        return "" if state is None else f"now {state}"
    if outcome.verdict is Verdict.DELIVERED:
        return ""
    reply = outcome.reply
    return f"{reply.code} {reply.text}" if reply is not None else f"moved to {outcome.moved_to}"
