"""Sessions that ended for good: logged out, or of an account that was deactivated.

Cookies carry the whole session (session.py), so ending one means remembering it until it would
have expired anyway. That memory is one small JSON file, `web.revoked_file`, so it survives a
restart and is shared with the CLI (`users deactivate`) and any other process:

    {"sessions": {"<session id>": <expires at>}, "accounts": {"<email>": <ended at>}}

A session is refused when its id is listed, or when its account was ended after the session was
issued: re-activating the account later does not revive a cookie from before (a stolen one
stays dead). Entries older than the session lifetime are dropped on the next write, since no
cookie they could refuse is still valid. Writes are atomic (temp file, fsync, rename, fsync of
the folder, under a file lock so two processes never lose each other's entries); a crash leaves
the old file or the new one. Readers re-read the file when its mtime or size changes.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock

from relay.storage.durable import Owner, replace_file


class Revoked:
    """The `web.revoked_file` record (None: in memory only, for tests and throwaway setups)."""

    def __init__(self, path: Path | None, lifetime: float, clock: Callable[[], float] = time.time,
                 owner: Owner = Owner()) -> None:
        self.path, self.lifetime, self.clock, self.owner = path, lifetime, clock, owner
        self._sessions: dict[str, float] = {}
        self._accounts: dict[str, float] = {}
        self._stamp: tuple[int, int] | None = None
        self._lock = threading.Lock()

    def refuses(self, session_id: str, email: str | None, issued: float) -> bool:
        """Whether a session (its id, account and issue time) ended for good. Cheap: one stat."""
        self._refresh()
        ended = self._accounts.get(email or "")
        return session_id in self._sessions or (ended is not None and issued <= ended)

    def end_session(self, session_id: str, expires: float) -> None:
        """Logging out (blocking: a durable write)."""
        self._change(lambda sessions, accounts: sessions.__setitem__(session_id, expires))

    def end_account(self, email: str) -> None:
        """Deactivation: every session of `email` issued until now (blocking: a durable write)."""
        now = self.clock()
        self._change(lambda sessions, accounts: accounts.__setitem__(email, now))

    def _change(self, change: Callable[[dict[str, float], dict[str, float]], None]) -> None:
        with self._lock:
            if self.path is None:
                change(self._sessions, self._accounts)
                return
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with FileLock(str(self.path) + ".lock"):
                sessions, accounts = self._read()
                change(sessions, accounts)
                now = self.clock()
                sessions = {k: v for k, v in sessions.items() if v >= now}
                accounts = {k: v for k, v in accounts.items() if v >= now - self.lifetime}
                body = json.dumps({"sessions": sessions, "accounts": accounts}, sort_keys=True)
                replace_file(self.path, body.encode("utf-8"), 0o600, self.owner)
                self._sessions, self._accounts, self._stamp = sessions, accounts, None

    def _refresh(self) -> None:
        if self.path is None:
            return
        try:
            st = os.stat(self.path)
            stamp: tuple[int, int] | None = (st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stamp = None
        if stamp != self._stamp or stamp is None:
            with self._lock:
                self._sessions, self._accounts = self._read()
                self._stamp = stamp

    def _read(self) -> tuple[dict[str, float], dict[str, float]]:
        """The file's entries; a missing or unreadable file ends nothing (and is logged by
        nobody: the next write replaces it)."""
        assert self.path is not None
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
            return ({str(k): float(v) for k, v in raw.get("sessions", {}).items()},
                    {str(k): float(v) for k, v in raw.get("accounts", {}).items()})
        except (OSError, ValueError, TypeError, AttributeError):
            return {}, {}
