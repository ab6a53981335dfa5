"""The user directory: registered users and their passwords, kept in Dovecot's passwd-file.

The passwd-file is the only store (rule 10), so Dovecot, the submission port and the webmail
accept the same password. One line per user:

    alice@example.com:{BLF-CRYPT}$2b$12$...:::Alice Smith:::
    bob@example.com::::Bob:::                        registered, no password: logs in nowhere
    carol@example.com:{ARGON2ID}$argon2id$...:::Carol:::nologin reason=deactivated
    dave@example.com:{BLF-CRYPT}$2b$12$...:::Dave::dave@home.example:   with an alternate

Field 5 (gecos) holds the display name and field 7 (shell) the user's alternate address, where
outage notices go (relay/delivery/alerts.py): Dovecot documents both fields as unused, whereas
the extra fields are expanded (%) and given meaning by Dovecot's key names.

Every change is a read-modify-write under a file lock, written as temp file, fsync, rename,
fsync of the directory: a crash leaves either the old file or the new one.

The file is read as bytes and split on b"\n" only (as Dovecot does), never with
`str.splitlines()`, which also splits on \x0b \x0c \x1c-\x1e \x85 \u2028 \u2029. A line that
does not parse is logged once (`directory.bad_line file=... line=N`) and skipped, so one bad line
never takes the other users down; a rewrite keeps it as it was. Display names are refused
(DirectoryError) when they hold ":" or any control or line-separator character, so a name can
never make such a line.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import threading
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import argon2
import bcrypt
from filelock import FileLock

from relay.addresses import AddressError, Mailbox, parse_mailbox
from relay.config import Config
from relay.errors import DirectoryError
from relay.log import event
from relay.storage.durable import Owner, replace_file

DEACTIVATED = "nologin reason=deactivated"
BCRYPT_MAX = 72


@dataclass(frozen=True)
class User:
    address: Mailbox
    name: str = ""
    password_hash: str = ""        # "{SCHEME}hash", or "" for a user without a password
    active: bool = True
    alternate: str = ""            # where outage notices go (another domain's address), or ""

    @property
    def email(self) -> str:
        return str(self.address)

    @property
    def can_log_in(self) -> bool:
        return self.active and bool(self.password_hash)

    def line(self) -> str:
        extra = "" if self.active else DEACTIVATED
        return f"{self.email}:{self.password_hash}:::{self.name}::{self.alternate}:{extra}"


def hash_password(password: str, scheme: str = "BLF-CRYPT") -> str:
    """A `{SCHEME}hash` string Dovecot verifies; bcrypt only sees 72 bytes, so longer
    passwords get ARGON2ID whatever the configured scheme."""
    if not password or "\x00" in password or "\n" in password:
        raise DirectoryError("a password must be non-empty, on one line, without NUL")
    raw = password.encode("utf-8")
    if scheme == "BLF-CRYPT" and len(raw) <= BCRYPT_MAX:
        return "{BLF-CRYPT}" + bcrypt.hashpw(raw, bcrypt.gensalt(12)).decode("ascii")
    return "{ARGON2ID}" + argon2.PasswordHasher().hash(password)


def verify_password(password_hash: str, password: str) -> bool:
    """Check a password against a `{SCHEME}hash` written by `hash_password`."""
    if password_hash.startswith("{BLF-CRYPT}"):
        raw = password.encode("utf-8")[:BCRYPT_MAX]
        return bcrypt.checkpw(raw, password_hash[len("{BLF-CRYPT}"):].encode("ascii"))
    if password_hash.startswith("{ARGON2ID}"):
        try:
            return argon2.PasswordHasher().verify(password_hash[len("{ARGON2ID}"):], password)
        except argon2.exceptions.VerificationError:
            return False
        except argon2.exceptions.InvalidHashError:
            return False
    return False


def _check_name(name: str) -> str:
    """The display name as stored: one passwd-file field, so no ":" and no character any reader
    could take for a line end (control characters, U+2028, U+2029)."""
    name = name.strip()
    if any(c == ":" or unicodedata.category(c) in ("Cc", "Zl", "Zp", "Cs") for c in name):
        raise DirectoryError("a name may not contain ':', line breaks or control characters")
    return name


def check_alternate(user: Mailbox, alternate: str) -> str:
    """The alternate address as stored ("" clears it): a checked address (so no ":", space or
    control character can break the line), outside the user's own domain, whose primary is the
    one that is down whenever a notice goes out."""
    if not alternate.strip():
        return ""
    try:
        address = parse_mailbox(alternate)
    except AddressError as exc:
        raise DirectoryError(f"alternate {alternate!r}: {exc}") from None
    if address.domain == user.domain:
        raise DirectoryError(f"alternate {address}: it must be outside {user.domain}, whose "
                             f"server is the one down when the notice is sent")
    return str(address)


def parse_line(line: str) -> User:
    fields = line.split(":", 7)
    if len(fields) != 8:
        raise ValueError("expected 8 colon-separated fields")
    return User(parse_mailbox(fields[0]), fields[4], fields[1], DEACTIVATED not in fields[7], fields[6])


def password_is_usable(password: str) -> bool:
    """A password `hash_password` could have stored: non-empty, one line, no NUL, valid UTF-8."""
    if not password or any(c in password for c in "\x00\r\n"):
        return False
    try:
        password.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


_reported: set[tuple[str, int, bytes]] = set()
_reported_lock = threading.Lock()


def read_passwd(file: Path, bad_lines: list[bytes] | None = None,
                parsed: dict[bytes, User] | None = None) -> dict[str, User]:
    """Every account in a passwd-file (users, or administrators).

    Lines are split on b"\n" only. A line that does not parse is logged once and skipped (and
    appended to `bad_lines` when given, for a rewrite to keep); an unreadable file is an error.
    `parsed` maps lines to what they parsed to last time (PasswdCache keeps it): a line found
    there is not parsed again, so rereading a file that changed by a few lines costs a split and
    a dictionary lookup per line; the mapping is replaced by this file's lines.
    """
    try:
        data = file.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise DirectoryError(f"{file}: {exc.strerror or exc}") from None
    before = parsed.copy() if parsed else {}
    if parsed is not None:
        parsed.clear()
    accounts: dict[str, User] = {}
    for number, raw in enumerate(data.split(b"\n"), 1):
        raw = raw.removesuffix(b"\r")
        account = before.get(raw)
        if account is None:
            if not raw.strip() or raw.startswith(b"#"):
                continue
            try:
                account = parse_line(raw.decode("utf-8"))
            except (ValueError, AddressError) as exc:  # UnicodeDecodeError is a ValueError
                _report(file, number, raw, exc)
                if bad_lines is not None:
                    bad_lines.append(raw)
                continue
        if parsed is not None:
            parsed[raw] = account
        accounts[account.email] = account
    return accounts


def _report(file: Path, number: int, raw: bytes, exc: Exception) -> None:
    """Log a bad line once per file, line number and content (never the line itself: it may
    hold a password hash)."""
    key = (str(file), number, raw)
    with _reported_lock:
        if key in _reported:
            return
        _reported.add(key)
    event("directory.bad_line", logging.ERROR, file=file, line=number,
          error=type(exc).__name__, reason=exc)


class PasswdCache:
    """A passwd-file's accounts, re-read only when the file changed (one stat per `get`);
    `current()` is the last answer, from memory (for the event loop). A reread parses only the
    lines that are new since the last one (`read_passwd`'s `parsed`): with 10,000 users, a
    change by the command line costs serve's refresh a few milliseconds, not a parse of every
    address."""

    def __init__(self, file: Path) -> None:
        self.file = file
        self._cached: tuple[tuple[int, int, int], dict[str, User]] | None = None
        self._lines: dict[bytes, User] = {}
        self._lock = threading.Lock()       # `_lines` is shared by the threads that reread

    def get(self) -> dict[str, User]:
        try:
            st = os.stat(self.file)
        except FileNotFoundError:
            self._cached = None
            return {}
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        cached = self._cached
        if cached is None or cached[0] != stamp:
            with self._lock:
                cached = (stamp, read_passwd(self.file, parsed=self._lines))
            self._cached = cached
        return cached[1]

    def read(self, bad_lines: list[bytes]) -> dict[str, User]:
        """The file as it is now, for a rewrite (under the writer's file lock)."""
        with self._lock:
            return read_passwd(self.file, bad_lines, self._lines)

    def current(self) -> dict[str, User]:
        cached = self._cached
        return cached[1] if cached is not None else {}

    def forget(self) -> None:
        self._cached = None


class Directory:
    """Users of the configured domains, backed by the passwd-file at `config.users_file`."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.file = config.users_file
        self._lock = FileLock(str(self.file) + ".lock")
        self._cache = PasswdCache(self.file)

    # -- reading -----------------------------------------------------------------------------

    def users(self) -> dict[str, User]:
        """All users, re-read only when the file changed (it is checked on every call)."""
        return self._cache.get()

    def get(self, address: Mailbox) -> User | None:
        return self.users().get(str(address))

    def is_registered(self, address: Mailbox) -> bool:
        return str(address) in self.users()

    def is_known(self, address: Mailbox) -> bool:
        """`is_registered` from memory, as of the last `refresh()`: for the SMTP hot path, which
        must not stat a file on the event loop (serve refreshes every second, off the loop)."""
        return str(address) in self._cache.current()

    def refresh(self) -> None:
        """Reread the passwd-file if it changed (blocking)."""
        self._cache.get()

    def list(self, domain: str | None = None) -> list[User]:
        return sorted((u for u in self.users().values() if domain in (None, u.address.domain)),
                      key=lambda u: (u.address.domain, u.address.local))

    # -- changing ----------------------------------------------------------------------------

    def _address(self, email: str) -> Mailbox:
        try:
            address = parse_mailbox(email)
        except AddressError as exc:
            raise DirectoryError(f"{email!r}: {exc}") from None
        if address.domain not in self.config.domains:
            raise DirectoryError(f"{email}: domain {address.domain} is not configured")
        return address

    def _write(self, users: Iterable[User], bad_lines: Iterable[bytes] = ()) -> None:
        """Replace the file with `users`, and the lines that did not parse kept as they were."""
        body = "".join(u.line() + "\n" for u in sorted(users, key=lambda u: u.email)).encode("utf-8")
        body += b"".join(line + b"\n" for line in bad_lines)
        self.file.parent.mkdir(parents=True, exist_ok=True)
        replace_file(self.file, body, 0o640, Owner.named(self.config.storage.owner), bump_mtime=True)
        self._cache.forget()
        self._cache.get()        # memory (`is_known`) never goes empty after a write

    def _change(self, email: str, change) -> User:
        address = self._address(email)
        with self._lock:
            bad: list[bytes] = []
            users = self._cache.read(bad)
            user = change(users.get(str(address)), address)
            users[user.email] = user
            self._write(users.values(), bad)
        return user

    def add(self, email: str, name: str = "", password: str | None = None) -> User:
        name = _check_name(name)
        password_hash = hash_password(password, self.config.password_scheme) if password else ""

        def change(old: User | None, address: Mailbox) -> User:
            if old is not None:
                raise DirectoryError(f"{address}: already registered")
            return User(address, name, password_hash)
        return self._change(email, change)

    def set_password(self, email: str, password: str) -> User:
        password_hash = hash_password(password, self.config.password_scheme)
        return self._change(email, lambda old, a: replace(self._existing(old, a),
                                                          password_hash=password_hash))

    def forget_password(self, email: str) -> User:
        """Remove the stored hash: the user can log in nowhere until one is set again."""
        return self._change(email, lambda old, a: replace(self._existing(old, a), password_hash=""))

    def set_alternate(self, email: str, alternate: str) -> User:
        """Set (or with "" clear) the address outage notices go to."""
        return self._change(email, lambda old, a: replace(self._existing(old, a),
                                                          alternate=check_alternate(a, alternate)))

    def set_active(self, email: str, active: bool) -> User:
        return self._change(email, lambda old, a: replace(self._existing(old, a), active=active))

    @staticmethod
    def _existing(user: User | None, address: Mailbox) -> User:
        if user is None:
            raise DirectoryError(f"{address}: no such user")
        return user

    def import_csv(self, path: Path) -> tuple[list[User], list[str]]:
        """Add users from a CSV file with a header row (email, name, optional password and
        alternate).

        Returns the users added and one message per refused line, naming its line number;
        good lines are imported even when others are refused.
        """
        try:
            text = path.read_bytes().decode("utf-8-sig")
        except (OSError, UnicodeDecodeError) as exc:
            raise DirectoryError(f"{path}: {exc}") from None
        # Rows end where csv says (\n, \r, \r\n outside quotes), not at every str.splitlines()
        # separator: a \x0c in a name is that name's problem, refused below with its line number.
        rows = csv.DictReader(io.StringIO(text, newline=""))
        header = [h.strip().lower() for h in rows.fieldnames or []]
        if "email" not in header:
            raise DirectoryError(f"{path}:1: the header row must name an 'email' column")
        rows.fieldnames = header
        added: list[User] = []
        problems: list[str] = []
        pending: dict[str, tuple[int, User]] = {}
        for row in rows:
            line = rows.line_num
            try:
                address = self._address((row.get("email") or "").strip())
                if str(address) in pending:
                    raise DirectoryError(f"{address}: listed twice")
                name = _check_name(row.get("name") or "")
                alternate = check_alternate(address, row.get("alternate") or "")
                password = row.get("password") or None
                password_hash = hash_password(password, self.config.password_scheme) if password else ""
                user = User(address, name, password_hash, alternate=alternate)
                pending[str(address)] = (line, user)
            except DirectoryError as exc:
                problems.append(f"{path}:{line}: {exc}")
        with self._lock:
            bad: list[bytes] = []
            users = self._cache.read(bad)
            for email, (line, user) in pending.items():
                if email in users:
                    problems.append(f"{path}:{line}: {email}: already registered")
                    continue
                users[email] = user
                added.append(user)
            if added:
                self._write(users.values(), bad)
        return added, problems
