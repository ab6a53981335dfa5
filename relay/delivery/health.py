"""Per-domain health of the primary server, and when it changes.

    normal     the primary takes mail; nothing waits for replay
    outage     the primary answered 4xx or could not be reached; the replay runner probes it
    replaying  the primary answers again; the replay queue is being drained to it

normal -> outage on a temporary failure; outage -> replaying when a probe or a delivery
succeeds; replaying -> normal once the domain's replay queue is empty; replaying -> outage on
a temporary failure during replay. Each change is logged once, when it happens.

A planned outage (`delivery/planned.py`: `outage start`, the panel, a scheduled window) is an
`outage` with `planned` set. Nothing the primary does ends it: `primary_ok` and `replay_done`
leave it alone, so neither a probe, nor a delivery, nor the `replay` command takes the domain
out of it; only its end (`outage end`, `until` passing, the window closing) does, to
`replaying`, so the replay runner drains what was kept.

`get()` answers from memory: the SMTP hot path asks on every reply from a primary, so it must
not stat or read a file on the event loop. A change takes effect in memory at once and is
written (`storage/state.py`, so `status` and the `replay` command, run from other processes,
see it, and a restart remembers it) by one writer thread, in order. `refresh()` (blocking, from
a worker thread every `REFRESH` seconds while serving) picks up a change another process
wrote, unless one of ours happened meanwhile, and returns it; `announce()` (on the event loop)
logs it and tells the listeners, as for a change of our own.

Races with other processes (the `outage` command, the panel) are settled at the file, under
the domain's lock (`replace_state_unless`): the writer thread writes a transition only over
the file it last saw, or over one that is not planned. So a transition decided here on a
state another process has meanwhile replaced by a planned outage (a probe that answered, a
message the primary took) is dropped, and the next refresh adopts the planned outage; an
automatic observation over another automatic one still wins, as the later word on the primary.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from relay.errors import StorageError
from relay.log import event
from relay.storage.durable import Owner
from relay.storage.state import (
    NORMAL,
    OUTAGE,
    REPLAYING,
    Stamp,
    State,
    read_state,
    replace_state_unless,
    state_dir,
    state_stamp,
)

__all__ = ["NORMAL", "OUTAGE", "REPLAYING", "REFRESH", "Health", "State"]


REFRESH = 1.0      # seconds between rereads of the state files while serving
_STALE = (-1, -1)  # a stamp no file has: the next refresh rereads the domain


class Health:
    """Tracks each domain's state; `get` is a dictionary lookup."""

    def __init__(self, spool: Path, owner: Owner = Owner()) -> None:
        self.dir = state_dir(spool)
        self.owner = owner
        self._states: dict[str, tuple[Stamp, State]] = {}
        self._seen: dict[str, Stamp] = {}       # the file as we last read or wrote it
        self._pending: dict[str, int] = {}      # our writes not yet done, per domain
        self._changes = 0                       # our own changes so far (see refresh)
        self._lock = threading.Lock()
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="health")
        self._written: Future | None = None
        self._listeners: list[Callable[[str, State], None]] = []

    def listen(self, callback: Callable[[str, State], None]) -> None:
        """Call `callback(domain, new_state)` after every change (in the changing thread)."""
        self._listeners.append(callback)

    def get(self, domain: str) -> State:
        cached = self._states.get(domain)
        if cached is None:             # first ask (start-up, or a command): read it once
            self.refresh([domain])
            cached = self._states[domain]
        return cached[1]

    def refresh(self, domains: list[str] | None = None) -> list[tuple[str, State]]:
        """Reread the state files that changed on disk (blocking); returns the changes another
        process made (a domain seen before whose state is now different), for `announce`."""
        picked: list[tuple[str, State]] = []
        for domain in domains if domains is not None else list(self._states):
            with self._lock:
                changes = self._changes
                if self._pending.get(domain):       # ours is on its way to the file
                    continue
            stamp = state_stamp(self.dir, domain)
            cached = self._states.get(domain)
            if cached is not None and cached[0] == stamp:
                continue
            state = read_state(self.dir, domain)
            with self._lock:
                if self._changes == changes:    # none of ours since we looked: the file wins
                    self._states[domain] = (stamp, state)
                    self._seen[domain] = stamp
                    if cached is not None and cached[1] != state:
                        picked.append((domain, state))
        return picked

    def announce(self, changes: list[tuple[str, State]]) -> None:
        """Log and pass on the changes `refresh` picked up (call it on the listeners' thread)."""
        for domain, state in changes:
            self._tell(domain, state, source="file", **_planned_fields(state))

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until every change so far is on disk (blocking: commands, tests, shutdown)."""
        written = self._written
        if written is not None:
            written.result(timeout)

    def _set(self, domain: str, state: State, **fields: object) -> None:
        with self._lock:
            self._changes += 1
            self._states[domain] = (None, state)
            self._pending[domain] = self._pending.get(domain, 0) + 1
            self._written = self._writer.submit(self._write, domain, state)
        self._tell(domain, state, **fields)

    def _tell(self, domain: str, state: State, **fields: object) -> None:
        level = logging.WARNING if state.state == OUTAGE else logging.INFO
        event(f"health.{state.state}", level, domain=domain, **fields)
        for callback in self._listeners:
            callback(domain, state)

    def _write(self, domain: str, state: State) -> None:
        try:
            with self._lock:
                seen = self._seen.get(domain)
            written, stamp = replace_state_unless(self.dir, domain, state, seen,
                                                  lambda theirs: theirs.planned, self.owner)
        except (OSError, StorageError) as exc:     # memory stays right; the next change writes again
            event("health.write_failed", logging.ERROR, domain=domain, error=exc)
            return
        finally:
            with self._lock:
                self._pending[domain] -= 1
        with self._lock:
            current = self._states.get(domain)
            if written:
                self._seen[domain] = stamp
            if current is not None and current[1] == state:
                # written: memory and file agree; dropped (a planned outage another process
                # wrote meanwhile): the next refresh adopts the file and announces it
                self._states[domain] = (stamp if written else _STALE, state)
        if not written:
            event("health.superseded", domain=domain, dropped=state.state, reason="planned outage")

    def primary_failed(self, domain: str, reason: str) -> None:
        """The primary answered 4xx or could not be reached."""
        if self.get(domain).state != OUTAGE:
            self._set(domain, State(OUTAGE, time.time(), reason), reason=reason)

    def primary_ok(self, domain: str) -> None:
        """The primary answered a probe or accepted a message: replay can start (never the
        end of a planned outage)."""
        current = self.get(domain)
        if current.state == OUTAGE and not current.planned:
            self._set(domain, State(REPLAYING, time.time()),
                      outage_seconds=int(time.time() - current.since))

    def replay_done(self, domain: str) -> None:
        """Nothing is left to replay (a planned outage goes on all the same)."""
        current = self.get(domain)
        if current.state != NORMAL and not current.planned:
            self._set(domain, State(NORMAL, time.time()))


def _planned_fields(state: State) -> dict[str, object]:
    if not state.planned:
        return {}
    return {"planned": "yes", "until": int(state.until) if state.until is not None else "-"}
