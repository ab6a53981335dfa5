"""The audit log: one line per administrator action (who, what, when), appended and fsync'd.

    2026-11-28T04:20:00Z admin=root@example.net action=set_password user=alice@example.com
    2026-11-28T04:21:13Z admin=root@example.net action=deactivate user=bob@example.com
    2026-11-28T04:30:02Z user=alice@example.com action=change_own_password peer=192.0.2.7

A line is written once the change it records was made. Lines go out in one `write` on a file
opened with O_APPEND, then fsync, so lines from concurrent requests never interleave and a crash
loses at most the lines being written. Values are quoted as in the relay's log lines, by the same
function (`relay.log.quote`), so a value can never forge a field.
Never a password: a field whose name mentions one is refused.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from relay.errors import StorageError
from relay.log import quote
from relay.storage.durable import fsync_dir


class AuditLog:
    """Appends to `path` (made with mode 0600 when missing). Blocking: call off the loop."""

    def __init__(self, path: Path, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.clock = clock

    def _line(self, stamp: str, actor_kind: str, actor: str, action: str, fields: dict[str, object]) -> str:
        if any("password" in name for name in fields):
            raise ValueError("the audit log never holds a password")
        pairs = "".join(f" {k}={quote(v)}" for k, v in fields.items())
        return f"{stamp} {actor_kind}={quote(actor)} action={quote(action)}{pairs}\n"

    def record(self, actor_kind: str, actor: str, action: str, **fields: object) -> None:
        """One line: `actor_kind` is `admin` (or `user` for a user's own change)."""
        self.record_many(actor_kind, actor, [(action, fields)])

    def record_many(self, actor_kind: str, actor: str,
                    actions: Iterable[tuple[str, dict[str, object]]]) -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.clock()))
        text = "".join(self._line(stamp, actor_kind, actor, action, fields) for action, fields in actions)
        if text:
            self._append(text.encode("utf-8"))

    def _append(self, data: bytes) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            new = not self.path.exists()
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            if new:
                fsync_dir(self.path.parent)
        except OSError as exc:
            raise StorageError(f"audit_log {self.path}: {exc.strerror or exc}") from exc
