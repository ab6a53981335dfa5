"""The rolling archive: every message the relay handled, stored once, listed with its envelope.

    <archive>/packs/<YYYY-MM-DD>.pack       the bytes of the day's messages, appended
    <archive>/objects/<aa>/<sha256>+<skip>  or a hard link to a kept Maildir file, whose first
                                            <skip> bytes are our trace headers
    <archive>/objects/<aa>/<sha256>         or a file of its own (a held message of a purged
                                            day; archives written before packs)
    <archive>/days/<YYYY-MM-DD>.jsonl            one `Record` a line, in arrival order, chained
    <archive>/days/<YYYY-MM-DD>.purged           a day purged but for held records (no chain)
    <archive>/holds                              legal holds: one address or @domain a line
    <archive>/writer.open                        there while a writer runs; a crash leaves it

A record names its bytes' SHA-256 (without any skipped prefix) and where they are (`object`: a
file name under objects/<aa>/, or `<day>.pack@<offset>`, `size` bytes long), so a message for
five recipients is stored once, in one record listing the five, and the same bytes archived
again soon after (a re-release, a notice sent again) share the first copy. Mail that was not
kept goes to the day's pack, one append per batch: a file per message cost an inode, a
directory entry and 0.3 ms of the writer's time each. Each day's file is a
SHA-256 chain: a record's `chain` is sha256(previous chain, the record without its chain), the
first previous chain being the day itself, so `verify()` names any record changed, removed or
added out of order, and any object whose bytes no longer match its name.

Retention is fixed at ingestion (`keep_until`, from `archive.days`); `purge()` drops whole days
past it (their packs too), except the records of held addresses and domains, which stay: their
bytes are copied out of the pack into objects/ first, so nothing else of the day survives.
Nothing here is ever sent anywhere on its own: only a release (`archive release`) moves a copy.

Writing is `ArchiveWriter`'s, one thread that takes batches: the senders' 250 never waits for
the archive. Serve runs it in a process of its own, fed down a pipe (storage/archive_feed.py).
A batch is made durable with one fdatasync of each pack it appended to, then one of each day
file (or, when it made hard links, one syncfs(2) of the archive's file system: a fsync of every
directory a link went into costs more). Its crash window is bounded and visible: at most
`BATCH` messages or `LINGER` seconds of mail not yet flushed, plus what waits in its queue (at
most `BACKLOG`: past that, the caller waits). `writer.open` survives a crash, and the next
start logs `archive.unclean_stop` with that bound, and cuts a torn day-file line and any pack
bytes no record names.
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

from relay.addresses import normalise_domain, parse_mailbox
from relay.errors import CorruptEntryError
from relay.log import event
from relay.storage.durable import Owner, fsync_dir, make_dirs, replace_file
from relay.storage.incoming import MessageFile

BATCH = 1000         # messages written before one flush
LINGER = 1.0         # seconds a batch waits for more before it is written and flushed
BACKLOG = 2000       # messages waiting for the writer before callers wait
NAMES_REMEMBERED = 10_000    # recent objects, so the same bytes again need no lookup


def _load_syncfs():
    """libc's syncfs(2) (Linux), or None: then each file and directory is fsync'd."""
    try:
        import ctypes
        return ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None


_syncfs = _load_syncfs()


@dataclass(frozen=True)
class Record:
    """One archived message: what the index and the panel list, and what a release sends."""

    id: str                      # "<YYYYMMDD>.<n>": the day and the place in that day's file
    time: float
    direction: str               # "in" (from outside) or "out" (sent by a user, or a notice)
    kind: str                    # passed | kept | sent | notice
    sender: str                  # envelope sender, "" for <>
    rcpts: tuple[str, ...]       # every envelope recipient (a Bcc recipient too)
    queue_id: str                # the relay's id for it (inbound session id, outbound entry id)
    outcome: str                 # e.g. "primary 250", "kept", "queued for the smarthost"
    sha256: str
    object: str                  # a file name under objects/<aa>/, or "<day>.pack@<offset>"
    size: int
    keep_until: str              # YYYY-MM-DD: purged after this day (unless held)
    user: str = ""               # the sending user, for "out"
    chain: str = ""

    def line(self, chain: str | None = None) -> bytes:
        """The record's line in its day file (with `chain` instead of its own, for `chain_of`).
        Built field by field: `dataclasses.asdict` deep-copies, and cost the writer's thread,
        which shares the listeners' interpreter, 0.3 ms a message."""
        raw = {name: getattr(self, name) for name in _FIELDS}
        if chain is not None:
            raw["chain"] = chain
        return json.dumps(raw, sort_keys=True, separators=(",", ":")).encode() + b"\n"

    @classmethod
    def from_line(cls, line: bytes) -> Record:
        raw = json.loads(line)
        raw["rcpts"] = tuple(raw["rcpts"])
        return cls(**raw)

    @property
    def day(self) -> str:
        return self.id.split(".")[0]


@dataclass
class Item:
    """What the writer is handed: the bytes, their envelope, maybe a file to hard-link.

    `data` may be a spooled message (storage/incoming.py): then the writer hashes and copies it
    from its file a piece at a time, and releases the file once the batch is written."""

    data: bytes | MessageFile
    direction: str
    kind: str
    sender: str
    rcpts: tuple[str, ...]
    queue_id: str
    outcome: str
    user: str = ""
    link_from: Path | None = None    # a kept file holding `data` after `skip` bytes
    skip: int = 0
    when: float = field(default_factory=time.time)


_FIELDS = tuple(f.name for f in fields(Record))


def chain_of(previous: str, record: Record) -> str:
    body = record.line(chain="")
    return hashlib.sha256(previous.encode() + b"\n" + body).hexdigest()


_UNCHAINED = b'{"chain":""'      # how a line begins before its chain is put in, and after:
_CHAINED = b'{"chain":"'         # (`_CHAINED`, the chain, then `"` and the rest)


def _day(moment: float) -> str:
    return datetime.fromtimestamp(moment, UTC).strftime("%Y-%m-%d")


@dataclass
class _Pending:
    """A pack opened for a batch: its descriptor, its size before the batch, what goes in."""

    fd: int
    size: int
    created: bool
    chunks: list[bytes | MessageFile] = field(default_factory=list)
    length: int = 0


def _open_append(path: Path, owner: Owner) -> tuple[int, bool]:
    """Open `path` to append, creating it (then owned by `owner`): (descriptor, created)."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        return os.open(path, flags), False
    except FileNotFoundError:
        fd = os.open(path, flags | os.O_CREAT, 0o600)
        owner.claim(fd)
        return fd, True


def _write_all(fd: int, data: bytes | MessageFile) -> None:
    for piece in (data,) if isinstance(data, bytes) else data.chunks():
        view = memoryview(piece)
        while view:
            view = view[os.write(fd, view):]


def _in_memory(data: bytes | MessageFile) -> bytes | MessageFile:
    """A message held in memory as bytes (one copy): hashed in one call, which lets go of the
    interpreter while it hashes, and written with the rest of its batch in one write."""
    if isinstance(data, MessageFile) and data.path is None:
        return data.prefix + data.body
    return data


def _sha256(data: bytes | MessageFile) -> str:
    if isinstance(data, bytes):
        return hashlib.sha256(data).hexdigest()
    digest = hashlib.sha256()
    for piece in data.chunks():
        digest.update(piece)
    return digest.hexdigest()


class Archive:
    """One archive root: objects, day files, holds. Reading is safe from any thread; writing
    is `ArchiveWriter`'s (and `purge`'s, which the writer's owner runs)."""

    def __init__(self, root: Path, days: int = 90, owner: Owner = Owner()) -> None:
        self.root = root
        self.days = days
        self.owner = owner

    # -- paths -------------------------------------------------------------------------------

    def _shard(self, sha: str) -> Path:
        return self.root / "objects" / sha[:2]

    def _day_file(self, day: str) -> Path:
        return self.root / "days" / f"{day}.jsonl"

    def _pack(self, day: str) -> Path:
        return self.root / "packs" / f"{day}.pack"

    def object_path(self, record: Record) -> Path:
        """The file holding the record's bytes (a pack holds others' too: see `read`)."""
        return self._object_file(record.sha256, record.object)

    def _object_file(self, sha: str, name: str) -> Path:
        pack, at, _ = name.partition("@")
        return self.root / "packs" / pack if at else self._shard(sha) / name

    # -- reading -----------------------------------------------------------------------------

    def day_names(self) -> list[str]:
        try:
            return sorted(n[:-len(".jsonl")] for n in os.listdir(self.root / "days") if n.endswith(".jsonl"))
        except FileNotFoundError:
            return []

    def pack_names(self) -> list[str]:
        """The days that have a pack."""
        try:
            return sorted(n[:-len(".pack")] for n in os.listdir(self.root / "packs") if n.endswith(".pack"))
        except FileNotFoundError:
            return []

    def records(self, day: str | None = None) -> Iterator[Record]:
        """Every record, oldest first (of one day, when given). A line that does not parse is
        skipped here and named by `verify()`."""
        for name in [day] if day else self.day_names():
            try:
                with open(self._day_file(name), "rb") as file:
                    for line in file:
                        try:
                            yield Record.from_line(line)
                        except (ValueError, TypeError, KeyError):
                            continue
            except FileNotFoundError:
                continue

    def get(self, record_id: str) -> Record:
        """One record by its id: its line found by a byte search of the day's file (in the
        file's pages, not a copy), and only that line parsed. Parsing every line before it
        took 0.6 s for the last of a 50,000-message day, for each message opened."""
        day = record_id.split(".")[0]
        wanted = f"{day[:4]}-{day[4:6]}-{day[6:]}" if len(day) == 8 and day.isdigit() else ""
        try:
            with open(self._day_file(wanted), "rb") as file, \
                    mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
                found = _find_record(data, record_id)
        except (FileNotFoundError, IsADirectoryError, ValueError):    # (ValueError: empty)
            found = None
        if found is None:
            raise CorruptEntryError(f"{record_id}: no such archived message")
        return found

    def read(self, record: Record, limit: int = -1) -> bytes:
        """The message bytes as archived (without a kept file's trace headers); with `limit`,
        at most that many from the start (enough for the headers of a list)."""
        pack, at, offset = record.object.partition("@")
        with open(self.object_path(record), "rb") as file:
            if at:
                file.seek(int(offset))
                return file.read(record.size if limit < 0 else min(limit, record.size))
            file.seek(int(record.object.partition("+")[2] or 0))
            return file.read(limit)

    def pieces(self, record: Record, start: int, size: int = 1 << 20) -> Iterator[bytes]:
        """The message's bytes from `start` on, `size` at a time (a big one never whole)."""
        pack, at, offset = record.object.partition("@")
        base = int(offset) if at else int(record.object.partition("+")[2] or 0)
        left = record.size - start if at else -1
        with open(self.object_path(record), "rb") as file:
            file.seek(base + start)
            while left:
                piece = file.read(size if left < 0 else min(size, left))
                if not piece:
                    return
                left -= len(piece) if left > 0 else 0
                yield piece

    # -- legal hold --------------------------------------------------------------------------

    def holds(self) -> list[str]:
        try:
            text = (self.root / "holds").read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        return sorted({line.strip().lower() for line in text.splitlines() if line.strip()})

    def set_holds(self, holds: list[str]) -> None:
        make_dirs(self.root, self.owner)
        body = "".join(h + "\n" for h in sorted(set(holds)))
        replace_file(self.root / "holds", body.encode("utf-8"), 0o600, self.owner)

    @staticmethod
    def hold_key(text: str) -> str:
        """What a hold line says for `text`: a normalised address, or `@` and a domain name.
        ValueError (AddressError) saying why for anything else."""
        text = text.strip()
        if text.startswith("@"):
            return "@" + normalise_domain(text[1:])
        return str(parse_mailbox(text))

    @staticmethod
    def held(record: Record, holds: list[str]) -> bool:
        people = {a.lower() for a in (record.sender, record.user, *record.rcpts) if a}
        domains = {"@" + a.rpartition("@")[2] for a in people}
        return bool(people.intersection(holds) or domains.intersection(holds))

    # -- retention ---------------------------------------------------------------------------

    def purge(self, today: date | None = None) -> dict[str, int]:
        """Drop every record whose `keep_until` is before `today` (UTC), unless held, and the
        objects no record names any more. Blocking; returns what it did."""
        today = today or datetime.now(UTC).date()
        holds = self.holds()
        dropped = kept_for_hold = 0
        for day in self.day_names():
            records = list(self.records(day))
            expired = [r for r in records if r.keep_until < today.isoformat()]
            if not expired:
                continue
            stay = [r for r in records if r not in expired or self.held(r, holds)]
            kept_for_hold += len(stay) - (len(records) - len(expired))
            dropped += len(records) - len(stay)
            if stay:     # held records stay; the day's chain cannot: `verify` checks their bytes
                stay = [self._own_file(r) for r in stay]
                replace_file(self._day_file(day).with_suffix(".purged"), b"%d\n" % dropped, 0o600,
                             self.owner)
                replace_file(self._day_file(day), b"".join(r.line() for r in stay), 0o600, self.owner)
            else:
                self._day_file(day).unlink()
                fsync_dir(self._day_file(day).parent)
        objects = self._sweep_objects() if dropped else 0
        return {"dropped": dropped, "held": kept_for_hold, "objects": objects}

    def _own_file(self, record: Record) -> Record:
        """A held record of a day being purged: its bytes out of the day's pack into a file of
        their own (fsync'd before the day file names it), so the pack can go."""
        if "@" not in record.object:
            return record
        shard = self._shard(record.sha256)
        make_dirs(shard, self.owner)
        if not (shard / record.sha256).exists():
            replace_file(shard / record.sha256, self.read(record), 0o600, self.owner)
        return replace(record, object=record.sha256)

    def _sweep_objects(self) -> int:
        records = list(self.records())
        named = {(r.sha256, r.object) for r in records}
        packs = {r.object.partition("@")[0] for r in records if "@" in r.object}
        removed = 0
        for name in os.listdir(self.root / "packs") if (self.root / "packs").exists() else ():
            if name.endswith(".pack") and name not in packs:
                (self.root / "packs" / name).unlink(missing_ok=True)
                removed += 1
        if removed:
            fsync_dir(self.root / "packs")
        base = self.root / "objects"
        for top in sorted(os.listdir(base)) if base.exists() else ():
            shard = base / top
            for name in os.listdir(shard):
                if not name.startswith(".") and (name.partition("+")[0], name) not in named:
                    (shard / name).unlink(missing_ok=True)
                    removed += 1
            fsync_dir(shard)
        return removed

    # -- tamper evidence ---------------------------------------------------------------------

    def verify(self, since: str | None = None) -> list[str]:
        """Every problem found, one line each: a record changed, removed or added out of order,
        a line that does not parse, an object missing or changed. Empty: all is well."""
        problems: list[str] = []
        for day in self.day_names():
            if since and day < since:
                continue
            previous = day
            partly_purged = self._day_file(day).with_suffix(".purged").exists()
            with open(self._day_file(day), "rb") as file:
                for number, line in enumerate(file, 1):
                    try:
                        record = Record.from_line(line)
                    except (ValueError, TypeError, KeyError):
                        problems.append(f"{day} line {number}: not a record")
                        previous = "?"
                        continue
                    if not partly_purged and record.chain != chain_of(previous, record):
                        problems.append(f"{record.id}: changed, or a record before it was removed "
                                        "or inserted (the chain breaks here)")
                    previous = record.chain
                    problems += self._check_object(record)
        return problems

    def _check_object(self, record: Record) -> list[str]:
        try:
            data = self.read(record)
        except OSError:
            return [f"{record.id}: its message file is missing"]
        if hashlib.sha256(data).hexdigest() != record.sha256:
            return [f"{record.id}: its message bytes changed"]
        return []


class Handoff(ABC):
    """Handing messages over to a writer that takes them in batches, at most `BACKLOG`
    waiting: `ArchiveWriter` here, and `ArchiveFeed` (storage/archive_feed.py), which sends
    them to it in another process. A subclass says what waits (`_waiting`) and how one is
    put there (`_put`), and has `_space` (notified as room is made) and `_thread`."""

    _space: threading.Condition
    _thread: threading.Thread | None

    @abstractmethod
    def _waiting(self) -> int:
        """How many messages wait for the writer."""

    @abstractmethod
    def _put(self, item: Item) -> None:
        """One message put where the writer takes it, and the writer woken when it must be."""

    def add(self, item: Item) -> None:
        """Hand a message over (blocking only while `BACKLOG` messages wait)."""
        with self._space:
            while self._waiting() >= BACKLOG and self._thread is not None:
                self._space.wait(LINGER)
        self._put(item)

    def offer(self, item: Item) -> bool:
        """Hand a message over without waiting (from the event loop); False when the backlog
        is full, and the caller hands it to `add` in a worker thread."""
        if self._waiting() >= BACKLOG:
            return False
        self._put(item)
        return True


class ArchiveWriter(Handoff):
    """The one writer: a thread taking batches from a bounded queue (see the module's text)."""

    def __init__(self, archive: Archive, on_written: Callable[[list[Record]], None] | None = None) -> None:
        self.archive = archive
        self._on_written = on_written    # told each batch's records once they are on disk
        self._items: deque[Item] = deque()                 # waiting for the writer, oldest first
        self._wake = threading.Event()                     # set: a batch has started waiting
        self._full = threading.Event()                     # set: BATCH wait, or the writer ends
        self._space = threading.Condition()                # `add` waits on it while BACKLOG wait
        self._ending = False
        self._thread: threading.Thread | None = None
        self._tails: dict[str, tuple[int, str]] = {}       # day -> (records so far, last chain)
        self._names: dict[str, str] = {}                   # sha256 -> object name, recent ones
        self._days: dict[int, tuple[str, str, str]] = {}   # `_day_of`'s answers
        self.written = 0

    def start(self) -> None:
        make_dirs(self.archive.root / "days", self.archive.owner)
        marker = self.archive.root / "writer.open"
        if marker.exists():
            event("archive.unclean_stop", logging.WARNING, lost_at_most=f"{BATCH}+{BACKLOG} messages",
                  window=f"{LINGER:g}s", hint="pass-through mail of the last moment before the stop "
                  "may be missing from the archive; the primary has it")
            for day in self.archive.day_names()[-2:]:     # a batch spans midnight at most
                self._repair(day)
            for day in self.archive.pack_names()[-2:]:
                self._cut_pack(day)
        replace_file(marker, str(os.getpid()).encode(), 0o600, self.archive.owner)
        self._thread = threading.Thread(target=self._run, name="archive", daemon=True)
        self._thread.start()

    def _repair(self, day: str) -> None:
        """Cut a line torn by the crash (the day file's last bytes, after its last newline): the
        records before it are whole, fsync'd with their batch."""
        path = self.archive._day_file(day)
        with open(path, "r+b") as file:
            data = file.read()
            whole = data.rfind(b"\n") + 1
            if whole == len(data):
                return
            file.truncate(whole)
            file.flush()
            os.fsync(file.fileno())
        event("archive.repaired", logging.WARNING, day=day, cut_bytes=len(data) - whole)

    def _cut_pack(self, day: str) -> None:
        """Cut the bytes of a batch whose lines the crash lost: past the end of the last
        message a record of the day names, nothing is anybody's (and it would be kept)."""
        pack = self.archive._pack(day)
        end = max((int(r.object.partition("@")[2]) + r.size for r in self.archive.records(day)
                   if r.object.partition("@")[0] == pack.name), default=0)
        with open(pack, "r+b") as file:
            size = os.fstat(file.fileno()).st_size
            if size <= end:
                return
            file.truncate(end)
            os.fsync(file.fileno())
        event("archive.repaired", logging.WARNING, pack=pack.name, cut_bytes=size - end)

    def _waiting(self) -> int:
        return len(self._items)

    def _put(self, item: Item) -> None:
        """An append and, once a batch, a wake-up: a `queue.Queue` woke the writer for every
        message, and each wake-up took the interpreter from the event loop for a moment."""
        self._items.append(item)
        if not self._wake.is_set():
            self._wake.set()          # the first of a batch: its LINGER starts. (Not "one
        if len(self._items) >= BATCH:  # waits": two threads at once both saw two, and slept.)
            self._full.set()

    def stop(self, timeout: float = 30.0, clean: bool = True) -> None:
        """Write what waits, then end; a clean stop removes `writer.open` (not `clean`: what it
        was handed is written, but a caller lost what it had not handed over yet)."""
        if self._thread is None:
            return
        self._ending = True
        self._wake.set()
        self._full.set()
        self._thread.join(timeout)
        if clean and not self._thread.is_alive():
            (self.archive.root / "writer.open").unlink(missing_ok=True)
        self._thread = None
        with self._space:
            self._space.notify_all()

    def _run(self) -> None:
        """Sleep until a batch starts; wait `LINGER` (or until `BATCH` wait) for the rest of
        it; write what waits, at most `BATCH` at a time."""
        while True:
            self._wake.wait()
            self._wake.clear()
            if not self._ending:
                self._full.wait(LINGER)
            self._full.clear()
            batch = [self._items.popleft() for _ in range(min(BATCH, len(self._items)))]
            ending = self._ending
            if self._items or ending:
                self._wake.set()          # more than a batch waited, or the end: go round again
                if len(self._items) >= BATCH:
                    self._full.set()
            with self._space:
                self._space.notify_all()
            if batch:
                self._write_logged(batch)
            elif ending:
                return

    def _write_logged(self, batch: list[Item]) -> None:
        try:
            self.write(batch)
        except OSError as exc:     # the archive's own trouble never stops mail
            event("archive.write_failed", logging.ERROR, messages=len(batch),
                  error=exc.strerror or exc)
        finally:
            _release(batch)

    def write(self, batch: list[Item]) -> list[Record]:
        """Write a batch: links and the packs' bytes (flushed), then the day files' lines, then
        their flush (`_sync`). Blocking."""
        linked: list[Path] = []
        records = []
        files: dict[str, list[bytes]] = {}
        packs: dict[str, _Pending] = {}
        try:
            for item in batch:
                data = _in_memory(item.data)
                sha = _sha256(data)
                day = self._day_of(item.when)[0]
                self._tail(day)              # (and the day's copies: `_known` finds them)
                name = (self._known(sha) or self._link(sha, item, linked)
                        or self._append(day, data, packs))
                self._remember(sha, name)
                record, line = self._record(item, sha, name)
                files.setdefault(day, []).append(line)
                records.append(record)
            while packs:                     # the bytes are on disk before a line names them
                self._flush_pack(packs.popitem()[1])
            written = [self._append_lines(day, b"".join(lines)) for day, lines in files.items()]
            self._sync(written, linked)
        except OSError:      # what this batch remembered may not be on disk: read it again
            for pending in packs.values():
                os.close(pending.fd)
            self._tails.clear()
            self._names.clear()
            raise
        self.written += len(records)
        if self._on_written is not None:     # the search index; it never raises
            self._on_written(records)
        return records

    def _append_lines(self, day: str, lines: bytes) -> tuple[Path, bool]:
        """Append to the day file: (its path, whether this created it)."""
        make_dirs(self.archive.root / "days", self.archive.owner)
        path = self.archive._day_file(day)
        fd, created = _open_append(path, self.archive.owner)
        try:
            _write_all(fd, lines)
        finally:
            os.close(fd)
        return path, created

    def _sync(self, written: list[tuple[Path, bool]], linked: list[Path]) -> None:
        """Make the day files' lines (and the batch's hard links) durable. Links went into up to
        256 shard directories: one syncfs(2) of the archive's file system is cheaper than a
        fsync of each (and of the day files); without links, or without syncfs, each day
        file (and the directory of one it created, and of each link)."""
        if linked and _syncfs is not None:
            fd = os.open(self.archive.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                if _syncfs(fd) == 0:
                    return
            finally:
                os.close(fd)
        for path, created in written:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fdatasync(fd)
            finally:
                os.close(fd)
            if created:
                fsync_dir(path.parent)
        for directory in {p.parent for p in linked}:
            fsync_dir(directory)

    def _known(self, sha: str) -> str | None:
        """The name of a copy already archived with these bytes: a recent one, or a file."""
        known = self._names.get(sha)
        if known is not None and self.archive._object_file(sha, known).exists():   # (or purged)
            return known
        shard = self.archive._shard(sha)
        return sha if (shard / sha).exists() else None

    def _link(self, sha: str, item: Item, linked: list[Path]) -> str | None:
        """A hard link to the kept file holding these bytes, or None (no kept file, or it went
        meanwhile: replayed, deleted, or on another file system)."""
        if item.link_from is None:
            return None
        shard = self.archive._shard(sha)
        name = f"{sha}+{item.skip}"
        make_dirs(shard, self.archive.owner)
        try:
            os.link(item.link_from, shard / name, follow_symlinks=False)
        except FileExistsError:
            pass
        except OSError:
            return None
        linked.append(shard / name)
        return name

    def _append(self, day: str, data: bytes | MessageFile, packs: dict[str, _Pending]) -> str:
        """Where `data` goes in the day's pack (written by `_flush_pack`)."""
        pending = packs.get(day)
        if pending is None:
            make_dirs(self.archive.root / "packs", self.archive.owner)
            fd, created = _open_append(self.archive._pack(day), self.archive.owner)
            pending = packs[day] = _Pending(fd, os.fstat(fd).st_size, created)
        offset = pending.size + pending.length
        pending.chunks.append(data)
        pending.length += len(data)
        return f"{day}.pack@{offset}"

    def _flush_pack(self, pending: _Pending) -> None:
        try:
            run: list[bytes] = []             # bytes in one write; a spooled message streams
            for chunk in [*pending.chunks, None]:
                if isinstance(chunk, bytes):
                    run.append(chunk)
                    continue
                _write_all(pending.fd, b"".join(run))
                run.clear()
                if chunk is not None:
                    _write_all(pending.fd, chunk)
            os.fdatasync(pending.fd)
        finally:
            os.close(pending.fd)
        if pending.created:
            fsync_dir(self.archive.root / "packs")

    def _remember(self, sha: str, name: str) -> None:
        self._names[sha] = name
        while len(self._names) > NAMES_REMEMBERED:
            del self._names[next(iter(self._names))]

    def _record(self, item: Item, sha: str, name: str) -> tuple[Record, bytes]:
        """The item's record and its line, chained to the day's last. Its line is encoded
        once: `chain` sorts first, so the line is the chained-over one with the chain put in
        (`chain_of` and `line()` each encoding it cost the writer, in the listeners'
        interpreter, a JSON encoding a message)."""
        day, compact, keep_until = self._day_of(item.when)
        count, previous = self._tail(day)
        record = Record(id=f"{compact}.{count + 1}", time=item.when, direction=item.direction,
                        kind=item.kind, sender=item.sender, rcpts=item.rcpts, queue_id=item.queue_id,
                        outcome=item.outcome, sha256=sha, object=name, size=len(item.data),
                        keep_until=keep_until, user=item.user)
        body = record.line(chain="")
        chain = hashlib.sha256(previous.encode() + b"\n" + body).hexdigest()
        object.__setattr__(record, "chain", chain)      # (frozen: a `replace` built it again)
        self._tails[day] = (count + 1, chain)
        return record, b"".join((_CHAINED, chain.encode(), b'"', body[len(_UNCHAINED):]))

    def _day_of(self, moment: float) -> tuple[str, str, str]:
        """(YYYY-MM-DD, YYYYMMDD, keep_until) of the UTC day of `moment`, worked out once a day."""
        number = int(moment // 86400)
        known = self._days.get(number)
        if known is None:
            day = _day(moment)
            keep = datetime.fromtimestamp(moment, UTC).date() + timedelta(days=self.archive.days)
            known = self._days[number] = (day, day.replace("-", ""), keep.isoformat())
        return known

    def _tail(self, day: str) -> tuple[int, str]:
        """(the highest number used in the day's ids, the last chain): numbers, not a count of
        lines, so a day purged down to its held records never gives an id out twice."""
        if day not in self._tails:
            number, previous = 0, day
            for record in self.archive.records(day):
                number = max(number, int(record.id.rpartition(".")[2] or 0))
                previous = record.chain
                self._remember(record.sha256, record.object)
            self._tails[day] = (number, previous)
        return self._tails[day]


def _find_record(data: mmap.mmap, record_id: str) -> Record | None:
    """The record `record_id` in a day file's bytes. The needle cannot match inside a string
    value (a quote in one is escaped), and the line found is parsed and checked anyway."""
    needle = b'"id":' + json.dumps(record_id).encode() + b","
    at = data.find(needle)
    while at >= 0:
        start = data.rfind(b"\n", 0, at) + 1
        end = data.find(b"\n", at)
        try:
            record = Record.from_line(data[start:end if end >= 0 else len(data)])
            if record.id == record_id:
                return record
        except (ValueError, TypeError, KeyError):
            pass            # a torn line: `verify()` names it
        at = data.find(needle, at + 1)
    return None


def _release(batch: list[Item]) -> None:
    """The spooled messages of a batch are copied (or lost with it): their files go."""
    for item in batch:
        if isinstance(item.data, MessageFile):
            try:
                item.data.release()
            except OSError as exc:      # start-up clears the incoming spool anyway
                event("archive.release_failed", logging.WARNING, error=exc.strerror or exc)
