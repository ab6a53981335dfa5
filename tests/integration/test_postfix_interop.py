"""Interoperability with real Postfix 3.7 instances and swaks, around the real relay process.

Postfix plays both neighbours of the relay (tests/integration/postfix.py runs private
instances on loopback ports): the sending MTA in front of it (relayhost = the relay's inbound
port) and the primary behind it (virtual(8) delivering to Maildirs). Where a test needs to see
the exact envelope (BODY=8BITMIME, SMTPUTF8), the next hop is a recording aiosmtpd server.

Postfix's Maildir files end lines in LF: bytes are compared with CRLF turned into LF, after the
trace headers Postfix adds on top (Return-Path, X-Original-To, Delivered-To, Received).
"""

from __future__ import annotations

import json
import re
import smtplib
import socket
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from aiosmtpd.controller import Controller

from tests.helpers import free_port, wait_for
from tests.smtp.fakes import send

try:  # tests/integration as a package ...
    from . import relay_process as rp
    from .postfix import Postfix, strip_trace
except ImportError:  # ... or as a rootdir-less test directory (pytest prepends it to sys.path)
    import relay_process as rp
    from postfix import Postfix, strip_trace

pytestmark = pytest.mark.timeout(60)

ALICE, CAROL, BUSY = (f"{name}@{rp.DOMAIN}" for name in ("alice", "carol", "busy"))
SENDER = "bob@sender.test"
SWAKS = "/usr/bin/swaks"
WAIT = 20.0


def message(n: int, to: str = ALICE, sender: str = SENDER) -> bytes:
    """Message n as its sender means it (CRLF, not dot-stuffed): 8-bit body, a folded header,
    a line starting with a dot, trailing white space."""
    return (f"From: Bob <{sender}>\r\nTo: <{to}>\r\nSubject: interop {n}\r\n"
            f"Message-ID: <interop-{n}@sender.test>\r\nDate: Tue, 01 Dec 2026 10:0{n % 10}:00 +0000\r\n"
            "X-Folded: first part\r\n\tsecond part\r\n"
            "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
            "Content-Transfer-Encoding: 8bit\r\n\r\n"
            f"Gr\u00fc\u00dfe {n}, \u20ac 100\r\n"
            ".a line that starts with a dot\r\n"
            "  indented, with trailing space \r\n"
            "last line\r\n").encode()


def wire(data: bytes) -> bytes:
    """DATA bytes for `fakes.send`: dot-stuffed, without the final dot."""
    return data.replace(b"\r\n.", b"\r\n..")


def lf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n")


# --------------------------------------------------------------------------- a recording next hop


@dataclass
class Got:
    mail_from: str
    mail_options: list[str]
    rcpt_tos: list[str]
    content: bytes


@dataclass
class RecordingHandler:
    """Accepts everything; records the envelope with its MAIL FROM parameters."""

    got: list[Got] = field(default_factory=list)

    async def handle_DATA(self, server, session, envelope) -> str:
        self.got.append(Got(envelope.mail_from, list(envelope.mail_options),
                            list(envelope.rcpt_tos), envelope.content))
        return "250 2.0.0 Ok: recorded"


@pytest.fixture
def recorder():
    """`recorder()` starts a recording SMTP server on a free loopback port: (port, handler)."""
    started: list[Controller] = []

    def start() -> tuple[int, RecordingHandler]:
        handler = RecordingHandler()
        port = free_port()
        controller = Controller(handler, hostname="127.0.0.1", port=port, decode_data=False,
                                enable_SMTPUTF8=True)
        controller.start()
        started.append(controller)
        return port, handler

    yield start
    for controller in started:
        controller.stop()


# --------------------------------------------------------------------------- the relay


def relay_config(folder: Path, primary_port: int, users: list[str], *,
                 replay: dict | None = None, extra: dict | None = None) -> Path:
    """The relay's config (tests/integration/relay_process.py) probing every second, with
    `users` registered and `extra` top-level keys merged in."""
    cfg = rp.write_config(folder, primary_port=primary_port)
    raw = yaml.safe_load(cfg.read_text(encoding="utf-8"))
    raw["replay"] = {"probe_interval": "1s", **(replay or {})}
    raw.update(extra or {})
    cfg.write_text(yaml.safe_dump(raw, sort_keys=False, allow_unicode=True), encoding="utf-8")
    if users:
        rp.import_users(cfg, users)
    return cfg


def entries(relay: rp.RelayProcess, state: str) -> dict[str, dict]:
    """Replay queue entries of example.com in `state`: id -> envelope."""
    folder = relay.spool / "replay" / rp.DOMAIN / state
    found = {}
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        try:
            found[path.name] = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue   # moved meanwhile
    return found


def kept(relay: rp.RelayProcess, address: str) -> list[bytes]:
    """The relay's continuity copies for `address` (its Maildir INBOX)."""
    local, _, domain = address.rpartition("@")
    box = relay.maildirs / domain / local
    files = [p for sub in ("new", "cur") if (box / sub).is_dir() for p in (box / sub).iterdir()]
    return [p.read_bytes() for p in sorted(files, key=lambda p: p.stat().st_mtime_ns)]


def explainer(relay: rp.RelayProcess, *postfixes: Postfix) -> Callable[[], str]:
    def explain() -> str:
        queue = {state: list(entries(relay, state).values())
                 for state in ("waiting", "active", "failed", "hold")}
        parts = [f"relay queue: {queue}", f"relay log:\n{relay.log_text()}"]
        parts += [f"{p}:\n{p.log_text()}" for p in postfixes]
        return "\n".join(parts)
    return explain


def raw_session(port: int, commands: list[bytes], timeout: float = 15) -> list[bytes]:
    """Send each chunk over one plain socket and collect one (multi-line) reply per chunk,
    after the greeting: the way to send bytes no SMTP library would (bare LF)."""
    replies = []
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        reader = sock.makefile("rb")

        def reply() -> bytes:
            lines = []
            while True:
                line = reader.readline()
                lines.append(line)
                if len(line) < 4 or line[3:4] != b"-":
                    return b"".join(lines)

        reply()
        for chunk in commands:
            sock.sendall(chunk)
            replies.append(reply())
        sock.sendall(b"QUIT\r\n")
    return replies


# --------------------------------------------------------------------------- replay to Postfix


def test_replay_to_postfix_primary_is_byte_identical(mail_tmp_path, postfix_factory):
    primary = postfix_factory(Postfix.primary(mail_tmp_path / "primary", mailboxes=[ALICE]))
    cfg = relay_config(mail_tmp_path / "relay", primary.port, [ALICE])
    with rp.RelayProcess(cfg) as relay:
        explain = explainer(relay, primary)
        # Postfix is stopped: the relay keeps both messages (250, in alice's Maildir).
        for n in (1, 2):
            answers, reply = send(relay.port, SENDER, [ALICE], wire(message(n)))
            assert answers == [(250, b"2.1.5 Recipient OK")] and reply[0] == 250, (answers, reply)
        copies = kept(relay, ALICE)
        assert len(copies) == 2 and len(entries(relay, "waiting")) == 2, explain()
        trace = f"Return-Path: <{SENDER}>\r\nDelivered-To: {ALICE}\r\n".encode()
        received = []   # what the relay received: its Received header + the DATA bytes
        for n, copy in zip((1, 2), copies, strict=True):
            assert copy.startswith(trace + b"Received: ") and copy.endswith(message(n)), copy
            received.append(copy[len(trace):])

        # Postfix comes up: the next probe replays both, in order.
        primary.start()
        wait_for(lambda: len(primary.delivered(ALICE)) == 2 and not entries(relay, "waiting")
                    and not entries(relay, "active"), WAIT, "both replayed to Postfix", explain)

    delivered = primary.delivered(ALICE)
    for got, sent in zip(delivered, received, strict=True):
        # The relay's Received header and the bytes it received arrive as kept, below
        # Postfix's own Return-Path, X-Original-To, Delivered-To and Received, and nothing else.
        assert got.endswith(lf(sent)), (got, sent)
        added = got[:-len(lf(sent))]
        assert strip_trace(added) == ([b"return-path", b"x-original-to", b"delivered-to",
                                       b"received"], b""), added
        assert added.startswith(f"Return-Path: <{SENDER}>\n".encode()), added
    assert kept(relay, ALICE) == copies   # the user's continuity copies stay


def test_utf8_sender_kept_then_replayed_to_postfix_with_smtputf8(mail_tmp_path, postfix_factory):
    """A UTF-8 envelope sender, kept while Postfix is down, reaches it on replay: Postfix refuses a
    UTF-8 address without SMTPUTF8 (553 5.6.7), so its delivery proves MAIL FROM carried it."""
    sender = "j\u00f6s\u00e9@sender.test"
    primary = postfix_factory(Postfix.primary(mail_tmp_path / "primary", mailboxes=[ALICE]))
    cfg = relay_config(mail_tmp_path / "relay", primary.port, [ALICE])
    with rp.RelayProcess(cfg) as relay:
        explain = explainer(relay, primary)
        with smtplib.SMTP(*relay.address, timeout=30) as client:
            client.ehlo("sender.test")
            assert client.mail(sender, ["SMTPUTF8", "BODY=8BITMIME"])[0] == 250
            assert client.rcpt(ALICE)[0] == 250
            assert client.data(message(7, sender=sender))[0] == 250
        assert len(kept(relay, ALICE)) == 1, explain()
        primary.start()
        wait_for(lambda: len(primary.delivered(ALICE)) == 1 and not entries(relay, "waiting")
                    and not entries(relay, "active"), WAIT, "replayed to Postfix", explain)
    (got,) = primary.delivered(ALICE)
    assert got.startswith(f"Return-Path: <{sender}>\n".encode()), got[:80]
    assert got.endswith(lf(message(7, sender=sender)))
    assert not entries(relay, "failed")


# --------------------------------------------------------------------------- Postfix in front


def test_postfix_sender_8bitmime_passes_through_intact(mail_tmp_path, postfix_factory, recorder):
    """Postfix (smtp_tls_security_level = may) relays two 8-bit messages, one taken over SMTP
    with BODY=8BITMIME, one from `sendmail -B 8BITMIME`; the relay passes both to the primary
    with BODY=8BITMIME and the bytes as sent, below one Received header from each hop."""
    primary_port, primary = recorder()
    cfg = relay_config(mail_tmp_path / "relay", primary_port, [ALICE])
    with rp.RelayProcess(cfg) as relay:
        mta = postfix_factory(Postfix.sender(mail_tmp_path / "sender", relay_port=relay.port,
                                             tls_level="may")).start()
        explain = explainer(relay, mta)
        sent = {3: message(3), 9: message(9)}
        with smtplib.SMTP("127.0.0.1", mta.port, timeout=15) as client:
            client.ehlo("client.test")
            client.sendmail(SENDER, [ALICE], sent[3], mail_options=["BODY=8BITMIME"])
        mta.sendmail(SENDER, [ALICE], sent[9], "-B", "8BITMIME")
        mta.wait_queue_empty(WAIT, explain)
        wait_for(lambda: len(primary.got) == 2, WAIT, "both messages at the primary", explain)
        log = mta.log_text()

    by_id = {int(g.content.split(b"Message-ID: <interop-")[1].split(b"@")[0]): g for g in primary.got}
    assert sorted(by_id) == [3, 9], primary.got
    for n, got in by_id.items():
        assert (got.mail_from, got.rcpt_tos) == (SENDER, [ALICE])
        assert "BODY=8BITMIME" in [o.upper() for o in got.mail_options], got.mail_options
        # The relay's Received header, then Postfix's, then the bytes as sent.
        assert strip_trace(got.content) == ([b"received", b"received"], sent[n]), got.content
    assert log.count(f"relay=127.0.0.1[127.0.0.1]:{relay.port}") == 2, log
    assert log.count("status=sent") == 2, log


def test_postfix_sender_smtputf8(mail_tmp_path, postfix_factory, recorder):
    sender, rcpt = "j\u00f6s\u00e9@example.org", f"zo\u00eb@{rp.DOMAIN}"
    primary_port, primary = recorder()
    cfg = relay_config(mail_tmp_path / "relay", primary_port, [ALICE])
    with rp.RelayProcess(cfg) as relay:
        mta = postfix_factory(Postfix.sender(mail_tmp_path / "sender", relay_port=relay.port)).start()
        explain = explainer(relay, mta)
        sent = message(4, to=rcpt, sender=sender)
        with smtplib.SMTP("127.0.0.1", mta.port, timeout=15) as client:
            client.ehlo("client.test")
            client.sendmail(sender, [rcpt], sent, mail_options=["SMTPUTF8", "BODY=8BITMIME"])
        mta.wait_queue_empty(WAIT, explain)
        wait_for(lambda: primary.got, WAIT, "the message at the primary", explain)

    (got,) = primary.got
    assert (got.mail_from, got.rcpt_tos) == (sender, [rcpt])
    assert "SMTPUTF8" in [o.upper() for o in got.mail_options], got.mail_options
    assert strip_trace(got.content) == ([b"received", b"received"], sent), got.content


# --------------------------------------------------------------------------- replay details


def test_busy_mailbox_does_not_stop_the_others(mail_tmp_path, postfix_factory):
    """450 for one mailbox (Postfix check_recipient_access) during replay: the others are
    replayed, the busy one waits. Oldest first with one worker: busy's message comes first."""
    primary = postfix_factory(Postfix.primary(mail_tmp_path / "primary",
                                              mailboxes=[ALICE, CAROL, BUSY], busy=[BUSY]))
    cfg = relay_config(mail_tmp_path / "relay", primary.port, [ALICE, CAROL, BUSY],
                       replay={"concurrency": 1})
    with rp.RelayProcess(cfg) as relay:
        explain = explainer(relay, primary)
        for n, rcpt in ((5, BUSY), (6, ALICE), (7, CAROL)):
            _, reply = send(relay.port, SENDER, [rcpt], wire(message(n, to=rcpt)))
            assert reply is not None and reply[0] == 250, reply
        assert [e["rcpt"] for e in entries(relay, "waiting").values()] == [BUSY, ALICE, CAROL]

        primary.start()
        wait_for(lambda: primary.delivered(ALICE) and primary.delivered(CAROL), WAIT,
                    "alice's and carol's messages replayed past the busy mailbox", explain)
        wait_for(lambda: "4.2.1" in " ".join(e.get("note") or "" for e in
                                                 entries(relay, "waiting").values()),
                    WAIT, "busy's entry back in waiting with Postfix's 450", explain)
        waiting = list(entries(relay, "waiting").values())
        assert [e["rcpt"] for e in waiting] == [BUSY], explain()
        assert not primary.delivered(BUSY)
        assert "mailbox busy" in primary.log_text()


def test_bare_lf_message_reaches_postfix_that_rejects_bare_lf(mail_tmp_path, postfix_factory):
    primary = postfix_factory(Postfix.primary(mail_tmp_path / "primary", mailboxes=[ALICE],
                                              forbid_bare_newline="reject"))
    cfg = relay_config(mail_tmp_path / "relay", primary.port, [ALICE])
    body = (b"From: <bob@sender.test>\nTo: <alice@example.com>\nSubject: bare LF\n"
            b"Message-ID: <bare-lf@sender.test>\n\nline one\nline two\r\n")
    data = [b"EHLO sender.test\r\n", f"MAIL FROM:<{SENDER}>\r\n".encode(),
            f"RCPT TO:<{ALICE}>\r\n".encode(), b"DATA\r\n", body + b".\r\n"]
    with rp.RelayProcess(cfg) as relay:
        explain = explainer(relay, primary)
        replies = raw_session(relay.port, data)
        assert replies[-1].startswith(b"250 "), replies
        (copy,) = kept(relay, ALICE)
        crlf = body.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        assert copy.endswith(crlf), copy       # each bare LF made CRLF as the data arrived

        primary.start()
        wait_for(lambda: primary.delivered(ALICE) and not entries(relay, "waiting")
                    and not entries(relay, "active"), WAIT, "the bare-LF message replayed", explain)
        (got,) = primary.delivered(ALICE)
        assert got.endswith(lf(body)), got

        # Sent as it came, Postfix would have refused it: the relay made every bare LF CRLF.
        direct = raw_session(primary.port, data)
        assert direct[-1].startswith(b"550 5.5.2") and b"bare <LF>" in direct[-1], direct


# --------------------------------------------------------------------------- swaks


def swaks(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SWAKS, "--ehlo", "client.test", "--timeout", "15", *args],
                          capture_output=True, text=True, timeout=timeout, check=False)


def refused(run: subprocess.CompletedProcess[str], code: int) -> bool:
    """swaks failed on a `code` reply (its transcript marks error replies `<** `, or `<~* `
    inside TLS)."""
    return run.returncode != 0 and re.search(rf"^<[-~]\* {code} ", run.stdout, re.M) is not None


def test_swaks_pipelined_session(mail_tmp_path, postfix_factory):
    """Inbound advertises PIPELINING and a pipelined session (MAIL, both RCPTs and DATA in
    one go) delivers to both recipients through a real Postfix primary."""
    primary = postfix_factory(Postfix.primary(mail_tmp_path / "primary", mailboxes=[ALICE, CAROL]))
    primary.start()
    cfg = relay_config(mail_tmp_path / "relay", primary.port, [ALICE, CAROL])
    with rp.RelayProcess(cfg) as relay:
        explain = explainer(relay, primary)
        run = swaks("--server", f"127.0.0.1:{relay.port}", "--pipeline", "--from", SENDER,
                    "--to", f"{ALICE},{CAROL}", "--header", "Subject: swaks pipelined")
        assert run.returncode == 0, run.stdout + run.stderr + explain()
        assert "<-  250-PIPELINING" in run.stdout or "<-  250 PIPELINING" in run.stdout, run.stdout
        # Without PIPELINING swaks waits for each reply: here the commands went out together.
        batch = (f" -> MAIL FROM:<{SENDER}>\n -> RCPT TO:<{ALICE}>\n -> RCPT TO:<{CAROL}>\n"
                 " -> DATA\n<-  250 ")
        assert batch in run.stdout, run.stdout
        wait_for(lambda: primary.delivered(ALICE) and primary.delivered(CAROL), WAIT,
                    "the pipelined message at both Postfix mailboxes", explain)
    for rcpt in (ALICE, CAROL):
        (got,) = primary.delivered(rcpt)
        assert b"\nSubject: swaks pipelined\n" in got, got


# --------------------------------------------------------------------------- inbound STARTTLS, AUTH


@pytest.fixture
def relay_tls(mail_tmp_path):
    """A trustme CA and a certificate for the relay (relay.localhost, 127.0.0.1) as files:
    (ca_file, {"cert": ..., "key": ...})."""
    import trustme

    ca = trustme.CA()
    folder = mail_tmp_path / "tls"
    folder.mkdir()
    cert = ca.issue_cert(rp.HOSTNAME, "127.0.0.1")
    ca.cert_pem.write_to_path(str(folder / "ca.pem"))
    cert.cert_chain_pems[0].write_to_path(str(folder / "relay.pem"))
    cert.private_key_pem.write_to_path(str(folder / "relay.key"))
    return folder / "ca.pem", {"cert": str(folder / "relay.pem"), "key": str(folder / "relay.key")}


def test_postfix_sender_requiring_tls_delivers(mail_tmp_path, postfix_factory, recorder, relay_tls):
    """`tls: {cert, key}` offers STARTTLS on inbound; Postfix with smtp_tls_security_level =
    encrypt (never without TLS) delivers through it. Waits for inbound STARTTLS."""
    ca_file, tls = relay_tls
    primary_port, primary = recorder()
    cfg = relay_config(mail_tmp_path / "relay", primary_port, [ALICE], extra={"tls": tls})
    with rp.RelayProcess(cfg) as relay:
        mta = postfix_factory(Postfix.sender(mail_tmp_path / "sender", relay_port=relay.port,
                                             tls_level="encrypt", ca_file=ca_file)).start()
        explain = explainer(relay, mta)
        sent = message(8)
        mta.sendmail(SENDER, [ALICE], sent, "-B", "8BITMIME")
        wait_for(lambda: primary.got or "status=deferred" in mta.log_text(), WAIT,
                    "the message at the primary, or Postfix deferring it", explain)
        assert primary.got, f"Postfix deferred the message:\n{explain()}"
        log = mta.log_text()

    (got,) = primary.got
    assert "TLS connection established to 127.0.0.1" in log, log
    assert "Trusted TLS connection" in log, log   # the relay's chain verifies with ca_file
    first = got.content.split(b"\r\n\tby ", 1)[1].split(b";", 1)[0]
    assert b"with ESMTPS" in first, got.content   # the relay's Received: over TLS
    assert got.content.endswith(sent)


def test_swaks_auth_on_port_25_after_starttls(mail_tmp_path, recorder, relay_tls):
    """On inbound: AUTH only after STARTTLS, with the submission users and passwords; an
    authenticated session may send to other domains (through outbound.smarthost) as its own
    address only. Waits for inbound STARTTLS and AUTH."""
    _, tls = relay_tls
    primary_port, _ = recorder()
    smarthost_port, smarthost = recorder()
    password = "alice-port25-pw"
    cfg = relay_config(mail_tmp_path / "relay", primary_port, [], extra={
        "tls": tls,
        "outbound": {"smarthost": {"address": f"127.0.0.1:{smarthost_port}", "starttls": "off",
                                   "connect_timeout": "2s", "timeout": "5s"}}})
    added = rp.run_cli(cfg, "users", "add", ALICE, "--password-stdin", stdin=password + "\n")
    assert added.returncode == 0, added.stdout + added.stderr
    outside = "friend@elsewhere.test"
    with rp.RelayProcess(cfg) as relay:
        explain = explainer(relay)
        at = ("--server", f"127.0.0.1:{relay.port}")
        plain = swaks(*at, "--quit-after", "EHLO")
        assert plain.returncode == 0 and "STARTTLS" in plain.stdout, plain.stdout
        assert "AUTH" not in plain.stdout, plain.stdout   # never before TLS

        auth = ("--tls", "--auth", "PLAIN", "--auth-user", ALICE, "--auth-password", password)
        wrong = swaks(*at, "--tls", "--auth", "PLAIN", "--auth-user", ALICE, "--auth-password",
                      "not-it", "--from", ALICE, "--to", outside)
        assert refused(wrong, 535), wrong.stdout
        not_own = swaks(*at, *auth, "--from", CAROL, "--to", outside)
        assert refused(not_own, 553), not_own.stdout
        anonymous = swaks(*at, "--tls", "--from", ALICE, "--to", outside)
        assert refused(anonymous, 550), anonymous.stdout

        run = swaks(*at, *auth, "--from", ALICE, "--to", outside,
                    "--header", "Subject: sent on port 25")
        assert run.returncode == 0, run.stdout + run.stderr + explain()
        wait_for(lambda: smarthost.got, WAIT, "the message at the smarthost", explain)
        assert password not in relay.log_text()

    (got,) = smarthost.got
    assert (got.mail_from, got.rcpt_tos) == (ALICE, [outside])
    assert b"Subject: sent on port 25" in got.content
