"""Replay of one busy mailbox over several connections: the primary still takes the user's mail
oldest first, and a failure in the middle settles each entry as its own reply says (issue 13)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading

import pytest

from relay.cli import main
from relay.config import HostPort, Primary
from relay.delivery.client import Reply, Upstream
from relay.runners.queue_runner import Verdict
from relay.runners.replay import HELD_BACK, OrderGate
from tests.helpers import free_port, wait_for
from tests.smtp.fakes import FakePrimary, Script, send
from tests.smtp.test_replay import message, number, queue

pytestmark = pytest.mark.timeout(120)

THREE = "replay: {probe_interval: 1s, concurrency: 3}\n"
COUNT = 24


def slow_every_fourth(content: bytes) -> float:
    """Without the order gate, the messages after a slow one would overtake it."""
    return 0.05 if number(content) % 4 == 0 else 0.0


@pytest.fixture(params=["one at a time", "pipelining"])
def busy(make_relay, request):
    """A relay whose primary answers 451, with COUNT messages kept for alice alone; a primary
    without PIPELINING, and one with (each transaction then goes as one group)."""
    fake = FakePrimary(Script(mail="451 4.3.0 down for maintenance"),
                       dsn=request.param == "pipelining").start()
    relay = make_relay(fake.port, users=("alice@example.com",), extra=THREE)
    for n in range(COUNT):
        assert send(relay.port, "s@sender.test", ["alice@example.com"], message(n, "alice"))[1][0] == 250
    wait_for(lambda: len(queue(relay)) == COUNT)   # a probe's trial sweep may hold one a moment
    yield fake, relay
    fake.stop()


def envelopes(relay) -> dict[int, dict]:
    """The waiting entries' envelopes, by message number."""
    found = {}
    for path in queue(relay):
        data = (path.parent.parent / "msg" / path.name).read_bytes()
        found[number(data.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n")] = json.loads(path.read_bytes())
    return found


def delivered(fake) -> list[int]:
    return [number(got.content) for got in fake.received]


def replay_command(relay) -> int:
    return main(["replay", "-c", str(relay.config.file)])


def test_one_busy_mailbox_drains_over_several_connections_oldest_first(busy):
    fake, relay = busy
    fake.handler.sessions.clear()
    fake.script.data_delay_for = slow_every_fourth
    fake.script.mail = "250 2.1.0 Ok"
    wait_for(lambda: len(fake.received) == COUNT and not queue(relay) and not queue(relay, "active"))
    assert delivered(fake) == list(range(COUNT))       # the primary's 250s came oldest first
    assert 2 <= len(fake.handler.sessions) <= 3        # several workers on the one mailbox


def test_mailbox_told_to_wait_mid_pipeline_leaves_the_rest_untried(busy):
    fake, relay = busy
    relay.stop()
    fake.script.mail = "250 2.1.0 Ok"
    fake.script.data_delay_for = lambda content: 0.2 if number(content) == 10 else 0.0
    fake.script.data_for = lambda content: "452 4.2.2 over quota" if number(content) == 10 else "250 Ok"
    assert replay_command(relay) == 1                  # something still waits
    assert delivered(fake) == list(range(10))
    assert not queue(relay, "active") and not queue(relay, "failed")
    left = envelopes(relay)
    assert sorted(left) == list(range(10, COUNT))
    assert left[10]["attempts"] == 1 and left[10]["note"] == "452 4.2.2 over quota"
    assert left[10]["extra"]["next_try"] > 0
    for n in range(11, COUNT):                         # held back before DATA: as they were
        assert left[n]["attempts"] == 0 and left[n]["note"] == "" and "next_try" not in left[n]["extra"]
    fake.script.data_for = None
    assert replay_command(relay) == 0                  # `replay` tries the waiting mailbox too
    assert delivered(fake) == list(range(COUNT))       # each once, still oldest first


def test_primary_in_trouble_mid_pipeline_stops_the_sweep_and_keeps_the_places(busy):
    fake, relay = busy
    relay.stop()
    fake.script.mail = "250 2.1.0 Ok"
    fake.script.data_delay_for = lambda content: 0.2 if number(content) == 5 else 0.0
    fake.script.data_for = lambda content: "421 4.3.0 shutting down" if number(content) == 5 else "250 Ok"
    assert replay_command(relay) == 1
    assert delivered(fake) == list(range(5))
    left = envelopes(relay)
    assert sorted(left) == list(range(5, COUNT)) and not queue(relay, "active")
    assert left[5]["attempts"] == 1 and "next_try" not in left[5]["extra"]   # its place kept
    assert all(left[n]["attempts"] == 0 for n in range(6, COUNT))
    fake.script.data_for = None
    assert replay_command(relay) == 0
    assert delivered(fake) == list(range(COUNT))


def test_refusal_mid_pipeline_fails_that_one_and_the_rest_go_on_in_order(busy):
    fake, relay = busy
    relay.stop()
    fake.script.mail = "250 2.1.0 Ok"
    fake.script.data_delay_for = lambda content: 0.2 if number(content) == 6 else 0.0
    fake.script.data_for = lambda content: "550 5.7.1 not wanted" if number(content) == 7 else "250 Ok"
    assert replay_command(relay) == 0
    assert delivered(fake) == [n for n in range(COUNT) if n != 7]
    assert len(queue(relay, "failed")) == 1 and not queue(relay) and not queue(relay, "active")


class DotWatcher:
    """A primary that shows where the relay makes a message wait: it holds its answer to
    message 1's final dot until message 2's text arrived (on another connection), or a
    deadline passed, and records what it saw in order."""

    HOLD = 1

    def __init__(self, port: int) -> None:
        self.port = port
        self.events: list[tuple[str, int]] = []
        self.committed: list[int] = []
        self._texts: dict[int, asyncio.Event] = {}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def start(self) -> DotWatcher:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._session, "127.0.0.1", self.port), self._loop).result(10)
        return self

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._server.close)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def _text(self, n: int) -> asyncio.Event:
        return self._texts.setdefault(n, asyncio.Event())

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 watcher ESMTP\r\n")
        while line := await reader.readline():
            verb = line[:4].upper()
            if verb == b"EHLO":
                writer.write(b"250-watcher\r\n250-PIPELINING\r\n250 8BITMIME\r\n")
            elif verb == b"DATA":
                writer.write(b"354 go on\r\n")
                await self._message(reader, writer)
            elif verb == b"QUIT":
                writer.write(b"221 bye\r\n")
                break
            else:                       # MAIL, RCPT, RSET
                writer.write(b"250 ok\r\n")
        writer.close()

    async def _message(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        n = None
        while (line := await reader.readline()) not in (b".\r\n", b""):
            if line.startswith(b"Message-ID: <m"):
                n = int(line[len(b"Message-ID: <m"):].split(b"@")[0])
                self.events.append(("text", n))
                self._text(n).set()
        if not line or n is None:       # abandoned before its dot: nothing committed
            return
        if n == self.HOLD:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._text(n + 1).wait(), 10)
        self.committed.append(n)
        self.events.append(("answered", n))
        writer.write(b"250 queued\r\n")


def test_the_next_message_goes_out_while_the_one_before_is_unanswered_its_dot_waits(make_relay):
    """Per mailbox only the final dot waits for the message before (the primary commits at
    the dot): message 2's text reaches the primary before message 1 is answered, and the
    primary still commits them oldest first. Before, message 2's DATA waited for that answer."""
    port = free_port()
    relay = make_relay(port, users=("alice@example.com",),
                       extra="replay: {probe_interval: 1s, concurrency: 2}\n")
    for n in range(6):
        assert send(relay.port, "s@sender.test", ["alice@example.com"], message(n, "alice"))[1][0] == 250
    wait_for(lambda: len(queue(relay)) == 6)
    relay.stop()
    watcher = DotWatcher(port).start()
    try:
        assert replay_command(relay) == 0
    finally:
        watcher.stop()
    assert watcher.committed == list(range(6))
    assert watcher.events.index(("text", 2)) < watcher.events.index(("answered", 1))


def test_the_dot_held_for_the_message_before_goes_as_that_one_is_decided(primary):
    """The dot waiting for the message before is written by the gate itself, in the loop turn
    that decided the message before, not once its own task runs again (one more turn of a
    busy loop, per mailbox one a message): with the loop blocked right after the decision,
    the primary still gets the dot and commits the message."""
    peer = Primary(HostPort("127.0.0.1", primary.port), starttls="off", timeout=5)

    async def run() -> list[Reply]:
        upstream = Upstream(peer, "relay.test")
        first = OrderGate(None)
        second = OrderGate(first)
        sending = asyncio.create_task(upstream.send_many(
            "s@sender.test", [("alice@example.com", ())], [], message(2, "alice"), second))
        while first._next is None:          # the message went, its dot waits for the first
            assert not sending.done()
            await asyncio.sleep(0.01)
        first.decided(Verdict.DELIVERED)
        wait_for(lambda: primary.received, what="the dot")   # blocking: the loop does not turn
        try:
            return await sending
        finally:
            await upstream.quit()

    (reply,) = asyncio.run(run())
    assert reply.ok and [number(r.content) for r in primary.received] == [2]


def test_a_message_held_back_sends_no_dot(primary):
    peer = Primary(HostPort("127.0.0.1", primary.port), starttls="off", timeout=5)

    async def run() -> list[Reply]:
        upstream = Upstream(peer, "relay.test")
        first = OrderGate(None)
        sending = asyncio.create_task(upstream.send_many(
            "s@sender.test", [("alice@example.com", ())], [], message(2, "alice"), OrderGate(first)))
        while first._next is None:
            await asyncio.sleep(0.01)
        first.decided(Verdict.RETRY)
        return await sending

    (reply,) = asyncio.run(run())
    assert reply.stage == HELD_BACK
    assert send(primary.port, "s@sender.test", ["bob@example.com"], message(3, "bob"))[1][0] == 250
    wait_for(lambda: primary.received)      # the held one's connection was closed well before
    assert [number(r.content) for r in primary.received] == [3]
