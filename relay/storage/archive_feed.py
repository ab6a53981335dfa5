"""The archive writer in a process of its own, and the feed that hands it messages from serve.

`ArchiveWriter` (storage/archive.py) does the hashing, the records, their chain and the
flushes. In serve's own interpreter its thread took the interpreter lock from the event loop a
few milliseconds at a time, each time the loop let go of it for a system call, and cost
pass-through mail a third of its rate (bench/README.md, "The archive on and off"). So serve
runs it as `python -m relay.storage.archive_feed ROOT DAYS [UID:GID]`, and `ArchiveFeed` is what
the listeners and the store hand their messages to: the same `add` and `offer` as the writer.

What goes down the pipe, a frame a message (`frame`): one JSON line (the envelope, and where
the bytes are), then the bytes it says. A message held in memory (or given as bytes) goes whole; a spooled
one goes as its prefix and the path of its `.archive` hard link (storage/incoming.py), which
the writer process then owns and removes once the bytes are copied. A last line `end` says the
stop is clean: then the writer process removes `writer.open`. A bare end of input (serve
killed) is written out all the same, and `writer.open` stays, so the next start says
`archive.unclean_stop`.

The crash window (README "The archive"): a killed serve loses only what waits in the feed
(at most `FEED_LINGER` seconds of mail, at most `BACKLOG` messages): the writer process reads
the pipe to its end and writes what it got. A killed writer process loses what it had read
and not flushed (`BATCH` + `BACKLOG`) and what was in the pipe; the feed logs
`archive.writer_exited` with the messages of the write that failed, and starts it again.

Only one writer process runs for an archive: it holds `writer.lock` (flock) from before it
repairs until it ends, and says `ready` on its standard output once it has it. Serve waits
for that before it clears the incoming spool, so a writer left running by a killed serve
finishes reading its `.archive` links first.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

from relay.errors import StorageError
from relay.log import event
from relay.storage.archive import Archive, ArchiveWriter, Handoff, Item
from relay.storage.child import ignore_stop_signals
from relay.storage.durable import Owner
from relay.storage.incoming import MessageFile
from relay.storage.serve_lock import hold

FEED_LINGER = 0.02       # seconds the feed gathers messages before one write to the pipe
PIPE_SIZE = 1 << 20      # the pipe's buffer (F_SETPIPE_SZ): the writer's flushes stall no sender
RESTART_DELAY = 1.0      # seconds before a writer process that exited is started again
END = b"end\n"


_encode = json.JSONEncoder(separators=(",", ":")).encode


def frame(item: Item) -> bytes:
    """The item's frame: a JSON list (the envelope, then where the bytes are: None, or the
    spooled file's [path, offset, size], which the writer process then owns), the length of
    the inline bytes, and those. A list, not an object: this runs on the event loop for every
    message, and the keys were half its cost."""
    data = item.data
    where = None
    if isinstance(data, bytes):
        inline = data
    elif data.path is None:
        inline = data.prefix + data.body
    else:
        inline, where = data.prefix, (str(data.path), data.offset, data.size)
    link = str(item.link_from) if item.link_from is not None else None
    head = _encode([item.direction, item.kind, item.sender, item.rcpts, item.queue_id, item.outcome,
                    item.user, link, item.skip, item.when, where, len(inline)])
    return b"".join((head.encode(), b"\n", inline))


def read_item(stream) -> Item | None:
    """The next frame's item; None at the clean end. EOFError at a bare end of input."""
    line = stream.readline()
    if not line or not line.endswith(b"\n"):
        raise EOFError
    if line == END:
        return None
    direction, kind, sender, rcpts, queue_id, outcome, user, link, skip, when, where, size = json.loads(line)
    inline = stream.read(size)
    if len(inline) != size:
        raise EOFError
    data: bytes | MessageFile = inline if where is None else \
        MessageFile(Path(where[0]), where[2], prefix=inline, offset=where[1])
    return Item(data=data, direction=direction, kind=kind, sender=sender, rcpts=tuple(rcpts),
                queue_id=queue_id, outcome=outcome, user=user, link_from=Path(link) if link else None,
                skip=skip, when=when)


class ArchiveFeed(Handoff):
    """Serve's side: messages to the writer process, through one thread that writes the pipe.

    `offer` (the event loop) and `add` (worker threads) only append a frame: the thread wakes
    once for the first of a batch, lets `FEED_LINGER` pass, and sends what waits in one write."""

    def __init__(self, archive: Archive) -> None:
        self.archive = archive
        self._frames: deque[tuple[bytes, MessageFile | None]] = deque()
        self._wake = threading.Event()
        self._space = threading.Condition()
        self._ending = False
        self._proc: subprocess.Popen[bytes] | None = None
        self._thread: threading.Thread | None = None
        self.sent = 0           # messages written to the pipe
        self.lost = 0           # messages in writes that found the writer process gone

    def start(self) -> None:
        """Start the writer process and wait until it holds the archive (blocking)."""
        self._spawn()
        self._thread = threading.Thread(target=self._run, name="archive-feed", daemon=True)
        self._thread.start()

    def _spawn(self) -> None:
        owner = self.archive.owner
        ids = f"{owner.uid}:{owner.gid if owner.gid is not None else -1}" if owner.uid is not None else ""
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "relay.storage.archive_feed", str(self.archive.root),
             str(self.archive.days), ids], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self._proc.stdin is not None and self._proc.stdout is not None
        try:
            fcntl.fcntl(self._proc.stdin.fileno(), fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        except (AttributeError, OSError):       # not Linux, or over pipe-max-size: the default
            pass
        with self._proc.stdout:              # says only this
            said = self._proc.stdout.readline()
        if said != b"ready\n":
            code = self._proc.wait()
            raise StorageError(f"the archive writer process exited with status {code} at its start")

    def _waiting(self) -> int:
        return len(self._frames)

    def _put(self, item: Item) -> None:
        spooled = item.data if isinstance(item.data, MessageFile) and item.data.path else None
        self._frames.append((frame(item), spooled))
        if not self._wake.is_set():      # (not "one waits": two threads at once both saw two)
            self._wake.set()

    def stop(self, timeout: float = 30.0) -> None:
        """Send what waits and `end`; the writer process writes it all and ends (blocking)."""
        if self._thread is None:
            return
        self._ending = True
        self._wake.set()
        self._thread.join(timeout)
        self._thread = None
        with self._space:
            self._space.notify_all()

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            if not self._ending:
                time.sleep(FEED_LINGER)
            ending = self._ending
            batch = [self._frames.popleft() for _ in range(len(self._frames))]
            with self._space:
                self._space.notify_all()
            if batch:
                self._send(batch)
            if ending and not self._frames:
                self._finish()
                return

    def _send(self, batch: list[tuple[bytes, MessageFile | None]]) -> None:
        assert self._proc is not None and self._proc.stdin is not None
        try:
            self._proc.stdin.write(b"".join(data for data, _ in batch))
            self._proc.stdin.flush()
            self.sent += len(batch)
        except OSError:        # the writer process is gone: what this write held is lost
            code = self._proc.poll()
            self.lost += len(batch)
            event("archive.writer_exited", logging.ERROR, status=code, lost=len(batch),
                  hint="those messages are missing from the archive; the mail itself went on")
            for _, spooled in batch:
                if spooled is not None:
                    spooled.release()
            try:
                self._proc.stdin.close()
            except OSError:
                pass               # (its buffer could not be written: it was this batch)
            self._proc.wait()
            self._restart()

    def _restart(self) -> None:
        while not self._ending:
            time.sleep(RESTART_DELAY)
            try:
                self._spawn()
                return
            except (OSError, StorageError) as exc:
                event("archive.writer_failed", logging.ERROR, error=exc)

    def _finish(self) -> None:
        assert self._proc is not None and self._proc.stdin is not None
        try:
            self._proc.stdin.write(END)
            self._proc.stdin.close()
        except OSError:
            pass           # it ended already: its next start repairs what it left
        try:
            self._proc.wait(30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()


def _hold_lock(root: Path) -> int:
    """The archive's one writer: wait for any other to end (a process serve left running). A
    read-only descriptor, so the archive's file system can still be remounted read-only."""
    fd = hold(root / "writer.lock", wait=True)
    assert fd is not None
    return fd


def _main(argv: list[str]) -> int:
    """`python -m relay.storage.archive_feed ROOT DAYS [UID:GID]` (the owner of what it
    creates; GID -1: the file's own): write what comes on standard
    input until it ends."""
    from relay.log import setup
    from relay.storage.durable import make_dirs

    ignore_stop_signals()
    setup("INFO")
    owner = Owner()
    if len(argv) > 2 and argv[2]:
        uid, gid = (int(n) for n in argv[2].split(":"))
        owner = Owner(uid, None if gid < 0 else gid)
    archive = Archive(Path(argv[0]), int(argv[1]), owner)
    make_dirs(archive.root, owner)
    lock = _hold_lock(archive.root)
    writer = ArchiveWriter(archive)
    writer.start()
    sys.stdout.buffer.write(b"ready\n")
    sys.stdout.buffer.flush()
    stream = sys.stdin.buffer
    clean = False
    try:
        while (item := read_item(stream)) is not None:
            writer.add(item)
        clean = True
    except EOFError:
        event("archive.feed_cut", logging.WARNING, hint="serve ended without a clean stop")
    finally:
        writer.stop(clean=clean)
        os.close(lock)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
