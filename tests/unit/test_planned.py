"""Planned outages (issue 12, point 4): start and end under the state lock, windows opened and
closed by the schedule, and serve's Health never writing a transition over a planned outage
another process wrote meanwhile."""

from __future__ import annotations

import textwrap

import pytest

from relay.config import Window, load
from relay.delivery import planned
from relay.delivery.health import OUTAGE, REPLAYING, Health
from relay.errors import ConfigErrors, PlannedError
from relay.storage.state import NORMAL, State, read_state, state_dir, write_state

DOMAIN = "example.com"


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(textwrap.dedent("""\
        hostname: relay.test
        listen: {inbound: 127.0.0.1:2525}
        storage: {maildirs: maildirs, spool: spool}
        domains:
          example.com:
            primary: 127.0.0.1:2526
            planned:
              - {start: "2030-01-01T20:00:00Z", end: "2030-01-01T22:00:00Z", reason: migration}
        """))
    return load(path)


def _state(config) -> State:
    return read_state(state_dir(config.storage.spool), DOMAIN)


def test_config_reads_windows_and_names_bad_ones(config, tmp_path):
    assert config.domains[DOMAIN].planned == (Window(1893528000.0, 1893535200.0, "migration"),)
    path = tmp_path / "bad.yaml"
    path.write_text(textwrap.dedent("""\
        listen: {inbound: 127.0.0.1:2525}
        storage: {maildirs: m, spool: s}
        domains:
          example.com:
            primary: 127.0.0.1:2526
            planned:
              - {start: "2030-01-01 22:00", end: "2030-01-01 20:00"}
              - {start: tomorrow, end: "2030-01-02 20:00", why: x}
        """))
    with pytest.raises(ConfigErrors) as caught:
        load(path)
    text = str(caught.value)
    assert "domains.example.com.planned[0].end: must be after start" in text
    assert "domains.example.com.planned[1].start: expected a time" in text
    assert "domains.example.com.planned[1].why: unknown setting" in text


def test_start_and_end(config):
    state = planned.start(config, DOMAIN, 2e9, "disk swap", "root", now=1e9)
    assert state == State(OUTAGE, 1e9, "disk swap", True, 2e9) == _state(config)
    assert planned.end(config, DOMAIN, "root", now=1.5e9) == State(REPLAYING, 1.5e9) == _state(config)
    with pytest.raises(PlannedError, match="not in a planned outage"):
        planned.end(config, DOMAIN, "root")
    with pytest.raises(PlannedError, match="not in the future"):
        planned.start(config, DOMAIN, 10.0, "", "root", now=20.0)


def test_an_outage_going_on_keeps_its_start_when_planned(config):
    write_state(state_dir(config.storage.spool), DOMAIN, State(OUTAGE, 5.0, "451 down"))
    expected = State(OUTAGE, 5.0, "planned outage", True)
    assert planned.start(config, DOMAIN, None, "", "root", now=9.0) == expected


def test_window_opens_closes_and_an_early_end_stays_closed(config):
    w = config.domains[DOMAIN].planned[0]
    assert planned.tick(config, now=w.start - 1) == []
    assert planned.tick(config, now=w.start + 1) == [DOMAIN]
    assert _state(config) == State(OUTAGE, w.start + 1, "migration", True, w.end)
    assert planned.tick(config, now=w.start + 2) == []
    planned.end(config, DOMAIN, "root", now=w.start + 60)       # ended early by hand
    assert planned.tick(config, now=w.start + 61) == []
    assert _state(config).state == REPLAYING


def test_until_passing_ends_it_and_back_to_back_windows_run_on(config):
    w = config.domains[DOMAIN].planned[0]
    later = Window(w.end, w.end + 3600, "second half")
    planned.schedule(config, DOMAIN, later, "root", now=w.start - 10)
    assert planned.windows(config, DOMAIN) == [w, later]
    planned.tick(config, now=w.start)
    assert planned.tick(config, now=w.end) == [DOMAIN]           # runs on into the next one
    assert _state(config) == State(OUTAGE, w.start, "second half", True, later.end)
    assert planned.tick(config, now=later.end) == [DOMAIN]
    assert _state(config) == State(REPLAYING, later.end)
    planned.unschedule(config, DOMAIN, later, "root", now=later.end)
    assert planned.windows(config, DOMAIN) == [w]
    with pytest.raises(PlannedError, match="no such window"):
        planned.unschedule(config, DOMAIN, later, "root")


def test_a_relay_started_inside_a_window_opens_it(config):
    w = config.domains[DOMAIN].planned[0]
    write_state(state_dir(config.storage.spool), DOMAIN, State(NORMAL, w.start - 3600))
    assert planned.tick(config, now=w.end - 1) == [DOMAIN]
    assert _state(config).planned


def test_health_never_writes_over_a_planned_outage_it_had_not_seen(config):
    """The race: serve's memory says outage; the command writes a planned outage; before serve
    refreshes, a probe answers and serve decides `replaying`. Its write must be dropped, and
    the next refresh must adopt and announce the planned outage."""
    spool = config.storage.spool
    health = Health(spool)
    health.primary_failed(DOMAIN, "451 down")
    health.flush()
    told: list[tuple[str, State]] = []
    health.listen(lambda domain, state: told.append((domain, state)))
    planned.start(config, DOMAIN, None, "migration", "root")    # "another process"
    health.primary_ok(DOMAIN)                                    # stale: decided on "outage"
    health.flush()
    assert _state(config).planned                                # not overwritten
    changes = health.refresh()
    assert [(d, s.planned) for d, s in changes] == [(DOMAIN, True)]
    health.announce(changes)
    assert health.get(DOMAIN).planned
    assert told[-1][1].planned


def test_health_does_not_end_a_planned_outage(config):
    health = Health(config.storage.spool)
    planned.start(config, DOMAIN, None, "", "root")
    health.primary_ok(DOMAIN)
    health.replay_done(DOMAIN)
    health.primary_failed(DOMAIN, "451")
    health.flush()
    assert health.get(DOMAIN).planned and _state(config).planned


def test_an_automatic_change_elsewhere_is_still_overwritten_by_a_later_one(config):
    spool = config.storage.spool
    health = Health(spool)
    health.get(DOMAIN)
    write_state(state_dir(spool), DOMAIN, State(OUTAGE, 1.0, "451 from the replay command"))
    health.primary_failed(DOMAIN, "451 seen here")
    health.flush()
    assert _state(config).reason == "451 seen here"


def test_refresh_does_not_undo_a_change_on_its_way_to_the_file(config, monkeypatch):
    """Between `_set` and the writer thread's write, a refresh used to read the old file and
    put the old state back in memory (for up to a second)."""
    import relay.delivery.health as health_module

    spool = config.storage.spool
    health = Health(spool)
    health.get(DOMAIN)
    real = health_module.replace_state_unless
    seen: list[State] = []

    def slow(*args, **kwargs):
        health.refresh([DOMAIN])                  # a refresh while the write is in hand
        seen.append(health.get(DOMAIN))
        return real(*args, **kwargs)
    monkeypatch.setattr(health_module, "replace_state_unless", slow)
    health.primary_failed(DOMAIN, "451 down")
    health.flush()
    assert [s.state for s in seen] == [OUTAGE]
    assert health.get(DOMAIN).state == OUTAGE
