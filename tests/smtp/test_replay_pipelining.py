"""A whole transaction as one group (RFC 2920) to a server that offers PIPELINING: replay (and
the smarthost) write MAIL, the RCPTs and DATA at once, then the message after the 354
(relay/delivery/client.py, `Upstream._send_grouped`). Each reply still means what it means one
command at a time: the same Replies, at the same stages, from a primary with PIPELINING and
from one without, and the connection stays in step for the next transaction (issue 13)."""

from __future__ import annotations

import asyncio

import pytest

from relay.cli import main
from relay.config import HostPort, Primary
from relay.delivery.client import Reply, Upstream
from tests.helpers import wait_for
from tests.smtp.fakes import FakePrimary, Script, send
from tests.smtp.test_replay import message, queue

pytestmark = pytest.mark.timeout(60)

MESSAGE = b"From: x@sender.test\r\nSubject: grouped\r\n\r\nbody\r\n"
USERS = ("alice@example.com", "bob@example.com")


def transactions(server: FakePrimary, *steps) -> list[list[Reply]]:
    """Run `steps` (each (change to the script or None, recipients)) over one Upstream, one
    transaction each; every transaction's Replies."""
    primary = Primary(HostPort("127.0.0.1", server.port), starttls="off", timeout=5)

    async def run() -> list[list[Reply]]:
        upstream = Upstream(primary, "relay.test")
        answers = []
        try:
            for change, rcpts in steps:
                if change is not None:
                    change(server.script)
                answers.append(await upstream.send_many("x@sender.test", [(r, ()) for r in rcpts],
                                                        [], MESSAGE))
        finally:
            await upstream.quit()
        return answers

    return asyncio.run(run())


def codes(replies: list[Reply]) -> list[tuple[int, str]]:
    return [(r.code, r.stage) for r in replies]


def test_replay_writes_mail_rcpt_and_data_to_a_pipelining_primary_at_once(make_relay):
    fake = FakePrimary(Script(mail="451 4.3.0 down for maintenance"), dsn=True).start()
    try:
        relay = make_relay(fake.port, users=USERS)
        for n in range(6):
            user = USERS[n % 2]
            assert send(relay.port, "s@sender.test", [user], message(n, user))[1][0] == 250
        wait_for(lambda: len(queue(relay)) == 6)
        relay.stop()
        fake.handler.behind_mail.clear()
        fake.script.mail = "250 2.1.0 Ok"
        assert main(["replay", "-c", str(relay.config.file)]) == 0
        assert len(fake.received) == 6
        behind = fake.handler.behind_mail
        assert len(behind) == 6 and all(b.startswith(b"RCPT TO:<") and b.endswith(b"\r\nDATA\r\n")
                                        and b.count(b"\r\n") == 2 for b in behind)
    finally:
        fake.stop()


def test_without_pipelining_each_command_goes_alone(primary):
    assert codes(transactions(primary, (None, ["alice@example.com"]))[0]) == [(250, "DATA")]
    assert primary.handler.behind_mail == [b""]


def test_a_refused_mail_answers_every_recipient_and_the_next_transaction_goes(any_primary):
    first, second = transactions(
        any_primary,
        (lambda s: setattr(s, "mail", "451 4.3.0 try later"), ["alice@example.com", "bob@example.com"]),
        (lambda s: setattr(s, "mail", "250 2.1.0 Ok"), ["alice@example.com"]))
    assert codes(first) == [(451, "MAIL"), (451, "MAIL")] and first[0].reached
    assert first[0].server_trouble                  # as one at a time: the primary in trouble
    assert codes(second) == [(250, "DATA")]
    assert [r.rcpt_tos for r in any_primary.received] == [["alice@example.com"]]
    assert len(any_primary.handler.sessions) <= 1   # one connection all along


def test_a_permanent_refusal_of_mail_is_permanent(any_primary):
    any_primary.script.mail = "550 5.7.1 no"
    (only,) = transactions(any_primary, (None, ["alice@example.com"]))
    assert codes(only) == [(550, "MAIL")] and only[0].permanent and not any_primary.received


def test_each_recipient_gets_its_own_rcpt_reply_and_the_accepted_ones_data(any_primary):
    any_primary.script.rcpt_for = {"bob@example.com": "452 4.2.2 over quota",
                                   "carol@example.com": "550 5.1.1 no such user"}
    (only,) = transactions(any_primary, (None, ["alice@example.com", "bob@example.com",
                                                "carol@example.com", "dave@example.com"]))
    assert codes(only) == [(250, "DATA"), (452, "RCPT"), (550, "RCPT"), (250, "DATA")]
    assert not only[1].server_trouble               # one mailbox waits, not the primary
    assert [r.rcpt_tos for r in any_primary.received] == [["alice@example.com", "dave@example.com"]]


def test_every_recipient_refused_then_the_next_transaction_starts_clean(any_primary):
    first, second = transactions(
        any_primary,
        (lambda s: setattr(s, "rcpt", "550 5.1.1 no such user"), ["alice@example.com"]),
        (lambda s: setattr(s, "rcpt", "250 2.1.5 Ok"), ["bob@example.com"]))
    assert codes(first) == [(550, "RCPT")]
    assert codes(second) == [(250, "DATA")]
    (got,) = any_primary.received
    assert got.rcpt_tos == ["bob@example.com"] and got.content.endswith(MESSAGE)
    assert len(any_primary.handler.sessions) == 1


def test_a_refused_data_command_is_the_accepted_recipients_answer(any_primary):
    first, second = transactions(
        any_primary,
        (lambda s: setattr(s, "data_command", "451 4.3.0 no room now"), ["alice@example.com"]),
        (lambda s: setattr(s, "data_command", None), ["alice@example.com"]))
    assert codes(first) == [(451, "DATA")] and not first[0].server_trouble
    assert codes(second) == [(250, "DATA")] and len(any_primary.received) == 1
    assert len(any_primary.handler.sessions) == 1


def test_a_refused_message_is_the_answer_after_it(any_primary):
    any_primary.script.data = "554 5.7.1 spam"
    (only,) = transactions(any_primary, (None, ["alice@example.com"]))
    assert codes(only) == [(554, "DATA")] and only[0].permanent


def test_a_connection_dropped_at_rcpt_is_not_reached_for_every_recipient(any_primary):
    any_primary.script.drop_at = "RCPT"
    (only,) = transactions(any_primary, (None, ["alice@example.com", "bob@example.com"]))
    assert [r.reached for r in only] == [False, False] and only[0].server_trouble
    assert not any_primary.received


def test_a_reused_connection_the_primary_closed_is_replaced_not_taken_for_trouble(any_primary):
    """The primary said 421 to the second MAIL of a connection (its idle timeout, say): the
    transaction goes again on a new connection, once."""
    seen: list[object] = []

    def second_mail_closes(session: object) -> str | None:
        seen.append(session)
        return "421 4.4.2 idle too long" if len(seen) == 2 else None

    any_primary.script.mail_for = second_mail_closes
    first, second = transactions(any_primary, (None, ["alice@example.com"]), (None, ["bob@example.com"]))
    assert codes(first) == codes(second) == [(250, "DATA")]
    assert [r.rcpt_tos for r in any_primary.received] == [["alice@example.com"], ["bob@example.com"]]
    assert len(any_primary.handler.sessions) == 2
