"""Planned outages with a running relay (issue 12, point 4): the `outage` command, run as
another process would, diverts a domain: mail is kept as in an outage without asking the
primary, no probe ends it, its end (the command, --until, a window closing) replays it all,
and serve's health listeners hear of every change."""

from __future__ import annotations

import time

import pytest

from relay.cli import main
from relay.storage.state import read_state
from tests.helpers import wait_for
from tests.smtp.fakes import FakePrimary, ScriptedHandler, send

pytestmark = pytest.mark.timeout(120)

FAST = "replay: {probe_interval: 1s}\n"
DOMAIN = "example.com"


def message(n: int) -> bytes:
    return f"From: s@sender.test\r\nTo: alice@example.com\r\nSubject: n{n}\r\n\r\nbody {n}\r\n".encode()


class CountingHandler(ScriptedHandler):
    """Also counts EHLOs: a probe (connect, EHLO, QUIT) sends no MAIL."""

    ehlos = 0

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        self.ehlos += 1
        session.host_name = hostname
        return responses


@pytest.fixture
def primary():
    fake = FakePrimary()
    fake.handler = CountingHandler(fake.handler.script)
    fake.controller.handler = fake.handler
    fake.start()
    yield fake
    fake.stop()


def _loops(relay) -> list[int]:
    """Counts the relay's health lookups: the replay runner's loop makes two each round."""
    health = relay.running.replay.health
    calls = [0]
    real = health.get

    def counted(domain):
        calls[0] += 1
        return real(domain)
    health.get = counted
    return calls


def test_outage_start_keeps_mail_without_the_primary_and_end_replays_it(make_relay, primary):
    relay = make_relay(primary.port, extra=FAST)
    config = relay.config.file
    health = relay.running.replay.health
    told: list[tuple[str, object]] = []
    health.listen(lambda domain, state: told.append((domain, state)))
    assert main(["outage", "start", "--domain", DOMAIN, "--reason", "moving racks", "-c", str(config)]) == 0
    # The refresh (a worker thread) updates memory, then the loop tells the listeners: wait
    # for the telling, the later of the two.
    wait_for(lambda: told, what="serve to pick up the planned outage and tell its listeners")
    assert health.get(DOMAIN).planned
    assert [(d, s.state, s.planned, s.reason) for d, s in told] == [(DOMAIN, "outage", True, "moving racks")]

    rcpts, reply = send(relay.port, "s@sender.test", ["alice@example.com"], message(1))
    assert rcpts[0][0] == 250 and reply[0] == 250                 # kept
    rcpts, _ = send(relay.port, "s@sender.test", ["nobody@example.com"], message(2))
    assert rcpts[0][0] == 451                                     # not registered: try later
    calls = _loops(relay)
    wait_for(lambda: calls[0] >= 8, what="several rounds of the replay runner")
    assert primary.handler.ehlos == 0 and primary.received == []  # never probed, never sent to
    assert health.get(DOMAIN).planned

    assert main(["outage", "end", "--domain", DOMAIN, "-c", str(config)]) == 0
    wait_for(lambda: len(primary.received) == 1, what="the kept message replayed")
    assert primary.received[0].content.endswith(message(1))
    wait_for(lambda: read_state(relay.config.storage.spool / "state", DOMAIN).state == "normal")
    assert [s.state for _, s in told] == ["outage", "replaying", "normal"]
    audit = (config.parent / "audit.log").read_text()
    assert "action=outage_start domain=example.com until=\"outage end\" reason=\"moving racks\"" in audit
    assert "action=outage_end domain=example.com" in audit
    assert main(["outage", "end", "--domain", DOMAIN, "-c", str(config)]) == 1   # none going on


def test_until_passing_ends_it_and_replays(make_relay, primary, capsys):
    relay = make_relay(primary.port, extra=FAST)
    config = str(relay.config.file)
    assert main(["outage", "start", "--domain", DOMAIN, "--until", "2s", "-c", config]) == 0
    health = relay.running.replay.health
    wait_for(lambda: health.get(DOMAIN).planned)
    assert main(["status", "-c", config]) == 0
    assert "planned outage until" in capsys.readouterr().out
    assert main(["replay", "--domain", DOMAIN, "-c", config]) == 1      # refuses while planned
    assert "in a planned outage" in capsys.readouterr().out
    _, reply = send(relay.port, "s@sender.test", ["alice@example.com"], message(3))
    assert reply[0] == 250
    wait_for(lambda: len(primary.received) == 1, what="the replay after --until")
    wait_for(lambda: health.get(DOMAIN).state == "normal")


def test_a_config_window_opens_and_closes_by_itself(make_relay, primary):
    def utc(stamp: float) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(stamp))
    now = time.time()
    window = (f"    planned:\n      - {{start: \"{utc(now - 60)}\", end: \"{utc(now + 3)}\", "
              f"reason: window}}\n")
    relay = make_relay(primary.port, extra=window + FAST)
    health = relay.running.replay.health
    wait_for(lambda: health.get(DOMAIN).planned, what="the window to open")
    assert health.get(DOMAIN).reason == "window"
    _, reply = send(relay.port, "s@sender.test", ["alice@example.com"], message(4))
    assert reply[0] == 250 and primary.received == []
    wait_for(lambda: len(primary.received) == 1, what="the replay at the window's end")
    wait_for(lambda: health.get(DOMAIN).state == "normal")
