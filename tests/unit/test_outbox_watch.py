"""The Outbox runner's watches (a hint; the directory is the truth): a scan that runs after a
client made `.Outbox` but before it made `new/` in it must still hear about `new/`.

Found as a flaky test (test_outbox_message_with_foreign_from_is_not_sent, about one run in five):
the message waited for the 30 s rescan because neither `.Outbox` nor the not-yet-made `new/` was
watched."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from watchdog.observers import Observer

from relay.delivery.submit import Submitter
from relay.runners.outbox import OutboxRunner, _Hint
from relay.storage.continuity import ContinuityStore
from relay.storage.maildir import MaildirStore
from tests.helpers import wait_for


def test_a_new_folder_inside_the_outbox_is_heard_of(tmp_path: Path) -> None:
    store = ContinuityStore(MaildirStore(tmp_path / "maildirs"), tmp_path / "spool")
    runner = OutboxRunner(store.maildirs, Submitter(store), lambda: ["example.com"], lambda user: True,
                          lambda: None, "relay.test", store.notify)
    home = tmp_path / "maildirs" / "example.com" / "alice"
    (home / ".Outbox").mkdir(parents=True)           # the client's first step

    loop = asyncio.new_event_loop()
    kicked = threading.Event()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    observer = Observer()
    observer.daemon = True
    observer.start()
    try:
        runner.scan(observer, _Hint(loop, kicked.set))   # between the client's two steps
        (home / ".Outbox" / "new").mkdir()              # the second step: a hint must follow
        wait_for(kicked.is_set, 10, what="a kick for the new folder in the Outbox")
    finally:
        observer.stop()
        observer.join(5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()
