"""The spam filter against a real rspamd: during an outage, GTUBE is refused in the session and
stored nowhere; a clean message is kept as it came (relay/smtp/spam.py)."""

from __future__ import annotations

import pytest

from relay.config import load
from relay.directory import Directory
from tests.helpers import free_port
from tests.smtp.fakes import InProcessRelay, send, stored_files, write_config

try:
    from .rspamd import GTUBE
except ImportError:
    from rspamd import GTUBE

pytestmark = pytest.mark.timeout(180)

CLEAN = (b"From: Bob Sender <bob@sender.test>\r\n"
         b"To: Alice <alice@example.com>\r\n"
         b"Subject: Minutes of the meeting\r\n"
         b"Date: Tue, 01 Dec 2026 10:50:00 +0000\r\n"
         b"Message-ID: <minutes-1@sender.test>\r\n"
         b"MIME-Version: 1.0\r\n"
         b"Content-Type: text/plain; charset=utf-8\r\n"
         b"\r\n"
         b"Hello Alice,\r\n\r\nthe minutes are on the wiki page. See you on Thursday.\r\n\r\nBob\r\n")
SPAM = CLEAN.replace(b"Hello Alice,", GTUBE.encode())


@pytest.fixture
def relay(tmp_path, rspamd_server):
    # Nothing listens on the primary's port: an outage, so every recipient is to be kept.
    path = write_config(tmp_path, free_port(),
                        extra=f"rspamd:\n  url: {rspamd_server.url}\n  timeout: 60s\n")
    Directory(load(path)).add("alice@example.com")
    started = InProcessRelay.from_file(path).start()
    yield started
    started.stop()


def files_under(root):
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def test_gtube_during_an_outage_is_550_and_stored_nowhere(relay):
    _, reply = send(relay.port, "bob@sender.test", ["alice@example.com"], SPAM)
    assert reply == (550, b"5.7.1 Message rejected as spam: Gtube pattern")
    spool = relay.config.storage.spool
    assert stored_files(relay.config.storage.maildirs) == []
    # the health states and serve's lock are all the spool holds: no mail, no queue entry
    not_mail = ("state", "serve.lock")
    assert [p for p in files_under(spool) if p.relative_to(spool).parts[0] not in not_mail] == []
    assert files_under(spool / "outbound") == [] and files_under(spool / "replay") == []


def test_clean_message_during_an_outage_is_kept_as_it_came(relay):
    _, reply = send(relay.port, "bob@sender.test", ["alice@example.com"], CLEAN)
    assert reply[0] == 250 and reply[1].startswith(b"2.0.0 OK: queued as ")
    (stored,) = stored_files(relay.config.storage.maildirs)
    data = stored.read_bytes()
    assert data.endswith(b"\r\n" + CLEAN) and b"X-Spam" not in data
    assert len(list((relay.config.storage.spool / "replay").rglob("waiting/*"))) == 1
