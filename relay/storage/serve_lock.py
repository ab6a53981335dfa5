"""The serve lock: `<spool>/serve.lock`, held while `serve` runs, as Postfix's master holds its
lock (`postqueue` and `postsuper` look at it to know whether the mail system is up).

Whoever holds it owns the entries in the queues' active/ folders: `serve` takes it before its
start-up rescan (`Queue.recover`) and keeps it until it has shut down; the `replay` command
takes it when it can, and then recovers what a stopped serve left in active/ itself, holding it
while it sweeps (a serve starting meanwhile refuses, rather than hand those entries back to
waiting under the command's feet). When a serve holds it, the command leaves active/ alone:
those entries are that serve's, in flight.

It is an flock (filelock's FileLock, never its soft fallback, whose marker file would outlive a
crash): released when its holder dies, SIGKILL too, so a crash leaves no stale lock, and the
file itself stays (removing it would let two holders lock two different files). A lock file a
root command creates is handed to the mail user, who runs serve and must open it too.
"""

from __future__ import annotations

from pathlib import Path

from filelock import FileLock, Timeout

from relay.errors import StorageError
from relay.storage.durable import Owner, make_dirs

NAME = "serve.lock"


class ServeLock:
    """The spool's serve lock; `take` never waits."""

    def __init__(self, spool: Path, owner: Owner = Owner()) -> None:
        self.spool, self.owner = spool, owner
        self.path = spool / NAME
        self._lock = FileLock(str(self.path), timeout=0, mode=0o600, thread_local=False,
                              fallback_to_soft=False, preserve_lock_file=True,
                              on_acquired=owner.claim)

    def take(self) -> bool:
        """Hold it now if nobody does: True; False when a serve (or a `replay` command) does."""
        make_dirs(self.spool, self.owner)
        try:
            self._lock.acquire()
        except Timeout:
            return False
        except OSError as exc:
            raise StorageError(f"{self.path}: cannot open the serve lock: {exc}") from exc
        return True

    def release(self) -> None:
        if self._lock.is_locked:
            self._lock.release()
