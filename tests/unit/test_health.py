"""Health answers from memory, writes in order off the caller's thread, and sees what another
process (the `replay` command) wrote once refreshed (issue 10: hot-path lookups)."""

from __future__ import annotations

import os

from relay.delivery.health import OUTAGE, REPLAYING, Health
from relay.storage.state import NORMAL, State, read_state, state_dir, write_state


def test_get_is_memory_after_the_first_read_and_changes_reach_the_file(tmp_path, monkeypatch):
    health = Health(tmp_path)
    assert health.get("example.com").state == NORMAL          # read once (nothing there)
    stats: list[object] = []
    real = os.stat
    monkeypatch.setattr(os, "stat", lambda *a, **k: stats.append(a[0]) or real(*a, **k))
    for _ in range(100):
        assert health.get("example.com").state == NORMAL
    assert stats == []
    monkeypatch.undo()
    health.primary_failed("example.com", "451 4.3.0 down")
    assert health.get("example.com").state == OUTAGE            # at once, before the write
    health.primary_ok("example.com")
    health.flush()
    assert read_state(state_dir(tmp_path), "example.com").state == REPLAYING   # in order


def test_refresh_sees_another_process_write_but_never_undoes_our_newer_change(tmp_path):
    health = Health(tmp_path)
    health.refresh(["example.com"])
    write_state(state_dir(tmp_path), "example.com", State(OUTAGE, 1.0, "451 from the command"))
    assert health.get("example.com").state == NORMAL            # not yet refreshed
    health.refresh()
    assert health.get("example.com") == State(OUTAGE, 1.0, "451 from the command")
    health.primary_ok("example.com")
    health.flush()
    health.refresh()
    assert health.get("example.com").state == REPLAYING
    assert read_state(state_dir(tmp_path), "example.com").state == REPLAYING
