"""Durable file primitives shared by every writer: write-fsync-rename, fsync of directories,
and handing created files to the mail user.

Rule 1 ("250 means on disk") rests on these: a file counts as written only after the file and
the directory that names it were fsync'd.

Running as root with `storage.owner`, the directories below the storage roots belong to the
mail user, who may put a symlink anywhere in them. So nothing here follows one: files are
created with O_EXCL|O_NOFOLLOW and handed over with fchown(2) on the descriptor just opened
(never chown(2) on a path, which follows links and races), and `open_dir` walks a tree one
component at a time relative to the one before, refusing a symlink (`UnsafePathError`).
"""

from __future__ import annotations

import errno
import os
import pwd
import stat
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from relay.errors import StorageError

_NOFOLLOW_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class UnsafePathError(StorageError):
    """A symlink, or something else that is not a directory, where a directory (or a plain
    file) belongs under a storage root: refused, never followed. Temporary, like any
    StorageError: the delivery is tried again once an administrator has looked."""

    def __init__(self, path: Path | str, what: str = "a symlink or not a directory") -> None:
        self.path, self.what = os.fspath(path), what
        super().__init__(f"{self.path}: {what}: refused")


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

    def claim(self, target: int | Path | str) -> None:
        """Hand `target` to the mail user: an open descriptor (fchown, what everything here
        uses: no path, no race), or a path, whose last component is never followed (lchown)."""
        if self.uid is None:
            return
        if isinstance(target, int):
            info = os.fstat(target)
            gid = self.gid if self.gid is not None else info.st_gid
            if (info.st_uid, info.st_gid) != (self.uid, gid):
                os.fchown(target, self.uid, gid)
        else:
            os.chown(target, self.uid, self.gid if self.gid is not None else -1, follow_symlinks=False)


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
    Each directory has a condition of its own (all on one lock), so a fsync that ends wakes
    only the threads waiting for that directory: a kept message syncs three directories, and
    waking every waiter for each made each of them take the GIL just to wait again. A
    directory's entry is dropped once nobody waits on it, so the tables stay small.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._clock = 0
        self._done: dict[str, int] = {}
        self._busy: set[str] = set()
        self._waiting: dict[str, int] = {}
        self._conds: dict[str, threading.Condition] = {}

    def sync(self, path: str) -> None:
        with self._lock:
            self._clock += 1
            ticket = self._clock
            self._waiting[path] = self._waiting.get(path, 0) + 1
            if path in self._busy and self._done.get(path, 0) < ticket:
                cond = self._conds.get(path) or self._conds.setdefault(path, threading.Condition(self._lock))
                while path in self._busy and self._done.get(path, 0) < ticket:
                    cond.wait()
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
            with self._lock:
                self._busy.discard(path)
                if synced:
                    self._done[path] = max(self._done.get(path, 0), target)
                cond = self._conds.get(path)
                self._forget(path)
                if cond is not None:
                    cond.notify_all()

    def _forget(self, path: str) -> None:
        """Drop a directory's entry once nobody waits on it or syncs it (lock held)."""
        if not self._waiting.get(path) and path not in self._busy:
            self._waiting.pop(path, None)
            self._done.pop(path, None)
            self._conds.pop(path, None)


_group_sync = _GroupSync()


def fsync_dir(path: Path | str) -> None:
    """Make a directory's entries (a new name, a rename, an unlink) durable.

    Concurrent callers for the same directory share fsyncs (group commit); each returns only
    after a fsync that began after its call.
    """
    _group_sync.sync(os.fspath(path))


class Chunked(Protocol):
    """Bytes too big to hold at once (storage/incoming.py's MessageFile): read in pieces."""

    def chunks(self) -> Iterable[bytes]: ...

    def __len__(self) -> int: ...


def write_new(path: Path | str, data: bytes | Chunked, mode: int = 0o600, owner: Owner = Owner(),
              dir_fd: int | None = None) -> None:
    """Create `path` (which must not exist; relative to `dir_fd` when given) with `data`,
    fsync'd and handed to `owner` through its descriptor; the caller fsyncs the dir."""
    fd = create_written(path, data, mode, owner, dir_fd)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def create_written(path: Path | str, data: bytes | Chunked, mode: int = 0o600,
                   owner: Owner = Owner(), dir_fd: int | None = None) -> int:
    """`write_new` without its fsync: the open descriptor, for a caller that fsyncs it later
    (and closes it), so that more changes go into the file system's next commit first."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode,
                 dir_fd=dir_fd)
    try:
        owner.claim(fd)
        for piece in (data,) if isinstance(data, (bytes, bytearray)) else data.chunks():
            view = memoryview(piece)
            while view:
                view = view[os.write(fd, view):]
    except BaseException:
        os.close(fd)
        raise
    return fd


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
    os.utime(new, (stamp, stamp), follow_symlinks=False)


def make_dirs(path: Path, owner: Owner = Owner(), mode: int = 0o700) -> None:
    """mkdir -p, handing each directory it creates to `owner` and fsyncing its parent.

    Directories that exist already are trusted as they are (a storage root may be a symlink an
    administrator made); each one created here is opened without following a link and handed
    over through that descriptor.
    """
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
        try:
            fd = os.open(directory, _NOFOLLOW_DIR)
        except OSError as exc:
            _refuse_link(exc, directory)
            raise
        try:
            owner.claim(fd)
        finally:
            os.close(fd)
        fsync_dir(directory.parent)


def _refuse_link(exc: OSError, path: Path | str) -> None:
    """UnsafePathError for what O_NOFOLLOW|O_DIRECTORY refuses (a link, a file); the caller
    re-raises any other OSError as it is."""
    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
        raise UnsafePathError(path) from exc


def open_dir(root: Path, parts: tuple[str, ...], owner: Owner | None = None,
             mode: int = 0o700, dir_fd: int | None = None) -> int:
    """A descriptor of the directory `root/parts[0]/parts[1]/...`, for `dir_fd=` calls.

    `root` is trusted as configured; each part is opened relative to the one before with
    O_NOFOLLOW, so a symlink (or a file) anywhere below `root` raises UnsafePathError instead
    of being followed. With `owner`, missing parts are created (mode `mode`, their parent
    fsync'd) and every part is handed to `owner` through its descriptor; without, a missing
    part raises FileNotFoundError. With `dir_fd`, the walk starts there instead (`root` then
    only names it in errors). The caller closes the descriptor.
    """
    if dir_fd is None:
        fd: int | None = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    elif not parts:
        return os.dup(dir_fd)
    else:
        fd = None          # the first part is opened relative to `dir_fd` itself: no dup
    path = os.fspath(root)    # a string: this runs for every delivery, pathlib costs there
    try:
        for part in parts:
            if not part or part in (".", "..") or "/" in part:
                raise UnsafePathError(f"{path}/{part}", "not one path component")
            path = f"{path}/{part}"
            child = _open_part(dir_fd if fd is None else fd, part, path, owner, mode)
            if fd is not None:
                os.close(fd)
            fd = child
        assert fd is not None
        return fd
    except BaseException:
        if fd is not None:
            os.close(fd)
        raise


def _open_part(parent: int, name: str, path: Path | str, owner: Owner | None, mode: int) -> int:
    """Open `name` under the directory `parent`, creating it with `owner`."""
    created = False
    if owner is not None:
        try:
            os.mkdir(name, mode, dir_fd=parent)
            created = True
        except FileExistsError:
            pass
    try:
        fd = os.open(name, _NOFOLLOW_DIR, dir_fd=parent)
    except OSError as exc:
        _refuse_link(exc, path)
        raise
    try:
        if owner is not None:
            owner.claim(fd)
        if created:
            os.fsync(parent)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_file(name: str, dir_fd: int, path: Path | str, flags: int = os.O_RDONLY,
              mode: int = 0o600, single_link: bool = False) -> int:
    """A plain file `name` in the directory `dir_fd`, opened without following a symlink and
    without blocking on a FIFO or a device: UnsafePathError for anything but a regular file,
    and with `single_link` for one with other hard links (which could name a file from
    outside the tree: ask for it before changing the file)."""
    try:
        fd = os.open(name, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENXIO, errno.EISDIR):
            raise UnsafePathError(path, "a symlink or not a plain file") from exc
        raise
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or (single_link and info.st_nlink != 1):
        os.close(fd)
        raise UnsafePathError(path, "not a plain file" + (" with one link" if single_link else ""))
    return fd
