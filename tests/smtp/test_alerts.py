"""Alerts over real sockets (issue 12, point 3): the whole relay in-process, a scripted primary
that goes down and comes back, a scripted smarthost that receives the admins' alerts and the
users' notices, and a webhook receiver (aiohttp on 127.0.0.1) that fails twice before it takes
one; alerts queued while the smarthost and the webhook are down survive a restart."""

from __future__ import annotations

import asyncio
import email
import email.policy
import json
import threading

import pytest
from aiohttp import web

from relay.directory import Directory
from relay.storage.queue import Queue
from tests.helpers import free_port, wait_for
from tests.smtp.fakes import FakePrimary, InProcessRelay, Script, send
from tests.smtp.helpers import files, outbound_config

pytestmark = pytest.mark.timeout(90)

ADMIN = "ops@admins.example.net"
ALTERNATE = "alice@home.example.net"
MESSAGE = b"From: bob@example.net\r\nTo: alice@example.com\r\nSubject: hello\r\n\r\nhi\r\n"


class WebhookReceiver:
    """An aiohttp server in its own thread: answers `statuses` in turn (then 200), keeps bodies."""

    def __init__(self, statuses: list[int] | None = None, port: int | None = None) -> None:
        self.statuses = list(statuses or [])
        self.port = port or free_port()
        self.requests: list[tuple[int, dict, str]] = []     # (status answered, body, content type)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.runner: web.AppRunner | None = None

    async def _hook(self, request: web.Request) -> web.Response:
        status = self.statuses.pop(0) if self.statuses else 200
        self.requests.append((status, json.loads(await request.read()), request.content_type))
        return web.Response(status=status, text="ok")

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook/s3cret", self._hook)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    def start(self) -> WebhookReceiver:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        return self

    def stop(self) -> None:
        assert self.runner is not None
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    @property
    def taken(self) -> list[dict]:
        return [body for status, body, _ in self.requests if status == 200]


def alerts_config(smarthost_port: int, webhook_port: int, domain_extra: str = "") -> str:
    return (domain_extra + outbound_config(smarthost_port)
            + f"alerts: {{to: [{ADMIN}], webhook: 'http://127.0.0.1:{webhook_port}/hook/s3cret', "
              "retry_delay: 1s, users_end_delay: 1s}\nweb: {url: 'https://relay.example.com'}\n")


def register_alice(relay) -> None:
    """alice was registered before the start (so the inbound listener knows her); now she gets
    a password (notices go only to users who can log in) and her alternate address."""
    directory = Directory(relay.config)
    directory.set_password("alice@example.com", "alice pass")
    directory.set_alternate("alice@example.com", ALTERNATE)


def mails(server, rcpt: str, words: str = "") -> list[str]:
    """The text (Subject and body) of each mail `server` took for `rcpt`, containing `words`."""
    found = []
    for got in server.received:
        if rcpt in got.rcpt_tos:
            message = email.message_from_bytes(got.content, policy=email.policy.default)
            text = f"{message['subject']}\n{message.get_content()}"
            if words in text:
                found.append(text)
    return found


def test_outage_start_and_end_alert_admins_webhook_and_the_users_alternate_never_the_primary(
        smarthost, make_relay):
    primary = FakePrimary(Script(mail="451 4.3.0 mailbox store offline")).start()
    hook = WebhookReceiver([500, 500]).start()
    try:
        relay = make_relay(primary.port, users=("alice@example.com",),
                           extra=alerts_config(smarthost.port, hook.port))
        register_alice(relay)
        send(relay.port, "bob@example.net", ["alice@example.com"], MESSAGE)
        (start,) = wait_for(lambda: mails(smarthost, ADMIN, "example.com: primary down"))
        assert "domain: example.com" in start and "mailbox store offline" in start
        (notice,) = wait_for(lambda: mails(smarthost, ALTERNATE, "kept safe"))
        assert "https://relay.example.com/mail" in notice and "usual password" in notice
        assert "offline" not in notice
        # the webhook answered 500 twice: the third try is the one it took
        (body,) = wait_for(lambda: hook.taken, what="the webhook to take the alert")
        assert [status for status, _, _ in hook.requests] == [500, 500, 200]
        assert body["event"] == "outage_start" and body["domain"] == "example.com"
        assert hook.requests[0][2] == "application/json"
        wait_for(lambda: not files(relay.config.storage.spool / "alerts" / "webhook" / "waiting"))

        primary.script.mail = "250 2.1.0 Ok"          # back: replay, then the end of it
        wait_for(lambda: mails(smarthost, ADMIN, "example.com: primary back"))
        wait_for(lambda: mails(smarthost, ALTERNATE, "back to normal"))
        (done,) = wait_for(lambda: mails(smarthost, ADMIN, "replay finished"))
        assert "1 delivered, 0 refused, 0 set aside" in done
        wait_for(lambda: [b["event"] for b in hook.taken] == ["outage_start", "outage_end",
                                                             "replay_finished"])
        # the primary got the kept message, and nothing of ours: the notices went elsewhere
        assert [(r.rcpt_tos, r.content.endswith(b"\r\n\r\nhi\r\n")) for r in primary.received] == \
            [(["alice@example.com"], True)]
        assert all(ALTERNATE not in r.rcpt_tos and b"Auto-Submitted" not in r.content
                   for r in primary.received)
    finally:
        primary.stop()
        hook.stop()


def test_notify_users_false_alerts_the_admins_only(smarthost, make_relay):
    hook = WebhookReceiver().start()
    try:
        relay = make_relay(free_port(), users=("alice@example.com",), extra=alerts_config(
            smarthost.port, hook.port, domain_extra="    notify_users: false\n"))
        register_alice(relay)
        send(relay.port, "bob@example.net", ["alice@example.com"], MESSAGE)
        wait_for(lambda: mails(smarthost, ADMIN, "example.com: primary down"))
        # the notices would have been queued with the admins' alert, before the smarthost's kick
        outbound = Queue(relay.config.storage.spool / "outbound")
        wait_for(lambda: outbound.count("waiting") + outbound.count("active") == 0)
        assert [r.rcpt_tos for r in smarthost.received] == [[ADMIN]]
    finally:
        hook.stop()


def test_an_alert_queued_while_smarthost_and_webhook_are_down_survives_a_restart(make_relay):
    smarthost_port = free_port()
    hook_port = free_port(avoid=[smarthost_port])
    relay = make_relay(free_port(), users=(), extra=alerts_config(smarthost_port, hook_port))
    spool = relay.config.storage.spool
    send(relay.port, "bob@example.net", ["alice@example.com"], b"Subject: x\r\n\r\nx\r\n")
    tried = lambda folder: [p for p in files(folder) if b'"attempts": 1' in p.read_bytes()]  # noqa: E731
    wait_for(lambda: tried(spool / "outbound" / "waiting"), what="a failed try at the smarthost")
    wait_for(lambda: tried(spool / "alerts" / "webhook" / "waiting"), what="a failed try at the webhook")
    relay.stop()
    smarthost = FakePrimary(port=smarthost_port).start()
    hook = WebhookReceiver(port=hook_port).start()
    again = InProcessRelay.from_file(relay.config.file).start()
    try:
        (start,) = wait_for(lambda: mails(smarthost, ADMIN, "example.com: primary down"))
        (body,) = wait_for(lambda: hook.taken)
        assert body["event"] == "outage_start" and body["domain"] == "example.com"
        wait_for(lambda: not files(spool / "outbound" / "waiting")
                 and not files(spool / "alerts" / "webhook" / "waiting"))
        # still the same outage after the restart: no second alert about it
        assert len(mails(smarthost, ADMIN)) == 1 and len(hook.requests) == 1
    finally:
        again.stop()
        smarthost.stop()
        hook.stop()


def test_a_replayed_entry_refused_for_good_alerts_the_admins_with_its_queue_and_domain(
        smarthost, make_relay):
    primary = FakePrimary(Script(mail="451 4.3.0 down")).start()
    hook = WebhookReceiver().start()
    try:
        relay = make_relay(primary.port, users=("alice@example.com",),
                           extra=alerts_config(smarthost.port, hook.port))
        send(relay.port, "bob@example.net", ["alice@example.com"], MESSAGE)
        wait_for(lambda: mails(smarthost, ADMIN, "example.com: primary down"))
        primary.script.rcpt = "550 5.1.1 <alice@example.com>: no such user here"
        primary.script.mail = "250 2.1.0 Ok"
        (alert,) = wait_for(lambda: mails(smarthost, ADMIN, "refused for good"))
        assert "example.com: 1 refused for good, 0 set aside in the replay queue" in alert
        assert "no such user here" in alert
        body = wait_for(lambda: [b for b in hook.taken if b["event"] == "entries_failed"])[0]
        assert (body["domain"], body["queue"], body["failed"]) == ("example.com", "replay", 1)
        (failed,) = files(relay.config.storage.spool / "replay" / "example.com" / "failed")
        assert body["ids"] == [failed.name]
    finally:
        primary.stop()
        hook.stop()
