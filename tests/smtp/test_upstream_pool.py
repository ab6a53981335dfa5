"""The primary connection cache (relay/delivery/pool.py): sessions one after another share one
connection to the primary, as Postfix's scache does; an idle one is closed after IDLE; one the
primary closed meanwhile is replaced, never taken for a primary in trouble; and a connection
left in the middle of a command is never handed to another session (issue 13, pass-through)."""

from __future__ import annotations

import asyncio
import smtplib
import socket
import threading

import pytest

from relay.delivery import pool
from relay.storage.state import read_state
from tests.helpers import wait_for
from tests.smtp.fakes import FakePrimary, Script, send, stored_files

pytestmark = pytest.mark.timeout(60)

MESSAGE = b"From: x@sender.test\r\nSubject: pooled\r\n\r\nbody\r\n"


def health(relay) -> str:
    return read_state(relay.config.storage.spool / "state", "example.com").state


def test_sessions_one_after_another_share_one_primary_connection(primary, make_relay):
    relay = make_relay(primary.port)
    for _ in range(4):
        answers, reply = send(relay.port, "x@sender.test", ["alice@example.com"], MESSAGE)
        assert answers == [(250, b"2.1.5 Recipient OK")] and reply[0] == 250
    assert len(primary.received) == 4
    assert len(primary.handler.sessions) == 1       # one connection carried all four


def test_an_idle_connection_is_closed_after_the_cache_time(primary, make_relay, monkeypatch):
    monkeypatch.setattr(pool, "IDLE", 0.2)
    relay = make_relay(primary.port)
    send(relay.port, "x@sender.test", ["alice@example.com"], MESSAGE)
    wait_for(lambda: primary.handler.quits == 1, 5, "the idle connection's QUIT")
    send(relay.port, "x@sender.test", ["alice@example.com"], MESSAGE)
    assert len(primary.received) == 2 and len(primary.handler.sessions) == 2


def test_a_cached_connection_the_primary_closed_is_replaced_not_an_outage(primary, make_relay):
    """The primary's own idle timeout answers the next command with 421 and hangs up: the relay
    connects again at once, passes the message, and the domain stays normal."""
    relay = make_relay(primary.port)
    send(relay.port, "x@sender.test", ["alice@example.com"], MESSAGE)
    stale = list(primary.handler.sessions)
    primary.script.mail_for = lambda session: (
        "421 4.4.2 primary.test Error: timeout exceeded" if session in stale else None)
    answers, reply = send(relay.port, "x@sender.test", ["alice@example.com"], MESSAGE)
    assert answers == [(250, b"2.1.5 Recipient OK")] and reply[0] == 250
    assert len(primary.received) == 2 and len(primary.handler.sessions) == 2
    assert stored_files(relay.config.storage.maildirs) == [] and health(relay) == "normal"


def test_a_connection_left_in_the_middle_of_a_command_is_never_reused(make_relay):
    """A sender that hangs up while the primary is still answering its RCPT: that connection's
    answer is unread, so it is closed; the next session gets a connection of its own and
    answers in step."""
    slow = FakePrimary(Script()).start()
    answer_rcpt = slow.handler.handle_RCPT
    asked = threading.Event()

    async def slow_for_carol(server, session, envelope, address, options):
        if address.startswith("carol@"):
            asked.set()
            await asyncio.sleep(1.5)
        return await answer_rcpt(server, session, envelope, address, options)

    slow.handler.handle_RCPT = slow_for_carol
    try:
        relay = make_relay(slow.port, users=("alice@example.com", "carol@example.com"))
        with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as raw:
            file = raw.makefile("rb")
            file.readline()
            raw.sendall(b"EHLO sender.test\r\nMAIL FROM:<x@sender.test>\r\n"
                        b"RCPT TO:<carol@example.com>\r\n")
            while not file.readline().startswith(b"250 2.1.0"):   # EHLO's lines, then MAIL's
                pass
            assert asked.wait(10)        # the primary has carol's RCPT, and takes its time
        for _ in range(2):
            with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
                client.ehlo("sender.test")
                assert client.mail("x@sender.test")[0] == 250
                assert client.rcpt("alice@example.com") == (250, b"2.1.5 Recipient OK")
                assert client.data(MESSAGE)[0] == 250
        assert [r.rcpt_tos for r in slow.received] == [["alice@example.com"]] * 2
        assert len(slow.handler.sessions) == 2     # carol's, then one for both of these
        assert health(relay) == "normal"
    finally:
        slow.stop()


def test_a_connection_in_a_command_is_not_kept_and_one_cut_off_is_closed():
    """The two guards behind the test above, where aiosmtpd happens to report the hang-up only
    after the primary answered: `give` says QUIT to a connection still in a command, and a
    command cancelled half-way closes its connection."""
    from relay.config import HostPort, Primary
    from relay.delivery.client import Upstream

    slow = FakePrimary(Script()).start()
    answer_rcpt = slow.handler.handle_RCPT

    async def slow_rcpt(server, session, envelope, address, options):
        await asyncio.sleep(0.5)
        return await answer_rcpt(server, session, envelope, address, options)

    slow.handler.handle_RCPT = slow_rcpt
    primary = Primary(HostPort("127.0.0.1", slow.port), starttls="off", timeout=5)

    async def scenario() -> None:
        quits: list[object] = []
        cache = pool.UpstreamPool(lambda coro: quits.append(asyncio.ensure_future(coro)))
        busy = Upstream(primary, "relay.test")
        assert (await busy.begin("x@sender.test", [])).ok
        rcpt = asyncio.ensure_future(busy.rcpt("alice@example.com"))
        await asyncio.sleep(0.1)                 # RCPT sent, its answer not yet come
        assert busy.connected and not busy.idle
        cache.give(busy)
        assert cache.take(primary) is None and len(quits) == 1
        assert (await rcpt).ok
        await asyncio.gather(*quits)

        cut = Upstream(primary, "relay.test")
        assert (await cut.begin("x@sender.test", [])).ok
        rcpt = asyncio.ensure_future(cut.rcpt("alice@example.com"))
        await asyncio.sleep(0.1)
        rcpt.cancel()
        with pytest.raises(asyncio.CancelledError):
            await rcpt
        assert not cut.connected                 # never handed out with an answer unread

    try:
        asyncio.run(scenario())
    finally:
        slow.stop()
