"""The archive on the web (issue 11, point 5: who sees what): the panel's Archive tab (search,
paging without a cap, a message page, release to the primary or the continuity mailbox, legal
holds, .eml and mbox downloads, every change audited and behind the CSRF token), and the
webmail's (a user's own mail only, a Bcc recipient's too, restore to their INBOX).

Archive content is written by the real ArchiveWriter into the real index, as serve does."""

from __future__ import annotations

import asyncio
import dataclasses
import email
import email.policy
import html
import http.client
import io
import mailbox
import re
import time
import zipfile
from pathlib import Path

import pytest

from relay.addresses import parse_mailbox
from relay.auth import LoginThrottle
from relay.config import HostPort, load
from relay.storage.archive import Archive, ArchiveWriter, Item
from relay.storage.archive_index import ArchiveIndex
from relay.storage.continuity import ContinuityStore
from relay.storage.maildir import MaildirStore
from relay.storage.release import RELEASED
from relay.storage.state import OUTAGE, State, state_dir, write_state
from relay.web import start_web
from relay.web.archive import OFF
from tests.helpers import free_port
from tests.loopwatch import watch_thread
from tests.smtp.fakes import InProcessRelay, send, write_config
from tests.web.helpers import ADMIN, WEB_CONFIG, Client, Reply, WebServer, prepare, watching_the_loop

pytestmark = pytest.mark.timeout(60)

ALICE, BOB = parse_mailbox("alice@example.com"), parse_mailbox("bob@example.com")
EVIL = '<script>alert("x")</script>'


# -- a web server with the archive -------------------------------------------------------------------

class ArchiveServer(WebServer):
    """`start_web` with an archive, its index and the store releases go into (as serve hands them)."""

    def __init__(self, config, clock, archive: bool = True, defaults: bool = False) -> None:
        super().__init__(config, LoginThrottle(base_delay=0.0, max_delay=0.0), clock)
        self.defaults = defaults        # hand over the archive alone: start_web makes the rest
        self.maildirs = MaildirStore(config.storage.maildirs)
        self.store = ContinuityStore(self.maildirs, config.storage.spool)
        self.archive = Archive(config.storage.archive) if archive else None
        self.index = ArchiveIndex(self.archive) if archive else None
        self.writer = ArchiveWriter(self.archive, on_written=self.index.add) if archive else None

    def start(self) -> ArchiveServer:
        self.thread.start()
        self.runner = asyncio.run_coroutine_threadsafe(start_web(
            self.config, self.directory, self.admins, self.throttle, clock=self.clock,
            maildirs=self.maildirs, archive=self.archive, index=None if self.defaults else self.index,
            store=None if self.defaults else self.store), self.loop).result(10)
        watch_thread(self.thread)       # requests on, start-up (one-off) not
        return self

    def stop(self) -> None:
        super().stop()
        if self.index is not None:
            self.index.close()

    def put(self, *items: Item) -> list[str]:
        """Archive these messages (written and indexed as serve does); their archive ids."""
        return [r.id for r in self.writer.write(list(items))]

    def outage(self, domain: str = "example.com") -> None:
        write_state(state_dir(self.config.storage.spool), domain, State(OUTAGE, time.time(), "451 down"))

    def replay_entries(self, domain: str = "example.com") -> list[tuple[str, bytes]]:
        """(recipient, message) of every waiting entry of the domain's replay queue."""
        queue = self.store.replay_queue(domain)
        return [(envelope.rcpt, data) for envelope, data in map(queue.read, queue.list("waiting"))]

    def inbox(self, user=ALICE) -> list[bytes]:
        box = self.maildirs.path(user)
        return [p.read_bytes() for sub in ("new", "cur") if (box / sub).is_dir()
                for p in sorted((box / sub).iterdir())]


def mail(subject: str = "hello", body: str = "hi there", sender: str = "Carol <carol@remote.test>",
         to: str = "Alice <alice@example.com>", extra: str = "") -> bytes:
    return (f"From: {sender}\r\nTo: {to}\r\n{extra}Subject: {subject}\r\n"
            f"Date: Tue, 01 Dec 2026 10:00:00 +0100\r\n"
            f"Message-ID: <{abs(hash((subject, body)))}@remote.test>\r\n"
            f"\r\n{body}\r\n").encode()


def item(data: bytes, rcpts=("alice@example.com",), when: float | None = None, **more) -> Item:
    fields = {"direction": "in", "kind": "passed", "sender": "carol@remote.test", "queue_id": "q1",
              "outcome": "primary 250", **more}
    return Item(data=data, rcpts=tuple(rcpts), when=when or time.time(), **fields)


@pytest.fixture
def config_path(tmp_path) -> Path:
    return write_config(tmp_path, free_port(), storage="archive: archive",
                        extra=f"  example.org:\n    primary: 127.0.0.1:{free_port()}\n" + WEB_CONFIG)


@pytest.fixture
def make_archive(config_path, clock):
    started: list[ArchiveServer] = []

    def make(archive: bool = True, defaults: bool = False) -> ArchiveServer:
        config = load(config_path)
        config = dataclasses.replace(config, listen=dataclasses.replace(config.listen,
                                                                        web=HostPort("127.0.0.1", 0)))
        if not archive:
            config = dataclasses.replace(config, storage=dataclasses.replace(config.storage, archive=None))
        prepare(config)
        server = ArchiveServer(config, clock, archive, defaults).start()
        started.append(server)
        return server

    with watching_the_loop(started):
        yield make


@pytest.fixture
def server(make_archive) -> ArchiveServer:
    return make_archive()


@pytest.fixture
def admin(server) -> Client:
    browser = Client(server.port)
    assert browser.login_admin().status == 303
    assert browser.get("/panel/archive").status == 200      # a page of the new session: its token
    return browser


def logged_in(server: ArchiveServer, address: str = "alice@example.com") -> Client:
    browser = Client(server.port)
    assert browser.login_user(address).status == 303
    assert browser.get("/mail/archive").status == 200
    return browser


def hit_ids(page: Reply) -> list[str]:
    """The archive ids of the result rows, in order."""
    return re.findall(r'id="hit-([0-9.]+)"', page.body)


def link(page: Reply, css_class: str) -> str | None:
    found = re.search(rf'<a class="[^"]*\b{css_class}\b[^"]*" href="([^"]*)"', page.body)
    return found.group(1).replace("&amp;", "&") if found else None


def download(browser: Client, path: str) -> tuple[int, http.client.HTTPMessage, bytes]:
    """A GET whose body is bytes (Client decodes bodies as text)."""
    conn = http.client.HTTPConnection("127.0.0.1", browser.port, timeout=30)
    try:
        cookies = "; ".join(f"{k}={v}" for k, v in browser.cookies.items())
        conn.request("GET", path, headers={"Cookie": cookies})
        response = conn.getresponse()
        return response.status, response.headers, response.read()
    finally:
        conn.close()


def audit(server: ArchiveServer, action: str) -> list[str]:
    return [line for line in server.audit_lines() if f" action={action} " in line + " "]


# -- the panel: search and paging --------------------------------------------------------------------

def test_an_administrator_searches_every_field_and_sees_each_rows_facts(server, admin):
    # Four messages of one UTC day: in the first minutes after midnight, "300 s ago" was
    # yesterday, and the one-day search below found three.
    now = max(time.time(), time.time() // 86400 * 86400 + 301)
    budget, lunch, secret, sent = server.put(
        item(mail("Quarterly budget", "numbers inside"), when=now - 300),
        item(mail("lunch", "see you at noon", to="alice@example.com, bob@example.com"),
             rcpts=("alice@example.com", "bob@example.com"), when=now - 200),
        item(mail("secret plan", "only for the bcc"), rcpts=("alice@example.com", "hidden@example.com"),
             when=now - 100),
        item(mail("re: budget", "we went over", sender="Alice <alice@example.com>", to="boss@elsewhere.test"),
             rcpts=("boss@elsewhere.test",), direction="out", kind="sent", sender="alice@example.com",
             user="alice@example.com", when=now))
    page = admin.get("/panel/archive")
    assert page.status == 200 and hit_ids(page) == [sent, secret, lunch, budget]      # newest first
    row = re.search(rf'<tr id="hit-{re.escape(lunch)}">(.*?)</tr>', page.body, re.S).group(1)
    cells = [" ".join(html.unescape(re.sub(r"<[^>]+>", " ", c)).split())
             for c in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)]
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", cells[0])
    assert cells[1:] == ["in", "Carol <carol@remote.test>", "alice@example.com, bob@example.com", "lunch",
                         lunch]
    for query, found in (("words=budget", [sent, budget]), ("subject=noon", []), ("words=noon", [lunch]),
                         ("user=hidden%40example.com", [secret]), ("direction=out", [sent]),
                         ("from=alice%40example.com", [sent]), ("to=bob%40example.com", [lunch]),
                         ("user=nobody%40example.com", [])):
        assert hit_ids(admin.get(f"/panel/archive?{query}")) == found, query
    today = time.strftime("%Y-%m-%d", time.gmtime(now))
    assert len(hit_ids(admin.get(f"/panel/archive?since={today}&until={today}"))) == 4
    assert hit_ids(admin.get("/panel/archive?until=2000-01-01")) == []
    for bad, why in (("user=not+an+address", "User: 'not an address' is not an address"),
                     ("since=yesterday", "Since: give a date as YYYY-MM-DD"),
                     ("since=2026-12-02&until=2026-12-01", "Since is after Until"),
                     ("direction=sideways", "Direction: choose in, out or either")):
        refused = admin.get(f"/panel/archive?{bad}")
        assert refused.status == 400 and why in refused.text, bad
    assert 'value="budget"' in admin.get("/panel/archive?words=budget").body       # the form keeps it


def test_sixty_messages_are_two_pages_and_there_is_no_cap(server, admin):
    now = time.time()
    ids = server.put(*(item(mail(f"invoice {n}", "pay me"), when=now - 1000 + n) for n in range(60)))
    first = admin.get("/panel/archive?words=pay")
    assert hit_ids(first) == ids[::-1][:50]
    assert link(first, "prev-page") is None and link(first, "next-page") == "/panel/archive?words=pay&page=2"
    second = admin.get(link(first, "next-page"))
    assert hit_ids(second) == ids[::-1][50:]
    assert link(second, "next-page") is None and link(second, "prev-page") == "/panel/archive?words=pay"
    past = admin.get("/panel/archive?words=pay&page=3")
    assert past.status == 200 and hit_ids(past) == [] and "No more messages" in past.text
    assert hit_ids(admin.get("/panel/archive?page=bogus")) == ids[::-1][:50]


# -- the panel: one message, release ------------------------------------------------------------------

def test_the_message_page_shows_the_envelope_headers_and_text(server, admin):
    (record_id,) = server.put(item(mail("the plan", "step one\nstep two", extra="Cc: dave@example.com\r\n"),
                                   rcpts=("alice@example.com", "hidden@example.com"), kind="kept",
                                   outcome="kept (2)"))
    page = admin.get(f"/panel/archive/{record_id}")
    assert page.status == 200
    for fact in (f"Archive id {record_id}", "Direction in (kept)", "Envelope sender carol@remote.test",
                 "Envelope recipients alice@example.com hidden@example.com", "Outcome kept (2)",
                 "From Carol <carol@remote.test>", "Cc dave@example.com", "Subject the plan",
                 "step one step two", "Message-ID <", "Download .eml"):
        assert fact in page.text, fact
    assert admin.get("/panel/archive/20000101.1").status == 404
    assert admin.get("/panel/archive/nonsense").status == 404
    status, headers, body = download(admin, f"/panel/archive/{record_id}/eml")
    assert status == 200 and body == server.archive.read(server.archive.get(record_id))
    assert headers["Content-Disposition"] == f'attachment; filename="{record_id}.eml"'
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert audit(server, "archive_download") and f"id={record_id}" in audit(server, "archive_download")[0]
    for path in (f"/panel/archive/{record_id}/eml", "/panel/archive/export"):    # audited: no HEAD
        assert admin.request("HEAD", path).status == 405, path
    assert len(audit(server, "archive_download")) == 1 and audit(server, "archive_export") == []


def test_a_release_while_the_domain_is_up_queues_a_copy_for_the_primary_and_is_audited(server, admin):
    (record_id,) = server.put(item(mail("again please", "the body"), rcpts=("alice@example.com",
                                                                            "someone@elsewhere.test")))
    admin.get(f"/panel/archive/{record_id}")
    reply = admin.post(f"/panel/archive/{record_id}/release")
    assert reply.status == 303 and reply.location == f"/panel/archive/{record_id}?done=primary"
    assert "Released to the primary" in admin.get(reply.location).text
    ((rcpt, data),) = server.replay_entries()       # ours only: never the outside recipient
    assert rcpt == "alice@example.com"
    assert data.startswith(f"{RELEASED}: {record_id} by {ADMIN} (panel) at ".encode())
    assert data.endswith(mail("again please", "the body"))
    assert server.inbox() == []                     # the domain is up: nothing in the continuity INBOX
    (line,) = audit(server, "archive_release")
    assert f"admin={ADMIN} action=archive_release id={record_id} to=alice@example.com went=primary" in line


def test_a_release_during_an_outage_lands_in_the_continuity_mailbox(server, admin):
    (record_id,) = server.put(item(mail("lost it", "find me"), rcpts=("alice@example.com",)))
    server.outage()
    admin.get(f"/panel/archive/{record_id}")
    reply = admin.post(f"/panel/archive/{record_id}/release")
    assert reply.location == f"/panel/archive/{record_id}?done=continuity"
    assert "Released into the continuity mailbox" in admin.get(reply.location).text
    (kept,) = server.inbox()
    assert f"{RELEASED}: {record_id} by {ADMIN} (panel)".encode() in kept and b"find me" in kept
    assert [rcpt for rcpt, _ in server.replay_entries()] == ["alice@example.com"]   # replayed later
    assert "went=\"continuity mailbox\"" in audit(server, "archive_release")[0]
    # to another address of ours, typed in: bob
    admin.post(f"/panel/archive/{record_id}/release", {"to": "Bob@Example.com"})
    assert len(server.inbox(BOB)) == 1 and "to=bob@example.com" in audit(server, "archive_release")[1]


def test_a_release_to_an_address_that_will_not_do_says_why_and_releases_nothing(server, admin):
    (record_id,) = server.put(item(mail("x"), rcpts=("someone@elsewhere.test",)))
    admin.get(f"/panel/archive/{record_id}")
    for to, status, why in (("", 409, "none of its recipients is in a configured domain: give an address"),
                            ("not an address", 400, "Release to: 'not an address' is not an address"),
                            ("eve@elsewhere.test", 400, "not in a domain this relay serves")):
        reply = admin.post(f"/panel/archive/{record_id}/release", {"to": to})
        assert reply.status == status and why in reply.text, to
        assert f'name="to" value="{to}"' in reply.body
    assert server.replay_entries() == [] and audit(server, "archive_release") == []


def test_archive_changes_without_the_csrf_token_are_refused_and_change_nothing(server, admin):
    (record_id,) = server.put(item(mail("x")))
    admin.get(f"/panel/archive/{record_id}")
    for path, fields in ((f"/panel/archive/{record_id}/release", {}),
                         ("/panel/archive/holds/add", {"who": "alice@example.com"}),
                         ("/panel/archive/holds/remove", {"who": "alice@example.com"})):
        assert admin.post(path, fields, csrf=False).status == 403, path
        assert admin.post(path, fields, csrf="forged").status == 403, path
    alice = logged_in(server)
    alice.get(f"/mail/archive/{record_id}")
    assert alice.post(f"/mail/archive/{record_id}/restore", csrf=False).status == 403
    assert server.replay_entries() == [] and server.archive.holds() == []
    assert [line for line in server.audit_lines() if "archive_" in line] == []


# -- the panel: legal holds ---------------------------------------------------------------------------

def test_holds_are_added_and_removed_audited_and_checked(server, admin):
    admin.get("/panel/archive/holds")
    reply = admin.post("/panel/archive/holds/add", {"who": " Alice@Example.COM "})
    assert reply.location == "/panel/archive/holds?done=add"
    admin.post("/panel/archive/holds/add", {"who": "@Example.org"})
    assert server.archive.holds() == ["@example.org", "alice@example.com"]
    page = admin.get("/panel/archive/holds")
    assert "alice@example.com" in page.text and "@example.org" in page.text
    assert admin.post("/panel/archive/holds/add", {"who": "alice@example.com"}).location == \
        "/panel/archive/holds?done=already"
    for bad, why in (("", "Give an address"), ("@nodot", "'@nodot' is neither an address nor @domain"),
                     ("alice", "'alice' is neither an address nor @domain"),
                     ("<b>x</b>@example.com", "neither an address nor @domain")):
        refused = admin.post("/panel/archive/holds/add", {"who": bad})
        assert refused.status == 400 and why in refused.text, bad
    assert "<b>x</b>" not in refused.body and "&lt;b&gt;x&lt;/b&gt;" in refused.body
    assert admin.post("/panel/archive/holds/remove", {"who": "@example.org"}).location == \
        "/panel/archive/holds?done=remove"
    missing = admin.post("/panel/archive/holds/remove", {"who": "bob@example.com"})
    assert missing.status == 409 and "bob@example.com is not held" in missing.text
    assert server.archive.holds() == ["alice@example.com"]
    assert [re.search(r"action=(\S+) who=(\S+)", line).groups() for line in server.audit_lines()
            if "archive_hold" in line] == [("archive_hold_add", "alice@example.com"),
                                           ("archive_hold_add", "@example.org"),
                                           ("archive_hold_remove", "@example.org")]
    (record_id,) = server.put(item(mail("held"), rcpts=("alice@example.com",)))
    assert "(held: never purged)" in admin.get(f"/panel/archive/{record_id}").text


# -- the panel: export --------------------------------------------------------------------------------

def test_the_search_downloads_as_an_mbox_oldest_first_and_is_audited(server, admin):
    now = time.time()
    ids = server.put(*(item(mail(f"report {n}", f"part {n}"), when=now - 100 + n) for n in range(3)),
                     item(mail("unrelated", "nothing"), when=now))
    page = admin.get("/panel/archive?words=report")
    assert link(page, "export-mbox") == "/panel/archive/export?words=report&format=mbox"
    status, headers, body = download(admin, link(page, "export-mbox"))
    assert status == 200 and headers["Content-Type"] == "application/mbox"
    assert re.fullmatch(r'attachment; filename="archive-\d{8}-\d{6}\.mbox"', headers["Content-Disposition"])
    path = server.config.storage.spool.parent / "export.mbox"
    path.write_bytes(body)
    box = mailbox.mbox(path)
    try:
        got = [box.get_bytes(key) for key in box.keys()]
    finally:
        box.close()
    assert [email.message_from_bytes(g, policy=email.policy.default)["subject"] for g in got] == \
        ["report 0", "report 1", "report 2"]
    (line,) = audit(server, "archive_export")
    assert 'format=mbox messages=3 query="words=report"' in line
    # a message with a line starting "From ": mbox cannot keep it; the zip keeps every byte
    (tricky,) = server.put(item(mail("tricky report", "From here on\nall is lost")))
    refused = admin.get("/panel/archive/export?words=report&format=mbox")
    assert refused.status == 409 and "download a zip of .eml files instead" in refused.text
    status, headers, body = download(admin, "/panel/archive/export?words=report&format=eml-zip")
    assert status == 200 and headers["Content-Type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(body)) as bundle:
        assert sorted(bundle.namelist()) == sorted(f"{i}.eml" for i in [*ids[:3], tricky])
        assert bundle.read(f"{tricky}.eml") == server.archive.read(server.archive.get(tricky))
    assert admin.get("/panel/archive/export?format=tar").status == 400


# -- the webmail: a user's own mail only ------------------------------------------------------------------

def test_a_user_finds_only_their_own_mail_a_bcc_too_and_anyone_elses_is_404(server):
    now = time.time()
    to_alice, bcc, to_bob, spoofed, sent, notice = server.put(
        item(mail("for alice"), when=now - 50),
        item(mail("for bob, alice in bcc", to="bob@example.com"),
             rcpts=("bob@example.com", "alice@example.com"), when=now - 40),
        item(mail("for bob only", to="bob@example.com"), rcpts=("bob@example.com",), when=now - 30),
        # anyone outside may claim alice's address as the envelope sender: never hers for that
        item(mail("claims to be alice", to="bob@example.com"), rcpts=("bob@example.com",),
             sender="alice@example.com", when=now - 20),
        item(mail("alice wrote", sender="alice@example.com", to="x@elsewhere.test"),
             rcpts=("x@elsewhere.test",), direction="out", kind="sent", sender="alice@example.com",
             user="alice@example.com", when=now - 10),
        item(mail("a notice", sender="mailer-daemon@relay.test"), rcpts=("alice@example.com",),
             direction="out", kind="notice", sender="", when=now))
    alice = logged_in(server)
    assert hit_ids(alice.get("/mail/archive")) == [notice, sent, bcc, to_alice]
    # the user field is not hers to set: still her own mail
    assert hit_ids(alice.get("/mail/archive?user=bob%40example.com")) == [notice, sent, bcc, to_alice]
    assert hit_ids(alice.get("/mail/archive?words=bob")) == [bcc]
    assert hit_ids(alice.get("/mail/archive?direction=out")) == [notice, sent]
    page = alice.get(f"/mail/archive/{bcc}")
    assert page.status == 200 and "for bob, alice in bcc" in page.text
    assert "Restore to my INBOX" in page.text
    for other in (to_bob, spoofed, "20000101.1"):
        reply = alice.get(f"/mail/archive/{other}")
        assert reply.status == 404 and "for bob only" not in reply.body, other
        assert alice.post(f"/mail/archive/{other}/restore").status == 404, other
    bob = logged_in(server, "bob@example.com")
    assert hit_ids(bob.get("/mail/archive")) == [spoofed, to_bob, bcc]
    assert bob.get(f"/mail/archive/{to_alice}").status == 404
    assert server.replay_entries() == []
    # the panel is not a user's, the webmail archive not an administrator's
    assert alice.get("/panel/archive").location == "/panel/login"
    assert alice.get(f"/panel/archive/{to_alice}/eml").location == "/panel/login"
    admin = Client(server.port)
    admin.login_admin()
    assert admin.get("/mail/archive").location == "/login"
    assert Client(server.port).get(f"/mail/archive/{to_alice}").location == "/login"


def test_the_user_page_never_shows_the_envelope(server):
    (record_id,) = server.put(item(mail("secret plan", to="team@example.com"),
                                   rcpts=("alice@example.com", "boss@example.com")))
    page = logged_in(server).get(f"/mail/archive/{record_id}")
    assert page.status == 200 and "secret plan" in page.text
    assert "boss@example.com" not in page.body          # the other Bcc recipient stays unnamed
    assert "carol@remote.test" in page.text             # the From header is the message's own


def test_restore_goes_to_the_primary_while_it_is_up_and_to_the_inbox_during_an_outage(server):
    (record_id,) = server.put(item(mail("bring it back", "body text"), rcpts=("alice@example.com",
                                                                              "bob@example.com")))
    alice = logged_in(server)
    alice.get(f"/mail/archive/{record_id}")
    reply = alice.post(f"/mail/archive/{record_id}/restore")
    assert reply.location == f"/mail/archive/{record_id}?done=primary"
    assert "on its way to your usual mailbox" in alice.get(reply.location).text
    ((rcpt, data),) = server.replay_entries()
    assert rcpt == "alice@example.com"                   # to her only, not to bob
    assert f"{RELEASED}: {record_id} by alice@example.com (webmail)".encode() in data
    assert server.inbox() == []
    server.outage()
    reply = alice.post(f"/mail/archive/{record_id}/restore")
    assert reply.location == f"/mail/archive/{record_id}?done=continuity"
    assert "Restored to your INBOX here" in alice.get(reply.location).text
    (kept,) = server.inbox()
    assert b"body text" in kept and server.inbox(BOB) == []
    lines = audit(server, "archive_restore")
    assert len(lines) == 2 and all(f"user=alice@example.com action=archive_restore id={record_id}" in x
                                   for x in lines)


# -- the archive off, and what a message may not do ----------------------------------------------------------

def test_with_the_archive_off_both_tabs_say_so(make_archive):
    server = make_archive(archive=False)
    admin = Client(server.port)
    admin.login_admin()
    for path in ("/panel/archive", "/panel/archive?words=x"):
        page = admin.get(path)
        assert page.status == 200 and OFF in page.text
    for path in ("/panel/archive/holds", "/panel/archive/export", "/panel/archive/20261101.1"):
        assert admin.get(path).status == 404, path
    alice = logged_in(server)
    page = alice.get("/mail/archive")
    assert page.status == 200 and OFF in page.text
    assert alice.get("/mail/archive/20261101.1").status == 404


def test_an_index_that_cannot_be_read_says_so_and_the_message_pages_still_work(config_path, make_archive):
    broken = config_path.parent / "archive" / "index.sqlite"
    broken.parent.mkdir()
    broken.write_bytes(b"this is not an SQLite database" * 100)
    server = make_archive()
    (record_id,) = server.put(item(mail("still here")))     # indexing fails, logged; the files hold it
    admin = Client(server.port)
    admin.login_admin()
    page = admin.get("/panel/archive?words=still")
    assert page.status == 503 and "search index cannot be read just now" in page.text
    assert "archive reindex" in page.text and "sqlite" not in page.text.lower()
    assert "still here" in admin.get(f"/panel/archive/{record_id}").text     # the files are the truth
    assert admin.get("/panel/archive/export").status == 503


def test_html_in_a_subject_or_body_is_shown_as_text_never_run(server, admin):
    html_only = (f"From: {EVIL} <carol@remote.test>\r\nTo: alice@example.com\r\nSubject: {EVIL}\r\n"
                 "MIME-Version: 1.0\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
                 f"<p>Hello <b>there</b></p>{EVIL}<img src=\"https://tracker.test/x.png\">\r\n").encode()
    plain, html_id = server.put(item(mail(EVIL, f"body {EVIL}")), item(html_only))
    alice = logged_in(server)
    pages = [admin.get("/panel/archive"), alice.get("/mail/archive")]
    for browser, base in ((admin, "/panel/archive"), (alice, "/mail/archive")):
        pages += [browser.get(f"{base}/{plain}"), browser.get(f"{base}/{html_id}")]
    for page in pages:
        assert page.status == 200
        assert "<script>" not in page.body and "&lt;script&gt;" in page.body
        assert "<img" not in page.body and "<iframe" not in page.body and "tracker.test" not in page.body
        assert " style=" not in page.body and "<style" not in page.body
        for url in re.findall(r'(?:src|href|action)="([^"]*)"', page.body):
            assert url.startswith("/") and not url.startswith("//"), url
        assert page.header("Content-Security-Policy").startswith("default-src 'self'")
        assert page.header("Cache-Control") == "no-store"
    assert "Hello there" in pages[3].text                 # the text of the HTML, tags dropped


@pytest.mark.parametrize("subject", [b"=?x\x00?q?boom?=", b"\xe9 =?x\x00?q?boom?=", b"=?utf-8?b?####?=",
                                     b"=?nonexistent-charset?q?a?=", b"=?utf-8*\x00?q?a?="])
def test_a_malformed_header_never_breaks_an_archive_page(server, admin, subject):
    """Issue 9, point 3, on the archive's pages too: what a remote sender wrote renders as best
    it can, in the list, the message page and the search, never a 500."""
    data = mail("placeholder", "body words").replace(b"Subject: placeholder", b"Subject: " + subject)
    data = data.replace(b"\r\n\r\n", b"\r\nContent-Type: text/plain; charset=\"x\x00\"\r\n"
                        b"Content-Disposition: attachment; filename*=x\x00''%ff\r\n\r\n", 1)
    (record_id,) = server.put(item(data))
    alice = logged_in(server)
    for browser, base in ((admin, "/panel/archive"), (alice, "/mail/archive")):
        assert browser.get(base).status == 200
        assert hit_ids(browser.get(f"{base}?from=carol%40remote.test")) == [record_id]
        assert browser.get(f"{base}/{record_id}").status == 200


def test_handed_the_archive_alone_the_site_makes_its_own_index_and_store(make_archive):
    server = make_archive(defaults=True)
    (record_id,) = server.put(item(mail("on its own", "words here")))
    admin = Client(server.port)
    admin.login_admin()
    assert hit_ids(admin.get("/panel/archive?words=words")) == [record_id]
    admin.get(f"/panel/archive/{record_id}")
    assert admin.post(f"/panel/archive/{record_id}/release").location.endswith("?done=primary")
    assert [rcpt for rcpt, _ in server.replay_entries()] == ["alice@example.com"]


# -- serve wires it ------------------------------------------------------------------------------------

def test_serve_archives_kept_mail_and_the_panel_finds_and_releases_it(config_path):
    config = load(config_path)
    config = dataclasses.replace(config, listen=dataclasses.replace(config.listen,
                                                                    web=HostPort("127.0.0.1", 0)))
    prepare(config)
    relay = InProcessRelay(config).start()      # its primary is down: mail for alice is kept
    try:
        answers, reply = send(relay.port, "carol@remote.test", ["alice@example.com"],
                              mail("kept while down", "the words"))
        assert reply is not None and reply[0] == 250, (answers, reply)
        admin = Client(relay.running.web.addresses[0][1])
        admin.login_admin()
        deadline = time.monotonic() + 10
        while not hit_ids(page := admin.get("/panel/archive?words=words")):
            assert time.monotonic() < deadline, "the archive page never listed the kept message"
            time.sleep(0.05)
        (record_id,) = hit_ids(page)
        admin.get(f"/panel/archive/{record_id}")
        reply = admin.post(f"/panel/archive/{record_id}/release")
        assert reply.location == f"/panel/archive/{record_id}?done=continuity"    # the domain is in outage
        box = config.storage.maildirs / "example.com" / "alice" / "new"
        assert len(list(box.iterdir())) == 2            # kept, and the released copy
    finally:
        relay.stop()
