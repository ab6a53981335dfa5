"""Cross-site request forgery: every request that changes something must prove it came from us.

Each session (also the anonymous one a visitor gets with the login form) carries a random token.
Pages put it into every form as the hidden field `csrf`; a script may send it as the header
`X-CSRF-Token` instead. Any request other than GET, HEAD or OPTIONS without the session's token
gets 403 and reaches no handler, so nothing is changed. SameSite=Strict cookies already keep
other sites' forms from carrying the session; the token also covers old browsers and
same-site attackers.
"""

from __future__ import annotations

import hmac
import logging

from aiohttp import web

from relay.log import event
from relay.web.site import SESSION

FIELD = "csrf"
HEADER = "X-CSRF-Token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


async def _sent_token(request: web.Request) -> str | None:
    token = request.headers.get(HEADER)
    if token is None:
        value = (await request.post()).get(FIELD)
        token = value if isinstance(value, str) else None
    return token


@web.middleware
async def csrf_middleware(request: web.Request, handler):
    if request.method not in SAFE_METHODS:
        expected = request[SESSION].csrf
        sent = await _sent_token(request)
        if sent is None or not hmac.compare_digest(sent.encode("utf-8"), expected.encode("utf-8")):
            event("web.csrf_refused", logging.WARNING, path=request.path, peer=request.remote or "-",
                  token="missing" if sent is None else "wrong")
            raise web.HTTPForbidden()
    return await handler(request)
