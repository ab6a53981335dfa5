"""Planned outages: an administrator diverts a domain on purpose (maintenance, a migration).

    start(config, domain, until, reason, by)   `outage start`, the panel
    end(config, domain, by)                    `outage end`, the panel
    schedule / unschedule(config, domain, ...) the panel's windows (config.yaml has its own:
                                               `domains.<d>.planned`)
    tick(config)                               serve, every second: windows opening and
                                               closing, an `until` passing

A planned outage is the state `outage` with `planned` set (storage/state.py keeps it). While
it lasts, the inbound listener keeps mail as in any outage, without asking the primary, and
nothing the primary answers ends it (delivery/health.py); the replay runner does not probe.
Its end sets `replaying`: serve's replay runner drains what was kept, then the domain is
back to normal.

Each change is read, decided and written under the domain's state lock (`update_state`), so
two processes (a command and serve, two commands) never undo each other's change; serve
picks a change up within a second (`Health.refresh`) and tells its listeners, the alerts
among them, as for a change of its own.

A window opens (a planned outage until the window's end) when the domain's state last
changed before the window began. So a window the administrator ended early with `outage end`
stays closed, and a relay started in the middle of a window opens it. When a planned outage
reaches its `until` inside another window, it runs on to that window's end.
"""

from __future__ import annotations

import logging
import time

from relay.config import Config, Window
from relay.errors import PlannedError, StorageError
from relay.log import event
from relay.storage.durable import Owner
from relay.storage.state import (
    OUTAGE,
    REPLAYING,
    State,
    read_state,
    read_windows,
    state_dir,
    update_state,
    update_windows,
)

KEEP_ENDED = 86400.0      # the panel's windows are forgotten a day after they ended


def _owner(config: Config) -> Owner:
    return Owner.named(config.storage.owner)


def windows(config: Config, domain: str) -> list[Window]:
    """Every window of the domain, config's and the panel's, earliest first (blocking)."""
    found = [*config.domains[domain].planned, *read_windows(state_dir(config.storage.spool), domain)]
    return sorted(found, key=lambda w: (w.start, w.end))


def _planned(current: State, until: float | None, reason: str, now: float) -> State:
    since = current.since if current.state == OUTAGE else now    # an outage going on goes on
    return State(OUTAGE, since, reason or "planned outage", True, until)


def start(config: Config, domain: str, until: float | None, reason: str, by: str,
          now: float | None = None) -> State:
    """Divert `domain` now, until `until` (None: until `end`). A planned outage going on takes
    the new `until` and reason. Blocking."""
    now = time.time() if now is None else now
    if until is not None and until <= now:
        raise PlannedError(f"{domain}: --until is not in the future")
    _, new = update_state(state_dir(config.storage.spool), domain,
                          lambda current: _planned(current, until, reason, now), _owner(config))
    assert new is not None
    event("planned.started", logging.WARNING, domain=domain, until=moment(until), reason=new.reason,
          by=by)
    return new


def end(config: Config, domain: str, by: str, now: float | None = None) -> State:
    """End the domain's planned outage: replay runs. Blocking; PlannedError when there is none."""
    now = time.time() if now is None else now
    before, new = update_state(state_dir(config.storage.spool), domain,
                               lambda current: State(REPLAYING, now) if current.planned else None,
                               _owner(config))
    if new is None:
        raise PlannedError(f"{domain}: not in a planned outage (state {before.state})")
    event("planned.ended", domain=domain, lasted=int(now - before.since), by=by)
    return new


def _due(current: State, found: list[Window], now: float) -> tuple[State | None, str]:
    """What the schedule asks of a domain now: a new state (or None) and why."""
    inside = next((w for w in found if w.start <= now < w.end), None)
    if current.planned:
        if current.until is None or current.until > now:
            return None, ""
        if inside is not None:                 # reached its end inside a window: runs on
            return _planned(current, inside.end, inside.reason, now), "window"
        return State(REPLAYING, now), "until"
    if inside is not None and current.since < inside.start:
        return _planned(current, inside.end, inside.reason, now), "window"
    return None, ""


def tick(config: Config, now: float | None = None) -> list[str]:
    """Open and close what the schedule says (serve, every second; blocking). Returns the
    domains changed. A domain whose files cannot be written is logged and tried next time."""
    now = time.time() if now is None else now
    changed = []
    for domain in config.domains:
        try:
            if _tick(config, domain, now):
                changed.append(domain)
        except StorageError as exc:
            event("planned.tick_failed", logging.ERROR, domain=domain, error=exc)
    return changed


def _tick(config: Config, domain: str, now: float) -> bool:
    directory = state_dir(config.storage.spool)
    found = windows(config, domain)
    if _due(read_state(directory, domain), found, now)[0] is None:   # the usual case: no lock
        return False
    why: list[str] = []

    def change(current: State) -> State | None:
        new, reason = _due(current, found, now)
        why.append(reason)
        return new
    before, new = update_state(directory, domain, change, _owner(config))
    if new is None:
        return False
    if new.planned and not before.planned:
        event("planned.started", logging.WARNING, domain=domain, until=moment(new.until),
              reason=new.reason, by=why[-1])
    elif new.planned:
        event("planned.extended", domain=domain, until=moment(new.until), by=why[-1])
    else:
        event("planned.ended", domain=domain, lasted=int(now - before.since), by=why[-1])
    return True


def schedule(config: Config, domain: str, window: Window, by: str,
             now: float | None = None) -> list[Window]:
    """Add a window to the panel's schedule (blocking); returns the panel's windows."""
    now = time.time() if now is None else now
    if window.end <= window.start:
        raise PlannedError("the end must come after the start")
    if window.end <= now:
        raise PlannedError("that window has already ended")
    result = update_windows(state_dir(config.storage.spool), domain,
                            lambda old: [*_current(old, now), window], _owner(config))
    event("planned.scheduled", domain=domain, start=moment(window.start), end=moment(window.end),
          reason=window.reason, by=by)
    return result


def unschedule(config: Config, domain: str, window: Window, by: str,
               now: float | None = None) -> list[Window]:
    """Remove a window from the panel's schedule (blocking). A planned outage it opened goes
    on: ending that is `end`'s."""
    now = time.time() if now is None else now
    removed: list[bool] = []

    def change(old: list[Window]) -> list[Window]:
        removed.append(window in old)
        return [w for w in _current(old, now) if w != window]
    result = update_windows(state_dir(config.storage.spool), domain, change, _owner(config))
    if not removed[-1]:
        raise PlannedError(f"{domain}: no such window scheduled")
    event("planned.unscheduled", domain=domain, start=moment(window.start), end=moment(window.end),
          by=by)
    return result


def _current(found: list[Window], now: float) -> list[Window]:
    return [w for w in found if w.end > now - KEEP_ENDED]


def moment(stamp: float | None) -> str:
    if stamp is None:
        return "-"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(stamp))
