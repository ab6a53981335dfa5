"""Self-service for registered users: their account page and changing their own password.

    GET  /account               who is logged in; links to the password form and the webmail
    GET  /account/password      form: current password, new password twice
    POST /account/password

The current password is checked as at login (off the loop, counted by the login throttle, so a
borrowed session cannot be used to guess it). The new one goes into the passwd-file at once:
Dovecot, the submission port and the webmail take it from the next login. The user's other
sessions end; this one goes on with a renewed cookie. In a domain whose passwords come from
its LDAP directory, the form says to change it there instead.
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from relay import metrics
from relay.auth import check_password
from relay.errors import DirectoryError
from relay.log import event
from relay.web import password
from relay.web.login import account_of, throttle_key, user_only
from relay.web.page import redirect, render
from relay.web.session import USER
from relay.web.site import session_of, site_of, start_session

DONE = {"password": "Your password was changed."}
LDAP_MANAGED = ("Your password is the one of your organisation's directory: change it there. The new "
                "one works here from your next login.")


def _ldap_managed(request: web.Request) -> bool:
    """In a domain with `ldap` settings the directory's password is the truth (relay.auth): one
    changed here would be replaced at the next login, so users change it in the directory."""
    domain = site_of(request).config.domains.get(account_of(request).address.domain)
    return domain is not None and domain.ldap is not None


@user_only
async def account(request: web.Request) -> web.StreamResponse:
    return render(request, "account/index.html", user=account_of(request), ldap=_ldap_managed(request),
                  notice=LDAP_MANAGED, done=DONE.get(request.query.get("done", "")))


def _form(request: web.Request, status: int = 200, error: str | None = None) -> web.Response:
    return render(request, "account/password.html", status, user=account_of(request), error=error,
                  ldap=_ldap_managed(request), notice=LDAP_MANAGED)


@user_only
async def password_form(request: web.Request) -> web.StreamResponse:
    return _form(request)


@user_only
async def change_password(request: web.Request) -> web.StreamResponse:
    site, user = site_of(request), account_of(request)
    if _ldap_managed(request):
        return _form(request, 400)          # the page says why
    form = await request.post()
    old, new, repeat = (str(form.get(name, "")) for name in ("current", "password", "repeat"))
    peer, key = request.remote or "-", throttle_key(USER, user.email)
    if site.throttle.blocked(peer, key):
        event("web.password_blocked", logging.WARNING, user=user.email, peer=peer)
        return _form(request, 429, "Too many failed attempts. Wait a few minutes and try again.")
    if problem := password.problem(new, repeat):
        return _form(request, 400, problem)
    if await check_password(site.directory, user.email, old) is None:
        site.throttle.failed(peer, key)
        metrics.auth_failed("web")
        event("web.password_refused", logging.WARNING, user=user.email, peer=peer)
        await asyncio.sleep(site.throttle.delay(peer, key))
        return _form(request, 400, "Your current password is not right.")
    site.throttle.succeeded(peer, key)
    try:
        user = await asyncio.to_thread(site.directory.set_password, user.email, new)
    except DirectoryError as exc:
        return _form(request, 400, str(exc))
    start_session(request, site.sessions.renewed(session_of(request),
                                                 site.sessions.fingerprint(user.password_hash)))
    event("web.password_changed", user=user.email, peer=peer)
    await site.record("user", user.email, "change_own_password", peer=peer)
    return redirect("/account?done=password")


def add_routes(app: web.Application) -> None:
    app.router.add_get("/account", account, name="account")
    app.router.add_get("/account/password", password_form, name="account_password")
    app.router.add_post("/account/password", change_password)
