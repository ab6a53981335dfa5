"""Crash-safe queues: the spine every piece of deferred work goes through.

One queue is one directory (for example `<spool>/replay/<domain>/`):

    msg/<id>       the message bytes; a hard link to the Maildir copy when there is one, so a
                   user deleting the message over IMAP does not stop it from being replayed
    tmp/<id>       an envelope being written
    waiting/<id>   envelope (JSON), the commit marker: the entry exists once this name exists
    active/<id>    claimed by a runner (claim = rename, so two workers never own one entry)
    failed/<id>    refused for good; kept for `status` and the administrator
    hold/<id>      set aside after crashing the runner `MAX_CRASHES` times; never retried alone

The retry and hold policy is written here once (`retry_delay`, `MAX_CRASHES`) and applied by the
moves a runner makes (`crashed`, `defer`, `requeue`, `unclaim`, `fail`, `set_aside`) and by
`recover()`.
A deferred entry waits in waiting/ with `extra["next_try"]`; `pending()` remembers each
envelope it read by the file's identity (inode, mtime), so a sweep rereads only the envelopes
that changed since the last one: a rewrite (a runner's or the administrator's) is a new file.

Ids sort by arrival time, so "oldest first" is a sort of file names.

What a crash leaves, and what `recover()` (run at start-up) does with it:
  - msg/<id> without an envelope in any state: the enqueue never committed -> removed
  - tmp/<id>: a half-written envelope -> removed
  - active/<id>: the runner died holding it -> back to waiting with crashes+1, or to hold/
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from relay.errors import CorruptEntryError, EntryError, StorageError
from relay.storage.durable import Owner, create_written, fsync_dir, make_dirs, write_new

STATES = ("waiting", "active", "failed", "hold")
MAX_CRASHES = 3            # an entry that crashed a runner this often is set aside in hold/
MAX_DELAY = 3600.0         # the longest wait between two tries of one entry


def retry_delay(first: float, attempts: int) -> float:
    """first, 2*first, 4*first ... capped at an hour (or at `first` when that is longer)."""
    return min(first * 2 ** max(attempts - 1, 0), max(first, MAX_DELAY))


@dataclass(frozen=True)
class Envelope:
    """What the queue knows about an entry besides its bytes."""

    mail_from: str
    rcpt: str
    received_at: float
    skip: int = 0            # bytes at the top of msg/<id> not to pass on (our Maildir headers)
    mail_options: tuple[str, ...] = ()
    rcpt_options: tuple[str, ...] = ()   # RFC 3461 NOTIFY= and ORCPT=, passed on with RCPT
    crashes: int = 0
    attempts: int = 0
    note: str = ""           # the last failure, for status and DSNs
    extra: dict = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        # The fields as they are (json writes a tuple as a list): `asdict` deep-copies each
        # value first, a tenth of what a kept message costs the storage thread in Python.
        return json.dumps({name: getattr(self, name) for name in _FIELDS}, sort_keys=True).encode("utf-8")

    @classmethod
    def from_bytes(cls, data: bytes) -> Envelope:
        raw = json.loads(data)
        raw["mail_options"] = tuple(raw.get("mail_options", ()))
        raw["rcpt_options"] = tuple(raw.get("rcpt_options", ()))
        return cls(**raw)


_FIELDS = tuple(f.name for f in fields(Envelope))


def _read_plain(path: Path | str, skip: int = 0) -> bytes:
    """A queue file's bytes after the first `skip` (read past, so a big message is never in
    memory twice): the spool belongs to the mail user, so a symlink, FIFO or device planted
    there is refused (OSError), never followed or waited on. Plain os calls on one
    descriptor: a sweep reads every new envelope, 100,000 of them after a start-up."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        if skip:
            os.lseek(fd, skip, os.SEEK_SET)
        chunks = []
        while chunk := os.read(fd, max(st.st_size - skip, 4096) + 1):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


@dataclass
class Staged:
    """An entry `Queue.stage_link` began: msg/<entry> and tmp/<entry> exist, unsynced. What a
    crash leaves before `commit()` is what `recover()` removes (no envelope in waiting/)."""

    queue: Queue
    entry: str
    fd: int | None = None           # tmp/<entry>'s, open until commit() fsyncs it

    def commit(self) -> None:
        """The envelope and msg/ made durable, then the entry exists (waiting/<entry>); the
        source's own fsync must have come first. Durable only after `settle()`."""
        dirs = self.queue._dirs
        try:
            assert self.fd is not None
            try:
                os.fsync(self.fd)
            finally:
                os.close(self.fd)
                self.fd = None
            fsync_dir(dirs["msg"])
            os.rename(f"{dirs['tmp']}/{self.entry}", f"{dirs['waiting']}/{self.entry}")
        except OSError as exc:
            raise StorageError(f"queue {self.queue.root}: {exc.strerror or exc}") from exc

    def settle(self) -> None:
        """waiting/ fsync'd: the entry is durable."""
        try:
            fsync_dir(self.queue._dirs["waiting"])
        except OSError as exc:
            raise StorageError(f"queue {self.queue.root}: {exc.strerror or exc}") from exc

    def abandon(self) -> None:
        """An error before `commit()`: the descriptor closed; the files are `recover()`'s."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


@dataclass(frozen=True)
class Pending:
    """A waiting entry as a sweep sees it: whom it is for and when it may be tried."""

    id: str
    rcpt: str
    next_try: float


class Queue:
    """One queue directory; safe to use from several threads of one process."""

    def __init__(self, root: Path, owner: Owner = Owner()) -> None:
        self.root = root
        self.owner = owner
        self._counter = itertools.count()
        self._made = False
        self._lock = threading.Lock()
        self._known: dict[str, tuple[tuple[int, int], Pending]] = {}   # see pending()
        # Plain strings for what runs once an entry (an enqueue, a sweep's reads): pathlib's
        # joins cost more than the system calls they feed.
        self._dirs = {name: os.fspath(root / name) for name in ("msg", "tmp", *STATES)}

    def _dir(self, name: str) -> Path:
        return self.root / name

    def _ensure(self) -> None:
        if not self._made:
            for name in ("msg", "tmp", *STATES):
                make_dirs(self._dir(name), self.owner)
            self._made = True

    def new_id(self) -> str:
        with self._lock:
            n = next(self._counter)
        return f"{time.time_ns():016x}.{os.getpid()}.{n:06d}"

    def enqueue_link(self, source: Path | str, envelope: Envelope) -> str:
        """Queue the file at `source` by hard link (a copy across file systems)."""
        return self._enqueue(lambda target: self._link(source, target), envelope)

    def _link(self, source: Path | str, target: Path | str) -> None:
        try:
            os.link(source, target, follow_symlinks=False)  # a link is linked, never its target
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                raise
            write_new(target, _read_plain(Path(source)), owner=self.owner)

    def stage_link(self, source: str, envelope: Envelope) -> Staged:
        """Begin an entry for the file at `source`, written but maybe not yet fsync'd: its
        envelope written to tmp/ and `source` linked into msg/, none of it fsync'd yet, so
        that the caller's own fsync of `source` commits these too. `Staged.commit()` (once
        `source` is fsync'd) and `Staged.settle()` finish it, as `enqueue_link` does."""
        staged = Staged(self, self.new_id())
        try:
            self._ensure()
            staged.fd = create_written(f"{self._dirs['tmp']}/{staged.entry}", envelope.to_bytes(),
                                       owner=self.owner)
            os.link(source, f"{self._dirs['msg']}/{staged.entry}", follow_symlinks=False)
            return staged
        except OSError as exc:
            staged.abandon()
            raise StorageError(f"queue {self.root}: {exc.strerror or exc}") from exc

    def enqueue_bytes(self, data: bytes, envelope: Envelope) -> str:
        """Queue a message given as bytes."""
        return self._enqueue(lambda target: write_new(target, data, owner=self.owner), envelope)

    def enqueue_many(self, data: bytes, envelopes: list[Envelope]) -> list[str]:
        """Queue one message for several envelopes, its bytes written once and hard-linked.
        The entries appear in waiting/ together (renamed one after another, one directory
        fsync for all), so a runner's sweep finds a message's recipients together and sends
        them in one transaction; a crash before the renames leaves only what `recover` removes."""
        self._ensure()
        source = self._dir("tmp") / f"{self.new_id()}.msg"
        try:
            write_new(source, data, owner=self.owner)
            entries = [self.new_id() for _ in envelopes]
            for entry in entries:
                self._link(source, self._dir("msg") / entry)
            fsync_dir(self._dir("msg"))
            for entry, envelope in zip(entries, envelopes, strict=True):
                write_new(self._dir("tmp") / entry, envelope.to_bytes(), owner=self.owner)
            for entry in entries:
                os.rename(self._dir("tmp") / entry, self._dir("waiting") / entry)
            fsync_dir(self._dir("waiting"))
            return entries
        except OSError as exc:
            raise StorageError(f"queue {self.root}: {exc.strerror or exc}") from exc
        finally:
            source.unlink(missing_ok=True)

    def _enqueue(self, place: Callable[[str], None], envelope: Envelope) -> str:
        """msg/<id> first, then the envelope: the entry exists once waiting/<id> does."""
        try:
            self._ensure()
            entry = self.new_id()
            place(f"{self._dirs['msg']}/{entry}")
            fsync_dir(self._dirs["msg"])
            self._commit(entry, envelope)
            return entry
        except OSError as exc:
            raise StorageError(f"queue {self.root}: {exc.strerror or exc}") from exc

    def _commit(self, entry: str, envelope: Envelope) -> None:
        tmp = f"{self._dirs['tmp']}/{entry}"
        write_new(tmp, envelope.to_bytes(), owner=self.owner)
        os.rename(tmp, f"{self._dirs['waiting']}/{entry}")
        fsync_dir(self._dirs["waiting"])

    def list(self, state: str = "waiting") -> list[str]:
        """Entry ids in `state`, oldest first."""
        return sorted(self._names(state))

    def _names(self, state: str) -> list[str]:
        """Entry ids in `state`, in the directory's order (no sort: counting needs none)."""
        try:
            return [n for n in os.listdir(self._dir(state)) if not n.startswith(".")]
        except FileNotFoundError:
            return []

    def count(self, state: str = "waiting") -> int:
        return len(self._names(state))

    def oldest_age(self, state: str = "waiting") -> float | None:
        """Seconds since the oldest entry in `state` arrived (ids start with time_ns in hex)."""
        return _age_of(min(self._names(state), default=None))

    def tally(self, state: str = "waiting") -> tuple[int, float | None]:
        """`count` and `oldest_age` from one listing."""
        names = self._names(state)
        return len(names), _age_of(min(names, default=None))

    def read(self, entry: str, state: str = "waiting") -> tuple[Envelope, bytes]:
        """The envelope and the bytes to pass on (without the skipped Maildir headers)."""
        try:
            envelope = Envelope.from_bytes(_read_plain(f"{self._dirs[state]}/{entry}"))
            data = _read_plain(f"{self._dirs['msg']}/{entry}", envelope.skip)
        except (OSError, ValueError, TypeError) as exc:
            raise CorruptEntryError(f"{self.root.name}/{entry}: {exc}") from exc
        return envelope, data

    def same_message(self, entry: str, state: str = "waiting") -> tuple[str, tuple[str, ...], int] | None:
        """What entries of one message share (sender, MAIL options, the message file's inode:
        `enqueue_many` hard-links one file), read without the bytes; None if unreadable."""
        try:
            envelope = self.envelope(entry, state)
            return envelope.mail_from, envelope.mail_options, os.stat(self._dir("msg") / entry).st_ino
        except (CorruptEntryError, OSError):
            return None

    def envelope(self, entry: str, state: str = "waiting") -> Envelope:
        try:
            return Envelope.from_bytes(_read_plain(f"{self._dirs[state]}/{entry}"))
        except (OSError, ValueError, TypeError) as exc:
            raise CorruptEntryError(f"{self.root.name}/{entry}: {exc}") from exc

    def move(self, entry: str, source: str, target: str, envelope: Envelope | None = None) -> None:
        """Move an entry between states, rewriting its envelope on the way when given one."""
        src, dst = self._dir(source) / entry, self._dir(target) / entry
        if envelope is not None:
            tmp = self._dir("tmp") / entry
            tmp.unlink(missing_ok=True)
            write_new(tmp, envelope.to_bytes(), owner=self.owner)
            os.rename(tmp, dst)
            if src != dst:          # rewriting an envelope in place replaces it, nothing to drop
                src.unlink()
        else:
            os.rename(src, dst)
        fsync_dir(self._dir(target))
        fsync_dir(self._dir(source))

    def claim(self, entry: str) -> bool:
        """waiting -> active; False when another worker took it first."""
        try:
            os.rename(f"{self._dirs['waiting']}/{entry}", f"{self._dirs['active']}/{entry}")
        except FileNotFoundError:
            return False
        return True

    def pending(self) -> list[Pending]:
        """Every waiting entry, oldest first (blocking). An envelope is read only when its file
        is new or changed since the last call; one that cannot be read shows as due for no one,
        so whoever claims it sets it aside."""
        found: list[Pending] = []
        known: dict[str, tuple[tuple[int, int], Pending]] = {}
        waiting = self._dirs["waiting"]
        with self._lock:
            before = self._known
        for entry in self.list("waiting"):
            try:      # a plain string path: this runs for every waiting entry
                st = os.stat(f"{waiting}/{entry}", follow_symlinks=False)
            except FileNotFoundError:
                continue            # claimed meanwhile
            stamp = (st.st_ino, st.st_mtime_ns)
            cached = before.get(entry)
            item = cached[1] if cached is not None and cached[0] == stamp else self._pending(entry)
            known[entry] = (stamp, item)
            found.append(item)
        with self._lock:
            self._known = known
        return found

    def _pending(self, entry: str) -> Pending:
        try:
            envelope = self.envelope(entry)
            return Pending(entry, envelope.rcpt, float(envelope.extra.get("next_try", 0)))
        except (CorruptEntryError, TypeError, ValueError):
            return Pending(entry, "", 0.0)

    # -- a runner's moves of the entry it claimed: the retry and hold policy --------------------

    def set_aside(self, entry: str) -> None:
        """An entry whose envelope or bytes cannot be read: active -> hold as it is."""
        self.move(entry, "active", "hold")

    def crashed(self, entry: str, envelope: Envelope, error: str, state: str = "active") -> str:
        """Handling the entry raised (or the process died holding it): counted, then back to
        waiting, or to hold after `MAX_CRASHES`; returns where it went."""
        counted = replace(envelope, crashes=envelope.crashes + 1, note=error or envelope.note)
        target = "hold" if counted.crashes >= MAX_CRASHES else "waiting"
        self.move(entry, state, target, counted)
        return target

    def defer(self, entry: str, envelope: Envelope, note: str, first_delay: float) -> float:
        """A temporary failure for this entry: back to waiting, not tried again before a delay
        that grows with its attempts; returns the delay."""
        attempts = envelope.attempts + 1
        delay = retry_delay(first_delay, attempts)
        extra = {**envelope.extra, "next_try": time.time() + delay}
        self.move(entry, "active", "waiting", replace(envelope, attempts=attempts, note=note, extra=extra))
        return delay

    def requeue(self, entry: str, envelope: Envelope, note: str) -> None:
        """A temporary failure of the destination: back to waiting with its place in line (the
        runner paces the next try of the destination, not of the entry)."""
        self.move(entry, "active", "waiting", replace(envelope, attempts=envelope.attempts + 1, note=note))

    def unclaim(self, entry: str) -> None:
        """Claimed but not tried after all (the runner held it back): active -> waiting as it
        was, with its place in line; no attempt counted."""
        self.move(entry, "active", "waiting")

    def fail(self, entry: str, envelope: Envelope, note: str) -> None:
        """Refused for good: active -> failed, kept for the administrator."""
        self.move(entry, "active", "failed", replace(envelope, attempts=envelope.attempts + 1, note=note))

    def finish(self, entry: str, state: str = "active") -> None:
        """Done: drop the envelope (the commit marker) first, then the bytes, once its removal
        is durable (a group-committed fsync: concurrent deliveries share one). Plain strings:
        this runs once a delivered message, on a storage thread that holds the GIL for it."""
        os.unlink(f"{self._dirs[state]}/{entry}")
        fsync_dir(self._dirs[state])
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{self._dirs['msg']}/{entry}")

    # -- the administrator's moves (`continuity-relay queue ...`) ------------------------------

    def state_of(self, entry: str) -> str | None:
        """The state an entry is in, or None when this queue has no such entry."""
        for state in STATES:
            if (self._dir(state) / entry).exists():
                return state
        return None

    def hold(self, entry: str) -> str:
        """Set aside a waiting or failed entry: no runner touches it until released."""
        return self._admin_move(entry, ("waiting", "failed"), "hold", lambda e: e)

    def release(self, entry: str) -> str:
        """Back to waiting from hold, due now, its crash count forgotten."""
        return self._admin_move(entry, ("hold",), "waiting",
                                lambda e: replace(e, crashes=0, extra=_due_now(e.extra)))

    def retry(self, entry: str) -> str:
        """A failed or deferred entry back to waiting, due now (like `postsuper -r`)."""
        return self._admin_move(entry, ("failed", "waiting"), "waiting",
                                lambda e: replace(e, extra=_due_now(e.extra)))

    def delete(self, entry: str) -> str:
        """Remove an entry for good (not while a runner holds it). Only the queue's own files
        go: a Maildir copy the message file is linked to stays."""
        state = self.state_of(entry)
        if state is None or state == "active":
            raise EntryError(f"{entry}: " + ("being delivered right now" if state else "no such entry"))
        if state == "waiting" and not self.claim(entry):
            raise EntryError(f"{entry}: a runner took it just now")
        self.finish(entry, "active" if state == "waiting" else state)
        return state

    def _admin_move(self, entry: str, sources: tuple[str, ...], target: str,
                    change: Callable[[Envelope], Envelope]) -> str:
        state = self.state_of(entry)
        if state not in sources:
            where = f"it is {state}" if state else "no such entry"
            raise EntryError(f"{entry}: {where}; this works on {' or '.join(sources)} entries")
        held = state
        if state == "waiting":      # claim it first, as a runner would: never both at once
            if not self.claim(entry):
                raise EntryError(f"{entry}: a runner took it just now")
            held = "active"
        self.move(entry, held, target, change(self.envelope(entry, held)))
        return state

    def recover(self) -> dict[str, int]:
        """Start-up rescan: put the queue back in a state the runners can trust. Its cost is
        the listings of msg/ and of the states (names only, no file is opened but what tmp/
        and active/ hold) and one directory fsync when something was removed."""
        if not self.root.exists():
            return {"requeued": 0, "held": 0, "orphans": 0}
        self._ensure()
        requeued = held = orphans = 0
        for name in os.listdir(self._dir("tmp")):
            (self._dir("tmp") / name).unlink(missing_ok=True)
        for entry in self.list("active"):
            try:
                envelope = self.envelope(entry, "active")
            except CorruptEntryError:
                self.set_aside(entry)
                held += 1
                continue
            target = self.crashed(entry, envelope, "")
            held += target == "hold"
            requeued += target == "waiting"
        committed: set[str] = set()
        for state in STATES:
            committed.update(self._names(state))
        for entry in os.listdir(self._dir("msg")):
            if entry not in committed:
                (self._dir("msg") / entry).unlink(missing_ok=True)
                orphans += 1
        if orphans:
            fsync_dir(self._dir("msg"))
        return {"requeued": requeued, "held": held, "orphans": orphans}


def _age_of(entry: str | None) -> float | None:
    """Seconds since an entry arrived, from its id (None for none, or an id not ours)."""
    if entry is None:
        return None
    try:
        return max(0.0, time.time() - int(entry.split(".")[0], 16) / 1e9)
    except ValueError:
        return None


def waiting_by_user(queue: Queue) -> dict[str, list[str]]:
    """Waiting entries grouped by recipient, each group oldest first (blocking)."""
    return due_by_user(queue, None)[0]


def due_by_user(queue: Queue, now: float | None) -> tuple[dict[str, list[str]], float | None]:
    """Waiting entries grouped by recipient, each group oldest first, leaving out the recipients
    whose oldest entry was deferred past `now` (None: leave out none); and the earliest such
    `next_try`, or None (blocking)."""
    users: dict[str, list[str]] = {}
    deferred: set[str] = set()
    next_due: float | None = None
    for item in queue.pending():
        if item.rcpt in deferred:
            continue
        if now is not None and item.rcpt not in users and item.next_try > now:
            deferred.add(item.rcpt)
            next_due = item.next_try if next_due is None else min(next_due, item.next_try)
            continue
        users.setdefault(item.rcpt, []).append(item.id)
    return users, next_due


def _due_now(extra: dict) -> dict:
    return {k: v for k, v in extra.items() if k != "next_try"}
