"""The archive across a crash: the real relay killed with SIGKILL while passing mail through,
then started again, or its archive writer process killed alone (issue 11, point 1: the crash
window is bounded and visible).

What must hold: every record on disk is whole and the day's chain verifies (a torn last line
is cut at the start); the start says `archive.unclean_stop` with the bound; what went missing
is at most that bound; and archiving goes on, the chain continuing, after the restart.
"""

from __future__ import annotations

import os
import signal
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


class Load:
    """The real relay, archiving, passing mail from a sender thread until `stop` is set."""

    def __init__(self, tmp_path: Path, primary: FakePrimary) -> None:
        self.archive = Archive(tmp_path / "archive")
        self.relay = rp.RelayProcess(_archive_config(tmp_path, primary.port)).start()
        self.stop, self.acknowledged = threading.Event(), []
        self.sender = threading.Thread(target=_send_until, args=(self.relay, self.stop, self.acknowledged))
        self.sender.start()


@pytest.fixture
def load(tmp_path: Path):
    primary = FakePrimary().start()
    running = Load(tmp_path, primary)
    try:
        yield running
    finally:
        running.stop.set()
        if running.relay.running:
            running.relay.kill()
        running.sender.join(15)
        primary.stop()


def test_sigkill_while_archiving_pass_through_mail(tmp_path: Path, load: Load) -> None:
    relay, archive, stop, acknowledged, sender = (load.relay, load.archive, load.stop, load.acknowledged,
                                                  load.sender)
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


def _writer_pid(relay: rp.RelayProcess) -> int | None:
    """serve's archive writer process (relay/storage/archive_feed.py), or None."""
    for task in Path(f"/proc/{relay.pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            if b"relay.storage.archive_feed" in Path(f"/proc/{child}/cmdline").read_bytes():
                return int(child)
    return None


def test_sigkill_of_the_archive_writer_process_under_load(load: Load) -> None:
    """The writer process killed alone: serve goes on answering 250, says what the write that
    found it gone held, starts it again, and the day's chain goes on through the restart."""
    relay, archive, stop, acknowledged, sender = (load.relay, load.archive, load.stop, load.acknowledged,
                                                  load.sender)
    wait_for(lambda: len(list(archive.records())) >= 20, 30, "mail being archived")
    first = wait_for(lambda: _writer_pid(relay), 10, "the writer process")
    os.kill(first, signal.SIGKILL)
    wait_for(lambda: "archive.writer_exited" in relay.log_text(), 30, "serve noticing")
    wait_for(lambda: _writer_pid(relay) not in (None, first), 30, "a new writer process")
    handed = len(acknowledged)
    wait_for(lambda: len(acknowledged) >= handed + 30, 30, "mail going on")
    stop.set()
    sender.join(15)
    assert sender.is_alive() is False and relay.running, "serve went on"
    relay.stop()
    records = list(archive.records())
    lost = len(acknowledged) - len(records)
    assert 0 <= lost <= BATCH + 2 * BACKLOG, (len(acknowledged), len(records))
    assert archive.verify() == [], "a record torn or out of order after the writer's crash"
    numbers = {int(archive.read(r).split(b"Subject: n")[1].split(b"\r\n")[0]) for r in records}
    missing = set(acknowledged) - numbers
    assert all(n < handed for n in missing), "only mail of the crash's moment is missing"
    assert acknowledged[-1] in numbers, "archiving went on after the restart"
    said = relay.log_text(all_runs=True)
    assert "archive.unclean_stop" in said and "lost=" in said


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_to_the_whole_process_group_is_a_clean_stop_with_everything_archived(tmp_path, sig):
    """Ctrl-C in a terminal signals the whole foreground group, and systemd's stop
    (KillMode=control-group) SIGTERMs every process of the unit: serve and its archive
    writer and index follower get it at once. The helpers end when serve closes their input,
    so what was archived is all there, and the stop is clean."""
    primary = FakePrimary().start()
    cfg = _archive_config(tmp_path, primary.port)
    archive = Archive(tmp_path / "archive")
    relay = rp.RelayProcess(cfg, wrapper=["setsid"]).start()      # a group of its own
    try:
        with smtplib.SMTP(*relay.address, timeout=10) as client:
            for n in range(200):
                client.sendmail("s@sender.test", ["alice@example.com"],
                                f"From: s@sender.test\r\nSubject: n{n}\r\n\r\nx\r\n".encode())
        os.killpg(relay.pid, sig)
        assert relay.proc.wait(30) == 0, relay.log_text()
        assert len(list(archive.records())) == 200, relay.log_text()
        assert not (tmp_path / "archive" / "writer.open").exists(), relay.log_text()
        assert "Traceback" not in relay.log_text() and "archive.writer_exited" not in relay.log_text()
    finally:
        if relay.running:
            relay.kill()
        primary.stop()
