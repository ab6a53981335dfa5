"""HTML pages: the Jinja2 templates (autoescaped), rendering, redirects and the error page.

Templates live in `relay/web/templates/`, the one style sheet in `relay/web/static/`. Pages load
nothing from elsewhere and run no script; every form carries the session's CSRF token as the
hidden field `csrf` (see csrf.py).
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import jinja2
from aiohttp import web

from relay.web.site import SESSION, site_of

TEMPLATES = Path(__file__).parent / "templates"
STATIC = Path(__file__).parent / "static"

MESSAGES = {
    400: ("Bad request", "The request could not be understood. Go back and try again."),
    403: ("Not allowed", "This form has expired or did not come from this site. Go back, reload the "
                         "page and try again."),
    404: ("Not found", "There is no such page."),
    405: ("Not allowed", "This page cannot be used that way."),
    413: ("Too large", "What you sent is larger than this server takes."),
    429: ("Too many attempts", "Too many failed attempts. Wait a few minutes and try again."),
    500: ("Something went wrong", "The relay could not do that just now. Look at the page again "
                                  "before repeating a change; if this stays, the relay's log says why."),
}


def _utc(timestamp: float | None) -> str:
    if not timestamp:
        return "-"
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                             undefined=jinja2.StrictUndefined, auto_reload=False,
                             trim_blocks=True, lstrip_blocks=True)
    env.filters["utc"] = _utc
    env.filters["age"] = _age
    return env


def render(request: web.Request, template: str, status: int = 200, **context: object) -> web.Response:
    site = site_of(request)
    session = request.get(SESSION) or site.sessions.new()   # none yet when the session failed
    html = site.templates.get_template(template).render(
        session=session, csrf=session.csrf, path=request.path, **context)
    return web.Response(text=html, status=status, content_type="text/html")


def form_text(form, name: str) -> str:
    """A form field's text ("" when missing, or an upload where text was expected)."""
    value = form.get(name, "")
    return value if isinstance(value, str) else ""


def redirect(location: str) -> web.Response:
    """303 See Other: after a POST the browser GETs `location`."""
    return web.Response(status=303, headers={"Location": location})


def error_page(request: web.Request, status: int, message: str | None = None) -> web.Response:
    title, default = MESSAGES.get(status, MESSAGES[500 if status >= 500 else 400])
    return render(request, "error.html", status=status, title=title, message=message or default)
