"""The relay's own disk fails under the real process (security review 9, "fault injection"): the
storage roots on a small tmpfs that fills up, then goes read-only. Inbound, submission and the
webmail answer 4xx or a clear error, never a false 250, and `serve` stays up throughout.

The tests run as root (FACTS: they may mount a tmpfs); the mount is taken down however the test
ends."""

from __future__ import annotations

import logging
import os
import re
import signal
import smtplib
import ssl
import stat
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import trustme
import yaml

from relay.addresses import parse_mailbox
from relay.delivery.submit import Submitter
from relay.runners.outbox import OutboxRunner
from relay.storage.continuity import ContinuityStore
from relay.storage.maildir import MaildirStore
from tests.helpers import free_port, wait_for

try:
    from . import relay_process as rp
except ImportError:
    import relay_process as rp

from tests.web.helpers import Client

pytestmark = pytest.mark.timeout(120)

ALICE, PASSWORD = "alice@example.com", "alice disk pw"


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "store"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0755", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def relay_config(tmp_path: Path, store: Path) -> tuple[Path, ssl.SSLContext]:
    ca = trustme.CA()
    pem = tmp_path / "tls.pem"
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(pem))
    path = rp.write_config(tmp_path, primary_port=free_port())
    config = yaml.safe_load(path.read_text())
    config["storage"].update(maildirs=str(store / "maildirs"), spool=str(store / "spool"))
    config["listen"].update(submission=f"127.0.0.1:{free_port()}", web=f"127.0.0.1:{free_port()}")
    config["tls"] = {"cert": str(pem), "key": str(pem)}
    config["outbound"] = {"smarthost": {"address": f"127.0.0.1:{free_port()}", "starttls": "off"}}
    config["message_size_limit"] = "4MiB"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return path, context


def message(n: int, size: int) -> bytes:
    return (f"From: s@sender.test\r\nTo: {ALICE}\r\nMessage-ID: <disk-{n}@sender.test>\r\n"
            f"Subject: {n}\r\n\r\n").encode() + (b"x" * 76 + b"\r\n") * (size // 78)


def inbound(relay: rp.RelayProcess, data: bytes) -> tuple[int, bytes]:
    with smtplib.SMTP(*relay.address, timeout=30) as client:
        client.ehlo("sender.test")
        client.mail("s@sender.test")
        code, text = client.rcpt(ALICE)
        if code != 250:
            return code, text
        return client.data(data)


def submit(port: int, context: ssl.SSLContext, data: bytes) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.starttls(context=context)
        client.login(ALICE, PASSWORD)
        client.mail(ALICE)
        client.rcpt("bob@example.org")
        return client.data(data)


def webmail_send(port: int, data_size: int) -> int:
    browser = Client(port)
    assert browser.login_user(ALICE, PASSWORD).status == 303
    page = browser.get("/mail/compose")
    assert page.status == 200
    boundary = uuid.uuid4().hex
    fields = {"csrf": browser.csrf or "", "to": "bob@example.org", "cc": "", "bcc": "",
              "subject": "from the webmail", "body": "y" * data_size, "in_reply_to": "", "references": ""}
    body = b"".join(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
                    for k, v in fields.items()) + f"--{boundary}--\r\n".encode()
    reply = browser.request("POST", "/mail/compose", body,
                            {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert reply.status != 303 or reply.location == "/mail/Sent"
    if reply.status != 303:
        assert re.search(r"could not send|Not sent", reply.text), reply.text[:500]
    return reply.status


def kept_ids(relay: rp.RelayProcess) -> set[str]:
    found = set()
    for path in (relay.maildirs / "example.com" / "alice").rglob("*"):
        if path.is_file() and path.parent.name in ("new", "cur"):
            match = re.search(rb"Message-ID: <(disk-\d+)@", path.read_bytes())
            if match:
                found.add(match.group(1).decode())
    return found


def test_a_full_then_read_only_disk_never_gets_a_false_250(tmp_path, small_disk):
    cfg, context = relay_config(tmp_path, small_disk)
    added = rp.run_cli(cfg, "users", "add", ALICE, "--password-stdin", stdin=PASSWORD + "\n")
    assert added.returncode == 0, added.stderr
    raw = yaml.safe_load(cfg.read_text())
    submission = int(raw["listen"]["submission"].rsplit(":", 1)[1])
    web = int(raw["listen"]["web"].rsplit(":", 1)[1])
    staged = small_disk / "outbox-message"      # on the same disk: renamed in once it is full
    staged.write_bytes(f"From: {ALICE}\r\nTo: bob@example.org\r\nSubject: outbox\r\n\r\n".encode()
                       + b"z" * 200_000 + b"\r\n")
    with rp.RelayProcess(cfg) as relay:
        # 1. Fill the disk with kept mail: 250s while it fits, then 4xx; never a 5xx.
        accepted, refused = [], []
        for n in range(200):
            code, text = inbound(relay, message(n, 60_000))
            (accepted if code == 250 else refused).append((n, code, text))
            if len(refused) >= 3:
                break
        assert accepted and len(refused) == 3, (accepted[-1:], refused)
        assert all(400 <= code < 500 for _, code, _ in refused), refused
        # every 250 is on disk, byte for byte readable; no refused one is
        assert kept_ids(relay) == {f"disk-{n}" for n, _, _ in accepted}
        # 2. Submission and the webmail on the full disk: a 4xx, or a clear error page.
        code, _ = submit(submission, context, message(900, 300_000).replace(b"s@sender.test", ALICE.encode()))
        assert 400 <= code < 500, code
        assert webmail_send(web, 300_000) >= 400
        # ... and the Outbox: the message waits there (logged), it is neither lost nor sent.
        outbox = relay.maildirs / "example.com" / "alice" / ".Outbox" / "new"
        outbox.mkdir(parents=True, exist_ok=True)
        queued = outbox / "1800000000.M1P1Q1.disk-test"
        staged.rename(queued)
        wait_for(lambda: "outbox.deferred" in relay.log_text(), 45, "outbox.deferred", relay.log_text)
        assert queued.exists() and relay.running
        # 3. The same on a read-only disk.
        subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
        code, text = inbound(relay, message(999, 1_000))
        assert 400 <= code < 500, (code, text)
        code, _ = submit(submission, context, message(998, 1_000).replace(b"s@sender.test", ALICE.encode()))
        assert 400 <= code < 500, code
        assert webmail_send(web, 10) >= 400
        assert relay.running
        assert "disk-999" not in kept_ids(relay)
        # 4. The disk comes back: mail is taken again, without a restart.
        subprocess.run(["mount", "-o", "remount,rw,size=8m", str(small_disk)], check=True)
        assert inbound(relay, message(1000, 1_000))[0] == 250
        assert "disk-1000" in kept_ids(relay)
        seen = queued.parent.parent / "cur" / (queued.name + ":2,S")    # a client reads it: a
        seen.parent.mkdir(exist_ok=True)                               # hint, so no 30 s wait
        queued.rename(seen)
        queued = seen
        wait_for(lambda: not queued.exists() and "outbox.sent" in relay.log_text(), 45,
                    "the Outbox message sent once there is room", relay.log_text)
        assert relay.running


def outbound_entries(relay: rp.RelayProcess) -> list[str]:
    folder = relay.spool / "outbound" / "msg"
    return sorted(os.listdir(folder)) if folder.is_dir() else []


def lines(relay: rp.RelayProcess, name: str) -> list[str]:
    return [line for line in relay.log_text().splitlines() if f" {name} " in f"{line} "]


def test_the_outbox_on_a_read_only_disk_waits_and_is_sent_when_it_is_writable(tmp_path, small_disk):
    """The disk goes read-only just after a mail client saved a message into alice's Outbox
    (the relay is paused with SIGSTOP meanwhile, so that the runner first sees the message on
    the read-only disk). It cannot be queued: it is not sent, not counted as sent, stays in the
    Outbox, and one clear `outbox.deferred` line says why, once a rescan, never in a loop.
    `serve` stays up, and sends it once the disk is writable again."""
    cfg, _context = relay_config(tmp_path, small_disk)
    added = rp.run_cli(cfg, "users", "add", ALICE, "--password-stdin", stdin=PASSWORD + "\n")
    assert added.returncode == 0, added.stderr
    outbox = small_disk / "maildirs" / "example.com" / "alice" / ".Outbox"
    with rp.RelayProcess(cfg) as relay:
        assert inbound(relay, message(1, 1_000))[0] == 250      # alice's Maildir exists
        for sub in ("tmp", "new", "cur"):
            (outbox / sub).mkdir(parents=True, exist_ok=True)
        assert relay.pid is not None
        os.kill(relay.pid, signal.SIGSTOP)
        try:
            saved = outbox / "tmp" / "1800000000.M1P1Q1.ro-test"
            saved.write_bytes(f"From: {ALICE}\r\nTo: bob@example.org\r\nSubject: ro\r\n\r\n"
                              "saved just before the disk went read-only\r\n".encode())
            queued = outbox / "new" / saved.name
            saved.rename(queued)
            subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
        finally:
            os.kill(relay.pid, signal.SIGCONT)
        began = time.monotonic()
        wait_for(lambda: lines(relay, "outbox.deferred"), 45, "outbox.deferred", relay.log_text)
        (deferred,) = lines(relay, "outbox.deferred")[:1]
        assert "user=alice@example.com" in deferred and "Read-only file system" in deferred, deferred
        # while the disk stays read-only: the message waits, nothing went out, serve is up
        assert inbound(relay, message(2, 1_000))[0] in range(400, 500)
        assert queued.exists() and outbound_entries(relay) == []
        assert lines(relay, "outbox.sent") == [] and lines(relay, "app.runner_failed") == []
        assert relay.running
        # one try at each rescan (30 s) at most, never a loop: count the tries so far
        tries = len(lines(relay, "outbox.deferred"))
        assert tries <= 2 + (time.monotonic() - began) / 30, lines(relay, "outbox.deferred")
        subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=True)
        # The mail client marks it seen (new/ -> cur/): a hint, so the next scan is now, not at
        # the next 30 s rescan (which would send it just the same).
        seen = outbox / "cur" / (saved.name + ":2,S")
        queued.rename(seen)
        queued = seen
        wait_for(lambda: not queued.exists() and lines(relay, "outbox.sent"), 45,
                 "the Outbox message sent once the disk is writable", relay.log_text)
        assert len(lines(relay, "outbox.sent")) == 1 and len(outbound_entries(relay)) == 1
        sent = list((outbox.parent / ".Sent" / "cur").iterdir())
        assert [p.read_bytes().count(b"saved just before") for p in sent] == [1]
        assert relay.running


class RemountAfterQueueing(Submitter):
    """The real submitter; then the Maildir disk goes read-only, before the Outbox runner can
    take the message out (the one window the runner's own check cannot close)."""

    def __init__(self, store: ContinuityStore, disk: Path) -> None:
        super().__init__(store)
        self.disk, self.calls = disk, 0

    def submit(self, *args, **kwargs) -> str:
        self.calls += 1
        entry = super().submit(*args, **kwargs)
        subprocess.run(["mount", "-o", "remount,ro", str(self.disk)], check=True)
        return entry


def test_a_message_queued_but_not_removed_is_never_queued_again(tmp_path, small_disk, caplog):
    """Queued, then the Outbox cannot be emptied (read-only): later scans retry the removal
    only; before the fix every scan crashed the runner and each restart queued it once more."""
    store = ContinuityStore(MaildirStore(small_disk / "maildirs"), tmp_path / "spool")
    submitter = RemountAfterQueueing(store, small_disk)
    outbox = OutboxRunner(store.maildirs, submitter, lambda: ["example.com"], lambda user: True,
                          lambda: None, "relay.test", store.notify)
    alice = parse_mailbox(ALICE)
    new = store.maildirs.ensure(alice) / ".Outbox" / "new"
    (new / "1800000000.M1P1Q1.t").write_bytes(f"From: {ALICE}\r\nTo: b@example.org\r\n\r\nx\r\n".encode())
    caplog.set_level(logging.INFO, logger="relay")
    assert outbox.scan() == 1 and outbox.scan() == 0 and outbox.scan() == 0
    assert submitter.calls == 1 and len(os.listdir(tmp_path / "spool" / "outbound" / "msg")) == 1
    assert "outbox.not_removed" in caplog.text and os.listdir(new) == ["1800000000.M1P1Q1.t"]
    subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=True)
    assert outbox.scan() == 0 and os.listdir(new) == [] and submitter.calls == 1
    assert "outbox.removed" in caplog.text


def test_a_device_and_unreadable_files_in_an_outbox_never_stop_serve(tmp_path):
    """Issue 9.2's last bullet under the real process: /dev/zero's device node, a write-only
    /proc/sys file (EACCES at open, even for root) and the relay's own /proc/PID/mem (EIO at
    read) bind-mounted into alice's Outbox are each skipped with one line; the message beside
    them goes out and `serve` stays up. (tests/unit/test_symlinks.py has the details.)"""
    store = tmp_path / "store"
    cfg, _context = relay_config(tmp_path, store)
    added = rp.run_cli(cfg, "users", "add", ALICE, "--password-stdin", stdin=PASSWORD + "\n")
    assert added.returncode == 0, added.stderr
    new = store / "maildirs" / "example.com" / "alice" / ".Outbox" / "new"
    mounted: list[Path] = []
    with rp.RelayProcess(cfg) as relay:
        assert inbound(relay, message(1, 1_000))[0] == 250      # alice's Maildir exists
        new.mkdir(parents=True, exist_ok=True)
        try:
            os.mknod(new / "1800000000.M1P1Q1.zero", 0o600 | stat.S_IFCHR, os.makedev(1, 5))
            for n, source in ((2, "/proc/sys/vm/drop_caches"), (3, f"/proc/{relay.pid}/mem")):
                target = new / f"1800000000.M1P1Q{n}.unreadable"
                target.touch()
                subprocess.run(["mount", "--bind", source, str(target)], check=True)
                mounted.append(target)
            good = new.parent / "tmp" / "1800000000.M1P1Q4.good"
            good.parent.mkdir(exist_ok=True)
            good.write_bytes(f"From: {ALICE}\r\nTo: bob@example.org\r\nSubject: ok\r\n\r\nok\r\n".encode())
            good.rename(new / good.name)
            wait_for(lambda: lines(relay, "outbox.sent"), 45, "outbox.sent", relay.log_text)
            skipped = lines(relay, "outbox.skipped")
            assert len(skipped) == 3, skipped
            assert sorted(os.listdir(new)) == ["1800000000.M1P1Q1.zero", "1800000000.M1P1Q2.unreadable",
                                               "1800000000.M1P1Q3.unreadable"]
            assert relay.running and lines(relay, "app.runner_failed") == []
            assert inbound(relay, message(2, 1_000))[0] == 250
        finally:
            for target in mounted:
                subprocess.run(["umount", str(target)], check=False)


def test_a_sent_folder_that_cannot_be_written_queues_nothing_for_the_recipients(tmp_path, small_disk):
    """The Maildirs' disk read-only, the spool's fine: the submission fails (no 250), and the
    client's retry must not give the recipient a second copy. The outbound entries were made
    before the Sent copy, so every failed try left one behind."""
    store = ContinuityStore(MaildirStore(small_disk / "maildirs"), tmp_path / "spool")
    alice = parse_mailbox(ALICE)
    store.maildirs.ensure(alice)
    submitter = Submitter(store)
    message = f"From: {ALICE}\r\nTo: bob@example.org\r\nSubject: s\r\n\r\nx\r\n".encode()
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    for _retry in range(3):
        with pytest.raises(OSError):
            submitter.submit(alice, ALICE, ["bob@example.org"], message)
    assert store.outbound.pending() == []
    subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=True)
    submitter.submit(alice, ALICE, ["bob@example.org"], message)
    assert len(store.outbound.pending()) == 1
