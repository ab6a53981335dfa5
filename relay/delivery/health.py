"""Per-domain health of the primary server, and when it changes.

    normal     the primary takes mail; nothing waits for replay
    outage     the primary answered 4xx or could not be reached; the replay runner probes it
    replaying  the primary answers again; the replay queue is being drained to it

normal -> outage on a temporary failure; outage -> replaying when a probe or a delivery
succeeds; replaying -> normal once the domain's replay queue is empty; replaying -> outage on
a temporary failure during replay. Each change is logged once, when it happens.

`get()` answers from memory: the SMTP hot path asks on every reply from a primary, so it must
not stat or read a file on the event loop. A change takes effect in memory at once and is
written (`storage/state.py`, so `status` and the `replay` command, run from other processes,
see it, and a restart remembers it) by one writer thread, in order. `refresh()` (blocking, from
a worker thread every `REFRESH` seconds while serving) picks up a change another process
wrote, unless one of ours happened meanwhile.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from relay.log import event
from relay.storage.durable import Owner
from relay.storage.state import (
    NORMAL,
    OUTAGE,
    REPLAYING,
    State,
    read_state,
    state_dir,
    state_stamp,
    write_state,
)

__all__ = ["NORMAL", "OUTAGE", "REPLAYING", "REFRESH", "Health", "State"]


REFRESH = 1.0      # seconds between rereads of the state files while serving


class Health:
    """Tracks each domain's state; `get` is a dictionary lookup."""

    def __init__(self, spool: Path, owner: Owner = Owner()) -> None:
        self.dir = state_dir(spool)
        self.owner = owner
        self._states: dict[str, tuple[tuple[int, int] | None, State]] = {}
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

    def refresh(self, domains: list[str] | None = None) -> None:
        """Reread the state files that changed on disk (blocking)."""
        for domain in domains if domains is not None else list(self._states):
            with self._lock:
                changes = self._changes
            stamp = state_stamp(self.dir, domain)
            cached = self._states.get(domain)
            if cached is not None and cached[0] == stamp:
                continue
            state = read_state(self.dir, domain)
            with self._lock:
                if self._changes == changes:    # none of ours since we looked: the file wins
                    self._states[domain] = (stamp, state)

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until every change so far is on disk (blocking: commands, tests, shutdown)."""
        written = self._written
        if written is not None:
            written.result(timeout)

    def _set(self, domain: str, state: State, **fields: object) -> None:
        with self._lock:
            self._changes += 1
            self._states[domain] = (None, state)
            self._written = self._writer.submit(self._write, domain, state)
        level = logging.WARNING if state.state == OUTAGE else logging.INFO
        event(f"health.{state.state}", level, domain=domain, **fields)
        for callback in self._listeners:
            callback(domain, state)

    def _write(self, domain: str, state: State) -> None:
        try:
            write_state(self.dir, domain, state, self.owner)
        except OSError as exc:     # memory stays right; the next change writes again
            event("health.write_failed", logging.ERROR, domain=domain, error=exc.strerror or exc)
            return
        with self._lock:
            current = self._states.get(domain)
            if current is not None and current[1] == state:
                self._states[domain] = (state_stamp(self.dir, domain), state)

    def primary_failed(self, domain: str, reason: str) -> None:
        """The primary answered 4xx or could not be reached."""
        if self.get(domain).state != OUTAGE:
            self._set(domain, State(OUTAGE, time.time(), reason), reason=reason)

    def primary_ok(self, domain: str) -> None:
        """The primary answered a probe or accepted a message: replay can start."""
        current = self.get(domain)
        if current.state == OUTAGE:
            self._set(domain, State(REPLAYING, time.time()),
                      outage_seconds=int(time.time() - current.since))

    def replay_done(self, domain: str) -> None:
        """Nothing is left to replay."""
        if self.get(domain).state != NORMAL:
            self._set(domain, State(NORMAL, time.time()))
