"""The panel's planned outages, on a domain's page (relay/delivery/planned.py does the work).

    POST /panel/domains/{domain}/outage/start            divert now, until a time (optional)
    POST /panel/domains/{domain}/outage/end              end it: replay runs
    POST /panel/domains/{domain}/outage/windows          schedule a window
    POST /panel/domains/{domain}/outage/windows/remove   remove a scheduled window

Times typed here are UTC unless they carry an offset (`2026-12-05 20:00`, `...+01:00`), as
the panel shows every time in UTC; an `until` may also be a duration from now (`2h`). Each
change is one audit line, and one log line (`planned.*`, naming the administrator). serve's
health picks the change up within a second, as it does the `outage` command's.
"""

from __future__ import annotations

import asyncio
import time

from aiohttp import web

from relay.config import Window, parse_duration, parse_time, reason_text
from relay.delivery import planned
from relay.errors import PlannedError
from relay.web import panel
from relay.web.login import account_of, admin_only
from relay.web.page import form_text, redirect
from relay.web.site import site_of


def panel_time(text: str) -> float:
    """A time typed in the panel: UTC unless it says otherwise."""
    text = text.strip()
    if text.endswith("Z") or text[10:].count("+") or text[10:].count("-"):
        return parse_time(text)
    return parse_time(text + "+00:00")


def _until(text: str, now: float) -> float | None:
    if not text.strip():
        return None
    try:
        return now + parse_duration(text)
    except ValueError:
        return panel_time(text)


async def _change(request: web.Request, action: str, work, **fields: object) -> web.StreamResponse:
    """Run `work` (blocking) off the loop and audit it; a refusal shows the domain page again
    with its reason, and changes nothing."""
    site, domain = site_of(request), request.match_info["domain"]
    try:
        await asyncio.to_thread(work)
    except PlannedError as exc:
        return await _refused(request, str(exc))
    await site.record("admin", account_of(request).email, action, domain=domain, **fields)
    return redirect(f"/panel/domains/{domain}?done={action}")


async def _refused(request: web.Request, why: str) -> web.StreamResponse:
    return await panel.domain_view_page(request, 400, f"Nothing changed: {why}")


@admin_only
async def start(request: web.Request) -> web.StreamResponse:
    site, domain = site_of(request), panel.domain_name(request)
    form = await request.post()
    try:
        until = _until(form_text(form, "until"), time.time())
        reason = reason_text(form_text(form, "reason"))
    except ValueError as exc:
        return await _refused(request, str(exc))
    by = account_of(request).email
    return await _change(request, "outage_start",
                         lambda: planned.start(site.config, domain, until, reason, by),
                         until=planned.moment(until), reason=reason)


@admin_only
async def end(request: web.Request) -> web.StreamResponse:
    site, domain = site_of(request), panel.domain_name(request)
    await request.post()      # the CSRF token was checked; nothing else is read
    by = account_of(request).email
    return await _change(request, "outage_end", lambda: planned.end(site.config, domain, by))


@admin_only
async def schedule(request: web.Request) -> web.StreamResponse:
    site, domain = site_of(request), panel.domain_name(request)
    form = await request.post()
    try:
        window = Window(panel_time(form_text(form, "start")), panel_time(form_text(form, "end")),
                        reason_text(form_text(form, "reason")))
    except ValueError as exc:
        return await _refused(request, str(exc))
    by = account_of(request).email
    return await _change(request, "outage_schedule",
                         lambda: planned.schedule(site.config, domain, window, by),
                         start=planned.moment(window.start), end=planned.moment(window.end),
                         reason=window.reason)


@admin_only
async def unschedule(request: web.Request) -> web.StreamResponse:
    site, domain = site_of(request), panel.domain_name(request)
    form = await request.post()
    try:
        window = Window(float(form_text(form, "start")), float(form_text(form, "end")),
                        form_text(form, "reason"))
    except ValueError:
        return await _refused(request, "not a window")
    by = account_of(request).email
    return await _change(request, "outage_unschedule",
                         lambda: planned.unschedule(site.config, domain, window, by),
                         start=planned.moment(window.start), end=planned.moment(window.end))


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_post("/panel/domains/{domain}/outage/start", start)
    r.add_post("/panel/domains/{domain}/outage/end", end)
    r.add_post("/panel/domains/{domain}/outage/windows", schedule)
    r.add_post("/panel/domains/{domain}/outage/windows/remove", unschedule)
