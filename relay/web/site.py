"""What every request handler of the web site shares, and where to find it.

`make_app` puts one `Site` into the application under `SITE`; a handler reaches it with
`site_of(request)`. The session middleware puts the request's `Session` under `SESSION` (always
one: before logging in it is an anonymous session that only carries a CSRF token).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import jinja2
from aiohttp import web

from relay.admins import Admins
from relay.auth import LoginThrottle
from relay.config import Config
from relay.directory import Directory
from relay.web.audit import AuditLog
from relay.web.session import Session, Sessions


@dataclass
class Site:
    config: Config
    directory: Directory
    admins: Admins
    throttle: LoginThrottle
    sessions: Sessions
    audit: AuditLog
    templates: jinja2.Environment
    clock: Callable[[], float]

    async def record(self, actor_kind: str, actor: str, action: str, **fields: object) -> None:
        """One audit line, written off the loop."""
        await asyncio.to_thread(self.audit.record, actor_kind, actor, action, **fields)

    async def record_many(self, actor_kind: str, actor: str,
                          actions: Iterable[tuple[str, dict[str, object]]]) -> None:
        """Several audit lines by one actor, written off the loop with one fsync."""
        await asyncio.to_thread(self.audit.record_many, actor_kind, actor, list(actions))


SITE = web.AppKey("site", Site)
SESSION = web.RequestKey("session", Session)
NEW_SESSION = web.RequestKey("new_session", Session)   # set by a handler: the cookie to send


def site_of(request: web.Request) -> Site:
    return request.config_dict[SITE]


def session_of(request: web.Request) -> Session:
    return request[SESSION]


def start_session(request: web.Request, session: Session) -> None:
    """Send `session` as the new cookie with this response (after a login, a logout, a change)."""
    request[NEW_SESSION] = session
    request[SESSION] = session
