"""The inbound SMTP hot path and the runners sharing its loop make no blocking call on it: the
health state and the passwd-file answer from memory, refreshed in a worker thread (issue 10).
Before, `Health.get` and `PasswdCache.get` stat'ed their files on the loop for every message."""

from __future__ import annotations

import pytest

from relay.config import load
from relay.directory import Directory
from tests.helpers import wait_for
from tests.loopwatch import no_blocking_calls_on_loops, watch_thread
from tests.smtp.fakes import FakePrimary, InProcessRelay, Script, send, stored_files, write_config

pytestmark = pytest.mark.timeout(60)

MESSAGE = b"From: s@sender.test\r\nTo: alice@example.com\r\nSubject: hi\r\n\r\nbody\r\n"


def test_messages_in_an_outage_and_after_cost_the_loop_no_file_call(tmp_path):
    fake = FakePrimary(Script(mail="451 4.3.0 down")).start()
    path = write_config(tmp_path, fake.port, extra="replay: {probe_interval: 1s}\n")
    Directory(load(path)).add("alice@example.com")
    relay = InProcessRelay.from_file(path).start()
    try:
        with no_blocking_calls_on_loops() as blocking:
            watch_thread(relay.thread)
            for _ in range(5):
                assert send(relay.port, "s@sender.test", ["alice@example.com"], MESSAGE)[1][0] == 250
            fake.script.mail = "250 2.1.0 Ok"         # the primary is back: replay drains
            wait_for(lambda: len(fake.received) == 5, 20, "the replay of five messages")
            assert send(relay.port, "s@sender.test", ["alice@example.com"], MESSAGE)[1][0] == 250
            relay.stop()
            assert blocking == [], f"blocking calls on the relay's loop: {blocking}"
        assert len(stored_files(relay.config.storage.maildirs)) == 5
    finally:
        relay.stop()
        fake.stop()


def test_a_user_added_a_moment_ago_is_kept_at_once(tmp_path):
    """Memory answers a registered user; a miss is asked again of the file (in a worker
    thread), so mail right after `users add` is not refused for a second."""
    fake = FakePrimary(Script(mail="451 4.3.0 down")).start()
    path = write_config(tmp_path, fake.port)
    relay = InProcessRelay.from_file(path).start()
    try:
        Directory(load(path)).add("carol@example.com")      # as the command line would
        answers, reply = send(relay.port, "s@sender.test", ["carol@example.com"], MESSAGE)
        assert answers[0][0] == 250 and reply[0] == 250
    finally:
        relay.stop()
        fake.stop()
