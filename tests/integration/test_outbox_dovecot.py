"""Sending through the Outbox folder of a real Dovecot during an outage (docs/architecture.md,
the flow: Outbox folder --> Submitter.submit --> outbound queue --> smarthost; rules 3 and 4).

The relay runs as the real process (`python -m relay serve`), as root with `storage.owner:
vmail`; alice is registered with a password through the CLI; Dovecot, started from
contrib/dovecot/dovecot.conf (`mail_save_crlf = yes`, `mailbox Outbox { auto = create }`),
serves the very same Maildirs and passwd-file. The primary (a scripted fake) answers 451 at
MAIL: an outage. The smarthost (another fake) accepts everything.

Over IMAP alice APPENDs two messages into "Outbox", one without flags (Dovecot files it in
.Outbox/new/) and one with \\Seen (.Outbox/cur/...:2,S). Each must reach the smarthost once per
To/Cc/Bcc recipient, envelope sender alice, the Bcc header gone and every other byte as
APPENDed; leave the Outbox; show up in Sent with the APPENDed bytes; and, once the primary
accepts again, reach alice's mailbox on the primary as a copy whose Subject ends in
"(CS-SENT)". A message whose From is not alice's own is not sent: it lands in Drafts and an
explanation in INBOX, both read back over IMAP.
"""

from __future__ import annotations

import email
import email.policy
import imaplib
import json
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.helpers import wait_for
from tests.smtp.fakes import FakePrimary, Received, Script

try:  # tests/integration as a package ...
    from . import relay_process as rp
except ImportError:  # ... or as a rootdir-less test directory (pytest prepends it to sys.path)
    import relay_process as rp

stop_or_dump = rp.stop_or_dump

pytestmark = pytest.mark.timeout(60)

USER, PASSWORD = f"alice@{rp.DOMAIN}", "alice-outbox-pw"
TO, CC, BCC = "bob@example.org", "carol@example.net", "secret@example.net"
RCPTS = sorted([TO, CC, BCC])
MSGID_RE = re.compile(rb"(?:\A|\r\n)Message-ID: <([^>\r\n]+)>\r\n", re.IGNORECASE)
QUEUE_DIRS = ("msg", "tmp", "waiting", "active", "failed", "hold")
PICKUP_SECONDS = 20   # the Outbox runner rescans every 30 s: a pickup must not wait for that


# --------------------------------------------------------------------------- messages


def message(msgid: str, subject_line: bytes, sender: bytes = b"Alice <" + USER.encode() + b">") -> bytes:
    """A message as a mail client APPENDs it: CRLF, an encoded-word Subject, To + Cc + Bcc,
    a folded header, raw 8-bit UTF-8 in the body, and a line that starts with a dot."""
    return (b"From: " + sender + b"\r\n"
            b"To: Bob <" + TO.encode() + b">\r\n"
            b"Cc: " + CC.encode() + b"\r\n"
            b"Bcc: " + BCC.encode() + b"\r\n"
            + subject_line + b"\r\n"
            b"Message-ID: <" + msgid.encode() + b">\r\n"
            b"Date: Sat, 28 Nov 2026 03:00:00 +0000\r\n"
            b"X-Folded: first part\r\n\tsecond part\r\n"
            b"MIME-Version: 1.0\r\n"
            b"Content-Type: text/plain; charset=utf-8\r\n"
            b"Content-Transfer-Encoding: 8bit\r\n"
            b"\r\n"
            b"Gr\xc3\xbc\xc3\x9fe w\xc3\xa4hrend des Ausfalls \xe2\x82\xac 42\r\n"
            b".a line that starts with a dot\r\n"
            b"  indented, trailing blank \r\n"
            b"\xe6\x97\xa5\xe6\x9c\xac\xe8\xaa\x9e last line\r\n")


def without_bcc(data: bytes) -> bytes:
    line = b"Bcc: " + BCC.encode() + b"\r\n"
    assert data.count(line) == 1
    return data.replace(line, b"")


def msgid_of(data: bytes) -> str | None:
    match = MSGID_RE.search(data)
    return match.group(1).decode() if match else None


def subject_of(data: bytes) -> str:
    return str(email.message_from_bytes(data, policy=email.policy.default)["subject"])


# --------------------------------------------------------------------------- helpers



def ok(result: tuple[str, list]) -> list:
    status, data = result
    assert status == "OK", (status, data)
    return data


def imap(port: int) -> imaplib.IMAP4:
    client = imaplib.IMAP4("127.0.0.1", port, timeout=15)
    ok(client.login(USER, PASSWORD))
    return client


def exists(client: imaplib.IMAP4, folder: str) -> int:
    """SELECT (read-only) `folder`; the EXISTS count."""
    return int(ok(client.select(f'"{folder}"', readonly=True))[0])


def fetch_all(port: int, folder: str) -> list[tuple[bytes, bytes]]:
    """(FLAGS response, full bytes) of every message in `folder`, in a fresh session (folders
    the relay made on disk meanwhile are seen from the next session)."""
    client = imap(port)
    try:
        if exists(client, folder) == 0:
            return []
        found = []
        items = ok(client.fetch("1:*", "(FLAGS BODY.PEEK[])"))
        for item in items:
            if isinstance(item, tuple):
                found.append((item[0], item[1]))
        return found
    finally:
        client.logout()


def log_findings(text: str) -> list[str]:
    """Lines of the relay's log that point at a fault."""
    return [line for line in text.splitlines()
            if " ERROR " in line or "Traceback" in line or " CRITICAL " in line]




def listing(root: Path) -> dict[str, list[str]]:
    return {name: sorted(p.name for p in (root / name).iterdir()) if (root / name).is_dir() else []
            for name in QUEUE_DIRS}


def health(spool: Path) -> dict:
    """The domain's state file (`normal`, `outage`, `replaying`), {} before the first change."""
    try:
        return json.loads((spool / "state" / f"{rp.DOMAIN}.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def by_msgid(received: list[Received]) -> dict[str | None, list[Received]]:
    found: dict[str | None, list[Received]] = {}
    for got in received:
        found.setdefault(msgid_of(got.content), []).append(got)
    return found


# --------------------------------------------------------------------------- the world


@dataclass
class World:
    cfg: Path
    relay: rp.RelayProcess
    dovecot: object
    primary: FakePrimary
    smarthost: FakePrimary

    @property
    def home(self) -> Path:
        return self.relay.maildirs / rp.DOMAIN / "alice"

    def explain(self) -> str:
        files = sorted(str(p.relative_to(self.home)) for p in self.home.rglob("*")
                       if p.is_file() and p.parent.name in ("new", "cur", "tmp")) \
            if self.home.is_dir() else []
        return (f"smarthost got {[(g.rcpt_tos, msgid_of(g.content)) for g in self.smarthost.received]}\n"
                f"primary got {[(g.rcpt_tos, subject_of(g.content)) for g in self.primary.received]}\n"
                f"alice's files: {files}\n"
                f"outbound queue: {listing(self.relay.spool / 'outbound')}\n"
                f"replay queue: {listing(self.relay.spool / 'replay' / rp.DOMAIN)}\n"
                f"health: {health(self.relay.spool)}\n"
                f"relay log (tail):\n{self.relay.log_text()[-4000:]}")


@pytest.fixture
def world(mail_tmp_path: Path, dovecot_factory, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("PYTHONFAULTHANDLER", "1")   # the relay's stacks, should it hang at the end
    # A 4xx to MAIL: the primary itself is in trouble (a 4xx to RCPT would be one mailbox).
    primary = FakePrimary(Script(mail="451 4.3.0 primary is having an outage")).start()
    smarthost = FakePrimary(Script()).start()
    relay = None
    try:
        cfg = rp.write_config(mail_tmp_path, primary_port=primary.port, owner="vmail")
        raw = yaml.safe_load(cfg.read_text(encoding="utf-8"))
        raw["outbound"] = {"smarthost": {"address": f"127.0.0.1:{smarthost.port}", "starttls": "off"},
                           "retry_delay": "1s"}
        raw["replay"] = {"probe_interval": "1s"}
        cfg.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
        added = rp.run_cli(cfg, "users", "add", USER, "--password-stdin", stdin=PASSWORD + "\n")
        assert added.returncode == 0, added.stdout + added.stderr
        relay = rp.RelayProcess(cfg).start()
        dovecot = dovecot_factory(mail_tmp_path / "dovecot", relay.maildirs, mail_tmp_path / "users.passwd")
        yield World(cfg, relay, dovecot, primary, smarthost)
        stopped, log = stop_or_dump(relay)
        assert stopped == 0, (f"relay did not stop within {rp.STOP_TIMEOUT:.0f}s of SIGTERM "
                              f"(status {stopped}); its log, with its stacks if it hung:\n{log}")
        findings = log_findings(relay.log_text(all_runs=True))
        assert not findings, "\n".join(findings)
    finally:
        if relay is not None:
            relay.stop()
        primary.stop()
        smarthost.stop()


# --------------------------------------------------------------------------- tests


def test_outbox_append_reaches_smarthost_sent_and_primary_as_cs_sent(world: World) -> None:
    run = secrets.token_hex(4)
    plain = message(f"outbox-plain.{run}@example.com",
                    b"Subject: =?UTF-8?Q?Gr=C3=BC=C3=9Fe_aus_dem_Ausfall?=")
    seen = message(f"outbox-seen.{run}@example.com",
                   b"Subject: =?UTF-8?B?w6l0w6kgw6AgUGFyaXM=?= und mehr")
    appended = {msgid_of(plain): plain, msgid_of(seen): seen}
    subjects = {msgid_of(plain): "Grüße aus dem Ausfall", msgid_of(seen): "été à Paris und mehr"}
    assert all(subject_of(data) == subjects[key] for key, data in appended.items())

    # 1. Alice APPENDs both over IMAP; the Outbox exists through `auto = create`.
    client = imap(world.dovecot.imap_port)
    try:
        started = time.monotonic()
        ok(client.append("Outbox", None, None, plain))
        ok(client.append("Outbox", r"(\Seen)", None, seen))

        # 2. The smarthost gets each once, for every recipient, from alice, without Bcc.
        wait_for(lambda: len(world.smarthost.received) >= 2, PICKUP_SECONDS,
                 "two transactions at the smarthost", world.explain)
        pickup = time.monotonic() - started
        got = by_msgid(world.smarthost.received)
        assert sorted(got, key=str) == sorted(appended), world.explain()
        for key, deliveries in got.items():
            assert sorted(r for d in deliveries for r in d.rcpt_tos) == RCPTS, (key, deliveries)
            assert len(deliveries) == 1, deliveries      # one transaction, three recipients
            for delivery in deliveries:
                assert delivery.mail_from == USER, delivery
                assert b"secret@" not in delivery.content and b"\r\nBcc:" not in delivery.content
                assert delivery.content == without_bcc(appended[key]), (key, delivery.content)

        # 3. The Outbox empties (the relay removed both files), seen through Dovecot.
        wait_for(lambda: exists(client, "Outbox") == 0, 10, "an empty Outbox over IMAP",
                 world.explain)
    finally:
        client.logout()

    # 4. Sent holds both, as APPENDed (Bcc included: it is alice's own copy), marked read.
    sent = fetch_all(world.dovecot.imap_port, "Sent")
    assert sorted(msgid_of(data) for _, data in sent) == sorted(appended), world.explain()
    for flags, data in sent:
        assert data == appended[msgid_of(data)], (flags, data)
        assert rb"\Seen" in flags, flags

    # The queues during the outage: outbound drained; the two CS-SENT copies were tried, the
    # primary's 451 put the domain in outage, and they wait for replay.
    assert not any(listing(world.relay.spool / "outbound").values()), world.explain()
    replay = world.relay.spool / "replay" / rp.DOMAIN
    wait_for(lambda: health(world.relay.spool).get("state") == "outage", 10,
             "the replay runner to meet the primary's 451 (state outage)", world.explain)
    assert "451" in health(world.relay.spool).get("reason", ""), world.explain()
    # A probe's trial sweep may hold one entry in active/ at this instant.
    held = listing(replay)
    assert len(held["waiting"]) + len(held["active"]) == 2 and not world.primary.received, \
        world.explain()

    # 5. The primary recovers: the "(CS-SENT)" copies reach alice's mailbox there.
    world.primary.script.mail = "250 2.1.0 Ok"
    # Done means every queue file is gone: finish() drops the envelope, then msg/<id>.
    wait_for(lambda: len(world.primary.received) >= 2 and not any(listing(replay).values()), 30,
             "two (CS-SENT) copies at the primary and an empty replay queue", world.explain)
    copies = by_msgid(world.primary.received)
    assert sorted(copies, key=str) == sorted(appended), world.explain()
    for key, (copy, *more) in copies.items():
        assert not more, f"{key} replayed {1 + len(more)} times"
        assert (copy.mail_from, copy.rcpt_tos) == (USER, [USER]), copy
        assert subject_of(copy.content) == subjects[key] + " (CS-SENT)", copy.content
        original = appended[key]
        line = next(x for x in original.split(b"\r\n") if x.startswith(b"Subject: "))
        assert copy.content == original.replace(line + b"\r\n", line + b" (CS-SENT)\r\n", 1), \
            copy.content
    assert not any(listing(replay).values()), world.explain()
    assert len(world.smarthost.received) == 2, world.explain()
    print(f"\nOutbox -> smarthost (both messages, three recipients each) in {pickup:.2f}s")


def test_outbox_append_with_forged_from_is_not_sent(world: World) -> None:
    run = secrets.token_hex(4)
    forged = message(f"outbox-forged.{run}@example.com", b"Subject: =?UTF-8?Q?Gef=C3=A4lscht?=",
                     sender=b"The Boss <ceo@" + rp.DOMAIN.encode() + b">")

    client = imap(world.dovecot.imap_port)
    try:
        ok(client.append("Outbox", None, None, forged))

        def explained() -> bool:
            return exists(client, "INBOX") >= 1

        wait_for(explained, PICKUP_SECONDS, "an explanation in INBOX over IMAP", world.explain)
        wait_for(lambda: exists(client, "Outbox") == 0, 10, "an empty Outbox over IMAP",
                 world.explain)
    finally:
        client.logout()

    ((_, notice),) = fetch_all(world.dovecot.imap_port, "INBOX")
    parsed = email.message_from_bytes(notice, policy=email.policy.default)
    assert parsed["subject"] == "Not sent: a message in your Outbox", notice
    assert USER in parsed["to"], notice
    text = parsed.get_content()
    assert "From: header must be your own address" in text and "Drafts" in text, text

    ((flags, draft),) = fetch_all(world.dovecot.imap_port, "Drafts")
    assert draft == forged, draft

    # Refused before anything was queued: nothing sent, no Sent copy, no (CS-SENT) copy.
    assert not world.smarthost.received, world.explain()
    assert fetch_all(world.dovecot.imap_port, "Sent") == [], world.explain()
    assert not any(listing(world.relay.spool / "outbound").values()), world.explain()
    # The replay queue holds only the explanation, for alice's mailbox on the primary (the one
    # notice route: INBOX and replay); no (CS-SENT) copy.
    replay = listing(world.relay.spool / "replay" / rp.DOMAIN)
    (queued,) = replay["waiting"]
    kept = (world.relay.spool / "replay" / rp.DOMAIN / "msg" / queued).read_bytes()
    assert b"Subject: Not sent: a message in your Outbox" in kept and b"(CS-SENT)" not in kept, kept
