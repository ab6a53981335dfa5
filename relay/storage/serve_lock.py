"""The serve lock: `<spool>/serve.lock`, held while `serve` runs, as Postfix's master holds its
lock (`postqueue` and `postsuper` look at it to know whether the mail system is up).

Whoever holds it owns the entries in the queues' active/ folders: `serve` takes it before its
start-up rescan (`Queue.recover`) and keeps it until it has shut down; the `replay` command
takes it when it can, and then recovers what a stopped serve left in active/ itself, holding it
while it sweeps (a serve starting meanwhile refuses, rather than hand those entries back to
waiting under the command's feet). When a serve holds it, the command leaves active/ alone:
those entries are that serve's, in flight.

It is an flock(2) on a descriptor opened read-only: released when its holder dies, SIGKILL too,
so a crash leaves no stale lock, and the file itself stays (removing it would let two holders
lock two different files). Read-only, because a file held open for writing keeps its file
system from being remounted read-only (filelock's FileLock opens it O_RDWR: the disk-fault
test's `mount -o remount,ro` of the spool failed with EBUSY while serve ran). A lock file a
root command creates is handed to the mail user, who runs serve and must open it too.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from relay.errors import StorageError
from relay.storage.durable import Owner, make_dirs

NAME = "serve.lock"


def hold(path: Path, wait: bool = False) -> int | None:
    """An exclusive flock of `path` (created 0600 if need be) on a read-only descriptor: the
    descriptor, or None when another holds it and `wait` is False. Blocking when `wait`."""
    fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


class ServeLock:
    """The spool's serve lock; `take` never waits."""

    def __init__(self, spool: Path, owner: Owner = Owner()) -> None:
        self.spool, self.owner = spool, owner
        self.path = spool / NAME
        self._fd: int | None = None

    def take(self) -> bool:
        """Hold it now if nobody does: True; False when a serve (or a `replay` command) does."""
        if self._fd is not None:
            return True
        make_dirs(self.spool, self.owner)
        try:
            self._fd = hold(self.path)
            if self._fd is not None:
                self.owner.claim(self._fd)
        except OSError as exc:
            raise StorageError(f"{self.path}: cannot open the serve lock: {exc}") from exc
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
