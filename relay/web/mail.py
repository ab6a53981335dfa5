"""The webmail: where a logged-in user reads and writes mail in the continuity mailbox.

Not built yet. This module is the hook: `make_app` calls `add_routes(app)`, and every route the
webmail adds lives under `/mail`. What the rest of the site gives a webmail handler:

  - `@user_only` (relay.web.login): the handler runs for a logged-in user only;
    `account_of(request)` is that user (`relay.directory.User`, `.address` is the Mailbox);
  - `render(request, "mail/....html", **context)` (relay.web.page): templates extend
    `base.html`, are autoescaped, and forms carry `<input type="hidden" name="csrf"
    value="{{ csrf }}">`; every POST without it gets 403 before reaching a handler (a script
    may send the header X-CSRF-Token instead);
  - `site_of(request)` (relay.web.site): the config, the directory, the audit log;
  - the Content-Security-Policy allows nothing but this site (no inline script or style):
    a handler that must differ (say, a sandboxed frame for sanitised HTML mail, nh3) sets its
    own header on its response, which the default does not override.
What the webmail needs from the rest of the relay (the Maildir store, the submit pipeline) is
for app.py to hand over, through new keyword arguments of `make_app` / `start_web`.
"""

from __future__ import annotations

from aiohttp import web

from relay.web.login import account_of, user_only
from relay.web.page import render


@user_only
async def index(request: web.Request) -> web.StreamResponse:
    return render(request, "mail/index.html", user=account_of(request))


def add_routes(app: web.Application) -> None:
    app.router.add_get("/mail", index, name="mail")
