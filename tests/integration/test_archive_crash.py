"""The archive across a crash: the real relay killed with SIGKILL while passing mail through,
then started again (issue 11, point 1: the crash window is bounded and visible).

What must hold: every record on disk is whole and the day's chain verifies (a torn last line
is cut at the start); the start says `archive.unclean_stop` with the bound; what went missing
is at most that bound; and archiving goes on, the chain continuing, after the restart.
"""

from __future__ import annotations

import smtplib
import threading
from pathlib import Path

import pytest
import yaml

from relay.storage.archive import BACKLOG, BATCH, Archive
from tests.helpers import wait_for
from tests.smtp.fakes import FakePrimary

try:
    from . import relay_process as rp
except ImportError:
    import relay_process as rp

pytestmark = pytest.mark.timeout(120)


def _archive_config(tmp_path: Path, primary_port: int) -> Path:
    cfg = rp.write_config(tmp_path, primary_port=primary_port)
    raw = yaml.safe_load(cfg.read_text())
    raw["storage"]["archive"] = "archive"
    cfg.write_text(yaml.safe_dump(raw, sort_keys=False))
    rp.import_users(cfg, ["alice@example.com"])
    return cfg


def _send_until(relay: rp.RelayProcess, stop: threading.Event, acknowledged: list[int]) -> None:
    n = 0
    while not stop.is_set():
        try:
            with smtplib.SMTP(*relay.address, timeout=10) as client:
                while not stop.is_set():
                    body = (f"From: s@sender.test\r\nTo: alice@example.com\r\nSubject: n{n}\r\n\r\n"
                            f"message {n}\r\n").encode()
                    client.sendmail("s@sender.test", ["alice@example.com"], body)
                    acknowledged.append(n)
                    n += 1
        except (OSError, smtplib.SMTPException):
            return                          # the relay died under us


def test_sigkill_while_archiving_pass_through_mail(tmp_path: Path) -> None:
    primary = FakePrimary().start()
    cfg = _archive_config(tmp_path, primary.port)
    archive = Archive(tmp_path / "archive")
    relay = rp.RelayProcess(cfg).start()
    try:
        stop, acknowledged = threading.Event(), []
        sender = threading.Thread(target=_send_until, args=(relay, stop, acknowledged))
        sender.start()
        wait_for(lambda: len(acknowledged) >= 60 and len(list(archive.records())) >= 20, 30,
                 "mail flowing and being archived")
        relay.kill()
        stop.set()
        sender.join(15)
        before = list(archive.records())
        relay.start()
        assert "archive.unclean_stop" in relay.log_text()
        assert archive.verify() == [], "a record torn or out of order after the crash"
        lost = len(acknowledged) - len(before)
        assert 0 <= lost <= BATCH + BACKLOG, (len(acknowledged), len(before))
        with smtplib.SMTP(*relay.address, timeout=10) as client:
            client.sendmail("s@sender.test", ["alice@example.com"],
                            b"From: s@sender.test\r\nTo: alice@example.com\r\nSubject: after\r\n\r\nx\r\n")
        wait_for(lambda: any(b"Subject: after" in archive.read(r) for r in list(archive.records())[-3:]),
                 15, "the first message after the restart archived")
        assert archive.verify() == []                    # the chain goes on over the restart
        relay.stop()
        assert not (tmp_path / "archive" / "writer.open").exists()     # a clean stop says so
    finally:
        if relay.running:
            relay.kill()
        primary.stop()
