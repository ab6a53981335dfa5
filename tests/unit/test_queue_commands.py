"""`continuity-relay queue ...` against a real spool with entries in every state (issue 10,
point 2): list (text and --json), show, hold, release, retry, delete. No sockets here; flush,
which talks to a primary, is in tests/smtp/test_queue_flush.py."""

from __future__ import annotations

import io
import json
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import pytest

from relay.addresses import parse_mailbox
from relay.app import build_store
from relay.cli import main
from relay.config import load
from relay.storage.queue import Envelope

MESSAGE = b"From: s@sender.test\r\nSubject: queued\r\n\r\nthe body stays private\r\n"


@pytest.fixture
def spool(tmp_path: Path):
    (tmp_path / "config.yaml").write_text(textwrap.dedent("""\
        listen: {inbound: "127.0.0.1:2525"}
        storage: {maildirs: maildirs, spool: spool}
        domains:
          example.com: {primary: "127.0.0.1:2526"}
          example.org: {primary: "127.0.0.1:2527"}
        """))
    config = load(tmp_path / "config.yaml")
    store = build_store(config)
    replay = store.replay_queue("example.com")
    ids = {}
    now = time.time()
    ids["kept"] = store.keep(parse_mailbox("alice@example.com"), "s@sender.test", MESSAGE)
    for state in ("deferred", "failed", "hold", "active"):
        entry = replay.enqueue_bytes(MESSAGE, Envelope("s@sender.test", "bob@example.com", now))
        envelope = replay.envelope(entry)
        if state == "deferred":     # as the runner leaves it: active -> waiting, tried
            replay.claim(entry)
            replay.move(entry, "active", "waiting", replace(
                envelope, attempts=2, note="452 4.2.2 full", extra={"next_try": now + 3600}))
        elif state == "active":
            replay.claim(entry)
        else:
            replay.move(entry, "waiting", state, replace(envelope, attempts=1, note="550 5.1.1 no"))
        ids[state] = entry
    ids["outbound"] = store.outbound.enqueue_bytes(MESSAGE, Envelope("alice@example.com", "x@else.test", now))
    return tmp_path / "config.yaml", ids, store


def run(cfg: Path, *args: str, stdin: str = "") -> tuple[int, str, str]:
    import contextlib

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        import sys
        old, sys.stdin = sys.stdin, io.StringIO(stdin)
        try:
            code = main(["queue", *args, "-c", str(cfg)])
        finally:
            sys.stdin = old
    return code, out.getvalue(), err.getvalue()


def test_list_shows_every_entry_with_its_state_and_never_a_body(spool):
    cfg, ids, _ = spool
    code, out, _ = run(cfg, "list")
    assert code == 0 and "6 entries" in out and "the body stays private" not in out
    code, out, _ = run(cfg, "list", "--json")
    rows = {row["id"]: row for row in map(json.loads, out.splitlines())}
    assert {rows[ids[s]]["state"] for s in ("deferred", "failed", "hold", "active")} == {
        "deferred", "failed", "hold", "active"}
    assert rows[ids["kept"]]["state"] == "waiting" and rows[ids["kept"]]["recipient"] == "alice@example.com"
    # an outbound entry belongs to its sender's domain: a domain's selection shows its users' mail
    assert rows[ids["outbound"]]["queue"] == "outbound" and rows[ids["outbound"]]["domain"] == "example.com"
    assert rows[ids["deferred"]]["last_error"] == "452 4.2.2 full" and rows[ids["deferred"]]["attempts"] == 2
    assert rows[ids["kept"]]["size"] == len(MESSAGE)       # the message, not our Maildir headers
    assert set(rows[ids["kept"]]) == {"id", "queue", "domain", "state", "sender", "recipient", "size",
                                      "age", "attempts", "last_error"}


@pytest.mark.parametrize("option, expected", [
    (["--state", "failed"], {"failed"}), (["--queue", "outbound"], {"outbound"}),
    (["--domain", "example.org"], set()), (["--state", "deferred"], {"deferred"}),
    (["--domain", "example.com", "--queue", "outbound"], {"outbound"}),
    (["--domain", "example.com"], {"kept", "deferred", "failed", "hold", "active", "outbound"}),
])
def test_list_filters(spool, option, expected):
    cfg, ids, _ = spool
    code, out, _ = run(cfg, "list", "--json", *option)
    names = {k for k, v in ids.items() if v in {json.loads(line)["id"] for line in out.splitlines()}}
    assert code == 0 and names == expected


def test_show_prints_the_envelope_and_headers_but_the_body_only_when_asked(spool):
    cfg, ids, _ = spool
    code, out, _ = run(cfg, "show", ids["failed"])
    assert code == 0 and "state: failed" in out and "note: 550 5.1.1 no" in out
    assert "Subject: queued" in out and "the body stays private" not in out
    assert "the body stays private" in run(cfg, "show", ids["failed"], "--body")[1]
    assert run(cfg, "show", "nonesuch")[0] == 1


def test_hold_release_retry_move_entries_between_states(spool):
    cfg, ids, store = spool
    replay = store.replay_queue("example.com")
    assert run(cfg, "hold", ids["kept"])[0] == 0 and replay.state_of(ids["kept"]) == "hold"
    assert run(cfg, "release", ids["kept"], ids["hold"])[0] == 0
    assert replay.state_of(ids["kept"]) == replay.state_of(ids["hold"]) == "waiting"
    assert replay.envelope(ids["hold"]).crashes == 0
    assert run(cfg, "retry", ids["failed"], ids["deferred"])[0] == 0
    assert replay.state_of(ids["failed"]) == "waiting"
    assert "next_try" not in replay.envelope(ids["deferred"]).extra      # due now
    code, _, err = run(cfg, "hold", ids["active"])                     # a runner has it
    assert code == 1 and "it is active" in err and replay.state_of(ids["active"]) == "active"


def test_hold_and_release_a_whole_domain(spool):
    cfg, ids, store = spool
    replay = store.replay_queue("example.com")
    assert run(cfg, "hold", "--domain", "example.com")[0] == 1   # the failed... and hold ones refuse
    assert {replay.state_of(ids[s]) for s in ("kept", "deferred", "failed", "hold")} == {"hold"}
    assert replay.state_of(ids["active"]) == "active"
    assert run(cfg, "release", "--domain", "example.com")[0] == 0
    assert {replay.state_of(ids[s]) for s in ("kept", "deferred", "failed", "hold")} == {"waiting"}


def test_delete_asks_and_never_touches_the_maildir_copy(spool):
    cfg, ids, store = spool
    replay = store.replay_queue("example.com")
    assert run(cfg, "delete", ids["kept"], stdin="n\n")[0] == 1 and replay.state_of(ids["kept"])
    code, out, _ = run(cfg, "delete", ids["kept"], stdin="y\n")
    assert code == 0 and replay.state_of(ids["kept"]) is None
    assert not (replay.root / "msg" / ids["kept"]).exists()
    inbox = store.maildirs.root / "example.com" / "alice" / "new"
    (copy,) = list(inbox.iterdir())
    assert copy.read_bytes().endswith(MESSAGE)                          # the user's copy stays
    assert run(cfg, "delete", "--yes", ids["outbound"])[0] == 0
    assert run(cfg, "delete", "--yes", ids["active"])[0] == 1            # being delivered
    assert run(cfg, "delete", "--yes", "../etc")[0] == 1
