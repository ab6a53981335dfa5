"""Crash while sending: the real relay process SIGKILLed while its outbound runner drains a full
outbound queue to the smarthost, restarted, then counted (docs/architecture.md rules 2 and 3; the outbound
runner sends one entry at a time, oldest first).

    fill     before the relay starts, a few hundred messages from alice are queued in-process
             through `Submitter.submit` (one recipient each, a unique Message-ID): outbound queue
             entries, Sent copies, "(CS-SENT)" copies in the replay queue. The primary is down
             (nothing listens on its port), so the replay copies just wait
    drain    the relay starts; the smarthost (a scripted fake) takes every message, slowly
             (about 30 ms per DATA)
    kill     once some but not all messages reached the smarthost, SIGKILL:
               held     the smarthost holds one DATA reply until the process is dead, so that
                        message reached the smarthost but the relay never saw the 250
               racing   the kill lands a random 0-20 ms after the smarthost accepted a message:
                        anywhere in reading the reply, finishing the entry, claiming the next
    restart  recovery puts the entry the runner held (active/) back in waiting/; the runner
             drains the rest; then SIGTERM, which must end the process within 10 s (if not, it
             gets SIGABRT, and faulthandler puts every thread's stack into the failure message)

Then: every message reached the smarthost, with its bytes and envelope; only the entry that was
in active/ at the kill may have reached it twice (at most one duplicate; in `held` mode exactly
that one); first deliveries come in queue order; the outbound queue is empty (nothing in
failed/ or hold/, no stray msg/ or tmp/ files); Sent and the replay queue are untouched.
"""

from __future__ import annotations

import os
import random
import re
import secrets
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from relay.addresses import parse_mailbox
from relay.app import build_store
from relay.config import load
from relay.delivery.submit import Submitter
from tests.helpers import free_port, wait_for
from tests.smtp.fakes import FakePrimary, Script

try:  # tests/integration as a package ...
    from . import relay_process as rp
except ImportError:  # ... or as a rootdir-less test directory (pytest prepends it to sys.path)
    import relay_process as rp

stop_or_dump = rp.stop_or_dump

USER = f"alice@{rp.DOMAIN}"
MESSAGES = 300
KILL_BETWEEN = (MESSAGES // 4, MESSAGES // 2)   # SIGKILL around the n-th message at the smarthost
DATA_DELAY = 0.03                               # the smarthost's think time per DATA
QUEUE_DIRS = ("msg", "tmp", "waiting", "active", "failed", "hold")
MSGID_RE = re.compile(rb"\r\nMessage-ID: <([^>\r\n]+)>\r\n")
OK_250 = "250 2.0.0 Ok: queued"


# --------------------------------------------------------------------------- helpers




def msgid_of(data: bytes) -> str | None:
    match = MSGID_RE.search(data)
    return match.group(1).decode() if match else None


def listing(root: Path) -> dict[str, list[str]]:
    return {name: sorted(p.name for p in (root / name).iterdir()) if (root / name).is_dir() else []
            for name in QUEUE_DIRS}


def log_findings(text: str) -> list[str]:
    """Lines of the relay's log that point at a fault."""
    return [line for line in text.splitlines()
            if " ERROR " in line or "Traceback" in line or " CRITICAL " in line]


def make_message(rng: random.Random, n: int, msgid: str, rcpt: str) -> bytes:
    """CRLF, a unique Message-ID, sometimes raw 8-bit UTF-8, 1-12 KB, dot-stuffing bait."""
    eight_bit = n % 3 == 0
    lines = [f"From: Alice <{USER}>", f"To: <{rcpt}>", f"Subject: outbound crash test {n}",
             f"Message-ID: <{msgid}>", "Date: Sat, 28 Nov 2026 03:00:00 +0000", "MIME-Version: 1.0",
             "Content-Type: text/plain; charset=utf-8",
             f"Content-Transfer-Encoding: {'8bit' if eight_bit else '7bit'}", "",
             f"message {n}", ".", ".leading dot", "..two dots"]
    word = "gr\u00fc\u00dfe \u20ac \u65e5\u672c " if eight_bit else "lorem ipsum "
    size = rng.choice([1_000, 3_000, 12_000])
    while sum(len(line) + 2 for line in lines) < size:
        lines.append((word * rng.randint(1, 40))[:rng.randint(1, 400)].rstrip() or "x")
    lines.append(f"end of {n}")
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")


class SlowSmarthost:
    """A fake smarthost that thinks `DATA_DELAY` per message and, at the `kill_at`-th DATA,
    tells the test (`reached`). In `hold` mode it then keeps that reply until `release`."""

    def __init__(self, kill_at: int, hold: bool) -> None:
        self.kill_at = kill_at
        self.hold = hold
        self.calls = 0
        self.held_msgid: str | None = None
        self.reached = threading.Event()
        self.release = threading.Event()
        self.server = FakePrimary(Script(data_for=self.data_for))

    def data_for(self, content: bytes) -> str:   # runs on the fake's own loop thread
        self.calls += 1
        time.sleep(DATA_DELAY)
        if self.calls == self.kill_at:
            if self.hold:
                self.held_msgid = msgid_of(content)
                self.reached.set()
                self.release.wait(20)   # the relay is killed meanwhile; it never sees this 250
            else:
                self.reached.set()
        return OK_250




# --------------------------------------------------------------------------- the test


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["held", "racing"])
def test_sigkill_with_full_outbound_queue_loses_nothing(tmp_path: Path, mode: str,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONFAULTHANDLER", "1")   # the relay's stacks, should it hang (below)
    seed = int(os.environ.get("CRASH_TEST_SEED") or random.randrange(2**32))
    print(f"\nseed {seed} (rerun with CRASH_TEST_SEED={seed})")
    rng = random.Random(seed)
    run = secrets.token_hex(4)
    smarthost = SlowSmarthost(rng.randint(*KILL_BETWEEN), hold=mode == "held")

    cfg = rp.write_config(tmp_path / "relay", primary_port=free_port())   # primary down
    raw = yaml.safe_load(cfg.read_text(encoding="utf-8"))
    raw["outbound"] = {"smarthost": {"address": f"127.0.0.1:{smarthost.server.port}", "starttls": "off"},
                       "retry_delay": "1s", "max_age": "5d"}
    raw["replay"] = {"probe_interval": "1s"}
    cfg.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    rp.import_users(cfg, [USER])

    # 1. Fill the outbound queue before the relay runs.
    started = time.monotonic()
    sender = Submitter(build_store(load(cfg)))
    alice = parse_mailbox(USER)
    sent: dict[str, tuple[str, bytes]] = {}        # Message-ID -> (recipient, bytes)
    order: list[str] = []
    for n in range(MESSAGES):
        msgid, rcpt = f"{run}.{n:04d}@example.com", f"dest{n % 17}@remote{n % 5}.test"
        data = make_message(rng, n, msgid, rcpt)
        sender.submit(alice, USER, [rcpt], data)
        sent[msgid] = (rcpt, data)
        order.append(msgid)
    filled = time.monotonic() - started

    relay = rp.RelayProcess(cfg)
    outbound = relay.spool / "outbound"
    replay = relay.spool / "replay" / rp.DOMAIN
    sent_dir = relay.maildirs / rp.DOMAIN / "alice" / ".Sent" / "cur"
    assert len(listing(outbound)["waiting"]) == MESSAGES, listing(outbound)
    assert len(listing(replay)["waiting"]) == MESSAGES

    received = smarthost.server.received

    def explain() -> str:
        counts = {name: len(entries) for name, entries in listing(outbound).items()}
        return (f"smarthost: {len(received)} received, {smarthost.calls} DATA; outbound queue "
                f"{counts}\nrelay log (tail):\n{relay.log_text(all_runs=True)[-4000:]}")

    smarthost.server.start()
    try:
        # 2. Drain, and 3. kill part-way.
        relay.start()
        wait_for(smarthost.reached.is_set, 40, f"DATA number {smarthost.kill_at} at the smarthost",
                 explain)
        if mode == "racing":
            time.sleep(rng.uniform(0, 0.02))   # land anywhere around the 250 and the next claim
        at_kill = len(received)
        status = relay.kill()
        smarthost.release.set()
        in_flight = listing(outbound)["active"]
        assert status == -signal.SIGKILL, f"relay exited with {status} before the kill\n{explain()}"
        assert 0 < at_kill < MESSAGES, explain()
        assert len(in_flight) <= 1, f"the runner sends one at a time, active/ holds {in_flight}"
        in_flight_ids = {msgid_of((outbound / "msg" / entry).read_bytes()) for entry in in_flight}
        if mode == "held":
            assert in_flight_ids == {smarthost.held_msgid}, (in_flight_ids, smarthost.held_msgid)

        # 4. Restart: recovery, then the rest of the queue.
        relay.start()
        recovered = re.findall(r"queue\.recovered .*", relay.log_text())
        wait_for(lambda: not (lambda q: q["waiting"] or q["active"])(listing(outbound)), 40,
                 "an empty outbound queue (waiting/ and active/)", explain)
        stopped, stop_log = stop_or_dump(relay)
    finally:
        smarthost.release.set()
        relay.stop()
        smarthost.server.stop()
    # 5. Count.
    copies = Counter(msgid_of(got.content) for got in received)
    twice = sorted(msgid for msgid, count in copies.items() if count > 1)
    report = (f"{mode}: filled {MESSAGES} in {filled:.1f}s; SIGKILL at DATA {smarthost.kill_at} "
              f"with {at_kill} received, active/ held {sorted(in_flight_ids)}; restart "
              f"{recovered or ['nothing to recover']}; {len(received)} deliveries, "
              f"{len(copies)} distinct, twice: {twice}")
    print(report)

    assert set(copies) <= set(sent), f"unknown messages at the smarthost: {set(copies) - set(sent)}"
    missing = [msgid for msgid in order if msgid not in copies]
    assert not missing, f"{len(missing)} never reached the smarthost: {missing[:10]}\n{report}"
    assert len(twice) <= 1 and all(copies[msgid] == 2 for msgid in twice), report
    assert set(twice) <= in_flight_ids, f"sent twice but not in flight at the kill\n{report}"
    if mode == "held":
        assert twice == [smarthost.held_msgid], report
    for got in received:
        msgid = msgid_of(got.content)
        rcpt, data = sent[msgid]
        assert (got.mail_from, got.rcpt_tos) == (USER, [rcpt]), (msgid, got.mail_from, got.rcpt_tos)
        assert got.content == data, f"{msgid}: bytes differ"
    firsts = list(dict.fromkeys(msgid_of(got.content) for got in received))
    assert firsts == order, "first deliveries are not in queue order"

    queue = listing(outbound)
    assert not any(queue.values()), f"outbound queue not clean: {queue}"
    assert len(listing(replay)["waiting"]) == MESSAGES, listing(replay)   # primary still down
    assert not (listing(replay)["failed"] or listing(replay)["hold"]), listing(replay)
    assert len([p for p in sent_dir.iterdir() if p.name.endswith(":2,S")]) == MESSAGES
    findings = log_findings(relay.log_text(all_runs=True))
    assert not findings, "\n".join(findings[:30])

    # 6. Last, as it says nothing about what was sent: SIGTERM ends the relay cleanly.
    quiet = "\n".join(line for line in stop_log.splitlines() if "outbound.sent" not in line)
    assert stopped == 0, (f"relay did not stop within {rp.STOP_TIMEOUT:.0f}s of SIGTERM (status "
                          f"{stopped}); its log since the restart (outbound.sent lines left out), "
                          f"with its stacks if it hung:\n{quiet[-8000:]}")
