"""What keeps the web pages safe: CSRF tokens, cookie attributes, security headers, escaping,
no external assets, friendly error pages, the signing key file."""

from __future__ import annotations

import re
import stat

import pytest

from relay.addresses import parse_mailbox
from relay.directory import User
from tests.web.helpers import Client

pytestmark = pytest.mark.timeout(60)

ALICE = "/panel/domains/example.com/users/alice"
PAGES = ["/panel", "/panel/domains/example.com", ALICE,
         "/panel/domains/example.com/add", "/panel/import"]


# -- CSRF ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("token", [False, "wrong-token", ""])
def test_a_change_without_the_right_csrf_token_is_refused_and_changes_nothing(server, admin, token):
    before = server.config.users_file.read_bytes()
    audit_before = server.audit_lines()
    admin.get(ALICE)
    change = {"password": "new password 1", "repeat": "new password 1", "state": "inactive"}
    for path, fields in [(ALICE, change),
                         (ALICE + "/generate", {}),
                         ("/panel/domains/example.com/add", {"email": "dave", "name": "Dave"})]:
        reply = admin.post(path, fields, csrf=token)
        assert reply.status == 403
        assert "expired or did not come from this site" in reply.text
    assert server.config.users_file.read_bytes() == before
    assert server.audit_lines() == audit_before


def test_another_sessions_token_is_refused(server, admin):
    other = Client(server.port)
    other.login_admin()
    other.get(ALICE)
    before = server.config.users_file.read_bytes()
    reply = admin.post(ALICE, {"state": "inactive"}, csrf=other.csrf)
    assert reply.status == 403
    assert server.config.users_file.read_bytes() == before


def test_login_and_logout_need_the_token_too(server, client, admin):
    client.get("/login")
    assert client.post("/login", {"email": "alice@example.com", "password": "alice pass 1"},
                       csrf="forged").status == 403
    assert client.post("/login", {"email": "alice@example.com", "password": "alice pass 1"},
                       csrf=False).status == 403
    assert client.get("/account").location == "/login"
    assert admin.post("/logout", csrf=False).status == 403
    assert admin.get("/panel").status == 200


def test_csrf_token_in_a_header_is_accepted(server, admin):
    admin.get(ALICE)
    reply = admin.request("POST", ALICE, b"state=inactive",
                          {"Content-Type": "application/x-www-form-urlencoded", "X-CSRF-Token": admin.csrf})
    assert reply.status == 303
    assert not server.directory.get(parse_mailbox("alice@example.com")).active


# -- cookies and headers ---------------------------------------------------------------------------

def _session_cookie(reply) -> str:
    cookies = [c for c in reply.set_cookies if "relay_session=" in c]
    assert len(cookies) == 1, reply.set_cookies
    return cookies[0]


def test_session_cookie_is_httponly_samesite_strict_and_not_secure_over_http(server, client):
    client.get("/panel/login")
    reply = client.post("/panel/login", {"email": "root@admins.example.net", "password": "admin pass 1"})
    cookie = _session_cookie(reply)
    attributes = {a.strip().split("=")[0].lower(): a.strip() for a in cookie.split(";")}
    assert cookie.startswith("relay_session=")
    assert "httponly" in attributes
    assert attributes["samesite"].lower() == "samesite=strict"
    assert attributes["path"] == "Path=/"
    assert "secure" not in attributes
    assert "domain" not in attributes and "max-age" not in attributes   # a browser-session cookie


def test_over_tls_the_cookie_is_secure_with_the_host_prefix(make_server, server_tls, client_tls):
    server = make_server(ssl_context=server_tls, tls=True)
    browser = Client(server.port, tls=client_tls)
    first = browser.get("/panel/login")
    assert first.status == 200
    assert first.header("Strict-Transport-Security") == "max-age=31536000"
    cookie = _session_cookie(first)
    assert cookie.startswith("__Host-relay_session=")
    assert "secure" in cookie.lower() and "httponly" in cookie.lower() and "samesite=strict" in cookie.lower()
    reply = browser.post("/panel/login", {"email": "root@admins.example.net", "password": "admin pass 1"})
    assert reply.status == 303
    assert "secure" in _session_cookie(reply).lower()
    assert browser.get("/panel").status == 200


@pytest.mark.parametrize("path", ["/login", "/panel", "/no/such/page", "/static/style.css"])
def test_security_headers_on_every_response(server, admin, path):
    reply = admin.get(path)
    assert reply.header("Content-Security-Policy").startswith("default-src 'self'")
    assert "frame-ancestors 'none'" in reply.header("Content-Security-Policy")
    assert reply.header("X-Frame-Options") == "DENY"
    assert reply.header("X-Content-Type-Options") == "nosniff"
    assert reply.header("Referrer-Policy") == "no-referrer"
    if not path.startswith("/static/"):
        assert reply.header("Cache-Control") == "no-store"
    assert reply.header("Strict-Transport-Security") is None      # not over plain HTTP
    assert reply.header("Server") == "continuity-relay"


def test_pages_fetch_nothing_from_elsewhere_run_no_script_and_fit_a_phone(server, admin):
    visitor, user = Client(server.port), Client(server.port)
    user.login_user()
    pages = [(admin, p) for p in PAGES] + [(visitor, p) for p in ("/login", "/panel/login", "/nowhere")] + [
        (user, p) for p in ("/account", "/account/password", "/mail")]
    for browser, path in pages:
        reply = browser.get(path)
        assert reply.status == (404 if path == "/nowhere" else 200), path
        assert '<meta name="viewport" content="width=device-width, initial-scale=1">' in reply.body
        assert "<script" not in reply.body and " style=" not in reply.body and "<style" not in reply.body
        for url in re.findall(r'(?:src|href|action)="([^"]*)"', reply.body):
            assert url.startswith("/") and not url.startswith("//"), (path, url)
    css = admin.get("/static/style.css")
    assert css.status == 200 and css.header("Content-Type").startswith("text/css")
    assert "url(" not in css.body and "@import" not in css.body


# -- escaping --------------------------------------------------------------------------------------

def test_a_script_in_a_users_name_is_escaped(server, admin):
    evil = '<script>alert("x")</script><img src=x onerror=alert(1)>'
    server.directory.add("mallory@example.com", evil)
    for path in ("/panel/domains/example.com", "/panel/domains/example.com/users/mallory"):
        body = admin.get(path).body
        assert "<script>alert" not in body and "<img src=x" not in body
        assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;&lt;img src=x onerror=alert(1)&gt;" in body


def test_typed_values_are_escaped_when_a_form_comes_back(server, admin):
    admin.get("/panel/domains/example.com/add")
    reply = admin.post("/panel/domains/example.com/add", {"email": '"><script>x()</script>', "name": "n"})
    assert reply.status == 400
    assert "<script>x()" not in reply.body
    assert 'value="&#34;&gt;&lt;script&gt;x()&lt;/script&gt;"' in reply.body   # kept, escaped
    visitor = Client(server.port)
    reply = visitor.login_user('"><b>hi</b>', "x")
    assert reply.status == 401 and "<b>hi</b>" not in reply.body


def test_a_local_part_with_url_characters_gets_working_links(server, admin):
    server.directory.add("o'neil+tag@example.com", "O'Neil")
    page = admin.get("/panel/domains/example.com")
    link = re.search(r'href="(/panel/domains/example.com/users/o[^"]*)"', page.body).group(1)
    assert link == "/panel/domains/example.com/users/o%27neil%2Btag"
    assert "o&#39;neil+tag@example.com" in admin.get(link).body


# -- errors ----------------------------------------------------------------------------------------

def test_unknown_pages_get_a_friendly_404(server, admin):
    for path in ("/nothing", "/panel/domains/nowhere.example", "/panel/domains/example.com/users/nobody",
                 "/panel/domains/example.com/users/..%2F..%2Fetc"):
        reply = admin.get(path)
        assert reply.status == 404, path
        assert "There is no such page" in reply.text
        assert "Traceback" not in reply.body


def test_a_fault_gives_a_500_page_without_internals(server, admin, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError("secret internal detail /etc/something")
    monkeypatch.setattr(server.directory, "list", broken)
    reply = admin.get("/panel/domains/example.com")
    assert reply.status == 500
    assert "could not do that just now" in reply.text
    assert "secret internal detail" not in reply.body and "Traceback" not in reply.body
    assert reply.header("Content-Security-Policy")


def test_wrong_method_is_a_friendly_405(server, admin):
    reply = admin.request("PUT", "/panel", b"", {"X-CSRF-Token": admin.csrf or ""})
    assert reply.status == 405
    assert "cannot be used that way" in reply.text


def test_the_signing_key_is_made_once_with_mode_0600(server, make_server):
    path = server.config.web.secret_file
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    key = path.read_bytes()
    assert len(key.strip()) == 64
    admin = Client(server.port)
    admin.login_admin()
    again = make_server(keep_files=True)    # a restart keeps the key: sessions survive it
    assert path.read_bytes() == key
    keep = Client(again.port)
    keep.cookies = dict(admin.cookies)
    assert keep.get("/panel").status == 200


def test_the_panel_never_shows_password_hashes(server, admin):
    hash_of_alice = server.directory.get(parse_mailbox("alice@example.com")).password_hash
    for path in PAGES:
        assert hash_of_alice.split("$")[-1] not in admin.get(path).body
    assert isinstance(server.directory.get(parse_mailbox("alice@example.com")), User)


def test_a_too_large_upload_gets_a_friendly_413_and_changes_nothing(server, admin):
    before = server.config.users_file.read_bytes()
    admin.get("/panel/import")
    big = b"email\n" + b"x@example.com\n" * (3 * 1024 * 1024 // 14)
    reply = admin.upload("/panel/import", {}, "file", "big.csv", big)
    assert reply.status == 413
    assert "larger than this server takes" in reply.text
    assert server.config.users_file.read_bytes() == before


@pytest.mark.parametrize("path", ["/login", "/panel/login", "/logout", "/account/password"])
def test_a_large_body_off_the_upload_routes_gets_413_before_anything_reads_it(server, client, path):
    """Security review 9.5: eight parallel 50 MB POSTs to /login took RSS from 56 MB to 817 MB."""
    client.get("/login")
    reply = client.request("POST", path, b"csrf=x&email=" + b"a" * (200 * 1024),
                           {"Content-Type": "application/x-www-form-urlencoded"})
    assert reply.status == 413


@pytest.mark.parametrize("path", ["/mail/compose", "/panel/import"])
def test_an_upload_route_takes_a_large_body_only_from_who_may_upload_there(server, client, admin,
                                                                           path):
    """Security review 9.5, moved: the CSRF check reads the form before the handler asks who is
    logged in, so an anonymous POST to an upload route made the relay read its whole limit (51 MB
    with the webmail) to refuse it. Anonymous, or logged in as the wrong kind: the small limit."""
    client.get("/login")
    body = b"csrf=x&file=" + b"a" * (1024 * 1024)
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    assert client.request("POST", path, body, form).status == 413
    if path == "/mail/compose":      # an administrator is no webmail user
        assert admin.request("POST", path, body, form).status == 413
    else:
        assert admin.request("POST", path, body, form).status == 403   # read, then CSRF says no


def test_a_chunked_body_off_the_upload_routes_is_cut_at_the_small_limit(server, client):
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.putrequest("POST", "/login")
        conn.putheader("Content-Type", "application/x-www-form-urlencoded")
        conn.putheader("Transfer-Encoding", "chunked")
        conn.endheaders()
        chunk = b"a" * 65536
        for _ in range(4):
            conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        conn.send(b"0\r\n\r\n")
        assert conn.getresponse().status == 413
    finally:
        conn.close()
