"""Each domain's health state on disk, and the status every reader shows (one model).

    <spool>/state/<domain>.json    {"state": "outage", "since": 1764590000.0, "reason": "451 ..."}

`write_state` replaces the file atomically (temp file, fsync, rename, fsync the directory);
`read_state` answers `normal` for a domain never recorded or a file that cannot be read. The
transitions themselves are `delivery/health.py`'s; this module only keeps them.

`domain_status()` is what `continuity-relay status`, the panel and the metrics show about one
domain: its state, its subscription, and its replay queue's entries per state and oldest age;
`outbound_status()` the same counts for the outbound queue (the metrics show it).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from relay.config import Config
from relay.storage.continuity import outbound_queue_path, replay_queue_path
from relay.storage.durable import Owner, make_dirs, replace_file
from relay.storage.queue import STATES, Queue

NORMAL, OUTAGE, REPLAYING = "normal", "outage", "replaying"


@dataclass(frozen=True)
class State:
    state: str = NORMAL
    since: float = 0.0
    reason: str = ""


def state_dir(spool: Path) -> Path:
    return spool / "state"


def read_state(directory: Path, domain: str) -> State:
    """The stored state of one domain (`directory` is `state_dir(spool)`); `normal` when
    nothing was ever recorded, or the file cannot be read."""
    try:
        raw = json.loads((directory / f"{domain}.json").read_text(encoding="utf-8"))
        return State(raw["state"], float(raw["since"]), raw.get("reason", ""))
    except (OSError, ValueError, KeyError, TypeError):
        return State()


def state_stamp(directory: Path, domain: str) -> tuple[int, int] | None:
    """The state file's identity (inode, mtime), None when there is none: changed means reread."""
    try:
        st = os.stat(directory / f"{domain}.json")
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


def write_state(directory: Path, domain: str, state: State, owner: Owner = Owner()) -> None:
    make_dirs(directory, owner)
    replace_file(directory / f"{domain}.json", json.dumps(asdict(state)).encode("utf-8"), 0o600, owner)


@dataclass(frozen=True)
class DomainStatus:
    """One domain as every status reader shows it."""

    name: str
    health: State
    subscribed: bool             # the continuity subscription covers today
    queue: dict[str, int]        # replay queue entries per state (waiting, active, failed, hold)
    oldest: float | None         # age in seconds of the oldest waiting entry


@dataclass(frozen=True)
class QueueStatus:
    """One queue as the status readers show it."""

    queue: dict[str, int]        # entries per state (waiting, active, failed, hold)
    oldest: float | None         # age in seconds of the oldest waiting entry


def queue_status(queue: Queue) -> QueueStatus:
    """Count a queue's entries (blocking: one listing per state, names only: no entry is opened
    or stat'ed, and nothing is sorted)."""
    counts = {state: queue.count(state) for state in STATES if state != "waiting"}
    counts["waiting"], oldest = queue.tally("waiting")
    return QueueStatus({state: counts[state] for state in STATES}, oldest)


def domain_status(config: Config, name: str) -> DomainStatus:
    """Read one domain's status (blocking: a state file and a few directory listings)."""
    queue = queue_status(Queue(replay_queue_path(config.storage.spool, name)))
    return DomainStatus(name, read_state(state_dir(config.storage.spool), name),
                        config.domains[name].continuity_active(), queue.queue, queue.oldest)


def summary(statuses: list[DomainStatus], outbound_waiting: int) -> str:
    """One line for systemd's STATUS= (`systemctl status`): domains in outage and replaying, and
    the messages waiting (replay queues waiting or active; outbound)."""
    outage = [s.name for s in statuses if s.health.state == OUTAGE]
    replaying = [s.name for s in statuses if s.health.state == REPLAYING]
    waiting = sum(s.queue["waiting"] + s.queue["active"] for s in statuses)
    named = ", ".join(outage[:5]) + (" ..." if len(outage) > 5 else "")
    parts = [f"{len(statuses)} domain(s)", f"in outage: {named or 'none'}"]
    if replaying:
        parts.append(f"replaying: {len(replaying)}")
    parts.append(f"{waiting} message(s) waiting for replay, {outbound_waiting} outbound")
    return "; ".join(parts)




def outbound_status(config: Config) -> QueueStatus:
    """The outbound queue's counts (blocking)."""
    return queue_status(Queue(outbound_queue_path(config.storage.spool)))
