"""Round trips to the primary off a passed message's path (issue 13, pass-through latency):
MAIL and the first RCPT in one write to a primary that offers PIPELINING (RFC 2920), and the
primary's DATA sent as our sender says DATA, so its 354 comes while the message arrives. The
answers stay the primary's: its RCPT reply, its refusal of MAIL or of DATA; a message that does
not follow (refused here, the sender gone) never reaches it (relay/delivery/client.py,
relay/smtp/inbound.py)."""

from __future__ import annotations

import asyncio
import smtplib
import socket

import pytest

from relay.delivery.client import _Pipelining
from relay.smtp.server import RelaySMTP
from relay.storage.incoming import Incoming
from tests.helpers import wait_for
from tests.smtp.fakes import FakePrimary, stored_files
from tests.smtp.helpers import plain_client
from tests.smtp.test_streamed_data import at_data

pytestmark = pytest.mark.timeout(60)

MESSAGE = b"From: x@sender.test\r\nSubject: round trips\r\n\r\nbody\r\n"


@pytest.fixture
def pipelining():
    server = FakePrimary(dsn=True).start()
    yield server
    server.stop()


def one_transaction(client: smtplib.SMTP, rcpt: str = "alice@example.com",
                    data: bytes = MESSAGE) -> tuple[tuple[int, bytes], tuple[int, bytes] | None]:
    """MAIL, RCPT and (when the RCPT was taken) DATA: (the RCPT's reply, DATA's or None)."""
    assert client.mail("x@sender.test")[0] == 250
    answer = client.rcpt(rcpt)
    if answer[0] != 250:
        client.rset()
        return answer, None
    return answer, client.data(data)


def test_mail_and_the_first_rcpt_reach_a_pipelining_primary_in_one_write(pipelining, make_relay):
    relay = make_relay(pipelining.port)
    with plain_client(relay.port) as client:
        assert one_transaction(client)[1][0] == 250
        assert one_transaction(client)[1][0] == 250     # a reused connection: the same
    assert [b.startswith(b"RCPT TO:<alice@example.com>") for b in pipelining.handler.behind_mail] \
        == [True, True]
    assert [r.rcpt_tos for r in pipelining.received] == [["alice@example.com"]] * 2


def test_a_primary_without_pipelining_gets_mail_and_rcpt_one_at_a_time(primary, make_relay):
    relay = make_relay(primary.port)
    with plain_client(relay.port) as client:
        assert one_transaction(client)[1][0] == 250
    assert primary.handler.behind_mail == [b""]


def test_a_refused_mail_answers_the_rcpt_and_the_connection_stays_in_step(any_primary, make_relay):
    """The pipelined RCPT's own reply (a 503 after a refused MAIL) is read and dropped: the
    sender hears the MAIL's refusal, and the next transaction gets the next replies."""
    refused: list[object] = []

    def first_refused(session: object) -> str | None:
        refused.append(session)
        return "550 5.7.1 sender refused by policy" if len(refused) == 1 else None

    any_primary.script.mail_for = first_refused
    any_primary.script.rcpt_for = {"bob@example.com": "550 5.1.1 no such user"}
    relay = make_relay(any_primary.port)
    with plain_client(relay.port) as client:
        assert one_transaction(client) == ((550, b"5.7.1 sender refused by policy"), None)
        assert one_transaction(client, "bob@example.com") == ((550, b"5.1.1 no such user"), None)
        answer, reply = one_transaction(client)
        assert answer[0] == 250 and reply[0] == 250
    assert [r.rcpt_tos for r in any_primary.received] == [["alice@example.com"]]
    assert stored_files(relay.config.storage.maildirs) == []


def test_the_primary_gets_data_while_the_message_is_still_arriving(primary, make_relay):
    relay = make_relay(primary.port)
    with socket.create_connection(("127.0.0.1", relay.port), timeout=30) as conn:
        reply = at_data(conn)
        wait_for(lambda: primary.handler.data_commands == 1, 10, "the primary's DATA before the message")
        conn.sendall(MESSAGE + b".\r\n")
        assert reply().startswith(b"250 2.0.0")
    (passed,) = primary.received
    assert passed.content.endswith(MESSAGE)


@pytest.mark.parametrize("refusal, expected, kept", [
    ("554 5.5.1 Error: no valid recipients", (554, b"5.5.1 Error: no valid recipients"), 0),
    ("451 4.3.0 Error: try again later", (250, None), 1),
])
def test_a_primary_refusing_data_is_its_answer_after_the_message(any_primary, make_relay,
                                                                  refusal, expected, kept):
    """The sender had our 354 already, so the primary's refusal of DATA answers the message:
    a 5xx goes back as it is; a 4xx means continuity for a registered user, as a 4xx to the
    message does. The connection stays usable."""
    any_primary.script.data_command = refusal
    relay = make_relay(any_primary.port)
    with plain_client(relay.port) as client:
        code, text = one_transaction(client)[1]
        assert code == expected[0] and (expected[1] is None or text == expected[1])
        any_primary.script.data_command = None
        assert one_transaction(client)[1][0] == 250
    assert len(stored_files(relay.config.storage.maildirs)) == kept
    assert len(any_primary.received) == 1


@pytest.mark.parametrize("data, code", [(b"Subject: nul\r\n\r\nnul \0 here\r\n", 550),
                                        (b"Subject: long\r\n\r\n" + b"x" * 1200 + b"\r\n", 500)])
def test_a_message_refused_here_after_the_primary_said_354_never_reaches_it(
        any_primary, make_relay, data, code):
    relay = make_relay(any_primary.port)
    with plain_client(relay.port) as client:
        assert one_transaction(client, data=data)[1][0] == code
        assert one_transaction(client)[1][0] == 250     # a new primary connection
    (only,) = any_primary.received
    assert only.content.endswith(MESSAGE)
    assert stored_files(relay.config.storage.maildirs) == []


def test_a_sender_hanging_up_in_the_data_leaves_the_primary_nothing(primary, make_relay):
    relay = make_relay(primary.port)
    with socket.create_connection(("127.0.0.1", relay.port), timeout=30) as conn:
        at_data(conn)
        wait_for(lambda: primary.handler.data_commands == 1, 10, "the primary's DATA")
        conn.sendall(b"Subject: half\r\n\r\nhalf a mess")
    with plain_client(relay.port) as client:
        assert one_transaction(client)[1][0] == 250
    (only,) = primary.received
    assert only.content.endswith(MESSAGE)


def test_replies_of_a_group_that_arrive_apart_are_each_read():
    """aiosmtplib's protocol drops data that arrives while a reply waits to be picked up; in a
    pipelined group that is the next reply, and it must be kept."""

    async def run() -> list[tuple[int, str]]:
        ours, theirs = socket.socketpair()
        with ours, theirs:
            loop = asyncio.get_running_loop()
            protocol = _Pipelining(loop=loop)
            await loop.create_connection(lambda: protocol, sock=ours)
            protocol._response_pending = True
            with protocol.group():
                protocol.data_received(b"250 2.1.0 sender ok\r\n")
                protocol.data_received(b"250 2.1.5 recipient ok\r\n")   # before the first is read
                first = await protocol.next_reply(5)
                second = await protocol.next_reply(5)
            protocol.transport.close()
            return [(first.code, first.message), (second.code, second.message)]

    assert asyncio.run(run()) == [(250, "2.1.0 sender ok"), (250, "2.1.5 recipient ok")]


def test_the_ehlo_reply_is_one_write(tmp_path):
    """aiosmtpd writes its EHLO reply a line at a time; ours goes at once, the same lines."""

    class Handler:
        pass

    async def run() -> tuple[list[bytes], bytes]:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        with theirs:
            theirs.setblocking(False)
            protocol = RelaySMTP(Handler(), hostname="relay.test", incoming=Incoming(tmp_path))
            transport, _ = await loop.connect_accepted_socket(lambda: protocol, sock=ours)
            writes: list[bytes] = []
            write = transport.write
            transport.write = lambda data: (writes.append(bytes(data)), write(data))[1]
            received = b""
            while not received.endswith(b"\r\n"):
                received += await loop.sock_recv(theirs, 4096)
            writes.clear()                          # the greeting
            await loop.sock_sendall(theirs, b"EHLO sender.test\r\n")
            received = b""
            while not received.endswith(b"250 HELP\r\n"):
                received += await loop.sock_recv(theirs, 4096)
            transport.close()
            return writes, received

    writes, received = asyncio.run(run())
    assert writes == [received]
    assert received.startswith(b"250-relay.test\r\n") and b"250-PIPELINING\r\n250-ENHANCEDSTATUSCODES" \
        b"\r\n250-DSN\r\n250 HELP\r\n" in received
