"""Sessions in signed cookies: who is logged in, their CSRF token, and when they logged in.

A session is a small JSON object signed with the key in `web.secret_file` (itsdangerous,
HMAC-SHA256) and kept by the browser in one cookie, HttpOnly,
SameSite=Strict, and Secure with the `__Host-` prefix when the site is served over TLS. The
server keeps no session files. What keeps a cookie honest:
  - the signature: a changed or forged cookie reads as no session;
  - its issue time: older than `web.session_lifetime`, it reads as no session (the lifetime runs
    from the login, not from the last request);
  - the fingerprint of the password hash it was issued for (see `fingerprint`): callers compare
    it with the current hash on every request, so a password change or a deactivation ends every
    session of that account at once;
  - logging out, and deactivating the account, end sessions for good (revoked.py: a file, so a
    restart or a re-activation does not revive a copied cookie).

The secret file is made (32 random bytes, hex, mode 0600) on first start when missing; removing
it and restarting ends every session.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from aiohttp import web
from itsdangerous import BadSignature, URLSafeSerializer

from relay.errors import RelayError
from relay.storage.durable import fsync_dir
from relay.web.revoked import Revoked

ADMIN, USER = "admin", "user"
COOKIE, TLS_COOKIE = "relay_session", "__Host-relay_session"
MIN_SECRET = 32


def load_secret(path: Path | None) -> bytes:
    """The cookie signing key in `path`, made on first use (blocking: call it off the loop).

    None gives a key for this process only: every session ends at a restart.
    """
    if path is None:
        return secrets.token_bytes(32)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    except OSError as exc:
        raise RelayError(f"web.secret_file {path}: {exc.strerror or exc}") from None
    else:
        try:
            os.write(fd, secrets.token_hex(32).encode("ascii") + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(path.parent)
    try:
        secret = path.read_bytes().strip()
    except OSError as exc:
        raise RelayError(f"web.secret_file {path}: {exc.strerror or exc}") from None
    if len(secret) < MIN_SECRET:
        raise RelayError(f"web.secret_file {path}: shorter than {MIN_SECRET} bytes; remove it and a new "
                         f"one is made at the next start")
    return secret


@dataclass(frozen=True)
class Session:
    id: str
    csrf: str                   # the token every form of this session must send back
    issued: float               # time.time() at login (or at the first visit)
    kind: str | None = None     # ADMIN, USER, or None before logging in
    email: str | None = None
    key: str = ""               # fingerprint of the password hash at login

    @property
    def logged_in(self) -> bool:
        return self.kind is not None


class Sessions:
    """Makes sessions, turns them into cookie values and back, and ends them."""

    def __init__(self, secret: bytes, lifetime: float, secure: bool,
                 clock: Callable[[], float] = time.time, revoked: Revoked | None = None) -> None:
        self._secret = secret
        self._serializer = URLSafeSerializer(secret, salt="relay.web.session",
                                             signer_kwargs={"digest_method": hashlib.sha256})
        self.lifetime = lifetime
        self.secure = secure
        self.clock = clock
        self.cookie = TLS_COOKIE if secure else COOKIE
        self.revoked = revoked or Revoked(None, lifetime, clock)

    def new(self, kind: str | None = None, email: str | None = None, key: str = "") -> Session:
        """A fresh session with new id and CSRF token (never reuse one across a login)."""
        return Session(secrets.token_urlsafe(16), secrets.token_urlsafe(32), self.clock(), kind, email, key)

    def renewed(self, session: Session, key: str) -> Session:
        """The same login with a new password fingerprint (after the user changed it)."""
        return replace(session, key=key)

    def fingerprint(self, password_hash: str) -> str:
        """A keyed digest of a password hash: changes when the hash does, tells nothing about it."""
        return hmac.new(self._secret, password_hash.encode("utf-8"), hashlib.sha256).hexdigest()[:32]

    def dumps(self, session: Session) -> str:
        return self._serializer.dumps(asdict(session))

    def loads(self, value: str | None) -> Session | None:
        """The session in a cookie value; None when missing, forged or expired (see `ended`)."""
        if not value:
            return None
        try:
            session = Session(**self._serializer.loads(value))
        except (BadSignature, TypeError, ValueError, json.JSONDecodeError):
            return None
        age = self.clock() - session.issued
        if not 0 <= age <= self.lifetime:
            return None
        return session

    def ended(self, session: Session) -> bool:
        """Whether a logged-in session was ended for good (logout, deactivation). Blocking: a
        stat of `web.revoked_file`, so callers ask from a worker thread."""
        return self.revoked.refuses(session.id, session.email, session.issued)

    def end(self, session: Session) -> None:
        """Logging out: this session's cookie is refused from now on, even if kept elsewhere, and
        after a restart (blocking: a durable write)."""
        self.revoked.end_session(session.id, session.issued + self.lifetime)

    def set_cookie(self, response: web.StreamResponse, session: Session) -> None:
        response.set_cookie(self.cookie, self.dumps(session), path="/", httponly=True,
                            samesite="Strict", secure=self.secure or None)
