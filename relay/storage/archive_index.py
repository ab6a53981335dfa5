"""The archive's search index: SQLite (FTS5) beside the archive's files, rebuilt from them.

    <archive>/index.sqlite         the index (with -wal and -shm beside it while in use)
    <archive>/index.sqlite.new     a rebuild under way (`reindex`); removed when it is done

Rule 9: the day files are the truth and this is a cache of them. Losing it loses nothing;
`reindex` builds it again from `Archive.records()` and the objects.

Tables:

    records    one row per archived record: key, id, time, day, direction, kind, envelope
               sender, sending user, subject, has_attachment, size, and the record's own line,
               so a search returns `Record`s without reading the day files
    addresses  (address, key, roles), keyed by address: one row for each address a record
               names, lower-cased, with a bit for each role it has there (the envelope
               sender, an envelope recipient (a Bcc recipient too), the sending user, a From
               or a To/Cc header address), and one for each "@domain" with the roles of its
               addresses (so a domain's mail is one index lookup too). One row an address,
               not one a role: a sender is mostly its From address too, and the rows are
               most of what an ingest writes
    words      FTS5, contentless: the subject's words and the text parts' words (text/plain,
               and text/html with its tags dropped), at most `MAX_TEXT` characters a message,
               from its first `MAX_PARSE` bytes
    days       each day file's size in bytes as the index last followed it

A record's key is the whole seconds of its time, shifted left 30 bits, plus its place in its
day file (the n of its id): newest first is key descending, a date range is a key range, and
the same key is the FTS rowid, so "these words, in these days, newest 50" is one backward walk
of FTS5's own lists. Dates never go into the FTS table.

Following the day files: `add` is called by the archive writer after each batch (in its
thread, one transaction). It checks that the batch continues the day file from the size the
index knew; when it does not (a crash between the day file's fsync and the index, a batch that
failed to index, a purge), it reads that day again and makes the index match it. `sync()` does
that for every day file whose size changed: at start-up, and after a purge. A failure to index
is logged and never stops the archive: the next batch, `sync` or `reindex` makes up for it.

`reindex` builds `index.sqlite.new` from the files, then copies it into `index.sqlite` with
SQLite's backup API, in one transaction: searches running meanwhile keep their snapshot, the
next ones see the new index. It does not rename the new file over the old one: a WAL database
must not be renamed over while anything has it open (another thread, or the CLI in another
process), because the `-wal` and `-shm` files, found by name, would then be shared by two
different databases and corrupt the new one. Only when the old file cannot be opened as an
index at all is it replaced by `os.replace`.

`forget` drops records from the metadata tables; their words stay in the contentless FTS
table (SQLite 3.40 cannot delete from one without the original text) but never come back in
a search, which always joins `records`. `reindex` drops them for good.
"""

from __future__ import annotations

import binascii
import calendar
import logging
import math
import os
import quopri
import re
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import date, timedelta
from email import policy
from email.message import Message
from email.parser import BytesHeaderParser
from html import unescape
from pathlib import Path

from relay import headers
from relay.errors import StorageError
from relay.log import event
from relay.storage.archive import Archive, Record
from relay.storage.durable import Owner, UnsafePathError, make_dirs

__all__ = ["MAX_PARSE", "MAX_TEXT", "ArchiveIndex", "Page", "Query", "html_text", "key_of", "message_text"]

SCHEMA = 3                      # PRAGMA user_version of the index this module writes (3: roles)
MAX_TEXT = 256 * 1024           # characters of text (subject aside) indexed per message
MAX_PARSE = 2 * 1024 * 1024     # bytes of a message parsed for its parts
MAX_DEPTH = 20                  # multipart levels followed; deeper is taken as one part
MAX_PARTS = 1000                # parts of one multipart looked at
MAX_WORDS = 32                  # words of a query field looked for; the rest are left out
SEQ_BITS = 30                   # key = whole seconds << SEQ_BITS | place in the day's file
BUSY = 10.0                     # seconds a search or sync waits for SQLite's write lock
FOLLOW_INTERVAL = 0.5           # seconds between two looks of the follower at the files (`follow`)
QUIET = 2.0                     # seconds the archive must not grow before the follower catches up...
MAX_LAG = 60.0                  # ...unless it has not for this long (`Pacing`)
NICENESS = 10                   # the follower's nice(2) increment
MIN_KEY, MAX_KEY = -(2**63), 2**63 - 1

# role bits in `addresses.roles`
SENDER, RCPT, USER, FROM, TO = (1 << bit for bit in range(5))

_SCHEMA_SQL = (
    "PRAGMA page_size = 4096",          # the backup in `reindex` needs the same size on both sides
    "CREATE TABLE records (key INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, time REAL NOT NULL,"
    " day TEXT NOT NULL, direction TEXT NOT NULL, kind TEXT NOT NULL, sender TEXT NOT NULL,"
    " user TEXT NOT NULL, subject TEXT NOT NULL, has_attachment INTEGER NOT NULL,"
    " size INTEGER NOT NULL, line BLOB NOT NULL)",
    "CREATE INDEX records_day ON records (day)",
    "CREATE TABLE addresses (address TEXT NOT NULL, key INTEGER NOT NULL, roles INTEGER NOT NULL,"
    " PRIMARY KEY (address, key)) WITHOUT ROWID",
    "CREATE INDEX addresses_key ON addresses (key)",
    "CREATE VIRTUAL TABLE words USING fts5 (subject, body, content='', columnsize=0,"
    " tokenize='unicode61 remove_diacritics 2')",
    "CREATE TABLE days (day TEXT PRIMARY KEY, size INTEGER NOT NULL) WITHOUT ROWID",
    f"PRAGMA user_version = {SCHEMA}",
)

_INSERT_RECORD = ("INSERT OR IGNORE INTO records (key, id, time, day, direction, kind, sender, user,"
                  " subject, has_attachment, size, line) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")

# The search's SQL is made of these constants only; every value is a parameter.
_FROM_WORDS = ("FROM words JOIN records r ON r.key = words.rowid"
               " WHERE words MATCH ? AND words.rowid BETWEEN ? AND ?")
_FROM_RECORDS = "FROM records r WHERE r.key BETWEEN ? AND ?"
_BY_ROLES = " AND r.key IN (SELECT a.key FROM addresses a WHERE a.address = ? AND a.roles & {} != 0)"
_BY_USER = _BY_ROLES.format(SENDER | RCPT | USER)
_BY_MAILBOX = _BY_ROLES.format(RCPT | USER)
_BY_FROM = _BY_ROLES.format(FROM)
_BY_TO = _BY_ROLES.format(TO)
_BY_DIRECTION = " AND r.direction = ?"
_BY_ATTACHMENT = " AND r.has_attachment = ?"
_NEWEST_FROM_WORDS = " ORDER BY words.rowid DESC LIMIT ? OFFSET ?"
_NEWEST_FROM_RECORDS = " ORDER BY r.key DESC LIMIT ? OFFSET ?"

# Past `MAX_PARSE`, an attachment is still noticed by its header line.
_ATTACHMENT_LINE = re.compile(rb"^content-disposition:[ \t]{0,200}attachment", re.IGNORECASE | re.MULTILINE)
_LINE_CARRY = 256               # bytes of a piece carried into the next: a line split between two


@dataclass(frozen=True)
class Query:
    """What to look for; every field is optional and all given fields must match.

    user: the envelope sender, any envelope recipient (Bcc included) or the sending user;
        `@domain` for any address of that domain in those places (likewise from_ and to).
    mailbox: any envelope recipient (Bcc included) or the sending user, not the envelope
        sender: the mail that was this mailbox's own (the webmail's archive). Mail from outside
        names its envelope sender unauthenticated, so anyone can claim a user's address there.
    from_, to: an address in the From header; in the To or Cc header.
    subject: words all in the subject; words: words all in the subject or the text.
    since, until: days (UTC), both included.
    Words are taken as words: FTS5's syntax (quotes, `*`, `NEAR(`, `OR`, `-`, parentheses)
    means nothing here, and a "word" with no letter or digit in it is left out.
    """

    user: str | None = None
    mailbox: str | None = None
    direction: str | None = None        # "in" | "out"
    from_: str | None = None
    to: str | None = None
    subject: str | None = None
    words: str | None = None
    has_attachment: bool | None = None
    since: date | None = None
    until: date | None = None

    def __post_init__(self) -> None:
        if self.direction not in (None, "", "in", "out"):
            raise ValueError(f"direction must be 'in' or 'out', not {self.direction!r}")


@dataclass(frozen=True)
class Page:
    """One page of a search, newest first; `more`: there is a next page."""

    records: list[Record]
    number: int
    per_page: int
    more: bool


def key_of(record: Record) -> int:
    """The record's place in the index: newest first is key descending (see the module's text)."""
    place = int(record.id.partition(".")[2] or 0) & ((1 << SEQ_BITS) - 1)
    return (math.floor(record.time) << SEQ_BITS) | place


def _key_range(since: date | None, until: date | None) -> tuple[int, int]:
    low = calendar.timegm(since.timetuple()) << SEQ_BITS if since else MIN_KEY
    high = ((calendar.timegm((until + timedelta(days=1)).timetuple()) << SEQ_BITS) - 1
            if until and until < date.max else MAX_KEY)
    return max(low, MIN_KEY), min(high, MAX_KEY)


def _address(text: str | None) -> str:
    address = (text or "").strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1].strip()
    return address.lower()


def _phrases(text: str | None, column: str = "") -> list[str]:
    """Each word as an FTS5 string ("word", inner quotes doubled): never FTS5 syntax."""
    words = [w for w in (text or "").split() if any(c.isalnum() for c in w)][:MAX_WORDS]
    return [column + '"' + w.replace('"', '""') + '"' for w in words]


def _match(query: Query) -> str | None:
    phrases = _phrases(query.subject, "subject : ") + _phrases(query.words)
    return " AND ".join(phrases) if phrases else None


def _iso_day(record: Record) -> str:
    day = record.day
    return f"{day[:4]}-{day[4:6]}-{day[6:]}"


# -- what a message gives the index ----------------------------------------------------------

@dataclass(frozen=True)
class _Document:
    subject: str
    text: str
    has_attachment: bool
    from_: tuple[str, ...]
    to: tuple[str, ...]


_BLOCK_TAGS = frozenset("address article aside blockquote br dd div dl dt footer h1 h2 h3 h4 h5 h6 header "
                        "hr li main nav ol p pre section table td th tr ul".split())


# The text of an HTML part, crudely, with the re module's C loops (HTMLParser, in Python, was a
# sixth of an ingest): comments, scripts and styles dropped with their content (an unclosed one
# hides the rest, as a browser would), a tag dropped (a space for a block tag, so words either
# side stay apart), entities decoded. Each pattern stops at the next "<", so any input is linear.
_HTML_HIDDEN = re.compile(r"<!--.*?(?:-->|\Z)|<(script|style)\b[^<>]*>.*?(?:</\1\s*>|\Z)",
                          re.IGNORECASE | re.DOTALL)
_HTML_TAG = re.compile(r"</?([a-zA-Z][^\s/<>]*)[^<>]*>|<[!?][^<>]*>")


def _tag_space(match: re.Match[str]) -> str:
    name = match.group(1)
    return " " if name and name.lower() in _BLOCK_TAGS else ""


def html_text(html: str) -> str:
    return unescape(_HTML_TAG.sub(_tag_space, _HTML_HIDDEN.sub(" ", html)))


def _part_text(part: Message, body: bytes, subtype: str) -> str | None:
    """A text part decoded as policy.default's content manager does it: the transfer encoding
    (base64, quoted-printable), then the charset, errors replaced; an unknown charset as UTF-8."""
    encoding = str(part.get("Content-Transfer-Encoding", "")).strip().lower()
    if encoding == "base64":
        payload = binascii.a2b_base64(body + b"==")        # lenient, like the email package
    elif encoding == "quoted-printable":
        payload = quopri.decodestring(body)
    else:
        payload = body
    try:
        text = payload.decode(part.get_content_charset() or "us-ascii", errors="replace")
    except LookupError:
        text = payload.decode("utf-8", errors="replace")
    return html_text(text[:4 * MAX_TEXT]) if subtype == "html" else text


_HEADERS = BytesHeaderParser(policy=policy.compat32)


def _leaves(data: bytes, depth: int = 0) -> Iterator[tuple[Message, bytes] | None]:
    """Each leaf part of a MIME message, as (its headers, its body), in order; None marks a
    forwarded message (an attachment), whose parts follow. Only headers are parsed: a body is a slice between
    boundaries (RFC 2046), so a big attachment costs one search for the next boundary, not a
    parse of its every line, as the email package's feed parser does."""
    head, body = headers.split(data)
    part = _HEADERS.parsebytes(head)
    content_type = part.get_content_type()
    if content_type == "message/rfc822":          # an attachment, whose own text is indexed too
        yield None
        if depth < MAX_DEPTH:
            yield from _leaves(body, depth + 1)
        return
    boundary = part.get_boundary() if content_type.startswith("multipart/") else None
    if not boundary or depth >= MAX_DEPTH:
        yield part, body
        return
    for piece in _pieces(body, boundary.encode("ascii", "replace")):
        yield from _leaves(piece, depth + 1)


def _pieces(body: bytes, boundary: bytes) -> list[bytes]:
    """The parts between a multipart body's delimiter lines (`--boundary` at a line's start;
    `--boundary--` closes); an unclosed last part is kept. Found with bytes.find: a pattern
    compiled per boundary would cost more than the parse it saves."""
    marker = b"--" + boundary
    pieces: list[bytes] = []
    start = None
    at = body.find(marker)
    while at != -1 and len(pieces) < MAX_PARTS:
        after = at + len(marker)
        line_end = body.find(b"\n", after)
        rest = body[after:len(body) if line_end == -1 else line_end]
        closing = rest.startswith(b"--")
        # a delimiter starts a line and has only padding after it ("--b" + "y" is not one)
        if (at == 0 or body[at - 1:at] == b"\n") and (closing or not rest.strip()):
            end = at - 1 if at else 0                      # the line end before belongs to it
            if end and body[end - 1:end] == b"\r":
                end -= 1
            if start is not None:
                pieces.append(body[start:end])
            if closing:
                return pieces
            start = len(body) if line_end == -1 else line_end + 1
        at = body.find(marker, after)
    if start is not None and len(pieces) < MAX_PARTS:     # unclosed: its last line end goes,
        tail = body[start:]                                  # as the email package drops it
        pieces.append(tail[:-2] if tail.endswith(b"\r\n") else tail[:-1] if tail.endswith(b"\n") else tail)
    return pieces


def message_text(data: bytes) -> tuple[str, bool]:
    """(the text of the message's text parts, at most `MAX_TEXT` characters; whether it has an
    attachment). Never raises: a part that does not decode is left out."""
    pieces: list[str] = []
    room = MAX_TEXT
    attached = False
    try:
        for leaf in _leaves(data[:MAX_PARSE]):
            if leaf is None:
                attached = True
                continue
            part, body = leaf
            maintype, _, subtype = part.get_content_type().partition("/")
            disposition = part.get_content_disposition()
            if disposition == "attachment" or (
                    disposition != "inline" and (maintype == "application" or part.get_filename())):
                attached = True
                continue
            if room <= 0 or maintype != "text" or subtype not in ("plain", "html"):
                continue
            try:
                text = _part_text(part, body, subtype)
            except Exception:  # noqa: BLE001 - a part that does not decode is skipped
                continue
            if text:
                pieces.append(text[:room])
                room -= len(pieces[-1])
    except Exception:  # noqa: BLE001 - a message that does not split keeps what was read
        pass
    if not attached and len(data) > MAX_PARSE:
        attached = _ATTACHMENT_LINE.search(data, MAX_PARSE) is not None
    return "\n".join(pieces), attached


def _document(data: bytes) -> _Document:
    text, attached = message_text(data)
    try:
        block = headers.Block(headers.split(data)[0])     # the header block, split once
        subject = next(iter(block.values("Subject")), "")[:1000]
        from_ = tuple(a.lower() for a in block.addresses("From"))
        to = tuple(a.lower() for a in block.addresses("To", "Cc"))
    except Exception:  # noqa: BLE001 - headers that do not parse give nothing, never a fault
        subject, from_, to = "", (), ()
    return _Document(subject, text, attached, from_, to)


def _document_of(archive: Archive, record: Record) -> _Document:
    """`_document` of an archived message, reading only the `MAX_PARSE` bytes it parses, then
    (no attachment seen) the rest a piece at a time for an attachment's header line: reading
    a 50 MB message whole took the follower's memory to 180 MB."""
    doc = _document(archive.read(record, MAX_PARSE))
    if doc.has_attachment or record.size <= MAX_PARSE:
        return doc
    window = b""
    for piece in archive.pieces(record, MAX_PARSE - 1):    # (the byte before: `^` needs it)
        window = window[-_LINE_CARRY:] + piece
        if _ATTACHMENT_LINE.search(window, 1) is not None:
            return replace(doc, has_attachment=True)
    return doc


def _roles(record: Record, doc: _Document) -> dict[str, int]:
    """Each address the record names, and each one's "@domain", with its role bits."""
    roles: dict[str, int] = {}
    named = [(record.sender.lower(), SENDER), (record.user.lower(), USER)]
    named += [(a.lower(), RCPT) for a in record.rcpts]
    named += [(a, FROM) for a in doc.from_] + [(a, TO) for a in doc.to]
    for address, role in named:
        if not address.strip("@"):
            continue
        roles[address] = roles.get(address, 0) | role
        if "@" in address:
            domain = "@" + address.rpartition("@")[2]
            if domain != "@":
                roles[domain] = roles.get(domain, 0) | role
    return roles


# -- files and connections -------------------------------------------------------------------

def _prepare(path: Path, owner: Owner) -> None:
    """Create `path` empty (0600, the mail user's) unless it exists; refuse a symlink (rule 5)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            raise UnsafePathError(path, "a symlink or not a plain file") from None
        return
    try:
        owner.claim(fd)
    finally:
        os.close(fd)


def _create_schema(conn: sqlite3.Connection, path: Path) -> None:
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version == SCHEMA:
        return
    if version == 0 and conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0:
        conn.execute(_SCHEMA_SQL[0])
        with _transaction(conn):
            if conn.execute("PRAGMA user_version").fetchone()[0] == 0:    # nobody was quicker
                for statement in _SCHEMA_SQL[1:]:
                    conn.execute(statement)
        return
    raise StorageError(f"{path}: not an index of this version (user_version {version}): "
                       "a reindex rebuilds it from the archive's files")


@contextmanager
def _transaction(conn: sqlite3.Connection, begin: str = "BEGIN IMMEDIATE") -> Iterator[None]:
    conn.execute(begin)
    try:
        yield
    except BaseException:
        conn.rollback()
        raise
    conn.execute("COMMIT")


class ArchiveIndex:
    """The search index of one archive. Safe from any thread: each operation borrows a
    connection of its own from a small pool; WAL mode, so searches never wait for the writer."""

    def __init__(self, archive: Archive) -> None:
        self.archive = archive
        self.path = archive.root / "index.sqlite"
        self._pool: list[sqlite3.Connection] = []
        self._pool_lock = threading.Lock()
        self._write = threading.Lock()         # this process's writers, one at a time
        self._closed = False

    # -- connections ---------------------------------------------------------------------------

    def _open(self) -> sqlite3.Connection:
        make_dirs(self.archive.root, self.archive.owner)
        _prepare(self.path, self.archive.owner)
        conn = sqlite3.connect(self.path, timeout=BUSY, isolation_level=None, check_same_thread=False)
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")      # a lost last commit is made up by `sync`
            conn.execute("PRAGMA journal_size_limit = 67108864")   # the WAL shrinks after a reindex
            _create_schema(conn, self.path)
        except BaseException:
            conn.close()
            raise
        return conn

    @contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        with self._pool_lock:
            conn = self._pool.pop() if self._pool else None
        if conn is None:
            try:
                conn = self._open()
            except (sqlite3.Error, OSError) as exc:
                raise StorageError(f"{self.path}: {exc}: a reindex rebuilds it from the archive's files"
                                   ) from exc
        try:
            yield conn
        finally:
            if conn.in_transaction:
                conn.rollback()
            with self._pool_lock:
                if self._closed:
                    conn.close()
                else:
                    self._pool.append(conn)

    def stale(self) -> bool:
        """Whether the index file is there but of another version (a reindex replaces it)."""
        try:
            conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)
        except sqlite3.Error:
            return False
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
        except sqlite3.Error:
            return True                     # not a database: replaced the same way
        finally:
            conn.close()
        return version not in (0, SCHEMA)

    def close(self) -> None:
        with self._pool_lock:
            self._closed = True
            pool, self._pool = self._pool, []
        for conn in pool:
            conn.close()

    # -- writing -------------------------------------------------------------------------------

    def add(self, records: list[Record]) -> int:
        """Index a batch the archive writer just wrote (its `on_written`, in its thread): one
        transaction. Returns how many records were new. Never raises: a failure is logged, and
        the next batch (or `sync`, or `reindex`) makes up for it."""
        if not records:
            return 0
        try:
            with self._write, self._connection() as conn:
                conn.execute("PRAGMA busy_timeout = 1000")    # the writer thread never waits long
                try:
                    with _transaction(conn):
                        added = sum(self._insert(conn, record) for record in records)
                        added += self._follow(conn, records)
                finally:
                    conn.execute("PRAGMA busy_timeout = 10000")
            return added
        except (sqlite3.Error, OSError, StorageError) as exc:
            event("archive.index_failed", logging.WARNING, records=len(records), error=exc,
                  hint="the next batch, `sync` or `archive reindex` makes up for it")
            return 0

    def sync(self) -> int:
        """Make the index match every day file whose size changed since the index last followed
        it (a start after a crash, a purge, a batch that failed). One day at a time, so the
        writer never waits for more than one. Returns the records added or dropped."""
        with self._connection() as conn:
            known = dict(conn.execute("SELECT day, size FROM days").fetchall())
        changed = 0
        for day in sorted(set(self.archive.day_names()) | set(known)):
            if self._size(day) == known.get(day):
                continue
            with self._write, self._connection() as conn, _transaction(conn):
                row = conn.execute("SELECT size FROM days WHERE day = ?", (day,)).fetchone()
                size = self._size(day)
                if size is not None and row is not None and size > row[0]:
                    changed += self._append(conn, day, row[0])   # the writer appended: read on
                elif size != (row[0] if row else None):
                    changed += self._resync(conn, day)
        return changed

    def _append(self, conn: sqlite3.Connection, day: str, known: int) -> int:
        """Index the lines a day file gained past `known` bytes, up to its last whole line (a
        batch being written may end mid-line: that part is read next time)."""
        with open(self.archive._day_file(day), "rb") as file:
            file.seek(known)
            data = file.read()
        whole = data.rfind(b"\n") + 1
        added = 0
        for line in data[:whole].splitlines():
            try:
                added += self._insert(conn, Record.from_line(line))
            except (ValueError, TypeError, KeyError):
                continue                 # `verify` names it
        self._set_size(conn, day, known + whole)
        return added

    def forget(self, ids: Iterable[str]) -> int:
        """Drop these records from the index (a purge); returns how many were in it."""
        with self._write, self._connection() as conn, _transaction(conn):
            keys = [row[0] for record_id in ids
                    for row in conn.execute("SELECT key FROM records WHERE id = ?", (record_id,))]
            self._delete(conn, keys)
        return len(keys)

    def reindex(self) -> int:
        """Build the index again from the archive's files, into a new file, then put it in
        place in one transaction (see the module's text); searches keep working meanwhile.
        Returns the number of records indexed."""
        started = time.monotonic()
        make_dirs(self.archive.root, self.archive.owner)
        new = self.path.with_name(self.path.name + ".new")
        for leftover in (new, new.with_name(new.name + "-journal")):
            leftover.unlink(missing_ok=True)
        _prepare(new, self.archive.owner)
        build = sqlite3.connect(new, isolation_level=None, check_same_thread=False)
        try:
            build.execute("PRAGMA journal_mode = OFF")       # nothing until it is done
            build.execute("PRAGMA synchronous = OFF")
            build.execute("PRAGMA cache_size = -65536")
            _create_schema(build, new)
            count = 0
            for day in self.archive.day_names():
                size = self._size(day)                        # before reading: never too much
                with _transaction(build, "BEGIN"):
                    count += sum(self._insert(build, record) for record in self.archive.records(day))
                    self._set_size(build, day, size)
            build.execute("INSERT INTO words (words) VALUES ('optimize')")
            self._install(build, new)
        except sqlite3.Error as exc:
            raise StorageError(f"{new}: {exc}") from exc
        finally:
            build.close()
            new.unlink(missing_ok=True)
        self.sync()           # what the writer added meanwhile
        event("archive.reindexed", records=count, seconds=f"{time.monotonic() - started:.1f}")
        return count

    def _install(self, build: sqlite3.Connection, new: Path) -> None:
        with self._write:
            try:
                with self._connection() as live:
                    build.backup(live)
                    live.execute("PRAGMA busy_timeout = 1000")    # writers wait at most that
                    live.execute("PRAGMA wal_checkpoint(TRUNCATE)")   # else it shrinks later
                    live.execute("PRAGMA busy_timeout = 10000")
                return
            except (sqlite3.DatabaseError, StorageError) as exc:
                trouble = exc               # not an index (corrupt, another version): replaced
            event("archive.index_replaced", logging.WARNING, path=self.path, error=trouble)
            with self._pool_lock:
                pool, self._pool = self._pool, []
            for conn in pool:
                conn.close()
            build.close()
            for sidecar in ("-wal", "-shm"):
                self.path.with_name(self.path.name + sidecar).unlink(missing_ok=True)
            os.replace(new, self.path)

    def _insert(self, conn: sqlite3.Connection, record: Record) -> int:
        if conn.execute("SELECT 1 FROM records WHERE id = ?", (record.id,)).fetchone():
            return 0
        try:
            doc = _document_of(self.archive, record)
        except OSError:                 # its object is missing: `verify` says so; still listed
            doc = _Document("", "", False, (), ())
        key = key_of(record)
        added = conn.execute(_INSERT_RECORD, (
            key, record.id, record.time, _iso_day(record), record.direction, record.kind,
            record.sender.lower(), record.user.lower(), doc.subject, int(doc.has_attachment),
            record.size, record.line())).rowcount
        if added != 1:                  # a key taken: more than 2**30 records in one day
            return 0
        conn.executemany("INSERT OR IGNORE INTO addresses (address, key, roles) VALUES (?, ?, ?)",
                         [(address, key, roles) for address, roles in _roles(record, doc).items()])
        conn.execute("INSERT INTO words (rowid, subject, body) VALUES (?, ?, ?)",
                     (key, doc.subject, doc.text))
        return 1

    def _delete(self, conn: sqlite3.Connection, keys: list[int]) -> None:
        conn.executemany("DELETE FROM records WHERE key = ?", [(k,) for k in keys])
        conn.executemany("DELETE FROM addresses WHERE key = ?", [(k,) for k in keys])

    def _follow(self, conn: sqlite3.Connection, records: list[Record]) -> int:
        """Move each day's known size on by the batch's lines, or read the day again when the
        batch does not continue the file from there."""
        appended: dict[str, int] = {}
        for record in records:
            day = _iso_day(record)
            appended[day] = appended.get(day, 0) + len(record.line())
        changed = 0
        for day, length in appended.items():
            row = conn.execute("SELECT size FROM days WHERE day = ?", (day,)).fetchone()
            size = self._size(day)
            if size is not None and (row[0] if row else 0) + length == size:
                self._set_size(conn, day, size)
            else:
                event("archive.index_behind", day=day, hint="reading the day's file again")
                changed += self._resync(conn, day)
        return changed

    def _resync(self, conn: sqlite3.Connection, day: str) -> int:
        size = self._size(day)                # before reading: never more than was read
        on_disk = {record.id: record for record in self.archive.records(day)} if size is not None else {}
        indexed = dict(conn.execute("SELECT id, key FROM records WHERE day = ?", (day,)).fetchall())
        gone = [key for record_id, key in indexed.items() if record_id not in on_disk]
        self._delete(conn, gone)
        added = sum(self._insert(conn, r) for record_id, r in on_disk.items() if record_id not in indexed)
        if size is None:
            conn.execute("DELETE FROM days WHERE day = ?", (day,))
        else:
            self._set_size(conn, day, size)
        return added + len(gone)

    def _size(self, day: str) -> int | None:
        try:
            return os.stat(self.archive._day_file(day)).st_size
        except FileNotFoundError:
            return None

    @staticmethod
    def _set_size(conn: sqlite3.Connection, day: str, size: int | None) -> None:
        conn.execute("INSERT OR REPLACE INTO days (day, size) VALUES (?, ?)", (day, size or 0))

    # -- searching -----------------------------------------------------------------------------

    def search(self, query: Query, page: int = 1, per_page: int = 50) -> Page:
        """One page of what matches, newest first (by time to the second, then by id); no cap
        on how many pages there are."""
        if page < 1 or per_page < 1:
            raise ValueError("page and per_page start at 1")
        sql, params, newest = self._where(query)
        rows = self._rows("SELECT r.line " + sql + newest,
                          [*params, per_page + 1, (page - 1) * per_page])
        records = [Record.from_line(row[0]) for row in rows[:per_page]]
        return Page(records, page, per_page, len(rows) > per_page)

    def count(self, query: Query) -> int:
        """How many records match (counts them all: slower than a page for common words)."""
        sql, params, _ = self._where(query)
        return self._rows("SELECT count(*) " + sql, params)[0][0]

    def _rows(self, sql: str, params: list[object]) -> list[tuple]:
        try:
            with self._connection() as conn:
                return conn.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise StorageError(f"{self.path}: {exc}") from exc

    @staticmethod
    def _where(query: Query) -> tuple[str, list[object], str]:
        low, high = _key_range(query.since, query.until)
        match = _match(query)
        if match is None:
            sql, params, newest = _FROM_RECORDS, [low, high], _NEWEST_FROM_RECORDS
        else:
            sql, params, newest = _FROM_WORDS, [match, low, high], _NEWEST_FROM_WORDS
        if query.direction:
            sql += _BY_DIRECTION
            params.append(query.direction)
        if query.has_attachment is not None:
            sql += _BY_ATTACHMENT
            params.append(int(query.has_attachment))
        for value, clause in ((query.user, _BY_USER), (query.mailbox, _BY_MAILBOX), (query.from_, _BY_FROM),
                              (query.to, _BY_TO)):
            if _address(value):
                sql += clause
                params.append(_address(value))
        return sql, params, newest


@dataclass
class Pacing:
    """When the follower catches up: once the archive has not grown for `quiet` seconds, or
    when it has not caught up for `max_lag`. Parsing and indexing beside a burst of mail, even
    on idle CPU only, slowed the listeners' event loop by a third (the two cores' caches and
    memory shared: bench/README.md, "The archive on and off"); so under a burst the index
    lags, by `max_lag` at most, and catches up when the burst is over."""

    quiet: float = QUIET
    max_lag: float = MAX_LAG
    _sizes: tuple[int, ...] | None = None
    _grew: float = -math.inf
    _synced: float = -math.inf      # (so the first look catches up at once: a start)

    def due(self, now: float, sizes: tuple[int, ...]) -> bool:
        """Whether to catch up now, the newest day files being `sizes` long."""
        if sizes != self._sizes:
            self._sizes, self._grew = sizes, now
        return now - self._grew >= self.quiet or now - self._synced >= self.max_lag

    def synced(self, now: float) -> None:
        self._synced = now


def _newest_sizes(archive: Archive) -> tuple[int, ...]:
    """The sizes of the two newest day files (a burst may span midnight): what grows."""
    sizes = []
    for day in archive.day_names()[-2:]:
        try:
            sizes.append(os.stat(archive._day_file(day)).st_size)
        except FileNotFoundError:
            sizes.append(-1)
    return tuple(sizes)


def follow(archive: Archive, stop: Callable[[float], bool], interval: float = FOLLOW_INTERVAL,
           pacing: Pacing | None = None) -> None:
    """Keep the index up with the archive's files until `stop(seconds)` (which waits up to
    `seconds`) says to end: what `serve` runs in a process of its own, so parsing messages for
    the index never takes the SMTP listeners' interpreter (blocking). When, see `Pacing`."""
    index = ArchiveIndex(archive)
    pacing = pacing if pacing is not None else Pacing()
    try:
        if index.stale():       # written by another version: rebuilt from the files, no command
            event("archive.index_rebuilding", logging.WARNING, reason=f"not version {SCHEMA}")
            index.reindex()
        while True:
            if pacing.due(time.monotonic(), _newest_sizes(archive)):
                try:
                    index.sync()
                except StorageError as exc:
                    event("archive.index_failed", logging.WARNING, error=exc,
                          hint="`archive reindex` rebuilds it")
                pacing.synced(time.monotonic())
            if stop(interval):
                return
    finally:
        index.close()


def _background() -> None:
    """The follower runs only on CPU time nothing else wants (SCHED_IDLE): at nice 10 it still
    took a tenth of a core from the listeners under load, about 0.7 ms of parsing a message.
    So under load the index lags, and it catches up once the burst is over. Where SCHED_IDLE
    is not to be had, nice(2) as before; where neither is (a seccomp filter that denies
    systemd's @resources: the shipped unit lets these two through), it says so and follows
    at the priority it has: an index that lags behind is better than none."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        return
    except (AttributeError, OSError):
        pass
    try:
        os.nice(NICENESS)
    except OSError as exc:
        event("archive.index_priority", logging.WARNING, error=exc.strerror or exc,
              hint="the index follower shares the CPU with the listeners at their priority")


def _main(argv: list[str]) -> int:
    """`python -m relay.storage.archive_index ROOT [OWNER]`: follow until standard input closes
    (the parent, serve, holds its other end: when serve dies, so does this)."""
    import select
    import sys

    from relay.log import setup
    from relay.storage.child import ignore_stop_signals

    ignore_stop_signals()
    setup("INFO")
    _background()
    archive = Archive(Path(argv[0]), owner=Owner.named(argv[1]) if len(argv) > 1 and argv[1] else Owner())

    def stop(seconds: float) -> bool:
        ready, _, _ = select.select([sys.stdin], [], [], seconds)
        return bool(ready) and not sys.stdin.buffer.read1(1)

    follow(archive, stop)
    return 0


if __name__ == "__main__":
    import sys
    sys.exit(_main(sys.argv[1:]))
