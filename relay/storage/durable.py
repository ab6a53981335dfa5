"""Durable file primitives shared by every writer: write-fsync-rename, fsync of directories,
and handing created files to the mail user.

Rule 1 ("250 means on disk") rests on these: a file counts as written only after the file and
the directory that names it were fsync'd.
"""

from __future__ import annotations

import os
import pwd
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from relay.errors import StorageError


@dataclass(frozen=True)
class Owner:
    """Who should own what the relay creates: the mail user Dovecot runs as.

    Only a process running as root can give files away; running as the mail user itself
    (production under systemd) makes this a no-op.
    """

    uid: int | None = None
    gid: int | None = None

    @classmethod
    def named(cls, user: str | None) -> Owner:
        if user is None or os.geteuid() != 0:
            return cls()
        entry = pwd.getpwnam(user)
        return cls(entry.pw_uid, entry.pw_gid)

    def claim(self, path: Path | str) -> None:
        if self.uid is not None:
            os.chown(path, self.uid, self.gid if self.gid is not None else -1)


def _fsync_dir_now(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _GroupSync:
    """Group commit for directory fsyncs: threads that need the same directory synced share
    one fsync, as long as it started after their own change was made.

    Each caller takes a ticket from one clock after its change; a fsync that starts when the
    clock reads N covers every ticket up to N, because those changes were all made before it.
    A directory's entry is dropped once nobody waits on it, so the table stays small.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._clock = 0
        self._done: dict[str, int] = {}
        self._busy: set[str] = set()
        self._waiting: dict[str, int] = {}

    def sync(self, path: str) -> None:
        with self._cond:
            self._clock += 1
            ticket = self._clock
            self._waiting[path] = self._waiting.get(path, 0) + 1
            while path in self._busy and self._done.get(path, 0) < ticket:
                self._cond.wait()
            self._waiting[path] -= 1
            if self._done.get(path, 0) >= ticket:
                self._forget(path)
                return
            self._busy.add(path)
            target = self._clock
        synced = False
        try:
            _fsync_dir_now(path)
            synced = True
        finally:
            with self._cond:
                self._busy.discard(path)
                if synced:
                    self._done[path] = max(self._done.get(path, 0), target)
                self._forget(path)
                self._cond.notify_all()

    def _forget(self, path: str) -> None:
        """Drop a directory's entry once nobody waits on it or syncs it (lock held)."""
        if not self._waiting.get(path) and path not in self._busy:
            self._waiting.pop(path, None)
            self._done.pop(path, None)


_group_sync = _GroupSync()


def fsync_dir(path: Path | str) -> None:
    """Make a directory's entries (a new name, a rename, an unlink) durable.

    Concurrent callers for the same directory share fsyncs (group commit); each returns only
    after a fsync that began after its call.
    """
    _group_sync.sync(os.fspath(path))


def write_new(path: Path, data: bytes, mode: int = 0o600, owner: Owner = Owner()) -> None:
    """Create `path` (which must not exist) with `data`, fsync'd; the caller fsyncs the dir."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    owner.claim(path)


def replace_file(path: Path, data: bytes, mode: int = 0o600, owner: Owner = Owner(),
                 bump_mtime: bool = False) -> None:
    """Atomically replace `path` with `data`: temp file, fsync, rename, fsync the directory.

    `bump_mtime` makes the new file's mtime differ from the old one's in whole seconds, for
    readers that notice changes by (mtime seconds, size) only, as Dovecot's passwd-file does.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.unlink(missing_ok=True)
        write_new(tmp, data, mode, owner)
        if bump_mtime:
            _newer_than(tmp, path)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise StorageError(f"cannot write {path}: {exc.strerror or exc}") from exc


def _newer_than(new: Path, old: Path) -> None:
    try:
        before = int(os.stat(old).st_mtime)
    except FileNotFoundError:
        return
    stamp = time.time()
    if int(stamp) <= before:
        stamp = before + 1.0
    os.utime(new, (stamp, stamp))


def make_dirs(path: Path, owner: Owner = Owner(), mode: int = 0o700) -> None:
    """mkdir -p, handing each directory it creates to `owner` and fsyncing its parent."""
    missing = []
    current = path
    while not current.exists():
        missing.append(current)
        current = current.parent
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=mode)
        except FileExistsError:
            continue
        owner.claim(directory)
        fsync_dir(directory.parent)
