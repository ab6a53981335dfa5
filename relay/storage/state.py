"""Each domain's health state on disk, and the status every reader shows (one model).

    <spool>/state/<domain>.json          {"state": "outage", "since": 1764590000.0,
                                          "reason": "451 ...", "planned": false, "until": null}
    <spool>/state/<domain>.lock          taken (flock) around every write of the state file
    <spool>/state/<domain>.windows.json  planned outage windows scheduled in the panel

`write_state` replaces the file atomically (temp file, fsync, rename, fsync the directory);
`read_state` answers `normal` for a domain never recorded or a file that cannot be read. The
transitions themselves are `delivery/health.py`'s and `delivery/planned.py`'s; this module
only keeps them.

Two kinds of process write a state file: `serve` (its health transitions, and the planned
windows it starts and ends) and the commands (`outage start|end`, `replay`, the panel's own
handlers, which share serve's process but not its memory). Every write happens under the
domain's lock: `update_state` reads, decides and writes under it (the `outage` command, the
panel), and `replace_state_if` writes only when the file is still the one the writer last saw
(serve's writer thread: a transition decided on a state that another process has meanwhile
replaced is not written over it; see `Health._write`). A crash leaves the old file or the new
one; a lock dies with its holder.

`domain_status()` is what `continuity-relay status`, the panel and the metrics show about one
domain: its state, its subscription, and its replay queue's entries per state and oldest age;
`outbound_status()` the same counts for the outbound queue (the metrics show it).
"""

from __future__ import annotations

import fcntl
import json
import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from relay.config import Config, Window
from relay.storage.continuity import outbound_queue_path, replay_queue_path
from relay.storage.durable import Owner, make_dirs, replace_file
from relay.storage.queue import STATES, Queue

NORMAL, OUTAGE, REPLAYING = "normal", "outage", "replaying"


@dataclass(frozen=True)
class State:
    state: str = NORMAL
    since: float = 0.0
    reason: str = ""
    planned: bool = False          # an administrator's outage (only with OUTAGE): see planned.py
    until: float | None = None     # a planned outage ends by itself then (None: by `outage end`)


Stamp = tuple[int, int] | None


def state_dir(spool: Path) -> Path:
    return spool / "state"


def read_state(directory: Path, domain: str) -> State:
    """The stored state of one domain (`directory` is `state_dir(spool)`); `normal` when
    nothing was ever recorded, or the file cannot be read."""
    try:
        raw = json.loads((directory / f"{domain}.json").read_text(encoding="utf-8"))
        until = raw.get("until")
        state = State(raw["state"], float(raw["since"]), str(raw.get("reason", "")),
                      raw.get("planned") is True and raw["state"] == OUTAGE,
                      float(until) if until is not None else None)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return State()
    if state.state not in (NORMAL, OUTAGE, REPLAYING) or not math.isfinite(state.since):
        return State()
    return state


def state_stamp(directory: Path, domain: str) -> Stamp:
    """The state file's identity (inode, mtime), None when there is none: changed means reread."""
    try:
        st = os.stat(directory / f"{domain}.json")
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


def write_state(directory: Path, domain: str, state: State, owner: Owner = Owner()) -> None:
    """Replace the state file, under the domain's lock (tests and start-up set states so)."""
    with state_lock(directory, domain, owner):
        _replace(directory, domain, state, owner)


def _replace(directory: Path, domain: str, state: State, owner: Owner) -> None:
    replace_file(directory / f"{domain}.json", json.dumps(asdict(state)).encode("utf-8"), 0o600, owner)


@contextmanager
def state_lock(directory: Path, domain: str, owner: Owner = Owner()) -> Iterator[None]:
    """The domain's state lock (flock: released when its holder dies). Made here rather than
    with filelock so that a lock file a root command creates is handed to the mail user, who
    runs serve and must open it too."""
    make_dirs(directory, owner)
    fd = os.open(directory / f"{domain}.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    try:
        owner.claim(fd)
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)            # closing the descriptor releases the lock


def update_state(directory: Path, domain: str, change: Callable[[State], State | None],
                 owner: Owner = Owner()) -> tuple[State, State | None]:
    """Read, decide and write under the lock: `change(current)` gives the new state, or None to
    leave the file alone. Returns (the state before, the state written or None)."""
    with state_lock(directory, domain, owner):
        current = read_state(directory, domain)
        new = change(current)
        if new is not None:
            _replace(directory, domain, new, owner)
        return current, new


def replace_state_unless(directory: Path, domain: str, state: State, seen: Stamp,
                         theirs_wins: Callable[[State], bool],
                         owner: Owner = Owner()) -> tuple[bool, Stamp]:
    """Write `state`, unless the file was replaced since the writer last saw it (stamp `seen`)
    and `theirs_wins(what the file holds now)`. Returns (written, the file's stamp now)."""
    with state_lock(directory, domain, owner):
        now = state_stamp(directory, domain)
        if now != seen and theirs_wins(read_state(directory, domain)):
            return False, now
        _replace(directory, domain, state, owner)
        return True, state_stamp(directory, domain)


# -- planned windows scheduled in the panel (config windows live in config.yaml) -----------------

def read_windows(directory: Path, domain: str) -> list[Window]:
    """The windows scheduled in the panel, earliest first; none when the file cannot be read."""
    try:
        raw = json.loads((directory / f"{domain}.windows.json").read_text(encoding="utf-8"))
        windows = [Window(float(w["start"]), float(w["end"]), str(w.get("reason", ""))) for w in raw]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []
    return sorted(windows, key=lambda w: (w.start, w.end))


def update_windows(directory: Path, domain: str, change: Callable[[list[Window]], list[Window]],
                   owner: Owner = Owner()) -> list[Window]:
    """Read, change and write the panel's windows under the domain's lock."""
    with state_lock(directory, domain, owner):
        windows = sorted(change(read_windows(directory, domain)), key=lambda w: (w.start, w.end))
        data = json.dumps([asdict(w) for w in windows]).encode("utf-8")
        replace_file(directory / f"{domain}.windows.json", data, 0o600, owner)
        return windows


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
