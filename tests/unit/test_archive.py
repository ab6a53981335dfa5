"""The archive's files: one object per content, one chained record per message, retention to
the day, legal hold, and `verify` naming what changed (issue 11)."""

from __future__ import annotations

import calendar
import os
from datetime import date
from pathlib import Path

import pytest

from relay.addresses import AddressError
from relay.storage import archive as archive_module
from relay.storage.archive import Archive, ArchiveWriter, Item, Record, chain_of

MESSAGE = b"From: s@sender.test\r\nTo: a@example.com\r\nSubject: hello\r\n\r\nbody\r\n"


def at(day: str) -> float:
    return calendar.timegm(date.fromisoformat(day).timetuple()) + 3600.0


def item(data: bytes = MESSAGE, when: str = "2026-11-01", rcpts=("a@example.com",), **more) -> Item:
    fields = {"direction": "in", "kind": "passed", "sender": "s@sender.test", "queue_id": "q1",
              "outcome": "primary 250", **more}
    return Item(data=data, rcpts=tuple(rcpts), when=at(when), **fields)


def test_five_recipients_one_object_one_record_listing_them_all(tmp_path):
    archive = Archive(tmp_path, days=90)
    rcpts = tuple(f"u{n}@example.com" for n in range(5))
    (record,) = ArchiveWriter(archive).write([item(rcpts=rcpts)])
    assert record.rcpts == rcpts and record.keep_until == "2027-01-30"
    assert archive.read(record) == MESSAGE
    again = ArchiveWriter(archive).write([item()])       # the same bytes later: the same copy
    assert again[0].object == record.object == "2026-11-01.pack@0"
    assert (tmp_path / "packs" / "2026-11-01.pack").read_bytes() == MESSAGE      # stored once
    assert [r.id for r in archive.records()] == ["20261101.1", "20261101.2"]


def test_a_kept_message_is_a_hard_link_to_its_maildir_file(tmp_path):
    kept = tmp_path / "kept"
    trace = b"Return-Path: <s@sender.test>\r\nDelivered-To: a@example.com\r\n"
    kept.write_bytes(trace + MESSAGE)
    archive = Archive(tmp_path / "archive")
    (record,) = ArchiveWriter(archive).write([item(link_from=kept, skip=len(trace), kind="kept")])
    assert os.path.samefile(archive.object_path(record), kept)
    assert archive.read(record) == MESSAGE and archive.verify() == []
    assert archive.read(record, limit=10) == MESSAGE[:10]       # the trace headers still left out


def test_retention_to_the_day_and_hold(tmp_path):
    archive = Archive(tmp_path, days=90)
    writer = ArchiveWriter(archive)
    writer.write([item(b"old " + MESSAGE, "2026-09-01"), item(b"young " + MESSAGE, "2026-09-02"),
                  item(b"held " + MESSAGE, "2026-09-01", rcpts=("bob@example.org",))])
    archive.set_holds(["@example.org"])
    # kept until 2026-11-30 and 2026-12-01: on 2026-11-30 nothing goes, on 12-01 the first
    assert archive.purge(date(2026, 11, 30)) == {"dropped": 0, "held": 0, "objects": 0}
    assert archive.purge(date(2026, 12, 1)) == {"dropped": 1, "held": 1, "objects": 1}
    assert sorted(archive.read(r)[:5] for r in archive.records()) == [b"held ", b"young"]
    assert archive.verify() == []          # the held record's bytes still check out
    assert not (tmp_path / "packs" / "2026-09-01.pack").exists()     # the held one copied out
    assert not any(b"old " + MESSAGE in p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())
    assert archive.purge(date(2026, 12, 2))["dropped"] == 1
    assert [archive.read(r)[:5] for r in archive.records()] == [b"held "]


def test_verify_names_a_changed_byte_a_removed_record_and_an_inserted_one(tmp_path):
    archive = Archive(tmp_path)
    first, second, third = ArchiveWriter(archive).write(
        [item(b"%d " % n + MESSAGE) for n in range(3)])
    assert archive.verify() == []
    path = archive.object_path(second)
    offset = int(second.object.partition("@")[2])
    data = path.read_bytes()
    path.write_bytes(data[:offset] + data[offset:].replace(b"body", b"bodY", 1))
    assert archive.verify() == [f"{second.id}: its message bytes changed"]
    day = tmp_path / "days" / "2026-11-01.jsonl"
    lines = day.read_bytes().splitlines(keepends=True)
    day.write_bytes(lines[0] + lines[2])                                  # second removed
    assert archive.verify()[0].startswith(f"{third.id}: changed, or a record before it")
    day.write_bytes(lines[0] + lines[2] + lines[1])                       # put back out of order
    assert len([p for p in archive.verify() if "chain breaks" in p]) == 2
    archive.object_path(first).unlink()
    assert f"{first.id}: its message file is missing" in archive.verify()


def test_a_line_torn_by_a_crash_is_cut_at_the_next_start(tmp_path, caplog):
    archive = Archive(tmp_path)
    writer = ArchiveWriter(archive)
    first, _ = writer.write([item(b"1 " + MESSAGE), item(b"2 " + MESSAGE)])
    day = tmp_path / "days" / "2026-11-01.jsonl"
    whole = day.read_bytes()
    day.write_bytes(whole + whole.splitlines(keepends=True)[1][:40])      # a torn third line
    (tmp_path / "writer.open").write_text("1")                           # as a crash leaves it
    pack = tmp_path / "packs" / "2026-11-01.pack"
    packed = pack.read_bytes()
    pack.write_bytes(packed + b"3 " + MESSAGE[:20])       # a batch's bytes without its lines
    writer = ArchiveWriter(archive)
    writer.start()
    try:
        assert day.read_bytes() == whole and archive.verify() == []
        assert pack.read_bytes() == packed                # bytes no record names are cut too
        assert "archive.unclean_stop" in caplog.text and "archive.repaired" in caplog.text
        (third,) = writer.write([item(b"3 " + MESSAGE)])
        assert third.id == "20261101.3" and archive.verify() == []          # the chain goes on
    finally:
        writer.stop()
    assert not (tmp_path / "writer.open").exists()


def test_export_mbox_reads_back_byte_identical_and_the_zip_keeps_every_byte(tmp_path):
    import mailbox
    import zipfile

    import pytest

    from relay.errors import EntryError
    from relay.storage.archive_export import export

    archive = Archive(tmp_path / "archive")
    bodies = [MESSAGE, MESSAGE.replace(b"body", "Grüße 8-bit".encode()), b"Subject: bare LF\n\nx\n"]
    records = ArchiveWriter(archive).write([item(b) for b in bodies])
    with open(tmp_path / "out.mbox", "wb") as out:
        assert export(archive, records, out, "mbox") == 3
    box = mailbox.mbox(tmp_path / "out.mbox")
    try:
        assert [box.get_bytes(key) for key in box.keys()] == bodies
    finally:
        box.close()
    with open(tmp_path / "out.zip", "wb") as out:
        export(archive, records, out, "eml-zip")
    with zipfile.ZipFile(tmp_path / "out.zip") as bundle:
        assert [bundle.read(f"{r.id}.eml") for r in records] == bodies
    tricky = ArchiveWriter(archive).write([item(b"Subject: t\r\n\r\nFrom here on\r\n")])
    with open(tmp_path / "t.mbox", "wb") as out, pytest.raises(EntryError, match="eml-zip"):
        export(archive, tricky, out, "mbox")


def test_a_day_purged_down_to_its_held_records_never_gives_an_id_out_twice(tmp_path):
    """Found by the index's author: ids were the count of lines, so after a partial purge the
    next record of that day took the held record's id."""
    archive = Archive(tmp_path, days=1)
    ArchiveWriter(archive).write([item(b"a " + MESSAGE, "2026-11-01"),
                                  item(b"b " + MESSAGE, "2026-11-01", rcpts=("held@example.org",))])
    archive.set_holds(["held@example.org"])
    archive.purge(date(2026, 11, 5))
    (held,) = archive.records()
    (late,) = ArchiveWriter(archive).write([item(b"c " + MESSAGE, "2026-11-01")])
    assert held.id == "20261101.2" and late.id == "20261101.3"


def test_a_hold_is_a_normalised_address_or_at_domain():
    assert Archive.hold_key(" Alice@Example.COM ") == "alice@example.com"
    assert Archive.hold_key("@Example.org.") == "@example.org"
    assert Archive.hold_key("<bob@example.org>") == "bob@example.org"
    for bad in ("", "@", "@nodot", "@a@b.test", "alice", "@exa mple.org", "a/b@example.org", "x@"):
        with pytest.raises(AddressError):
            Archive.hold_key(bad)


def test_a_day_file_line_written_before_the_faster_encoding_still_verifies(tmp_path):
    """The line as `dataclasses.asdict` wrote it (before 2026-12-01): the chain covers these
    exact bytes, so the encoding may never change them."""
    line = (b'{"chain":"c51b0a88ebae04dab87241121e23823b016f0c04fcac909895128151c8376277",'
            b'"direction":"in","id":"20261201.1","keep_until":"2027-03-01","kind":"passed",'
            b'"object":"' + b"ab" * 32 + b'","outcome":"primary 250","queue_id":"Q1",'
            b'"rcpts":["alice@example.com","bob@example.com"],"sender":"s@sender.test",'
            b'"sha256":"' + b"ab" * 32 + b'","size":10,"time":1764547200.25,"user":""}\n')
    record = Record.from_line(line)
    assert record.line() == line
    assert chain_of("2026-12-01", record) == record.chain


def test_each_line_written_is_the_record_s_own_encoding_and_chains(tmp_path):
    """The writer encodes a line once and puts the chain in (`chain` sorts first): the bytes
    must be what `Record.line()` gives, or `verify` and the index would read another line."""
    archive = Archive(tmp_path)
    records = ArchiveWriter(archive).write([item(b"%d " % n + MESSAGE, rcpts=("a@example.com", "b@x.test"))
                                            for n in range(3)])
    lines = (tmp_path / "days" / "2026-11-01.jsonl").read_bytes().splitlines(keepends=True)
    assert lines == [r.line() for r in records] and list(archive.records()) == records
    assert archive.verify() == []


def test_what_waits_is_written_in_batches_of_at_most_batch_and_all_of_it_at_stop(tmp_path, monkeypatch):
    monkeypatch.setattr(archive_module, "BATCH", 3)
    batches: list[int] = []
    writer = ArchiveWriter(Archive(tmp_path), on_written=lambda records: batches.append(len(records)))
    for n in range(10):                  # before the thread runs: they wait, as under load
        assert writer.offer(item(b"%d " % n + MESSAGE))
    writer.start()
    writer.stop()
    assert sum(batches) == 10 and max(batches) == 3
    assert [r.id for r in Archive(tmp_path).records()] == [f"20261101.{n}" for n in range(1, 11)]


def test_offer_says_no_past_the_backlog_and_add_waits_for_room(tmp_path, monkeypatch):
    monkeypatch.setattr(archive_module, "BACKLOG", 4)
    monkeypatch.setattr(archive_module, "LINGER", 0.01)
    writer = ArchiveWriter(Archive(tmp_path))
    assert all(writer.offer(item(b"%d " % n + MESSAGE)) for n in range(4))
    assert not writer.offer(item(b"one too many " + MESSAGE))
    writer.start()
    for n in range(4, 20):               # past the backlog: each waits until the writer took some
        writer.add(item(b"%d " % n + MESSAGE))
    writer.stop()
    assert len(list(Archive(tmp_path).records())) == 20 and Archive(tmp_path).verify() == []



def _rounds_left_asleep(target, waiting, threads: int = 8, rounds: int = 2500) -> int:
    """Rounds in which `threads` threads each handed `target` a message at once, onto nothing
    waiting, and its writer was not woken (`waiting`: its list of what waits)."""
    import sys
    import threading

    start, done = threading.Barrier(threads + 1), threading.Barrier(threads + 1)
    item = Item(data=b"x", direction="in", kind="passed", sender="", rcpts=("a@b.c",), queue_id="q",
                outcome="")

    def put() -> None:
        for _ in range(rounds):
            start.wait()
            target.add(item)
            done.wait()

    switch, asleep = sys.getswitchinterval(), 0
    sys.setswitchinterval(1e-6)          # a thread switch between almost any two bytecodes
    workers = [threading.Thread(target=put) for _ in range(threads)]
    try:
        for worker in workers:
            worker.start()
        for _ in range(rounds):
            target._wake.clear()
            waiting.clear()
            start.wait()
            done.wait()
            asleep += not target._wake.is_set()
    finally:
        sys.setswitchinterval(switch)
        for worker in workers:
            worker.join()
    return asleep


def test_a_message_handed_over_from_two_threads_at_once_always_wakes_the_writer():
    """The loop offers inbound mail while worker threads add sent mail. Two first puts at once
    both saw two waiting and neither woke the writer: then nothing was ever written again (each
    later put saw more than one), and once `BACKLOG` waited every `add` blocked for good."""
    from relay.storage.archive_feed import ArchiveFeed

    writer = ArchiveWriter(Archive(Path("/nonexistent")))
    assert _rounds_left_asleep(writer, writer._items) == 0
    feed = ArchiveFeed(Archive(Path("/nonexistent")))
    assert _rounds_left_asleep(feed, feed._frames) == 0


def test_get_finds_any_record_of_a_day_by_its_id_and_nothing_else(tmp_path):
    """`get` reads only the line it wants: the first, the tenth and the hundredth of a day, an
    id a longer one begins with, a torn line after a crash, and ids that name nothing."""
    from relay.errors import CorruptEntryError

    archive = Archive(tmp_path / "archive", 90)
    records = ArchiveWriter(archive).write(
        [item(MESSAGE + str(n).encode(), queue_id=f"q{n}", sender='"id":"20261101.7",x@y.test')
         for n in range(100)])
    with open(archive._day_file("2026-11-01"), "ab") as file:
        file.write(b'{"chain":"torn')
    for record in (records[0], records[9], records[6], records[99]):
        assert archive.get(record.id) == record
    assert archive.get("20261101.1").queue_id == "q0" and archive.get("20261101.10").queue_id == "q9"
    for missing in ("20261101.101", "20261101.", "20261102.1", "2026110.1", "x", "../../etc.1", ""):
        with pytest.raises(CorruptEntryError):
            archive.get(missing)
