"""Durable writes: group-committed directory fsyncs never return before a covering fsync."""

from __future__ import annotations

import threading
import time

from relay.storage import durable


def test_group_sync_shares_fsyncs_but_each_caller_is_covered(monkeypatch, tmp_path):
    syncs: list[tuple[float, float]] = []
    lock = threading.Lock()

    def slow_fsync(path: str) -> None:
        start = time.monotonic()
        time.sleep(0.01)
        with lock:
            syncs.append((start, time.monotonic()))

    monkeypatch.setattr(durable, "_fsync_dir_now", slow_fsync)
    group = durable._GroupSync()
    calls: list[tuple[float, float]] = []

    def caller() -> None:
        for _ in range(10):
            asked = time.monotonic()
            group.sync(str(tmp_path))
            with lock:
                calls.append((asked, time.monotonic()))

    threads = [threading.Thread(target=caller) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 160
    assert len(syncs) < 100  # shared
    for asked, returned in calls:
        assert any(asked <= start and end <= returned for start, end in syncs)
    assert group._waiting == {} and group._done == {} and group._busy == set()


def test_failed_fsync_is_raised_and_not_counted(monkeypatch, tmp_path):
    def broken(path: str) -> None:
        raise OSError(5, "I/O error")

    monkeypatch.setattr(durable, "_fsync_dir_now", broken)
    group = durable._GroupSync()
    for _ in range(2):
        try:
            group.sync(str(tmp_path))
        except OSError as exc:
            assert exc.errno == 5
        else:
            raise AssertionError("an fsync error must reach the caller")
    assert group._done == {}
