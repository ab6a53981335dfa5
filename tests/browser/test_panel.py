"""The control panel in Chromium: an administrator made with the command line allocates a
password to a user and activates them; the passwd-file line takes it at once."""

from __future__ import annotations

import pytest
from playwright.sync_api import expect

from relay.directory import parse_line, verify_password
from tests.browser.helpers import ADMIN, ADMIN_PASSWORD, activate_in_panel

pytestmark = pytest.mark.timeout(60)

BOB, BOB_PASSWORD = "bob@example.com", "bob's new pass 1"


def passwd_line(relay, email: str) -> str:
    (line,) = [x for x in relay.config.users_file.read_text().splitlines() if x.startswith(email + ":")]
    return line


def test_admin_sets_a_password_and_activates_a_user(relay, open_tab):
    assert "added administrator" in relay.cli("admins", "add", ADMIN, "--password-stdin",
                                              stdin=ADMIN_PASSWORD + "\n")
    relay.cli("users", "add", BOB, "--name", "Bob Example")         # no password: cannot log in
    relay.cli("users", "deactivate", BOB)
    before = parse_line(passwd_line(relay, BOB))
    assert before.password_hash == "" and not before.active

    tab = open_tab()
    tab.goto("/panel/domains/example.com/users/bob")           # not logged in: the login form
    tab.page.wait_for_url(relay.url("/panel/login"))
    activate_in_panel(tab, BOB, BOB_PASSWORD, shots=True)

    user = parse_line(passwd_line(relay, BOB))
    assert user.active and user.name == "Bob Example"
    assert verify_password(user.password_hash, BOB_PASSWORD)
    main = tab.page.locator("main")
    expect(main).to_contain_text("active")
    expect(main).not_to_contain_text("cannot log in")
    # the domain's page lists the user as active with a password
    tab.page.locator(".crumbs a", has_text="example.com").click()
    row = tab.page.locator("main table tr", has_text=BOB)
    expect(row).to_contain_text("active")
    expect(row).not_to_contain_text("inactive")
    expect(row).to_contain_text("set")
    assert tab.dialogs == [] and tab.errors == [] and tab.remote_requests == []
    audit = relay.config.audit_log.read_text()
    assert f"admin={ADMIN} action=set_password user={BOB}" in audit
    assert f"admin={ADMIN} action=activate user={BOB}" in audit
    assert BOB_PASSWORD not in audit


def test_admin_holds_releases_and_deletes_a_queued_message(relay, open_tab):
    """The replay queue page (issue 10, point 2): the same actions as `continuity-relay queue`,
    behind CSRF tokens, each audited; the user's continuity copy stays after a delete."""
    relay.add_admin()
    relay.add_user("alice@example.com", "alice pw 1")
    relay.receive("alice@example.com", b"Subject: queued for replay\r\n\r\nprivate\r\n")
    tab = open_tab()
    tab.log_in_admin()
    tab.goto("/panel/domains/example.com")
    tab.page.get_by_text("Every entry, with hold, release, retry and delete").click()
    row = tab.page.locator("#queue-entries tbody tr")
    expect(row).to_have_count(1)
    expect(row).to_contain_text("alice@example.com")
    expect(row).to_contain_text("waiting")
    row.get_by_role("button", name="hold").click()
    expect(tab.page.locator("#queue-entries tbody tr")).to_contain_text("hold")
    tab.shot("panel-queue-held")
    tab.page.locator("#queue-entries tbody tr").get_by_role("button", name="release").click()
    expect(tab.page.locator("#queue-entries tbody tr")).to_contain_text("waiting")
    entry = tab.page.locator("#queue-entries tbody tr")
    entry.get_by_label("sure").check()
    entry.get_by_role("button", name="delete").click()
    expect(tab.page.locator("main")).to_contain_text("Nothing in this queue")
    assert len(relay.stored("alice@example.com")) == 1          # the continuity copy stays
    audit = relay.config.audit_log.read_text()
    for action in ("queue_hold", "queue_release", "queue_delete"):
        assert f"action={action} domain=example.com" in audit
    assert tab.dialogs == [] and tab.errors == [] and tab.remote_requests == []
