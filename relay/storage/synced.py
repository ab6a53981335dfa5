"""When each LDAP user's password was last confirmed by their directory (for `readiness`).

    <spool>/ldap-synced/<domain>/<local>    an empty file; its mtime is the last confirmation

`mark` is called after a login the directory said yes to (relay/auth.py); it touches the file
at most once an hour per user, so a busy user costs no write per login. `last` reads it. The
file is created without following a link (rule 5: the address was checked before it became a
path) and handed to the mail user. Losing it loses nothing but the report's dates: the next
login makes it again.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from relay.addresses import Mailbox
from relay.errors import StorageError
from relay.storage.durable import Owner, make_dirs

MARK_EVERY = 3600.0


def synced_path(spool: Path, address: Mailbox) -> Path:
    return spool / "ldap-synced" / address.domain / address.local


def last(spool: Path, address: Mailbox) -> float | None:
    """When the directory last confirmed `address`'s password; None: never (as far as we know)."""
    try:
        return os.lstat(synced_path(spool, address)).st_mtime
    except FileNotFoundError:
        return None


def mark(spool: Path, address: Mailbox, owner: Owner = Owner(), now: float | None = None) -> None:
    """The directory has just confirmed the password: note when (blocking)."""
    now = time.time() if now is None else now
    seen = last(spool, address)
    if seen is not None and now - seen < MARK_EVERY:
        return
    path = synced_path(spool, address)
    try:
        make_dirs(path.parent, owner)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            owner.claim(fd)
            os.utime(fd, (now, now))
        finally:
            os.close(fd)
    except OSError as exc:
        raise StorageError(f"cannot note the LDAP sync of {address}: {exc.strerror or exc}") from exc
