"""The keeper: inbound's kept copies written by a storage process of its own.

A kept message's file work (continuity.py's `keep`: the Maildir file, the queue's link and
envelope, five fsyncs and some thirty system calls) ran in the relay's storage threads, which
share one interpreter lock with the event loop. Each system call lets the lock go and must
take it back, and with the loop busy that wait is up to a switch interval (5 ms): a keep took
tens of milliseconds, the twenty sessions waited on it, and both threads' CPU went to handing
the lock about. Here the same `ContinuityStore.keep` runs in a child process (`python -m
relay.storage.keeper`) with its own interpreter and threads, on the other core; the loop only
writes a request and reads a reply line, with no thread hop at all.

The protocol, on the child's stdin and stdout:
  request: 4-byte big-endian length, a JSON header of that length (`n`, the user, the sender,
           the options, where the message is: `path`/`offset` of a spooled file, or `body`
           bytes that follow, after `prefix` bytes that follow first)
  reply:   one JSON line, {"n": N, "id": QUEUE_ID} or {"n": N, "error": TEXT}

"250 means on disk" holds as before: the reply comes once `keep` returned in the child, that
is once the Maildir file and the queue entry were fsync'd. What a failure does: the child
gone (killed, crashed) fails every keep still waiting with StorageError (the sender gets 451
and retries; whatever the child wrote is what a crash of `keep` leaves, see continuity.py),
and the next keep starts a new child. The child ends when its stdin closes (the relay stopped
or died), after the keeps it had begun; it ignores SIGTERM and SIGINT, which a stop sends
the whole process group while the relay still drains.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import struct
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from relay.addresses import Mailbox, parse_mailbox
from relay.errors import StorageError
from relay.log import event, setup, stop
from relay.storage.child import ignore_stop_signals
from relay.storage.continuity import ContinuityStore
from relay.storage.durable import Owner
from relay.storage.incoming import MessageFile
from relay.storage.maildir import MaildirStore

THREADS = 20            # keeps at once in the child: fsync-bound, the group commit shares them
_LENGTH = struct.Struct(">I")
MAX_HEADER = 1 << 20    # a header line's bytes (addresses and options: far less)


class Keeper:
    """The relay's side: `await keep(...)` from the event loop; `close()` at shutdown. The
    child starts with the first keep (and again after it died), in a worker thread: spawning
    opens pipes, which the loop must not."""

    def __init__(self, maildirs: Path, spool: Path, owner: Owner = Owner()) -> None:
        self.args = [os.fspath(maildirs), os.fspath(spool),
                     "" if owner.uid is None else str(owner.uid),
                     "" if owner.gid is None else str(owner.gid)]
        self._child: _Child | None = None
        self._waiting: dict[int, asyncio.Future[str]] = {}
        self._numbers = itertools.count()
        self._starting = asyncio.Lock()

    @property
    def pid(self) -> int | None:
        return self._child.process.pid if self._child is not None else None

    async def keep(self, user: Mailbox, sender: str, message: MessageFile,
                   mail_options: tuple[str, ...] = (), rcpt_options: tuple[str, ...] = ()) -> str:
        """As `ContinuityStore.keep`, done by the child; returns the replay queue id."""
        child = await self._running()
        number = next(self._numbers)
        header = {"n": number, "user": str(user), "sender": sender, "mail": list(mail_options),
                  "rcpt": list(rcpt_options), "prefix": len(message.prefix), "size": message.size}
        if message.path is None:
            header["body"] = len(message.body)
        else:
            header.update(path=os.fspath(message.path), offset=message.offset)
        encoded = json.dumps(header).encode()
        reply = asyncio.get_running_loop().create_future()
        self._waiting[number] = reply
        try:
            child.writer.write(b"".join((_LENGTH.pack(len(encoded)), encoded, message.prefix,
                                         message.body if message.path is None else b"")))
            await child.writer.drain()
            return await reply
        except (ConnectionError, RuntimeError) as exc:   # RuntimeError: its pipe already closed
            raise StorageError(f"cannot keep mail for {user}: the storage process is gone") from exc
        finally:
            self._waiting.pop(number, None)

    async def _running(self) -> _Child:
        async with self._starting:
            if self._child is None or self._child.replies.done():
                self._child = await self._start()
            return self._child

    async def _start(self) -> _Child:
        loop = asyncio.get_running_loop()
        process = await asyncio.to_thread(
            subprocess.Popen, [sys.executable, "-m", "relay.storage.keeper", *self.args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
        assert process.stdin is not None and process.stdout is not None
        reader = asyncio.StreamReader(limit=MAX_HEADER)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), process.stdout)
        transport, protocol = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin,
                                                            process.stdin)
        writer = asyncio.StreamWriter(transport, protocol, None, loop)
        event("keeper.started", pid=process.pid)
        return _Child(process, writer, loop.create_task(self._replies(process, reader)))

    async def _replies(self, process: subprocess.Popen, reader: asyncio.StreamReader) -> None:
        try:
            while line := await reader.readline():
                answer = json.loads(line)
                reply = self._waiting.get(answer["n"])
                if reply is None or reply.done():
                    continue
                if "error" in answer:
                    reply.set_exception(StorageError(answer["error"]))
                else:
                    reply.set_result(answer["id"])
        finally:
            code = await asyncio.to_thread(process.wait)
            if self._waiting:
                event("keeper.lost", logging.ERROR, pid=process.pid, code=code,
                      waiting=len(self._waiting))
            for reply in self._waiting.values():
                if not reply.done():
                    reply.set_exception(StorageError("the storage process exited"))

    async def close(self) -> None:
        """Close the child's stdin; it ends after the keeps it had begun."""
        child = self._child
        if child is None:
            return
        child.writer.close()
        await asyncio.wait([child.replies], timeout=30)
        if child.process.poll() is None:
            child.process.kill()
            await asyncio.to_thread(child.process.wait)


@dataclass
class _Child:
    process: subprocess.Popen
    writer: asyncio.StreamWriter
    replies: asyncio.Task[None]      # ends when the child's stdout does


# -- the child ---------------------------------------------------------------------------------

def _read_exactly(stream: BinaryIO, size: int) -> bytes | None:
    data = stream.read(size)
    if len(data) != size:
        if data:
            raise EOFError("a request cut short")
        return None
    return data


def _request(stream: BinaryIO) -> tuple[dict, MessageFile] | None:
    """The next request and its message; None at the end of stdin."""
    length = _read_exactly(stream, _LENGTH.size)
    if length is None:
        return None
    (size,) = _LENGTH.unpack(length)
    if size > MAX_HEADER:
        raise EOFError(f"a request header of {size} bytes")
    header = json.loads(_read_exactly(stream, size) or b"")
    prefix = _read_exactly(stream, header["prefix"]) or b""
    if "path" in header:
        message = MessageFile(Path(header["path"]), header["size"], prefix, header["offset"])
    else:
        message = MessageFile(None, header["size"], prefix, body=_read_exactly(stream, header["body"]) or b"")
    return header, message


def serve(stdin: BinaryIO, stdout: BinaryIO, store: ContinuityStore) -> None:
    """Read requests until stdin ends, keep each in a thread, write each reply as it is done."""
    writing = threading.Lock()

    def one(header: dict, message: MessageFile) -> None:
        try:
            entry = store.keep(parse_mailbox(header["user"]), header["sender"], message,
                               tuple(header["mail"]), tuple(header["rcpt"]))
            answer: dict = {"n": header["n"], "id": entry}
        except Exception as exc:  # noqa: BLE001 - any local fault is the relay's 451, said to it
            answer = {"n": header["n"], "error": str(exc) or type(exc).__name__}
        line = json.dumps(answer).encode() + b"\n"
        with writing:
            stdout.write(line)
            stdout.flush()

    with ThreadPoolExecutor(THREADS, thread_name_prefix="keep") as pool:
        while (request := _request(stdin)) is not None:
            pool.submit(one, *request)


def main(argv: list[str]) -> int:
    ignore_stop_signals()   # the relay drains its sessions, whose keeps this finishes, then closes stdin
    setup("WARNING")        # what keep logs (a refused symlink) goes to the relay's stderr
    maildirs, spool, uid, gid = argv
    owner = Owner(int(uid) if uid else None, int(gid) if gid else None)
    store = ContinuityStore(MaildirStore(Path(maildirs), owner), Path(spool), owner)
    try:
        serve(sys.stdin.buffer, sys.stdout.buffer, store)
    finally:
        stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
