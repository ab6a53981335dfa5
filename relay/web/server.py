"""The web server: the aiohttp application, its middlewares, and starting it on `listen.web`.

    make_app(config, directory, admins, throttle, ..., maildirs=..., submit=...,
             archive=..., index=..., store=...) -> web.Application
    start_web(config, directory, admins, throttle, ssl_context=..., maildirs=..., submit=...,
              archive=..., index=..., store=...) -> web.AppRunner (listening)

`maildirs` (the relay's MaildirStore) turns the webmail on; `submit` (app.py's submit pipeline)
lets it send, and without it the compose page says sending is off (see mail.py). `archive`
(with its search `index` and the ContinuityStore a release puts copies into) turns the
archive pages on (see archive.py); without it they say the archive is off.

Each request passes, outermost first: `error_middleware` (friendly pages, never a traceback),
`body_limit_middleware` (a small body limit everywhere but the routes that take uploads, so an
unauthenticated POST cannot make the relay hold megabytes), `session_middleware` (login.py:
who is logged in), `csrf_middleware` (csrf.py: every POST must carry the session's token), then
the handler. Every response gets the security headers
(`_security_headers`, on response prepare, so error pages and files get them too).

Routes come from the modules that hold them: login.py (`/`, `/login`, `/panel/login`,
`/logout`), panel.py (`/panel...`), archive.py (`/panel/archive...`, `/mail/archive...`: before
mail.py's, whose `/mail/{folder}` would take them), account.py (`/account...`), mail.py
(`/mail...`), and the style sheet under `/static/`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import time
from collections.abc import Callable

from aiohttp import web

from relay.admins import Admins
from relay.auth import LoginThrottle
from relay.config import Config
from relay.directory import Directory
from relay.errors import DirectoryError, RelayError
from relay.log import event
from relay.storage.archive import Archive
from relay.storage.archive_index import ArchiveIndex
from relay.storage.continuity import ContinuityStore
from relay.storage.maildir import MaildirStore
from relay.web import account, login, mail, panel
from relay.web import archive as archive_pages
from relay.web import planned as planned_pages
from relay.web import readiness as readiness_pages
from relay.web.audit import AuditLog
from relay.web.csrf import csrf_middleware
from relay.web.page import STATIC, environment, error_page
from relay.web.revoked import Revoked
from relay.web.session import ADMIN, USER, Sessions, load_secret
from relay.web.site import SITE, Site, site_of

log = logging.getLogger("relay.web")

CONTENT_SECURITY_POLICY = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
                           "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
SHUTDOWN_TIMEOUT = 5.0      # seconds a request in hand may take to finish when the relay stops
# After answering a request whose body it did not read (413), aiohttp reads and drops the rest for
# this long so the client sees the answer; it does not stop when the client goes away (aiohttp
# 3.14), and a stopping relay waits for it: keep it short (default 10 s).
LINGERING_TIME = 2.0
FORM_MAX_SIZE = 2 * 1024 * 1024     # bytes of a request body (the CSV upload) without the webmail
FORM_MARGIN = 1024 * 1024           # with it: a message of message_size_limit plus the other fields


SMALL_BODY = 64 * 1024               # any form without a file: login, password, user settings
# The routes that take uploads, who may upload there, and how much (None: the app's limit).
UPLOAD_ROUTES = {"/mail/compose": (USER, None), "/panel/import": (ADMIN, FORM_MAX_SIZE)}


@web.middleware
async def body_limit_middleware(request: web.Request, handler) -> web.StreamResponse:
    """Every request body is bounded before anything reads it (the CSRF check reads the form):
    `SMALL_BODY`, except on an upload route for a session logged in as who may upload there
    (an anonymous POST to /mail/compose must not make the relay read 50 MB to refuse it).
    Over it, 413 (aiohttp stops reading there)."""
    if request.method in ("GET", "HEAD", "OPTIONS"):
        return await handler(request)
    kind, limit = UPLOAD_ROUTES.get(request.path, (None, SMALL_BODY))
    if kind is not None and not _logged_in_as(request, kind):
        limit = SMALL_BODY
    if limit is None:
        return await handler(request)
    if request.content_length is not None and request.content_length > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=request.content_length)
    limited = request.clone(client_max_size=limit)
    try:
        return await handler(limited)
    finally:
        limited._finish()   # aiohttp closes uploaded files of the request it made, not a clone's


def _logged_in_as(request: web.Request, kind: str) -> bool:
    """The request's cookie is a live session of `kind` (read before session_middleware runs,
    which checks the account too: this only decides how much body to take)."""
    sessions = site_of(request).sessions
    session = sessions.loads(request.cookies.get(sessions.cookie))
    return session is not None and session.logged_in and session.kind == kind


def body_limit(config: Config, webmail: bool) -> int:
    """The largest request body taken: with the webmail, enough for a compose form whose
    attachments make a message of `message_size_limit` (larger ones get 413 before any handler)."""
    return max(FORM_MAX_SIZE, config.message_size_limit + FORM_MARGIN) if webmail else FORM_MAX_SIZE


@web.middleware
async def error_middleware(request: web.Request, handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = error_page(request, exc.status)
        for name in ("Allow", "Retry-After"):
            if name in exc.headers:
                response.headers[name] = exc.headers[name]
        return response
    except Exception as exc:  # noqa: BLE001 - any fault of ours is a 500 page, never a traceback
        log.error("web.error path=%s error=%s", request.path, type(exc).__name__, exc_info=exc)
        return error_page(request, 500)


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    headers = response.headers
    headers["Server"] = "continuity-relay"          # not aiohttp's name and version
    headers.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
    headers.setdefault("X-Frame-Options", "DENY")
    headers.setdefault("X-Content-Type-Options", "nosniff")
    headers.setdefault("Referrer-Policy", "no-referrer")
    headers.setdefault("Cross-Origin-Opener-Policy", "same-origin")
    if not request.path.startswith("/static/"):
        headers.setdefault("Cache-Control", "no-store")     # pages may show a generated password
    if request.secure:
        headers.setdefault("Strict-Transport-Security", "max-age=31536000")


def make_app(config: Config, directory: Directory, admins: Admins, throttle: LoginThrottle | None = None,
             *, secret: bytes | None = None, clock: Callable[[], float] = time.time,
             client_max_size: int | None = None, maildirs: MaildirStore | None = None,
             submit: mail.Submit | None = None, archive: Archive | None = None,
             index: ArchiveIndex | None = None, store: ContinuityStore | None = None) -> web.Application:
    """The whole web site as an aiohttp application (not yet listening).

    `secret` signs the session cookies (default: read or made from `web.secret_file`, which
    blocks: pass it in from async code). `clock` serves the session lifetime and the audit log.
    `client_max_size` bounds a request body (default `body_limit`). `maildirs` and `submit` are
    the webmail's (see mail.py): without `maildirs` there is no webmail, without `submit` it
    cannot send. `archive` turns the archive pages on (archive.py); `index` is its search index
    (default: one of its own, closed with the app) and `store` where releases go (default: the
    configured Maildirs and spool).
    """
    if secret is None:
        secret = load_secret(config.web.secret_file)
    if client_max_size is None:
        client_max_size = body_limit(config, maildirs is not None)
    app = web.Application(middlewares=[error_middleware, body_limit_middleware, login.session_middleware,
                                       csrf_middleware],
                          client_max_size=client_max_size)
    app[mail.WEBMAIL] = mail.Webmail(maildirs, submit)
    app[archive_pages.ARCHIVE] = _archive_web(app, config, maildirs, archive, index, store)
    app[SITE] = Site(
        config=config, directory=directory, admins=admins,
        throttle=throttle or LoginThrottle(),
        sessions=Sessions(secret, config.web.session_lifetime, config.web.tls, clock,
                          Revoked(config.web.revoked_file, config.web.session_lifetime, clock)),
        audit=AuditLog(config.audit_log, clock),
        templates=environment(), clock=clock)
    app.on_response_prepare.append(_security_headers)
    for module in (login, panel, planned_pages, readiness_pages, archive_pages, account, mail):
        module.add_routes(app)
    app.router.add_static("/static/", STATIC, name="static")
    return app


def _archive_web(app: web.Application, config: Config, maildirs: MaildirStore | None,
                 found: Archive | None, index: ArchiveIndex | None,
                 store: ContinuityStore | None) -> archive_pages.ArchiveWeb:
    """The archive pages' hook; what was not handed over is made here (nothing is opened yet)."""
    if found is None:
        return archive_pages.ArchiveWeb()
    if index is None:
        index = ArchiveIndex(found)
        own = index

        async def close(_app: web.Application) -> None:
            await asyncio.to_thread(own.close)
        app.on_cleanup.append(close)
    if store is None:
        store = ContinuityStore(maildirs or MaildirStore(config.storage.maildirs, found.owner),
                                config.storage.spool, found.owner)
    return archive_pages.ArchiveWeb(found, index, store)


def _compile_templates(templates) -> None:
    """Compile every template before the first request (blocking: tens of milliseconds), so a
    broken one shows at start-up and the first page does not hold the loop."""
    for name in templates.list_templates(extensions=["html"]):
        templates.get_template(name)


async def start_web(config: Config, directory: Directory, admins: Admins,
                    throttle: LoginThrottle | None = None, *, ssl_context: ssl.SSLContext | None = None,
                    clock: Callable[[], float] = time.time, maildirs: MaildirStore | None = None,
                    submit: mail.Submit | None = None, archive: Archive | None = None,
                    index: ArchiveIndex | None = None,
                    store: ContinuityStore | None = None) -> web.AppRunner:
    """Serve the site on `config.listen.web` (HTTPS with `ssl_context`); stop it with
    `await runner.cleanup()`. A port that cannot be bound raises RelayError naming the key.
    `maildirs` and `submit` are the webmail's, `archive`, `index` and `store` the archive
    pages', as for `make_app`."""
    address = config.listen.web
    if address is None:
        raise RelayError("listen.web is not set")
    secret = await asyncio.to_thread(load_secret, config.web.secret_file)
    app = make_app(config, directory, admins, throttle, secret=secret, clock=clock, maildirs=maildirs,
                   submit=submit, archive=archive, index=index, store=store)
    await asyncio.to_thread(_compile_templates, app[SITE].templates)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT,
                           lingering_time=LINGERING_TIME)
    await runner.setup()
    try:
        await web.TCPSite(runner, address.host, address.port, ssl_context=ssl_context).start()
    except OSError as exc:
        await runner.cleanup()
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise RelayError(f"listen.web {address}: {reason}") from None
    host, port = runner.addresses[0][:2]
    event("web.listening", address=f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
          tls="yes" if ssl_context else "no")
    try:
        if not await asyncio.to_thread(admins.list):
            event("web.no_admins", logging.WARNING,
                  hint="continuity-relay admins add EMAIL --password-stdin")
    except DirectoryError as exc:   # mail goes on; the panel answers 500 until the file is fixed
        event("web.admins_unreadable", logging.ERROR, error=str(exc))
    return runner
