"""User Maildirs: the only writer of `<storage.maildirs>/<domain>/<localpart>/`.

Layout is Maildir++ as Dovecot reads it (`mail_location = maildir:ROOT/%d/%n`): INBOX is the
top folder, other folders are `.Name/` with a `maildirfolder` marker. Names follow stdlib
`mailbox.Maildir` (a test reads our trees back with it). Messages are written here directly
rather than with `mailbox.Maildir.add` because the spool must take its own hard link to a
message *before* it becomes visible in new/ (Dovecot may rename it to cur/ at any moment after
that), and `add` does not fsync the directory.

A delivery, step by step, and what a crash at each step leaves:
  1. tmp/<name> written (a `Companion` writes and links its files), then fsync'd
                                           -> a stray tmp file (Dovecot removes those after 36 h)
  2. `before_publish(tmp/<name>)` or the companion's commit
                                           -> whatever that leaves (the spool cleans up)
  3. link tmp/<name> -> new/<name>, unlink tmp, (the companion's commit fsync'd), fsync new/
                                           -> the message is in the mailbox

The webmail reads, flags, moves and deletes messages through this class too (see the notes
before MaildirStore): each change there is one rename or unlink, then a fsync of the directories.

Symlinks: the tree below the root belongs to the mail user, who may plant a link anywhere. A
delivery and the completion of a tree walk it one directory at a time relative to the one before
(`durable.open_dir`, O_NOFOLLOW) and create and hand over files through their descriptors, so a
link where a directory or the `maildirfolder` marker belongs is never followed: it is logged
(`maildir.symlink_refused path=...`) and the delivery fails with UnsafePathError, a
StorageError (451 inbound), until an administrator removes it.
"""

from __future__ import annotations

import base64
import email.utils
import errno
import itertools
import logging
import os
import re
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Protocol, TypeVar

from relay import headers
from relay.addresses import Mailbox
from relay.log import event
from relay.storage.durable import (
    Chunked,
    Owner,
    UnsafePathError,
    create_written,
    fsync_dir,
    make_dirs,
    open_dir,
    open_file,
)

FOLDERS = ("Sent", "Outbox")
_T = TypeVar("_T")


def _safe_hostname() -> str:
    # Maildir's own escaping of the two characters a file name cannot carry here.
    return socket.gethostname().replace("/", r"\057").replace(":", r"\072")


# --- Reading, flags, moves and deletes (the webmail's view of a Maildir) ----------------------
#
# Folder names are IMAP names as Dovecot shows them with the Maildir++ separator ".": "INBOX"
# is the top folder, "Sent" is `.Sent/`, a nested folder "Work.Projects" is `.Work.Projects/`
# (the web splits on "." to show a tree; `folder_label` decodes the modified UTF-7 Dovecot uses
# for non-ASCII names on disk). A message's key is its file name up to the first ":" (the part
# Dovecot keeps when it renames new/ -> cur/ or changes flags), so a key stays valid while
# flags change; it changes only when a move meets the same key in the target folder.
#
# Flags are the Maildir info "2,<letters>" in ASCII order (D, F, P, R, S, T, then Dovecot's
# keyword letters a-z, which are kept as found), exactly as Dovecot writes them.
#
# Every change is one rename(2) or unlink(2) followed by a fsync of the directories involved,
# so a crash leaves the message either where it was or where it went, never in both or neither.
# Dovecot may rename a file at the same moment (new/ -> cur/, other flags): each operation then
# looks the key up again in new/ and cur/ and tries once more. Unlinking a file never loses a
# message still to be replayed: the replay queue holds its own hard link (docs/architecture.md rule 7).
#
# These methods block (directory scans, fsync): call them from `asyncio.to_thread`.

INBOX = "INBOX"
TRASH = "Trash"
_FIRST = ("Sent", "Drafts", "Outbox")  # after INBOX, in this order; other folders sorted by name

DRAFT, FLAGGED, PASSED, ANSWERED, SEEN, DELETED = "D", "F", "P", "R", "S", "T"
FLAGS = "DFPRST"  # the flags these methods set or clear (keywords a-z are only preserved)

MAX_FOLDER = 200         # bytes of a folder name (the directory name adds a dot)
MAX_KEY = 240            # bytes of a key (a file name holds 255 with ":2,FLAGS")
MAX_HEADER = 256 * 1024  # bytes read from a message to list it; the rest of the file is not read
_CHUNK = 16 * 1024
_TIME = re.compile(r"(\d{1,12})(?:\.M(\d{1,6}))?")
_BLANK_LINE = re.compile(rb"\r?\n\r?\n")


class MaildirPathError(ValueError):
    """A folder name or message key refused before anything on disk changed: malformed,
    unsafe as a path, or naming no existing folder or message."""


class FolderError(MaildirPathError):
    """A folder name that is malformed or names no existing folder."""


class MessageKeyError(MaildirPathError):
    """A message key that is malformed or names no message in the folder (any more)."""


@dataclass(frozen=True)
class Summary:
    """One line of a message list: read from the file name and the header block only."""

    key: str
    flags: str              # Maildir flag letters as in the file name, e.g. "RS"; "" for none
    size: int               # bytes of the file
    received: float         # epoch seconds: the file name's timestamp, else the file's mtime
    from_: str              # display headers, unfolded and decoded, control characters blanked
    to: str
    subject: str
    date: datetime | None   # the Date: header; None when missing or unreadable

    @property
    def seen(self) -> bool:
        return SEEN in self.flags

    @property
    def answered(self) -> bool:
        return ANSWERED in self.flags

    @property
    def flagged(self) -> bool:
        return FLAGGED in self.flags

    @property
    def deleted(self) -> bool:
        return DELETED in self.flags


def folder_label(name: str) -> str:
    """A folder name for people: Dovecot keeps non-ASCII names on disk in IMAP's modified
    UTF-7 (RFC 3501 5.1.3), "Entw&APw-rfe" -> "Entwürfe". A name that does not decode is
    shown as it is."""
    out: list[str] = []
    pos = 0
    while (amp := name.find("&", pos)) != -1:
        end = name.find("-", amp)
        if end == -1:
            return name
        out.append(name[pos:amp])
        chunk = name[amp + 1 : end]
        if not chunk:
            out.append("&")
        else:
            b64 = chunk.replace(",", "/")
            try:
                out.append(base64.b64decode(b64 + "=" * (-len(b64) % 4), validate=True)
                           .decode("utf-16-be"))
            except ValueError:  # binascii.Error and UnicodeDecodeError are ValueErrors
                return name
        pos = end + 1
    return "".join(out) + name[pos:]


def check_folder(name: str) -> str:
    """The folder name as used on disk, or FolderError: one Maildir++ name, never a path."""
    if not isinstance(name, str) or not name:
        raise FolderError("empty folder name")
    if name.upper() == INBOX:
        return INBOX
    if (len(name.encode("utf-8", errors="replace")) > MAX_FOLDER or not name.isprintable()
            or "/" in name or "\\" in name or name.startswith(".") or name.endswith(".")
            or ".." in name):
        raise FolderError(f"not a folder name: {name!r}")
    return name


def check_key(key: str) -> str:
    """The message key, or MessageKeyError: one file name part, never a path."""
    if (not isinstance(key, str) or not key or len(key.encode("utf-8", errors="replace")) > MAX_KEY
            or not key.isprintable() or not key.isascii() or "/" in key or ":" in key
            or key.startswith(".")):
        raise MessageKeyError(f"not a message key: {key!r}")
    return key


def _check_flags(letters: str | Iterable[str]) -> frozenset[str]:
    chosen = frozenset(letters)
    if not chosen <= frozenset(FLAGS):
        raise ValueError(f"flags must be among {FLAGS!r}: {''.join(sorted(chosen))!r}")
    return chosen


def _key_and_info(name: str) -> tuple[str, str]:
    """("key", ":2,FLAGS" or "") from a file name in new/ or cur/."""
    key, colon, info = name.partition(":")
    return key, colon + info


def _flags(info: str) -> str:
    return info[3:] if info.startswith(":2,") else ""


def _order(name: str) -> tuple[int, int] | None:
    """(seconds, microseconds) from a Maildir name "<sec>.M<usec>P...", None when it has none."""
    match = _TIME.match(name)
    return (int(match.group(1)), int(match.group(2) or 0)) if match else None


def _folder_sort(name: str) -> tuple[int, list[str], str]:
    parts = name.split(".")
    rank = _FIRST.index(parts[0]) if parts[0] in _FIRST else len(_FIRST)
    return rank, [part.casefold() for part in parts], name


def _display(values: list[str]) -> str:
    text = values[0] if values else ""
    return "".join(" " if not char.isprintable() else char for char in text).strip()


def _date(values: list[str]) -> datetime | None:
    if not values:
        return None
    try:
        return email.utils.parsedate_to_datetime(values[0])
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


@contextmanager
def refusing_symlinks() -> Iterator[None]:
    """Log each UnsafePathError passing through (`maildir.symlink_refused`), then re-raise it."""
    try:
        yield
    except UnsafePathError as exc:
        event("maildir.symlink_refused", logging.ERROR, path=exc.path, reason=exc.what)
        raise


def _is_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def _no_symlink(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_NOFOLLOW)


def _read_all(path: Path) -> bytes:
    with open(path, "rb", opener=_no_symlink) as file:
        return file.read()


def _read_head(path: Path) -> tuple[bytes, os.stat_result]:
    """The header block (up to MAX_HEADER bytes) and the file's stat."""
    with open(path, "rb", opener=_no_symlink) as file:
        info = os.fstat(file.fileno())
        head = b""
        while len(head) < MAX_HEADER:
            chunk = file.read(_CHUNK)
            if not chunk:
                break
            head += chunk
            if (end := _BLANK_LINE.search(head)) is not None:
                return head[: end.start()], info
        return head[:MAX_HEADER], info


class Companion(Protocol):
    """What rides along one delivery, step by step (the replay queue's entry for a kept
    copy), so that its writes share the file system's commits with the delivery's instead of
    waiting for commits of their own: a kept message then waits for three (the Maildir file
    with the companion's new names, the companion's own file, the companion's commit marker
    with new/), where one after the other took five."""

    def written(self, tmp: str) -> None:
        """tmp/<name> is written, not yet fsync'd: write your files, link `tmp` (no fsync)."""

    def synced(self) -> None:
        """tmp/<name> is fsync'd: make yours durable and commit, before it appears in new/."""

    def published(self) -> None:
        """It is in new/ (not yet fsync'd): make your commit durable."""


class MaildirStore:
    """Creates Maildir++ trees and delivers messages into them, durably."""

    def __init__(self, root: Path, owner: Owner = Owner()) -> None:
        self.root = root
        self.owner = owner
        self._host = _safe_hostname()
        self._counter = itertools.count()
        self._ready: set[Path] = set()
        self._places: dict[Mailbox, tuple[str, tuple[str, ...]]] = {}   # see _place
        self._lock = threading.Lock()

    def path(self, user: Mailbox) -> Path:
        return user.path_under(self.root)

    def ensure(self, user: Mailbox) -> Path:
        """Create or complete the user's Maildir++ tree (INBOX, .Sent, .Outbox).

        Run once per user and process, and idempotent: a tree half-made by a crash (a user
        folder without new/, a folder without its maildirfolder marker, a directory not yet
        handed to the mail user) is completed, not trusted. `mailbox.Maildir(create=True)`
        would only build a tree whose top folder does not exist yet.
        """
        path = self.path(user)
        if path in self._ready:
            return path
        with self._lock:
            for folder in (path, *(path / f".{name}" for name in FOLDERS)):
                self._complete(folder, marker=folder != path)
            self._ready.add(path)
        return path

    def _complete(self, folder: Path, marker: bool) -> None:
        """Create what is missing of one folder (cur/, new/, tmp/, the marker) and hand every
        part to the mail user, never following a symlink (UnsafePathError, logged)."""
        parts = folder.relative_to(self.root).parts
        make_dirs(self.root, self.owner)
        with refusing_symlinks():
            fd = open_dir(self.root, parts, self.owner)
            try:
                for sub in ("cur", "new", "tmp"):
                    os.close(open_dir(folder, (sub,), self.owner, dir_fd=fd))
                if marker:
                    flag = open_file("maildirfolder", fd, folder / "maildirfolder",
                                     os.O_WRONLY | os.O_CREAT, single_link=True)
                    try:
                        self.owner.claim(flag)
                    finally:
                        os.close(flag)
                os.fsync(fd)
            finally:
                os.close(fd)

    def unique_name(self, size: int) -> str:
        now = time.time()
        seconds, micro = int(now), int((now % 1) * 1e6)
        return f"{seconds}.M{micro}P{os.getpid()}Q{next(self._counter)}.{self._host},S={size}"

    def deliver(self, user: Mailbox, data: bytes | Chunked, folder: str | None = None,
                before_publish: Callable[[str], None] | None = None, seen: bool = False,
                companion: Companion | None = None) -> Path:
        """Write `data` into the user's folder (INBOX by default); return the new file's path.

        Returns only once the file and new/ are fsync'd. `before_publish` sees the fsync'd
        temp file (its path) before it appears in new/; a `companion` (the replay queue's
        entry) rides along the steps instead (see Companion). `seen` files it in cur/ already
        read (a Sent copy). Paths are plain strings here: this runs for every kept message.
        """
        where, parts = self._places.get(user) or self._place(user)
        if folder:
            where, parts = f"{where}/.{folder}", (*parts, f".{folder}")
        name = self.unique_name(len(data))
        final_sub, final_name = ("cur", f"{name}:2,S") if seen else ("new", name)
        with refusing_symlinks():
            fd = open_dir(self.root, parts)
            try:
                tmp_fd = open_dir(where, ("tmp",), dir_fd=fd)
                try:
                    final_fd = open_dir(where, (final_sub,), dir_fd=fd)
                except BaseException:
                    os.close(tmp_fd)
                    raise
            finally:
                os.close(fd)
        try:
            self._publish(where, name, final_name, data, tmp_fd, final_fd, before_publish, companion)
        finally:
            os.close(tmp_fd)
            os.close(final_fd)
        if companion is not None:
            companion.published()
        fsync_dir(f"{where}/{final_sub}")
        return Path(f"{where}/{final_sub}/{final_name}")

    def _place(self, user: Mailbox) -> tuple[str, tuple[str, ...]]:
        """The user's tree, made or completed once (`ensure`): its path, and its parts below
        the root for `open_dir`."""
        box = self.ensure(user)
        return self._places.setdefault(user, (os.fspath(box), box.relative_to(self.root).parts))

    def _publish(self, box: str, name: str, final_name: str, data: bytes | Chunked, tmp_fd: int,
                 final_fd: int, before_publish: Callable[[str], None] | None,
                 companion: Companion | None = None) -> None:
        """tmp/<name> written through `tmp_fd`, shown to `before_publish`, linked into the
        directory `final_fd` (the link itself, never a target), and unlinked from tmp/."""
        fd = create_written(name, data, owner=self.owner, dir_fd=tmp_fd)
        try:
            try:
                if companion is not None:
                    companion.written(f"{box}/tmp/{name}")
                os.fsync(fd)
            finally:
                os.close(fd)
            if before_publish is not None:
                before_publish(f"{box}/tmp/{name}")
            if companion is not None:
                companion.synced()
            os.link(name, final_name, src_dir_fd=tmp_fd, dst_dir_fd=final_fd, follow_symlinks=False)
        finally:
            try:
                os.unlink(name, dir_fd=tmp_fd)
            except FileNotFoundError:
                pass

    def move(self, path: Path, user: Mailbox, folder: str) -> Path:
        """Move a message file into another folder of the same user (cur/, flags kept)."""
        box = self.ensure(user)
        folder_path = box if folder == "INBOX" else box / f".{folder}"
        if folder != "INBOX":
            with self._lock:
                self._complete(folder_path, marker=True)
        name = path.name if ":2," in path.name else f"{path.name}:2,"
        target = folder_path / "cur" / name
        with refusing_symlinks():
            fd = open_dir(self.root, (*folder_path.relative_to(self.root).parts, "cur"))
        try:
            os.rename(path, name, dst_dir_fd=fd)
        finally:
            os.close(fd)
        fsync_dir(target.parent)
        fsync_dir(path.parent)
        return target

    def folders(self, user: Mailbox) -> list[str]:
        """INBOX, then Sent, Drafts, Outbox (those that exist), then every other folder sorted
        by its "."-separated parts. Dovecot's files (dovecot.index*, dovecot-uidlist,
        subscriptions...) and directories that are not Maildirs are not folders."""
        box = self.ensure(user)
        found = []
        with os.scandir(box) as entries:
            for entry in entries:
                if not entry.name.startswith(".") or not entry.is_dir(follow_symlinks=False):
                    continue
                try:
                    name = check_folder(entry.name[1:])
                except FolderError:
                    continue
                if name != INBOX and _is_dir(box / entry.name / "cur"):
                    found.append(name)
        return [INBOX, *sorted(found, key=_folder_sort)]

    def messages(self, user: Mailbox, folder: str, offset: int = 0,
                 limit: int = 50) -> tuple[int, list[Summary]]:
        """(how many messages the folder holds, the page `offset`..`offset+limit`), newest first
        by the time in the file name. Only the header block of the page's messages is read."""
        if offset < 0 or limit < 1:
            raise ValueError("offset must be >= 0 and limit >= 1")
        box = self._folder_path(user, folder)
        files: dict[str, tuple[str, str]] = {}
        # new/ before cur/: a file Dovecot moves in between is then seen twice (cur/ wins), never
        # not at all.
        for sub in ("new", "cur"):
            for name in os.listdir(box / sub):
                key, _info = _key_and_info(name)
                try:
                    files[check_key(key)] = (sub, name)
                except MessageKeyError:
                    continue  # a temp file, or a name we could not address anyway
        ordered = sorted(((self._received(box, sub, name), key) for key, (sub, name) in files.items()),
                         reverse=True)
        page = []
        for received, key in ordered[offset : offset + limit]:
            sub, name = files[key]
            summary = self._summary(box, key, box / sub / name, received)
            if summary is not None:
                page.append(summary)
        return len(ordered), page

    def read(self, user: Mailbox, folder: str, key: str) -> bytes:
        """The message file's bytes, as stored."""
        box = self._folder_path(user, folder)
        return self._retrying(box, check_key(key), _read_all)

    def set_flags(self, user: Mailbox, folder: str, key: str, add: str | Iterable[str] = "",
                  remove: str | Iterable[str] = "") -> str:
        """Add and remove flags (letters of FLAGS); returns the message's flags after the change.

        The file goes to cur/ as `<key>:2,<flags in ASCII order>`, also when no flag changes (a
        message read here leaves new/, as Dovecot does on SELECT); keyword letters are kept.
        """
        adding, removing = _check_flags(add), _check_flags(remove)
        if adding & removing:
            raise ValueError("a flag cannot be added and removed at once")
        box = self._folder_path(user, folder)
        key = check_key(key)

        def rename(path: Path) -> str:
            flags = "".join(sorted((set(_flags(_key_and_info(path.name)[1])) | adding) - removing))
            target = box / "cur" / f"{key}:2,{flags}"
            if target != path:
                os.rename(path, target)
                self._synced(target.parent, path.parent)
            return flags

        return self._retrying(box, key, rename)

    def move_message(self, user: Mailbox, folder: str, key: str, to_folder: str) -> str:
        """Move a message into another existing folder, in new/ or cur/ as it was, flags kept;
        returns its key there (a new one only if the target already holds this key)."""
        source = self._folder_path(user, folder)
        target = self._folder_path(user, to_folder)
        key = check_key(key)
        if source == target:
            self._retrying(source, key, lambda path: None)
            return key
        return self._retrying(source, key, lambda path: self._move_file(path, key, target))

    def delete(self, user: Mailbox, folder: str, key: str) -> str | None:
        """Move a message to Trash (made when missing) and return its key there; a message that
        is already in Trash is removed for good (None)."""
        source = self._folder_path(user, folder)
        key = check_key(key)
        if check_folder(folder) == TRASH:
            def unlink(path: Path) -> None:
                path.unlink()
                self._synced(path.parent)
            return self._retrying(source, key, unlink)
        self._retrying(source, key, lambda path: None)  # refuse an unknown key before making Trash
        trash = self._trash(user)
        return self._retrying(source, key, lambda path: self._move_file(path, key, trash))

    # --- webmail helpers ------------------------------------------------------------------

    def _folder_path(self, user: Mailbox, folder: str) -> Path:
        """An existing folder's directory; FolderError before any change when there is none."""
        name = check_folder(folder)
        box = self.ensure(user)
        path = box if name == INBOX else box / f".{name}"
        chain = (box.parent, box, path, path / "cur", path / "new")  # no symlink on the way down
        if not all(_is_dir(directory) for directory in chain):
            raise FolderError(f"no folder {name!r}")
        return path

    def _trash(self, user: Mailbox) -> Path:
        box = self.ensure(user)
        path = box / f".{TRASH}"
        if not _is_dir(path / "cur"):
            with self._lock:
                self._complete(path, marker=True)
                fsync_dir(box)
        return path

    def _locate(self, box: Path, key: str) -> Path:
        """The file holding `key` in new/ or cur/; MessageKeyError when there is none."""
        new = box / "new" / key
        try:
            if stat.S_ISREG(os.lstat(new).st_mode):
                return new
        except FileNotFoundError:
            pass
        with os.scandir(box / "cur") as entries:
            for entry in entries:
                if _key_and_info(entry.name)[0] == key and entry.is_file(follow_symlinks=False):
                    return Path(entry.path)
        raise MessageKeyError(f"no message {key!r}")

    def _retrying(self, box: Path, key: str, action: Callable[[Path], _T]) -> _T:
        """`action(path of key)`; when the file vanished under it (Dovecot renamed it), look
        the key up again and try once more."""
        try:
            return action(self._locate(box, key))
        except FileNotFoundError:
            pass
        try:
            return action(self._locate(box, key))
        except FileNotFoundError:
            raise MessageKeyError(f"message {key!r} vanished while in use") from None

    def _move_file(self, path: Path, key: str, target: Path) -> str:
        new_key = key
        try:
            self._locate(target, key)
            new_key = self.unique_name(path.stat().st_size)
        except MessageKeyError:
            pass
        destination = target / path.parent.name / (new_key + _key_and_info(path.name)[1])
        os.rename(path, destination)
        self._synced(destination.parent, path.parent)
        return new_key

    @staticmethod
    def _synced(*directories: Path) -> None:
        for directory in dict.fromkeys(directories):
            fsync_dir(directory)

    @staticmethod
    def _received(box: Path, sub: str, name: str) -> tuple[int, int]:
        found = _order(name)
        if found is not None:
            return found
        try:
            mtime = os.stat(box / sub / name).st_mtime
        except FileNotFoundError:
            return (0, 0)
        return int(mtime), int((mtime % 1) * 1e6)

    def _summary(self, box: Path, key: str, path: Path, received: tuple[int, int]) -> Summary | None:
        try:
            head, info = _read_head(path)
        except FileNotFoundError:
            try:  # renamed by Dovecot since the listing: once more under its new name
                path = self._locate(box, key)
                head, info = _read_head(path)
            except (MessageKeyError, FileNotFoundError):
                return None  # gone (expunged over IMAP): the next listing will not count it
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
            return None  # a symlink: never followed
        return Summary(
            key=key, flags=_flags(_key_and_info(path.name)[1]), size=info.st_size,
            received=received[0] + received[1] / 1e6,
            from_=_display(headers.values(head, "From")), to=_display(headers.values(head, "To")),
            subject=_display(headers.values(head, "Subject")), date=_date(headers.values(head, "Date")))


# -- the Outbox: a message the Outbox runner sent -------------------------------------------------

def remove_sent(fd: int, name: str) -> None:
    """Unlink a message the Outbox runner sent from the Outbox directory `fd`; when Dovecot
    renamed it meanwhile (new flags in cur/, or new/ -> cur/), the file with the same key there."""
    try:
        os.unlink(name, dir_fd=fd)
    except FileNotFoundError:
        base = name.split(":2,")[0]
        for sub in ("../new", "../cur"):
            try:
                other = os.open(sub, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR):
                    continue
                raise
            try:
                for found in os.listdir(other):
                    if found.split(":2,")[0] == base:
                        _unlink_quietly(found, other)
                os.fsync(other)
            finally:
                os.close(other)
    os.fsync(fd)


def _unlink_quietly(name: str, fd: int) -> None:
    try:
        os.unlink(name, dir_fd=fd)
    except FileNotFoundError:
        pass
