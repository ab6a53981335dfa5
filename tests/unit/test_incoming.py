"""The incoming spool and spooled messages (relay/storage/incoming.py), the DATA writer that
sends them (relay/delivery/client.py DotStuffer), and the archive taking one."""

from __future__ import annotations

import random

from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings

from relay.delivery.client import DotStuffer
from relay.storage.archive import Archive, ArchiveWriter, Item
from relay.storage.incoming import Incoming, MessageFile


def spooled(tmp_path, data: bytes) -> MessageFile:
    fd, path = Incoming(tmp_path / "incoming").create()
    with open(fd, "wb") as file:
        file.write(data)
    return MessageFile(path, len(data))


def test_a_message_file_reads_prefix_then_file_in_pieces(tmp_path):
    message = spooled(tmp_path, b"Subject: s\r\n\r\n" + b"y" * 1000).with_prefix(b"Received: r\r\n")
    assert len(message) == 13 + 14 + 1000
    pieces = list(message.chunks(64))
    assert pieces[0] == b"Received: r\r\n" and max(len(p) for p in pieces) == 64
    assert b"".join(pieces) == message.read() == b"Received: r\r\nSubject: s\r\n\r\n" + b"y" * 1000
    assert message.head(20) == message.read()[:20]


def test_the_last_holder_removes_the_file_and_a_detached_copy_lives_on(tmp_path):
    message = spooled(tmp_path, b"body\r\n")
    message.hold()
    copy = message.detached()
    message.release()
    assert message.path.exists()
    message.release()
    assert not message.path.exists() and copy.read() == b"body\r\n"
    copy.release()
    assert list((tmp_path / "incoming").iterdir()) == []


def test_start_up_clears_what_a_crash_left(tmp_path):
    incoming = Incoming(tmp_path / "incoming")
    for _ in range(3):
        fd, _ = incoming.create()
        with open(fd, "wb") as file:
            file.write(b"half a mess")
    assert incoming.clear() == 3 and list(incoming.root.iterdir()) == []
    assert Incoming(tmp_path / "none").clear() == 0


def test_dot_stuffing_in_pieces_is_what_aiosmtplib_sends_whole():
    rng = random.Random(3)
    for _ in range(3000):
        message = bytes(rng.choice(b"a.\r\n") for _ in range(rng.randint(0, 40)))
        stuffer, out, at = DotStuffer(), b"", 0
        while at < len(message):
            step = rng.randint(1, 6)
            out += stuffer.feed(message[at:at + step])
            at += step
        out += stuffer.end()
        assert out == PERIOD_REGEX.sub(b"..", normalize_message_line_endings(message)), message


def test_the_archive_copies_a_spooled_message_and_releases_its_file(tmp_path):
    archive = Archive(tmp_path / "archive", 90)
    data = b"Subject: s\r\n\r\n" + b"z" * 700_000
    message = spooled(tmp_path, data).with_prefix(b"Received: r\r\n")
    writer = ArchiveWriter(archive)
    writer.start()
    writer.add(Item(data=message, direction="in", kind="passed", sender="s@x.test",
                    rcpts=("a@example.com",), queue_id="q", outcome="primary 250"))
    writer.stop()
    (record,) = archive.records()
    assert archive.read(record) == b"Received: r\r\n" + data and archive.verify() == []
    assert record.size == len(data) + 13 and not message.path.exists()


def test_a_small_message_lives_in_memory_and_reads_the_same(tmp_path):
    message = MessageFile(None, 6, body=b"body\r\n").with_prefix(b"X: y\r\n")
    assert message.read() == b"X: y\r\nbody\r\n" and message.head(3) == b"X: "
    copy = message.detached()
    message.release()
    copy.release()          # no file: nothing to remove, nothing raised
    assert list(tmp_path.iterdir()) == []
