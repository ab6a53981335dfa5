"""Administrator accounts for the web control panel, in their own passwd-format file.

`config.admins_file` holds one line per administrator, in the same format and with the same
password hashes as the users' passwd-file (the functions of directory.py write and read both):

    root@example.net:{BLF-CRYPT}$2b$12$...::::::
    former@example.net:{ARGON2ID}$argon2id$...::::::nologin reason=deactivated    (by hand)

It is not Dovecot's file: administrators log in to the control panel only, their addresses may
be in any domain (configured or not), and the file is written with mode 0600. Every change is a
read-modify-write under a file lock, written as temp file, fsync, rename, fsync of the
directory: a crash leaves either the old file or the new one.

Checking a password (`verify`) costs one bcrypt or argon2 check (100-200 ms) and blocks: the web
server calls it through `asyncio.to_thread`.
"""

from __future__ import annotations

import functools
import secrets
from dataclasses import replace
from pathlib import Path

from filelock import FileLock

from relay.addresses import AddressError, Mailbox, parse_mailbox
from relay.config import Config
from relay.directory import PasswdCache, User, hash_password, password_is_usable, read_passwd, verify_password
from relay.errors import DirectoryError
from relay.storage.durable import replace_file


@functools.cache
def _dummy_hash(scheme: str) -> str:
    """A hash of a random string nobody knows, checked when a login names no usable account,
    so that the time taken does not tell who is an administrator."""
    return hash_password(secrets.token_urlsafe(24), scheme)


class Admins:
    """The administrators in `config.admins_file`."""

    def __init__(self, config: Config) -> None:
        if config.admins_file is None:
            raise DirectoryError("admins_file is not set")
        self.file: Path = config.admins_file
        self.scheme = config.password_scheme
        self._lock = FileLock(str(self.file) + ".lock")
        self._cache = PasswdCache(self.file)

    # -- reading -----------------------------------------------------------------------------

    def _read(self) -> dict[str, User]:
        return read_passwd(self.file)

    def admins(self) -> dict[str, User]:
        """All administrators, re-read only when the file changed (checked on every call)."""
        return self._cache.get()

    def get(self, login: str) -> User | None:
        """The administrator `login` names (`Root@Example.NET` finds root@example.net), or None."""
        try:
            return self.admins().get(str(parse_mailbox(login)))
        except AddressError:
            return None

    def list(self) -> list[User]:
        return sorted(self.admins().values(), key=lambda a: (a.address.domain, a.address.local))

    def verify(self, login: str, password: str) -> User | None:
        """The administrator if `password` is theirs and they may log in, else None.

        Blocking (one hash check, whoever asks): call it through `asyncio.to_thread`.
        """
        admin = self.get(login)
        stored = admin.password_hash if admin is not None else ""
        stored = stored or _dummy_hash(self.scheme)
        usable = password_is_usable(password)
        matches = verify_password(stored, password if usable else "")
        if admin is None or not admin.can_log_in or not matches or not usable:
            return None
        return admin

    # -- changing ----------------------------------------------------------------------------

    @staticmethod
    def _address(email: str) -> Mailbox:
        try:
            return parse_mailbox(email)
        except AddressError as exc:
            raise DirectoryError(f"{email!r}: {exc}") from None

    def _change(self, email: str, change) -> User:
        address = self._address(email)
        with self._lock:
            admins = self._read()
            admin = change(admins.get(str(address)), address)
            admins[admin.email] = admin
            body = "".join(a.line() + "\n" for a in sorted(admins.values(), key=lambda a: a.email))
            self.file.parent.mkdir(parents=True, exist_ok=True)
            replace_file(self.file, body.encode("utf-8"), 0o600)
            self._cache.forget()
        return admin

    def add(self, email: str, password: str) -> User:
        password_hash = hash_password(password, self.scheme)

        def change(old: User | None, address: Mailbox) -> User:
            if old is not None:
                raise DirectoryError(f"{address}: already an administrator")
            return User(address, "", password_hash)
        return self._change(email, change)

    def set_password(self, email: str, password: str) -> User:
        password_hash = hash_password(password, self.scheme)

        def change(old: User | None, address: Mailbox) -> User:
            if old is None:
                raise DirectoryError(f"{address}: no such administrator")
            return replace(old, password_hash=password_hash)
        return self._change(email, change)
