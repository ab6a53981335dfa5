"""The control panel in Chromium: an administrator made with the command line allocates a
password to a user and activates them; the passwd-file line takes it at once."""

from __future__ import annotations

import pytest
from playwright.sync_api import expect

from relay.directory import parse_line, verify_password
from tests.browser.conftest import ADMIN, ADMIN_PASSWORD, activate_in_panel

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
