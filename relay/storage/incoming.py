"""The incoming spool: a message while DATA arrives and while its session (and the archive)
handle it, so no big message is ever held whole in memory on the way in.

DATA up to `CHUNK` bytes stays in memory (most mail: no file, no thread hop); the first byte
past it opens the message's file here, and everything goes there as it arrives.

    <spool>/incoming/<pid>.<token>          DATA being received, then read by the session:
                                            pass-through, keep and the archive stream from it
    <spool>/incoming/<pid>.<token>.archive  a hard link the archive writer owns until it has
                                            copied the bytes (it unlinks it)

Nothing here is ever acknowledged: a 250 rests on the Maildir, the queue or the primary, never
on these files, so they are not fsync'd. What a crash leaves: a file in incoming/, whole or
half-written, which no reader looks at (only the session that wrote it reads it); `clear()` at
start-up removes every one, before any listener opens. Files are created O_EXCL|O_NOFOLLOW,
mode 0600, by the process itself, and removed by whoever releases them last.

A `MessageFile` is one message as bytes to send: a small `prefix` (our Received header, a
spam mark, Maildir trace headers) held in memory, then the file from `offset` on (or, for a
small message, its bytes in `body`). It is read in chunks (`chunks()`, blocking; `achunks()`
from the loop, each read from a file in a worker thread).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from relay.storage.durable import Owner, make_dirs

CHUNK = 256 * 1024          # one read or write of a spooled message
_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def incoming_path(spool: Path) -> Path:
    return spool / "incoming"


@dataclass
class _Life:
    """Who still needs the file: removed when the last holder releases it."""

    holders: int = 1
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass(frozen=True)
class MessageFile:
    """`prefix`, then the bytes of `path` from `offset` on, or `body` when there is no file
    (`size` bytes in all)."""

    path: Path | None
    size: int
    prefix: bytes = b""
    offset: int = 0
    body: bytes = b""
    life: _Life = field(default_factory=_Life, compare=False, repr=False)

    def __len__(self) -> int:
        return self.size

    def with_prefix(self, head: bytes) -> MessageFile:
        """The same message with `head` above it (the same file, the same holders)."""
        return replace(self, prefix=head + self.prefix, size=self.size + len(head))

    def chunks(self, size: int = CHUNK) -> Iterator[bytes]:
        """The bytes in pieces of at most `size`, prefix first. Blocking."""
        if self.prefix:
            yield self.prefix
        if self.path is None:
            view = memoryview(self.body)
            for start in range(0, len(view), size):
                yield bytes(view[start:start + size])
            return
        with open(self.path, "rb", buffering=0) as file:
            file.seek(self.offset)
            left = self.size - len(self.prefix)
            while left > 0:
                chunk = file.read(min(size, left))
                if not chunk:
                    raise OSError(f"{self.path}: shorter than expected")
                left -= len(chunk)
                yield chunk

    async def achunks(self, size: int = CHUNK) -> AsyncIterator[bytes]:
        """`chunks()` from the event loop: each read in a worker thread."""
        pieces = self.chunks(size)
        if self.path is None:                # in memory: no thread needed
            for chunk in pieces:
                yield chunk
            return
        while (chunk := await asyncio.to_thread(next, pieces, None)) is not None:
            yield chunk

    def read(self) -> bytes:
        """The whole message in memory, for the few readers that need bytes. Blocking."""
        return b"".join(self.chunks())

    def head(self, limit: int) -> bytes:
        """At most the first `limit` bytes (for reading headers). Blocking."""
        out = bytearray()
        for chunk in self.chunks(min(limit, CHUNK)):
            out += chunk[: limit - len(out)]
            if len(out) >= limit:
                break
        return bytes(out)

    def hold(self) -> None:
        with self.life.lock:
            self.life.holders += 1

    def release(self) -> None:
        """One holder is done; the last one removes the file. Blocking (an unlink)."""
        with self.life.lock:
            self.life.holders -= 1
            last = self.life.holders == 0
        if last and self.path is not None:
            self.path.unlink(missing_ok=True)

    def detached(self) -> MessageFile:
        """A copy with a file of its own (a hard link), for a reader that outlives the session
        (the archive writer); its holder releases it. Blocking. In memory, there is nothing to
        hold: the same message (its `release` is a count, and no file goes)."""
        if self.path is None:
            return self
        link = self.path.with_name(self.path.name + ".archive")
        os.link(self.path, link, follow_symlinks=False)
        return replace(self, path=link, life=_Life())


class Incoming:
    """The incoming spool directory of one process."""

    def __init__(self, root: Path, owner: Owner = Owner()) -> None:
        self.root = root
        self.owner = owner
        self._made = False

    def create(self) -> tuple[int, Path]:
        """A new, empty spool file: (its descriptor for writing, its path). Blocking."""
        if not self._made:
            make_dirs(self.root, self.owner)
            self._made = True
        path = self.root / f"{os.getpid()}.{secrets.token_hex(8)}"
        return os.open(path, _FLAGS, 0o600), path

    def clear(self) -> int:
        """Remove what a crash left (start-up, before any listener opens); how many. Blocking."""
        removed = 0
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            return 0
        for name in names:
            try:
                os.unlink(self.root / name)
                removed += 1
            except (FileNotFoundError, IsADirectoryError, PermissionError):
                continue
        return removed


def write_all(fd: int, data: bytes | bytearray) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
