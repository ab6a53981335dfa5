"""Durable writes: group-committed directory fsyncs never return before a covering fsync."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

from relay.storage import durable
from tests.helpers import wait_for


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


def test_a_fsync_that_ends_wakes_only_the_threads_waiting_for_its_directory(monkeypatch):
    """A kept message syncs three directories at once with other sessions': a waiter for one
    must not be woken (and take the GIL to wait again) each time another directory's fsync
    ends. Counted at the notify: the waiters a notify_all found while A was still busy."""
    a_started, a_may_end = threading.Event(), threading.Event()
    woken_early: list[int] = []

    class Counting(threading.Condition):
        def notify_all(self) -> None:
            if not a_may_end.is_set():
                woken_early.append(len(self._waiters))   # CPython's list of waiting threads
            super().notify_all()

    monkeypatch.setattr(durable, "threading", SimpleNamespace(Condition=Counting, Lock=threading.Lock))

    def fsync(path: str) -> None:
        if path == "A" and not a_started.is_set():
            a_started.set()
            assert a_may_end.wait(10)

    monkeypatch.setattr(durable, "_fsync_dir_now", fsync)
    group = durable._GroupSync()
    first = threading.Thread(target=group.sync, args=("A",))
    first.start()
    assert a_started.wait(10)
    waiter = threading.Thread(target=group.sync, args=("A",))
    waiter.start()
    # Counted under the lock, which it holds until wait() lets go: B's ends come after.
    wait_for(lambda: group._waiting.get("A") == 1, what="the second caller for A to wait")
    for _ in range(5):
        group.sync("B")
    a_may_end.set()
    first.join(10)
    waiter.join(10)
    assert not first.is_alive() and not waiter.is_alive()
    assert sum(woken_early) == 0, woken_early
    assert group._waiting == {} and group._done == {} and group._busy == set() and group._conds == {}
