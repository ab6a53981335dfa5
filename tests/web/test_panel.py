"""The control panel: allocate passwords, activate and deactivate, add and import users, see each
domain's subscription, health and replay queue; every change in the passwd-file at once (in
Dovecot's format) and in the audit log, never with a password."""

from __future__ import annotations

import json
import re
import time

import pytest

from relay.addresses import parse_mailbox
from relay.directory import DEACTIVATED, parse_line, verify_password
from relay.storage.continuity import replay_queue_path
from relay.storage.queue import Envelope, Queue
from tests.web.helpers import ADMIN

pytestmark = pytest.mark.timeout(60)

ALICE = "/panel/domains/example.com/users/alice"
AUDIT = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ admin=(\S+) action=(\S+)(.*)$")


def line_of(server, email: str) -> str:
    text = server.config.users_file.read_text()
    lines = [line for line in text.splitlines() if line.startswith(email + ":")]
    assert len(lines) == 1
    return lines[0]


def audit(server) -> list[tuple[str, str, str]]:
    """(admin, action, the rest) per admin line of the audit log."""
    return [m.groups() for line in server.audit_lines() if (m := AUDIT.match(line))]


def no_password_in_audit(server, *passwords: str) -> None:
    text = server.config.audit_log.read_text()
    for password in passwords:
        assert password not in text


# -- one user --------------------------------------------------------------------------------------

def test_allocating_a_password_rewrites_the_passwd_file_line_at_once(server, admin):
    admin.get(ALICE)
    reply = admin.post(ALICE, {"password": "brand new pass", "repeat": "brand new pass", "state": "active"})
    assert (reply.status, reply.location) == (303, ALICE + "?done=saved")
    line = line_of(server, "alice@example.com")
    fields = line.split(":")
    assert len(fields) == 8 and fields[0] == "alice@example.com" and fields[4] == "Alice"
    assert fields[1].startswith("{BLF-CRYPT}$2b$12$")
    assert fields[2:4] == ["", ""] and fields[5:] == ["", "", ""]
    assert verify_password(parse_line(line).password_hash, "brand new pass")
    assert "Saved." in admin.get(reply.location).text
    assert audit(server)[-1] == (ADMIN, "set_password", " user=alice@example.com")
    no_password_in_audit(server, "brand new pass")
    # and the new password logs in at once
    from tests.web.helpers import Client
    assert Client(server.port).login_user("alice@example.com", "brand new pass").status == 303


def test_two_different_passwords_are_refused_and_nothing_changes(server, admin):
    before = server.config.users_file.read_bytes()
    admin.get(ALICE)
    reply = admin.post(ALICE, {"password": "brand new pass", "repeat": "brand new pasS", "state": "inactive"})
    assert reply.status == 400
    assert "The two new passwords differ" in reply.text
    reply = admin.post(ALICE, {"password": "short", "repeat": "short", "state": "active"})
    assert reply.status == 400 and "at least 8 characters" in reply.text
    assert server.config.users_file.read_bytes() == before
    assert audit(server) == [(ADMIN, "login", " peer=127.0.0.1")]


def test_deactivate_and_activate(server, admin):
    admin.get(ALICE)
    hash_before = parse_line(line_of(server, "alice@example.com")).password_hash
    assert admin.post(ALICE, {"password": "", "repeat": "", "state": "inactive"}).status == 303
    line = line_of(server, "alice@example.com")
    assert line.endswith(":::" + DEACTIVATED)
    assert parse_line(line).password_hash == hash_before and not parse_line(line).active
    assert "inactive: cannot log in" in admin.get(ALICE).text
    assert admin.post(ALICE, {"state": "active"}).status == 303
    line = line_of(server, "alice@example.com")
    assert line.endswith(":::") and parse_line(line).active
    assert [a[1:] for a in audit(server)[-2:]] == [("deactivate", " user=alice@example.com"),
                                                  ("activate", " user=alice@example.com")]
    # saving the same state again changes and records nothing
    assert admin.post(ALICE, {"state": "active"}).location == ALICE + "?done=unchanged"
    assert len(audit(server)) == 3


def test_generated_password_is_shown_once_and_works(server, admin):
    admin.get("/panel/domains/example.com/users/carol")
    reply = admin.post("/panel/domains/example.com/users/carol/generate")
    assert reply.status == 200
    password = re.search(r"<code>([^<]+)</code>", reply.body).group(1)
    assert re.fullmatch(r"[A-Za-z0-9]{4}(-[A-Za-z0-9]{4}){3}", password)
    assert verify_password(parse_line(line_of(server, "carol@example.com")).password_hash, password)
    assert reply.header("Cache-Control") == "no-store"
    assert password not in admin.get("/panel/domains/example.com/users/carol").body
    assert audit(server)[-1] == (ADMIN, "set_password", " user=carol@example.com generated=yes")
    no_password_in_audit(server, password)


def test_a_user_changed_by_an_admin_loses_their_sessions(server, admin):
    from tests.web.helpers import Client
    alice = Client(server.port)
    alice.login_user()
    assert alice.get("/account").status == 200
    admin.get(ALICE)
    admin.post(ALICE, {"password": "brand new pass", "repeat": "brand new pass", "state": "active"})
    assert alice.get("/account").location == "/login"


# -- adding and importing --------------------------------------------------------------------------

def test_add_a_user(server, admin):
    admin.get("/panel/domains/example.com/add")
    reply = admin.post("/panel/domains/example.com/add",
                       {"email": "Dave", "name": "Dave Jones", "password": "dave pass 1",
                        "repeat": "dave pass 1", "state": "active"})
    assert (reply.status, reply.location) == (303, "/panel/domains/example.com/users/dave?done=added")
    user = parse_line(line_of(server, "dave@example.com"))
    assert user.name == "Dave Jones" and user.active and verify_password(user.password_hash, "dave pass 1")
    assert audit(server)[-1] == (ADMIN, "add_user", " user=dave@example.com can_log_in=yes")
    no_password_in_audit(server, "dave pass 1")


def test_add_an_inactive_user_without_password_by_full_address(server, admin):
    admin.get("/panel/domains/example.org/add")
    reply = admin.post("/panel/domains/example.org/add", {"email": "erin@example.org", "state": "inactive"})
    assert reply.status == 303
    user = parse_line(line_of(server, "erin@example.org"))
    assert not user.active and not user.password_hash
    assert [a[1] for a in audit(server)[-2:]] == ["add_user", "deactivate"]


@pytest.mark.parametrize("fields, message", [
    ({"email": "alice", "name": "Another"}, "already registered"),
    ({"email": "x@example.org", "name": "Wrong domain"}, "must be in example.com"),
    ({"email": "../etc", "name": "Bad"}, "Not a usable address"),
    ({"email": "", "name": "Nobody"}, "Give the user"),
    ({"email": "frank", "name": "Frank", "password": "frank pass 1", "repeat": "frank pass 2"}, "differ"),
])
def test_adding_refused_with_a_reason_and_what_was_typed_kept(server, admin, fields, message):
    before = server.config.users_file.read_bytes()
    admin.get("/panel/domains/example.com/add")
    reply = admin.post("/panel/domains/example.com/add", fields)
    assert reply.status == 400
    assert message in reply.text
    assert f'value="{fields["name"]}"' in reply.body
    assert server.config.users_file.read_bytes() == before


def test_import_csv_reports_bad_lines_by_number_and_imports_the_good_ones(server, admin):
    csv = (b"email,name,password\n"
           b"gina@example.com,Gina,gina pass 1\n"
           b"not an address,Bad,\n"
           b"hank@example.org,Hank,\n"
           b"ivan@elsewhere.net,Ivan,\n"
           b"alice@example.com,Alice again,\n")
    admin.get("/panel/import")
    reply = admin.upload("/panel/import", {}, "file", "people.csv", csv)
    assert reply.status == 200
    assert "Imported 2 users, refused 3 lines" in reply.text
    refused = re.findall(r'<tr class="refused"><td class="num">(\d+)</td><td>([^<]*)</td>', reply.body)
    assert [int(n) for n, _ in refused] == [3, 5, 6]
    assert "not configured" in refused[1][1] and "already registered" in refused[2][1]
    assert "/tmp" not in reply.body and "upload.csv" not in reply.body
    assert verify_password(parse_line(line_of(server, "gina@example.com")).password_hash, "gina pass 1")
    assert parse_line(line_of(server, "hank@example.org")).password_hash == ""
    assert audit(server)[-3:] == [
        (ADMIN, "import", " file=people.csv added=2 refused=3"),
        (ADMIN, "add_user", " user=gina@example.com source=import"),
        (ADMIN, "add_user", " user=hank@example.org source=import")]
    no_password_in_audit(server, "gina pass 1")


def test_import_without_a_file_or_without_an_email_column(server, admin):
    before = server.config.users_file.read_bytes()
    admin.get("/panel/import")
    reply = admin.upload("/panel/import", {}, "file", "", b"")
    assert reply.status == 400 and "Choose a CSV file" in reply.text
    reply = admin.upload("/panel/import", {}, "file", "x.csv", b"name\nA\n")
    assert reply.status == 400
    assert "Nothing was imported: line 1: the header row must name an 'email' column" in reply.text
    assert server.config.users_file.read_bytes() == before


# -- domains ---------------------------------------------------------------------------------------

def test_domain_page_shows_subscription_health_and_replay_queue(server, admin):
    spool = server.config.storage.spool
    since = time.time() - 3 * 3600
    (spool / "state").mkdir(parents=True)
    (spool / "state" / "example.com.json").write_text(
        json.dumps({"state": "outage", "since": since, "reason": "451 4.3.0 <try> later"}))
    queue = Queue(replay_queue_path(spool, "example.com"))
    envelope = Envelope("s@x.org", "alice@example.com", since)
    entries = [queue.enqueue_bytes(b"Subject: x\r\n\r\nx\r\n", envelope) for _ in range(4)]
    queue.move(entries[0], "waiting", "failed")
    queue.move(entries[1], "waiting", "hold")

    page = admin.get("/panel/domains/example.com")
    assert page.status == 200
    facts = {}
    for name in ("subscription", "health", "queue"):
        section = re.search(rf'<section class="card" id="{name}">(.*?)</section>', page.body, re.S).group(1)
        facts[name] = dict(re.findall(r"<dt>([^<]+)</dt><dd>(.*?)</dd>", section))
    today = "active" if "2026-01-01" <= time.strftime("%Y-%m-%d") <= "2027-12-31" else "not active"
    assert facts["subscription"] == {"Since": "2026-01-01", "Until": "2027-12-31", "Today": today}
    assert "outage" in facts["health"]["State"]
    assert facts["health"]["Since"] == time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(since))
    assert facts["health"]["Reason"] == "451 4.3.0 &lt;try&gt; later"
    assert re.fullmatch(r"\d+s", facts["queue"].pop("Oldest waiting"))     # since it was queued
    assert facts["queue"] == {"Waiting": "2", "Being replayed": "0", "Failed": "1", "Set aside": "1"}
    for email, password in [("alice@example.com", "set"), ("carol@example.com", "none")]:
        row = rf">{re.escape(email)}</a></td>\s*<td>[^<]*</td>\s*<td>active</td>\s*<td>{password}</td>"
        assert re.search(row, page.body)

    overview = admin.get("/panel").text
    assert "example.com active, until 2027-12-31 outage since" in overview
    assert "example.org no subscription normal 0 0" in overview
    other = admin.get("/panel/domains/example.org")
    assert "No subscription" in other.text and "No users registered" in other.text


def test_domain_page_reads_without_creating_anything(server, admin):
    admin.get("/panel/domains/example.org")
    assert not (server.config.storage.spool / "replay").exists()
    assert parse_mailbox("alice@example.com")


def test_re_activating_a_user_revives_no_cookie_from_before(server, admin, clock):
    """Security review 9.11: re-activating a user revived cookies stolen before the
    deactivation (the session's password fingerprint was the same again)."""
    from tests.web.helpers import Client

    alice = Client(server.port)
    assert alice.login_user().status == 303 and alice.get("/account").status == 200
    stolen = dict(alice.cookies)
    admin.get(ALICE)
    assert admin.post(ALICE, {"password": "", "repeat": "", "state": "inactive"}).status == 303
    assert admin.post(ALICE, {"state": "active"}).status == 303
    thief = Client(server.port)
    thief.cookies = stolen
    assert thief.get("/account").location == "/login"
    clock.now += 1
    fresh = Client(server.port)                       # alice herself logs in again, later
    assert fresh.login_user().status == 303 and fresh.get("/account").status == 200


# -- the replay queue page (issue 10, point 2) -----------------------------------------------------

def _queued(server, states=("waiting", "deferred", "failed", "hold")) -> dict[str, str]:
    from dataclasses import replace as changed

    queue = Queue(replay_queue_path(server.config.storage.spool, "example.com"))
    ids = {}
    for state in states:
        entry = queue.enqueue_bytes(b"Subject: q\r\n\r\nprivate body\r\n",
                                    Envelope("s@sender.test", "alice@example.com", time.time()))
        if state != "waiting":
            queue.claim(entry)
            envelope = changed(queue.envelope(entry, "active"), attempts=1, note="452 4.2.2 full")
            queue.move(entry, "active", "waiting" if state == "deferred" else state, envelope)
        ids[state] = entry
    return ids


def test_the_queue_page_lists_filters_and_never_shows_a_body(server, admin):
    ids = _queued(server)
    page = admin.get("/panel/domains/example.com/queue")
    assert page.status == 200 and all(entry in page.text for entry in ids.values())
    assert "private body" not in page.text and "4 entries" in page.text
    failed = admin.get("/panel/domains/example.com/queue?state=failed")
    assert ids["failed"] in failed.text and ids["waiting"] not in failed.text
    assert admin.get("/panel/domains/example.com/queue?state=bogus").status == 400
    assert admin.get("/panel/domains/nowhere.test/queue").status == 404
    assert 'href="/panel/domains/example.com/queue"' in admin.get("/panel/domains/example.com").body


def test_queue_actions_move_entries_are_audited_and_need_the_token(server, admin):
    ids = _queued(server)
    queue = Queue(replay_queue_path(server.config.storage.spool, "example.com"))
    base = "/panel/domains/example.com/queue"
    admin.get(base)
    assert admin.post(f"{base}/{ids['waiting']}/hold", csrf=False).status == 403
    assert queue.state_of(ids["waiting"]) == "waiting"
    reply = admin.post(f"{base}/{ids['waiting']}/hold")
    assert (reply.status, reply.location) == (303, f"{base}?done=hold")
    assert queue.state_of(ids["waiting"]) == "hold"
    admin.get(base)
    assert admin.post(f"{base}/{ids['failed']}/retry").status == 303
    assert queue.state_of(ids["failed"]) == "waiting"
    admin.get(base)
    assert admin.post(f"{base}/{ids['hold']}/delete").status == 400          # not confirmed
    assert queue.state_of(ids["hold"]) == "hold"
    admin.get(base)
    assert admin.post(f"{base}/{ids['hold']}/delete", {"confirm": "yes"}).status == 303
    assert queue.state_of(ids["hold"]) is None
    admin.get(base)
    assert admin.post(f"{base}/nonesuch/release").status == 409
    actions = [line for line in server.audit_lines() if "action=queue_" in line]
    assert [a.split("action=")[1].split()[0] for a in actions] == [
        "queue_hold", "queue_retry", "queue_delete"]
    assert all("domain=example.com" in a and "admin=" in a for a in actions)


def test_the_queue_page_holds_the_domains_outbound_mail_too_and_no_one_elses(server, admin):
    """Outbound entries had no panel page (the CLI only): now a domain's page lists its users'
    mail waiting for the smarthost, with the same actions, and not other domains' mail."""
    outbound = Queue(server.config.storage.spool / "outbound")
    ours = outbound.enqueue_bytes(b"Subject: o\r\n\r\nx\r\n", Envelope(
        "alice@example.com", "x@else.test", time.time(), extra={"user": "alice@example.com"}))
    theirs = outbound.enqueue_bytes(b"Subject: o\r\n\r\nx\r\n", Envelope(
        "carol@example.org", "x@else.test", time.time(), extra={"user": "carol@example.org"}))
    base = "/panel/domains/example.com/queue"
    page = admin.get(base)
    assert ours in page.text and theirs not in page.text and "outbound" in page.text
    assert admin.post(f"{base}/{ours}/hold").status == 303
    assert outbound.state_of(ours) == "hold"
    admin.get(base)
    assert admin.post(f"{base}/{theirs}/hold").status == 409       # not this domain's
    assert outbound.state_of(theirs) == "waiting"


def test_the_alternate_address_is_set_on_the_user_page_checked_escaped_and_audited(server, admin):
    page = admin.get(ALICE)
    assert 'name="alternate" value=""' in page.body and "none: no outage notices" in page.text
    reply = admin.post(ALICE, {"alternate": "Alice@Home.Example.NET", "state": "active"})
    assert (reply.status, reply.location) == (303, ALICE + "?done=saved")
    assert line_of(server, "alice@example.com").split(":")[6] == "alice@home.example.net"
    assert audit(server)[-1] == (ADMIN, "set_alternate",
                                 " user=alice@example.com alternate=alice@home.example.net")
    assert 'value="alice@home.example.net"' in admin.get(ALICE).body
    before = server.config.users_file.read_bytes()
    # refused before anything changes (the password typed with it included), typed text kept, escaped
    reply = admin.post(ALICE, {"alternate": '"><b>x</b>@example.net', "password": "brand new pass",
                               "repeat": "brand new pass", "state": "active"})
    assert reply.status == 400 and "<b>x</b>" not in reply.body and "&lt;b&gt;x&lt;/b&gt;" in reply.body
    reply = admin.post(ALICE, {"alternate": "alice2@example.com", "state": "active"})
    assert reply.status == 400 and "must be outside example.com" in reply.text
    assert 'value="alice2@example.com"' in reply.body
    assert server.config.users_file.read_bytes() == before
    # without the token nothing changes
    assert admin.post(ALICE, {"alternate": "", "state": "active"}, csrf=False).status == 403
    assert server.config.users_file.read_bytes() == before
    assert admin.post(ALICE, {"alternate": "", "state": "active"}).status == 303
    assert line_of(server, "alice@example.com").split(":")[6] == ""
