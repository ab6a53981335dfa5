"""The readiness report and the drill against real parts (issue 12, point 5): the relay as its
own process (`serve`, as root with `storage.owner: vmail`), a real Dovecot from
contrib/dovecot serving its Maildirs and passwd-file, a scripted primary that takes mail and a
scripted smarthost.

The drill keeps one message for alice, reads it back over IMAP through Dovecot, replies
through the submission port as alice, and replays the kept message and the reply's CS-SENT
copy: the primary must get exactly those two, while an entry of bob's set aside and one told
to wait stay where they were. A drill with a wrong password fails at IMAP and still replays
what it kept, so nothing it made is left held. Readiness names bob's missing password and a
deactivated user, and checks the IMAP login and the smarthost.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme
import yaml

from relay.storage.queue import Envelope, Queue
from tests.helpers import free_port, wait_for
from tests.smtp.fakes import FakePrimary

try:  # tests/integration as a package ...
    from . import relay_process as rp
except ImportError:  # ... or as a rootdir-less test directory
    import relay_process as rp

pytestmark = pytest.mark.timeout(120)

ALICE, PASSWORD = f"alice@{rp.DOMAIN}", "alice-drill-pw"
BOB, CAROL = f"bob@{rp.DOMAIN}", f"carol@{rp.DOMAIN}"


@dataclass
class World:
    cfg: Path
    relay: rp.RelayProcess
    primary: FakePrimary
    smarthost: FakePrimary
    others: dict[str, str]          # bob's entries: id -> the state they must stay in

    @property
    def queue(self) -> Queue:
        return Queue(self.relay.spool / "replay" / rp.DOMAIN)

    def explain(self) -> str:
        return (f"primary got {[(g.rcpt_tos, g.content[:200]) for g in self.primary.received]}\n"
                f"relay log (tail):\n{self.relay.log_text()[-3000:]}")


def _run(cfg: Path, *args: str, stdin: str | None = None):
    return rp.run_cli(cfg, *args, stdin=stdin)


@pytest.fixture
def world(mail_tmp_path: Path, dovecot_factory):
    primary, smarthost = FakePrimary().start(), FakePrimary().start()
    relay = None
    try:
        cfg = rp.write_config(mail_tmp_path, primary_port=primary.port, owner="vmail")
        pem = mail_tmp_path / "tls.pem"
        trustme.CA().issue_cert("relay.localhost").private_key_and_cert_chain_pem.write_to_path(str(pem))
        raw = yaml.safe_load(cfg.read_text())
        raw["listen"]["submission"] = f"127.0.0.1:{free_port()}"
        raw["tls"] = {"cert": str(pem), "key": str(pem)}
        raw["outbound"] = {"smarthost": {"address": f"127.0.0.1:{smarthost.port}", "starttls": "off"}}
        raw["replay"] = {"probe_interval": "1h"}        # serve's timer stays out of the drill's way
        cfg.write_text(yaml.safe_dump(raw, sort_keys=False))
        for user, stdin in ((ALICE, PASSWORD + "\n"), (BOB, None), (CAROL, "carol-pw\n")):
            added = _run(cfg, "users", "add", user, *(["--password-stdin"] if stdin else []), stdin=stdin)
            assert added.returncode == 0, added.stderr
        assert _run(cfg, "users", "deactivate", CAROL).returncode == 0
        relay = rp.RelayProcess(cfg).start()
        dovecot = dovecot_factory(mail_tmp_path / "dovecot", relay.maildirs, mail_tmp_path / "users.passwd")
        (mail_tmp_path / "alice.secret").write_text(PASSWORD + "\n")
        raw["readiness"] = {"imap": f"127.0.0.1:{dovecot.imap_port}", "account": ALICE,
                            "password_file": "alice.secret"}
        cfg.write_text(yaml.safe_dump(raw, sort_keys=False))     # the commands read it afresh
        queue = Queue(relay.spool / "replay" / rp.DOMAIN)
        held = queue.enqueue_bytes(b"Subject: bob's held\r\n\r\nx\r\n", Envelope("s@x.org", BOB, time.time()))
        queue.hold(held)
        later = queue.enqueue_bytes(b"Subject: bob's later\r\n\r\nx\r\n", Envelope(
            "s@x.org", BOB, time.time(), extra={"next_try": time.time() + 3600}))
        yield World(cfg, relay, primary, smarthost, {held: "hold", later: "waiting"})
    finally:
        if relay is not None:
            relay.stop()
        primary.stop()
        smarthost.stop()


def test_the_drill_replays_exactly_its_two_messages(world: World) -> None:
    done = _run(world.cfg, "drill", "--domain", rp.DOMAIN, "--user", "alice", "--password-stdin",
                stdin=PASSWORD + "\n")
    assert done.returncode == 0, done.stdout + done.stderr + world.explain()
    lines = done.stdout.splitlines()
    assert [line.split()[1:3] for line in lines[:6]] == [
        ["ready", "pass"], ["keep", "pass"], ["imap", "pass"], ["submission", "pass"],
        ["sent", "copy"], ["replay", "pass"]], done.stdout
    assert " pass " in lines[4] and lines[-1] == f"drill passed for {ALICE}"
    got = world.primary.received
    assert len(got) == 2, world.explain()
    assert all(g.rcpt_tos == [ALICE] for g in got)
    subjects = sorted(g.content.split(b"Subject: ")[1].split(b"\r\n")[0] for g in got)
    assert subjects[0].startswith(b"Continuity drill ")
    assert subjects[1].startswith(b"Re: Continuity drill ") and subjects[1].endswith(b"(CS-SENT)")
    wait_for(lambda: len(world.smarthost.received) == 1, 20, "the reply at the smarthost", world.explain)
    assert world.smarthost.received[0].rcpt_tos == [f"postmaster@{rp.HOSTNAME}"]
    assert {e: world.queue.state_of(e) for e in world.others} == world.others   # bob's untouched
    assert world.queue.count("waiting") == 1 and world.queue.count("hold") == 1
    assert len(world.primary.received) == 2


def test_a_failed_drill_says_where_and_leaves_nothing_held(world: World) -> None:
    done = _run(world.cfg, "drill", "--domain", rp.DOMAIN, "--user", ALICE, "--password-stdin",
                stdin="not-her-password\n")
    assert done.returncode == 1, done.stdout + done.stderr
    results = {line.split()[1]: line.split()[2] for line in done.stdout.splitlines()[:6]}
    assert results == {"ready": "pass", "keep": "pass", "imap": "fail", "submission": "skip",
                       "sent": "copy", "replay": "pass"}, done.stdout
    assert len(world.primary.received) == 1                  # the kept one, replayed all the same
    assert {e: world.queue.state_of(e) for e in world.others} == world.others


def test_readiness_names_what_would_hurt(world: World) -> None:
    done = _run(world.cfg, "readiness", "--json")
    assert done.returncode == 1, done.stdout + done.stderr
    checks = {(c["domain"], c["name"]): c for c in map(json.loads, done.stdout.splitlines())}
    assert checks[(rp.DOMAIN, "passwords")]["result"] == "fail"
    assert BOB in checks[(rp.DOMAIN, "passwords")]["detail"]
    assert checks[(rp.DOMAIN, "inactive")]["result"] == "fail"
    assert CAROL in checks[(rp.DOMAIN, "inactive")]["detail"]
    assert checks[(rp.DOMAIN, "subscription")]["result"] == "ok"
    assert checks[("", "imap")]["result"] == "ok", checks[("", "imap")]
    assert checks[("", "smarthost")]["result"] == "ok", checks[("", "smarthost")]
    assert checks[("", "disk")]["result"] == "ok", checks[("", "disk")]
    (world.cfg.parent / "alice.secret").write_text("wrong\n")
    text = _run(world.cfg, "readiness", "--domain", rp.DOMAIN)
    imap_line = next(line for line in text.stdout.splitlines() if line.startswith("imap "))
    assert imap_line.split()[1] == "fail" and ALICE in imap_line, text.stdout
    raw = yaml.safe_load(world.cfg.read_text())
    raw["outbound"]["smarthost"]["address"] = f"127.0.0.1:{free_port()}"      # nothing there
    world.cfg.write_text(yaml.safe_dump(raw, sort_keys=False))
    text = _run(world.cfg, "readiness")
    line = next(line for line in text.stdout.splitlines() if line.startswith("smarthost "))
    assert line.split()[1] == "fail", text.stdout
