"""Routing of inbound mail against a scripted primary: every branch of the inbound rules."""

from __future__ import annotations

import json
import logging
import time

import pytest

from relay.storage.state import read_state
from tests.helpers import free_port
from tests.smtp.fakes import FakePrimary, Script, send, stored_files

pytestmark = pytest.mark.timeout(60)

MESSAGE = b"From: x@sender.test\r\nSubject: hello\r\n\r\nbody\r\n"


def maildir_and_queue(relay):
    spool = relay.config.storage.spool
    return stored_files(relay.config.storage.maildirs), sorted((spool / "replay").rglob("waiting/*"))


def body_after_our_headers(data: bytes) -> bytes:
    """Strip Return-Path, Delivered-To and our Received header (4 lines, folded)."""
    assert data.startswith(b"Return-Path: <"), data[:40]
    head, _, rest = data.partition(b"\r\nReceived: ")
    assert head.count(b"\r\n") == 1  # Return-Path and Delivered-To only
    received_end = rest.index(b"\r\n", rest.index(b"\r\n\t", rest.index(b";")) + 2) + 2
    return rest[received_end:]


def test_primary_accepts_passes_same_envelope_and_bytes(primary, make_relay):
    relay = make_relay(primary.port)
    answers, reply = send(relay.port, "x@sender.test", ["Alice@Example.com"], MESSAGE)
    assert answers == [(250, b"2.1.5 Recipient OK")]
    assert reply[0] == 250
    (got,) = primary.received
    assert got.mail_from == "x@sender.test" and got.rcpt_tos == ["Alice@Example.com"]
    assert got.content.startswith(b"Received: from sender.test ([127.0.0.1])\r\n\tby relay.test")
    assert got.content.endswith(b"\r\n" + MESSAGE)
    assert got.content.count(b"Received:") == 1
    assert maildir_and_queue(relay) == ([], [])


def test_primary_refuses_for_good_gets_same_code_and_text(make_relay):
    fake = FakePrimary(Script(rcpt_for={"nobody@example.com": "550 5.1.1 No such user here"})).start()
    try:
        relay = make_relay(fake.port)
        answers, reply = send(relay.port, "x@sender.test", ["nobody@example.com"], MESSAGE)
        assert answers == [(550, b"5.1.1 No such user here")] and reply is None
        assert maildir_and_queue(relay) == ([], [])
    finally:
        fake.stop()


# What each fault says of the primary (issue 8, point 5): only no connection, a 421, or a 4xx to
# the greeting, EHLO or MAIL is an outage; a 4xx to RCPT or DATA is about one mailbox.
@pytest.mark.parametrize("script,health", [
    (Script(greeting="421 4.3.2 primary.test Service not available"), "outage"),
    (Script(greeting="450 4.3.2 primary.test busy, try later"), "outage"),
    (Script(ehlo="451 4.3.0 primary.test EHLO later"), "outage"),
    (Script(mail="451 4.3.0 try later"), "outage"),
    (Script(mail="421 4.3.2 Service shutting down"), "outage"),
    (Script(drop_at="RCPT"), "outage"),
    (Script(drop_at="DATA"), "outage"),
    (Script(hang_at="RCPT"), "outage"),
    (Script(rcpt="451 4.3.0 Mailbox database offline"), "normal"),
    (Script(rcpt="450 4.2.1 Mailbox busy"), "normal"),
    (Script(data="452 4.2.2 Over quota for now"), "normal"),
    (Script(data="451 4.3.0 Queue file write error"), "normal"),
], ids=["greeting-421", "greeting-450", "ehlo-451", "mail-451", "mail-421", "drop-at-rcpt",
        "drop-at-data", "hang", "rcpt-451", "rcpt-450", "data-452", "data-451"])
def test_temporary_fault_keeps_mail_for_registered_user(make_relay, script, health):
    fake = FakePrimary(script).start()
    try:
        relay = make_relay(fake.port)
        answers, reply = send(relay.port, "x@sender.test", ["alice@example.com"], MESSAGE)
        assert answers[0][0] == 250 and reply[0] == 250, (answers, reply)
        assert reply[1].startswith(b"2.0.0 OK: queued as ")
        (stored,), (waiting,) = maildir_and_queue(relay)
        data = stored.read_bytes()
        assert data.startswith(b"Return-Path: <x@sender.test>\r\nDelivered-To: alice@example.com\r\n")
        assert body_after_our_headers(data) == MESSAGE
        envelope = json.loads(waiting.read_bytes())
        assert envelope["mail_from"] == "x@sender.test" and envelope["rcpt"] == "alice@example.com"
        msg = waiting.parent.parent / "msg" / waiting.name
        assert msg.stat().st_ino == stored.stat().st_ino  # the queue's own hard link
        assert data[envelope["skip"]:].startswith(b"Received: ")
        assert read_state(relay.config.storage.spool / "state", "example.com").state == health
    finally:
        fake.stop()


@pytest.mark.parametrize("script", [
    Script(rcpt="451 4.3.0 Mailbox database offline"),
    Script(data="451 4.3.0 try later"),
    Script(drop_at="DATA"),
], ids=["rcpt-451", "data-451", "drop-at-data"])
def test_temporary_fault_for_unregistered_user_stores_nothing(make_relay, script):
    fake = FakePrimary(script).start()
    try:
        relay = make_relay(fake.port)
        answers, reply = send(relay.port, "x@sender.test", ["stranger@example.com"], MESSAGE)
        final = reply or answers[0]
        assert 400 <= final[0] < 500, (answers, reply)
        assert maildir_and_queue(relay) == ([], [])
    finally:
        fake.stop()


def test_primary_down_registered_kept_unregistered_451(make_relay):
    relay = make_relay(free_port())  # nothing listens there
    answers, reply = send(relay.port, "x@sender.test", ["alice@example.com", "carol@example.com"],
                          MESSAGE)
    assert answers[0][0] == 250
    assert answers[1] == (451, b"4.4.1 Mail server for example.com not reachable, try again later")
    assert reply[0] == 250
    (stored,), (_,) = maildir_and_queue(relay)
    assert stored.parts[-4:-2] == ("example.com", "alice")


@pytest.mark.parametrize("since,until", [("2027-06-01", "2028-06-01"), ("2024-01-01", "2025-01-01")],
                         ids=["not-yet", "expired"])
def test_continuity_not_active_today_stores_nothing(make_relay, since, until):
    relay = make_relay(free_port(), since=since, until=until)
    answers, reply = send(relay.port, "x@sender.test", ["alice@example.com"], MESSAGE)
    assert answers[0][0] == 451 and reply is None
    assert maildir_and_queue(relay) == ([], [])


def test_domain_without_subscription_gets_temporary_fault(make_relay):
    relay = make_relay(free_port(), continuity=False)
    answers, _ = send(relay.port, "x@sender.test", ["alice@example.com"], MESSAGE)
    assert answers[0][0] == 451
    assert maildir_and_queue(relay) == ([], [])


def test_unknown_domain_is_never_relayed(primary, make_relay):
    relay = make_relay(primary.port)
    answers, reply = send(relay.port, "x@sender.test", ["someone@elsewhere.org", "a@example.com.evil.org"],
                          MESSAGE)
    assert [a[0] for a in answers] == [550, 550] and reply is None
    assert answers[0][1].startswith(b"5.7.1 ")
    assert primary.received == []


@pytest.mark.parametrize("address", [
    "../etc@example.com", "a/b@example.com", ".hidden@example.com", "a..b@example.com",
    "dot.@example.com", "x" * 65 + "@example.com", "a\\b@example.com", "a%b@example.com",
    "a@example..com", "a@-example.com", "a@exa_mple.com",
])
def test_unsafe_addresses_refused_before_disk(make_relay, address):
    relay = make_relay(free_port())
    answers, _ = send(relay.port, "x@sender.test", [address], MESSAGE)
    assert 500 <= answers[0][0] < 600, answers
    root = relay.config.storage.maildirs
    assert not root.exists() or [p.name for p in root.iterdir()] == []


def test_control_characters_refused(make_relay):
    import socket

    relay = make_relay(free_port())
    with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as sock:
        f = sock.makefile("rb")
        f.readline()
        for line in (b"EHLO t\r\n", b"MAIL FROM:<x@sender.test>\r\n", b"RCPT TO:<a\x01b@example.com>\r\n",
                     b"RCPT TO:<ab\x00@example.com>\r\n"):
            sock.sendall(line)
            reply = f.readline()
            while reply[3:4] == b"-":
                reply = f.readline()
            last = reply
        assert last[:1] == b"5", last
    assert not relay.config.storage.maildirs.exists() or not any(relay.config.storage.maildirs.iterdir())


def test_mixed_recipients_each_get_their_own_answer(make_relay):
    fake = FakePrimary(Script(rcpt_for={"bob@example.com": "451 4.2.0 mailbox busy",
                                        "gone@example.com": "550 5.1.1 gone"})).start()
    try:
        relay = make_relay(fake.port)
        answers, reply = send(relay.port, "x@sender.test",
                              ["alice@example.com", "bob@example.com", "gone@example.com"], MESSAGE)
        assert [a[0] for a in answers] == [250, 250, 550]
        assert reply[0] == 250
        (got,) = fake.received
        assert got.rcpt_tos == ["alice@example.com"]
        (stored,), _ = maildir_and_queue(relay)
        assert stored.parts[-3] == "bob"
    finally:
        fake.stop()


def test_split_outcome_at_data_answers_451_and_keeps_nothing(make_relay):
    """Primary takes alice's RCPT but refuses the data for good, while bob needs continuity:
    no single reply is right for both, so the sender retries everything."""
    fake = FakePrimary(Script(rcpt_for={"bob@example.com": "451 4.2.0 busy"},
                              data="554 5.6.0 content rejected")).start()
    try:
        relay = make_relay(fake.port)
        answers, reply = send(relay.port, "x@sender.test", ["alice@example.com", "bob@example.com"],
                              MESSAGE)
        assert [a[0] for a in answers] == [250, 250]
        assert reply == (451, b"4.3.0 Recipients cannot all be accepted now, try again later")
        assert maildir_and_queue(relay) == ([], [])
    finally:
        fake.stop()


def test_data_refused_for_good_passes_primary_reply(make_relay):
    fake = FakePrimary(Script(data="554 5.7.1 spam detected")).start()
    try:
        relay = make_relay(fake.port)
        _, reply = send(relay.port, "x@sender.test", ["alice@example.com"], MESSAGE)
        assert reply == (554, b"5.7.1 spam detected")
        assert maildir_and_queue(relay) == ([], [])
    finally:
        fake.stop()


def test_data_temporary_with_unregistered_recipient_keeps_nothing(make_relay):
    fake = FakePrimary(Script(data="451 4.3.0 later")).start()
    try:
        relay = make_relay(fake.port)
        _, reply = send(relay.port, "x@sender.test", ["alice@example.com", "stranger@example.com"],
                        MESSAGE)
        assert reply[0] == 451
        assert maildir_and_queue(relay) == ([], [])
    finally:
        fake.stop()


@pytest.mark.parametrize("wire,expected_primary", [
    (b"Subject: 8bit \xc3\xa9\xff\r\n\r\nbytes \x80\xfe\r\n..leading dot\r\n", None),
    (b"Subject: lf\n\nonly lf\n.dot\nend\r\n", b"Subject: lf\r\n\r\nonly lf\r\n.dot\r\nend\r\n"),
    (b"Subject: x\r\n\r\n" + b"y" * 998 + b"\r\n", None),
], ids=["8bit-and-dot", "lf-only", "long-line"])
def test_bytes_preserved(primary, make_relay, wire, expected_primary):
    """What reaches the Maildir is what reaches the primary: the bytes received, with each bare
    LF made CRLF as the data arrives (as SMTP makes it on the way)."""
    relay = make_relay(primary.port)
    content = wire.replace(b"\r\n..", b"\r\n.")  # what the sender meant, dot-unstuffed
    _, reply = send(relay.port, "x@sender.test", ["alice@example.com"], wire)
    assert reply[0] == 250
    assert body_of(primary.received[0].content) == (expected_primary or content)
    primary.script.mail = "451 4.3.0 down"
    _, reply = send(relay.port, "x@sender.test", ["alice@example.com"], wire)
    assert reply[0] == 250
    (stored,), _ = maildir_and_queue(relay)
    assert body_after_our_headers(stored.read_bytes()) == (expected_primary or content)


def body_of(content: bytes) -> bytes:
    """Content without our Received header."""
    assert content.startswith(b"Received: ")
    end = content.index(b"\r\n", content.index(b"\r\n\t", content.index(b";")) + 2) + 2
    return content[end:]


def test_oversized_message_552(primary, make_relay):
    relay = make_relay(primary.port)
    big = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 1100  # > 1 MiB limit
    _, reply = send(relay.port, "x@sender.test", ["alice@example.com"], big)
    assert reply[0] == 552
    assert primary.received == []


def test_health_changes_logged_once(make_relay, caplog):
    """outage on the first 4xx to MAIL; replaying once the primary takes mail again (the kept
    messages are then replayed); normal when nothing is left to replay."""
    caplog.set_level(logging.INFO, logger="relay")
    fake = FakePrimary(Script(mail="451 4.3.0 down")).start()
    try:
        relay = make_relay(fake.port)
        for _ in range(3):
            send(relay.port, "x@sender.test", ["alice@example.com"], MESSAGE)
        fake.script.mail = "250 2.1.0 Ok"
        for _ in range(2):
            send(relay.port, "x@sender.test", ["alice@example.com"], MESSAGE)
        state_dir = relay.config.storage.spool / "state"
        deadline = time.monotonic() + 10
        while read_state(state_dir, "example.com").state != "normal" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert read_state(state_dir, "example.com").state == "normal"
        assert len(fake.received) == 5
        messages = [r.getMessage() for r in caplog.records if r.name == "relay.health"]
        assert [m.split()[0] for m in messages] == ["health.outage", "health.replaying", "health.normal"]
    finally:
        fake.stop()


def test_several_transactions_in_one_session_reuse_primary(primary, make_relay):
    import smtplib

    relay = make_relay(primary.port)
    with smtplib.SMTP("127.0.0.1", relay.port) as client:
        for n in range(3):
            client.sendmail("x@sender.test", ["alice@example.com"], MESSAGE + str(n).encode())
        client.mail("x@sender.test")
        client.rcpt("bob@example.com")
        client.rset()
        client.sendmail("y@sender.test", ["bob@example.com"], MESSAGE)
    assert [r.rcpt_tos for r in primary.received] == [["alice@example.com"]] * 3 + [["bob@example.com"]]
    assert primary.received[3].mail_from == "y@sender.test"


def test_null_sender_accepted_and_passed_on(primary, make_relay):
    relay = make_relay(primary.port)
    _, reply = send(relay.port, "", ["alice@example.com"], MESSAGE)
    assert reply[0] == 250
    assert primary.received[0].mail_from == "<>"


def test_unexpected_error_is_451_without_internals(make_relay):
    relay = make_relay(free_port())

    def broken(user):
        raise RuntimeError("secret internals /etc/shadow")

    relay.running.handler.known = broken       # the first check a RCPT meets
    answers, _ = send(relay.port, "x@sender.test", ["alice@example.com"], MESSAGE)
    assert answers == [(451, b"4.3.0 Temporary local problem, try again later")]


def test_disk_fault_while_keeping_is_451_and_nothing_acknowledged(make_relay):
    relay = make_relay(free_port())

    def disk_full(*args):
        raise OSError(28, "No space left on device")

    relay.running.handler.keep = disk_full
    _, reply = send(relay.port, "x@sender.test", ["alice@example.com"], MESSAGE)
    assert reply == (451, b"4.3.0 Temporary local problem, try again later")


def test_status_shows_state_since_and_waiting(make_relay, capsys):
    from relay.cli import main

    relay = make_relay(free_port())
    for _ in range(3):
        send(relay.port, "x@sender.test", ["alice@example.com"], MESSAGE)
    capsys.readouterr()
    assert main(["status", "-c", str(relay.config.file)]) == 0
    header, line = capsys.readouterr().out.splitlines()
    fields = line.split()
    assert fields[0] == "example.com" and fields[1] == "outage"
    assert fields[4:8] == ["3", "0", "0", "0"]  # waiting, active, failed, held
    assert fields[8].endswith("s") and fields[9] == "active"


def test_shutdown_lets_a_message_in_hand_finish_and_get_its_reply(make_relay):
    import asyncio
    import threading

    relay = make_relay(free_port())
    real_keep = relay.running.handler.keep
    started = threading.Event()

    async def slow_keep(*args):     # the keeper's keep is a coroutine (storage/keeper.py)
        started.set()
        await asyncio.sleep(1.0)
        return await real_keep(*args)

    relay.running.handler.keep = slow_keep
    result = {}
    sender = threading.Thread(target=lambda: result.update(
        reply=send(relay.port, "x@sender.test", ["alice@example.com"], MESSAGE)[1]))
    sender.start()
    assert started.wait(10)
    asyncio.run_coroutine_threadsafe(relay.running.close(), relay.loop).result(15)
    sender.join(0.5)  # close() returned only once the reply was on its way
    assert result["reply"][0] == 250
    assert len(maildir_and_queue(relay)[0]) == 1


def test_kept_copies_are_written_by_the_keepers_process_not_the_relays(make_relay):
    """Issue 13: a kept message's file work runs in a storage process of its own
    (storage/keeper.py), not in threads sharing the event loop's interpreter lock. The
    Maildir name carries its writer's pid (`...P<pid>Q...`), the queue id too."""
    import os

    relay = make_relay(free_port())  # nothing listens there
    answers, reply = send(relay.port, "x@sender.test", ["alice@example.com"], MESSAGE)
    assert answers[0][0] == 250 and reply[0] == 250
    (stored,), (entry,) = maildir_and_queue(relay)
    keeper = relay.running.handler.keeper
    assert keeper is not None and keeper.pid not in (None, os.getpid())
    assert f"P{keeper.pid}Q" in stored.name and f".{keeper.pid}." in entry.name
    assert json.loads(entry.read_bytes())["rcpt"] == "alice@example.com"
    assert body_after_our_headers(stored.read_bytes()) == MESSAGE
