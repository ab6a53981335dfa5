"""Crash tests: the real relay process killed with SIGKILL, then restarted (docs/architecture.md rules 1-3).

The primary server is down (nothing listens on its port), so every message for a registered
user goes to that user's Maildir and the replay queue. Sender threads record, per message and
recipient, exactly what the relay answered:

    ACCEPTED   250 after the end of DATA             -> must be in the Maildir and the queue
    REFUSED    an error reply (451 at RCPT, ...)     -> must be stored nowhere
    NOT_SENT   the body never fully left the client   -> cannot be stored anywhere
    NO_REPLY   body sent, connection lost before the final reply -> may be stored (counted)

After the kill the relay is started again (its start-up rescan repairs the queue) and stopped
cleanly; then the files on disk are compared with those records.
"""

from __future__ import annotations

import json
import os
import random
import re
import secrets
import signal
import smtplib
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.helpers import free_port

try:  # tests/integration as a package ...
    from . import relay_process as rp
except ImportError:  # ... or as a rootdir-less test directory (pytest prepends it to sys.path)
    import relay_process as rp

USERS = [f"user{n:02d}@{rp.DOMAIN}" for n in range(10)]
UNREGISTERED = f"stranger@{rp.DOMAIN}"      # a configured domain, but not a registered user
FOREIGN = "someone@elsewhere.test"          # not a configured domain
SENDERS = 8
MESSAGES_PER_SENDER = 100
CYCLES = 3                                  # load, SIGKILL, restart; the audit comes at the end
KILL_AFTER = (150, 300)                     # SIGKILL once this many 250s were counted

ACCEPTED, REFUSED, NOT_SENT, NO_REPLY = "accepted", "refused", "not-sent", "no-reply"

MARKER_RE = re.compile(rb"\r\ncrash-marker: ([A-Za-z0-9.-]+)\r\n")
QUEUED_RE = re.compile(r"queued as ([0-9A-Za-z]+)")
# Exactly one header field named Received (first line plus folded continuation lines).
RECEIVED_RE = re.compile(rb"\AReceived: [^\r\n]*(?:\r\n[ \t][^\r\n]*)*\r\n\Z")


# --------------------------------------------------------------------------- what was sent


@dataclass
class Sent:
    """One message and everything the relay answered about it."""

    marker: str
    sender: str
    rcpts: tuple[str, ...]
    data: bytes                                  # the message exactly as handed to SMTP
    options: tuple[str, ...] = ()
    replies: dict[str, tuple[int, str]] = field(default_factory=dict)   # per RCPT
    refused: tuple[int, str] | None = None       # MAIL or DATA command refused
    final: tuple[int, str] | None = None         # reply after the end of DATA
    step: str = ""                               # last step started: mail rcpt data body reply
    dropped: bool = False

    def outcome(self, rcpt: str) -> str:
        code = self.replies.get(rcpt, (0, ""))[0]
        if self.refused is not None or (code and not 200 <= code < 300):
            return REFUSED
        if self.final is not None:
            return ACCEPTED if self.final[0] == 250 else REFUSED
        if self.dropped and self.step == "reply":
            return NO_REPLY
        return NOT_SENT

    @property
    def txid(self) -> str | None:
        match = QUEUED_RE.search(self.final[1]) if self.final else None
        return match.group(1) if match else None


def make_message(rng: random.Random, marker: str, sender: str, rcpts: tuple[str, ...]) -> Sent:
    """A message with CRLF line ends, dot-stuffing bait, sometimes 8-bit text and a large body."""
    eight_bit = rng.random() < 0.3
    lines = [f"From: Crash Sender <{sender}>", f"To: {', '.join(rcpts)}",
             f"Subject: crash test {marker}", f"Message-ID: <{marker}@client.test>",
             "Date: Sat, 28 Nov 2026 03:00:00 +0000", "MIME-Version: 1.0",
             "Content-Type: text/plain; charset=utf-8",
             f"Content-Transfer-Encoding: {'8bit' if eight_bit else '7bit'}", "",
             f"crash-marker: {marker}", ".", ".leading dot", "..two dots", "From the start"]
    size = rng.choice([600, 2_000, 8_000, 30_000] if rng.random() > 0.02 else [300_000])
    total = sum(len(line) + 2 for line in lines)
    while total < size:   # lines stay far below SMTP's 1000-byte limit, even in UTF-8
        word = "caf\u00e9 na\u00efve \u65e5\u672c " if eight_bit and rng.random() < 0.2 else "lorem "
        lines.append((word * rng.randint(1, 60))[:rng.randint(1, 600)].rstrip() or "x")
        total += len(lines[-1]) + 2
    lines.append(f"end {marker}")
    data = ("\r\n".join(lines) + "\r\n").encode("utf-8")
    return Sent(marker, sender, rcpts, data, ("BODY=8BITMIME",) if eight_bit else ())


def recipients(rng: random.Random) -> tuple[str, ...]:
    roll = rng.random()
    if roll < 0.70:
        return (rng.choice(USERS),)
    if roll < 0.80:
        return tuple(rng.sample(USERS, 2))
    if roll < 0.90:
        return (UNREGISTERED,)                          # 451 at RCPT
    if roll < 0.95:
        return (rng.choice(USERS), UNREGISTERED)        # 250 + 451: kept for the first only
    return (FOREIGN,)                                   # 550 at RCPT


# --------------------------------------------------------------------------- senders


class Load:
    """Shared by the sender threads: counts 250s and says when to pull the plug."""

    def __init__(self, kill_after: int, senders: int) -> None:
        self.kill_after = kill_after
        self.accepted = 0
        self.current: list[Sent | None] = [None] * senders    # each sender's message in hand
        self.lock = threading.Lock()
        self.enough = threading.Event()
        self.killing = threading.Event()     # set just before the SIGKILL
        self.stop = threading.Event()
        self.errors: list[str] = []

    def count_accepted(self) -> None:
        with self.lock:
            self.accepted += 1
            if self.accepted >= self.kill_after:
                self.enough.set()


def transaction(smtp: smtplib.SMTP, sent: Sent) -> None:
    """One SMTP transaction, step by step, so a lost connection is pinned to its step.
    Raises smtplib.SMTPServerDisconnected / OSError when the connection is lost."""
    sent.step = "mail"
    code, text = smtp.mail(sent.sender, list(sent.options))
    if code != 250:
        sent.refused = (code, text.decode(errors="replace"))
        smtp.rset()
        return
    for rcpt in sent.rcpts:
        sent.step = "rcpt"
        code, text = smtp.rcpt(rcpt)
        sent.replies[rcpt] = (code, text.decode(errors="replace"))
    if not any(200 <= code < 300 for code, _ in sent.replies.values()):
        smtp.rset()
        return
    sent.step = "data"
    code, text = smtp.docmd("DATA")
    if code != 354:
        sent.refused = (code, text.decode(errors="replace"))
        return
    sent.step = "body"     # dot-stuffed, terminated: what smtplib.data() would send
    smtp.send(re.sub(rb"(?m)^\.", b"..", sent.data) + b".\r\n")
    sent.step = "reply"
    code, text = smtp.getreply()
    sent.final = (code, text.decode(errors="replace"))


def sender(address: tuple[str, int], slot: int, messages: list[Sent], load: Load,
           reconnect_every: int) -> None:
    """Send `messages` over one connection (reconnecting now and then) until the relay dies."""
    smtp: smtplib.SMTP | None = None
    try:
        for number, sent in enumerate(messages):
            if load.stop.is_set():
                return
            load.current[slot] = sent
            if smtp is None or number % reconnect_every == 0:
                if smtp is not None:
                    smtp.quit()
                sent.step = "connect"
                smtp = smtplib.SMTP(*address, local_hostname="client.test", timeout=20)
                smtp.ehlo("client.test")
            try:
                transaction(smtp, sent)
            except OSError as exc:     # smtplib's errors, a reset or a timeout: no reply
                sent.dropped = True
                if not load.killing.is_set():
                    load.errors.append(f"{sent.marker} at {sent.step}: {type(exc).__name__}: {exc}")
                return
            if sent.final is not None and sent.final[0] == 250:
                load.count_accepted()
    except OSError as exc:           # connect or QUIT failed
        if not load.killing.is_set():   # before the kill, a lost connection is a finding
            load.errors.append(f"{type(exc).__name__}: {exc}")
    finally:
        if smtp is not None:
            smtp.close()


# --------------------------------------------------------------------------- what is on disk


@dataclass
class Stored:
    path: Path
    data: bytes
    marker: str | None
    rcpt: str


def marker_of(data: bytes) -> str | None:
    match = MARKER_RE.search(data)
    return match.group(1).decode() if match else None


def maildir_files(maildirs: Path, domain: str = rp.DOMAIN) -> dict[str, list[Stored]]:
    """Every file in the domain's Maildirs, by where it sits: `inbox` (new/ or cur/ of INBOX),
    `tmp` (INBOX tmp/), `folders` (anything in .Sent, .Outbox, ...)."""
    found: dict[str, list[Stored]] = {"inbox": [], "tmp": [], "folders": []}
    root = maildirs / domain
    if not root.is_dir():
        return found
    for user_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        rcpt = f"{user_dir.name}@{domain}"
        for dirpath, _dirs, files in os.walk(user_dir):
            where = Path(dirpath).relative_to(user_dir)
            kind = {"new": "inbox", "cur": "inbox", "tmp": "tmp"}.get(str(where), "folders")
            for name in files:
                if name == "maildirfolder":
                    continue
                data = (Path(dirpath) / name).read_bytes()
                found[kind].append(Stored(Path(dirpath) / name, data, marker_of(data), rcpt))
    return found


@dataclass
class QueueEntry:
    entry: str
    state: str
    envelope: dict
    message: bytes | None
    marker: str | None


def replay_queue(spool: Path, domain: str = rp.DOMAIN) -> tuple[list[QueueEntry], dict[str, list[str]]]:
    """The domain's replay queue: committed entries, and the raw listing of each sub-folder."""
    root = spool / "replay" / domain
    listing = {name: sorted(os.listdir(root / name)) if (root / name).is_dir() else []
               for name in ("msg", "tmp", "waiting", "active", "failed", "hold")}
    entries = []
    for state in ("waiting", "active", "failed", "hold"):
        for entry in listing[state]:
            envelope = json.loads((root / state / entry).read_bytes())
            msg = root / "msg" / entry
            message = msg.read_bytes() if msg.exists() else None
            entries.append(QueueEntry(entry, state, envelope, message,
                                      marker_of(message) if message else None))
    return entries, listing


def trace_headers(sent: Sent, rcpt: str) -> bytes:
    return f"Return-Path: <{sent.sender}>\r\nDelivered-To: {rcpt}\r\n".encode()


def check_copy(sent: Sent, rcpt: str, stored: Stored, entry: QueueEntry) -> list[str]:
    """Rule 3 on one accepted copy: Maildir bytes = our trace headers + Received + sent bytes,
    and the queue entry holds the very same bytes and the right envelope."""
    problems = []
    tag = f"{sent.marker} -> {rcpt}"
    trace = trace_headers(sent, rcpt)
    data = stored.data
    if not data.startswith(trace):
        problems.append(f"{tag}: Maildir file {stored.path.name} does not start with {trace!r}")
    elif not data.endswith(sent.data):
        problems.append(f"{tag}: Maildir file does not end with the bytes sent")
    else:
        received = data[len(trace):len(data) - len(sent.data)]
        if not RECEIVED_RE.match(received):
            problems.append(f"{tag}: between trace headers and message: {received[:300]!r}")
        elif sent.txid is None or f" id {sent.txid}".encode() not in received:
            problems.append(f"{tag}: Received header lacks id {sent.txid}: {received!r}")
        elif f"by {rp.HOSTNAME}".encode() not in received:
            problems.append(f"{tag}: Received header lacks 'by {rp.HOSTNAME}': {received!r}")
    if entry.message != data:
        problems.append(f"{tag}: queue msg/{entry.entry} differs from the Maildir file")
    env = entry.envelope
    if (env.get("mail_from"), env.get("rcpt"), env.get("skip")) != (sent.sender, rcpt, len(trace)):
        problems.append(f"{tag}: envelope {env}")
    if ("BODY=8BITMIME" in sent.options) != ("BODY=8BITMIME" in env.get("mail_options", ())):
        problems.append(f"{tag}: BODY=8BITMIME lost or invented: {env}")
    if entry.state != "waiting":
        problems.append(f"{tag}: queue entry {entry.entry} is in {entry.state}/, not waiting/")
    return problems


Key = tuple[str | None, str]      # (marker, recipient)


def queue_problems(entries: list[QueueEntry], listing: dict[str, list[str]]) -> list[str]:
    """After recovery: no half-written envelopes, no orphans, nothing left claimed or failed."""
    problems = []
    if listing["tmp"]:
        problems.append(f"queue tmp/ not cleaned up by recovery: {listing['tmp']}")
    orphans = sorted(set(listing["msg"]) - {entry.entry for entry in entries})
    if orphans:
        problems.append(f"queue msg/ files without an envelope after recovery: {orphans}")
    problems.extend(f"queue envelope {entry.state}/{entry.entry} has no msg/ file"
                    for entry in entries if entry.message is None)
    problems.extend(f"queue {state}/ not empty: {listing[state]}"
                    for state in ("active", "failed", "hold") if listing[state])
    return problems


def stray_problems(messages: list[Sent], stored: dict[Key, list], tmp_copies: set[Key],
                   roots: tuple[Path, ...]) -> list[str]:
    """Nothing is stored that was refused or never sent, and nothing twice."""
    problems = []
    by_marker = {sent.marker: sent for sent in messages}
    for (marker, rcpt), copies in stored.items():
        sent = by_marker.get(marker or "")
        if sent is None or rcpt not in sent.rcpts:
            problems.append(f"stored but never sent: marker {marker} for {rcpt}")
        elif sent.outcome(rcpt) not in (ACCEPTED, NO_REPLY):
            problems.append(f"{marker} -> {rcpt}: got {sent.outcome(rcpt)} "
                            f"({sent.replies.get(rcpt) or sent.refused or sent.final}) but is stored")
        if len(copies) > 1:
            where = [str(c.path) if isinstance(c, Stored) else f"queue {c.entry}" for c in copies]
            problems.append(f"{marker} -> {rcpt}: stored {len(copies)} times: {where}")
    for marker, rcpt in tmp_copies:    # a delivery cut short: only a message in flight
        sent = by_marker.get(marker or "")
        if marker is None:             # killed before its bytes were written: counted
            continue
        if sent is None or sent.outcome(rcpt) != NO_REPLY:
            problems.append(f"Maildir tmp/ copy of {marker} -> {rcpt}, which was not in flight")
    unwanted = {sent.marker for sent in messages
                if all(sent.outcome(rcpt) in (REFUSED, NOT_SENT) for rcpt in sent.rcpts)}
    for root in roots:                 # ... and a message nobody accepted is nowhere at all
        for dirpath, _dirs, names in os.walk(root):
            for name in names:
                if marker_of((Path(dirpath) / name).read_bytes()) in unwanted:
                    problems.append(f"{Path(dirpath) / name} holds a message that was not accepted")
    return problems


def audit(messages: list[Sent], maildirs: Path, spool: Path) -> tuple[list[str], Counter]:
    """Compare the files on disk with what the senders were told. Returns the problems and
    counts per (message, recipient) outcome, for the report."""
    files = maildir_files(maildirs)
    entries, listing = replay_queue(spool)
    inbox: dict[Key, list[Stored]] = {}
    for stored in files["inbox"]:
        inbox.setdefault((stored.marker, stored.rcpt), []).append(stored)
    queued: dict[Key, list[QueueEntry]] = {}
    for entry in entries:
        queued.setdefault((entry.marker, entry.envelope.get("rcpt")), []).append(entry)
    tmp_copies = {(stored.marker, stored.rcpt) for stored in files["tmp"]}

    problems = queue_problems(entries, listing)
    if files["folders"]:
        problems.append(f"files in Maildir folders: {[str(s.path) for s in files['folders']]}")
    if (maildirs / rp.DOMAIN / UNREGISTERED.split("@")[0]).exists():
        problems.append(f"a Maildir was created for the unregistered {UNREGISTERED}")
    problems += stray_problems(messages, inbox, tmp_copies, (maildirs, spool))
    problems += stray_problems(messages, queued, set(), ())

    counts: Counter = Counter()
    for sent in messages:              # every 250: in the Maildir and the queue, byte for byte
        for rcpt in sent.rcpts:
            outcome, key = sent.outcome(rcpt), (sent.marker, rcpt)
            counts[outcome] += 1
            in_inbox, in_queue = bool(inbox.get(key)), bool(queued.get(key))
            if outcome == ACCEPTED and not (in_inbox and in_queue):
                problems.append(f"LOST: {sent.marker} -> {rcpt} got {sent.final} but "
                                f"Maildir={in_inbox} queue={in_queue}")
            elif outcome == ACCEPTED:
                stored, entry = inbox[key][0], queued[key][0]
                problems += check_copy(sent, rcpt, stored, entry)
                msg = spool / "replay" / rp.DOMAIN / "msg" / entry.entry
                counts["accepted copies hard-linked into the queue"] += (
                    msg.exists() and os.path.samefile(stored.path, msg))
            elif outcome == NO_REPLY:
                counts[f"no-reply stored: maildir={in_inbox} queue={in_queue} "
                       f"maildir-tmp={key in tmp_copies}"] += 1
            elif outcome == REFUSED:
                code = (sent.replies.get(rcpt) or sent.refused or sent.final or (0, ""))[0]
                counts[f"refused {code}"] += 1
    counts["maildir tmp/ leftovers"] = len(files["tmp"])
    counts["maildir tmp/ leftovers cut before the marker (partly written)"] = sum(
        1 for stored in files["tmp"] if stored.marker is None)
    counts["queue entries"] = len(entries)
    return problems, counts


def unexpected_refusals(messages: list[Sent]) -> list[str]:
    """Error replies other than the expected ones (451 for the unregistered user at RCPT,
    550 for a foreign domain): under load, a registered user must never get an error."""
    odd = []
    for sent in messages:
        for rcpt in sent.rcpts:
            if sent.outcome(rcpt) != REFUSED:
                continue
            code = sent.replies.get(rcpt, (0, ""))[0]
            if (rcpt, code) in ((UNREGISTERED, 451), (FOREIGN, 550)):
                continue
            odd.append(f"{sent.marker} -> {rcpt}: rcpt={sent.replies.get(rcpt)} "
                       f"command={sent.refused} final={sent.final}")
    return odd


def log_findings(text: str) -> list[str]:
    """Lines in a relay log that point at a fault: errors and tracebacks."""
    return [line for line in text.splitlines()
            if " ERROR " in line or "Traceback" in line or " CRITICAL " in line]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def relay_config(tmp_path: Path) -> Path:
    cfg = rp.write_config(tmp_path / "relay", primary_port=free_port())
    rp.import_users(cfg, USERS)
    return cfg


def send_one(address: tuple[str, int], sent: Sent) -> Sent:
    with smtplib.SMTP(*address, local_hostname="client.test", timeout=20) as smtp:
        smtp.ehlo("client.test")
        transaction(smtp, sent)
    return sent


# --------------------------------------------------------------------------- tests


def awaiting_reply(load: Load) -> int:
    """Senders whose whole message is on the wire, waiting for the final reply: the relay is
    storing their messages right now."""
    return sum(1 for sent in load.current if sent is not None and sent.step == "reply")


def load_and_kill(relay: rp.RelayProcess, batches: list[list[Sent]], rng: random.Random) -> str:
    """Run one sender thread per batch against `relay`; once `KILL_AFTER` 250s were counted and
    a message is being stored, SIGKILL the relay. Returns a one-line account of the cycle."""
    load = Load(rng.randint(*KILL_AFTER), len(batches))
    threads = [threading.Thread(target=sender, args=(relay.address, slot, batch, load, 5 + 7 * slot),
                                name=f"sender{slot}", daemon=True)
               for slot, batch in enumerate(batches)]
    started = time.monotonic()
    try:
        for thread in threads:
            thread.start()
        reached = load.enough.wait(30)
        deadline = time.monotonic() + 5
        while reached and not awaiting_reply(load) and time.monotonic() < deadline:
            time.sleep(0.0002)
        time.sleep(rng.uniform(0, 0.003))       # land anywhere in the store-and-reply step
        in_storage = awaiting_reply(load)
        load.killing.set()
        status = relay.kill()
    finally:
        load.killing.set()
        load.stop.set()
        for thread in threads:
            thread.join(20)
    log = relay.log_text()
    assert reached, f"only {load.accepted} messages got 250 in 30 s; {load.errors}\n{log[-3000:]}"
    assert status == -signal.SIGKILL, f"relay exited with {status} before the kill:\n{log}"
    assert not any(t.is_alive() for t in threads), "a sender thread hangs after the kill"
    assert not load.errors, f"senders lost their connection before the kill: {load.errors}"
    lost_at = Counter(sent.step for batch in batches for sent in batch if sent.dropped)
    return (f"{load.accepted} messages got 250 in {time.monotonic() - started:.1f}s, "
            f"SIGKILL with {in_storage} awaiting the final reply; connections lost at {dict(lost_at)}")


@pytest.mark.timeout(60)
def test_sigkill_under_load_loses_no_accepted_message(relay_config: Path) -> None:
    run = secrets.token_hex(3)
    seed = int(os.environ.get("CRASH_TEST_SEED") or random.randrange(2**32))
    print(f"seed {seed} (the message mix; rerun it with CRASH_TEST_SEED={seed})")
    rng = random.Random(seed)
    relay = rp.RelayProcess(relay_config)
    messages: list[Sent] = []
    report = []
    relay.start()
    try:
        for cycle in range(CYCLES):
            batches = [[make_message(rng, f"{run}.c{cycle}.t{t}.m{n:03d}", f"sender{t}@client.test",
                                     recipients(rng))
                        for n in range(MESSAGES_PER_SENDER)] for t in range(SENDERS)]
            messages.extend(sent for batch in batches for sent in batch)
            report.append(f"cycle {cycle}: " + load_and_kill(relay, batches, rng))
            relay.start()          # the start-up rescan repairs the queue
            recovered = re.findall(r"queue\.recovered .*", relay.log_text())
            report.append(f"  restart: {recovered or 'nothing to recover'}")
    finally:
        stopped = relay.stop()
    assert stopped == 0, f"relay did not stop cleanly ({stopped}):\n{relay.log_text()}"

    problems, counts = audit(messages, relay.maildirs, relay.spool)
    report.extend(f"  {name}: {value}" for name, value in sorted(counts.items()))
    print("\n" + "\n".join(report))
    assert not unexpected_refusals(messages), unexpected_refusals(messages)[:20]
    assert not problems, (f"{len(problems)} problem(s), seed {seed}:\n" + "\n".join(problems[:30]))
    findings = log_findings(relay.log_text(all_runs=True))
    assert not findings, "\n".join(findings[:30])


@pytest.mark.timeout(30)
def test_sigkill_while_idle_then_restart(relay_config: Path) -> None:
    rng = random.Random(7)
    run = secrets.token_hex(3)
    relay = rp.RelayProcess(relay_config)
    relay.start()
    try:
        before = [send_one(relay.address, make_message(rng, f"{run}.idle{n}", "idle@client.test",
                                                       (USERS[n % 3],)))
                  for n in range(6)]
        assert [s.outcome(s.rcpts[0]) for s in before] == [ACCEPTED] * 6, [s.final for s in before]
        # A session caught between RCPT and DATA when the process dies.
        pending = smtplib.SMTP(*relay.address, local_hostname="client.test", timeout=10)
        pending.ehlo("client.test")
        assert pending.mail("idle@client.test")[0] == 250
        assert pending.rcpt(USERS[0])[0] == 250
        snapshot = {path: path.read_bytes() for root in (relay.maildirs, relay.spool / "replay")
                    for path in root.rglob("*") if path.is_file()}

        assert relay.kill() == -signal.SIGKILL
        with pytest.raises(OSError):      # smtplib's SMTPServerDisconnected is one
            pending.docmd("DATA")
        pending.close()

        relay.start()
        recovery_log = relay.log_text()
        after = send_one(relay.address, make_message(rng, f"{run}.after", "idle@client.test",
                                                     (USERS[0],)))
        assert after.outcome(USERS[0]) == ACCEPTED, after.final
    finally:
        stopped = relay.stop()
    assert stopped == 0, relay.log_text()
    assert "queue.recovered" not in recovery_log, recovery_log

    changed = [str(p) for p, data in snapshot.items() if not p.exists() or p.read_bytes() != data]
    assert not changed, f"files changed or gone after kill and restart: {changed}"
    problems, counts = audit([*before, after], relay.maildirs, relay.spool)
    assert not problems, "\n".join(problems)
    assert counts[ACCEPTED] == 7 and counts["queue entries"] == 7, counts
    new_files = {p for root in (relay.maildirs, relay.spool / "replay")
                 for p in root.rglob("*") if p.is_file()} - set(snapshot)
    assert len(new_files) == 3, f"expected Maildir file, msg/ and waiting/ for one message: {new_files}"
    assert not log_findings(relay.log_text(all_runs=True)), relay.log_text(all_runs=True)
