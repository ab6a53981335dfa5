"""Logging in and out of the control panel and the self-service pages: right and wrong
passwords, the throttle per client address and per account, session lifetime, logout."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from relay.auth import LoginThrottle
from tests.helpers import wait_for
from tests.web.helpers import ADMIN, ADMIN_PASSWORD, USERS, Client

pytestmark = pytest.mark.timeout(60)


def test_admin_login_opens_the_panel(server, client):
    assert client.get("/panel").location == "/panel/login"
    reply = client.login_admin()
    assert (reply.status, reply.location) == (303, "/panel")
    page = client.get("/panel")
    assert page.status == 200
    assert "example.com" in page.text and "example.org" in page.text
    assert ADMIN in page.text   # shown as who is logged in


def test_admin_login_is_case_insensitive_on_the_address(server, client):
    assert client.login_admin(ADMIN.upper()).status == 303


@pytest.mark.parametrize("spelling", [ADMIN + "\x0b", ADMIN + "\u00a0", "\x0c" + ADMIN])
def test_a_login_that_names_no_address_opens_nothing_even_with_the_right_password(
        server, client, spelling):
    """Security review 9.4: one normalisation (`auth.login_address`). The form stripped the
    login with str.strip(), which also drops U+000B, U+000C and U+00A0, so these spellings
    logged in here while the SMTP ports refuse them; blanks and tabs around it still go."""
    user = next(iter(USERS))
    assert client.login_admin(spelling).status == 401
    assert client.login_user(user + spelling[len(ADMIN):] if spelling.startswith(ADMIN)
                             else spelling[0] + user, USERS[user]).status == 401
    assert client.login_admin(f" {ADMIN}\t").status == 303


def test_wrong_admin_password_is_refused_and_logged_without_the_password(server, client, caplog):
    caplog.set_level(logging.INFO, logger="relay")
    reply = client.login_admin(password="not the password")
    assert reply.status == 401
    assert "Wrong address or password" in reply.text
    assert client.get("/panel").location == "/panel/login"
    lines = [r.getMessage() for r in caplog.records if r.name == "relay.web"]
    assert any(line.startswith("web.login_failed kind=admin user=" + ADMIN) and "peer=127.0.0.1" in line
               for line in lines)
    assert not any("not the password" in line for line in lines)


def test_unknown_admin_and_user_passwords_do_not_open_the_panel(server, client):
    assert client.login_admin("nobody@example.com", "whatever 123").status == 401
    assert client.login_admin("alice@example.com", USERS["alice@example.com"]).status == 401
    assert client.login_admin("not an address", "x").status == 401
    assert client.get("/panel").location == "/panel/login"


def test_admin_password_does_not_open_self_service(server, client):
    assert client.login_user(ADMIN, ADMIN_PASSWORD).status == 401
    assert client.get("/account").location == "/login"


def test_user_login_opens_self_service_not_the_panel(server, client):
    reply = client.login_user()
    assert (reply.status, reply.location) == (303, "/account")
    assert "alice@example.com" in client.get("/account").text
    assert client.get("/panel").location == "/panel/login"
    assert client.get("/panel/domains/example.com").location == "/panel/login"


def test_user_without_password_or_deactivated_cannot_log_in(server, client):
    assert client.login_user("carol@example.com", "anything at all").status == 401
    server.directory.set_active("bob@example.com", False)
    assert client.login_user("bob@example.com").status == 401


def test_account_locked_after_too_many_failures_from_any_address(make_server):
    server = make_server(LoginThrottle(account_limit=3, address_limit=100, base_delay=0, max_delay=0))
    guesser = Client(server.port)
    for _ in range(3):
        assert guesser.login_admin(password="guess guess").status == 401
    # the right password is not even checked now, from this address or another one
    reply = guesser.login_admin()
    assert reply.status == 429 and "Too many failed attempts" in reply.text
    assert Client(server.port, peer="127.0.0.2").login_admin().status == 429
    # other accounts are not locked
    assert Client(server.port, peer="127.0.0.2").login_user().status == 303


def test_address_locked_after_too_many_failures_for_any_account(make_server):
    server = make_server(LoginThrottle(account_limit=100, address_limit=3, base_delay=0, max_delay=0))
    guesser = Client(server.port)
    for n in range(3):
        assert guesser.login_user(f"guess{n}@example.com", "guess guess").status == 401
    assert guesser.login_user().status == 429
    assert guesser.login_admin().status == 429
    assert Client(server.port, peer="127.0.0.2").login_user().status == 303


def test_guessing_at_an_admin_does_not_lock_the_same_address_out_of_self_service(make_server):
    server = make_server(LoginThrottle(account_limit=2, address_limit=100, base_delay=0, max_delay=0))
    for _ in range(2):
        assert Client(server.port).login_admin("alice@example.com", "guess guess").status == 401
    assert Client(server.port).login_admin("alice@example.com", "guess guess").status == 429
    assert Client(server.port).login_user("alice@example.com").status == 303


def test_failed_logins_are_delayed_off_the_loop(make_server):
    throttle = LoginThrottle(account_limit=10, base_delay=1.0, max_delay=1.0)
    server = make_server(throttle)
    client, other = Client(server.port), Client(server.port, peer="127.0.0.2")
    assert client.login_admin(password="guess guess").status == 401    # first failure: no delay
    replies = []
    delayed = threading.Thread(target=lambda: replies.append(client.login_admin(password="guess guess")))
    started = time.monotonic()
    delayed.start()
    # The second failure is counted just before its delay starts: from then on it is held.
    wait_for(lambda: throttle.delay("127.0.0.1", "") > 0, what="the second failure to be held")
    assert other.get("/login").status == 200        # the loop answers others meanwhile
    assert not replies, "the held failure was answered before the other page"
    delayed.join(10)
    assert replies[0].status == 401
    assert time.monotonic() - started >= 1.0


def test_logout_ends_the_session_even_for_a_copied_cookie(server, admin):
    copied = dict(admin.cookies)
    reply = admin.post("/logout")
    assert (reply.status, reply.location) == (303, "/panel/login")
    assert admin.get("/panel").location == "/panel/login"
    thief = Client(server.port)
    thief.cookies = copied
    assert thief.get("/panel").location == "/panel/login"
    assert any("action=logout" in line for line in server.audit_lines())


def test_session_ends_after_its_lifetime(make_server, clock):
    server = make_server(session_lifetime=600.0)
    admin = Client(server.port)
    assert admin.login_admin().status == 303
    clock.now += 599
    assert admin.get("/panel").status == 200
    clock.now += 2
    assert admin.get("/panel").location == "/panel/login"
    # and a fresh login works again
    assert admin.login_admin().status == 303
    assert admin.get("/panel").status == 200


def test_a_login_gets_a_new_session_and_csrf_token(server, client):
    client.get("/login")
    before_cookie, before_token = dict(client.cookies), client.csrf
    client.login_user()
    client.get("/account")
    assert client.cookies != before_cookie
    assert client.csrf != before_token


def test_a_forged_cookie_is_no_session(server, admin):
    name, value = next(iter(admin.cookies.items()))
    admin.cookies[name] = value[:-2] + ("AA" if not value.endswith("AA") else "BB")
    assert admin.get("/panel").location == "/panel/login"


def test_deactivating_a_user_ends_their_sessions(server, client):
    client.login_user()
    assert client.get("/account").status == 200
    server.directory.set_active("alice@example.com", False)
    assert client.get("/account").location == "/login"


def test_root_sends_each_kind_home(server, client, admin):
    assert client.get("/").location == "/login"
    assert admin.get("/").location == "/panel"
    client.login_user()
    assert client.get("/").location == "/account"
    assert client.get("/login").location == "/account"
    assert admin.get("/panel/login").location == "/panel"


def test_a_logged_out_cookie_stays_dead_after_a_restart(make_server):
    """Security review 9.11: logout was remembered in memory only, so a restart revived it."""
    server = make_server()
    admin = Client(server.port)
    assert admin.login_admin().status == 303 and admin.get("/panel").status == 200
    copied = dict(admin.cookies)
    assert admin.post("/logout").status == 303
    again = make_server(keep_files=True)      # a new process: nothing in memory, the same files
    thief = Client(again.port)
    thief.cookies = copied
    assert thief.get("/panel").location == "/panel/login"


def test_users_deactivate_on_the_command_line_ends_web_sessions_for_good(server, client):
    from relay.cli import main

    client.login_user()
    assert client.get("/account").status == 200
    assert main(["users", "deactivate", "alice@example.com", "-c", str(server.config.file)]) == 0
    assert main(["users", "activate", "alice@example.com", "-c", str(server.config.file)]) == 0
    assert client.get("/account").location == "/login"
