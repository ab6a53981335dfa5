"""Per-domain health of the primary server, and when it changes.

    normal     the primary takes mail; nothing waits for replay
    outage     the primary answered 4xx or could not be reached; the replay runner probes it
    replaying  the primary answers again; the replay queue is being drained to it

normal -> outage on a temporary failure; outage -> replaying when a probe or a delivery
succeeds; replaying -> normal once the domain's replay queue is empty; replaying -> outage on
a temporary failure during replay. Each change is logged once, when it happens.

The state lives in `<spool>/state/<domain>.json` (written atomically), so `status` and the
`replay` command, run from other processes, see it, and a restart remembers it. A process
re-reads the file when another one changed it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from relay.log import event
from relay.storage.durable import Owner, make_dirs, replace_file

log = logging.getLogger("relay.health")

NORMAL, OUTAGE, REPLAYING = "normal", "outage", "replaying"


@dataclass(frozen=True)
class State:
    state: str = NORMAL
    since: float = 0.0
    reason: str = ""


class Health:
    """Tracks each domain's state; cheap to call on every reply from a primary."""

    def __init__(self, spool: Path, owner: Owner = Owner()) -> None:
        self.dir = spool / "state"
        self.owner = owner
        self._states: dict[str, tuple[tuple[int, int] | None, State]] = {}
        self._listeners: list[Callable[[str, State], None]] = []

    def listen(self, callback: Callable[[str, State], None]) -> None:
        """Call `callback(domain, new_state)` after every change (in the changing thread)."""
        self._listeners.append(callback)

    def _path(self, domain: str) -> Path:
        return self.dir / f"{domain}.json"

    def get(self, domain: str) -> State:
        try:
            st = os.stat(self._path(domain))
            stamp: tuple[int, int] | None = (st.st_ino, st.st_mtime_ns)
        except FileNotFoundError:
            stamp = None
        cached = self._states.get(domain)
        if cached is None or cached[0] != stamp:
            cached = (stamp, read_state(self.dir, domain))
            self._states[domain] = cached
        return cached[1]

    def _set(self, domain: str, state: State, **fields: object) -> None:
        make_dirs(self.dir, self.owner)
        replace_file(self._path(domain), json.dumps(state.__dict__).encode("utf-8"), 0o600, self.owner)
        self._states.pop(domain, None)
        level = logging.WARNING if state.state == OUTAGE else logging.INFO
        event(log, f"health.{state.state}", level, domain=domain, **fields)
        for callback in self._listeners:
            callback(domain, state)

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


def read_state(directory: Path, domain: str) -> State:
    """The stored state of one domain; `normal` when nothing was ever recorded."""
    try:
        raw = json.loads((directory / f"{domain}.json").read_text(encoding="utf-8"))
        return State(raw["state"], float(raw["since"]), raw.get("reason", ""))
    except (OSError, ValueError, KeyError, TypeError):
        return State()
