"""The web site: the control panel for administrators, self-service for users, and the
webmail, served by aiohttp on `listen.web` inside `continuity-relay serve`.

    server.py    make_app / start_web: the application, its middlewares, security headers
    site.py      what every handler shares (`Site`: config, directory, admins, throttle, ...)
    session.py   sessions in signed cookies; the signing key in `web.secret_file`
    csrf.py      the CSRF token every POST must carry
    login.py     logging in and out; who is logged in (`admin_only`, `user_only`)
    panel.py     the control panel: domains, users, CSV import
    account.py   self-service: a user changes their own password
    mail.py      the webmail's hook (`add_routes`)
    archive.py   the archive: the panel's tab (search, release, holds, export), a user's own
    audit.py     the audit log of administrators' actions
    page.py      templates, rendering, redirects, error pages
    password.py  what a new password must be; generated passwords
    metrics.py   Prometheus' endpoint on its own listener, `listen.metrics` (not this site)
"""

from relay.web.server import make_app, start_web

__all__ = ["make_app", "start_web"]
