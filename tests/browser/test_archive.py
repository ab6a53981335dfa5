"""The archive in Chromium (issue 11, point 5): a message the primary took last week is lost
there, and the primary is down now. An administrator finds it in the panel's Archive tab and
releases it; since the domain is in outage it lands in the user's continuity mailbox, where the
user reads it in the webmail and, through a real Dovecot, over IMAP.

The relay runs as the browser tests' relay does, with the archive on and its storage handed to
the mail user (`vmail`), under a directory Dovecot's processes can reach."""

from __future__ import annotations

import dataclasses
import email
import email.policy
import imaplib
import re
import shutil
import time
from collections.abc import Iterator

import pytest
from playwright.sync_api import expect

from relay.config import HostPort, load
from relay.storage.archive import Archive, ArchiveWriter, Item
from relay.storage.archive_index import ArchiveIndex, Query
from relay.storage.durable import Owner
from relay.storage.release import RELEASED
from relay.storage.state import OUTAGE, State, state_dir, write_state
from tests.browser.helpers import ADMIN, EXTRA_CONFIG, BrowserRelay, text_message
from tests.browser.test_phone import PHONE, fits
from tests.helpers import free_port
from tests.integration import dovecot as dc
from tests.smtp.fakes import FakePrimary, InProcessRelay, write_config

pytestmark = pytest.mark.timeout(90)

ALICE, ALICE_PASSWORD = "alice@example.com", "alice pass 1"
SUBJECT = "Signed contract, final version"
BODY = "Hello Alice,\n\nhere is the signed contract, as agreed on the phone.\n\nCarol"


@pytest.fixture
def relay() -> Iterator[BrowserRelay]:
    """The browser tests' relay (every primary down, a fake smarthost, the web on a free port),
    with the archive on and `storage.owner: vmail`, in a directory Dovecot can reach. Before it
    starts, the archive holds one message the primary took last week, and example.com's state
    file says outage."""
    folder = dc.make_shared_tmpdir()
    smarthost = FakePrimary().start()
    running = None
    try:
        path = write_config(folder, free_port(), storage="archive: archive, owner: vmail",
                            extra=EXTRA_CONFIG.format(smarthost=smarthost.port))
        config = load(path)
        config = dataclasses.replace(config, listen=dataclasses.replace(config.listen,
                                                                        web=HostPort("127.0.0.1", 0)))
        owner = Owner.named("vmail")
        archive = Archive(config.storage.archive, config.archive.days, owner)
        ArchiveWriter(archive).write([Item(
            data=text_message(SUBJECT, BODY, to=ALICE, message_id="<contract-7@remote.test>"),
            direction="in", kind="passed", sender="carol@remote.test", rcpts=(ALICE,), queue_id="q7",
            outcome="primary 250", when=time.time() - 7 * 86400)])     # indexed by serve at start
        write_state(state_dir(config.storage.spool), "example.com",
                    State(OUTAGE, time.time(), "421 4.3.2 primary down"), owner)
        running = InProcessRelay(config).start()
        yield BrowserRelay(path, running.config, running, smarthost)
    finally:
        if running is not None and running.running is not None:
            running.stop()
        smarthost.stop()
        shutil.rmtree(folder, ignore_errors=True)


def imap_inbox(port: int) -> list[bytes]:
    """Every message in alice's INBOX, as Dovecot serves it."""
    client = imaplib.IMAP4("127.0.0.1", port, timeout=15)
    try:
        assert client.login(ALICE, ALICE_PASSWORD)[0] == "OK"
        status, data = client.select("INBOX", readonly=True)
        assert status == "OK", data
        if int(data[0]) == 0:
            return []
        status, items = client.fetch("1:*", "(BODY.PEEK[])")
        assert status == "OK", items
        return [item[1] for item in items if isinstance(item, tuple)]
    finally:
        client.logout()


def test_admin_releases_during_an_outage_and_the_user_reads_it_in_the_webmail_and_over_imap(relay, open_tab):
    relay.add_admin()
    relay.add_user(ALICE, ALICE_PASSWORD, "Alice Example")
    assert relay.stored(ALICE) == []            # the primary has it (had it): nothing kept here

    admin = open_tab()
    page = admin.page
    admin.log_in_admin()
    page.locator("header nav a", has_text="Archive").click()
    page.wait_for_url(relay.url("/panel/archive"))
    search = page.locator("form.search")
    search.locator("input[name=words]").fill("contract")
    search.locator("input[name=user]").fill(ALICE)
    search.get_by_role("button", name="Search").click()
    page.wait_for_url(re.compile(re.escape(relay.url("/panel/archive?")) + ".*words=contract"))
    rows = page.locator("#archive-hits tbody tr")
    expect(rows).to_have_count(1)
    expect(rows).to_contain_text(ALICE)
    expect(rows).to_contain_text("Carol Remote")
    admin.shot("panel-archive-search")

    rows.locator("a.message", has_text=SUBJECT).click()
    page.wait_for_url(re.compile(re.escape(relay.url("/panel/archive/")) + r"\d{8}\.\d+$"))
    record_id = page.url.rsplit("/", 1)[1]
    expect(page.locator("#envelope")).to_contain_text("primary 250")
    expect(page.locator("div.body pre").last).to_contain_text("here is the signed contract")
    admin.shot("panel-archive-message")
    page.locator("#release").get_by_role("button", name="Release").click()
    page.wait_for_url(relay.url(f"/panel/archive/{record_id}?done=continuity"))
    expect(page.locator("main .notice")).to_contain_text("Released into the continuity mailbox")
    admin.shot("panel-archive-released")
    assert admin.dialogs == [] and admin.errors == [] and admin.remote_requests == []
    audit = relay.config.audit_log.read_text()
    assert f"admin={ADMIN} action=archive_release id={record_id} to={ALICE} " \
           'went="continuity mailbox"' in audit

    # the user: the released copy is in her continuity INBOX, readable in the webmail
    user = open_tab()
    user.log_in_user(ALICE, ALICE_PASSWORD)
    user.page.locator("header nav a", has_text="Mail").click()
    user.page.wait_for_url(relay.url("/mail/INBOX"))
    message = user.page.locator("a.message", has_text=SUBJECT)
    expect(message).to_have_count(1)
    message.click()
    expect(user.page.locator("div.body")).to_contain_text("here is the signed contract")
    user.shot("webmail-released")
    # and in her own archive, the original record
    user.page.locator("header nav a", has_text="Archive").click()
    user.page.wait_for_url(relay.url("/mail/archive"))
    expect(user.page.locator("#archive-hits a.message", has_text=SUBJECT)).to_have_count(1)
    user.shot("webmail-archive")
    assert user.dialogs == [] and user.errors == [] and user.remote_requests == []

    # over IMAP, through a real Dovecot reading the same Maildir and passwd-file
    dovecot = dc.start_dovecot(relay.config_path.parent / "dovecot", relay.config.storage.maildirs,
                               relay.config.users_file)
    try:
        (got,) = imap_inbox(dovecot.imap_port)
    finally:
        dovecot.stop()
    parsed = email.message_from_bytes(got, policy=email.policy.default)
    assert parsed["subject"] == SUBJECT and parsed["message-id"] == "<contract-7@remote.test>"
    assert parsed[RELEASED].startswith(f"{record_id} by {ADMIN} (panel) at ")
    assert "here is the signed contract" in parsed.get_body(("plain",)).get_content()
    # the search index is the relay's own: nothing was archived twice
    index = ArchiveIndex(Archive(relay.config.storage.archive))
    try:
        assert [r.id for r in index.search(Query(words="contract")).records] == [record_id]
    finally:
        index.close()


def test_the_archive_pages_fit_a_phone(relay, open_tab):
    relay.add_admin()
    relay.add_user(ALICE, ALICE_PASSWORD, "Alice Example")
    tab = open_tab(**PHONE)
    tab.log_in_admin()
    for path, name in (("/panel/archive", "phone-panel-archive"), ("/panel/archive/holds", "phone-holds")):
        tab.goto(path)
        fits(tab, name)
    tab.goto("/panel/archive")
    tab.page.locator("#archive-hits a.message").first.click()
    expect(tab.page.locator("#envelope")).to_be_visible()
    fits(tab, "phone-panel-archive-message")
    user = open_tab(**PHONE)
    user.log_in_user(ALICE, ALICE_PASSWORD)
    user.goto("/mail/archive")
    fits(user, "phone-mail-archive")
    user.page.locator("#archive-hits a.message").first.click()
    expect(user.page.locator("form.restore")).to_be_visible()
    fits(user, "phone-mail-archive-message")
