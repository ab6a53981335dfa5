"""The queue: commit marker, claim by rename, and recovery from what a crash leaves behind."""

from __future__ import annotations

import json
import os

import pytest

from relay.errors import CorruptEntryError
from relay.storage.queue import MAX_CRASHES, Envelope, Queue


def envelope(rcpt: str = "a@example.com") -> Envelope:
    return Envelope(mail_from="s@sender.test", rcpt=rcpt, received_at=1.0, skip=3)


def test_enqueue_link_shares_the_file_and_read_skips_our_headers(tmp_path):
    source = tmp_path / "message"
    source.write_bytes(b"XY\nreal message")
    queue = Queue(tmp_path / "q")
    entry = queue.enqueue_link(source, envelope())
    assert (tmp_path / "q" / "msg" / entry).stat().st_ino == source.stat().st_ino
    source.unlink()  # the user deleted their copy: the queue still has it
    env, data = queue.read(entry)
    assert env.rcpt == "a@example.com" and data == b"real message"


def test_ids_sort_oldest_first_and_claim_is_exclusive(tmp_path):
    queue = Queue(tmp_path / "q")
    ids = [queue.enqueue_bytes(b"abcdef", envelope(f"u{n}@example.com")) for n in range(20)]
    assert queue.list() == ids
    assert queue.claim(ids[0]) and not queue.claim(ids[0])
    assert queue.count("waiting") == 19 and queue.count("active") == 1
    queue.finish(ids[0])
    assert not (tmp_path / "q" / "msg" / ids[0]).exists()


def test_recover_cleans_what_a_crash_leaves(tmp_path):
    queue = Queue(tmp_path / "q")
    done = queue.enqueue_bytes(b"abcdef", envelope())
    crashed = queue.enqueue_bytes(b"abcdef", envelope())
    queue.claim(crashed)
    # A crash between the message link and the envelope commit, and a half-written envelope:
    (tmp_path / "q" / "msg" / "0000000000000000.1.000001").write_bytes(b"orphan")
    (tmp_path / "q" / "tmp" / "0000000000000000.1.000002").write_bytes(b'{"mail_fr')
    result = Queue(tmp_path / "q").recover()
    assert result == {"requeued": 1, "held": 0, "orphans": 1}
    assert queue.list() == sorted([done, crashed])
    assert queue.envelope(crashed).crashes == 1
    assert os.listdir(tmp_path / "q" / "tmp") == []
    assert sorted(os.listdir(tmp_path / "q" / "msg")) == sorted([done, crashed])


def test_entry_that_crashes_the_runner_three_times_is_set_aside(tmp_path):
    queue = Queue(tmp_path / "q")
    entry = queue.enqueue_bytes(b"abcdef", envelope())
    for _ in range(MAX_CRASHES):
        assert queue.claim(entry)
        queue.recover()
    assert queue.list("hold") == [entry] and queue.list() == []
    assert queue.envelope(entry, "hold").crashes == MAX_CRASHES


def test_corrupt_envelope(tmp_path):
    queue = Queue(tmp_path / "q")
    entry = queue.enqueue_bytes(b"abcdef", envelope())
    (tmp_path / "q" / "waiting" / entry).write_bytes(b"not json")
    with pytest.raises(CorruptEntryError):
        queue.read(entry)
    queue.claim(entry)
    assert queue.recover()["held"] == 1


def test_envelope_round_trip():
    env = Envelope("s@x.example", "r@y.example", 5.0, 10, ("BODY=8BITMIME",), note="451 later")
    assert Envelope.from_bytes(env.to_bytes()) == env
    assert json.loads(env.to_bytes())["mail_options"] == ["BODY=8BITMIME"]


def test_enqueue_many_writes_once_and_links(tmp_path):
    queue = Queue(tmp_path / "q")
    ids = queue.enqueue_many(b"shared bytes", [envelope(f"r{n}@example.org") for n in range(3)])
    inodes = {(tmp_path / "q" / "msg" / i).stat().st_ino for i in ids}
    assert len(ids) == 3 and len(inodes) == 1
    assert os.listdir(tmp_path / "q" / "tmp") == []
    queue.claim(ids[0])
    queue.finish(ids[0])  # one delivered: the others keep their bytes
    assert queue.read(ids[1])[1] == b"shared bytes"[3:]


def test_a_messages_entries_appear_in_waiting_together(tmp_path, monkeypatch):
    """The outbound runner sends a message's recipients in one transaction; a sweep that
    listed waiting/ while enqueue_many was part-way (an fsync each entry) split it in two."""
    queue = Queue(tmp_path / "q")
    seen: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (seen.append(len(queue.list())), real_fsync(fd))[1])
    ids = queue.enqueue_many(b"x", [Envelope(mail_from="a@x.test", rcpt=f"r{n}@y.test", received_at=1.0)
                                    for n in range(3)])
    assert len(ids) == 3 and set(seen) == {0, 3}, seen      # none, then all three


def test_pending_reads_an_envelope_again_only_when_its_file_changed(tmp_path, monkeypatch):
    """A sweep used to reread every waiting envelope each time (the outbound runner's `_due`);
    now an unchanged file is answered from memory, and any rewrite is seen."""
    queue = Queue(tmp_path / "q")
    first = queue.enqueue_bytes(b"one", envelope("a@example.com"))
    second = queue.enqueue_bytes(b"two", envelope("b@example.com"))
    reads: list[str] = []
    real = Queue.envelope
    monkeypatch.setattr(Queue, "envelope", lambda self, entry, state="waiting":
                        reads.append(entry) or real(self, entry, state))
    assert [p.id for p in queue.pending()] == [first, second] and reads == [first, second]
    assert [p.rcpt for p in queue.pending()] == ["a@example.com", "b@example.com"]
    assert reads == [first, second]                      # the second sweep read nothing
    assert queue.claim(second)
    delay = queue.defer(second, real(queue, second, "active"), "452 4.2.2 full", 60.0)
    (later,) = [p for p in queue.pending() if p.id == second]
    assert reads[2:] == [second] and later.next_try > 0 and delay == 60.0
    queue.retry(second)                                  # the administrator: due now
    assert [p.next_try for p in queue.pending() if p.id == second] == [0.0]


def test_the_retry_and_hold_policy_is_the_queues(tmp_path):
    """Deferral doubles per attempt up to an hour; a crash is counted and the third goes to
    hold; the same count as recovery after a process died holding the entry."""
    from relay.storage.queue import retry_delay
    assert [retry_delay(60, n) for n in (1, 2, 3, 7, 20)] == [60, 120, 240, 3600, 3600]
    queue = Queue(tmp_path / "q")
    entry = queue.enqueue_bytes(b"x", envelope())
    for expected in ["waiting"] * (MAX_CRASHES - 1) + ["hold"]:
        assert queue.claim(entry)
        assert queue.crashed(entry, queue.envelope(entry, "active"), "error: RuntimeError") == expected
    held = queue.envelope(entry, "hold")
    assert held.crashes == MAX_CRASHES and held.note == "error: RuntimeError"


def test_counts_and_oldest_come_from_names_only(tmp_path, monkeypatch):
    """Issue 13 (scale): `status` counts each state and finds the oldest waiting entry from the
    directory listings alone, opening no envelope; the counts and the age stay exact."""
    from relay.storage.state import queue_status
    queue = Queue(tmp_path / "q")
    ids = [queue.enqueue_bytes(b"x", envelope(f"u{n}@example.com")) for n in range(5)]
    assert queue.claim(ids[1]) and queue.claim(ids[2])
    queue.fail(ids[2], queue.envelope(ids[2], "active"), "550 no")
    (tmp_path / "q" / "waiting" / ".hidden").write_bytes(b"")   # not an entry
    monkeypatch.setattr("relay.storage.queue._read_plain", lambda path: pytest.fail(f"read {path}"))
    status = queue_status(queue)
    assert status.queue == {"waiting": 3, "active": 1, "failed": 1, "hold": 0}
    assert status.oldest is not None and 0 <= status.oldest < 60
    assert queue.tally("failed")[0] == 1 and queue.oldest_age("hold") is None


def test_recover_removes_orphans_among_many_committed_entries(tmp_path):
    """Recovery's orphan sweep (a set of committed names, no sorting) still finds a message file
    left without an envelope, whatever state the others are in, and removes nothing else."""
    queue = Queue(tmp_path / "q")
    ids = [queue.enqueue_bytes(b"x", envelope()) for n in range(6)]
    for entry, target in zip(ids[:3], ("failed", "hold", "active"), strict=True):
        assert queue.claim(entry)
        if target != "active":
            queue.move(entry, "active", target)
    orphan = queue.new_id()
    (tmp_path / "q" / "msg" / orphan).write_bytes(b"orphan")
    (tmp_path / "q" / "tmp" / queue.new_id()).write_bytes(b'{"half')
    assert Queue(tmp_path / "q").recover() == {"requeued": 1, "held": 0, "orphans": 1}
    assert sorted(os.listdir(tmp_path / "q" / "msg")) == sorted(ids)
    assert os.listdir(tmp_path / "q" / "tmp") == []
    assert Queue(tmp_path / "q").recover() == {"requeued": 0, "held": 0, "orphans": 0}
