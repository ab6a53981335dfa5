"""`continuity-relay queue flush` (like `postqueue -f`): deferred entries are due now and the
replay queues are swept at once, against a scripted primary (issue 10, point 2)."""

from __future__ import annotations

import time
from dataclasses import replace

from relay.app import build_store
from relay.cli import main
from relay.config import load
from relay.storage.queue import Envelope
from tests.smtp.fakes import FakePrimary, write_config

MESSAGE = b"From: s@sender.test\r\nSubject: deferred\r\n\r\nbody\r\n"


def test_flush_sends_deferred_mail_now(tmp_path):
    primary = FakePrimary().start()
    try:
        cfg = write_config(tmp_path, primary.port)
        store = build_store(load(cfg))
        replay = store.replay_queue("example.com")
        entry = replay.enqueue_bytes(MESSAGE, Envelope("s@sender.test", "alice@example.com", time.time()))
        replay.claim(entry)
        replay.move(entry, "active", "waiting", replace(
            replay.envelope(entry, "active"), attempts=3, note="452 4.2.2 full",
            extra={"next_try": time.time() + 3600}))
        outbound = store.outbound.enqueue_bytes(MESSAGE, Envelope("alice@example.com", "x@else.test",
                                                                  time.time(), attempts=1,
                                                                  extra={"next_try": time.time() + 3600}))
        assert main(["queue", "flush", "-c", str(cfg)]) == 0
        assert [r.rcpt_tos for r in primary.received] == [["alice@example.com"]]
        assert replay.state_of(entry) is None
        assert "next_try" not in store.outbound.envelope(outbound).extra   # due for the smarthost
    finally:
        primary.stop()
