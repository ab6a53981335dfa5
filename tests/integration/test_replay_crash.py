"""Crash during replay: the real relay process SIGKILLed while it drains its replay queue to a
recovered primary, restarted, then counted (docs/architecture.md rules 2, 3 and 7).

    phase 1  the primary (a scripted fake) answers 451 at RCPT: every message for a registered
             user is kept (Maildir + replay queue) and the sender gets 250
    phase 2  the primary accepts, slowly; the replay runner drains the queue. The fake holds
             one DATA reply at a chosen point while the relay is SIGKILLed: that message reached
             the primary, but the relay never saw the 250, so it is still in active/
    phase 3  restart: recovery puts active/ back to waiting/, the runner drains the rest

Then: every message reached the primary at least once; a message reached it twice only if it
was in active/ (in flight) when the process died, so at most `replay.concurrency` per kill;
each reached it with the bytes that were received (our Received header + the sent bytes) and
its envelope; per user, the first deliveries come in the order the messages were accepted; the
Maildir copies stay; the queue is empty and the domain `normal`.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import re
import secrets
import signal
import smtplib
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
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


CONCURRENCY = 4
MSGID_RE = re.compile(rb"\r\nMessage-ID: <([^>\r\n]+)>\r\n")
QUEUE_STATES = ("tmp", "waiting", "active", "failed", "hold", "msg")
RECEIVED_RE = re.compile(rb"\AReceived: [^\r\n]*(?:\r\n[ \t][^\r\n]*)*\r\n")


# --------------------------------------------------------------------------- helpers




def make_config(workdir: Path, primary_port: int) -> Path:
    """rp.write_config plus a `replay:` section (write_config has no parameter for it)."""
    cfg = rp.write_config(workdir, primary_port=primary_port)
    raw = yaml.safe_load(cfg.read_text(encoding="utf-8"))
    raw["replay"] = {"probe_interval": "1s", "concurrency": CONCURRENCY}
    cfg.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return cfg


@dataclass
class Msg:
    msgid: str
    sender: str            # envelope sender as given to MAIL FROM ("" is the null sender)
    rcpt: str
    data: bytes            # the message as handed to SMTP (CRLF, not dot-stuffed)
    options: tuple[str, ...] = ()
    reply: tuple[int, str] | None = None

    @property
    def primary_sender(self) -> str:
        """What the fake primary records as MAIL FROM."""
        return self.sender or "<>"


def make_message(run: str, user: str, k: int) -> Msg:
    local = user.split("@")[0]
    msgid = f"{run}.{local}.{k:03d}@client.test"
    rng = random.Random(msgid)
    eight_bit = k % 7 == 3
    sender = "" if k % 25 == 7 else f"s{k % 3}@sender.test"
    lines = [f"From: Replay Sender <{sender or 'mailer-daemon@sender.test'}>", f"To: {user}",
             f"Subject: replay {local} {k}", f"Message-ID: <{msgid}>",
             "Date: Sat, 28 Nov 2026 03:00:00 +0000", "MIME-Version: 1.0",
             "Content-Type: text/plain; charset=utf-8",
             f"Content-Transfer-Encoding: {'8bit' if eight_bit else '7bit'}", "",
             f"message {k} for {user}", ".a line that starts with a dot", ".", "..two dots"]
    for _ in range(rng.randint(2, 30)):
        word = "caf\u00e9 \u65e5\u672c " if eight_bit else "lorem ipsum "
        lines.append((word * rng.randint(1, 40))[:rng.randint(1, 300)].rstrip() or "x")
    lines.append(f"end {msgid}")
    data = ("\r\n".join(lines) + "\r\n").encode("utf-8")
    return Msg(msgid, sender, user, data, ("BODY=8BITMIME",) if eight_bit else ())


def msgid_of(data: bytes) -> str | None:
    match = MSGID_RE.search(data)
    return match.group(1).decode() if match else None


def send_in_order(address: tuple[str, int], messages: list[Msg]) -> None:
    """One connection; each message waits for its reply before the next one goes."""
    with smtplib.SMTP(*address, local_hostname="client.test", timeout=30) as smtp:
        smtp.ehlo("client.test")
        for msg in messages:
            code, text = smtp.mail(msg.sender, list(msg.options))
            if code == 250:
                code, text = smtp.rcpt(msg.rcpt)
            if code == 250:
                code, text = smtp.data(msg.data)
            else:
                smtp.rset()
            msg.reply = (code, text.decode(errors="replace"))


def send_all(address: tuple[str, int], users: list[str], per_user: int, run: str,
             threads: int) -> tuple[list[Msg], dict[str, list[str]]]:
    """`per_user` messages to each user, from `threads` sender threads; each user belongs to
    one thread, which alternates between its users, so each user's order is well defined.
    Returns every message and, per user, the message ids in the order they got their reply."""
    plans: list[list[Msg]] = [[] for _ in range(threads)]
    for k in range(per_user):
        for n, user in enumerate(users):
            plans[n % threads].append(make_message(run, user, k))
    with ThreadPoolExecutor(threads) as pool:
        for future in [pool.submit(send_in_order, address, plan) for plan in plans]:
            future.result()
    messages = [msg for plan in plans for msg in plan]
    refused = [(m.msgid, m.reply) for m in messages if not m.reply or m.reply[0] != 250]
    assert not refused, f"{len(refused)} message(s) not accepted: {refused[:10]}"
    order = {user: [m.msgid for plan in plans for m in plan if m.rcpt == user] for user in users}
    return messages, order


class Relay:
    """The relay process plus the paths the test looks at."""

    def __init__(self, cfg: Path) -> None:
        self.cfg = cfg
        self.proc = rp.RelayProcess(cfg)
        self.queue = self.proc.spool / "replay" / rp.DOMAIN
        self.state_file = self.proc.spool / "state" / f"{rp.DOMAIN}.json"

    def listing(self, state: str) -> list[str]:
        try:
            return sorted(os.listdir(self.queue / state))
        except FileNotFoundError:
            return []

    def state(self) -> str | None:
        try:
            return json.loads(self.state_file.read_text(encoding="utf-8"))["state"]
        except (OSError, ValueError, KeyError):
            return None

    def in_flight(self) -> dict[str, str | None]:
        """Entries in active/ (call it while the process is dead): queue id -> Message-ID."""
        return {entry: msgid_of((self.queue / "msg" / entry).read_bytes())
                for entry in self.listing("active")}

    def drained(self) -> bool:
        """Nothing left to replay and the domain back to normal; or something was set aside
        (failed/, hold/), which no wait will fix: check_drained reports it."""
        return ((not self.listing("waiting") and not self.listing("active")
                 and self.state() == "normal") or bool(self.listing("failed") or self.listing("hold")))

    def explain(self) -> str:
        counts = {state: len(self.listing(state)) for state in QUEUE_STATES}
        return f"state={self.state()} queue={counts}\nrelay log:\n{self.proc.log_text()[-4000:]}"


class Gate:
    """A DATA hook for the fake primary: answers `reply(n)` for the n-th DATA (from 0) after
    `delay` seconds; at DATA number `hold_at` it first signals `held` and waits for `release`,
    so the test can kill the relay while that reply is due. It runs inside the fake's event
    loop (aiosmtpd calls it synchronously): blocking there blocks the whole fake, as a slow
    primary would."""

    def __init__(self, reply: Callable[[int], str], delay: float) -> None:
        self.reply = reply
        self.delay = delay
        self.counter = itertools.count()
        self.calls = 0
        self.hold_at: int | None = None
        self.held_msgid: str | None = None
        self.held = threading.Event()
        self.release = threading.Event()

    def hold(self, at: int) -> None:
        self.hold_at = at
        self.held.clear()
        self.release.clear()

    def __call__(self, content: bytes) -> str:
        n = self.calls = next(self.counter)
        if n == self.hold_at:
            self.held_msgid = msgid_of(content)
            self.held.set()
            self.release.wait(30)
        time.sleep(self.delay)
        return self.reply(n)


def log_findings(text: str) -> list[str]:
    return [line for line in text.splitlines()
            if " ERROR " in line or "Traceback" in line or " CRITICAL " in line]


def kill_while_held(relay: Relay, gate: Gate, fake: FakePrimary,
                    accepts: bool) -> tuple[dict[str, str | None], int]:
    """Wait for the held DATA, SIGKILL the relay, then let the fake answer (to a dead peer);
    when that answer is a 250 (`accepts`), wait until the fake has recorded the message.
    Returns the entries in active/ at the kill and what the primary had received by then."""
    wait_for(gate.held.is_set, 30, f"the primary to get DATA number {gate.hold_at}", relay.explain)
    try:
        status = relay.proc.kill()
        at_kill = len(fake.received)
        in_flight = relay.in_flight()
    finally:
        gate.release.set()
    assert status == -signal.SIGKILL, f"relay exited with {status} before the kill:\n{relay.explain()}"
    if accepts:
        wait_for(lambda: any(msgid_of(got.content) == gate.held_msgid for got in fake.received[at_kill:]),
                 10, f"the primary to record the held {gate.held_msgid}")
    return in_flight, at_kill


def check_deliveries(messages: list[Msg], order: dict[str, list[str]], received: list[Received],
                     maildirs: Path, may_repeat: set[str], max_repeats: int) -> dict[str, int]:
    """The audit shared by both tests. Returns how often each Message-ID reached the primary."""
    by_id = {m.msgid: m for m in messages}
    copies: dict[str, list[Received]] = {}
    unknown = []
    for got in received:
        msgid = msgid_of(got.content)
        if msgid in by_id:
            copies.setdefault(msgid, []).append(got)
        else:
            unknown.append(got.content[:200])
    assert not unknown, f"the primary got messages nobody sent: {unknown[:5]}"

    missing = sorted(set(by_id) - set(copies))
    assert not missing, f"{len(missing)} message(s) never reached the primary: {missing[:20]}"

    repeated = {msgid: len(c) for msgid, c in copies.items() if len(c) > 1}
    unexpected = {msgid: n for msgid, n in repeated.items() if msgid not in may_repeat}
    assert not unexpected, (f"delivered more than once without being in flight at a kill: "
                            f"{unexpected}; in flight: {sorted(may_repeat)}")
    extra = sum(n - 1 for n in repeated.values())
    assert extra <= max_repeats, f"{extra} duplicate deliveries (at most {max_repeats}): {repeated}"

    # Maildir copies stay: exactly one per message, in the recipient's INBOX; and the primary
    # got exactly the bytes received (the Maildir file minus Return-Path and Delivered-To).
    in_maildir: dict[str, list[Path]] = {}
    for path in (maildirs / rp.DOMAIN).glob("*/[nc][eu][wr]/*"):
        in_maildir.setdefault(msgid_of(path.read_bytes()) or "?", []).append(path)
    problems = []
    for msgid, msg in by_id.items():
        files = in_maildir.get(msgid, [])
        local = msg.rcpt.split("@")[0]
        if len(files) != 1 or files[0].parent.parent.name != local:
            problems.append(f"{msgid}: Maildir copies {files}")
            continue
        on_disk = files[0].read_bytes()
        trace = f"Return-Path: <{msg.sender}>\r\nDelivered-To: {msg.rcpt}\r\n".encode()
        if not on_disk.startswith(trace):
            problems.append(f"{msgid}: Maildir file does not start with {trace!r}")
            continue
        for got in copies[msgid]:
            if (got.mail_from, got.rcpt_tos) != (msg.primary_sender, [msg.rcpt]):
                problems.append(f"{msgid}: envelope {got.mail_from} -> {got.rcpt_tos}")
            if got.content != on_disk[len(trace):]:
                problems.append(f"{msgid}: bytes at the primary differ from the bytes received")
            elif not (got.content.endswith(msg.data) and RECEIVED_RE.match(got.content)
                      and got.content.count(b"\r\nReceived: ") == 0):
                problems.append(f"{msgid}: not one Received header + the sent bytes: "
                                f"{got.content[:300]!r}")
    assert not problems, f"{len(problems)} problem(s):\n" + "\n".join(problems[:20])

    # Rule 7: per user, oldest first; a re-sent in-flight message aside, so first deliveries.
    first_seen: dict[str, list[str]] = {}
    seen: set[str] = set()
    for got in received:
        msgid = msgid_of(got.content)
        if msgid not in seen:
            seen.add(msgid)
            first_seen.setdefault(by_id[msgid].rcpt, []).append(msgid)
    disorder = []
    for user, sent in order.items():
        got = first_seen.get(user, [])
        if got != sent:
            at = next(i for i, pair in enumerate(itertools.zip_longest(sent, got)) if pair[0] != pair[1])
            disorder.append(f"{user} from #{at}: accepted {sent[at:at + 4]}, "
                            f"first delivered {got[at:at + 4]}")
    assert not disorder, "per-user order broken:\n" + "\n".join(disorder)
    return {msgid: len(c) for msgid, c in copies.items()}


def check_drained(relay: Relay) -> None:
    left = {state: relay.listing(state) for state in QUEUE_STATES if relay.listing(state)}
    assert not left, f"replay queue not empty after draining: {left}"
    status = rp.run_cli(relay.cfg, "status")
    assert status.returncode == 0, status.stdout + status.stderr
    line = next(line for line in status.stdout.splitlines() if line.startswith(rp.DOMAIN))
    fields = line.split()
    assert fields[1] == "normal" and fields[4:8] == ["0", "0", "0", "0"], status.stdout


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def fake():
    server = FakePrimary(Script(mail="451 4.3.0 mailbox store down")).start()
    yield server
    server.stop()


@pytest.fixture
def relay(tmp_path: Path, fake: FakePrimary):
    cfg = make_config(tmp_path / "relay", fake.port)
    relay = Relay(cfg)
    yield relay
    relay.proc.stop()


def keep_during_outage(relay: Relay, fake: FakePrimary, users: list[str], per_user: int,
                       threads: int) -> tuple[list[Msg], dict[str, list[str]]]:
    """Phase 1: the primary refuses (451 at RCPT); everything is kept and queued."""
    rp.import_users(relay.cfg, users)
    relay.proc.start()
    messages, order = send_all(relay.proc.address, users, per_user, secrets.token_hex(3), threads)
    total = len(messages)
    # A probe's sweep may hold a few entries in active/ for a moment (each gets 451 and goes back).
    wait_for(lambda: len(relay.listing("waiting")) == total and not relay.listing("active"), 20,
             f"{total} entries in waiting/", relay.explain)
    assert relay.state() == "outage", relay.explain()
    assert fake.received == []
    return messages, order


# --------------------------------------------------------------------------- tests


USERS = [f"user{n:02d}@{rp.DOMAIN}" for n in range(10)]


@pytest.mark.timeout(60)
def test_sigkill_during_replay_then_restart_delivers_everything(relay: Relay,
                                                                fake: FakePrimary) -> None:
    messages, order = keep_during_outage(relay, fake, USERS, per_user=30, threads=5)
    total = len(messages)

    # Phase 2: the primary takes mail again, slowly (15 ms per DATA, one at a time).
    gate = Gate(lambda n: "250 2.0.0 Ok: queued", delay=0.015)
    gate.hold(total // 3)
    fake.script.data_for = gate
    fake.script.mail = "250 2.1.0 Ok"
    in_flight, at_kill = kill_while_held(relay, gate, fake, accepts=True)
    assert 0 < at_kill < total, f"{at_kill} of {total} delivered at the kill"
    assert gate.held_msgid in in_flight.values(), (gate.held_msgid, in_flight)
    assert len(in_flight) <= CONCURRENCY, in_flight
    before_restart = len(fake.received)

    # Phase 3: restart; recovery puts active/ back to waiting/; the runner drains the rest.
    relay.proc.start()
    wait_for(relay.drained, 40, "an empty replay queue and state normal", relay.explain)
    recovered = re.findall(r"queue\.recovered .*", relay.proc.log_text())
    assert relay.proc.stop() == 0, relay.explain()

    check_drained(relay)
    counts = check_deliveries(messages, order, fake.received, relay.proc.maildirs,
                              may_repeat=set(filter(None, in_flight.values())),
                              max_repeats=CONCURRENCY)
    # The held message reached the primary (its 250 went to a dead process) and again after
    # the restart: at-least-once, and the in-flight one is the duplicate.
    assert counts[gate.held_msgid] == 2, counts[gate.held_msgid]
    assert recovered and f"requeued={len(in_flight)}" in recovered[0], (recovered, in_flight)
    findings = log_findings(relay.proc.log_text(all_runs=True))
    assert not findings, "\n".join(findings[:20])
    print(f"\n{total} messages; {at_kill} at the primary at the SIGKILL ({before_restart} once it "
          f"answered the dead peer); {len(in_flight)} in flight {sorted(in_flight.values())}; "
          f"{len(fake.received)} deliveries in all, "
          f"{sum(n - 1 for n in counts.values())} duplicate(s); {recovered}")


@pytest.mark.timeout(60)
def test_flapping_primary_with_two_kills_loses_nothing(relay: Relay, fake: FakePrimary) -> None:
    users = USERS[:6]
    messages, order = keep_during_outage(relay, fake, users, per_user=5, threads=3)

    # The primary flaps: every other DATA gets 451, which stops the sweep and puts the domain
    # back in outage until the next probe.
    gate = Gate(lambda n: "451 4.3.0 flapping" if n % 2 else "250 2.0.0 Ok: queued", delay=0.01)
    gate.hold(6)                      # an even DATA: the primary takes it, the relay dies first
    fake.script.data_for = gate
    fake.script.mail = "250 2.1.0 Ok"
    in_flight_1, at_kill_1 = kill_while_held(relay, gate, fake, accepts=True)
    assert gate.held_msgid in in_flight_1.values(), (gate.held_msgid, in_flight_1)

    relay.proc.start()
    gate.hold((gate.calls + 6) | 1)   # an odd DATA: 451, to a relay that is gone
    in_flight_2, at_kill_2 = kill_while_held(relay, gate, fake, accepts=False)
    assert gate.held_msgid in in_flight_2.values(), (gate.held_msgid, in_flight_2)
    assert at_kill_1 < at_kill_2 < len(messages), (at_kill_1, at_kill_2)

    relay.proc.start()
    wait_for(relay.drained, 40, "an empty replay queue and state normal", relay.explain)
    assert relay.proc.stop() == 0, relay.explain()

    may_repeat = set(filter(None, [*in_flight_1.values(), *in_flight_2.values()]))
    assert len(in_flight_1) <= CONCURRENCY and len(in_flight_2) <= CONCURRENCY
    check_drained(relay)
    counts = check_deliveries(messages, order, fake.received, relay.proc.maildirs,
                              may_repeat=may_repeat, max_repeats=2 * CONCURRENCY)
    findings = log_findings(relay.proc.log_text(all_runs=True))
    assert not findings, "\n".join(findings[:20])
    print(f"\n{len(messages)} messages, {gate.calls + 1} DATA commands at the flapping primary; "
          f"kills with {len(in_flight_1)} and {len(in_flight_2)} in flight; "
          f"{len(fake.received)} deliveries, {sum(n - 1 for n in counts.values())} duplicate(s)")
