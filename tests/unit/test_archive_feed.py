"""The archive writer in a process of its own (relay/storage/archive_feed.py): what serve hands
it arrives whole, a spooled message's file is the writer's to remove, a killed writer process
is started again, a serve that ends without a clean stop still has what it sent written, and
only one writer process holds an archive at a time. Real child processes, real pipes."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from relay.storage.archive import Archive, Item
from relay.storage.archive_feed import ArchiveFeed, frame
from relay.storage.incoming import Incoming, MessageFile
from tests.helpers import wait_for


def item(data: bytes | MessageFile, n: int = 0) -> Item:
    return Item(data=data, direction="in", kind="passed", sender="s@x.test",
                rcpts=("a@example.com", "b@example.com"), queue_id=f"q{n}", outcome="primary 250")


def spooled(tmp_path: Path, data: bytes) -> MessageFile:
    fd, path = Incoming(tmp_path / "incoming").create()
    with open(fd, "wb") as file:
        file.write(data)
    return MessageFile(path, len(data))


def message(n: int) -> bytes:
    return f"Subject: n{n}\r\n\r\nbody {n}\r\n".encode()


def test_what_the_feed_is_handed_is_archived_whole_and_a_spooled_file_is_the_writers_to_remove(tmp_path):
    archive = Archive(tmp_path / "archive", 90)
    big = b"Subject: big\r\n\r\n" + b"z" * 700_000
    own = spooled(tmp_path, big).with_prefix(b"Received: r\r\n").detached()   # as inbound hands it
    feed = ArchiveFeed(archive)
    feed.start()
    try:
        assert (archive.root / "writer.open").exists()
        feed.add(item(message(1), 1))                                         # bytes (a notice)
        assert feed.offer(item(MessageFile(None, 13 + 20, prefix=b"Received: r\r\n",
                                           body=message(2) + b"\r\n" * 3), 2))  # in memory
        feed.add(item(own, 3))
    finally:
        feed.stop()
    records = list(archive.records())
    assert [r.queue_id for r in records] == ["q1", "q2", "q3"]
    assert archive.read(records[0]) == message(1)
    assert archive.read(records[1]) == b"Received: r\r\n" + message(2) + b"\r\n" * 3
    assert archive.read(records[2]) == b"Received: r\r\n" + big
    assert records[2].rcpts == ("a@example.com", "b@example.com") and records[2].outcome == "primary 250"
    assert archive.verify() == []
    assert not own.path.exists(), "the writer process removes the link it was given"
    assert not (archive.root / "writer.open").exists(), "a clean stop says so"


def test_a_killed_writer_process_is_started_again_and_the_chain_goes_on(tmp_path, caplog):
    archive = Archive(tmp_path / "archive", 90)
    feed = ArchiveFeed(archive)
    feed.start()
    try:
        feed.add(item(message(1), 1))
        wait_for(lambda: len(list(archive.records())) == 1, 15, "the first message written")
        first = feed._proc
        assert first is not None
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
        n = 2
        while not caplog.text.count("archive.writer_exited"):    # the write that finds it gone
            feed.add(item(message(n), n))
            wait_for(lambda handed=n: feed.sent + feed.lost >= handed, 15, "the feed's write")
            n += 1
        wait_for(lambda: feed._proc is not first, 15, "a new writer process")
        feed.add(item(message(99), 99))
    finally:
        feed.stop()
    records = list(archive.records())
    assert records[0].queue_id == "q1" and records[-1].queue_id == "q99"
    assert archive.verify() == [], "the chain goes on over the restart"
    assert "lost=" in caplog.text


def test_a_serve_that_ends_without_a_clean_stop_still_has_what_it_sent_written(tmp_path):
    """A killed serve: the writer process reads the pipe to its end and writes it all, and
    leaves `writer.open`, so the next start says `archive.unclean_stop`."""
    root = tmp_path / "archive"
    child = subprocess.Popen([sys.executable, "-m", "relay.storage.archive_feed", str(root), "90", ""],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert child.stdout.readline() == b"ready\n"
    child.stdin.write(b"".join(frame(item(message(n), n)) for n in range(50)))
    child.stdin.write(frame(item(message(50), 50))[:30])            # a frame cut by the kill
    child.stdin.close()
    assert child.wait(30) == 0
    stderr = child.stderr.read().decode()
    child.stdout.close()
    child.stderr.close()
    archive = Archive(root, 90)
    assert [r.queue_id for r in archive.records()] == [f"q{n}" for n in range(50)]
    assert archive.verify() == [] and "archive.feed_cut" in stderr
    assert (root / "writer.open").exists()


def test_only_one_writer_process_holds_an_archive(tmp_path):
    root = tmp_path / "archive"
    root.mkdir()
    held = os.open(root / "writer.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(held, fcntl.LOCK_EX)          # as a writer a killed serve left running holds it
    feed = ArchiveFeed(Archive(root, 90))
    started = threading.Thread(target=feed.start)
    started.start()
    try:
        wait_for(lambda: feed._proc is not None, 15, "the writer process started")
        time.sleep(0.5)
        assert started.is_alive(), "the second writer went on while the first held the archive"
        assert not (root / "writer.open").exists()
    finally:
        os.close(held)
    started.join(15)
    assert not started.is_alive() and (root / "writer.open").exists()
    feed.stop()
