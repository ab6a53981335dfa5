"""Self-service: a registered user logs in with address and password and changes the password
(current one, new one twice); the passwd-file takes it at once."""

from __future__ import annotations

import dataclasses
import re

import pytest

from relay.addresses import parse_mailbox
from relay.auth import NOT_SYNCED, LoginThrottle
from relay.config import LDAP
from relay.directory import parse_line, verify_password
from tests.helpers import free_port
from tests.web.helpers import USERS, Client

pytestmark = pytest.mark.timeout(60)

OLD = USERS["alice@example.com"]


@pytest.fixture
def alice(server) -> Client:
    browser = Client(server.port)
    assert browser.login_user().location == "/account"
    page = browser.get("/account")
    assert "alice@example.com" in page.text and "Alice" in page.text
    browser.get("/account/password")
    return browser


def stored_hash(server) -> str:
    return server.directory.get(parse_mailbox("alice@example.com")).password_hash


def change(browser: Client, current: str, new: str, repeat: str | None = None):
    return browser.post("/account/password", {"current": current, "password": new,
                                              "repeat": new if repeat is None else repeat})


def test_change_own_password(server, alice):
    other_session = Client(server.port)
    other_session.login_user()
    reply = change(alice, OLD, "my new password")
    assert (reply.status, reply.location) == (303, "/account?done=password")
    assert "Your password was changed" in alice.get(reply.location).text   # this session goes on
    line = next(x for x in server.config.users_file.read_text().splitlines() if x.startswith("alice@"))
    assert line.split(":")[4] == "Alice" and line.endswith(":::")
    assert verify_password(parse_line(line).password_hash, "my new password")
    assert not verify_password(parse_line(line).password_hash, OLD)
    assert other_session.get("/account").location == "/login"            # the others end
    assert Client(server.port).login_user("alice@example.com", OLD).status == 401
    assert Client(server.port).login_user("alice@example.com", "my new password").status == 303
    lines = server.audit_lines()
    assert re.fullmatch(r"\S+Z user=alice@example.com action=change_own_password peer=127.0.0.1", lines[-1])
    assert "my new password" not in server.config.audit_log.read_text()


@pytest.mark.parametrize("current, new, repeat, message", [
    ("wrong password", "my new password", None, "Your current password is not right"),
    (OLD, "my new password", "my new passwort", "The two new passwords differ"),
    (OLD, "short", None, "at least 8 characters"),
    (OLD, "", None, "at least 8 characters"),
])
def test_refused_changes_leave_the_password_alone(server, alice, current, new, repeat, message):
    before = stored_hash(server)
    reply = change(alice, current, new, repeat)
    assert reply.status == 400
    assert message in reply.text
    assert stored_hash(server) == before
    assert alice.get("/account").status == 200
    assert server.audit_lines() == []


def test_guessing_the_current_password_is_throttled(make_server):
    server = make_server(LoginThrottle(account_limit=3, address_limit=100, base_delay=0, max_delay=0))
    alice = Client(server.port)
    alice.login_user()
    alice.get("/account/password")
    for _ in range(3):
        assert change(alice, "guess guess", "my new password").status == 400
    reply = change(alice, OLD, "my new password")
    assert reply.status == 429 and "Too many failed attempts" in reply.text
    assert verify_password(stored_hash(server), OLD)


def test_self_service_needs_a_user_login(server, client, admin):
    for path in ("/account", "/account/password", "/mail"):
        assert client.get(path).location == "/login"
        assert admin.get(path).location == "/login"
    client.get("/login")
    assert client.post("/account/password", {"current": OLD, "password": "x" * 10, "repeat": "x" * 10}
                       ).location == "/login"
    assert verify_password(stored_hash(server), OLD)


def test_webmail_placeholder_for_logged_in_users(server, alice):
    page = alice.get("/mail")
    assert page.status == 200 and "alice@example.com" in page.text


def test_in_an_ldap_domain_the_password_is_changed_in_the_directory(make_server):
    def with_ldap(config):
        ldap = LDAP(url=f"ldap://127.0.0.1:{free_port()}", bind_dn="uid={local},dc=example,dc=com",
                    timeout=2.0)
        domains = dict(config.domains)
        domains["example.com"] = dataclasses.replace(domains["example.com"], ldap=ldap)
        return dataclasses.replace(config, domains=domains)
    server = make_server(adjust=with_ldap)
    alice = Client(server.port)
    assert alice.login_user().status == 303          # the directory is unreachable: passwd-file
    assert "change it there" in alice.get("/account").text
    page = alice.get("/account/password")
    assert "change it there" in page.text and 'name="current"' not in page.body
    before = stored_hash(server)
    reply = change(alice, OLD, "my new password")
    assert reply.status == 400 and "change it there" in reply.text
    assert stored_hash(server) == before
    # a user who never logged in while the directory answered is told so, not "wrong password"
    reply = Client(server.port).login_user("carol@example.com", "whatever it is")
    assert reply.status == 401 and NOT_SYNCED in reply.text
