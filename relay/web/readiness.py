"""The panel's Readiness page: the same report as `continuity-relay readiness`
(relay/delivery/readiness.py), one row a check.

    GET /panel/readiness[?domain=D]

It only reads (and logs in to Dovecot as the test account, and says EHLO to the smarthost),
so it needs no form and no audit line.
"""

from __future__ import annotations

from aiohttp import web

from relay.delivery import readiness
from relay.web.login import admin_only
from relay.web.page import render
from relay.web.site import site_of


@admin_only
async def page(request: web.Request) -> web.StreamResponse:
    config = site_of(request).config
    domain = request.query.get("domain") or None
    if domain is not None and domain not in config.domains:
        raise web.HTTPNotFound()
    checks = await readiness.report(config, domain)
    return render(request, "panel/readiness.html", checks=checks, domain=domain,
                  domains=sorted(config.domains), failed=readiness.failed(checks))


def add_routes(app: web.Application) -> None:
    app.router.add_get("/panel/readiness", page, name="panel_readiness")
