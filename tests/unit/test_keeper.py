"""storage/keeper.py: kept copies written by a child process, as `ContinuityStore.keep` would."""

from __future__ import annotations

import asyncio
import json
import os
import signal

import pytest

from relay.addresses import parse_mailbox
from relay.errors import StorageError
from relay.storage.continuity import ContinuityStore
from relay.storage.incoming import MessageFile
from relay.storage.keeper import Keeper
from relay.storage.maildir import MaildirStore
from relay.storage.queue import Envelope

pytestmark = pytest.mark.timeout(60)

ALICE = parse_mailbox("alice@example.com")
BODY = b"Subject: hi\r\n\r\nbody\r\n"


def kept(tmp_path, entry: str) -> tuple[Envelope, bytes]:
    queue = ContinuityStore(MaildirStore(tmp_path / "m"), tmp_path / "s").replay_queue("example.com")
    envelope = Envelope.from_bytes((queue.root / "waiting" / entry).read_bytes())
    return envelope, (queue.root / "msg" / entry).read_bytes()[envelope.skip:]


def test_a_keep_in_memory_lands_in_the_maildir_and_queue_written_by_the_child(tmp_path):
    async def main() -> tuple[str, int | None]:
        keeper = Keeper(tmp_path / "m", tmp_path / "s")
        try:
            entry = await keeper.keep(ALICE, "x@sender.test", MessageFile(None, len(BODY), body=BODY),
                                      ("BODY=8BITMIME",), ("NOTIFY=NEVER",))
            return entry, keeper.pid
        finally:
            await keeper.close()

    entry, pid = asyncio.run(main())
    envelope, data = kept(tmp_path, entry)
    assert (envelope.mail_from, envelope.rcpt) == ("x@sender.test", "alice@example.com")
    assert envelope.mail_options == ("BODY=8BITMIME",) and envelope.rcpt_options == ("NOTIFY=NEVER",)
    assert data == BODY
    (stored,) = (tmp_path / "m" / "example.com" / "alice" / "new").iterdir()
    assert pid is not None and pid != os.getpid() and f"P{pid}Q" in stored.name
    top = b"Return-Path: <x@sender.test>\r\nDelivered-To: alice@example.com\r\n"
    assert stored.read_bytes() == top + BODY


def test_a_spooled_message_is_read_by_the_child_from_its_file_past_the_offset(tmp_path):
    spooled = tmp_path / "incoming"
    spooled.write_bytes(b"SKIPPED" + BODY)
    message = MessageFile(spooled, len(BODY), offset=len(b"SKIPPED")).with_prefix(b"X-Top: 1\r\n")

    async def main() -> list[str]:
        keeper = Keeper(tmp_path / "m", tmp_path / "s")
        try:
            return list(await asyncio.gather(*(keeper.keep(ALICE, "", message) for _ in range(5))))
        finally:
            await keeper.close()

    entries = asyncio.run(main())
    assert len(set(entries)) == 5
    assert all(kept(tmp_path, entry)[1] == b"X-Top: 1\r\n" + BODY for entry in entries)


def test_the_child_gone_fails_the_keeps_waiting_and_the_next_keep_starts_another(tmp_path):
    fifo = tmp_path / "never"
    os.mkfifo(fifo)      # the child blocks opening it: a keep that is still waiting

    async def main() -> tuple[BaseException | str, str, int | None, int | None]:
        keeper = Keeper(tmp_path / "m", tmp_path / "s")
        try:
            stuck = asyncio.ensure_future(keeper.keep(ALICE, "", MessageFile(fifo, 10)))
            while keeper.pid is None:
                await asyncio.sleep(0.01)
            first = keeper.pid
            await asyncio.sleep(0.2)     # the request is in the child (not a timing assertion)
            os.kill(first, signal.SIGKILL)
            outcome = await asyncio.gather(stuck, return_exceptions=True)
            entry = await keeper.keep(ALICE, "", MessageFile(None, len(BODY), body=BODY))
            return outcome[0], entry, first, keeper.pid
        finally:
            await keeper.close()

    failed, entry, first, second = asyncio.run(main())
    assert isinstance(failed, StorageError)
    assert second not in (None, first)
    assert kept(tmp_path, entry)[1] == BODY


def test_a_keep_the_child_cannot_do_is_a_storage_error_with_its_reason(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "example.com").symlink_to(tmp_path)      # never followed

    async def main() -> BaseException | str:
        keeper = Keeper(tmp_path / "m", tmp_path / "s")
        try:
            outcome = await asyncio.gather(keeper.keep(ALICE, "", MessageFile(None, 4, body=b"x\r\n\r\n")),
                                           return_exceptions=True)
            return outcome[0]
        finally:
            await keeper.close()

    failed = asyncio.run(main())
    assert isinstance(failed, StorageError) and "symlink" in str(failed)
    assert json.dumps(str(failed))   # the reason, as the child said it


def test_a_stop_signal_to_the_group_leaves_the_child_finishing_the_relays_keeps(tmp_path):
    """systemd and a terminal signal every process of the group at once; the relay drains its
    sessions after SIGTERM, so the child must still take their keeps (it ends at stdin's end)."""
    async def main() -> tuple[str, int | None, int | None]:
        keeper = Keeper(tmp_path / "m", tmp_path / "s")
        try:
            await keeper.keep(ALICE, "", MessageFile(None, len(BODY), body=BODY))
            first = keeper.pid
            assert first is not None
            os.kill(first, signal.SIGTERM)
            os.kill(first, signal.SIGINT)
            entry = await keeper.keep(ALICE, "", MessageFile(None, len(BODY), body=BODY))
            return entry, first, keeper.pid
        finally:
            await keeper.close()

    entry, first, second = asyncio.run(main())
    assert second == first
    assert kept(tmp_path, entry)[1] == BODY
