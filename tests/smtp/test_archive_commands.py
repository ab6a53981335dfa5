"""`archive release` in both health states and again, `archive hold`, `archive verify` (issue
11, points 3, 4 and 7), against a running relay, its archive and a fake primary."""

from __future__ import annotations

import email

import pytest

from relay.cli import main
from relay.storage.archive import Archive
from relay.storage.state import read_state
from tests.helpers import wait_for
from tests.smtp.fakes import FakePrimary, send, stored_files

pytestmark = pytest.mark.timeout(60)

MESSAGE = b"From: s@sender.test\r\nTo: alice@example.com\r\nSubject: to release\r\n\r\nbody\r\n"


def cli(relay, *args: str) -> int:
    return main(["archive", *args, "-c", str(relay.config.file)])


@pytest.fixture
def archiving(make_relay):
    """make(**options) -> (a fake primary taking mail, a relay archiving, its Archive)."""
    primaries = []

    def make(**options):
        primary = FakePrimary().start()
        primaries.append(primary)
        relay = make_relay(primary.port, storage="archive: archive", **options)
        return primary, relay, Archive(relay.config.storage.archive)

    yield make
    for primary in primaries:
        primary.stop()


def test_release_goes_to_the_primary_when_healthy_and_to_the_mailbox_in_an_outage(archiving, capsys):
    primary, relay, archive = archiving(extra="replay: {probe_interval: 1s}\n")
    assert send(relay.port, "s@sender.test", ["alice@example.com"], MESSAGE)[1][0] == 250
    (record,) = wait_for(lambda: list(archive.records()), 10, "the message archived")
    assert len(primary.received) == 1 and stored_files(relay.config.storage.maildirs) == []
    # healthy: through the replay queue to the primary, with the release on top
    assert cli(relay, "release", record.id) == 0
    assert "released to alice@example.com, primary" in capsys.readouterr().out
    wait_for(lambda: len(primary.received) == 2, 15, "the released copy at the primary")
    released = email.message_from_bytes(primary.received[1].content)
    assert released["X-Continuity-Released"].startswith(f"{record.id} by ")
    assert primary.received[1].content.endswith(archive.read(record))
    # an outage: into alice's continuity mailbox (and queued for the primary), again and again
    primary.script.mail = "451 4.3.0 down"
    assert send(relay.port, "s@sender.test", ["bob@example.com"], MESSAGE)[1][0] == 250
    spool = relay.config.storage.spool
    wait_for(lambda: read_state(spool / "state", "example.com").state == "outage", 10, "outage")
    for times in (1, 2):
        assert cli(relay, "release", record.id) == 0
        assert "continuity mailbox" in capsys.readouterr().out
        alice = stored_files(relay.config.storage.maildirs / "example.com" / "alice")
        assert len(alice) == times and alice[-1].read_bytes().endswith(archive.read(record))
    audit = relay.config.audit_log.read_text().splitlines()
    assert len([line for line in audit if "action=archive_release" in line]) == 3
    assert cli(relay, "release", "20200101.1") == 1                   # no such message
    # bob's kept message is the second record; the releases are not archived again
    wait_for(lambda: len(list(archive.records())) == 2, 10, "bob's message archived")
    assert [r.rcpts for r in archive.records()] == [("alice@example.com",), ("bob@example.com",)]


def test_hold_add_list_remove_and_verify_catches_a_changed_byte(archiving, capsys):
    primary, relay, archive = archiving()
    assert cli(relay, "hold", "add", "alice@example.com", "@Example.org") == 0
    capsys.readouterr()
    assert cli(relay, "hold", "list") == 0
    assert capsys.readouterr().out.split() == ["@example.org", "alice@example.com"]
    assert cli(relay, "hold", "remove", "@example.org") == 0
    assert archive.holds() == ["alice@example.com"]
    assert cli(relay, "hold", "add", "@nodot") == 2
    assert send(relay.port, "s@sender.test", ["alice@example.com"], MESSAGE)[1][0] == 250
    (record,) = wait_for(lambda: list(archive.records()), 10, "the message archived")
    assert cli(relay, "verify") == 0
    path = archive.object_path(record)
    path.write_bytes(path.read_bytes().replace(b"body", b"BODY"))
    capsys.readouterr()
    assert cli(relay, "verify") == 1
    assert f"{record.id}: its message bytes changed" in capsys.readouterr().out


def test_search_finds_by_user_including_a_bcc_recipient_and_reindex_answers_the_same(archiving, capsys):
    import json

    primary, relay, archive = archiving()
    for n, (rcpts, subject) in enumerate([(["alice@example.com"], "quarterly report"),
                                          (["alice@example.com", "bob@example.com"], "secret plan"),
                                          (["bob@example.com"], "lunch")]):
        body = (f"From: Carol <carol@sender.test>\r\nTo: alice@example.com\r\nSubject: {subject}\r\n"
                f"\r\nmessage {n} about the zeppelin\r\n").encode()      # bob: only Bcc in 1
        assert send(relay.port, "carol@sender.test", rcpts, body)[1][0] == 250
    wait_for(lambda: len(list(archive.records())) == 3, 10, "three messages archived")

    def search(*args: str) -> list[dict]:
        capsys.readouterr()
        assert cli(relay, "search", "--json", *args) == 0
        return [json.loads(line) for line in capsys.readouterr().out.splitlines()]

    found = wait_for(lambda: search("--user", "bob@example.com"), 10, "bob's mail indexed")
    assert [h["subject"] for h in found] == ["lunch", "secret plan"]          # newest first
    assert set(found[1]) >= {"id", "date", "direction", "from", "to", "subject"}
    assert found[1]["to"] == ["alice@example.com", "bob@example.com"] and found[1]["from"] == \
        "carol@sender.test"
    assert [h["subject"] for h in search("zeppelin", "--subject", "plan")] == ["secret plan"]
    assert len(search("zeppelin")) == 3 and search("--direction", "out") == []
    before = [search("--user", "alice@example.com"), search("report")]
    assert cli(relay, "reindex") == 0
    assert [search("--user", "alice@example.com"), search("report")] == before


def test_export_takes_the_search_query_and_reads_back_byte_for_byte(archiving, tmp_path):
    import mailbox

    primary, relay, archive = archiving()
    for n, rcpt in enumerate(["alice@example.com", "bob@example.com", "alice@example.com"]):
        body = f"From: c@sender.test\r\nTo: {rcpt}\r\nSubject: n{n}\r\n\r\nbody {n}\r\n".encode()
        assert send(relay.port, "c@sender.test", [rcpt], body)[1][0] == 250
    wait_for(lambda: cli(relay, "search", "--user", "alice@example.com") == 0 and
             len(list(archive.records())) == 3, 10, "three messages archived")
    out = tmp_path / "alice.mbox"

    def exported() -> int:
        assert cli(relay, "export", "--user", "alice@example.com", "-o", str(out)) == 0
        return out.read_bytes().count(b"\nFrom c@sender.test ") + out.read_bytes().startswith(b"From ")

    wait_for(lambda: exported() == 2, 10, "alice's two messages exported (indexed)")
    box = mailbox.mbox(out)
    try:
        wanted = [archive.read(r) for r in archive.records() if "alice@example.com" in r.rcpts]
        assert [box.get_bytes(k) for k in box.keys()] == wanted          # oldest first
    finally:
        box.close()
    assert not list(tmp_path.glob(".*.part"))
