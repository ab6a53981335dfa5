"""Per-domain health of the primary server: `normal` or `outage`, since when.

The state lives in `<spool>/state/<domain>.json` (written atomically), so `status` run from
another process sees it and a restart remembers it. Each change is logged once, when it
happens, not on every attempt.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from relay.log import event
from relay.storage.durable import Owner, make_dirs, replace_file

log = logging.getLogger("relay.health")

NORMAL, OUTAGE = "normal", "outage"


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
        self._states: dict[str, State] = {}

    def get(self, domain: str) -> State:
        if domain not in self._states:
            self._states[domain] = read_state(self.dir, domain)
        return self._states[domain]

    def _set(self, domain: str, state: State) -> None:
        make_dirs(self.dir, self.owner)
        replace_file(self.dir / f"{domain}.json",
                     json.dumps(state.__dict__).encode("utf-8"), 0o600, self.owner)
        self._states[domain] = state

    def primary_failed(self, domain: str, reason: str) -> None:
        """The primary answered 4xx or could not be reached."""
        if self.get(domain).state != OUTAGE:
            self._set(domain, State(OUTAGE, time.time(), reason))
            event(log, "health.outage", logging.WARNING, domain=domain, reason=reason)

    def primary_ok(self, domain: str) -> None:
        """The primary accepted a message."""
        current = self.get(domain)
        if current.state != NORMAL:
            self._set(domain, State(NORMAL, time.time()))
            event(log, "health.normal", domain=domain,
                  outage_seconds=int(time.time() - current.since))


def read_state(directory: Path, domain: str) -> State:
    """The stored state of one domain; `normal` when nothing was ever recorded."""
    try:
        raw = json.loads((directory / f"{domain}.json").read_text(encoding="utf-8"))
        return State(raw["state"], float(raw["since"]), raw.get("reason", ""))
    except (OSError, ValueError, KeyError, TypeError):
        return State()
