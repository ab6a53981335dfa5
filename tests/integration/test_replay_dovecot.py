"""A message the user deleted over IMAP, through a real Dovecot, is still replayed
(docs/architecture.md rule 7: user actions in the continuity mailbox never stop a message
from being replayed).

The relay runs in-process as root with `storage.owner: vmail` while nothing listens on the
primary's port (unreachable); alice, registered with a password through the CLI, gets three
messages, which are kept. Over IMAP she reads the first, deletes the second (\\Deleted +
EXPUNGE) and moves the third to another folder. Then the primary comes up on the configured
port and the relay replays all three, in order, with the bytes it received.
"""

from __future__ import annotations

import imaplib
import json
import re
from pathlib import Path

import pytest
import yaml

from tests.helpers import wait_for
from tests.smtp.fakes import FakePrimary, InProcessRelay, Script, send

try:  # tests/integration as a package ...
    from . import relay_process as rp
except ImportError:  # ... or as a rootdir-less test directory (pytest prepends it to sys.path)
    import relay_process as rp


pytestmark = pytest.mark.timeout(60)

USER, PASSWORD = f"alice@{rp.DOMAIN}", "alice-continuity-pw"
SENDER = "bob@sender.test"
MSGID_RE = re.compile(rb"\r\nMessage-ID: <([^>\r\n]+)>\r\n", re.IGNORECASE)


def wire(n: int) -> bytes:
    """Message n as DATA bytes: dot-stuffed, CRLF, 8-bit body, without the final dot."""
    return (f"From: Bob <{SENDER}>\r\nTo: Alice <{USER}>\r\nSubject: outage message {n}\r\n"
            f"Message-ID: <outage-{n}@sender.test>\r\nDate: Sat, 28 Nov 2026 03:0{n}:00 +0000\r\n"
            "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
            "Content-Transfer-Encoding: 8bit\r\n\r\n"
            f"Message {n}: gr\u00fc\u00dfe, \u20ac {n}00\r\n"
            "..a line that starts with a dot\r\n"
            "  indented line with trailing space \r\n"
            f"last line of {n}\r\n").encode()


def meant(n: int) -> bytes:
    """Message n as the relay receives it (dot-unstuffed)."""
    return wire(n).replace(b"\r\n..", b"\r\n.")


def msgid_of(data: bytes) -> str | None:
    match = MSGID_RE.search(data)
    return match.group(1).decode() if match else None



def user_files(maildirs: Path) -> dict[str, list[Path]]:
    """Every message file of alice (INBOX and folders, new/ and cur/) by Message-ID."""
    found: dict[str, list[Path]] = {}
    for path in (maildirs / rp.DOMAIN / "alice").rglob("*"):
        if path.is_file() and path.parent.name in ("new", "cur"):
            found.setdefault(msgid_of(path.read_bytes()) or "?", []).append(path)
    return found


def ok(result: tuple[str, list]) -> list:
    status, data = result
    assert status == "OK", (status, data)
    return data


def uids_by_msgid(client: imaplib.IMAP4) -> dict[str, bytes]:
    """Message-ID -> UID of every message in the selected folder."""
    found = {}
    for item in ok(client.uid("FETCH", "1:*", "(UID BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])")):
        if isinstance(item, tuple):
            uid = re.search(rb"UID (\d+)", item[0]).group(1)
            found[msgid_of(b"\r\n" + item[1])] = uid
    return found


@pytest.fixture
def world(mail_tmp_path: Path):
    """Config (owner vmail, replay probe every second), alice with a password, and a fake
    primary that is constructed (its port chosen) but not started: the primary is down."""
    primary = FakePrimary(Script())
    cfg = rp.write_config(mail_tmp_path, primary_port=primary.port, owner="vmail")
    raw = yaml.safe_load(cfg.read_text(encoding="utf-8"))
    raw["replay"] = {"probe_interval": "1s"}
    cfg.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    added = rp.run_cli(cfg, "users", "add", USER, "--password-stdin", stdin=PASSWORD + "\n")
    assert added.returncode == 0, added.stdout + added.stderr
    started: list[FakePrimary] = []

    def bring_up_primary() -> None:
        started.append(primary.start())

    relay = InProcessRelay.from_file(cfg).start()
    try:
        yield cfg, relay, primary, bring_up_primary
    finally:
        relay.stop()
        for server in started:
            server.stop()


def test_message_deleted_over_imap_is_still_replayed(world, mail_tmp_path: Path, dovecot_factory):
    cfg, relay, primary, bring_up_primary = world
    maildirs, spool = mail_tmp_path / "maildirs", mail_tmp_path / "spool"
    queue = spool / "replay" / rp.DOMAIN
    state_file = spool / "state" / f"{rp.DOMAIN}.json"

    def listing(state: str) -> list[str]:
        return sorted(p.name for p in (queue / state).iterdir()) if (queue / state).is_dir() else []

    def state() -> str | None:
        try:
            return json.loads(state_file.read_text(encoding="utf-8"))["state"]
        except (OSError, ValueError, KeyError):
            return None

    def explain() -> str:
        return (f"state={state()} waiting={listing('waiting')} active={listing('active')} "
                f"failed={listing('failed')} hold={listing('hold')} primary got "
                f"{[msgid_of(g.content) for g in primary.received]}")

    # 1. The primary is down: three messages for alice are kept.
    for n in (1, 2, 3):
        answers, reply = send(relay.port, SENDER, [USER], wire(n))
        assert answers[0][0] == 250 and reply is not None and reply[0] == 250, (answers, reply)
    wait_for(lambda: len(listing("waiting")) == 3, 10, "three entries in waiting/", explain)
    assert state() == "outage", explain()
    kept = user_files(maildirs)
    assert sorted(kept) == ["outage-1@sender.test", "outage-2@sender.test", "outage-3@sender.test"]
    assert all(len(paths) == 1 and paths[0].parent.name == "new" for paths in kept.values()), kept
    trace = f"Return-Path: <{SENDER}>\r\nDelivered-To: {USER}\r\n".encode()
    received = {}   # Message-ID -> the bytes the relay received (its Received header + DATA)
    for n in (1, 2, 3):
        on_disk = kept[f"outage-{n}@sender.test"][0].read_bytes()
        assert on_disk.startswith(trace + b"Received: ") and on_disk.endswith(b"\r\n" + meant(n))
        received[f"outage-{n}@sender.test"] = on_disk[len(trace):]

    # 2. Alice, over IMAP through a real Dovecot: reads 1, deletes 2, moves 3 to Archive.
    dovecot = dovecot_factory(mail_tmp_path / "dovecot", maildirs, mail_tmp_path / "users.passwd")
    client = imaplib.IMAP4("127.0.0.1", dovecot.imap_port, timeout=15)
    try:
        ok(client.login(USER, PASSWORD))
        ok(client.select("INBOX"))
        uids = uids_by_msgid(client)
        assert sorted(uids) == sorted(received), uids
        body = ok(client.uid("FETCH", uids["outage-1@sender.test"], "(BODY[])"))[0][1]
        assert body == trace + received["outage-1@sender.test"]   # Dovecot serves our file
        ok(client.uid("STORE", uids["outage-2@sender.test"], "+FLAGS", "(\\Deleted)"))
        ok(client.expunge())
        ok(client.create("Archive"))
        ok(client.uid("MOVE", uids["outage-3@sender.test"], "Archive"))
        left = uids_by_msgid(client)
        assert list(left) == ["outage-1@sender.test"], left
        flags = ok(client.uid("FETCH", left["outage-1@sender.test"], "(FLAGS)"))[0]
        assert b"\\Seen" in flags, flags
    finally:
        client.logout()

    after_imap = user_files(maildirs)
    assert "outage-2@sender.test" not in after_imap, f"message 2 still on disk: {after_imap}"
    (one,) = after_imap["outage-1@sender.test"]
    assert one.parent.name == "cur" and one.name.endswith(",S"), one
    (three,) = after_imap["outage-3@sender.test"]
    assert three.parent.parent.name == ".Archive", three
    # The queue still has all three (msg/ is a hard link to, or a copy of, the Maildir file).
    assert len(listing("waiting")) == 3 and len(listing("msg")) == 3, explain()
    assert state() == "outage", explain()

    # 3. The primary comes back on its port: the runner's next probe starts the replay.
    bring_up_primary()
    wait_for(lambda: (len(primary.received) == 3 and not listing("waiting") and not listing("active")
                      and state() == "normal") or listing("hold") or listing("failed"),
             30, "all three replayed and state normal", explain)
    assert not listing("hold") and not listing("failed"), f"set aside: {explain()}"

    got = primary.received
    assert [msgid_of(g.content) for g in got] == [f"outage-{n}@sender.test" for n in (1, 2, 3)]
    for message in got:
        msgid = msgid_of(message.content)
        assert (message.mail_from, message.rcpt_tos) == (SENDER, [USER]), message
        assert message.content == received[msgid], (msgid, message.content, received[msgid])
    assert not listing("msg") and not listing("failed") and not listing("hold"), explain()

    # The user's view is what she left: replay does not bring message 2 back into her Maildir.
    final = user_files(maildirs)
    assert sorted(final) == ["outage-1@sender.test", "outage-3@sender.test"], final
    assert final["outage-1@sender.test"] == [one] and final["outage-3@sender.test"] == [three]
