"""Logging in and out, and knowing on every request who is logged in.

Two kinds of account log in here, each with its own form:
  - administrators (`/panel/login`, the admins file) reach the control panel;
  - users (`/login`, `auth.authenticate`: the passwd-file, or the domain's LDAP directory, as
    the submission port checks them) reach their own account page and the webmail.

Failed logins are counted per client address and per account (`auth.LoginThrottle`): over the
limit the form answers 429 without checking the password; each failure waits the throttle's
delay before answering. Password checks run in a worker thread. A login starts a new session
(new id, new CSRF token); the session ends at logout, after `web.session_lifetime`, or as soon as
the account's password hash changes or the account is deactivated (`session_middleware`
checks this on every request).
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from relay import metrics
from relay.auth import LoginResult, account_key, authenticate, login_address
from relay.directory import User
from relay.log import event
from relay.web.page import redirect, render
from relay.web.session import ADMIN, USER, Session
from relay.web.site import NEW_SESSION, SESSION, Site, session_of, site_of, start_session

ACCOUNT = web.RequestKey("account", User)      # the logged-in administrator or user
HOME = {ADMIN: "/panel", USER: "/account"}
LOGIN = {ADMIN: "/panel/login", USER: "/login"}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# -- who is logged in ----------------------------------------------------------------------------

def _account(site: Site, session: Session) -> User | None:
    """The account a logged-in session belongs to, if it may still use it (blocking)."""
    if session.kind == ADMIN:
        account = site.admins.get(session.email or "")
    elif session.kind == USER:
        address = login_address(session.email or "")
        account = site.directory.get(address) if address else None
    else:
        return None
    if account is None or not account.can_log_in or site.sessions.ended(session):
        return None
    current = site.sessions.fingerprint(account.password_hash)
    return account if hmac.compare_digest(current, session.key) else None


@web.middleware
async def session_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    site = site_of(request)
    session = site.sessions.loads(request.cookies.get(site.sessions.cookie))
    if session is not None and session.logged_in:
        account = await asyncio.to_thread(_account, site, session)
        if account is None:
            session = None
        else:
            request[ACCOUNT] = account
    fresh = session is None
    request[SESSION] = session or site.sessions.new()
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        _send_cookie(request, exc, fresh)
        raise
    _send_cookie(request, response, fresh)
    return response


def _send_cookie(request: web.Request, response: web.StreamResponse, fresh: bool) -> None:
    sessions = site_of(request).sessions
    new = request.get(NEW_SESSION)
    if new is not None:
        sessions.set_cookie(response, new)
    elif fresh and response.content_type == "text/html" and not response.prepared:
        sessions.set_cookie(response, request[SESSION])   # so its forms' CSRF token checks out


def _only(kind: str) -> Callable[[Handler], Handler]:
    def decorate(handler: Handler) -> Handler:
        @functools.wraps(handler)
        async def guarded(request: web.Request) -> web.StreamResponse:
            if session_of(request).kind != kind:
                return redirect(LOGIN[kind])
            return await handler(request)
        return guarded
    return decorate


admin_only = _only(ADMIN)
"""Decorator: the handler runs for a logged-in administrator, anyone else goes to the login form."""

user_only = _only(USER)
"""Decorator: the handler runs for a logged-in user (`account_of(request)`), else the login form."""


def account_of(request: web.Request) -> User:
    """The logged-in administrator or user (under `admin_only` / `user_only`)."""
    return request[ACCOUNT]


# -- the forms ---------------------------------------------------------------------------------------

def throttle_key(kind: str, login: str) -> str:
    """Failures are counted per account and kind: guessing at an administrator does not lock the
    user of the same address out of the webmail, nor the other way round."""
    key = account_key(login)
    return key if kind == USER else f"admin:{key}"


async def _check(site: Site, kind: str, login: str, password: str) -> LoginResult:
    """The account, or why not when there is more to say than "wrong" (relay.auth.NOT_SYNCED)."""
    if kind == ADMIN:
        address = login_address(login)     # the users' normalisation: a U+000B names nobody
        return LoginResult(await asyncio.to_thread(site.admins.verify, str(address or ""), password))
    return await authenticate(site.directory, login, password)


def _form(request: web.Request, kind: str, status: int = 200, **context: object) -> web.Response:
    context.setdefault("email", "")
    context.setdefault("error", None)
    return render(request, "login.html", status, kind=kind, action=LOGIN[kind], **context)


async def _login(request: web.Request, kind: str) -> web.StreamResponse:
    site = site_of(request)
    form = await request.post()
    # As typed: `auth.login_address` is the one normalisation (str.strip() would also drop a
    # U+000B or U+00A0, which the SMTP ports refuse: one login, two answers).
    login, password = str(form.get("email", "")), str(form.get("password", ""))
    peer = request.remote or "-"
    account = throttle_key(kind, login)
    fields = {"kind": kind, "user": account_key(login), "peer": peer}
    if site.throttle.blocked(peer, account):
        event("web.login_blocked", logging.WARNING, **fields)
        return _form(request, kind, 429, email=login,
                     error="Too many failed attempts. Wait a few minutes and try again.")
    result = await _check(site, kind, login, password)
    user = result.user
    if user is None:
        site.throttle.failed(peer, account)
        metrics.auth_failed("web")
        event("web.login_failed", logging.WARNING, **fields)
        await asyncio.sleep(site.throttle.delay(peer, account))
        return _form(request, kind, 401, email=login, error=result.problem or "Wrong address or password.")
    site.throttle.succeeded(peer, account)
    start_session(request, site.sessions.new(kind, user.email, site.sessions.fingerprint(user.password_hash)))
    event("web.login", kind=kind, user=user.email, peer=peer)
    if kind == ADMIN:
        await site.record("admin", user.email, "login", peer=peer)
    return redirect(HOME[kind])


async def user_login_form(request: web.Request) -> web.StreamResponse:
    if session_of(request).kind == USER:
        return redirect(HOME[USER])
    return _form(request, USER)


async def user_login(request: web.Request) -> web.StreamResponse:
    return await _login(request, USER)


async def admin_login_form(request: web.Request) -> web.StreamResponse:
    if session_of(request).kind == ADMIN:
        return redirect(HOME[ADMIN])
    return _form(request, ADMIN)


async def admin_login(request: web.Request) -> web.StreamResponse:
    return await _login(request, ADMIN)


async def logout(request: web.Request) -> web.StreamResponse:
    site = site_of(request)
    session = session_of(request)
    if session.logged_in:
        await asyncio.to_thread(site.sessions.end, session)
        event("web.logout", kind=session.kind, user=session.email)
        if session.kind == ADMIN:
            await site.record("admin", session.email or "", "logout")
    start_session(request, site.sessions.new())
    return redirect(LOGIN.get(session.kind or USER, LOGIN[USER]))


async def home(request: web.Request) -> web.StreamResponse:
    kind = session_of(request).kind
    return redirect(HOME[kind] if kind else LOGIN[USER])


def add_routes(app: web.Application) -> None:
    app.router.add_get("/", home, name="home")
    app.router.add_get("/login", user_login_form, name="login")
    app.router.add_post("/login", user_login)
    app.router.add_get("/panel/login", admin_login_form, name="panel_login")
    app.router.add_post("/panel/login", admin_login)
    app.router.add_post("/logout", logout, name="logout")


async def audit_admin(request: web.Request, action: str, **fields: object) -> None:
    """An administrator's action: one log line and one audit line, naming who did it."""
    admin = account_of(request).email
    event("web.admin_action", admin=admin, action=action, **fields)
    await site_of(request).record("admin", admin, action, **fields)
