"""The spam filter on kept mail, against a scripted fake rspamd (aiohttp on 127.0.0.1, port 0).

Every test but the last two has the primary down, so every recipient is to be kept and the
verdict alone decides the reply. The real rspamd is in tests/integration/test_rspamd.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from dataclasses import dataclass, field

import pytest
from aiohttp import web

from tests.helpers import free_port
from tests.smtp.fakes import FakePrimary, Script, send, stored_files

pytestmark = pytest.mark.timeout(60)

MESSAGE = b"From: x@sender.test\r\nSubject: hello\r\n\r\nbody\r\n"


@dataclass
class Asked:
    headers: list[tuple[str, str]]
    body: bytes

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


@dataclass
class FakeRspamd:
    """Answers POST /checkv2 with `answer` (a JSON object), or `status`, `raw` or a hang."""

    answer: dict = field(default_factory=lambda: {"action": "no action", "score": 0.5,
                                                  "required_score": 15.0})
    status: int = 200
    raw: bytes | None = None
    hang: bool = False
    asked: list[Asked] = field(default_factory=list)

    def start(self) -> FakeRspamd:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.runner = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        return self

    async def _start(self) -> web.AppRunner:
        self.release = asyncio.Event()
        app = web.Application()
        app.router.add_post("/checkv2", self._check)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        return runner

    async def _check(self, request: web.Request) -> web.StreamResponse:
        self.asked.append(Asked(list(request.headers.items()), await request.read()))
        if self.hang:
            await self.release.wait()
        if self.raw is not None:
            return web.Response(body=self.raw, status=self.status, content_type="application/json")
        return web.json_response(self.answer, status=self.status)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.release.set)
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def rspamd():
    fake = FakeRspamd().start()
    yield fake
    fake.stop()


def settings(url: str, **more: str) -> str:
    lines = [f"  url: {url}"] + [f"  {k}: {v}" for k, v in more.items()]
    return "rspamd:\n" + "\n".join(lines) + "\n"


def kept(relay):
    spool = relay.config.storage.spool
    return stored_files(relay.config.storage.maildirs), sorted((spool / "replay").rglob("waiting/*"))


def nothing_anywhere(relay) -> bool:
    """No message in a Maildir, and no file in the spool but the health state and serve's lock
    (no replay entry, nothing in outbound/: no DSN)."""
    spool = relay.config.storage.spool
    queued = [p for p in spool.rglob("*")
              if p.is_file() and p.relative_to(spool).parts[0] not in ("state", "serve.lock")]
    return stored_files(relay.config.storage.maildirs) == [] and queued == []


def without_trace(data: bytes) -> bytes:
    """A Maildir copy without Return-Path and Delivered-To (the replay skips them too)."""
    assert data.startswith(b"Return-Path: <")
    return data.split(b"\r\n", 2)[2]


def test_reject_is_550_in_session_and_nothing_is_stored(make_relay, rspamd):
    rspamd.answer = {"action": "reject", "score": 1015.0, "required_score": 15.0,
                     "messages": {"smtp_message": "Gtube pattern"}}
    relay = make_relay(free_port(), extra=settings(rspamd.url))
    answers, reply = send(relay.port, "x@sender.test", ["alice@example.com", "bob@example.com"], MESSAGE)
    assert [a[0] for a in answers] == [250, 250]
    assert reply == (550, b"5.7.1 Message rejected as spam: Gtube pattern")
    assert nothing_anywhere(relay)
    (asked,) = rspamd.asked
    assert asked.all("From") == ["x@sender.test"]
    assert asked.all("Rcpt") == ["alice@example.com", "bob@example.com"]
    assert asked.all("IP") == ["127.0.0.1"] and asked.all("Helo") == ["sender.test"]
    assert asked.all("MTA-Name") == ["relay.test"]
    (queue_id,) = asked.all("Queue-Id")
    assert asked.body.startswith(b"Received: from sender.test ([127.0.0.1])")
    assert f"id {queue_id};".encode() in asked.body and asked.body.endswith(b"\r\n" + MESSAGE)


@pytest.mark.parametrize("action", ["soft reject", "greylist"])
def test_soft_reject_and_greylist_are_451_and_nothing_is_stored(make_relay, rspamd, action):
    rspamd.answer = {"action": action, "score": 4.0, "required_score": 15.0}
    relay = make_relay(free_port(), extra=settings(rspamd.url))
    _, reply = send(relay.port, "x@sender.test", ["alice@example.com"], MESSAGE)
    assert reply == (451, b"4.7.1 Message deferred by the spam filter, try again later")
    assert nothing_anywhere(relay)


@pytest.mark.parametrize("action", ["add header", "rewrite subject"])
def test_add_header_keeps_with_spam_headers_on_top_bytes_otherwise_identical(make_relay, rspamd, action):
    rspamd.answer = {"action": action, "score": 7.5, "required_score": 15.0, "subject": "***SPAM***"}
    relay = make_relay(free_port(), extra=settings(rspamd.url))
    _, reply = send(relay.port, "x@sender.test", ["alice@example.com"], MESSAGE)
    assert reply[0] == 250
    (stored,), (waiting,) = kept(relay)
    (asked,) = rspamd.asked
    assert without_trace(stored.read_bytes()) == b"X-Spam: Yes\r\nX-Spam-Score: 7.50 / 15.00\r\n" + asked.body
    envelope = json.loads(waiting.read_bytes())
    assert stored.read_bytes()[envelope["skip"]:].startswith(b"X-Spam: Yes\r\n")  # replayed marked


def test_no_action_keeps_the_message_as_it_is(make_relay, rspamd):
    relay = make_relay(free_port(), extra=settings(rspamd.url))
    _, reply = send(relay.port, "x@sender.test", ["alice@example.com"], MESSAGE)
    assert reply[0] == 250
    (stored,), _ = kept(relay)
    (asked,) = rspamd.asked
    assert without_trace(stored.read_bytes()) == asked.body
    assert asked.body.endswith(b"\r\n" + MESSAGE) and b"X-Spam" not in stored.read_bytes()


@pytest.mark.parametrize("smtp_message", ["two\r\n250 2.0.0 lines", "caf\u00e9", "x" * 201, ["no"]],
                         ids=["line-break", "non-ascii", "too-long", "not-text"])
def test_unsafe_rspamd_message_is_not_passed_on(make_relay, rspamd, smtp_message):
    rspamd.answer = {"action": "reject", "score": 20.0, "required_score": 15.0,
                     "messages": {"smtp_message": smtp_message}}
    relay = make_relay(free_port(), extra=settings(rspamd.url))
    _, reply = send(relay.port, "x@sender.test", ["alice@example.com"], MESSAGE)
    assert reply == (550, b"5.7.1 Message rejected as spam")


def test_soft_reject_with_message(make_relay, rspamd):
    rspamd.answer = {"action": "soft reject", "messages": {"smtp_message": "Ratelimit exceeded"}}
    relay = make_relay(free_port(), extra=settings(rspamd.url))
    _, reply = send(relay.port, "x@sender.test", ["alice@example.com"], MESSAGE)
    assert reply == (451, b"4.7.1 Message deferred by the spam filter (Ratelimit exceeded), try again later")


@pytest.mark.parametrize("fault", ["timeout", "refused", "http-500", "not-json", "unknown-action",
                                   "too-big"])
def test_rspamd_unavailable_keeps_unchecked_and_logs(make_relay, rspamd, fault, caplog):
    url = rspamd.url
    if fault == "timeout":
        rspamd.hang = True
    elif fault == "refused":
        url = f"http://127.0.0.1:{free_port()}"
    elif fault == "http-500":
        rspamd.status = 500
    elif fault == "not-json":
        rspamd.raw = b"<html>"
    elif fault == "unknown-action":
        rspamd.answer = {"action": "launch missiles"}
    elif fault == "too-big":
        rspamd.raw = b'{"action": "reject", "pad": "' + b"x" * (1024 * 1024) + b'"}'
    relay = make_relay(free_port(), extra=settings(url, timeout="1s"))
    with caplog.at_level(logging.WARNING, logger="relay.rspamd"):
        _, reply = send(relay.port, "x@sender.test", ["alice@example.com"], MESSAGE)
    assert reply[0] == 250
    (stored,), (_,) = kept(relay)
    assert b"X-Spam" not in stored.read_bytes()
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("rspamd.unavailable")]
    assert "reason=" in line


def test_on_failure_defer_is_451_and_nothing_is_stored(make_relay):
    relay = make_relay(free_port(), extra=settings(f"http://127.0.0.1:{free_port()}", on_failure="defer"))
    _, reply = send(relay.port, "x@sender.test", ["alice@example.com"], MESSAGE)
    assert reply == (451, b"4.3.0 Spam filter unavailable, try again later")
    assert nothing_anywhere(relay)


def test_mail_the_primary_takes_is_not_checked(primary, make_relay, rspamd):
    relay = make_relay(primary.port, extra=settings(rspamd.url))
    _, reply = send(relay.port, "x@sender.test", ["alice@example.com"], MESSAGE)
    assert reply[0] == 250 and len(primary.received) == 1
    assert rspamd.asked == []


@pytest.mark.parametrize("action", ["reject", "soft reject"])
def test_refusal_after_the_primary_took_a_copy_keeps_marked_and_answers_250(make_relay, rspamd, action):
    """alice's copy went to the primary at DATA; bob's is to be kept. A 550 would tell the
    sender nobody got it, a 451 would bring alice a duplicate at every retry: 250, and bob's
    copy is kept marked."""
    rspamd.answer = {"action": action, "score": 20.0, "required_score": 15.0}
    fake = FakePrimary(Script(rcpt_for={"bob@example.com": "451 4.2.0 mailbox busy"})).start()
    try:
        relay = make_relay(fake.port, extra=settings(rspamd.url))
        _, reply = send(relay.port, "x@sender.test", ["alice@example.com", "bob@example.com"], MESSAGE)
        assert reply[0] == 250
        (got,) = fake.received
        assert got.rcpt_tos == ["alice@example.com"] and b"X-Spam" not in got.content
        (asked,) = rspamd.asked
        assert asked.all("Rcpt") == ["bob@example.com"]
        (stored,), _ = kept(relay)
        assert stored.parts[-3] == "bob"
        marks = b"X-Spam: Yes\r\nX-Spam-Score: 20.00 / 15.00\r\n"
        assert without_trace(stored.read_bytes()) == marks + got.content
    finally:
        fake.stop()


def test_defer_after_the_primary_took_a_copy_keeps_unchecked(make_relay):
    fake = FakePrimary(Script(rcpt_for={"bob@example.com": "451 4.2.0 mailbox busy"})).start()
    try:
        relay = make_relay(fake.port, extra=settings(f"http://127.0.0.1:{free_port()}", on_failure="defer"))
        _, reply = send(relay.port, "x@sender.test", ["alice@example.com", "bob@example.com"], MESSAGE)
        assert reply[0] == 250
        (stored,), _ = kept(relay)
        assert without_trace(stored.read_bytes()) == fake.received[0].content
    finally:
        fake.stop()


def test_a_long_answer_is_read_whole(make_relay, rspamd):
    """Rspamd's answers list every symbol: a few hundred KiB arrive in many chunks."""
    symbols = {f"SYMBOL_{i}": {"name": f"SYMBOL_{i}", "score": 0.0, "description": "x" * 200}
               for i in range(1000)}
    rspamd.answer = {"action": "reject", "score": 30.0, "required_score": 15.0, "symbols": symbols}
    relay = make_relay(free_port(), extra=settings(rspamd.url))
    _, reply = send(relay.port, "x@sender.test", ["alice@example.com"], MESSAGE)
    assert reply == (550, b"5.7.1 Message rejected as spam")
