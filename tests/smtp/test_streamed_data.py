"""DATA streams into the incoming spool (relay/smtp/server.py, relay/storage/incoming.py): the
limits and the smuggling defences hold as aiosmtpd's own reading kept them, every byte arrives
as it was sent at the primary, in the Maildir and in the archive, and no spool file stays."""

from __future__ import annotations

import random
import re
import socket
import time
from collections.abc import Callable

import pytest

from relay.storage.archive import Archive
from tests.helpers import free_port, wait_for
from tests.smtp.fakes import send, stored_files

pytestmark = pytest.mark.timeout(60)

LINE_END = re.compile(rb"\r\n|\n|\r(?!\n)")


def incoming_files(relay) -> list:
    root = relay.config.storage.spool / "incoming"
    return sorted(root.iterdir()) if root.exists() else []


def kept(relay) -> tuple[list, list]:
    spool = relay.config.storage.spool
    return stored_files(relay.config.storage.maildirs), sorted((spool / "replay").rglob("msg/*"))


def after_received(data: bytes) -> bytes:
    """What follows our Received header (folded over 3 lines, the last ending with the date)."""
    start = data.index(b"Received: ")
    end = data.index(b"\r\n", data.index(b"\r\n\t", data.index(b";", start)) + 2) + 2
    return data[end:]


def big_message(rng: random.Random, size: int) -> bytes:
    """Lines of every awkward kind: leading dots, bare LF and CR, dots after them, 8-bit."""
    pieces = [b"Subject: big\r\n\r\n"]
    total = 0
    kinds = [b".dot line\r\n", b"bare\nlf\n.after lf\r\n", b"bare\rcr\r.after cr\r\n",
             b"\xc3\xa9 8-bit \xff\r\n", b"..two dots\r\n", b"\r\n", b"x" * 990 + b"\r\n",
             b"ends in cr\r\r\n"]
    while total < size:
        piece = rng.choice(kinds)
        pieces.append(piece)
        total += len(piece)
    return b"".join(pieces)


def dot_stuffed(content: bytes) -> bytes:
    """The DATA a client sends for `content`: a dot after CRLF (and at the start) doubled."""
    wire = content.replace(b"\r\n.", b"\r\n..")
    return b"." + wire if wire.startswith(b".") else wire


def test_over_the_limit_is_552_after_the_data_with_nothing_kept_or_spooled(primary, make_relay):
    relay = make_relay(primary.port)               # message_size_limit: 1 MiB
    primary.script.rcpt = "451 4.3.0 down"         # so a message would be kept
    big = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 1100
    _, reply = send(relay.port, "x@sender.test", ["alice@example.com"], big)
    assert reply == (552, b"5.3.4 Error: Too much mail data")       # aiosmtpd's, with a code
    assert kept(relay) == ([], [])
    wait_for(lambda: incoming_files(relay) == [], 10, "the spool file removed")


def test_big_message_bytes_identical_passed_and_kept(primary, make_relay):
    """Several spool chunks' worth (CHUNK is 256 KiB): the primary and the Maildir get the
    same bytes, each bare CR and LF made CRLF as the data arrives (issue 9, point 1: a bare CR
    kept in the Maildir showed IMAP users another header than the primary got on replay)."""
    relay = make_relay(primary.port)
    content = big_message(random.Random(13), 900_000)
    assert send(relay.port, "x@sender.test", ["alice@example.com"], dot_stuffed(content))[1][0] == 250
    (passed,) = primary.received
    assert after_received(passed.content) == LINE_END.sub(b"\r\n", content)
    primary.script.mail = "451 4.3.0 down"
    assert send(relay.port, "x@sender.test", ["alice@example.com"], dot_stuffed(content))[1][0] == 250
    (stored,), (queued,) = kept(relay)
    assert after_received(stored.read_bytes()) == LINE_END.sub(b"\r\n", content)
    assert queued.samefile(stored)
    wait_for(lambda: incoming_files(relay) == [], 10, "the spool files removed")


def at_data(conn: socket.socket) -> Callable[[], bytes]:
    """A raw session to alice, up to the 354 after DATA; returns the reader of the next reply."""
    reader = conn.makefile("rb")

    def reply() -> bytes:
        line = reader.readline()
        while line[3:4] == b"-":
            line = reader.readline()
        return line
    assert reply().startswith(b"220")
    for command in (b"EHLO sender.test", b"MAIL FROM:<x@sender.test>",
                    b"RCPT TO:<alice@example.com>", b"DATA"):
        conn.sendall(command + b"\r\n")
        assert reply()[:1] in (b"2", b"3")
    return reply


@pytest.mark.parametrize("fake_end", [b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r.\r\n", b"\r\n.\n",
                                      b"\r\n.\r"])
def test_only_crlf_dot_crlf_ends_the_data_no_smuggling(primary, make_relay, fake_end):
    """CVE-2024-27305: a fake end of data cannot start a second, smuggled transaction."""
    relay = make_relay(primary.port)
    smuggled = (b"MAIL FROM:<evil@sender.test>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\n"
                b"Subject: smuggled\r\n\r\nevil\r\n")
    with socket.create_connection(("127.0.0.1", relay.port), timeout=30) as conn:
        reply = at_data(conn)
        conn.sendall(b"Subject: real\r\n\r\nbody" + fake_end + smuggled + b".\r\n")
        assert reply().startswith(b"250")
        conn.sendall(b"QUIT\r\n")
        assert reply().startswith(b"221")
    (only,) = primary.received
    assert only.rcpt_tos == ["alice@example.com"]
    assert b"evil@sender.test" in only.content and b"Subject: real" in only.content


def test_the_archive_copies_a_passed_message_from_its_own_link(primary, make_relay):
    relay = make_relay(primary.port, storage="archive: archive")
    content = big_message(random.Random(5), 600_000)
    assert send(relay.port, "x@sender.test", ["alice@example.com"], dot_stuffed(content))[1][0] == 250
    archive = Archive(relay.config.storage.archive)
    (record,) = wait_for(lambda: list(archive.records()), 10, "the message archived")
    assert after_received(archive.read(record)) == LINE_END.sub(b"\r\n", content)
    assert archive.verify() == []
    wait_for(lambda: incoming_files(relay) == [], 10, "the session's and the archive's links gone")


def test_a_bare_cr_cannot_show_a_continuity_user_another_from_than_the_primary_gets(make_relay):
    """Issue 9, point 1, inbound: `Subject: x\\rFrom: CEO` kept with its bare CR was one header
    line in the Maildir (and to IMAP clients) and two at the primary on replay."""
    relay = make_relay(free_port())                      # the primary is down: kept
    wire = (b"Subject: x\rFrom: CEO <ceo@example.com>\r\nFrom: x@sender.test\r\n\r\n"
            b"line\nother\rlast\r\n")
    assert send(relay.port, "x@sender.test", ["alice@example.com"], wire)[1][0] == 250
    (stored,), _ = kept(relay)
    assert after_received(stored.read_bytes()) == (
        b"Subject: x\r\nFrom: CEO <ceo@example.com>\r\nFrom: x@sender.test\r\n\r\n"
        b"line\r\nother\r\nlast\r\n")


def test_a_line_too_long_in_the_data_is_500_with_a_code_and_the_session_goes_on(primary, make_relay):
    relay = make_relay(primary.port)
    _, reply = send(relay.port, "x@sender.test", ["alice@example.com"],
                    b"Subject: long\r\n\r\n" + b"y" * 2000 + b"\r\n")
    assert reply == (500, b"5.5.2 Line too long (see RFC5321 4.5.3.1.6)")
    assert primary.received == [] and kept(relay) == ([], [])
    assert send(relay.port, "x@sender.test", ["alice@example.com"], b"Subject: ok\r\n\r\nx\r\n")[1][0] == 250


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_data_cut_anywhere_into_pieces_is_read_the_same(primary, make_relay, seed):
    """DATA is read a line at a time, or as a block of the whole lines already received
    (RelaySMTP._buffered_lines): wherever TCP cuts it, the primary gets the same bytes, and a
    fake end of data inside stays text."""
    rng = random.Random(seed)
    relay = make_relay(primary.port)
    content = big_message(rng, 60_000) + b"fake\n.\nend\r\n..\r\n.\r.\r\n"
    wire = dot_stuffed(content) + b".\r\n"
    with socket.create_connection(("127.0.0.1", relay.port), timeout=30) as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        reply = at_data(conn)
        at = 0
        while at < len(wire):
            step = rng.choice([1, 2, 3, 5, 7, 50, 500, 5000])
            conn.sendall(wire[at:at + step])
            at += step
            if rng.random() < 0.05:
                time.sleep(0.002)          # let the relay read what came so far
        assert reply().startswith(b"250")
        conn.sendall(b"QUIT\r\n")
    (got,) = primary.received
    assert after_received(got.content) == LINE_END.sub(b"\r\n", content)
