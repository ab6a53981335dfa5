"""Replay: what was kept during an outage goes back to the recovered primary (issue 3)."""

from __future__ import annotations

import email
import threading

import pytest

from relay.addresses import parse_mailbox
from relay.app import build_store
from relay.cli import main
from relay.config import load
from relay.storage.queue import Queue
from relay.storage.state import read_state
from tests.helpers import wait_for
from tests.smtp.fakes import FakePrimary, Script, send, stored_files

pytestmark = pytest.mark.timeout(120)

FAST = "replay: {probe_interval: 1s, concurrency: 3}\n"


def message(n: int, user: str) -> bytes:
    return (f"From: s@sender.test\r\nTo: {user}\r\nMessage-ID: <m{n}@sender.test>\r\n"
            f"Subject: number {n}\r\n\r\nbody {n}\r\n").encode()


def queue(relay, state: str = "waiting") -> list:
    return sorted((relay.config.storage.spool / "replay" / "example.com" / state).glob("*"))


def number(content: bytes) -> int:
    return int(email.message_from_bytes(content)["Message-ID"][2:].split("@")[0])


@pytest.fixture
def outage(make_relay):
    """A relay whose primary answers 451, with messages kept for alice, bob and carol."""
    fake = FakePrimary(Script(mail="451 4.3.0 down for maintenance")).start()
    relay = make_relay(fake.port, users=("alice@example.com", "bob@example.com", "carol@example.com"),
                       extra=FAST)
    sent: dict[int, tuple[str, bytes]] = {}
    for n in range(30):
        user = ("alice", "bob", "carol")[n % 3] + "@example.com"
        sent[n] = (user, message(n, user))
        _, reply = send(relay.port, "s@sender.test", [user], sent[n][1])
        assert reply[0] == 250
    assert len(queue(relay)) + len(queue(relay, "active")) == 30  # a probe may hold one
    yield fake, relay, sent
    fake.stop()


def test_recovered_primary_gets_everything_in_order_with_original_bytes(outage):
    fake, relay, sent = outage
    fake.handler.sessions.clear()
    fake.script.mail = "250 2.1.0 Ok"
    wait_for(lambda: len(fake.received) == 30 and not queue(relay))
    by_user: dict[str, list[int]] = {}
    for got in fake.received:
        n = number(got.content)
        user, original = sent[n]
        assert got.mail_from == "s@sender.test" and got.rcpt_tos == [user]
        assert got.content.startswith(b"Received: from sender.test")  # ours; no Return-Path
        assert got.content.endswith(b"\r\n" + original) and got.content.count(b"Received:") == 1
        by_user.setdefault(user, []).append(n)
    assert all(ns == sorted(ns) for ns in by_user.values())  # per user, oldest first
    assert len(stored_files(relay.config.storage.maildirs)) == 30  # Maildir copies stay
    wait_for(lambda: read_state(relay.config.storage.spool / "state", "example.com").state == "normal")
    assert len(fake.handler.sessions) <= 3  # connections reused: one per worker


def test_flapping_primary_loses_nothing_and_keeps_order(outage):
    fake, relay, sent = outage
    flips = iter(range(10**6))
    fake.script.mail = "250 2.1.0 Ok"
    fake.script.data_for = lambda content: "451 4.3.0 flap" if next(flips) % 3 == 1 else "250 2.0.0 Ok"
    wait_for(lambda: not queue(relay) and not queue(relay, "active"), 60)
    numbers = [number(g.content) for g in fake.received]
    assert sorted(numbers) == list(range(30))  # each exactly once: a 451 is not a delivery
    for user in ("alice", "bob", "carol"):
        mine = [n for n in numbers if sent[n][0].startswith(user)]
        assert mine == sorted(mine)


def test_permanent_refusal_notifies_sender_and_the_rest_go_on(outage):
    fake, relay, _ = outage
    fake.script.mail = "250 2.1.0 Ok"
    fake.script.data_for = (lambda c: "550 5.7.1 Message 7 is not wanted" if b"<m7@" in c
                            else "250 2.0.0 Ok")
    wait_for(lambda: not queue(relay) and len(fake.received) == 29 and queue(relay, "failed"))
    (failed,) = queue(relay, "failed")
    assert b"550 5.7.1 Message 7 is not wanted" in failed.read_bytes()
    (notice,) = (relay.config.storage.spool / "outbound" / "waiting").glob("*")
    assert b'"rcpt": "s@sender.test"' in notice.read_bytes() and b'"mail_from": ""' in notice.read_bytes()
    dsn = (notice.parent.parent / "msg" / notice.name).read_bytes()
    report = email.message_from_bytes(dsn)
    assert report.get_content_type() == "multipart/report"
    assert b"Diagnostic-Code: smtp; 550 5.7.1 Message 7 is not wanted" in dsn
    assert b"Message-ID: <m7@sender.test>" in dsn and b"body 7" not in dsn


def test_status_counts_failed_entries(outage, capsys):
    fake, relay, _ = outage
    fake.script.mail = "250 2.1.0 Ok"
    fake.script.data_for = lambda c: "554 5.6.0 no" if b"<m3@" in c or b"<m4@" in c else "250 Ok"
    wait_for(lambda: not queue(relay) and len(queue(relay, "failed")) == 2)
    wait_for(lambda: read_state(relay.config.storage.spool / "state", "example.com").state == "normal")
    capsys.readouterr()
    assert main(["status", "-c", str(relay.config.file)]) == 0
    fields = capsys.readouterr().out.splitlines()[1].split()
    assert fields[1] == "normal" and fields[4:8] == ["0", "0", "2", "0"]


def test_refused_message_from_null_sender_and_local_sender(make_relay):
    fake = FakePrimary(Script(mail="451 4.3.0 down")).start()
    try:
        relay = make_relay(fake.port, extra=FAST)
        assert send(relay.port, "", ["alice@example.com"], message(1, "alice"))[1][0] == 250
        assert send(relay.port, "bob@example.com", ["alice@example.com"], message(2, "alice"))[1][0] == 250
        fake.script.mail = "250 2.1.0 Ok"
        fake.script.data_for = (lambda c: "550 5.1.1 refused" if b"multipart/report" not in c
                                else "250 2.0.0 Ok")
        # The notice to bob (one of ours) takes the notice route: his continuity INBOX now,
        # and his mailbox on the primary through the replay queue.
        wait_for(lambda: len(fake.received) == 1 and not queue(relay) and len(queue(relay, "failed")) == 2)
        (got,) = fake.received
        assert got.mail_from == "<>" and got.rcpt_tos == ["bob@example.com"]
        (kept,) = stored_files(relay.config.storage.maildirs / "example.com" / "bob")
        notice = email.message_from_bytes(kept.read_bytes())
        assert notice["Return-Path"] == "<>" and notice.get_content_type() == "multipart/report"
        assert notice["Message-ID"] == email.message_from_bytes(got.content)["Message-ID"]
        assert not (relay.config.storage.spool / "outbound" / "waiting").exists() or \
            not list((relay.config.storage.spool / "outbound" / "waiting").iterdir())
    finally:
        fake.stop()


def test_primary_that_greets_but_refuses_stays_in_outage_quietly(outage, caplog):
    import logging

    fake, relay, _ = outage
    caplog.set_level(logging.INFO, logger="relay")
    # Three probes: each greets, and the sweep it starts gets 451 to its first MAIL. The fourth
    # probe comes only after the third sweep's answer was taken (one loop per domain).
    probes, mails = fake.handler.probes, len(fake.handler.behind_mail)
    wait_for(lambda: fake.handler.probes >= probes + 4, what="four more probes")
    assert len(fake.handler.behind_mail) >= mails + 3 and not fake.received
    assert read_state(relay.config.storage.spool / "state", "example.com").state == "outage"
    assert [r for r in caplog.records if r.name == "relay.health"] == []
    fake.script.mail = "250 2.1.0 Ok"
    wait_for(lambda: not queue(relay) and len(fake.received) == 30)
    wait_for(lambda: len([r for r in caplog.records if r.name == "relay.health"]) == 2)
    changes = [r.getMessage().split()[0] for r in caplog.records if r.name == "relay.health"]
    assert changes == ["health.replaying", "health.normal"]


def test_inbound_success_starts_replay_without_waiting_for_a_probe(make_relay):
    fake = FakePrimary(Script(mail="451 4.3.0 down")).start()
    try:
        relay = make_relay(fake.port, extra="replay: {probe_interval: 1h}\n")
        for n in range(3):
            send(relay.port, "s@sender.test", ["alice@example.com"], message(n, "alice"))
        fake.script.mail = "250 2.1.0 Ok"
        send(relay.port, "s@sender.test", ["alice@example.com"], message(9, "alice"))
        wait_for(lambda: len(fake.received) == 4 and not queue(relay), 10)
    finally:
        fake.stop()


def test_replay_command_sweeps_once_with_summary(outage, capsys):
    fake, relay, _ = outage
    relay.stop()
    # A probe's sweep cut off by the stop may leave its entry in active/: with no serve holding
    # the spool's lock, the command recovers it itself.
    config = relay.config.file
    assert main(["replay", "--dry-run", "-c", str(config)]) == 0
    assert capsys.readouterr().out.startswith("example.com: 30 waiting for 3 user(s), oldest ")
    assert main(["replay", "-c", str(config)]) == 1  # the primary still says 451
    assert "0 delivered" in capsys.readouterr().out and len(queue(relay)) == 30
    fake.script.mail = "250 2.1.0 Ok"
    assert main(["replay", "--domain", "example.com", "-c", str(config)]) == 0
    out = capsys.readouterr()
    assert out.out.strip() == "example.com: 30 delivered, 0 refused (sender notified), 0 set aside, " \
                              "0 still waiting"
    assert "30/30" in out.err  # the progress bar
    assert len(fake.received) == 30
    assert read_state(relay.config.storage.spool / "state", "example.com").state == "normal"
    assert main(["replay", "--domain", "nope.example", "-c", str(config)]) == 2


@pytest.mark.parametrize("fault", [
    {"greeting": "421 4.3.2 primary.test Service not available"},
    {"greeting": "450 4.3.2 primary.test too busy"},
    {"ehlo": "451 4.3.0 primary.test EHLO later"},
    {"mail": "452 4.3.1 Insufficient system storage"},
], ids=["greeting-421", "greeting-450", "ehlo-451", "mail-452"])
def test_a_primary_in_trouble_stops_the_sweep_and_the_domain_stays_in_outage(outage, capsys, fault):
    """Issue 8, point 5: a 4xx to the greeting, EHLO or MAIL is the primary in trouble, not one
    mailbox: the sweep stops at the first, nothing is told to wait, and the domain is in outage."""
    fake, relay, _ = outage
    relay.stop()
    Queue(relay.config.storage.spool / "replay" / "example.com").recover()   # as above
    fake.script.mail = "250 2.1.0 Ok"
    for key, value in fault.items():
        setattr(fake.script, key, value)
    config = str(relay.config.file)
    assert main(["replay", "-c", config]) == 1
    out = capsys.readouterr().out
    assert "0 delivered" in out and "30 still waiting" in out, out
    assert len(queue(relay)) == 30 and fake.received == []
    held = [e for e in map(load_envelope, queue(relay)) if e.get("extra", {}).get("next_try")]
    assert held == []          # no mailbox was told to wait: the primary was
    assert read_state(relay.config.storage.spool / "state", "example.com").state == "outage"
    for key in fault:
        setattr(fake.script, key, None if key != "mail" else "250 2.1.0 Ok")
    assert main(["replay", "-c", config]) == 0 and len(fake.received) == 30


def load_envelope(path) -> dict:
    import json

    return json.loads(path.read_bytes())


def test_a_few_thousand_messages_byte_for_byte(primary, make_relay):
    """Filled through the same code the listener uses, then drained to a real SMTP server."""
    relay = make_relay(primary.port, extra="replay: {probe_interval: 1h, concurrency: 4}\n")
    relay.stop()
    config = load(relay.config.file)
    store = build_store(config)
    originals = {}

    def fill(worker: int) -> None:
        for n in range(worker, 2000, 4):
            body = message(n, "x") + bytes(range(128, 256)) + b"\r\n" + b"." * (n % 7) + b"\r\n"
            originals[n] = body
            store.keep(parse_mailbox(f"user{n % 50}@example.com"), "s@sender.test", body,
                       ("BODY=8BITMIME",))

    threads = [threading.Thread(target=fill, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert main(["replay", "-c", str(relay.config.file)]) == 0
    assert len(primary.received) == 2000
    for got in primary.received:
        assert got.content == originals[number(got.content)]


def test_entry_that_crashes_the_runner_three_times_is_set_aside(outage, capsys):
    fake, relay, _ = outage
    runner = relay.running.replay
    real_deliver = runner.deliver

    async def deliver_or_crash(envelope, data, upstream):
        if b"<m5@" in data:
            raise RuntimeError("a bug met by this one message")
        return await real_deliver(envelope, data, upstream)

    runner.deliver = deliver_or_crash
    fake.script.mail = "250 2.1.0 Ok"
    wait_for(lambda: not queue(relay) and not queue(relay, "active") and len(fake.received) == 29)
    (held,) = queue(relay, "hold")
    assert b'"crashes": 3' in held.read_bytes()
    capsys.readouterr()
    assert main(["status", "-c", str(relay.config.file)]) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[4:8] == ["0", "0", "0", "1"]


def test_new_inbound_mail_goes_straight_to_the_primary_during_replay(outage):
    fake, relay, _ = outage
    gate = threading.Event()

    def slow(content: bytes) -> str:
        gate.wait(0.2)
        return "250 2.0.0 Ok"

    fake.script.mail = "250 2.1.0 Ok"
    fake.script.data_for = slow
    wait_for(lambda: read_state(relay.config.storage.spool / "state", "example.com").state == "replaying")
    _, reply = send(relay.port, "s@sender.test", ["alice@example.com"], message(99, "alice"))
    assert reply[1].startswith(b"2.0.0 OK: delivered as ")
    assert len(queue(relay)) + len(queue(relay, "active")) < 30
    gate.set()
    wait_for(lambda: len(fake.received) == 31 and not queue(relay))


def test_rate_limit_spaces_starts(monkeypatch):
    import asyncio

    from relay.runners.replay import RateLimit

    clock = [100.0]
    slept: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        slept.append(seconds)
        clock[0] += seconds

    monkeypatch.setattr("relay.runners.replay.time.monotonic", lambda: clock[0])
    monkeypatch.setattr("relay.runners.replay.asyncio.sleep", fake_sleep)
    limit = RateLimit(4.0)

    async def starts() -> None:
        for _ in range(5):
            await limit.wait()

    asyncio.run(starts())
    assert slept == [0.25, 0.25, 0.25, 0.25]
    assert RateLimit(None).interval == 0


def test_a_sweep_stopped_by_4xx_waits_a_probe_interval(outage, caplog):
    """Found by the replay crash test: the change to outage woke the runner's own wait, so a
    primary refusing some messages was hit again at once, over and over."""
    import logging

    fake, relay, _ = outage
    caplog.set_level(logging.INFO, logger="relay.health")
    flips = iter(range(10**6))
    fake.script.mail = "250 2.1.0 Ok"
    fake.script.data_for = lambda content: "421 4.3.0 flap" if next(flips) % 2 else "250 2.0.0 Ok"
    wait_for(lambda: not queue(relay) and not queue(relay, "active"), 90)
    changes = [(r.getMessage().split()[0], r.created) for r in caplog.records
               if r.name == "relay.health"]
    gaps = [later[1] - earlier[1] for earlier, later in zip(changes, changes[1:], strict=False)
            if earlier[0] == "health.outage" and later[0] == "health.replaying"]
    assert gaps and min(gaps) >= 0.9  # probe_interval is 1s
